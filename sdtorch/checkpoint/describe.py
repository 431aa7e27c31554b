"""What a model file is: family, format, prediction type, parameters per part, stored dtype, A1111's short hash.

`sdtorch info` prints this dict line by line; it is data, so the server or a script can show it too.
"""
from contextlib import ExitStack
from pathlib import Path

from .formats import detect_format, read_tensor_file
from .infer import FAMILY_NAMES, detect_family
from .load import SUPPORTED_FAMILIES, load_checkpoint


def describe_model(path: str | Path) -> dict[str, str | int]:
    """A model's description as {label: value}, in display order. Files of other families are described from their
    headers alone (nothing is loaded); models of the families sdtorch runs are loaded to count their parameters."""
    path = Path(path)
    fmt = detect_format(path)
    info: dict[str, str | int] = {"file": str(path), "format": fmt}
    stored = None
    if fmt != "diffusers-folder":
        with ExitStack() as files:
            tensors, _ = read_tensor_file(path, fmt, files)  # headers only: nothing is read yet
            stored = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()
                             if t.dtype.is_floating_point})
        family = detect_family(tensors)
        info["family"] = FAMILY_NAMES[family]
        if family not in SUPPORTED_FAMILIES:
            info["tensors"] = len(tensors)
            *others, last = (FAMILY_NAMES[f] for f in SUPPORTED_FAMILIES)
            info["supported"] = f"no (sdtorch loads {', '.join(others)} and {last} models)"
            return info
    loaded = load_checkpoint(path)
    models = loaded.models
    info["family"] = FAMILY_NAMES[loaded.config.family]
    info["prediction type"] = loaded.config.prediction_type
    info["default size"] = f"{loaded.config.resolution}x{loaded.config.resolution}"
    info["inpainting"] = "yes (9-channel UNet)" if loaded.config.unet.in_channels == 9 else "no"
    def count(module) -> str:
        return f"{sum(p.numel() for p in module.parameters()):,}"
    info["unet parameters"], info["vae parameters"] = count(models.unet), count(models.vae)
    for k, tower in enumerate(models.text_encoders):  # SDXL has two
        info[f"text_encoder{'' if k == 0 else f'_{k + 1}'} parameters"] = count(tower)
    info["dtype"] = ", ".join(stored or sorted({str(p.dtype).removeprefix("torch.") for p in models.parameters()}))
    info["sha256"] = loaded.sha256_short or "(a folder: no single-file hash)"
    return info
