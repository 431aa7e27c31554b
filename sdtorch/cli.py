"""The `sdtorch` command: generate, info, samplers, convert, dataset, train, eval.

Bad input gets one line on stderr and exit code 2 (`--debug` shows the traceback); Ctrl-C stops after the current
step, writes nothing, and exits 130.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from . import BUILTIN_MODEL

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class CLIError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


# -- generate -------------------------------------------------------------------------------------------------------
# width/height None: the model's native resolution (512 for SD 1.x, 64 for the built-in model)
GENERATE_DEFAULTS = dict(negative="", steps=20, cfg=7.0, sampler="DPM++ 2M", schedule=None, seed=-1, width=None,
                         height=None, batch=1, strength=None, clip_skip=1)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="make images from a prompt (txt2img, img2img, inpaint)")
    p.add_argument("prompt", nargs="?", help="what to draw (A1111 syntax: (word:1.3), [word], BREAK)")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7)")
    p.add_argument("--sampler", help='A1111 sampler name (default "DPM++ 2M"), e.g. "Euler a", "DPM++ 2M Karras"')
    p.add_argument("--schedule", help="sigma schedule: normal, karras, exponential, sgm_uniform, simple")
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
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("-o", "--output", default="outputs", help="a .png file, or a folder for numbered files")
    p.add_argument("--from", dest="from_png", metavar="IMAGE.png",
                   help="regenerate from the parameters stored in a PNG; other options override them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def generation_settings(args) -> dict:
    """CLI options, on top of the parameters of --from IMAGE.png, on top of the defaults."""
    from .metadata import params_to_kwargs, parse_parameters, read_parameters

    settings = dict(GENERATE_DEFAULTS)
    if args.from_png:
        text = read_png_parameters(args.from_png)
        prompt, negative, params = parse_parameters(text)
        settings.update(prompt=prompt, negative=negative)
        stored = params_to_kwargs(params)
        stored.pop("model", None)
        stored.pop("model_hash", None)
        if stored.get("schedule"):
            stored["schedule"] = stored["schedule"].lower().replace(" ", "_")
        settings.update(stored)
    for key in list(GENERATE_DEFAULTS) + ["prompt"]:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if settings.get("prompt") is None:
        raise CLIError("a prompt is required (or --from IMAGE.png)")
    return settings


def read_png_parameters(path: str) -> str:
    from .metadata import read_parameters

    if not Path(path).is_file():
        raise CLIError(f"--from: no such file: {path}")
    try:
        text = read_parameters(path)
    except OSError as e:
        raise CLIError(f"--from: cannot read {path} as an image: {e}") from None
    if not text:
        raise CLIError(f"--from: {path} carries no generation parameters")
    return text


def validate_settings(s: dict, args) -> None:
    """Check everything that can be checked before the (slow) model load."""
    from .diffusion.samplers import parse_sampler_name

    for name in ("width", "height"):
        if s[name] is not None and (s[name] <= 0 or s[name] % 8):
            raise CLIError(f"--{name} must be a positive multiple of 8, got {s[name]}")
    if s["steps"] < 1:
        raise CLIError(f"--steps must be at least 1, got {s['steps']}")
    if s["batch"] < 1:
        raise CLIError(f"--batch must be at least 1, got {s['batch']}")
    if s["strength"] is not None and not 0.0 <= s["strength"] <= 1.0:
        raise CLIError(f"--strength must be in [0, 1], got {s['strength']}")
    if s["clip_skip"] < 1:
        raise CLIError(f"--clip-skip must be at least 1, got {s['clip_skip']}")
    parse_sampler_name(s["sampler"])  # ValueError naming the closest sampler
    if args.mask and not args.init_image:
        raise CLIError("--mask needs --init-image")


def open_image(path: str, what: str):
    from .images import load_image

    if not Path(path).is_file():
        raise CLIError(f"{what}: no such file: {path}")
    try:
        return load_image(path)
    except ValueError as e:
        raise CLIError(f"{what}: {e}") from None


def output_paths(output: str, count: int, seed: int) -> list[Path]:
    """A .png path names the file (image k > 0 gets a -k suffix); anything else is a folder where files are numbered
    after the highest number already there, never overwriting (A1111's NNNNN-SEED.png)."""
    out = Path(output)
    if out.suffix.lower() == ".png":
        folder = out.parent
        paths = [out] + [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(1, count)]
    else:
        folder = out
        existing = [int(p.name[:5]) for p in out.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")] if out.is_dir() else []
        start = max(existing, default=-1) + 1
        paths = [out / f"{start + k:05d}-{seed + k}.png" for k in range(count)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".sdtorch-write-test-{time.time_ns()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CLIError(f"output folder {folder} is not writable ({e.strerror or e})") from None
    return paths


def run_generate(args) -> int:
    import random

    from .metadata import save_png

    s = generation_settings(args)
    validate_settings(s, args)
    init = open_image(args.init_image, "--init-image") if args.init_image else None
    mask = open_image(args.mask, "--mask") if args.mask else None
    model = args.model or BUILTIN_MODEL
    if not Path(model).exists():
        raise CLIError(f"model not found: {model}" + ("" if args.model else " (the built-in model is not installed; "
                                                       "pass --model PATH)"))
    if s["seed"] == -1:
        s["seed"] = random.randrange(2 ** 32)
    paths = output_paths(args.output, s["batch"], s["seed"])

    import sdtorch

    pipe = sdtorch.load(model, vae=args.vae, device=args.device, dtype=args.dtype)
    prompt, negative = s.pop("prompt"), s.pop("negative")
    strength = s.pop("strength")
    progress = None if args.quiet else make_progress_bar()
    signal.signal(signal.SIGINT, lambda *_: pipe.interrupt())  # stop after the current step
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
    finally:
        if progress is not None:
            progress.close()
    elapsed = time.perf_counter() - start
    for image, path in zip(images, paths):
        save_png(image, path, image.info["parameters"])
        print(f"wrote {path}")
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
        print(read_png_parameters(str(path)))
        return 0
    for key, value in describe_model(path).items():
        print(f"{key}: {value}")
    return 0


def describe_model(path: Path) -> dict:
    """Family, format, prediction type, parameters per part, stored dtype and A1111's short hash of a model."""
    from contextlib import ExitStack

    from .checkpoint import FAMILY_NAMES, detect_family, detect_format, load_checkpoint
    from .checkpoint.formats import read_tensor_file
    from .checkpoint.load import SUPPORTED_FAMILIES

    fmt = detect_format(path)
    info = {"file": str(path), "format": fmt}
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
            info["supported"] = f"no (sdtorch loads {', '.join(FAMILY_NAMES[f] for f in SUPPORTED_FAMILIES)} models)"
            return info
    loaded = load_checkpoint(path)
    models = loaded.models
    info["family"] = FAMILY_NAMES[loaded.config.family]
    info["prediction type"] = loaded.config.prediction_type
    info["default size"] = f"{loaded.config.resolution}x{loaded.config.resolution}"
    info["inpainting"] = "yes (9-channel UNet)" if loaded.config.unet.in_channels == 9 else "no"
    for part in ("unet", "vae", "text_encoder"):
        info[f"{part} parameters"] = f"{sum(p.numel() for p in getattr(models, part).parameters()):,}"
    info["dtype"] = ", ".join(stored or sorted({str(p.dtype).removeprefix("torch.") for p in models.parameters()}))
    info["sha256"] = loaded.sha256_short or "(a folder: no single-file hash)"
    return info


def run_samplers(args) -> int:
    from .diffusion.samplers import SAMPLERS, SCHEDULES

    print("samplers:")
    for name, info in SAMPLERS.items():
        aliases = ", ".join(info.aliases)
        print(f"  {name:<14} {'(stochastic) ' if info.stochastic else ''}aliases: {aliases}")
    print("schedules: " + ", ".join(SCHEDULES))
    print('combine them as A1111 does: --sampler "DPM++ 2M Karras", or --sampler "DPM++ 2M" --schedule karras')
    return 0


def run_convert(args) -> int:
    from .checkpoint import convert

    if not Path(args.input).exists():
        raise CLIError(f"no such file or folder: {args.input}")
    from .pipeline import resolve_dtype

    convert(args.input, args.output, dtype=resolve_dtype(args.dtype), vae=args.vae, to_diffusers=args.diffusers)
    print(f"wrote {args.output}")
    return 0


def run_dataset(args) -> int:
    from .train.shapes import write_folder

    if args.count < 1:
        raise CLIError(f"--count must be at least 1, got {args.count}")
    write_folder(args.out, args.count, seed=args.seed, size=args.size)
    print(f"wrote {args.count} images with captions to {args.out}")
    return 0


def run_eval(args) -> int:
    import sdtorch
    from tqdm import tqdm

    from .train.eval_shapes import EVAL_SEED, evaluate, format_table

    model = args.model or BUILTIN_MODEL
    if not Path(model).exists():
        raise CLIError(f"model not found: {model}")
    pipe = sdtorch.load(model, device=args.device)
    bar = tqdm(total=args.count, file=sys.stderr, disable=args.quiet)
    result = evaluate(pipe, count=args.count, seed=args.seed if args.seed is not None else EVAL_SEED,
                      steps=args.steps, sampler=args.sampler, cfg=args.cfg,
                      progress=lambda done, total: bar.update(1))
    bar.close()
    print(format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtorch", description="Stable Diffusion from scratch in PyTorch")
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
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    from .train.cli import add_train_parser

    add_train_parser(sub)
    return parser


COMMANDS = {"generate": run_generate, "info": run_info, "samplers": run_samplers, "convert": run_convert,
            "dataset": run_dataset, "eval": run_eval}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from .train.cli import run_train
            return run_train(args) or 0
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
        user_error = isinstance(e, (CLIError, ValueError, FileNotFoundError, PermissionError))
        print(f"sdtorch: error: {e}" if user_error else f"sdtorch: internal error: {e.__class__.__name__}: {e} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE if user_error else 1


if __name__ == "__main__":
    sys.exit(main())
