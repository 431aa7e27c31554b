"""What can go wrong with a checkpoint, one class per cause. All are ValueErrors, and every message names the file."""


class CheckpointError(ValueError):
    """A file or folder that cannot be loaded as a Stable Diffusion checkpoint."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist."""


class NotACheckpointError(CheckpointError):
    """The content is no tensor format we know (an image, random bytes, a text file...)."""


class CorruptCheckpointError(CheckpointError):
    """A known format, but cut short or damaged: a partial download, a full disk."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would run code (or build objects other than tensors) if it were unpickled."""


class UnsupportedModelError(CheckpointError):
    """A model family sdtorch cannot run yet (SD 2.x, SDXL, ...)."""


class KeyMismatchError(CheckpointError):
    """Tensors missing from the file, or in it but in no model."""


class ShapeMismatchError(CheckpointError):
    """A tensor whose shape differs from the model's parameter of that name."""


def name_some(items, limit: int = 5) -> str:
    """'a, b, c, d, e and 3 more': enough names to find the problem without flooding the terminal."""
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
