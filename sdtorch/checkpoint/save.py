"""Write checkpoints: one .safetensors in the original layout (with our config in its header), or a diffusers folder."""
import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..models.stable_diffusion import StableDiffusionModels, text_encoder_prefixes
from ..models.stored import check_weights, is_quantized, q8_scales, quantize_q8
from ..tokenizer import CLIPTokenizer
from .diffusers_folder import write_diffusers_folder
from .formats import cpu_tensor, write_safetensors
from .load import LoadedCheckpoint, _load_checkpoint, check_dtype
from .openclip_keys import to_openclip

# Stability AI's model-metadata spec (github.com/Stability-AI/ModelSpec): lets other tools tell what a file is
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
                 "sdxl_refiner": "stable-diffusion-xl-v1-refiner"}


def save_checkpoint(models_or_loaded: StableDiffusionModels | LoadedCheckpoint, path: str | Path, *,
                    dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
                    config: ModelConfig | None = None) -> Path:
    """Write a single-file .safetensors in the original SD layout; the header carries the ModelConfig
    (`sdtorch.config`; `config` overrides the models' own), so the file loads back exactly, plus ModelSpec keys and
    `metadata` (str -> str)."""
    models, cfg, _, kept = _unpack(models_or_loaded)
    cfg = _check_config(config, models) or cfg
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: checkpoints are written as .safetensors only (pickle files can run code when "
                         f"loaded); give a path ending in .safetensors")
    check_dtype(dtype)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str (safetensors headers hold only strings)")
    # defaults, then what the source file's header said, then the caller's; last what must describe these tensors
    header = {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": path.stem,
              "modelspec.implementation": "https://github.com/CompVis/stable-diffusion",  # the key layout
              **kept, **(metadata or {}),
              "modelspec.architecture": "stable-diffusion-v2-768-v" if cfg.family == "sd2" and cfg.prediction_type
              == "v_prediction" else ARCHITECTURES.get(cfg.family, cfg.family),
              "modelspec.prediction_type": "v" if cfg.prediction_type == "v_prediction" else "epsilon",
              "sdtorch.config": json.dumps(cfg.to_dict())}
    tensors = {k: cpu_tensor(t, dtype) for k, t in models.state_dict().items()}
    if is_quantized(models):  # a q8 file: each int8 weight's scales beside it; the text encoders keep our key names
        tensors |= {k: cpu_tensor(t, None) for k, t in q8_scales(models).items()}
        header["sdtorch.weights"] = "q8"
    else:
        for prefix, openclip in text_encoder_prefixes(cfg.family):
            if openclip:  # SD 2.x/SDXL files hold their OpenCLIP towers under OpenCLIP's names
                tensors = to_openclip(tensors, prefix)
    write_safetensors(tensors, path, header)
    return path


def save_diffusers(models_or_loaded: StableDiffusionModels | LoadedCheckpoint, folder: str | Path, *,
                   dtype: torch.dtype | None = None, config: ModelConfig | None = None) -> Path:
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) that
    `StableDiffusionPipeline.from_pretrained` loads; keys converted by the rules in diffusers_keys."""
    models, cfg, tokenizer, _ = _unpack(models_or_loaded)
    cfg = _check_config(config, models) or cfg
    check_dtype(dtype)
    if is_quantized(models):
        raise ValueError("a diffusers folder holds no int8 weights: write a q8 model as a .safetensors")
    return write_diffusers_folder(models, cfg, tokenizer, Path(folder), dtype)


def convert(in_path: str | Path, out_path: str | Path, *, dtype: torch.dtype | None = None,
            vae: str | Path | None = None, to_diffusers: bool = False, ema: bool = False,
            weights: str | None = None) -> Path:
    """Any checkpoint load_checkpoint reads -> a .safetensors (or, `to_diffusers`, a diffusers folder). dtype None
    keeps every tensor's stored dtype, so a plain conversion changes no bit; torch.float16 is a plain cast.
    weights="q8": a q8 file (models/stored.py), which loads memory-mapped and without quantizing again."""
    check_dtype(dtype)
    check_weights(weights)
    loaded = _load_checkpoint(in_path, vae=vae, device=None, dtype=dtype, ema=ema, prediction_type=None, config=None)
    if weights == "q8":
        quantize_q8(loaded.models)
    if to_diffusers:
        return save_diffusers(loaded, out_path)
    return save_checkpoint(loaded, out_path)


def _unpack(models_or_loaded) -> tuple[StableDiffusionModels, ModelConfig, CLIPTokenizer, dict[str, str]]:
    if isinstance(models_or_loaded, LoadedCheckpoint):
        loaded = models_or_loaded
        unpacked = loaded.models, loaded.config, loaded.tokenizer, loaded.metadata
    elif isinstance(models_or_loaded, StableDiffusionModels):
        cfg = models_or_loaded.config
        unpacked = models_or_loaded, cfg, CLIPTokenizer.default(pad_token_id=cfg.clip_pad_token_id), {}
    else:
        raise ValueError(f"expected StableDiffusionModels or a LoadedCheckpoint, got "
                         f"{type(models_or_loaded).__name__}")
    return unpacked


def _check_config(config: ModelConfig | None, models: StableDiffusionModels) -> ModelConfig | None:
    """A config passed beside the models may change what the header says (prediction type...), never the sizes."""
    if config is None:
        return None
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    if (config.unet, config.vae, config.clip) != (models.config.unet, models.config.vae, models.config.clip):
        raise ValueError("config describes other model sizes than the models being saved")
    return config
