"""Generation: txt2img, img2img and inpainting on a loaded model.

The flow of one image (see docs in README):
    prompt -> tokens -> CLIP -> context;  seed -> CPU randn -> x_T;  sampler(guided denoiser(UNet)) -> x_0 -> VAE -> image
"""
from __future__ import annotations

import contextlib
import inspect
import random
import threading
from dataclasses import dataclass, field

import torch
from PIL import Image

from . import conditioning
from . import images as imgs
from . import memory
from .config import ModelConfig
from .diffusion.guidance import CFGDenoiser
from .diffusion.samplers import get_sigmas, parse_sampler_name
from .diffusion.schedule import DiscreteSchedule
from .metadata import format_parameters, png_with_parameters
from .models import StableDiffusionModels
from .models.packed import packed_weights
from .tiling import decode_tiled, encode_tiled

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
TILE_ABOVE_PIXELS = 1024 * 1024
SCHEDULE_LABELS = {"normal": "Normal", "karras": "Karras", "exponential": "Exponential",
                   "sgm_uniform": "SGM Uniform", "simple": "Simple"}  # as A1111's "Schedule type" writes them  # auto-tile the VAE above this many output pixels (e.g. larger than 1024x1024)


class GenerationInterrupted(Exception):
    """Raised when `Pipeline.interrupt()` was called: generation stopped after the current step."""


class NaNError(RuntimeError):
    """The model produced NaN/inf: usually fp16 overflow; retry with dtype="fp32" (or bf16)."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" picks cuda > mps > cpu."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from fp32, fp16, bf16")
    return DTYPES[dtype]


class SeededNoise:
    """Image k of a batch draws all its noise (x_T and the stochastic samplers' noise) from its own CPU generator
    seeded s + k, as A1111 does: the same image on every device, the same noise diffusers draws with a CPU generator,
    and image k of a batch equal to a single image with seed s + k."""

    def __init__(self, seed: int, batch: int):
        self.generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(batch)]

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.cat([torch.randn((1, *shape), generator=g) for g in self.generators])  # (B, *shape)

    def sampler(self, like: torch.Tensor):
        """A k-diffusion noise_sampler(σ, σ_next) continuing each image's generator."""
        return lambda sigma, sigma_next: self.draw(like.shape[1:]).to(like.device, like.dtype)


def seed_noise(seed: int, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise of seeds seed .. seed+batch-1: (batch, *shape)."""
    return SeededNoise(seed, batch).draw(shape)


@dataclass
class Settings:
    """Everything that determines an image, with the CLI's option names (and A1111's meaning)."""
    prompt: str
    negative: str = ""
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "DPM++ 2M"  # A1111 1.9+'s default (with its "Automatic" schedule: Karras)
    schedule: str | None = None  # None: the sampler's default (or the one named in "DPM++ 2M Karras")
    seed: int = -1
    width: int | None = None  # None: the model's native resolution (512 for SD 1.x)
    height: int | None = None
    batch: int = 1
    clip_skip: int = 1
    strength: float | None = None  # img2img/inpaint only
    guidance_rescale: float = 0.0
    eta: float | None = None  # DDIM η / ancestral noise scale, None = the sampler's default
    # SDXL's size conditioning (Podell et al. 2023, sec. 2.2), as diffusers names them: original_size and
    # target_size (height, width), None = the image's; crop_top_left (top, left)
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {v}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1, got {self.clip_skip}")
        if not -1 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be -1 (random) or a non-negative integer, got {self.seed}")


class Pipeline:
    """A loaded Stable Diffusion model, ready to make images. Build it with `sdtorch.load(path)`."""

    def __init__(self, models: StableDiffusionModels, tokenizer, config: ModelConfig, *, name: str = "",
                 model_hash=None, device="auto", dtype=None, offload: bool = False,
                 release_idle_weights: bool = True):
        self.models = models.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self._model_hash = model_hash  # a str, or a callable computing it lazily (hashing GBs takes seconds)
        self.schedule = DiscreteSchedule.scaled_linear()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype) or next(models.parameters()).dtype
        self.offload = offload  # keep CLIP and VAE on the CPU, only the UNet on the accelerator
        # give the pages of memory-mapped CPU weights back to the OS after each phase of a generation (sdtorch.memory)
        self.release_idle_weights = release_idle_weights
        self._interrupt = threading.Event()
        self.to(self.device, self.dtype)

    # -- set-up -------------------------------------------------------------------------------------------------
    def to(self, device=None, dtype=None) -> "Pipeline":
        self.device = resolve_device(device) if device is not None else self.device
        self.dtype = resolve_dtype(dtype) or self.dtype
        side = torch.device("cpu") if self.offload else self.device
        self.unet.to(self.device, self.dtype)
        # on the CPU fp16/bf16 are slow and not always supported: keep the side models fp32 there
        side_dtype = torch.float32 if side.type == "cpu" else self.dtype
        self.text_encoder.to(side, side_dtype)
        self.vae.to(side, side_dtype)
        if self.device.type == "cpu":
            memory.keep_freed_blocks()  # large activations reused, not faulted in afresh at every step
        return self

    def _done_with(self, model: torch.nn.Module) -> None:
        """A phase is over: its model's memory-mapped weights may leave RAM until the next generation needs them."""
        if self.release_idle_weights:
            memory.release(p.data for p in model.parameters())

    @property
    def unet(self):
        return self.models.unet

    @property
    def vae(self):
        return self.models.vae

    @property
    def text_encoder(self):
        return self.models.text_encoder

    @property
    def model_hash(self) -> str | None:
        if callable(self._model_hash):
            self._model_hash = self._model_hash()
        return self._model_hash

    def interrupt(self) -> None:
        """Ask a running generation to stop after its current step (thread-safe); it raises GenerationInterrupted."""
        self._interrupt.set()

    # -- the three jobs -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def txt2img(self, prompt: str, negative: str = "", **kwargs) -> list[Image.Image]:
        """Images from a prompt. Keyword names as the CLI: steps, cfg, sampler, schedule, seed, width, height,
        batch, clip_skip, guidance_rescale, eta, callback, tiled_vae."""
        return self.generate(Settings(prompt, negative, **_settings_kwargs(kwargs)), **kwargs)

    @torch.no_grad()
    def img2img(self, prompt: str, init_image: Image.Image, negative: str = "", strength: float = 0.75,
                resize_mode: int | str = 0, **kwargs) -> list[Image.Image]:
        """Images from a prompt and a starting image; strength 0 returns (the VAE round trip of) the image,
        1 ignores it. Width/height default to the init image's size rounded down to multiples of 8."""
        init_image = imgs.load_image(init_image)
        _size_from(init_image, kwargs)
        s = Settings(prompt, negative, strength=strength, **_settings_kwargs(kwargs))
        return self.generate(s, init_image=init_image, resize_mode=resize_mode, **kwargs)

    @torch.no_grad()
    def inpaint(self, prompt: str, init_image: Image.Image, mask: Image.Image, negative: str = "",
                strength: float = 1.0, mask_blur: int = 4, resize_mode: int | str = 0, **kwargs) -> list[Image.Image]:
        """Repaint the white part of `mask`. 9-channel inpainting models get the masked image as conditioning;
        ordinary models blend the re-noised original into the unmasked part at every step."""
        init_image = imgs.load_image(init_image)
        _size_from(init_image, kwargs)
        s = Settings(prompt, negative, strength=strength, **_settings_kwargs(kwargs))
        return self.generate(s, init_image=init_image, mask=imgs.load_image(mask), mask_blur=mask_blur,
                             resize_mode=resize_mode, **kwargs)

    # -- the shared engine --------------------------------------------------------------------------------------
    def generate(self, s: Settings, *, init_image=None, **kwargs) -> list[Image.Image]:
        """Run and return PIL images carrying A1111 "parameters" metadata (seed -1 replaced by the seed used)."""
        pixels = self.run(s, init_image=init_image, **kwargs)
        # image k's own seed is s + k (A1111 writes it so): its parameters regenerate it alone
        return [png_with_parameters(im, format_parameters(s.prompt, s.negative,
                                                          self.infotext_params(s, init_image is not None, k)))
                for k, im in enumerate(imgs.tensor_to_pil(pixels))]

    def run(self, s: Settings, *, init_image=None, mask=None, mask_blur: int = 4, resize_mode=0, callback=None,
            tiled_vae: bool | None = None, **_ignored) -> torch.Tensor:
        """The whole generation; returns (B, 3, H, W) pixels in [-1, 1]."""
        s.width = self.config.resolution if s.width is None else s.width
        s.height = self.config.resolution if s.height is None else s.height
        s.validate()
        sampler, schedule_name = self.sampler_and_schedule(s)
        if s.seed == -1:
            s.seed = random.randrange(2 ** 32)  # reported back in the images' metadata
        self._interrupt.clear()
        h, w = s.height // 8, s.width // 8
        if tiled_vae is None:
            tiled_vae = s.width * s.height > TILE_ABOVE_PIXELS

        conditions = self.conditioning(s)
        self._done_with(self.text_encoder)

        # A1111's DDIM/PLMS (CompVis) walk the "leading" timesteps of SD's scheduler config; k-diffusion samplers
        # with the "normal" schedule walk t = linspace(999, 0) (diffusers' "linspace").
        vp = sampler.vp
        sigmas = get_sigmas(self.schedule, s.steps, schedule_name, spacing="leading" if vp else "linspace")
        if sampler.ends_at_t0:
            sigmas[-1] = self.schedule.sigma_min  # they stop at the first training timestep, not at σ = 0
        sigmas = sigmas.to(self.device)
        rng = SeededNoise(s.seed, s.batch)
        noise = rng.draw((self.config.unet.out_channels, h, w)).to(self.device, torch.float32)

        x0_latent = c_concat = latent_mask = None
        if init_image is not None:
            image = imgs.pil_to_tensor(imgs.resize_image(imgs.to_rgb(init_image), s.width, s.height, resize_mode))
            x0_latent = self.encode_image(image, tiled_vae).expand(s.batch, -1, -1, -1)
            # strength = the fraction of the schedule that is run, starting from the original noised to that σ
            # (diffusers' img2img convention: the first steps - int(steps·strength) steps are skipped)
            sigmas = sigmas[s.steps - int(s.steps * s.strength):]
        if mask is not None:
            pixel_mask = imgs.prepare_mask(mask, s.width, s.height, mask_blur, resize_mode)  # (1, 1, H, W)
            latent_mask = torch.nn.functional.interpolate(pixel_mask, size=(h, w)).to(self.device)
            if self.config.unet.in_channels == 9:  # inpainting model: mask + masked image as extra channels
                masked_latent = self.encode_image(image * (pixel_mask < 0.5), tiled_vae).expand(s.batch, -1, -1, -1)
                c_concat = torch.cat([latent_mask.expand(s.batch, -1, -1, -1), masked_latent], dim=1)
                latent_mask = None  # the model itself keeps the unmasked part; no blending

        if len(sigmas) < 2:  # strength 0: nothing to denoise
            pixels = self.decode_latents(x0_latent, tiled_vae)
            self._done_with(self.vae)
            return pixels
        # x_T: pure noise at σ_max, or the init latent noised to the first σ (img2img). The VP samplers start from
        # unit-variance noise in VP space, which is σ·sqrt(1 + 1/σ²) in σ-space (diffusers' init_noise_sigma = 1).
        start = sigmas[0] * (1 + sigmas[0] ** -2) ** 0.5 if vp and x0_latent is None else sigmas[0]
        x = noise * start if x0_latent is None else x0_latent + noise * sigmas[0]
        denoiser = CFGDenoiser(self.unet, self.schedule, self.config.prediction_type)
        model = denoiser if latent_mask is None else _BlendDenoiser(denoiser, x0_latent, noise, latent_mask)
        extra_args = {**conditions.denoiser_args(s.batch, self.device), "cfg_scale": s.cfg,
                      "guidance_rescale": s.guidance_rescale}
        if s.cfg == 1:
            extra_args["uncond"] = None
        if c_concat is not None:
            extra_args["c_concat"] = c_concat.to(self.device)
        total = len(sigmas) - 1

        def on_step(info):
            if not torch.isfinite(info["denoised"]).all():
                raise NaNError(f"the UNet produced NaN/inf at step {info['i'] + 1} in {self.dtype}; "
                               "try dtype='fp32' or 'bf16'")
            if callback is not None:
                callback(info["i"] + 1, total, info["x"], info["sigma"])
            if self._interrupt.is_set():
                raise GenerationInterrupted(f"interrupted after step {info['i'] + 1} of {total}")

        sampler_kwargs = {}
        if s.eta is not None:
            if "eta" not in inspect.signature(sampler.fn).parameters:
                raise ValueError(f"sampler {sampler.name} takes no eta")
            sampler_kwargs["eta"] = s.eta
        # on the CPU in fp32 the UNet's memory-mapped weights are laid out for oneDNN once for the loop, not at every
        # step; the packs replace the mapped pages, so only where these may be released
        with packed_weights(self.unet) if self.release_idle_weights else contextlib.nullcontext():
            latents = sampler.fn(model, x, sigmas, extra_args=extra_args, callback=on_step, disable=True,
                                 noise_sampler=rng.sampler(x), **sampler_kwargs)
        if sampler.ends_at_t0:  # their result is the VP sample at t=0: sqrt(ᾱ_0)·x
            latents = latents / (1 + sigmas[-1] ** 2) ** 0.5
        self._done_with(self.unet)
        if latent_mask is not None:
            latents = latent_mask * latents + (1 - latent_mask) * x0_latent
        pixels = self.decode_latents(latents, tiled_vae)
        self._done_with(self.vae)
        if mask is not None:  # paste the original back outside the (blurred) mask, as A1111's inpainting overlay
            pixel_mask = pixel_mask.to(pixels.device)
            pixels = pixel_mask * pixels + (1 - pixel_mask) * image.to(pixels.device)
        return pixels

    def sampler_and_schedule(self, s: Settings):
        sampler, named_schedule = parse_sampler_name(s.sampler)
        return sampler, s.schedule or named_schedule or sampler.default_schedule

    def encode_prompts(self, prompt: str, negative: str, clip_skip: int):
        """The text contexts (cond, uncond), each (1, 77·k, D)."""
        c = self.conditioning(Settings(prompt, negative, clip_skip=clip_skip, width=self.config.resolution,
                                       height=self.config.resolution))
        return c.cond, c.uncond

    def conditioning(self, s: Settings) -> conditioning.Conditioning:
        """Everything the UNet is conditioned on, as the model's family does it (sdtorch/conditioning.py)."""
        return conditioning.encode_prompts(self.models, conditioning.tokenizers(self.config, self.tokenizer),
                                           self.config, s.prompt, s.negative, s.clip_skip, conditioning.sdxl_sizes(s))

    @staticmethod
    def _vae_input(x: torch.Tensor) -> torch.Tensor:
        """On the CPU the VAE runs channels-last: oneDNN's convolutions are ~12% faster on NHWC activations at its
        sizes (the UNet's are not), and the weights can stay as they are, memory-mapped."""
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    def encode_image(self, image: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8): the posterior mean, deterministic."""
        vae = self.vae
        p = next(vae.parameters())
        image = self._vae_input(image.to(p.device, p.dtype))
        mean = encode_tiled(vae, image) if tiled else vae.encode(image).mean
        # back to NCHW: the UNet that takes these latents runs slower on channels-last activations
        return (mean.float() * self.config.vae.scale_factor).to(self.device).contiguous()

    def decode_latents(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]. fp16 VAEs overflow on some latents: then decode again in fp32
        rather than return a black image."""
        vae = self.vae
        p = next(vae.parameters())
        z = self._vae_input((latents.float() / self.config.vae.scale_factor).to(p.device))
        decode = (lambda t: decode_tiled(vae, t)) if tiled else vae.decode
        dtype = p.dtype  # kept apart: vae.float() below converts p itself
        out = decode(z.to(dtype)).float()
        if not torch.isfinite(out).all():
            if dtype == torch.float32:
                raise NaNError("the VAE produced NaN/inf even in fp32: the latents are broken")
            vae.float()
            try:
                out = decode(z).float()
            finally:
                vae.to(dtype)
        return out

    def infotext_params(self, s: Settings, with_image: bool, index: int = 0) -> dict:
        sampler, schedule_name = self.sampler_and_schedule(s)
        return {
            "Steps": s.steps, "Sampler": sampler.name, "Schedule type": SCHEDULE_LABELS.get(schedule_name),
            "CFG scale": s.cfg, "Seed": s.seed + index, "Size": f"{s.width}x{s.height}",
            "Model hash": self.model_hash, "Model": self.name or None,
            "Clip skip": s.clip_skip if s.clip_skip != 1 else None,
            "Denoising strength": s.strength if with_image else None,
            "CFG rescale": s.guidance_rescale or None, "Eta": s.eta,
            **conditioning.size_params(s),
        }


class _BlendDenoiser:
    """Inpainting with an ordinary model: outside the mask, the sample is the original noised to the current σ, and
    the denoised estimate is the original itself (what diffusers/ComfyUI do for 4-channel models)."""

    def __init__(self, inner, x0, noise, mask):
        self.inner, self.x0, self.noise, self.mask = inner, x0, noise, mask

    def __call__(self, x, sigma, **kwargs):
        s = sigma.reshape(-1, 1, 1, 1) if torch.is_tensor(sigma) and sigma.dim() else sigma
        x = self.mask * x + (1 - self.mask) * (self.x0 + self.noise * s)
        denoised = self.inner(x, sigma, **kwargs)
        return self.mask * denoised + (1 - self.mask) * self.x0


_SETTINGS_FIELDS = {"steps", "cfg", "sampler", "schedule", "seed", "width", "height", "batch", "clip_skip",
                    "guidance_rescale", "eta", "original_size", "crop_top_left", "target_size"}


def _settings_kwargs(kwargs: dict) -> dict:
    unknown = set(kwargs) - _SETTINGS_FIELDS - {"callback", "tiled_vae"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
    return {k: kwargs.pop(k) for k in list(kwargs) if k in _SETTINGS_FIELDS}


def _size_from(image: Image.Image, kwargs: dict) -> None:
    """img2img/inpaint default to the init image's size, rounded down to multiples of 8."""
    for name, side in (("width", image.width), ("height", image.height)):
        if kwargs.get(name) is None:
            kwargs[name] = side // 8 * 8
