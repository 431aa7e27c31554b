"""The SD 1.5 UNet step with CFG against the CPU engines users compare with, on the same random weights, in alternation.

    python benchmarks/bench_peers.py [--rounds 5] [--size 512] [--dir DIR] [--sides sdtorch,sdtorch-bf16,...]

Sides (each its own process, loaded one after the other, then asked for one UNet call with CFG (batch 2, the same
latents, timestep and context) in turn, round after round):
  sdtorch            exact fp32, packed weights (models/packed.py), as the pipeline's sampling loop runs it
  sdtorch-bf16       sdtorch.load(dtype="bf16"): the UNet's weights and activations in bfloat16, its weights packed
                     in bf16 where oneDNN has bf16 kernels
  sdtorch-q8         sdtorch.load(weights="q8"): int8 weights with block scales, dequantized per layer, fp32 compute
  sdtorch-q8-bf16    q8 weights, bf16 compute
  sdtorch-tome       exact fp32 with A1111's token merging at ratio 0.5 (models/token_merging.py)
  diffusers          UNet2DConditionModel in fp32 from the same file, with sdtorch's allocator setting
  openvino-f32       OpenVINO (pip's `openvino`) compiling diffusers' UNet, INFERENCE_PRECISION_HINT f32
  openvino           the same with OpenVINO's default precision for this CPU (bf16 where the CPU has it)
OpenVINO and diffusers are benchmark-only: a side whose package is missing is skipped. Each side's output for the
fixed input is compared with exact sdtorch's (max |diff| / max |exact|): the precision each mode gives up.
Reported: each side's median step, the per-round ratio to diffusers (median, min-max), and that difference. The CPU
is printed first (benchmarks/machine.py). OpenVINO's conversion peaks at ~10 GB: on a 24 GB machine run each
OpenVINO side in its own run beside sdtorch (--sides sdtorch,openvino-f32). A benchmark, never a test.
"""
import argparse
import contextlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

SIDES = ("sdtorch", "sdtorch-bf16", "diffusers", "openvino-f32", "openvino")  # the default; more above
NEEDS = {"diffusers": "diffusers", "openvino-f32": "openvino", "openvino": "openvino"}


def inputs(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, size // 8, size // 8, generator=g), torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, 768, generator=g))


def load_side(side: str, path: str, size: int):
    """A function running one UNet call with CFG on the fixed inputs, returning the output as float32."""
    import sdtorch
    from sdtorch import memory

    if not side.startswith("openvino"):  # (OpenVINO allocates its own; the torch model it came from must leave RAM)
        memory.keep_freed_blocks()  # sdtorch's allocator setting, for the torch sides
    x, t, context = inputs(size)
    if side == "diffusers" or side.startswith("openvino"):
        from safetensors.torch import load_file

        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from reference import diffusers_unet
        from sdtorch.config import SD1

        unet = diffusers_unet(load_file(path), SD1)  # diffusers' own single-file converter
        if side == "diffusers":
            return lambda: unet(x, t, encoder_hidden_states=context).sample
        return openvino_unet(unet, side, (x, t, context))
    pipe = sdtorch.load(path, device="cpu", dtype="bf16" if side.endswith("-bf16") else None, tune_allocator=True,
                        weights="q8" if side.startswith("sdtorch-q8") else None)
    from sdtorch.models.packed import packed_weights
    from sdtorch.models.token_merging import token_merging

    stack = contextlib.ExitStack()
    stack.enter_context(packed_weights(pipe.unet))  # packs at the first (untimed) call; q8 runs plain
    stack.enter_context(token_merging(pipe.unet, 0.5 if side == "sdtorch-tome" else 0.0))
    unet = pipe.unet

    def call():
        return unet(x, t, context).float()
    call.packing = stack  # held as long as the side runs: a collected block would unpack
    return call


def openvino_unet(unet, side: str, example: tuple):
    """diffusers' UNet converted by OpenVINO (as optimum-intel exports SD 1.5; sdtorch's own CPU paths, the folded
    upsampling and the chunked feed-forward, are not traceable), compiled for the CPU at f32 or at its default."""
    import openvino as ov

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, context):
            return self.unet(x, t, encoder_hidden_states=context).sample

    with torch.no_grad():
        model = ov.convert_model(Plain().eval(), example_input=example)
    config = {"INFERENCE_PRECISION_HINT": "f32"} if side == "openvino-f32" else {}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    arrays = [a.numpy() for a in example]
    return lambda: torch.from_numpy(request.infer(arrays)[0].copy())


def child(side: str, path: str, size: int, out: str) -> None:
    """Load, then answer each "step" line on stdin with the seconds of one UNet call; the first output goes to `out`."""
    call = load_side(side, path, size)
    with torch.inference_mode():
        # untimed, before "ready" (so not beside the next side's load): packing, compilation caches, first touch
        np.save(out, call().float().numpy())
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            start = time.perf_counter()
            call()
            print(time.perf_counter() - start, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dir", help="where to write the 4.3 GB of weights (default: a temporary folder)")
    parser.add_argument("--file", help="an SD 1.5-size .safetensors to use instead of writing one")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, path, size, out = args.child
        child(side, path, int(size), out)
        return
    print(describe(), flush=True)
    sides = [s for s in args.sides.split(",") if s not in NEEDS or importlib.util.find_spec(NEEDS[s])]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, contextlib.ExitStack() as logs:
        if args.file:
            path = Path(args.file)
        else:
            from bench_serve import sd15_file
            path = sd15_file(Path(tmp))
        procs = {}
        for side in sides:  # loaded one after the other, so the loads do not compete
            procs[side] = subprocess.Popen([sys.executable, __file__, "--child", side, str(path), str(args.size),
                                            str(Path(tmp) / f"{side}.npy")], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True,
                                           stderr=logs.enter_context(open(Path(tmp) / f"{side}.err", "w")))
            if procs[side].stdout.readline().strip() != "ready":
                sys.exit(f"{side} failed to load")

        def step(side: str) -> float:
            try:
                procs[side].stdin.write("step\n")
                procs[side].stdin.flush()
                return float(procs[side].stdout.readline())
            except (BrokenPipeError, ValueError):
                sys.exit(f"{side} stopped: {(Path(tmp) / f'{side}.err').read_text()[-2000:]}")

        times = {side: [] for side in sides}
        for i in range(args.rounds):
            for side in (sides if i % 2 == 0 else sides[::-1]):
                times[side].append(step(side))
            print(f"round {i + 1}: " + ", ".join(f"{s} {t[-1]:.2f} s" for s, t in times.items()), flush=True)
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
        outputs = {side: np.load(Path(tmp) / f"{side}.npy") for side in sides}
    print(f"\n{args.size}x{args.size} UNet step with CFG (batch 2), random SD 1.5 weights, {args.rounds} alternating "
          f"rounds")
    exact = outputs.get("sdtorch")
    for side in sides:
        line = f"{side}: median {statistics.median(times[side]):.2f} s"
        if "diffusers" in times:
            ratios = [a / b for a, b in zip(times[side], times["diffusers"], strict=True)]
            line += f", ratio to diffusers {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        if exact is not None:
            line += f", output vs exact sdtorch {np.abs(outputs[side] - exact).max() / np.abs(exact).max():.1e}"
        print(line)


if __name__ == "__main__":
    main()
