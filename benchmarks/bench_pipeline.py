"""One SD 1.5-size generation, sdtorch against diffusers on the same machine, weights and settings.

    python benchmarks/bench_pipeline.py [--steps 20] [--size 512] [--device cpu|cuda] [--dtype fp32|fp16]
                                        [--sides ours,ours-q8,ours-q8file,ours-q8-bf16,ours-deepcache-2-2,diffusers]

Random SD 1.5 weights are written once as a single-file .safetensors; each side then runs in a fresh subprocess:
load the file (ours: `sdtorch.load`; diffusers: `StableDiffusionPipeline.from_single_file`, offline config), encode
the prompt, sample `--steps` Euler steps with CFG 7 (batch 2 through the UNet), decode with the VAE. Reported: text
encoding, the median UNet step (with CFG), VAE decode, the whole generation, and peak RSS (VmHWM minus the RSS after
imports, so the load counts) — each as ours / diffusers. Sides beyond `ours` (sdtorch at --dtype) and `diffusers`
are sdtorch's approximate CPU modes: `ours-q8` (weights="q8"), `ours-q8-bf16` (q8 weights, bf16 compute), `ours-bf16`,
`ours-q8file` / `ours-q8file-bf16` (a file `convert --weights q8` wrote, memory-mapped, whose idle phases leave RAM),
`ours-deepcache` (DeepCache, interval 3, depth 0), `ours-deepcache-N-D` (interval N, depth D): its partial steps are
short, so compare the mean step;
each image's difference to diffusers' is its quality cost (ours and diffusers agree to ~1e-4). Never a test.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_load import make_files, rss_kib  # noqa: E402

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_pipeline(side: str, path: str, config_dir: str, device: str = "cpu", dtype: str = "fp32"):
    """The single-file weights loaded as each side's users load them: `sdtorch.load`, or diffusers'
    `StableDiffusionPipeline.from_single_file` with the offline config folder."""
    if side.startswith("ours"):
        import sdtorch

        weights = "q8" if side.startswith("ours-q8") and not side.startswith("ours-q8file") else None
        dtype = "bf16" if side.endswith("-bf16") else dtype
        # as the `sdtorch` command runs
        return sdtorch.load(path, device=device, dtype=dtype, tune_allocator=True, weights=weights)
    from diffusers import StableDiffusionPipeline

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    return StableDiffusionPipeline.from_single_file(path, config=config_dir, local_files_only=True,
                                                    safety_checker=None, torch_dtype=torch_dtype).to(device)


def deep_cache_settings(side: str) -> dict:
    """`ours-deepcache` -> interval 3, depth 0; `ours-deepcache-N-D` -> interval N, depth D; other sides: none."""
    if not side.startswith("ours-deepcache"):
        return {}
    interval, depth = side.split("-")[2:] or (3, 0)
    return {"deep_cache_interval": int(interval), "deep_cache_depth": int(depth)}


def encode_prompts(side: str, pipe, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) text contexts of PROMPT and NEGATIVE, through each side's own prompt encoding."""
    if side.startswith("ours"):
        return pipe.encode_prompts(PROMPT, NEGATIVE, 1)
    return pipe.encode_prompt(PROMPT, device, 1, True, NEGATIVE)


def child(side: str, path: str, config_dir: str, steps: int, size: int, device: str, dtype: str,
          warmup: bool) -> dict:
    torch.set_num_threads(torch.get_num_threads())
    # imported before the RSS baseline, so that neither side's load time nor memory counts its imports
    if side.startswith("ours"):
        from sdtorch.pipeline import Settings
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: F401
    baseline = rss_kib("VmRSS")
    t0 = time.perf_counter()
    pipe = load_pipeline(side, path, config_dir, device, dtype)
    if side == "diffusers":
        # A1111's Euler with the "normal" schedule, which is what our "Euler" runs
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
        pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0

    with torch.inference_mode():
        if warmup:  # one untimed generation first: CUDA kernels' first-call set-up is not what a user waits for
            if side.startswith("ours"):
                pipe.run(Settings(PROMPT, NEGATIVE, steps=2, cfg=7.0, sampler="Euler", seed=0, width=size, height=size))
            else:
                pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, height=size, width=size)
            sync(device)
        encode_times = []
        for _ in range(5):
            t = time.perf_counter()
            encode_prompts(side, pipe, device)
            sync(device)
            encode_times.append(time.perf_counter() - t)

        stamps = []
        start = time.perf_counter()
        if side.startswith("ours"):
            decode_s, decoded = [], []
            original = pipe.decode_latents

            def timed_decode(latents, tiled=False):
                sync(device)
                t = time.perf_counter()
                out = original(latents, tiled)
                sync(device)
                decode_s.append(time.perf_counter() - t)
                decoded.append(out)
                return out

            pipe.decode_latents = timed_decode
            cache = deep_cache_settings(side)
            pipe.run(Settings(PROMPT, NEGATIVE, steps=steps, cfg=7.0, sampler="Euler", seed=0, width=size,
                              height=size, **cache),
                     callback=lambda *a: (sync(device), stamps.append(time.perf_counter())))
            decode_s, image = decode_s[0], decoded[0]
        else:
            latents = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
                           height=size, width=size, generator=torch.Generator().manual_seed(0), output_type="latent",
                           callback_on_step_end=lambda p, i, t, kw: (sync(device), stamps.append(time.perf_counter()),
                                                                     kw)[2]).images
            t = time.perf_counter()
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
            pipe.image_processor.postprocess(image, output_type="pil")
            sync(device)
            decode_s = time.perf_counter() - t
        total_s = time.perf_counter() - start
    # the decoded image in [-1, 1], so that the parent can compare the sides (same weights, seed and sampler)
    torch.save(image.float().cpu(), Path(path).parent / f"image-{side}.pt")
    # the first step includes the prompt encoding
    step_times = [b - a for a, b in zip([start] + stamps[:-1], stamps, strict=True)][1:]
    peak = (rss_kib("VmHWM") - baseline) * 1024
    out = {"load_s": load_s, "encode_s": statistics.median(encode_times), "step_s": statistics.median(step_times),
           "mean_step_s": statistics.mean(step_times),
           "first_step_s": stamps[0] - start,
           "decode_s": decode_s, "total_s": total_s, "peak_bytes": peak}
    if device == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--dir", help="where to write the 6.4 GB of weights (default: a temporary folder)")
    parser.add_argument("--warmup", action="store_true", help="one untimed generation first (use on GPUs)")
    parser.add_argument("--sides", default="ours,diffusers", help="comma-separated, run in this order")
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, path, config_dir, steps, size, device, dtype, warmup = args.child
        print(json.dumps(child(side, path, config_dir, int(steps), int(size), device, dtype, warmup == "1")))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        files = make_files(folder)
        results = {}
        sides = args.sides.split(",")
        for side in sides:
            files["fp32"].read_bytes()  # into the page cache, so no side pays the disk
            path = files["fp32"]
            if side.startswith("ours-q8file"):  # the file `sdtorch convert --weights q8` writes, loaded as it is
                path = folder / "sd15-q8.safetensors"
                if not path.exists():
                    from sdtorch.checkpoint import convert
                    convert(files["fp32"], path, weights="q8")
            cmd = [sys.executable, __file__, "--child", side, str(path), str(folder / "config"),
                   str(args.steps), str(args.size), args.device, args.dtype, str(int(args.warmup))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{side} failed:\n{proc.stderr}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(side, results[side], flush=True)
        # every side drew seed 0's noise with a CPU generator and ran the same sampler: the images should agree
        images = {side: torch.load(folder / f"image-{side}.pt") for side in sides}
    theirs = results.get("diffusers")
    print(f"\n{args.size}x{args.size}, {args.steps} Euler steps, CFG 7, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads{', after a warm-up generation' if args.warmup else ''}")
    ours = [s for s in sides if s != "diffusers"]
    print(f"{'':<26}" + "".join(f"{s:>14}" for s in sides) + ("".join(f"{s + '/diff.':>18}" for s in ours)
                                                               if theirs else ""))
    rows = [("text encoding (s)", "encode_s", 1), ("UNet step with CFG (s)", "step_s", 1),
            ("UNet step, mean (s)", "mean_step_s", 1),
            ("VAE decode (s)", "decode_s", 1), (f"{args.steps}-step generation (s)", "total_s", 1),
            ("load (s)", "load_s", 1), ("peak RSS (GB)", "peak_bytes", 1e9)]
    if "cuda_peak_bytes" in results[sides[0]]:
        rows.append(("peak CUDA memory (GB)", "cuda_peak_bytes", 1e9))
    for label, key, scale in rows:
        line = f"{label:<26}" + "".join(f"{results[s][key] / scale:>14.2f}" for s in sides)
        if theirs:
            line += "".join(f"{results[s][key] / theirs[key]:>18.2f}" for s in ours)
        print(line)
    if theirs:
        for side in ours:
            # in [0, 1] units and in 8-bit pixel levels (as the PNG stores them)
            diff = (images[side] - images["diffusers"]).abs() / 2
            levels = ((images[side] / 2 + 0.5).clamp(0, 1).mul(255).round()
                      - (images["diffusers"] / 2 + 0.5).clamp(0, 1).mul(255).round()).abs()
            print(f"{side} image - diffusers': max {diff.max():.2e}, mean {diff.mean():.2e} "
                  f"(8-bit levels: max {levels.max():.0f}, mean {levels.mean():.2f})")


if __name__ == "__main__":
    main()
