"""A1111's "Hires. fix": generate at the base size, upscale, then run img2img at the larger size.

The upscale is either of the latents (A1111's "Latent …" modes, torch interpolation) or of the decoded image
(its "Lanczos", "Nearest" and "None" upscalers, PIL resizes), re-encoded by the VAE. Upscalers that are neural
networks with their own weights (ESRGAN, SwinIR, …) are not part of sdtorch and are refused by name.
(modules/processing.py: StableDiffusionProcessingTxt2Img.calculate_target_resolution and sample_hr_pass;
modules/upscaler.py; modules/shared.py: latent_upscale_modes.)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# A1111's latent upscale modes: name -> (torch interpolation mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                   "Nearest": Image.Resampling.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)


def resolve_upscaler(name: str) -> str:
    """A1111's spelling of an upscaler (case ignored); a network upscaler is refused with one clear message."""
    by_key = {n.lower(): n for n in UPSCALERS}
    canonical = by_key.get(str(name).strip().lower())
    if canonical is None:
        raise ValueError(f"hires upscaler '{name}' is not available in sdtorch (upscalers such as ESRGAN, R-ESRGAN, "
                         f"SwinIR, LDSR, ScuNET and DAT need their own network weights); choose from "
                         f"{', '.join(UPSCALERS)}")
    return canonical


def target_size(width: int, height: int, scale: float | None, resize: tuple[int, int] | None
                ) -> tuple[int, int, int, int]:
    """(upscale_to_w, upscale_to_h, truncate_x, truncate_y) as A1111 computes them: `scale` multiplies the size
    (int() rounds down); `resize` (w, h), either 0 = keep the aspect, scales to cover (w, h) and crops the excess
    (truncate, in latent pixels)."""
    if not resize or resize == (0, 0):
        return int(width * scale), int(height * scale), 0, 0
    rw, rh = resize
    if rh == 0:
        return rw, rw * height // width, 0, 0
    if rw == 0:
        return rh * width // height, rh, 0, 0
    if width / height < rw / rh:
        to_w, to_h = rw, rw * height // width
    else:
        to_w, to_h = rh * width // height, rh
    return to_w, to_h, (to_w - rw) // 8, (to_h - rh) // 8


def upscale_latents(latents: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, height/8, width/8) by A1111's latent mode `upscaler`."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    return F.interpolate(latents, size=(height // 8, width // 8), mode=mode, antialias=antialias)


def upscale_pixels(pixels: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, height, width) in [-1, 1] through 8-bit PIL images, as A1111 does: its
    uint8 conversion truncates, the upscaler resizes by the scale (to multiples of 8), and Lanczos fits the rest."""
    out = []
    for image in ((pixels.float().cpu() + 1) / 2).clamp(0, 1):
        array = (255.0 * image.permute(1, 2, 0).numpy()).astype(np.uint8)  # truncation, not rounding, as A1111
        out.append(_resize(Image.fromarray(array), width, height, upscaler))
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
                        for im in out]) * 2 - 1


def _resize(image: Image.Image, width: int, height: int, upscaler: str) -> Image.Image:
    """A1111's images.resize_image(0, …, upscaler_name): "None" is one Lanczos resize; the others upscale by
    `scale` once (one pass reaches the size), land on multiples of 8 with Lanczos, then Lanczos to the size."""
    if upscaler != "None":
        scale = max(width / image.width, height / image.height)
        if scale > 1.0:
            dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
            image = image.resize((int(image.width * scale), int(image.height * scale)), IMAGE_UPSCALERS[upscaler])
            if image.size != dest:
                image = image.resize(dest, Image.Resampling.LANCZOS)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image
