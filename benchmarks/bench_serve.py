"""The server's cost per request: `sdtorch serve` answering POST /sdapi/v1/txt2img, against calling
`pipe.txt2img` directly in this process, with the same model, settings and thread count.

    python benchmarks/bench_serve.py [--rounds 8] [--steps 20]             # the built-in model, 64x64
    python benchmarks/bench_serve.py --sd15 --size 512 --steps 4 --rounds 3  # random SD 1.5 weights (4.3 GB file)
    python benchmarks/bench_serve.py --threads 1   # on a machine shared with other work

The two sides take turns, round after round, so both see the same machine; one untimed run of each comes first. The
server's time is the client's: JSON in, queue, worker, PNG + base64 out, JSON back. Reported: the median of each, and
the median of the per-round overhead (server / direct - 1). A benchmark, never a test.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import sdtorch  # noqa: E402
from sdtorch import memory  # noqa: E402
from serve_helpers import Server  # noqa: E402

PROMPT = "a large red circle in the center on a blue background"


def sd15_file(folder: Path) -> Path:
    """Random SD 1.5-size weights (fp32) as a single file."""
    from safetensors.torch import save_file

    from sdtorch.config import SD1
    from sdtorch.models import StableDiffusionModels

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in StableDiffusionModels(SD1).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    path = folder / "sd15-random.safetensors"
    save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sd15", action="store_true", help="random SD 1.5 weights instead of the built-in model")
    parser.add_argument("--dir", help="where to write the SD 1.5 file (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of both sides (on a busy machine 1 avoids OpenMP's barrier stalls)")
    args = parser.parse_args()
    # both sides tune malloc before any thread starts, as `sdtorch serve` does (sdtorch.memory.keep_freed_blocks)
    memory.keep_freed_blocks()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        model = sd15_file(Path(tmp)) if args.sd15 else sdtorch.BUILTIN_MODEL
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # the server's threads = ours
        server = Server("--model", model, auth=None, env=env, timeout=600)
        try:
            pipe = sdtorch.load(model, tune_allocator=True)  # as the server loads it
            settings = dict(steps=args.steps, cfg=7.0, sampler="Euler", width=args.size, height=args.size)
            body = {"prompt": PROMPT, "steps": args.steps, "cfg_scale": 7.0, "sampler_name": "Euler",
                    "width": args.size, "height": args.size}

            def direct(seed):
                pipe.txt2img(PROMPT, seed=seed, **settings)

            def served(seed):
                r = requests.post(server.url + "/sdapi/v1/txt2img", json={**body, "seed": seed}, timeout=3600)
                r.raise_for_status()

            ours, theirs = [], []
            for seed in range(-1, args.rounds):
                times = {}
                for name, run in (("direct", direct), ("server", served))[:: 1 if seed % 2 else -1]:
                    start = time.perf_counter()
                    run(max(seed, 0))
                    times[name] = time.perf_counter() - start
                if seed >= 0:  # round -1 warms both up
                    ours.append(times["direct"])
                    theirs.append(times["server"])
                    print(f"round {seed}: direct {times['direct']:.3f} s, server {times['server']:.3f} s", flush=True)
        finally:
            server.stop()
    overhead = [s / d - 1 for d, s in zip(ours, theirs, strict=True)]
    print(f"{'SD 1.5 random' if args.sd15 else 'built-in'} {args.size}x{args.size}, {args.steps} Euler steps, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads")
    print(f"direct pipe.txt2img: median {statistics.median(ours):.3f} s")
    print(f"server txt2img:      median {statistics.median(theirs):.3f} s")
    print(f"overhead per request: median {100 * statistics.median(overhead):+.1f}% "
          f"(range {100 * min(overhead):+.1f}% .. {100 * max(overhead):+.1f}%), "
          f"{1000 * (statistics.median(theirs) - statistics.median(ours)):+.0f} ms")


if __name__ == "__main__":
    main()
