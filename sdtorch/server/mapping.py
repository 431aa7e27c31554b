"""A1111 request fields -> the pipeline's keyword arguments, and the pipeline's results -> A1111's answer.

`generation_kwargs` is the one place where an A1111 field meets an sdtorch setting: a new pipeline setting (hires
fix, a new schedule) is one more line here.
"""
from __future__ import annotations

import base64
import binascii
import inspect
import io
import json

from PIL import Image, ImageOps

from .. import hires
from ..diffusion.samplers import SCHEDULES, parse_sampler_name


class FieldError(ValueError):
    """A request field that cannot be used: answered with `status` and a JSON error naming the field."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status

    def detail(self) -> list[dict]:
        return [{"loc": ["body", *self.field.split(".")], "msg": self.message, "type": "value_error"}]


def schedule_from_a1111(name: str | None) -> str | None:
    """A1111's scheduler name or label ("automatic", "karras", "SGM Uniform") -> ours; None = the sampler's default."""
    if name is None or name.strip().lower() in ("", "automatic"):
        return None
    key = name.strip().lower().replace(" ", "_")
    if key not in SCHEDULES:
        raise FieldError("scheduler", f"unknown scheduler {name!r}; choose from automatic, {', '.join(SCHEDULES)}")
    return key


def generation_kwargs(req, options: dict, resolution: int, max_pixels: int) -> dict:
    """The keyword arguments of pipe.txt2img / img2img / inpaint for one batch of an A1111 request (seed excepted)."""
    if req.subseed_strength:
        raise FieldError("subseed_strength", "variation seeds are not supported")
    try:
        sampler, named_schedule = parse_sampler_name(req.sampler_name or req.sampler_index)
    except ValueError as e:
        raise FieldError("sampler_name" if req.sampler_name else "sampler_index", str(e)) from None
    overrides = {**options, **req.override_settings}
    clip_skip = overrides.get("CLIP_stop_at_last_layers", 1)
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= 12:
        raise FieldError("override_settings.CLIP_stop_at_last_layers",
                         f"must be an integer in 1..12, got {clip_skip!r}")
    width, height = req.width or resolution, req.height or resolution
    for field, value in (("width", width), ("height", height)):
        if value % 8:
            raise FieldError(field, f"must be a multiple of 8, got {value}")
    kwargs = dict(negative=req.negative_prompt, steps=req.steps, cfg=req.cfg_scale, sampler=sampler.name,
                  schedule=schedule_from_a1111(req.scheduler) or named_schedule, width=width, height=height,
                  batch=req.batch_size, clip_skip=clip_skip)
    final_w, final_h = width, height
    if getattr(req, "enable_hr", False):
        kwargs.update(hires_kwargs(req, sampler.name, kwargs["schedule"]))
        final_w, final_h, cut_x, cut_y = hires.target_size(width, height, kwargs.get("hires_scale"),
                                                           kwargs.get("hires_resize"))
        final_w, final_h = final_w - 8 * cut_x, final_h - 8 * cut_y
    if final_w * final_h * req.batch_size > max_pixels:
        raise FieldError("hr_scale" if (final_w, final_h) != (width, height) else "width",
                         f"width x height x batch_size = {final_w * final_h * req.batch_size} pixels is more "
                         f"than this server's --max-pixels {max_pixels}")
    # A1111 uses eta only where the sampler has one, and writes it into the infotext only when not the default
    eta = inspect.signature(sampler.fn).parameters.get("eta")
    if req.eta is not None and eta is not None and req.eta != eta.default:
        kwargs["eta"] = req.eta
    ngms = req.s_min_uncond if req.s_min_uncond is not None else overrides.get("s_min_uncond", 0.0)
    if ngms:  # A1111's "Negative Guidance minimum sigma" (request field, or the option), and its all-steps option
        if not isinstance(ngms, (int, float)) or isinstance(ngms, bool) or not 0 <= ngms <= 1000:
            raise FieldError("override_settings.s_min_uncond", f"must be a number in 0..1000, got {ngms!r}")
        kwargs.update(ngms=float(ngms), ngms_all_steps=overrides.get("s_min_uncond_all") is True)
    for option in ("token_merging_ratio", "token_merging_ratio_hr"):  # A1111's options of those names
        ratio = overrides.get(option, 0.0)
        if ratio:
            if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
                raise FieldError(f"override_settings.{option}", f"must be a number in [0, 1), got {ratio!r}")
            kwargs[option] = float(ratio)
    if hasattr(req, "init_images"):
        kwargs.update(strength=req.denoising_strength, resize_mode=req.resize_mode)
        if req.mask:
            kwargs["mask_blur"] = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    return kwargs


def hires_kwargs(req, sampler: str, schedule: str | None) -> dict:
    """A1111's hires-fix fields -> the pipeline's hires_* settings. The second pass runs with the first pass's
    sampler, prompt and model (A1111's "Use same …"); a request for another one is refused by field."""
    same = {"hr_sampler_name": (None, "", "Use same sampler", sampler),
            "hr_scheduler": (None, "", "Use same scheduler", schedule),
            "hr_checkpoint_name": (None, "", "Use same checkpoint"),
            "hr_prompt": ("", req.prompt), "hr_negative_prompt": ("", req.negative_prompt)}
    for field, allowed in same.items():
        if getattr(req, field) not in allowed:
            raise FieldError(field, "a second pass with its own sampler, scheduler, checkpoint or prompt is not "
                                    "supported; leave it empty to use the first pass's")
    try:
        upscaler = hires.resolve_upscaler(req.hr_upscaler or "Latent")
    except ValueError as e:
        raise FieldError("hr_upscaler", str(e)) from None
    kwargs = dict(hires_upscaler=upscaler, hires_steps=req.hr_second_pass_steps,
                  hires_strength=0.75 if req.denoising_strength is None else req.denoising_strength)
    if req.hr_resize_x or req.hr_resize_y:
        kwargs["hires_resize"] = (req.hr_resize_x, req.hr_resize_y)
    else:
        kwargs["hires_scale"] = req.hr_scale
    return kwargs


def decode_image(data, field: str, max_pixels: int) -> Image.Image:
    """A base64 (or data: URL) image -> a loaded PIL image; FieldError saying why it is not a usable one."""
    if not isinstance(data, str):
        raise FieldError(field, "must be a base64-encoded image")
    if data.startswith(("http://", "https://")):
        raise FieldError(field, "image URLs are not fetched; send the image as base64")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:  # PIL's own guard, above ~179 M pixels
        raise FieldError(field, f"image larger than --max-pixels {max_pixels} ({e})", status=413) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise FieldError(field, f"is not a readable image ({e.__class__.__name__})") from None
    if image.width * image.height > max_pixels:  # read from the header, before anything is decompressed
        raise FieldError(field, f"image is {image.width}x{image.height}, more than --max-pixels {max_pixels}",
                         status=413)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FieldError(field, f"is not a readable image ({e.__class__.__name__})") from None
    return image


def mask_from_a1111(mask: Image.Image, invert: bool) -> Image.Image:
    """A1111's create_binary_mask reads the alpha channel only when it is not fully opaque: a canvas exported by a
    browser is RGBA with alpha 255 everywhere, and its colours are the mask."""
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1] == (255, 255):
        mask = mask.convert("L")
    if invert:
        mask = ImageOps.invert(mask.getchannel("A") if mask.mode in ("RGBA", "LA") else mask.convert("L"))
    return mask


def encode_png(image: Image.Image) -> str:
    """Base64 PNG carrying the image's "parameters" text, as A1111's API sends its images."""
    from ..metadata import save_png

    buffer = io.BytesIO()
    save_png(image, buffer, image.info.get("parameters", ""))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def a1111_info(req, kwargs: dict, seed: int, subseed: int, images: list, model_name: str, model_hash: str | None,
               timestamp: str, clip_skip: int) -> str:
    """A1111's Processed.js(): the JSON string of the response's "info"."""
    count = req.batch_size * req.n_iter
    return json.dumps({
        "prompt": req.prompt, "all_prompts": [req.prompt] * count,
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * count,
        "seed": seed, "all_seeds": [seed + k for k in range(count)],
        "subseed": subseed, "all_subseeds": [subseed + k for k in range(count)],
        "subseed_strength": req.subseed_strength, "width": kwargs["width"], "height": kwargs["height"],
        "sampler_name": kwargs["sampler"], "cfg_scale": req.cfg_scale, "steps": req.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": kwargs.get("strength", kwargs.get("hires_strength")),
        "extra_generation_params": {"Schedule type": kwargs.get("schedule")} if kwargs.get("schedule") else {},
        "index_of_first_image": 0, "infotexts": [im.info.get("parameters", "") for im in images],
        "styles": req.styles, "job_timestamp": timestamp, "clip_skip": clip_skip,
        "is_using_inpainting_conditioning": False, "version": "sdtorch",
    })


def fill_masked(image: Image.Image, mask: Image.Image, blur: float = 16.0) -> Image.Image:
    """A1111's inpainting_fill 0 ("fill"): the area to repaint starts as a blur of the colours around it, not as the
    original content. Here: blur(image · keep) / blur(keep), the average of the kept colours near each pixel."""
    import torch

    from .. import images as imgs

    pixels = imgs.pil_to_tensor(image)  # (1, 3, H, W)
    mask = mask.getchannel("A") if mask.mode in ("RGBA", "LA") else mask.convert("L")  # as images.prepare_mask
    keep = (imgs.pil_to_tensor(mask.resize(image.size))[:, :1] < 0).float()  # (1, 1, H, W)
    radius = int(3 * blur)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / blur) ** 2)
    taps = taps / taps.sum()

    def gaussian(x: torch.Tensor) -> torch.Tensor:  # separable, zero outside the image
        c = x.shape[1]
        x = torch.nn.functional.conv2d(x, taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
        return torch.nn.functional.conv2d(x, taps.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)

    spread = gaussian(pixels * keep) / gaussian(keep).clamp_min(1e-6)
    return imgs.tensor_to_pil(keep * pixels + (1 - keep) * spread)[0]
