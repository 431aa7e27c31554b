"""SDXL base at 1024x1024 on the CPU, from an fp16 single file as people download it: sdtorch against diffusers,
each in its own process (its own peak RSS), the two taking turns round after round.

    python benchmarks/bench_sdxl.py [--dir DIR] [--rounds 1] [--size 1024]

Random SDXL-size weights are written once as an fp16 single file in the original layout (6.9 GB), and converted by
`sdtorch convert --to-diffusers` into a diffusers folder, which diffusers loads with from_pretrained (fp32, as it
runs on a CPU; its from_single_file would read the whole file into RAM first and asks the hub for configs). Each side:
load, one txt2img of two Euler steps with CFG 7 (two UNet calls of batch 2), VAE decode. Reported per side: load
time, the first UNet call (sdtorch packs its weights for oneDNN there, models/packed.py), the second (a step as every
later step runs), the whole txt2img call, and the process's peak RSS. A benchmark, never a test.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # machine.py
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
STEPS = 2


def make_files(folder: Path) -> tuple[Path, Path]:
    """The fp16 single file (random weights of std 0.02, norms' scales 1 and biases 0) and its diffusers folder."""
    from sdtorch.checkpoint import convert, save_checkpoint
    from sdtorch.config import SDXL
    from sdtorch.models import StableDiffusionModels

    with torch.device("meta"):
        models = StableDiffusionModels(SDXL).to(torch.float16)
    models.to_empty(device="cpu")  # 6.9 GB, filled below (the models have no buffers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in models.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    path = folder / "sdxl-random-fp16.safetensors"
    save_checkpoint(models, path)
    del models
    return path, convert(path, folder / "sdxl-diffusers", to_diffusers=True)


def unet_timer(unet, times: list) -> None:
    """Record the wall time of every UNet call (forward pre- and post-hooks)."""
    unet.register_forward_pre_hook(lambda *_: times.append(-time.perf_counter()))
    unet.register_forward_hook(lambda *_: times.__setitem__(-1, times[-1] + time.perf_counter()))


def child(side: str, file: str, folder: str, size: int) -> dict:
    start = time.perf_counter()
    unet_calls = []
    if side == "sdtorch":
        import sdtorch

        pipe = sdtorch.load(file, tune_allocator=True)
        loaded = time.perf_counter()
        unet_timer(pipe.unet, unet_calls)
        pipe.txt2img(PROMPT, steps=STEPS, cfg=7.0, sampler="Euler", seed=0, width=size, height=size)
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        from sdtorch import memory

        memory.keep_freed_blocks()  # the allocator setting sdtorch's command line uses, for an even comparison
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        loaded = time.perf_counter()
        unet_timer(pipe.unet, unet_calls)
        pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.0, height=size, width=size,
             generator=torch.Generator().manual_seed(0))
    done = time.perf_counter()
    return {"load_s": loaded - start, "unet_first_s": unet_calls[0], "unet_step_s": unet_calls[1],
            "txt2img_s": done - loaded,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write the weights (default: a temporary folder)")
    parser.add_argument("--files", help="a folder from an earlier run (sdxl-random-fp16.safetensors, sdxl-diffusers)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, file, folder, size = args.child
        print(json.dumps(child(side, file, folder, int(size))))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.files:
            file, folder = Path(args.files) / "sdxl-random-fp16.safetensors", Path(args.files) / "sdxl-diffusers"
        else:
            file, folder = make_files(Path(tmp))
        results = {"sdtorch": [], "diffusers": []}
        for round_ in range(args.rounds):
            for side in list(results)[:: 1 if round_ % 2 == 0 else -1]:
                out = subprocess.run([sys.executable, __file__, "--child", side, str(file), str(folder),
                                      str(args.size)], capture_output=True, text=True)
                if out.returncode:
                    print(side, "failed:", out.stderr[-2000:], flush=True)
                    continue
                results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(side, results[side][-1], flush=True)
    from machine import describe

    print(describe())
    print(f"SDXL base, random weights from an fp16 file, {args.size}x{args.size}, {STEPS} Euler steps with CFG, "
          f"{torch.get_num_threads()} threads, {args.rounds} round(s); median per side")
    for side, runs in results.items():
        if runs:
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{side:>9}: load {med['load_s']:.1f} s, first UNet call {med['unet_first_s']:.1f} s, "
                  f"UNet step {med['unet_step_s']:.1f} s, "
                  f"txt2img {med['txt2img_s']:.1f} s, peak RSS {med['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
