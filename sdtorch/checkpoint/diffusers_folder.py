"""diffusers model folders: read one into the original key layout, write one from our models.

A folder holds model_index.json and one subfolder per part: unet/ vae/ text_encoder/ (config.json + weights),
tokenizer/ (vocab.json, merges.txt) and scheduler/ (scheduler_config.json, where the prediction type lives).
"""
import dataclasses
import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..models.clip import CLIPEncoderLayer
from ..models.stable_diffusion import PREFIXES, StableDiffusionModels, text_encoder_prefixes
from ..tokenizer import CLIPTokenizer
from . import diffusers_configs as configs
from .diffusers_keys import from_diffusers, to_diffusers, unet_rules, vae_rules
from .errors import CheckpointError, KeyMismatchError, UnsupportedModelError, name_some
from .formats import TensorRef, cpu_tensor, detect_format, read_tensor_file, write_safetensors

SD1_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline", "StableDiffusionXLImg2ImgPipeline")
WEIGHT_NAMES = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                "text_encoder": ("model", "pytorch_model"), "text_encoder_2": ("model", "pytorch_model")}
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
    """Configs and lazy weights of an SD 1.x/2.x/SDXL diffusers folder, keys converted to the original layout."""
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    pipeline = index.get("_class_name", "StableDiffusionPipeline")
    if pipeline in SDXL_PIPELINES and not (folder / "text_encoder" / "config.json").is_file():
        raise UnsupportedModelError(f"{folder}: not supported yet: the SDXL refiner (bigG only)")
    if pipeline not in SD1_PIPELINES + SDXL_PIPELINES:
        raise UnsupportedModelError(f"{folder}: not supported yet: a {pipeline}")
    unet = configs.unet_from_diffusers(read_json(folder / "unet" / "config.json"), f"{folder}/unet")
    vae = configs.vae_from_diffusers(read_json(folder / "vae" / "config.json"), f"{folder}/vae")
    clip = configs.clip_from_transformers(read_json(folder / "text_encoder" / "config.json"))
    # OpenAI's CLIP (SD 1.x) was trained with quick GELU, OpenCLIP's ViT-H (SD 2.x) with exact GELU
    family = "sdxl" if pipeline in SDXL_PIPELINES else "sd2" if clip.hidden_act == "gelu" else "sd1"
    if family == "sd2":  # see sd2_identity_layer
        clip = dataclasses.replace(clip, num_hidden_layers=clip.num_hidden_layers + 1)
    clip_2 = configs.clip_from_transformers(read_json(folder / "text_encoder_2" / "config.json"), projected=True) \
        if family == "sdxl" else None
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction_type = read_json(scheduler).get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon"
    tokenizer = read_tokenizer(folder / "tokenizer", clip.max_position_embeddings)
    pad = None if tokenizer.pad_token_id == tokenizer.eos_token_id else tokenizer.pad_token_id
    config = ModelConfig(family=family, unet=unet, vae=vae, clip=clip, clip_2=clip_2, prediction_type=prediction_type,
                         clip_pad_token_id=pad, resolution=1024 if family == "sdxl" else 512)

    tensors = {}
    # one or two text encoders: the names run out with the family's towers
    text_parts = dict(zip(("text_encoder", "text_encoder_2"), (p for p, _ in text_encoder_prefixes(family)),
                          strict=False))
    for part, rules in (("unet", unet_rules(unet)), ("vae", vae_rules(vae))) + tuple((p, None) for p in text_parts):
        weights = read_part_weights(folder / part, WEIGHT_NAMES[part], files, prefer_fp16)
        tensors.update(part_from_diffusers(part, weights, rules, f"{folder}/{part}", text_parts.get(part)))
    text_prefix = text_parts["text_encoder"]
    if family == "sd2":
        tensors.update(sd2_identity_layer(text_prefix, clip))
    return DiffusersFolder(tensors, config, tokenizer)


def sd2_identity_layer(prefix: str, clip) -> dict[str, TensorRef]:
    """SD 2.x conditions on ViT-H's penultimate layer. Its single files keep all 24 layers (the 24th never runs);
    diffusers' folders drop the 24th and use the last of 23. Loaded, every SD 2.x model is the single file's: a
    folder's tower gets a 24th layer of zeros, which is the identity (a residual layer whose branches output 0) and
    is never run anyway; written as a folder, the tower loses its last layer again (part_to_diffusers)."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in CLIPEncoderLayer(clip).state_dict().items()}
    last = clip.num_hidden_layers - 1
    return {f"{prefix}encoder.layers.{last}.{name}": TensorRef(shape, torch.float32, _zeros(shape))
            for name, shape in shapes.items()}


def _zeros(shape: tuple[int, ...]):
    return lambda dtype, device: torch.zeros(shape, dtype=dtype, device=device)


def diffusers_clip(config: ModelConfig):
    """The text encoder's config as a diffusers folder holds it: SD 2.x's without its unused last layer."""
    if config.family != "sd2":
        return config.clip
    return dataclasses.replace(config.clip, num_hidden_layers=config.clip.num_hidden_layers - 1, projection_dim=None)


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


def part_from_diffusers(part: str, weights: dict[str, TensorRef], rules, where: str,
                        prefix: str | None = None) -> dict[str, TensorRef]:
    """One part's tensors under the original checkpoint's keys (with `prefix`, by default PREFIXES[part])."""
    out, unclaimed = {}, []
    for key, ref in weights.items():
        # CLIP keeps its names, under an optional text_model. prefix
        original = key.removeprefix(CLIP_PREFIX) if rules is None else from_diffusers(key, rules)
        if original is None:
            unclaimed.append(key)
        else:
            out[(prefix or PREFIXES[part]) + original] = ref
    if unclaimed:
        raise KeyMismatchError(f"{where}: keys that no {part} block has: {name_some(unclaimed)}")
    return out


def write_diffusers_folder(models: StableDiffusionModels, config: ModelConfig, tokenizer: CLIPTokenizer,
                           folder: Path, dtype: torch.dtype | None = None) -> Path:
    """Write a folder diffusers' `StableDiffusionPipeline.from_pretrained` loads. Built beside the target and renamed
    into place at the end, so an interrupted write leaves nothing that looks like a model."""
    if config.family == "sdxl_refiner":
        raise UnsupportedModelError("writing the SDXL refiner as a diffusers folder is not supported yet; it loads "
                                    "and runs as a single file")
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and is not empty; choose a new folder")
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_diffusers_configs(config, tokenizer, tmp)
        parts = {"unet": models.unet, "vae": models.vae,
                 **dict(zip(("text_encoder", "text_encoder_2"), models.text_encoders, strict=False))}  # 1 or 2
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
                 diffusers_clip(config), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id),
             "scheduler/scheduler_config.json": configs.scheduler_config(config.prediction_type, config.family)}
    if config.clip_2 is not None:  # SDXL's bigG, whose tokenizer pads with "!" (id 0)
        jsons["text_encoder_2/config.json"] = configs.clip_to_transformers(
            config.clip_2, tokenizer.bos_token_id, tokenizer.eos_token_id, 0)
        tokenizer.with_pad_token_id(0).save_pretrained_files(folder / "tokenizer_2")
    for name, content in jsons.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained_files(folder / "tokenizer")


def part_to_diffusers(part: str, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    if part == "text_encoder_2":  # transformers' CLIPTextModelWithProjection: text_projection beside text_model
        return {k if k.startswith("text_projection.") else CLIP_PREFIX + k: t for k, t in state.items()}
    if part == "text_encoder":
        clip = diffusers_clip(config)
        dropped = (f"encoder.layers.{clip.num_hidden_layers}.", "text_projection.")  # SD 2.x: see sd2_identity_layer
        return {CLIP_PREFIX + k: t for k, t in state.items()
                if config.family != "sd2" or not k.startswith(dropped)}
    rules = unet_rules(config.unet) if part == "unet" else vae_rules(config.vae)
    out = {}
    for key, t in state.items():
        new = to_diffusers(key, rules)
        if part == "vae" and ".mid_block.attentions.0.to_" in new and new.endswith(".weight"):
            t = t.flatten(1)  # diffusers' VAE attention projections are Linear (C, C), the original's 1x1 convs
        out[new] = t
    return out
