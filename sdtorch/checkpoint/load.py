"""Load an SD 1.x, SD 2.x or SDXL checkpoint (single file or diffusers folder) into `StableDiffusionModels`.

The models are built on the meta device, without their random init, then every parameter is assigned the file's
tensor, cast on the way: no weight is initialised, and (from safetensors) none is held in memory twice.
"""
import json
import re
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, VAEConfig
from ..diffusion.schedule import PREDICTION_TYPES
from ..models.stored import assign_q8, compute_in
from ..models.stable_diffusion import PREFIXES, StableDiffusionModels, text_encoder_prefixes
from ..tokenizer import CLIPTokenizer
from .diffusers_folder import WEIGHT_NAMES, part_from_diffusers, read_diffusers_folder, read_part_weights
from .diffusers_keys import vae_rules
from .errors import (CheckpointError, CorruptCheckpointError, KeyMismatchError, ShapeMismatchError,
                     UnsupportedModelError, name_some)
from .formats import TensorRef, detect_format, read_tensor_file, sha256_of_file
from .infer import FAMILY_NAMES, describe_keys, detect_family, infer_config, sd2_predicts_v
from .openclip_keys import from_openclip
from .validate import check_config, check_config_fits

# Tensors real checkpoints carry that are no model weight: LDM's diffusion-schedule buffers, EMA bookkeeping, and
# CLIP's constant position ids (0..76), which our CLIP computes instead of storing.
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar",
    "model_ema.decay", "model_ema.num_updates", "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"})
EMA_PREFIX = "model_ema."
# Checkpoints saved with old transformers store CLIP without its `text_model.` level
_CLIP_WITHOUT_TEXT_MODEL = re.compile(r"^(cond_stage_model|conditioner\.embedders\.0)\.transformer\.(?!text_model\.)")
SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
# Some converted checkpoints store the VAE's attention projections as Linear (C, C) instead of 1x1 convs (C, C, 1, 1)
_VAE_ATTENTION_WEIGHT = re.compile(r"first_stage_model\.(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?(\w+)", re.MULTILINE)


@dataclass
class LoadedCheckpoint:
    models: StableDiffusionModels  # eval mode, requires_grad False
    config: ModelConfig
    tokenizer: CLIPTokenizer
    name: str
    path: Path
    source_format: str  # what detect_format said
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's, kept by save_checkpoint

    @cached_property
    def sha256_short(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the file's SHA-256 (None for a folder). Computed on first
        use, since hashing 4 GB takes seconds."""
        return None if self.path.is_dir() else sha256_of_file(self.path)[:10]


def load_checkpoint(path: str | Path, *, vae: str | Path | None = None, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, ema: bool = False, prediction_type: str | None = None,
                    config: ModelConfig | None = None, stored_layers: bool = False) -> LoadedCheckpoint:
    """An SD 1.x checkpoint (.safetensors, .ckpt, or a diffusers folder), optionally with another VAE (`vae`: a file in
    either key layout, or a diffusers vae/ folder). dtype None means float32; `ema` picks a full checkpoint's EMA
    UNet; `prediction_type` (one of diffusion.PREDICTION_TYPES) overrides the sidecar .yaml and the file's own; `config`
    overrides the one the file carries or its shapes imply. `stored_layers`: Linear and Conv2d weights stay in the
    precision the file stores them in (memory-mapped, from safetensors) and are cast at each call, the rest is cast
    to dtype (models/stored.py: how the CPU computes an fp16 file in fp32)."""
    check_dtype(dtype)
    return _load_checkpoint(path, vae=vae, device=device, dtype=dtype or torch.float32, ema=ema,
                            prediction_type=prediction_type, config=config, stored_layers=stored_layers)


def check_dtype(dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype such as torch.float16, got {dtype!r}")


def _load_checkpoint(path, *, vae, device, dtype: torch.dtype | None, ema: bool, prediction_type: str | None,
                     config: ModelConfig | None, stored_layers: bool = False) -> LoadedCheckpoint:
    """load_checkpoint, where dtype None keeps every tensor's stored dtype (what `convert` needs)."""
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if config is not None and not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    path, device = Path(path), torch.device(device or "cpu")
    fmt = detect_format(path)
    with ExitStack() as files:
        metadata, tokenizer = {}, None
        scales = {}
        if fmt == "diffusers-folder":
            folder = read_diffusers_folder(path, files, prefer_fp16=dtype == torch.float16)
            tensors, found, tokenizer = folder.tensors, folder.config, folder.tokenizer
        else:
            tensors, metadata = read_tensor_file(path, fmt, files)
            tensors = {_CLIP_WITHOUT_TEXT_MODEL.sub(r"\1.transformer.text_model.", k, count=1): ref
                       for k, ref in tensors.items()}
            # a q8 file (`convert --weights q8`): int8 layer weights, each with its block scales under KEY_scale
            scales = {k.removesuffix("_scale"): tensors.pop(k) for k in [k for k in tensors
                                                                          if k.endswith(".weight_scale")]}
            family = _check_family(tensors, path)
            for prefix, openclip in text_encoder_prefixes(family):
                if openclip:
                    tensors = from_openclip(tensors, prefix)
            found = config or _single_file_config(tensors, metadata, path, family)
        cfg = config or found
        stated = prediction_type or _sidecar_prediction_type(path)
        cfg = _with_prediction_type(cfg, stated or cfg.prediction_type)
        check_config(cfg, str(path))
        where = str(path)
        if vae is not None:
            vae_tensors = read_vae(Path(vae), cfg.vae, files)
            tensors = {k: ref for k, ref in tensors.items() if not k.startswith(PREFIXES["vae"])} | vae_tensors
            scales = {k: ref for k, ref in scales.items() if not k.startswith(PREFIXES["vae"])}
            where += f" with VAE {vae}"
        models = build_on_meta(cfg)
        expected = {k: tuple(t.shape) for k, t in models.state_dict().items()}
        tensors = _select_unet_weights(tensors, expected, ema, where)
        stray = [k for k in scales if k not in tensors]
        if stray:
            raise CorruptCheckpointError(f"{where}: q8 scales for no weight of the model: {name_some(stray)}")
        tensors = _check_keys_and_shapes(tensors, expected, where, quantized=scales.keys())
        # tensor by tensor, cast while reading (int8 q8 weights never are)
        state = {k: ref.load(None if stored_layers else dtype, device) for k, ref in tensors.items()}
        for key, scale in scales.items():
            layer = models.get_submodule(key.removesuffix(".weight"))
            assign_q8(layer, state.pop(key), scale.load(torch.float16, device))
    assign_tensors(models, state)
    if stored_layers:
        compute_in(models, dtype)
    left = [n for n, t in chain(models.named_parameters(), models.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: no weights for {name_some(left)} (left on the meta device)")
    models.requires_grad_(False).eval()
    if not stated and config is None and fmt != "diffusers-folder" and cfg.family == "sd2" \
            and not _file_states_prediction_type(metadata):
        cfg = _with_prediction_type(cfg, "v_prediction" if sd2_predicts_v(models.unet) else "epsilon")
        models.config = cfg
    tokenizer = tokenizer or CLIPTokenizer.default(pad_token_id=cfg.clip_pad_token_id)
    name = path.name if path.is_dir() else path.stem
    return LoadedCheckpoint(models, cfg, tokenizer, name, path, fmt, metadata)


_NOT_A_MODEL = {"vae": "is a standalone VAE, not a whole model: pass it as vae= beside a checkpoint",
                "diffusers": "has diffusers-layout keys: load the whole diffusers folder (with model_index.json)",
                "lora": "is a LoRA, not a whole model", "embedding": "is a textual-inversion embedding, not a model"}


def _check_family(tensors: dict[str, TensorRef], path: Path) -> str:
    family = detect_family(tensors)
    if family in _NOT_A_MODEL:
        raise UnsupportedModelError(f"{path} {_NOT_A_MODEL[family]}")
    if family not in SUPPORTED_FAMILIES:
        found = f" (found {describe_keys(tensors)})" if family == "unknown" else ""
        raise UnsupportedModelError(f"{path}: not supported yet: {FAMILY_NAMES[family]}{found}")
    return family


def _file_states_prediction_type(metadata: dict[str, str]) -> bool:
    return "sdtorch.config" in metadata or "modelspec.prediction_type" in metadata


def _single_file_config(tensors: dict[str, TensorRef], metadata: dict[str, str], path: Path,
                        family: str) -> ModelConfig:
    """The config our own files carry in their header, else the sizes the tensors' shapes imply."""
    if "sdtorch.config" in metadata:
        try:
            cfg = ModelConfig.from_dict(json.loads(metadata["sdtorch.config"]))
        except (ValueError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"{path}: unreadable sdtorch.config metadata ({e})") from None
        check_config_fits(cfg, {k: ref.shape for k, ref in tensors.items()}, str(path))
        return cfg
    cfg = infer_config({k: ref.shape for k, ref in tensors.items()}, family, str(path))
    return cfg.replace(prediction_type="v_prediction") if metadata.get("modelspec.prediction_type") == "v" else cfg


def _with_prediction_type(cfg: ModelConfig, prediction_type: str) -> ModelConfig:
    """SD 2.x's v models are the 768x768 ones (v2-inference-v.yaml), its ε models the 512x512 ones."""
    cfg = cfg.replace(prediction_type=prediction_type)
    if cfg.family == "sd2" and cfg.resolution in (512, 768):  # a resolution of its own (our header's) stays
        cfg = cfg.replace(resolution=768 if prediction_type == "v_prediction" else 512)
    return cfg


def _sidecar_prediction_type(path: Path) -> str | None:
    """A1111's convention: `model.yaml` beside `model.safetensors` with `parameterization: "v"` marks a v-model.
    Only that line matters, so a regex reads it (no YAML parser)."""
    yaml = path.with_suffix(".yaml")
    if path.is_dir() or not yaml.is_file():
        return None
    found = _PARAMETERIZATION.search(yaml.read_text(encoding="utf-8", errors="replace"))
    if found is None:
        return None
    if found[1] not in ("v", "eps"):
        raise CheckpointError(f"{yaml}: unknown parameterization {found[1]!r} (expected \"v\" or \"eps\")")
    return "v_prediction" if found[1] == "v" else "epsilon"


def read_vae(path: Path, cfg: VAEConfig, files: ExitStack) -> dict[str, TensorRef]:
    """A standalone VAE under the checkpoint's `first_stage_model.` keys: an original-layout file (prefixed or not,
    even a whole checkpoint), a diffusers-layout file, or a diffusers vae/ folder (or a pipeline folder holding one)."""
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if path.is_dir() and (path / "config.json").is_file():
        return part_from_diffusers("vae", read_part_weights(path, WEIGHT_NAMES["vae"], files, False), vae_rules(cfg),
                                   str(path))
    tensors, _ = read_tensor_file(path, detect_format(path), files)
    if any(k.startswith(PREFIXES["vae"]) for k in tensors):
        tensors = {k[len(PREFIXES["vae"]):]: ref for k, ref in tensors.items() if k.startswith(PREFIXES["vae"])}
    # LDM's autoencoder checkpoints also hold their training loss (LPIPS, discriminator) and EMA bookkeeping
    tensors = {k: ref for k, ref in tensors.items() if not k.startswith(("loss.", EMA_PREFIX))}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in tensors):
        return part_from_diffusers("vae", tensors, vae_rules(cfg), str(path))
    return {PREFIXES["vae"] + k: ref for k, ref in tensors.items()}


_INIT_LOCK = threading.Lock()


@contextmanager
def _no_weight_init():
    """Skip the layers' random init while models are built: every parameter is replaced by the file's tensor anyway.
    (Building on the meta device alone still runs each init, on meta tensors.)"""
    layers = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)
    with _INIT_LOCK:
        own = {cls: cls.__dict__.get("reset_parameters") for cls in layers}
        for cls in layers:
            cls.reset_parameters = lambda self: None
        try:
            yield
        finally:
            for cls, method in own.items():
                if method is None:
                    del cls.reset_parameters  # it was inherited (Conv2d's comes from _ConvNd)
                else:
                    cls.reset_parameters = method


def assign_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put each tensor of `state` in `model` as the parameter or buffer of its key (no copy): what
    `load_state_dict(assign=True)` does, without its per-module hooks and checks, which `_check_keys_and_shapes` has
    done already (they took ~15% of an SD 1.5 load). Parameters are created frozen, as loaded models are."""
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        elif name in module._buffers:
            module._buffers[name] = tensor
        else:
            raise KeyError(f"{key} is neither a parameter nor a buffer of the model")


def build_on_meta(cfg: ModelConfig) -> StableDiffusionModels:
    """The models' structure with no storage behind it: instant, whatever the size."""
    with _no_weight_init(), torch.device("meta"):
        return StableDiffusionModels(cfg)


def _ema_key(unet_key: str) -> str:
    # LDM's LitEma stores each UNet weight under its name without dots (buffers cannot have dots in their names):
    # model.diffusion_model.input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight
    return EMA_PREFIX + unet_key.removeprefix("model.").replace(".", "")


def _select_unet_weights(tensors: dict[str, TensorRef], expected: dict, ema: bool, where: str) -> dict[str, TensorRef]:
    """The regular UNet weights, or with `ema` the EMA copies full checkpoints keep beside them; EMA keys then go."""
    if ema:
        if not any(k.startswith(EMA_PREFIX) and k not in IGNORED_KEYS for k in tensors):
            raise CheckpointError(f"{where}: has no EMA weights (model_ema.*): load it without ema=True")
        unet = [k for k in expected if k.startswith(PREFIXES["unet"])]
        missing = [_ema_key(k) for k in unet if _ema_key(k) not in tensors]
        if missing:
            raise KeyMismatchError(f"{where}: EMA weights missing: {name_some(missing)}")
        tensors = tensors | {k: tensors[_ema_key(k)] for k in unet}
    return {k: ref for k, ref in tensors.items() if not k.startswith(EMA_PREFIX)}


def _check_keys_and_shapes(tensors: dict[str, TensorRef], expected: dict[str, tuple[int, ...]],
                           where: str, quantized=frozenset()) -> dict[str, TensorRef]:
    """Every model key present once with its shape, or a KeyMismatchError / ShapeMismatchError naming them. Keys in
    `quantized` (layer weights given with q8 scales) must be int8, every other one a float."""
    tensors = {k: ref for k, ref in tensors.items() if k not in IGNORED_KEYS}
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        problems = ([f"{len(missing)} missing: {name_some(missing)}"] if missing else []) + \
                   ([f"{len(unexpected)} unexpected: {name_some(unexpected)}"] if unexpected else [])
        raise KeyMismatchError(f"{where}: keys do not match the model: " + "; ".join(problems))
    wrong = []
    for key, ref in tensors.items():
        want = expected[key]
        if key in quantized:
            if ref.dtype != torch.int8:
                raise CorruptCheckpointError(f"{where}: {key} has q8 scales but is stored as {ref.dtype}, not int8")
        elif not ref.dtype.is_floating_point:  # an SD weight is a float: an integer one would be cast from garbage
            raise CorruptCheckpointError(f"{where}: {key} is stored as {ref.dtype}, not as a floating-point weight")
        if ref.shape != want:
            if _VAE_ATTENTION_WEIGHT.fullmatch(key) and ref.shape + (1, 1) == want:
                tensors[key] = ref.reshaped(want)
            else:
                wrong.append(f"{key}: file {ref.shape}, model {want}")
    if wrong:
        raise ShapeMismatchError(f"{where}: {len(wrong)} tensors differ in shape from the model's: "
                                 + "; ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    return tensors
