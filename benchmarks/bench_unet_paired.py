"""The UNet step alone, sdtorch against diffusers, measured in alternation so that both see the same machine.

    python benchmarks/bench_unet_paired.py [--rounds 10] [--size 512] [--dir DIR]

bench_pipeline.py runs one side after the other; on a shared CPU their speed drifts by 5-10% between minutes, which
is as large as the differences it reports. Here each side loads the same random SD 1.5 weights the way
bench_pipeline.py does, in its own process (each keeps its own allocator settings), and the parent asks them for
one UNet call with CFG (batch 2, same latents, timestep and text context) in turn: ours, diffusers, diffusers, ours,
... Reported: each side's median step and the median of the per-round ratios. A benchmark, never a test.
"""
import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_load import make_files  # noqa: E402
from bench_pipeline import encode_prompts, load_pipeline  # noqa: E402


def child(side: str, path: str, config_dir: str, size: int) -> None:
    """Load, then answer each "step" line on stdin with the seconds of one UNet call."""
    pipe = load_pipeline(side, path, config_dir)
    cond, uncond = encode_prompts(side, pipe)
    context = torch.cat([uncond, cond])  # CFG's batch of 2, as both pipelines order it

    def call(x, t):
        if side == "ours":
            pipe.unet(x, t, context)
        else:
            pipe.unet(x, t, encoder_hidden_states=context)

    x = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    packing = contextlib.nullcontext()
    if side == "ours":  # as the pipeline's sampling loop runs it: packed at the first (untimed) call
        from sdtorch.models.packed import packed_weights

        packing = packed_weights(pipe.unet)
    print("ready", flush=True)
    with torch.inference_mode(), packing:
        for line in sys.stdin:
            if line.strip() != "step":
                break
            start = time.perf_counter()
            call(x, t)
            print(time.perf_counter() - start, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per side (after one untimed)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dir", help="where to write the 6.4 GB of weights (default: a temporary folder)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, path, config_dir, size = args.child
        child(side, path, config_dir, int(size))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        files = make_files(folder)
        procs = {}
        for side in ("ours", "diffusers"):  # loaded one after the other, so the loads do not compete
            procs[side] = subprocess.Popen(
                [sys.executable, __file__, "--child", side, str(files["fp32"]), str(folder / "config"),
                 str(args.size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if procs[side].stdout.readline().strip() != "ready":
                sys.exit(f"{side} failed to load")

        def step(side: str) -> float:
            procs[side].stdin.write("step\n")
            procs[side].stdin.flush()
            return float(procs[side].stdout.readline())

        for side in procs:
            step(side)  # untimed: first-call set-up
        times = {side: [] for side in procs}
        for i in range(args.rounds):
            for side in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
                times[side].append(step(side))
            print(f"round {i + 1}: ours {times['ours'][-1]:.2f} s, diffusers {times['diffusers'][-1]:.2f} s",
                  flush=True)
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"], strict=True)]
    print(f"\n{args.size}x{args.size} UNet step with CFG (batch 2), fp32 CPU, {torch.get_num_threads()} threads, "
          f"{args.rounds} alternating rounds")
    print(f"sdtorch median {statistics.median(times['ours']):.2f} s, diffusers median "
          f"{statistics.median(times['diffusers']):.2f} s; per-round ratio median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
