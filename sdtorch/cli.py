"""The `sdtorch` command: generate, info, samplers, convert, dataset, train, eval.

Bad input gets one line on stderr and exit code 2 (`--debug` shows the traceback); Ctrl-C stops after the current
step, writes nothing, and exits 130.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

from . import BUILTIN_MODEL, WEIGHT_MODES

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class CLIError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


# -- generate -------------------------------------------------------------------------------------------------------
# the generation settings the options set; their defaults and checks are pipeline.Settings' (one source)
SETTING_OPTIONS = ("prompt", "negative", "steps", "cfg", "sampler", "schedule", "seed", "width", "height", "batch",
                   "strength", "clip_skip", "rng", "hires_scale", "hires_steps", "hires_upscaler", "hires_strength",
                   "ngms", "ngms_all_steps", "original_size", "target_size", "crop_top_left", "refiner",
                   "refiner_switch_at", "token_merging_ratio", "token_merging_ratio_hr", "deep_cache_interval",
                   "deep_cache_depth")
HIRES_KEYS = ("hires_scale", "hires_resize", "hires_steps", "hires_upscaler", "hires_strength")


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="make images from a prompt (txt2img, img2img, inpaint)")
    p.add_argument("prompt", nargs="?", help="what to draw (A1111 syntax: (word:1.3), [word], BREAK)")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7)")
    p.add_argument("--sampler", help='A1111 sampler name (default "DPM++ 2M"), e.g. "Euler a", "DPM++ 2M Karras"')
    p.add_argument("--schedule", help="A1111 schedule type: automatic (the sampler's default), uniform, karras, "
                   "exponential, polyexponential, sgm_uniform, kl_optimal, align_your_steps, simple, normal, ddim, "
                   "beta")
    p.add_argument("--rng", type=str.lower, choices=["cpu", "nv", "gpu"],
                   help="noise source: cpu (default; torch's CPU generator) or nv (CUDA's stream, A1111's GPU/NV)")
    p.add_argument("--img2img-fix-steps", action="store_true",
                   help="img2img runs exactly --steps steps whatever the strength (A1111's option)")
    p.add_argument("--hires-scale", type=float, help="hires fix: upscale the first pass by this factor")
    p.add_argument("--hires-steps", type=int, help="hires fix: steps of the second pass (default: --steps)")
    p.add_argument("--hires-upscaler", help='hires fix upscaler: "Latent" (default), "Latent (antialiased)", '
                   '"Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)", '
                   '"Lanczos", "Nearest", "None"')
    p.add_argument("--hires-strength", type=float, help="hires fix: denoising strength of the second pass (0.7)")
    p.add_argument("--ngms", type=float, metavar="SIGMA",
                   help="A1111's Negative Guidance minimum sigma: below it, every other step skips the negative "
                   "prompt's pass (faster, approximate; 0 = off)")
    p.add_argument("--ngms-all-steps", action="store_const", const=True,
                   help="with --ngms: skip it at every step below the sigma, not every other one")
    p.add_argument("--token-merging-ratio", type=float, metavar="R",
                   help="A1111's Token merging ratio: merge this share of the tokens before each full-resolution "
                   "self-attention (ToMe; faster, approximate; 0 = off)")
    p.add_argument("--token-merging-ratio-hr", type=float, metavar="R",
                   help="the hires pass's token merging ratio (default: --token-merging-ratio)")
    p.add_argument("--deep-cache-interval", type=int, metavar="N",
                   help="DeepCache: run the whole UNet every N-th step only, and in between its shallow branch on "
                   "the deep features cached (faster, approximate; 1 = off)")
    p.add_argument("--deep-cache-depth", type=int, metavar="D",
                   help="DeepCache: which shallow branch the steps in between run (0, the default, is the "
                   "shallowest and fastest)")
    p.add_argument("--original-size", type=height_width, metavar="WxH",
                   help="SDXL's size conditioning: the size the picture had before cropping (default: the image's)")
    p.add_argument("--target-size", type=height_width, metavar="WxH",
                   help="SDXL: the target size (default: the image's)")
    p.add_argument("--crop-top-left", type=top_left, metavar="TOP,LEFT", help="SDXL: the crop's corner (default 0,0)")
    p.add_argument("--refiner", metavar="MODEL",
                   help="A1111's refiner: this model (e.g. SDXL's refiner) samples the end of the schedule")
    p.add_argument("--refiner-switch-at", type=float, metavar="F",
                   help="with --refiner: the fraction of the schedule (by timestep) after which it takes over (0.8)")
    p.add_argument("--seed", type=int, help="-1 (default) = random; the seed used is printed")
    p.add_argument("--width", type=int, help="default: the model's native resolution")
    p.add_argument("--height", type=int)
    p.add_argument("-n", "--batch", type=int, help="images per run (image k gets seed+k)")
    p.add_argument("--init-image", help="start from this image (img2img)")
    p.add_argument("--strength", type=float, help="img2img/inpaint denoising strength in [0, 1]")
    p.add_argument("--mask", help="inpainting mask (white = repaint); needs --init-image")
    p.add_argument("--mask-blur", type=int, default=4)
    p.add_argument("--model", help="checkpoint (.safetensors/.ckpt) or diffusers folder (default: the built-in model)")
    p.add_argument("--vae", help="a separate VAE file replacing the model's")
    p.add_argument("--lora-dir", help="where <lora:NAME:W> finds NAME (default: models/Lora, as A1111)")
    p.add_argument("--embeddings-dir", help="textual-inversion embeddings, used by name (default: embeddings)")
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    add_weights_option(p)
    p.add_argument("-o", "--output", default="outputs", help="a .png file, or a folder for numbered files")
    p.add_argument("--from", dest="from_png", metavar="IMAGE.png",
                   help="regenerate from the parameters stored in a PNG; other options override them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--attention-maps", metavar="OUT.png",
                   help="also draw where each word of the prompt is attended (the first image's cross-attention)")
    p.add_argument("--exact-batch", action="store_true",
                   help="run a batch one image at a time, so each equals its --from regeneration bit for bit (slower)")
    p.add_argument("--max-pixels", type=pixel_count, default=DEFAULT_MAX_PIXELS, metavar="N|WxH",
                   help="refuse images (generated, --init-image, --mask) larger than this (default 2048x2048)")


DEFAULT_MAX_PIXELS = 2048 * 2048


def add_weights_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=WEIGHT_MODES,
                   help="q8: every layer weight in int8 with block scales, a quarter of fp32's memory (approximate; "
                   "see docs/performance.md)")


def height_width(text: str) -> tuple[int, int]:
    """argparse type of a WxH size, as (height, width) (diffusers' order for SDXL's size conditions)."""
    width, x, height = text.strip().lower().partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}")
    return int(height), int(width)


def top_left(text: str) -> tuple[int, int]:
    """argparse type of "TOP,LEFT"."""
    top, comma, left = text.strip().partition(",")
    if not (comma and top.strip().isdigit() and left.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected TOP,LEFT (two integers), got {text!r}")
    return int(top), int(left)


def pixel_count(text: str) -> int:
    """argparse type of --max-pixels: a count (4194304) or a size (2048x2048)."""
    width, x, height = text.lower().partition("x")
    try:
        value = int(width) * int(height) if x else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel count or WIDTHxHEIGHT, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def generation_settings(args) -> dict:
    """The settings given: CLI options on top of the parameters of --from IMAGE.png. What neither gives is left out
    (pipeline.Settings' default applies; `setting` reads it)."""
    from .metadata import params_to_kwargs, parse_parameters

    settings = {}
    if args.from_png:
        text = read_png_parameters(args.from_png)
        prompt, negative, params = parse_parameters(text)
        settings.update(prompt=prompt, negative=negative)
        stored = a1111_settings(params_to_kwargs(params))
        refined_by = stored.pop("refiner_title", None)
        if refined_by and args.refiner is None:
            raise CLIError(f"--from: the image was finished by the refiner {refined_by}: give its file as --refiner")
        settings.update(stored)
    for key in SETTING_OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if settings.get("prompt") is None:
        raise CLIError("a prompt is required (or --from IMAGE.png)")
    return settings


def setting(s: dict, key: str):
    """A generation setting: as given, else pipeline.Settings' default."""
    from .pipeline import Settings

    return s[key] if key in s else getattr(Settings(""), key)


def a1111_settings(stored: dict) -> dict:
    """Settings from a PNG's parameters, read as A1111 means them: no "RNG" key is A1111's default GPU noise
    (reproduced by the NV generator); "Denoising strength" of a hires-fixed txt2img image is the second pass's;
    DDIM, PLMS and UniPC run on A1111's own timesteps whatever "Schedule type" says."""
    from .diffusion.noise import resolve_rng
    from .diffusion.sample import A1111_TIMESTEP_SAMPLERS
    from .diffusion.samplers import parse_sampler_name

    stored = dict(stored)
    stored.pop("model", None)
    stored.pop("model_hash", None)
    stored["rng"] = resolve_rng(stored.get("rng", "GPU"))
    if "hires_scale" in stored or "hires_resize" in stored:
        stored.setdefault("hires_scale", None)
        if "strength" in stored:
            stored["hires_strength"] = stored.pop("strength")
    if "sampler" in stored and parse_sampler_name(stored["sampler"])[0].name in A1111_TIMESTEP_SAMPLERS:
        stored.pop("schedule", None)
    return stored


def read_png_parameters(path: str, what: str = "--from") -> str:
    from PIL import Image

    from .metadata import read_parameters

    if not Path(path).is_file():
        raise CLIError(f"{what}: {'not a regular file' if Path(path).exists() else 'no such file'}: {path}")
    try:
        text = read_parameters(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CLIError(f"{what}: cannot read {path} as an image: {e}") from None
    if not text:
        raise CLIError(f"{what}: {path} carries no generation parameters")
    return text


def check_embeddings_present(text: str, pipe) -> None:
    """--from: the embeddings its "TI hashes" name must be in the embeddings folder, or the prompt would silently
    read their names as words (missing LoRAs fail by themselves: their <lora:...> tags are in the prompt)."""
    from .metadata import parse_parameters

    listed = parse_parameters(text)[2].get("TI hashes", "")
    present = pipe.embeddings.files()
    for item in filter(None, (part.strip() for part in listed.split(","))):
        name = item.rpartition(":")[0].strip()
        if name and name not in present:
            raise CLIError(f"--from: the image used the embedding {name!r}, which is not in "
                           f"{pipe.embeddings.folder} (give --embeddings-dir)")


def validate_settings(s: dict, args) -> None:
    """Check everything that can be checked before the (slow) model load: pipeline.Settings' own checks, each
    failure named by its option, and the CLI's."""
    from .pipeline import SettingError, Settings

    try:
        Settings(**s).validate(size_optional=True)
    except SettingError as e:
        raise CLIError(f"--{e.field.replace('_', '-')} {e.problem}") from None
    if s.get("width") is not None and s.get("height") is not None:
        check_size(s["width"], s["height"], getattr(args, "max_pixels", DEFAULT_MAX_PIXELS))
    if args.mask and not args.init_image:
        raise CLIError("--mask needs --init-image")


def check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise CLIError(f"{width}x{height} is {width * height:,} pixels, more than --max-pixels {max_pixels:,}")


def open_image(path: str, what: str, max_pixels: int | None = None):
    from .images import load_image

    if not Path(path).is_file():
        raise CLIError(f"{what}: {'not a regular file' if Path(path).exists() else 'no such file'}: {path}")
    try:
        return load_image(path, max_pixels)
    except ValueError as e:
        raise CLIError(f"{what}: {e}") from None


def output_paths(output: str, count: int, seed: int) -> list[Path]:
    """A .png path names the file (image k > 0 gets a -k suffix); anything else is a folder where files are numbered
    after the highest number already there (A1111's NNNNN-SEED.png). Folder names are only proposals: `save_image`
    claims the number when it writes, so runs writing into one folder at once never take the same one."""
    out = Path(output)
    if out.suffix.lower() == ".png":
        if out.is_dir():
            raise CLIError(f"-o {out} is a folder; name a file that is none, or drop the .png to number files in it")
        folder = out.parent
        paths = [out] + [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(1, count)]
    else:
        folder = out
        if out.exists() and not out.is_dir():
            raise CLIError(f"-o {out} is a file, not a folder (name a .png file, or a folder)")
        start = next_number(out)
        paths = [out / f"{start + k:05d}-{seed + k}.png" for k in range(count)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".sdtorch-write-test-{time.time_ns()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CLIError(f"output folder {folder} is not writable ({e.strerror or e})") from None
    return paths


def next_number(folder: Path) -> int:
    """One more than the highest NNNNN of the NNNNN-*.png files in `folder` (0 in an empty or new one)."""
    existing = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")] if folder.is_dir() else []
    return max(existing, default=-1) + 1


def save_image(image, path: Path, numbered: bool) -> Path:
    """Write a generated image. A numbered name is claimed under a lock on the folder (the number is counted again
    there, so concurrent runs take the next free one) and by an exclusive create: an existing file is never replaced.
    A name the user gave is replaced atomically. Either way the file appears whole or not at all."""
    from .metadata import save_png

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    try:
        save_png(image, tmp, image.info["parameters"])
        if not numbered:
            os.replace(tmp, path)
            return path
        with folder_lock(path.parent):
            number, name = next_number(path.parent), path.name[5:]
            while True:
                path = path.with_name(f"{number:05d}{name}")
                try:
                    os.link(tmp, path)  # fails if the name exists: the atomic claim
                    return path
                except FileExistsError:
                    number += 1
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on a folder for the writers in it (flock on the folder itself: no lock file left behind);
    where there is no flock (Windows), exclusive creation alone still keeps every file."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def run_generate(args) -> int:
    import random

    s = generation_settings(args)
    validate_settings(s, args)
    init = open_image(args.init_image, "--init-image", args.max_pixels) if args.init_image else None
    mask = open_image(args.mask, "--mask", args.max_pixels) if args.mask else None
    if init is not None:  # img2img's size defaults to the init image's, rounded down to multiples of 8
        check_size(s.get("width") or init.width // 8 * 8, s.get("height") or init.height // 8 * 8, args.max_pixels)
    model = args.model or BUILTIN_MODEL
    if not Path(model).exists():
        raise CLIError(f"model not found: {model}" + ("" if args.model else " (the built-in model is not installed; "
                                                       "pass --model PATH)"))
    if args.refiner is not None and not Path(args.refiner).exists():
        raise CLIError(f"--refiner: model not found: {args.refiner}")
    if setting(s, "seed") == -1:
        s["seed"] = random.randrange(2 ** 32)  # drawn here: the output names carry it
    paths = output_paths(args.output, setting(s, "batch"), s["seed"])
    if args.attention_maps and Path(args.attention_maps).suffix.lower() != ".png":
        raise CLIError(f"--attention-maps writes a .png file, got {args.attention_maps}")

    import sdtorch
    from .pipeline import GenerationInterrupted

    pipe = sdtorch.load(model, vae=args.vae, device=args.device, dtype=args.dtype, tune_allocator=True,
                        lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir, weights=args.weights)
    pipe.batch_exact = args.exact_batch
    from .config import SDXL_FAMILIES

    if pipe.config.family not in SDXL_FAMILIES and any(k in s for k in ("original_size", "target_size",
                                                                       "crop_top_left")):
        raise CLIError(f"--original-size, --target-size and --crop-top-left condition SDXL models only; this is an "
                       f"{pipe.config.family.upper()} model")
    if init is None:
        check_size(s.get("width") or pipe.config.resolution, s.get("height") or pipe.config.resolution,
                   args.max_pixels)
    if args.from_png:
        check_embeddings_present(read_png_parameters(args.from_png), pipe)
    prompt, negative, strength = s.pop("prompt"), s.pop("negative", ""), s.pop("strength", None)
    if args.img2img_fix_steps:
        s["img2img_fix_steps"] = True
    if init is not None:  # hires fix is a txt2img pass
        for key in HIRES_KEYS:
            s.pop(key, None)
    elif any(key in s for key in HIRES_KEYS) and "hires_scale" not in s and "hires_resize" not in s:
        s["hires_scale"] = 2.0  # A1111's default upscale when only the other hires options are given
    progress = None if args.quiet else make_progress_bar()
    interrupted = []

    def on_sigint(*_):  # stop after the current step; if it comes later (the VAE decode), still write nothing
        interrupted.append(True)
        pipe.interrupt()

    previous = signal.signal(signal.SIGINT, on_sigint)
    recording = contextlib.ExitStack()
    if args.attention_maps:
        from .attention_maps import record_cross_attention
        record = recording.enter_context(record_cross_attention(pipe.unet, images=setting(s, "batch")))
    start = time.perf_counter()
    try:
        if mask is not None:
            images = pipe.inpaint(prompt, init, mask, negative, strength=1.0 if strength is None else strength,
                                  mask_blur=args.mask_blur, callback=progress, **s)
        elif init is not None:
            images = pipe.img2img(prompt, init, negative, strength=0.75 if strength is None else strength,
                                  callback=progress, **s)
        else:
            images = pipe.txt2img(prompt, negative, callback=progress, **s)
        if interrupted:
            raise GenerationInterrupted("interrupted after the last step")
    finally:
        signal.signal(signal.SIGINT, previous)
        if progress is not None:
            progress.close()
        recording.close()
    elapsed = time.perf_counter() - start
    numbered = Path(args.output).suffix.lower() != ".png"
    for image, path in zip(images, paths, strict=True):
        print(f"wrote {save_image(image, path, numbered)}")
    if args.attention_maps:
        from .attention_maps import draw_word_maps, word_maps
        draw_word_maps(images[0], word_maps(record.mean()[0], pipe.tokenizer, prompt), args.attention_maps,
                       title=prompt)
        print(f"wrote {args.attention_maps}")
    print(f"seed: {s['seed']}  ({len(images)} image{'s' * (len(images) > 1)} in {elapsed:.1f} s)")
    return 0


def make_progress_bar():
    """A tqdm bar driven by the pipeline's per-step callback (step, total, latents, sigma)."""
    from tqdm import tqdm

    class Bar:
        bar = None

        def __call__(self, step, total, latents, sigma):
            if self.bar is None:
                self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
            self.bar.update(1)

        def close(self):
            if self.bar is not None:
                self.bar.close()

    return Bar()


# -- info, samplers, convert ------------------------------------------------------------------------------------------
def run_info(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise CLIError(f"no such file or folder: {path}")
    if path.suffix.lower() == ".png":
        print(read_png_parameters(str(path), "info"))
        return 0
    from .checkpoint import describe_model

    for key, value in describe_model(path).items():
        print(f"{key}: {value}")
    return 0


def run_samplers(args) -> int:
    from .diffusion.samplers import SAMPLERS, SCHEDULES

    from .diffusion.samplers import SCHEDULE_LABELS
    from .hires import UPSCALERS

    print("samplers (A1111 name, its \"Automatic\" schedule, aliases):")
    for name, info in SAMPLERS.items():
        aliases = ", ".join(info.aliases)
        automatic = info.default_schedule or ("A1111 timesteps" if name in ("DDIM", "PLMS", "UniPC") else "uniform")
        notes = [automatic] + ["stochastic"] * info.stochastic + ["Brownian-tree noise"] * info.brownian_noise
        notes += ["drops the next-to-last sigma"] * info.discard_penultimate
        print(f"  {name:<14} {'; '.join(notes)}. aliases: {aliases}")
    print("schedules: " + ", ".join(f"{n} ({SCHEDULE_LABELS[n]})" for n in ["automatic", *SCHEDULES]))
    print("hires upscalers: " + ", ".join(UPSCALERS))
    print('combine them as A1111 does: --sampler "DPM++ 2M Karras", or --sampler "DPM++ 2M" --schedule karras')
    return 0


def run_convert(args) -> int:
    from .checkpoint import convert

    if not Path(args.input).exists():
        raise CLIError(f"no such file or folder: {args.input}")
    out = Path(args.output)
    if args.diffusers and out.exists() and not out.is_dir():
        raise CLIError(f"{out} is a file: --diffusers writes a folder")
    if not args.diffusers and out.is_dir():
        raise CLIError(f"{out} is a folder: name the output file (or pass --diffusers to write a folder)")
    from .pipeline import resolve_dtype

    if args.weights and args.diffusers:
        raise CLIError("--weights q8 writes a .safetensors: a diffusers folder holds no int8 weights")
    convert(args.input, args.output, dtype=resolve_dtype(args.dtype), vae=args.vae, to_diffusers=args.diffusers,
            weights=args.weights)
    print(f"wrote {args.output}")
    return 0


def run_dataset(args) -> int:
    from .train.shapes import write_folder

    if args.count < 1:
        raise CLIError(f"--count must be at least 1, got {args.count}")
    if args.size < 8:
        raise CLIError(f"--size must be at least 8, got {args.size}")
    check_folder_target(args.out, "the dataset")
    write_folder(args.out, args.count, seed=args.seed, size=args.size)
    print(f"wrote {args.count} images with captions to {args.out}")
    return 0


def run_eval(args) -> int:
    import sdtorch
    from tqdm import tqdm

    from .train.eval_shapes import EVAL_SEED, evaluate, format_table

    if args.count < 1 or args.steps < 1:
        raise CLIError(f"--count and --steps must be at least 1, got {args.count} and {args.steps}")
    if not math.isfinite(args.cfg):
        raise CLIError(f"--cfg must be a finite number, got {args.cfg}")
    model = args.model or BUILTIN_MODEL
    if not Path(model).exists():
        raise CLIError(f"model not found: {model}")
    pipe = sdtorch.load(model, device=args.device, dtype=args.dtype, tune_allocator=True, weights=args.weights)
    bar = tqdm(total=args.count, file=sys.stderr, disable=args.quiet)
    result = evaluate(pipe, count=args.count, seed=args.seed if args.seed is not None else EVAL_SEED,
                      steps=args.steps, sampler=args.sampler, cfg=args.cfg,
                      progress=lambda done, total: bar.update(1), ngms=args.ngms,
                      token_merging_ratio=args.token_merging_ratio, deep_cache_interval=args.deep_cache_interval,
                      deep_cache_depth=args.deep_cache_depth)
    bar.close()
    print(format_table(result))
    return 0


def check_folder_target(path: str, what: str) -> None:
    if Path(path).exists() and not Path(path).is_dir():
        raise CLIError(f"{path} is a file: {what} goes in a folder")


def check_device(name: str) -> None:
    """--device names a device this machine has (else torch fails deep inside, with a traceback)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise CLIError(f"--device {name}: no such device on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (its usage text stays behind --help); subcommands inherit it."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sdtorch", description="Stable Diffusion from scratch in PyTorch")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate(sub)
    p = sub.add_parser("info", help="print a PNG's generation parameters, or describe a model file")
    p.add_argument("path")
    sub.add_parser("samplers", help="list samplers and schedules")
    p = sub.add_parser("convert", help="convert a checkpoint between formats and dtypes")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--vae", help="bake this VAE into the output")
    p.add_argument("--diffusers", action="store_true", help="write a diffusers folder")
    p.add_argument("--weights", choices=WEIGHT_MODES,
                   help="q8: write the low-memory mode's int8 weights (about 1.1 GB for SD 1.5), which then load "
                   "memory-mapped, as --weights q8 runs")
    p = sub.add_parser("dataset", help="write a procedural captioned dataset")
    p.add_argument("name", choices=["shapes"])
    p.add_argument("out")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p = sub.add_parser("eval", help="score a model on the shapes task by pixel analysis")
    p.add_argument("task", choices=["shapes"])
    p.add_argument("--model", help="default: the built-in model")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, help="caption seed (default: one the training never used)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--ngms", type=float, default=0.0, metavar="SIGMA",
                   help="score with A1111's Negative Guidance minimum sigma (its quality cost)")
    p.add_argument("--token-merging-ratio", type=float, default=0.0, metavar="R",
                   help="score with A1111's token merging at this ratio (its quality cost)")
    p.add_argument("--deep-cache-interval", type=int, default=1, metavar="N",
                   help="score with DeepCache at this interval (its quality cost)")
    p.add_argument("--deep-cache-depth", type=int, default=0, metavar="D", help="with --deep-cache-interval")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="score the UNet in this precision (its cost)")
    add_weights_option(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    from .train.cli import add_train_parser

    add_train_parser(sub)
    from .server.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


COMMANDS = {"generate": run_generate, "info": run_info, "samplers": run_samplers, "convert": run_convert,
            "dataset": run_dataset, "eval": run_eval}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "device", "auto") not in (None, "auto"):
            check_device(args.device)
        if args.command == "train":
            from .train.cli import run_train
            return run_train(args) or 0
        if args.command == "serve":
            from .server.cli import run_serve
            return run_serve(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("sdtorch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 — every failure becomes one line unless --debug
        from .pipeline import GenerationInterrupted

        if isinstance(e, GenerationInterrupted):
            print(f"sdtorch: {e}; nothing written", file=sys.stderr)
            return EXIT_INTERRUPTED
        if args.debug:
            raise
        # OSError: the user's paths and disks (a file where a folder belongs, a full disk), not a bug of ours
        user_error = isinstance(e, (CLIError, ValueError, OSError))
        message = " ".join(str(e).split())  # one line, whatever the exception's text holds
        print(f"sdtorch: error: {message}" if user_error else f"sdtorch: internal error: {e.__class__.__name__}: "
              f"{message} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE if user_error else 1


if __name__ == "__main__":
    sys.exit(main())
