"""sdtorch: Stable Diffusion from scratch in PyTorch.

    pipe = sdtorch.load("model.safetensors")          # or a diffusers folder, or sdtorch.BUILTIN_MODEL
    image = pipe.txt2img("a red circle", seed=1)[0]
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["load", "save", "Pipeline", "BUILTIN_MODEL"]

# the small model this project trained from scratch on procedural shapes (scripts/train_builtin.sh)
BUILTIN_MODEL = Path(__file__).parent / "data" / "builtin.safetensors"
# `weights=` of load and convert besides None (as the file stores them): q8, the low-memory mode (models/stored.py)
WEIGHT_MODES = ("q8",)


def load(path, *, vae=None, device="auto", dtype=None, ema: bool = False, prediction_type: str | None = None,
         offload: bool = False, tune_allocator: bool = False, lora_dir=None, embeddings_dir=None,
         weights: str | None = None):
    """Load a checkpoint (single-file .safetensors/.ckpt or a diffusers folder) into a ready Pipeline.
    `tune_allocator` lets a CPU pipeline change glibc's malloc settings for the whole process (faster steps; see
    sdtorch.memory.keep_freed_blocks): the command line turns it on, a library caller decides.
    lora_dir/embeddings_dir: where prompts' <lora:NAME:W> tags and embedding names are looked up (default: A1111's
    layout, models/Lora and embeddings/ beside a models/Stable-diffusion folder, else under the current folder).
    weights="q8": the low-memory mode, every Linear and Conv2d weight in int8 with block scales (models/stored.py);
    a file written by `convert(..., weights="q8")` loads as q8 without it."""
    import torch

    from .checkpoint import load_checkpoint
    from .models import stored
    from .pipeline import Pipeline, keeps_stored_layers, resolve_device, resolve_dtype

    stored.check_weights(weights)
    # computing in fp32 on the CPU, an fp16 file's layer weights stay as stored (models/stored.py), and in bf16 on a
    # CPU with bf16 kernels every file's (the Pipeline packs them per loop); q8 reads each layer as stored, in fp32
    # terms, and rounds it to int8, so the full-precision model is never resident
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    as_stored = weights == "q8" or keeps_stored_layers(device, dtype or torch.float32)
    loaded = load_checkpoint(path, vae=vae, device="cpu", dtype=torch.float32 if as_stored else dtype, ema=ema,
                             prediction_type=prediction_type, stored_layers=as_stored)
    if weights == "q8":
        stored.quantize_q8(loaded.models)  # the Pipeline then places each model in its dtype (pipeline._place)
    return Pipeline(loaded.models, loaded.tokenizer, loaded.config, name=loaded.name,
                    model_hash=lambda: loaded.sha256_short, device=device, dtype=dtype or torch.float32,
                    offload=offload, tune_allocator=tune_allocator, lora_dir=lora_dir or default_dirs(path)[0],
                    embeddings_dir=embeddings_dir or default_dirs(path)[1])


def default_dirs(model_path) -> tuple[Path, Path]:
    """A1111's LoRA and embeddings folders for a model: a model in ROOT/models/Stable-diffusion/ has them in
    ROOT/models/Lora and ROOT/embeddings; any other model, in models/Lora and embeddings under the current folder."""
    folder = Path(model_path).resolve().parent
    root = folder.parent.parent if folder.name == "Stable-diffusion" and folder.parent.name == "models" else Path()
    return root / "models" / "Lora", root / "embeddings"


def save(pipe, path, *, dtype=None) -> Path:
    """Write a pipeline's models as one single-file .safetensors in the original SD layout (config in the header)."""
    from .checkpoint import save_checkpoint
    from .pipeline import resolve_dtype

    save_checkpoint(pipe.models, path, config=pipe.config, dtype=resolve_dtype(dtype))
    return Path(path)


def __getattr__(name):
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    raise AttributeError(name)
