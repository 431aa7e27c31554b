"""Pictures in and out: PIL <-> tensors, A1111's resize modes, and inpainting masks."""
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

# A1111's img2img resize modes
RESIZE_MODES = {"just resize": 0, "crop and resize": 1, "resize and fill": 2}


def load_image(image, max_pixels: int | None = None) -> Image.Image:
    """A PIL image, or one read from a path / file object, upright (EXIF orientation applied, as A1111 does) and in
    8 bits per channel; ValueError saying why when it is no image, or more than `max_pixels` (None: Pillow's
    decompression-bomb limit), checked from the header before any pixel is decoded."""
    if isinstance(image, Image.Image):
        return to_8bit(ImageOps.exif_transpose(image))
    if isinstance(image, (str, Path)) and Path(image).exists() and not Path(image).is_file():
        raise ValueError(f"cannot read {image} as an image (not a regular file)")  # a FIFO would block forever
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(image) as im:
                if limit is not None and im.width * im.height > limit:
                    raise Image.DecompressionBombError(f"{im.width}x{im.height}")
                im.load()
                return to_8bit(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{image} has more pixels than the limit of {limit:,}" +
                         (" (--max-pixels)" if max_pixels is not None else " (a decompression bomb?)")) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read {image} as an image ({e.__class__.__name__})") from None


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale ("I;16", "I", PNG's 16-bit grey) scaled to 8-bit "L": Pillow's own conversion
    clips them at 255, so 50% grey (32768) would become white. Other modes are left as they are."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGBA (composited on white, as A1111 does for transparent inputs), greyscale and palette images -> RGB."""
    image = to_8bit(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(image: Image.Image, width: int, height: int, mode: int | str = 0) -> Image.Image:
    """Fit `image` to width x height: 0 just resize (stretch), 1 crop and resize (fill, crop the overflow),
    2 resize and fill (fit inside, fill the borders by stretching the edge pixels), as A1111's `resize_image`."""
    if isinstance(mode, str):
        if mode.lower() not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {mode!r}; choose from {list(RESIZE_MODES)}")
        mode = RESIZE_MODES[mode.lower()]
    if mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        w = width if ratio > src_ratio else image.width * height // image.height
        h = height if ratio <= src_ratio else image.height * width // image.width
        resized = image.resize((w, h), Image.LANCZOS)
        out = Image.new("RGB", (width, height))
        out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
        return out
    if mode == 2:
        w = width if ratio < src_ratio else image.width * height // image.height
        h = height if ratio >= src_ratio else image.height * width // image.width
        resized = image.resize((w, h), Image.LANCZOS)
        out = Image.new("RGB", (width, height))
        out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
        if ratio < src_ratio:  # borders above and below: stretch the first/last rows
            fill = height // 2 - h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          box=(0, fill + h))
        elif ratio > src_ratio:  # borders left and right: stretch the first/last columns
            fill = width // 2 - w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill + w, 0))
        return out
    raise ValueError(f"resize mode must be 0, 1 or 2, got {mode}")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB PIL images (rounded, as diffusers' `numpy_to_pil`)."""
    array = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def prepare_mask(mask: Image.Image, width: int, height: int, blur: int = 4, resize_mode: int | str = 0) -> torch.Tensor:
    """Mask image (white = repaint) -> (1, 1, H, W) in [0, 1], resized like the init image and Gaussian-blurred
    by `blur` pixels (A1111's "Mask blur") so the repainted region blends in."""
    mask = to_8bit(mask)
    if mask.mode in ("RGBA", "LA"):  # a transparent-background mask: use its alpha
        mask = mask.getchannel("A")
    mask = resize_image(mask.convert("L").convert("RGB"), width, height, resize_mode).convert("L")
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
