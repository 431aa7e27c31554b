"""sdtorch: Stable Diffusion from scratch in PyTorch.

    pipe = sdtorch.load("model.safetensors")          # or a diffusers folder, or sdtorch.BUILTIN_MODEL
    image = pipe.txt2img("a red circle", seed=1)[0]
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["load", "save", "Pipeline", "BUILTIN_MODEL"]

# the small model this project trained from scratch on procedural shapes (scripts/train_builtin.sh)
BUILTIN_MODEL = Path(__file__).parent / "data" / "builtin.safetensors"


def load(path, *, vae=None, device="auto", dtype=None, ema: bool = False, prediction_type: str | None = None,
         offload: bool = False, tune_allocator: bool = False):
    """Load a checkpoint (single-file .safetensors/.ckpt or a diffusers folder) into a ready Pipeline.
    `tune_allocator` lets a CPU pipeline change glibc's malloc settings for the whole process (faster steps; see
    sdtorch.memory.keep_freed_blocks): the command line turns it on, a library caller decides."""
    from .checkpoint import load_checkpoint
    from .pipeline import Pipeline, resolve_device, resolve_dtype

    loaded = load_checkpoint(path, vae=vae, device="cpu", dtype=resolve_dtype(dtype), ema=ema,
                             prediction_type=prediction_type)
    return Pipeline(loaded.models, loaded.tokenizer, loaded.config, name=loaded.name,
                    model_hash=lambda: loaded.sha256_short, device=resolve_device(device), dtype=dtype,
                    offload=offload, tune_allocator=tune_allocator)


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
