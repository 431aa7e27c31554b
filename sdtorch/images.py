"""Pictures in and out: PIL <-> tensors, A1111's resize modes, and inpainting masks."""
import numpy as np
import torch
from PIL import Image, ImageFilter

# A1111's img2img resize modes
RESIZE_MODES = {"just resize": 0, "crop and resize": 1, "resize and fill": 2}


def load_image(image) -> Image.Image:
    """A PIL image, or one read from a path / file object; ValueError saying why when it is no image."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            im.load()
            return im
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read {image} as an image ({e.__class__.__name__})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGBA (composited on white, as A1111 does for transparent inputs), greyscale and palette images -> RGB."""
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
    if mask.mode in ("RGBA", "LA"):  # a transparent-background mask: use its alpha
        mask = mask.getchannel("A")
    mask = resize_image(mask.convert("L").convert("RGB"), width, height, resize_mode).convert("L")
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
