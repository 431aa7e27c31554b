"""Generation: txt2img, img2img and inpainting on a loaded model.

The flow of one image (see docs in README):
    prompt -> tokens -> CLIP -> context;  seed -> CPU randn -> x_T;
    sampler(guided denoiser(UNet)) -> x_0 -> VAE -> image
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
import threading
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from . import conditioning, hires
from . import images as imgs
from . import memory
from .config import SDXL_FAMILIES, ModelConfig
from .diffusion.guidance import CFGDenoiser
from .diffusion.noise import SeededNoise, resolve_rng, seed_noise  # noqa: F401 (seed_noise: public from here)
from .diffusion.sample import CONVENTIONS, sample
from .diffusion.samplers import SCHEDULE_LABELS, parse_sampler_name, resolve_schedule
from .diffusion.schedule import DiscreteSchedule
from .embeddings import EmbeddingLibrary, EmbeddingMatcher
from .checkpoint.infer import FAMILY_NAMES
from .lora import AppliedNetworks, find_file, read_network
from .metadata import format_parameters, png_with_parameters
from .models import StableDiffusionModels
from .models import stored
from .models.packed import packed_weights, packs
from .models.deep_cache import deep_cache
from .models.token_merging import token_merging
from .prompts import extract_lora_tags
from .refiner import Handover
from .tiling import decode_tiled, encode_tiled

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
TILE_ABOVE_PIXELS = 1024 * 1024  # auto-tile the VAE above this many output pixels (e.g. larger than 1024x1024)


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


def cpu_runs_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has oneDNN kernels for `dtype` (bf16: AVX-512 BF16 or AMX; fp16: AVX-512 FP16 or AMX-FP16).
    Without them PyTorch emulates the type: bf16 convolutions measured 60-100x slower than fp32 on an AVX2-only CPU."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    supported = getattr(torch.ops.mkldnn, check, None) if check else None
    return dtype == torch.float32 or bool(supported is not None and supported())


def warn_if_cpu_lacks(dtype: torch.dtype) -> None:
    if not cpu_runs_natively(dtype):
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        warnings.warn(f"this CPU has no native {name} kernels ({torch.backends.cpu.get_cpu_capability()}): the UNet "
                      f"will run many times slower than in fp32; use dtype fp32 here", stacklevel=3)


def keeps_stored_layers(device: torch.device, dtype: torch.dtype, packed_loop: bool = True) -> bool:
    """Whether a model computing in `dtype` on `device` keeps its Linear and Conv2d weights as the file stores them
    (models/stored.py): in fp32 on the CPU, and in bf16 on a CPU with oneDNN's bf16 kernels when its calls run in a
    `packed_loop` (a bf16 pack replaces the mapped weight, and a bf16 step on packs is ~0.7x one on plain weights)."""
    return device.type == "cpu" and (dtype == torch.float32 or (packed_loop and dtype == torch.bfloat16
                                                                and packs(dtype)))


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, packed_loop: bool = False) -> None:
    """Move `model` to compute in `dtype` on `device`. In fp32 on the CPU, layer weights a file stores in half
    precision stay as stored, memory-mapped, and are cast per call or packed per loop (models/stored.py), and so do
    all layer weights in bf16 where `keeps_stored_layers` says; q8 weights stay int8 on any device and dtype,
    dequantized per call."""
    if keeps_stored_layers(device, dtype, packed_loop) or stored.is_quantized(model):
        stored.compute_in(model.to(device), dtype)
    else:
        stored.cast_all(model, device, dtype)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from fp32, fp16, bf16")
    return DTYPES[dtype]


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
    rng: str = "cpu"  # A1111's "RNG": "cpu" (torch's CPU generator) or "nv" (CUDA's Philox stream, on any device)
    convention: str = "a1111"  # or "diffusers": where the two differ (img2img steps, DDIM/PLMS/UniPC; sample.py)
    img2img_fix_steps: bool = False  # A1111's option: img2img runs exactly `steps` steps whatever the strength
    # A1111's hires fix: upscale by hires_scale (or to hires_resize (w, h)), then img2img at hires_strength
    hires_scale: float | None = None
    hires_resize: tuple[int, int] | None = None
    hires_steps: int = 0  # 0: as many as the first pass
    hires_upscaler: str = "Latent"
    hires_strength: float = 0.7
    # A1111's "Negative Guidance minimum sigma": below this σ every other step skips the unconditional pass (all steps
    # with ngms_all_steps): faster, approximate (guidance.CFGDenoiser); 0 = off
    ngms: float = 0.0
    ngms_all_steps: bool = False
    # A1111's "Token merging ratio": the share of tokens merged before each full-resolution self-attention (ToMe,
    # models/token_merging.py): faster, approximate; 0 = off. The hires pass uses token_merging_ratio_hr if set.
    token_merging_ratio: float = 0.0
    token_merging_ratio_hr: float = 0.0
    # DeepCache (models/deep_cache.py): the UNet runs in full every deep_cache_interval-th evaluation and in between
    # only its shallow branch number deep_cache_depth: faster, approximate; 1 = off. Both passes of hires fix.
    deep_cache_interval: int = 1
    deep_cache_depth: int = 0
    loras: dict | None = None  # {name or path: w, or {"unet": w, "te": w}}: written into the prompt as <lora:...> tags
    # SDXL's size conditioning (Podell et al. 2023, sec. 2.2), as diffusers names them: original_size and
    # target_size (height, width), None = the image's; crop_top_left (top, left)
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    # A1111's "Refiner": a second model (a path) samples from refiner_switch_at of the schedule on (refiner.py)
    refiner: str | None = None
    refiner_switch_at: float = 0.8
    # what a run found out that its PNG text carries: A1111's "Lora hashes" and "TI hashes" of the files it used, and
    # "NGMS" when it did skip an unconditional pass; filled in the resolved copy of the settings that a run returns
    # (see Pipeline.run_resolved), never by the caller
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def hires(self) -> bool:
        return self.hires_scale is not None or bool(self.hires_resize)

    def validate(self, size_optional: bool = False) -> None:
        """Check every field; a SettingError names the field. `size_optional`: width/height None is allowed (the
        model's resolution, known once it is loaded). Nothing is changed: `resolved` fills in what is left open."""
        for name in ("width", "height"):
            v = getattr(self, name)
            if not (v is None and size_optional) and (not isinstance(v, int) or v <= 0 or v % 8):
                raise SettingError(name, f"must be a positive multiple of 8, got {v}")
        if not isinstance(self.cfg, (int, float)) or not math.isfinite(self.cfg):
            raise SettingError("cfg", f"must be a finite number, got {self.cfg}")
        for name in ("steps", "batch", "clip_skip"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SettingError(name, f"must be at least 1, got {v}")
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise SettingError("strength", f"must be in [0, 1], got {self.strength}")
        if not -1 <= self.seed < 2 ** 63:
            raise SettingError("seed", f"must be -1 (random) or a non-negative integer, got {self.seed}")
        resolve_rng(self.rng)  # ValueError naming the choices
        if self.convention not in CONVENTIONS:
            raise SettingError("convention", f"must be one of {', '.join(CONVENTIONS)}, got {self.convention!r}")
        parse_sampler_name(self.sampler)  # ValueError naming the closest sampler
        resolve_schedule(self.schedule)  # ValueError naming the closest schedule
        hires.resolve_upscaler(self.hires_upscaler)  # ValueError naming the upscalers sdtorch has
        if self.hires_scale is not None and not self.hires_resize and self.hires_scale <= 0:
            raise SettingError("hires_scale", f"must be positive, got {self.hires_scale}")
        if not 0.0 <= self.hires_strength <= 1.0:
            raise SettingError("hires_strength", f"must be in [0, 1], got {self.hires_strength}")
        if not isinstance(self.hires_steps, int) or self.hires_steps < 0:
            raise SettingError("hires_steps", f"must be at least 0, got {self.hires_steps}")
        if not isinstance(self.ngms, (int, float)) or not math.isfinite(self.ngms) or self.ngms < 0:
            raise SettingError("ngms", f"must be a σ of at least 0 (0 = off), got {self.ngms}")
        for name in ("token_merging_ratio", "token_merging_ratio_hr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise SettingError(name, f"must be in [0, 1) (0 = off), got {v}")
        for name, least in (("deep_cache_interval", 1), ("deep_cache_depth", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < least:  # the depth's upper bound is the UNet's (deep_cache())
                raise SettingError(name, f"must be an integer of at least {least}, got {v}")
        if not isinstance(self.refiner_switch_at, (int, float)) or not 0 < self.refiner_switch_at <= 1:
            raise SettingError("refiner_switch_at", f"must be in (0, 1], got {self.refiner_switch_at}")
        if self.refiner is not None and self.hires:
            raise SettingError("refiner", "together with hires fix is not supported yet")

    def resolved(self, resolution: int) -> Settings:
        """A validated copy with nothing left open: the size (the model's `resolution` by default), a drawn seed
        for -1, the canonical RNG and upscaler names, and `loras` written into the prompt as <lora:...> tags (so
        the image's metadata regenerates it)."""
        self.validate(size_optional=True)
        prompt = self.prompt + "".join(_lora_tag(name, value) for name, value in (self.loras or {}).items())
        return replace(self, prompt=prompt, loras=None, hashes={},
                       width=resolution if self.width is None else self.width,
                       height=resolution if self.height is None else self.height,
                       seed=random.randrange(2 ** 32) if self.seed == -1 else self.seed,
                       rng=resolve_rng(self.rng), hires_upscaler=hires.resolve_upscaler(self.hires_upscaler))


class SettingError(ValueError):
    """A generation setting out of range; `field` names it (the CLI shows it as --field, the server as A1111's)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


class Pipeline:
    """A loaded Stable Diffusion model, ready to make images. Build it with `sdtorch.load(path)`."""

    def __init__(self, models: StableDiffusionModels, tokenizer, config: ModelConfig, *, name: str = "",
                 model_hash=None, device="auto", dtype=None, offload: bool = False,
                 release_idle_weights: bool = True, tune_allocator: bool = False, lora_dir=None,
                 embeddings_dir=None):
        self.models = models.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self._model_hash = model_hash  # a str, or a callable computing it lazily (hashing GBs takes seconds)
        self.schedule = DiscreteSchedule.scaled_linear()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype) or stored.model_dtype(models)
        self.offload = offload  # keep CLIP and VAE on the CPU, only the UNet on the accelerator
        # give the pages of memory-mapped CPU weights back to the OS after each phase of a generation (sdtorch.memory)
        self.release_idle_weights = release_idle_weights
        # on the CPU, set glibc's malloc to keep freed activation blocks (memory.keep_freed_blocks): process-wide, so
        # only when asked (the CLI asks); measured 10.6 -> 9.9 s a 512x512 UNet step
        self.tune_allocator = tune_allocator
        # True: image k of a batch equals bit for bit the single image with seed s + k (what `--from` regenerates):
        # the UNet and the VAE then run one image at a time, since their kernels round differently at another batch
        # size (up to 1/255 on a few pixels otherwise). Off by default: batching is what makes a batch fast.
        self.batch_exact = False
        self._running: set[threading.Event] = set()  # one stop flag per generation running now
        self._running_lock = threading.Lock()
        # LoRA files named by <lora:NAME:W> tags, and textual-inversion embeddings named by their words (A1111's
        # models/Lora and embeddings folders), merged into each model for its phase of a generation
        self.lora_dir = lora_dir
        self.embeddings = EmbeddingLibrary(embeddings_dir)
        self.networks = AppliedNetworks(self.models)
        self._network_files: dict = {}
        self._refiners: dict[str, Pipeline] = {}
        self.to(self.device, self.dtype)

    # -- set-up -------------------------------------------------------------------------------------------------
    def to(self, device=None, dtype=None) -> Pipeline:
        self.device = resolve_device(device) if device is not None else self.device
        self.dtype = resolve_dtype(dtype) or self.dtype
        side = torch.device("cpu") if self.offload else self.device
        _place(self.unet, self.device, self.dtype, packed_loop=self.release_idle_weights)  # (see _run's loop)
        if self.device.type == "cpu" and self.dtype in (torch.float16, torch.bfloat16):
            warn_if_cpu_lacks(self.dtype)
        # on the CPU fp16/bf16 are slow and not always supported: keep the side models fp32 there
        side_dtype = torch.float32 if side.type == "cpu" else self.dtype
        _place(self.text_encoder, side, side_dtype)
        _place(self.vae, side, side_dtype)
        if self.tune_allocator and self.device.type == "cpu":
            memory.keep_freed_blocks()  # large activations reused, not faulted in afresh at every step
        return self

    def _done_with(self, model: torch.nn.Module) -> None:
        """A phase is over: its model's memory-mapped weights may leave RAM until the next generation needs them."""
        if self.release_idle_weights:
            memory.release(p.data for p in model.parameters())

    @property
    def weights(self) -> str | None:
        """"q8" when the models hold q8 weights (`weights="q8"`, or a q8 file), else None; a refiner this pipeline
        loads is read the same way."""
        return "q8" if stored.is_quantized(self.models) else None

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
        """Stop the generations running now after their current step (thread-safe, e.g. from a server's request
        thread): each raises GenerationInterrupted, also when the call comes during the final VAE decode. Every
        generation has its own flag, so one starting later is not affected and cannot clear it; with no generation
        running this does nothing."""
        with self._running_lock:
            for stop in self._running:
                stop.set()

    @contextlib.contextmanager
    def _generation(self):
        """This generation's stop flag, set by `interrupt` while it runs."""
        stop = threading.Event()
        with self._running_lock:
            self._running.add(stop)
        try:
            yield stop
        finally:
            with self._running_lock:
                self._running.discard(stop)

    # -- the three jobs -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def txt2img(self, prompt: str, negative: str = "", **kwargs) -> list[Image.Image]:
        """Images from a prompt. Keyword names as the CLI: steps, cfg, sampler, schedule, seed, width, height,
        batch, clip_skip, guidance_rescale, eta, rng, callback, tiled_vae; hires fix: hires_scale (or hires_resize
        (w, h)), hires_steps, hires_upscaler, hires_strength; convention ("a1111" or "diffusers")."""
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
        pixels, s = self.run_resolved(s, init_image=init_image, **kwargs)
        # image k's own seed is s + k (A1111 writes it so): its parameters regenerate it alone
        return [png_with_parameters(im, format_parameters(s.prompt, s.negative,
                                                          self.infotext_params(s, init_image is not None, k)))
                for k, im in enumerate(imgs.tensor_to_pil(pixels))]

    def run(self, s: Settings, **kwargs) -> torch.Tensor:
        """The whole generation; returns (B, 3, H, W) pixels in [-1, 1]. `s` itself is left as it is."""
        return self.run_resolved(s, **kwargs)[0]

    def run_resolved(self, s: Settings, **kwargs) -> tuple[torch.Tensor, Settings]:
        """(pixels, the settings they were made with): `s` resolved (size, seed; Settings.resolved) plus the hashes
        of the LoRA and embedding files used, what the images' metadata is written from."""
        s = s.resolved(self.config.resolution)
        if self.config.family not in SDXL_FAMILIES and (s.original_size or s.target_size
                                                        or tuple(s.crop_top_left) != (0, 0)):
            raise SettingError("original_size", f"(and target_size, crop_top_left) condition SDXL models only; this "
                                                f"is an {self.config.family.upper()} model")
        with self._generation() as stop:
            pixels = self._run(s, stop, **kwargs)
            if stop.is_set():  # interrupted after the last step: the images are not what was asked to finish
                raise GenerationInterrupted("interrupted after the last step")
            return pixels, s

    def _run(self, s: Settings, stop: threading.Event, *, init_image=None, mask=None, mask_blur: int = 4,
             resize_mode=0, callback=None, tiled_vae: bool | None = None) -> torch.Tensor:
        """The generation on resolved settings `s` (whose `hashes` it fills)."""
        sampler, schedule_name = self.sampler_and_schedule(s)
        h, w = s.height // 8, s.width // 8
        auto_tile = tiled_vae is None
        if auto_tile:
            tiled_vae = s.width * s.height > TILE_ABOVE_PIXELS

        prompt, negative = self.use_networks(s)  # the prompts without their <lora:...> tags
        with self.networks.merged("text_encoder", "text_encoder_2"):
            conditions = self.conditioning(replace(s, prompt=prompt, negative=negative), s.hashes)
        self._done_with(self.text_encoder)

        x0_latent = c_concat = latent_mask = None
        if init_image is not None:
            image = imgs.pil_to_tensor(imgs.resize_image(imgs.to_rgb(init_image), s.width, s.height, resize_mode))
            x0_latent = self.encode_image(image, tiled_vae).expand(s.batch, -1, -1, -1)
        if mask is not None:
            pixel_mask = imgs.prepare_mask(mask, s.width, s.height, mask_blur, resize_mode)  # (1, 1, H, W)
            latent_mask = torch.nn.functional.interpolate(pixel_mask, size=(h, w)).to(self.device)
            if self.config.unet.in_channels == 9:  # inpainting model: mask + masked image as extra channels
                masked_latent = self.encode_image(image * (pixel_mask < 0.5), tiled_vae).expand(s.batch, -1, -1, -1)
                c_concat = torch.cat([latent_mask.expand(s.batch, -1, -1, -1), masked_latent], dim=1)
                latent_mask = None  # the model itself keeps the unmasked part; no blending

        extra_args = {**conditions.denoiser_args(s.batch, self.device), "cfg_scale": s.cfg,
                      "guidance_rescale": s.guidance_rescale}
        if s.cfg == 1:
            extra_args["uncond"] = None
        if c_concat is not None:
            extra_args["c_concat"] = c_concat.to(self.device)
        denoiser = self._denoiser(self.unet, s)
        refiner = self.refiner_pipeline(s.refiner) if s.refiner is not None else None
        if refiner is not None:  # its conditioning of the same prompts, with its own text encoder
            refiner_conditions = refiner.conditioning(replace(s, prompt=prompt, negative=negative))
            refiner._done_with(refiner.text_encoder)
            refiner_args = {**refiner_conditions.denoiser_args(s.batch, self.device),
                            "c_concat": extra_args.get("c_concat") if refiner.config.unet.in_channels == 9 else None}
            if s.cfg == 1:
                refiner_args["uncond"] = None

        def on_step(info):
            if not torch.isfinite(info["denoised"]).all():
                raise NaNError(f"the UNet produced NaN/inf at step {info['i'] + 1} in {self.dtype}; "
                               "try dtype='fp32' or 'bf16'")
            if callback is not None:
                callback(info["i"] + 1, info["total"], info["x"], info["sigma"])
            if stop.is_set():
                raise GenerationInterrupted(f"interrupted after step {info['i'] + 1} of {info['total']}")

        common = dict(schedule_name=schedule_name, convention=s.convention, eta=s.eta, extra_args=extra_args,
                      callback=on_step, device=self.device)
        channels = self.config.unet.out_channels
        # on the CPU in fp32 the UNet's memory-mapped weights are laid out for oneDNN once for the loop, not at every
        # step; the packs replace the mapped pages, so only where these may be released
        # (merged inside the packing block: restored first, then the packs freed and the heap trimmed)
        with contextlib.ExitStack() as loop:
            base = loop.enter_context(contextlib.ExitStack())
            if self.release_idle_weights:
                base.enter_context(packed_weights(self.unet))
            base.enter_context(self.networks.merged("unet"))
            if refiner is not None:
                def hand_over():  # as A1111 unloads the base to load the refiner: the base's packs go first
                    base.close()
                    self._done_with(self.unet)
                    s.hashes["Refiner"] = f"{refiner.name} [{refiner.model_hash}]"
                    if refiner.release_idle_weights:
                        loop.enter_context(packed_weights(refiner.unet))
                denoiser = Handover(denoiser, self._denoiser(refiner.unet, s, refiner), refiner_args, self.schedule,
                                    s.refiner_switch_at, hand_over)
            cached = functools.partial(deep_cache, self.unet, s.deep_cache_interval, s.deep_cache_depth)
            with token_merging(self.unet, s.token_merging_ratio), cached():
                latents = sample(denoiser, sampler, s.steps, self.schedule, SeededNoise(s.seed, s.batch, s.rng),
                                 (channels, h, w), init_latent=x0_latent, strength=s.strength,
                                 latent_mask=latent_mask, img2img_fix_steps=s.img2img_fix_steps, **common)
            if s.hires and init_image is None:
                with token_merging(self.unet, s.token_merging_ratio_hr or s.token_merging_ratio), cached():
                    latents = self._hires_pass(s, latents, denoiser, sampler, common, tiled_vae)
        if denoiser.skipped_uncond:
            s.hashes["NGMS"] = str(s.ngms)
        self._done_with(self.unet)
        if latent_mask is not None:
            latents = latent_mask * latents + (1 - latent_mask) * x0_latent
        if auto_tile:  # the hires pass may have made the image larger
            tiled_vae = latents.shape[-2] * latents.shape[-1] * 64 > TILE_ABOVE_PIXELS
        if refiner is not None:
            refiner._done_with(refiner.unet)
        decoder = refiner if "Refiner" in s.hashes else self  # A1111 decodes with the model loaded at the end
        if self.batch_exact:  # (B, 4, h, w) -> B × (1, 4, h, w) -> (B, 3, H, W)
            pixels = torch.cat([decoder.decode_latents(one, tiled_vae) for one in latents.split(1)])
        else:
            pixels = decoder.decode_latents(latents, tiled_vae)
        decoder._done_with(decoder.vae)
        if mask is not None:  # paste the original back outside the (blurred) mask, as A1111's inpainting overlay
            pixel_mask = pixel_mask.to(pixels.device)
            pixels = pixel_mask * pixels + (1 - pixel_mask) * image.to(pixels.device)
        return pixels

    def _denoiser(self, unet, s: Settings, model: Pipeline | None = None) -> CFGDenoiser:
        """x̂0 from `unet` (of `model`, default this pipeline), guided as `s` says."""
        model = model or self
        unet = _OneImageAtATime(unet, s.batch) if self.batch_exact else unet
        return CFGDenoiser(unet, model.schedule, model.config.prediction_type, s_min_uncond=s.ngms,
                           s_min_uncond_all=s.ngms_all_steps)

    def refiner_pipeline(self, path) -> Pipeline:
        """The refiner model at `path`, loaded once (for this pipeline's device and dtype) and kept for later runs.
        Its latents must be this model's: the same VAE latent space."""
        key = str(Path(path).resolve())
        if key not in self._refiners:
            import sdtorch

            refiner = sdtorch.load(path, device=self.device, dtype=self.dtype, tune_allocator=self.tune_allocator,
                                   weights=self.weights)
            if refiner.config.vae.scale_factor != self.config.vae.scale_factor:
                raise SettingError("refiner", f"{path} is {FAMILY_NAMES[refiner.config.family]}, whose latents are "
                                              f"not those of this {FAMILY_NAMES[self.config.family]} model")
            self._refiners = {key: refiner}  # one refiner at a time: another replaces it
        return self._refiners[key]

    def _hires_pass(self, s: Settings, latents, denoiser, sampler, common, tiled_vae) -> torch.Tensor:
        """A1111's second hires-fix pass: upscale the first pass (latents, or the decoded image), then img2img at
        hires_strength with fresh noise from the same seeds, counting steps as "img2img_fix_steps" does."""
        to_w, to_h, cut_x, cut_y = hires.target_size(s.width, s.height, s.hires_scale, s.hires_resize)
        if s.hires_upscaler in hires.LATENT_UPSCALERS:
            latents = hires.upscale_latents(latents, to_w, to_h, s.hires_upscaler)
        else:
            pixels = hires.upscale_pixels(self.decode_latents(latents, tiled_vae), to_w, to_h, s.hires_upscaler)
            latents = self.encode_image(pixels, tiled_vae or to_w * to_h > TILE_ABOVE_PIXELS)
        latents = latents[:, :, cut_y // 2:latents.shape[2] - (cut_y + 1) // 2,
                          cut_x // 2:latents.shape[3] - (cut_x + 1) // 2]
        denoiser.calls = 0  # a new sampler run, as A1111 counts NGMS's calls
        return sample(denoiser, sampler, s.hires_steps or s.steps, self.schedule, SeededNoise(s.seed, s.batch, s.rng),
                      tuple(latents.shape[1:]), init_latent=latents, strength=s.hires_strength,
                      img2img_fix_steps=True, **common)

    def sampler_and_schedule(self, s: Settings):
        """(sampler, schedule name); the schedule is None for A1111's "Automatic" (the sampler's default)."""
        sampler, named_schedule = parse_sampler_name(s.sampler)
        return sampler, resolve_schedule(s.schedule) or named_schedule

    def encode_prompts(self, prompt: str, negative: str, clip_skip: int):
        """The text contexts (cond, uncond), each (1, 77·k, D)."""
        c = self.conditioning(Settings(prompt, negative, clip_skip=clip_skip, width=self.config.resolution,
                                       height=self.config.resolution))
        return c.cond, c.uncond

    def conditioning(self, s: Settings, hashes: dict | None = None) -> conditioning.Conditioning:
        """Everything the UNet is conditioned on, as the model's family does it (sdtorch/conditioning.py). With an
        embeddings folder, its names in the prompts become their vectors (and `hashes` gets A1111's "TI hashes" of
        those used)."""
        matcher = None
        if self.embeddings.files():
            matcher = EmbeddingMatcher(self.embeddings, self.tokenizer, self.config.clip.hidden_size)
        c = conditioning.encode_prompts(self.models, conditioning.tokenizers(self.config, self.tokenizer),
                                        self.config, s.prompt, s.negative, s.clip_skip, conditioning.sdxl_sizes(s),
                                        embeddings=matcher)
        if hashes is not None:
            hashes["TI hashes"] = _hash_list({name: e.short_hash for name, e in matcher.used.items()} if matcher
                                            else {})
        return c

    def use_networks(self, s: Settings) -> tuple[str, str]:
        """Take the <lora:...> tags out of both prompts of resolved settings `s`: exactly those LoRAs are merged into
        each model for its phase (none: the base weights). Returns the prompts without tags; s.hashes gets A1111's
        "Lora hashes"."""
        prompt, tags = extract_lora_tags(s.prompt)
        negative, negative_tags = extract_lora_tags(s.negative)  # A1111 applies a LoRA named there too
        networks = [(self.network(name), unet, te) for name, unet, te in tags + negative_tags]
        self.networks.use(networks)
        s.hashes["Lora hashes"] = _hash_list({name: network.short_hash for (name, _, _), (network, _, _)
                                             in zip(tags + negative_tags, networks, strict=True)})
        return prompt, negative

    def network(self, name: str):
        """The LoRA file `name` names (in lora_dir, or a path), read once per version of the file."""
        path = find_file(name, Path(self.lora_dir) if self.lora_dir is not None else None)
        key = (path.resolve(), path.stat().st_mtime_ns)
        if key not in self._network_files:
            self._network_files[key] = read_network(path, self.models, name=name)
        return self._network_files[key]

    @staticmethod
    def _vae_input(x: torch.Tensor) -> torch.Tensor:
        """On the CPU the VAE runs channels-last: oneDNN's convolutions are ~12% faster on NHWC activations at its
        sizes (the UNet's are not), and the weights can stay as they are, memory-mapped."""
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    def encode_image(self, image: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8): the posterior mean, deterministic."""
        vae = self.vae
        p = next(vae.parameters())
        image = self._vae_input(image.to(p.device, stored.model_dtype(vae)))
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
        dtype = stored.model_dtype(vae)
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
        # A1111 writes the schedule its sampler resolved "Automatic" to, and "Automatic" where there is none
        label = SCHEDULE_LABELS[schedule_name or sampler.default_schedule or "automatic"]
        hires_pass = s.hires and not with_image
        return {
            "Steps": s.steps, "Sampler": sampler.name, "Schedule type": label,
            "CFG scale": s.cfg, "Seed": s.seed + index, "Size": f"{s.width}x{s.height}",
            "Model hash": self.model_hash, "Model": self.name or None,
            "Clip skip": s.clip_skip if s.clip_skip != 1 else None,
            "Denoising strength": s.strength if with_image else s.hires_strength if hires_pass else None,
            "CFG rescale": s.guidance_rescale or None, "Eta": s.eta,
            "RNG": {"cpu": "CPU", "nv": "NV"}[resolve_rng(s.rng)],  # A1111 assumes "GPU" when absent
            "Hires upscale": s.hires_scale if hires_pass and not s.hires_resize else None,
            "Hires resize": f"{s.hires_resize[0]}x{s.hires_resize[1]}" if hires_pass and s.hires_resize else None,
            "Hires steps": (s.hires_steps or None) if hires_pass else None,
            "Hires upscaler": s.hires_upscaler if hires_pass else None,
            "NGMS": s.ngms if "NGMS" in s.hashes else None,
            "NGMS all steps": True if "NGMS" in s.hashes and s.ngms_all_steps else None,
            "Token merging ratio": s.token_merging_ratio or None,
            "Token merging ratio hr": (s.token_merging_ratio_hr or s.token_merging_ratio or None) if hires_pass
            else None,
            "DeepCache interval": s.deep_cache_interval if s.deep_cache_interval > 1 else None,
            "DeepCache depth": s.deep_cache_depth if s.deep_cache_interval > 1 else None,
            "Refiner": s.hashes.get("Refiner"),
            "Refiner switch at": s.refiner_switch_at if "Refiner" in s.hashes else None,
            "TI hashes": s.hashes.get("TI hashes"), "Lora hashes": s.hashes.get("Lora hashes"),
            **conditioning.size_params(s),
        }


class _OneImageAtATime:
    """The UNet called once per image of the batch, with that image's guidance rows (image k's rows are k, k + B,
    ...: CFGDenoiser stacks the unconditional and conditional halves), so each call has the single image's batch
    and, row for row, its inputs: oneDNN's kernels pick their blocking by batch size, and round differently."""

    def __init__(self, unet, batch: int):
        self.unet, self.batch = unet, batch

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y=None) -> torch.Tensor:
        added = {} if y is None else {"y": y}
        if self.batch == 1:
            return self.unet(x, t, context, **added)
        out = None
        for k in range(self.batch):
            rows = torch.arange(k, x.shape[0], self.batch, device=x.device)  # image k's rows: (n·B, ...) -> (n, ...)
            part = self.unet(x[rows], t[rows], context[rows], **{k: v[rows] for k, v in added.items()})
            out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
            out[rows] = part
        return out


_SETTINGS_FIELDS = {"steps", "cfg", "sampler", "schedule", "seed", "width", "height", "batch", "clip_skip",
                    "guidance_rescale", "eta", "rng", "convention", "img2img_fix_steps", "hires_scale", "hires_resize",
                    "hires_steps", "hires_upscaler", "hires_strength", "loras", "original_size", "crop_top_left",
                    "target_size", "ngms", "ngms_all_steps", "refiner", "refiner_switch_at", "token_merging_ratio",
                    "token_merging_ratio_hr", "deep_cache_interval", "deep_cache_depth"}


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


def _lora_tag(name: str, value) -> str:
    """<lora:NAME:TE:UNET> for pipe.txt2img(loras={NAME: w or {"unet": w, "te": w}})."""
    if any(c in str(name) for c in ":<>"):
        raise ValueError(f"loras: a LoRA name cannot contain ':', '<' or '>', got {name!r}")
    unet, te = (value.get("unet", 1.0), value.get("te", 1.0)) if isinstance(value, dict) else (value, value)
    return f"<lora:{name}:{float(te):g}:{float(unet):g}>"


def _hash_list(hashes: dict[str, str]) -> str | None:
    """A1111's "name: hash, name: hash", names without ':' and ',' (so the list reads back), or None if empty."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in hashes.items()) or None
