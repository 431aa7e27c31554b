"""Load, save and convert Stable Diffusion checkpoints: single-file .safetensors/.ckpt in the original layout,
diffusers folders, standalone VAEs.

  formats.py           what a file is (by content), reading tensors lazily and safely, atomic writes
  infer.py             model family from key names; SD 1.x sizes from tensor shapes
  diffusers_keys.py    diffusers <-> original key names by block rules
  diffusers_configs.py diffusers/transformers JSON configs <-> our config dataclasses
  diffusers_folder.py  read and write diffusers folders
  load.py / save.py    load_checkpoint; save_checkpoint, save_diffusers, convert
  describe.py          what a model file is (`sdtorch info`)
"""
from .describe import describe_model
from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, KeyMismatchError,
                     NotACheckpointError, ShapeMismatchError, UnsafeCheckpointError, UnsupportedModelError)
from .formats import detect_format, read_tensor_index
from .infer import FAMILY_NAMES, detect_family
from .load import LoadedCheckpoint, load_checkpoint
from .save import convert, save_checkpoint, save_diffusers

__all__ = ["load_checkpoint", "save_checkpoint", "save_diffusers", "convert", "LoadedCheckpoint", "detect_format",
           "detect_family", "read_tensor_index", "FAMILY_NAMES", "CheckpointError", "CheckpointNotFoundError",
           "NotACheckpointError", "CorruptCheckpointError", "UnsafeCheckpointError", "UnsupportedModelError",
           "KeyMismatchError", "ShapeMismatchError", "describe_model"]
