"""What an approximate setting buys and costs: one txt2img generation with it against the exact one, the same seed,
model and settings otherwise; time (the whole call) and the image's difference to the exact image. A mode is txt2img
settings, or dtype=bf16/fp16: the same file loaded again to compute in that precision (sdtorch.load's dtype).

    python benchmarks/bench_approx.py --mode ngms=1 --mode ngms=1,ngms_all_steps=1 --mode dtype=bf16 [--sd15]
                                      [--size 512] [--steps 20] [--rounds 2] [--sampler "DPM++ 2M"]

The exact generation and each mode take turns, round after round, in one process (so they see the same machine);
one untimed warm-up of each comes first. Reported per mode: the median time ratio to exact with its min-max over
rounds, the max / mean absolute pixel difference (0-255) to the exact image, and the relative difference of the final
latents (random weights decode to flat images, where only the latents tell). The built-in model by default; --sd15
writes random SD 1.5-size weights (4.3 GB) as bench_serve.py does. A benchmark, never a test.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import sdtorch  # noqa: E402
from sdtorch import memory  # noqa: E402

PROMPT = "a blue circle at the top and an orange triangle at the bottom on a white background"


def parse_mode(text: str) -> dict:
    """"ngms=1,ngms_all_steps=1" -> {"ngms": 1.0, "ngms_all_steps": True}."""
    mode = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        mode[key] = value if key == "dtype" else True if key.endswith("_steps") and value == "1" else float(value)
    return mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", action="append", required=True, help="KEY=VALUE[,KEY=VALUE]: txt2img settings")
    parser.add_argument("--sd15", action="store_true")
    parser.add_argument("--dir", help="where to write the SD 1.5 file (default: a temporary folder)")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="DPM++ 2M")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    memory.keep_freed_blocks()  # as the command line runs
    modes = {"exact": {}, **{text: parse_mode(text) for text in args.mode}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.sd15:
            from bench_serve import sd15_file
            model = sd15_file(Path(tmp))
        else:
            model = sdtorch.BUILTIN_MODEL
        pipe = sdtorch.load(model, tune_allocator=True)
        pipes = {name: sdtorch.load(model, dtype=mode.pop("dtype"), tune_allocator=True) if "dtype" in mode else pipe
                 for name, mode in modes.items()}
        size = args.size or pipe.config.resolution
        settings = dict(steps=args.steps, sampler=args.sampler, cfg=7.0, seed=1, width=size, height=size)
        times = {name: [] for name in modes}
        images, latents = {}, {}
        for round_ in range(-1, args.rounds):
            for name in list(modes)[:: 1 if round_ % 2 else -1]:
                last = []
                start = time.perf_counter()
                keep = lambda step, total, x, sigma, last=last: last.append(x)  # noqa: E731 — the final latents
                image = pipes[name].txt2img(PROMPT, **settings, **modes[name], callback=keep)[0]
                if round_ >= 0:
                    times[name].append(time.perf_counter() - start)
                images[name], latents[name] = np.asarray(image, dtype=np.float64), last[-1].double()
            if round_ >= 0:
                print(f"round {round_}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    from machine import describe

    print(describe())
    exact = statistics.median(times["exact"])
    print(f"{'SD 1.5 random' if args.sd15 else 'built-in'} {size}x{size}, {args.steps} steps {args.sampler}, CFG 7, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads; exact: median {exact:.2f} s")
    for name in list(modes)[1:]:
        ratios = [t / e for t, e in zip(times[name], times["exact"], strict=True)]
        diff = np.abs(images[name] - images["exact"])
        latent = ((latents[name] - latents["exact"]).norm() / latents["exact"].norm()).item()
        print(f"{name}: time {statistics.median(ratios):.3f}x exact ({min(ratios):.3f}-{max(ratios):.3f}), "
              f"pixel difference max {diff.max():.0f}, mean {diff.mean():.2f} (0-255), latents {latent:.3f} relative")


if __name__ == "__main__":
    main()
