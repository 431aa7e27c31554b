"""diffusers model folders: read one into the original key layout, write one from our models.

A folder holds model_index.json and one subfolder per part: unet/ vae/ text_encoder/ (config.json + weights),
tokenizer/ (vocab.json, merges.txt) and scheduler/ (scheduler_config.json, where the prediction type lives).
"""
import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..models.stable_diffusion import PREFIXES, StableDiffusionModels
from ..tokenizer import CLIPTokenizer
from . import diffusers_configs as configs
from .diffusers_keys import from_diffusers, to_diffusers, unet_rules, vae_rules
from .errors import CheckpointError, KeyMismatchError, UnsupportedModelError, name_some
from .formats import TensorRef, cpu_tensor, detect_format, read_tensor_file, write_safetensors

SD1_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline")
WEIGHT_NAMES = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                "text_encoder": ("model", "pytorch_model")}
CLIP_PREFIX = "text_model."  # published SD folders store it; transformers >= 5 writes the keys without it


@dataclass
class DiffusersFolder:
    tensors: dict[str, TensorRef]  # in the original single-file layout
    config: ModelConfig
    tokenizer: CLIPTokenizer


def read_json(path: Path) -> dict:
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")  # a FIFO would block the read forever
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{path}: a JSON {type(found).__name__}, expected an object")
    return found


def read_diffusers_folder(folder: Path, files: ExitStack, prefer_fp16: bool = False) -> DiffusersFolder:
    """Configs and lazy weights of an SD 1.x diffusers folder, keys converted to the original layout."""
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    pipeline = index.get("_class_name", "StableDiffusionPipeline")
    if "text_encoder_2" in index or "XL" in pipeline:
        raise UnsupportedModelError(f"{folder}: not supported yet: SDXL ({pipeline})")
    if pipeline not in SD1_PIPELINES:
        raise UnsupportedModelError(f"{folder}: not supported yet: a {pipeline}")
    unet = configs.unet_from_diffusers(read_json(folder / "unet" / "config.json"), f"{folder}/unet")
    if unet.context_dim == 1024:
        raise UnsupportedModelError(f"{folder}: not supported yet: SD 2.x (1024-wide text context)")
    vae = configs.vae_from_diffusers(read_json(folder / "vae" / "config.json"), f"{folder}/vae")
    clip = configs.clip_from_transformers(read_json(folder / "text_encoder" / "config.json"))
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction_type = read_json(scheduler).get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon"
    tokenizer = read_tokenizer(folder / "tokenizer", clip.max_position_embeddings)
    pad = None if tokenizer.pad_token_id == tokenizer.eos_token_id else tokenizer.pad_token_id
    config = ModelConfig(family="sd1", unet=unet, vae=vae, clip=clip, prediction_type=prediction_type,
                         clip_pad_token_id=pad)

    tensors = {}
    for part, rules in (("unet", unet_rules(unet)), ("vae", vae_rules(vae)), ("text_encoder", None)):
        weights = read_part_weights(folder / part, WEIGHT_NAMES[part], files, prefer_fp16)
        tensors.update(part_from_diffusers(part, weights, rules, f"{folder}/{part}"))
    return DiffusersFolder(tensors, config, tokenizer)


def read_tokenizer(folder: Path, max_length: int) -> CLIPTokenizer:
    """The folder's tokenizer: vocab.json + merges.txt, or (all that transformers >= 5 writes) tokenizer.json."""
    if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained_dir(folder) if folder.is_dir() else CLIPTokenizer.default()
    bpe = read_json(folder / "tokenizer.json").get("model", {})
    if bpe.get("type") != "BPE" or not isinstance(bpe.get("vocab"), dict):
        raise CheckpointError(f"{folder}/tokenizer.json: not a BPE tokenizer")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe.get("merges", [])]
    pad = read_json(folder / "tokenizer_config.json").get("pad_token") if (folder / "tokenizer_config.json").is_file() \
        else None
    pad = pad["content"] if isinstance(pad, dict) else pad
    # transformers >= 5 records model_max_length as "unlimited" (1e30); CLIP's own limit is its position count
    return CLIPTokenizer(bpe["vocab"], merges, pad_token_id=bpe["vocab"].get(pad), model_max_length=max_length)


def read_part_weights(sub: Path, names: tuple[str, ...], files: ExitStack, prefer_fp16: bool) -> dict[str, TensorRef]:
    """The tensors of one part: safetensors before .bin, the fp16 variant first only when fp16 is wanted, shards
    gathered through their index.json."""
    variants = (".fp16", "") if prefer_fp16 else ("", ".fp16")
    for variant in variants:
        for ext in (".safetensors", ".bin"):
            for name in names:
                single, index = sub / f"{name}{variant}{ext}", sub / f"{name}{variant}{ext}.index.json"
                if single.is_file():
                    shards = [single]
                elif index.is_file():
                    shards = [sub / s for s in sorted(set(read_json(index)["weight_map"].values()))]
                else:
                    continue
                tensors = {}
                for shard in shards:
                    tensors.update(read_tensor_file(shard, detect_format(shard), files)[0])
                return tensors
    raise CheckpointError(f"{sub}: no weights ({' or '.join(n + '.safetensors' for n in names)})")


def part_from_diffusers(part: str, weights: dict[str, TensorRef], rules, where: str) -> dict[str, TensorRef]:
    """One part's tensors under the original checkpoint's keys (with PREFIXES[part])."""
    out, unclaimed = {}, []
    for key, ref in weights.items():
        # CLIP keeps its names, under an optional text_model. prefix
        original = key.removeprefix(CLIP_PREFIX) if rules is None else from_diffusers(key, rules)
        if original is None:
            unclaimed.append(key)
        else:
            out[PREFIXES[part] + original] = ref
    if unclaimed:
        raise KeyMismatchError(f"{where}: keys that no {part} block has: {name_some(unclaimed)}")
    return out


def write_diffusers_folder(models: StableDiffusionModels, config: ModelConfig, tokenizer: CLIPTokenizer,
                           folder: Path, dtype: torch.dtype | None = None) -> Path:
    """Write a folder diffusers' `StableDiffusionPipeline.from_pretrained` loads. Built beside the target and renamed
    into place at the end, so an interrupted write leaves nothing that looks like a model."""
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and is not empty; choose a new folder")
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_diffusers_configs(config, tokenizer, tmp)
        parts = {"unet": models.unet, "vae": models.vae, "text_encoder": models.text_encoder}
        for part, module in parts.items():
            state = {key: cpu_tensor(t, dtype) for key, t in module.state_dict().items()}
            write_safetensors(part_to_diffusers(part, state, config), tmp / part /
                              f"{WEIGHT_NAMES[part][0]}.safetensors", {"format": "pt"})
        if folder.exists():
            folder.rmdir()
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_diffusers_configs(config: ModelConfig, tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Everything of a diffusers folder but the weights: also what `from_single_file(config=...)` needs offline."""
    jsons = {"model_index.json": configs.model_index(config),
             "unet/config.json": configs.unet_to_diffusers(config.unet),
             "vae/config.json": configs.vae_to_diffusers(config.vae),
             "text_encoder/config.json": configs.clip_to_transformers(
                 config.clip, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id),
             "scheduler/scheduler_config.json": configs.scheduler_config(config.prediction_type)}
    for name, content in jsons.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained_files(folder / "tokenizer")


def part_to_diffusers(part: str, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    if part == "text_encoder":
        return {CLIP_PREFIX + k: t for k, t in state.items()}
    rules = unet_rules(config.unet) if part == "unet" else vae_rules(config.vae)
    out = {}
    for key, t in state.items():
        new = to_diffusers(key, rules)
        if part == "vae" and ".mid_block.attentions.0.to_" in new and new.endswith(".weight"):
            t = t.flatten(1)  # diffusers' VAE attention projections are Linear (C, C), the original's 1x1 convs
        out[new] = t
    return out
