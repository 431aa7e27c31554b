"""Can fp32-accurate convolutions and matrix products run faster through bf16 kernels? (A tried idea, not kept.)

    python benchmarks/bench_bf16x3.py

Split each fp32 operand into a bf16 "high" part and a bf16 "low" remainder (x = xh + xl); then
x·w ≈ xh·wh + xl·wh + xh·wl, three bf16 products whose sum keeps ~16 of fp32's 24 mantissa bits (the dropped
xl·wl term is ~2^-16 relative). PyTorch's CPU bf16 ops round their output to bf16, which would lose what the split
gains, so the products run as fp32 ops whose operands are exactly bf16 values, with oneDNN told it may compute fp32
in bf16 (`torch.backends.mkldnn.*.fp32_precision = "bf16"`): conversion is then exact and the result stays fp32.
The three products run as one op over concatenated operands ("cat") or as three ops ("sep").
Printed per shape (the SD 1.5 UNet's 3x3 convs at 512x512 and its linear layers, batch 2): the time of plain
fp32, of the split, and of one plain bf16-precision pass, each with its max error relative to a float64 result.
On a CPU without native bf16 kernels the bf16 paths are far slower still. Never a test.
"""
import time

import torch
import torch.nn.functional as F

MKLDNN = torch.backends.mkldnn


def best_of(fn, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low), both fp32 tensors holding bf16 values, high + low ≈ t to ~2^-16."""
    high = t.bfloat16().float()
    return high, (t - high).bfloat16().float()


def error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


def report(name: str, fp32, split3_cat, split3_sep, one_pass, ref) -> None:
    MKLDNN.conv.fp32_precision = MKLDNN.matmul.fp32_precision = "none"
    t32, e32 = best_of(fp32), error(fp32(), ref)
    MKLDNN.conv.fp32_precision = MKLDNN.matmul.fp32_precision = "bf16"
    try:
        rows = [(label, best_of(fn), error(fn(), ref)) for label, fn in
                (("split, cat", split3_cat), ("split, sep", split3_sep), ("one bf16 pass", one_pass)) if fn]
    finally:
        MKLDNN.conv.fp32_precision = MKLDNN.matmul.fp32_precision = "none"
    parts = "  ".join(f"{label} {t * 1e3:.1f} ms ({t / t32:.2f}x, err {e:.1e})" for label, t, e in rows)
    print(f"{name:<24} fp32 {t32 * 1e3:.1f} ms (err {e32:.1e})  {parts}", flush=True)


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    for channels, side in ((320, 64), (640, 32), (1280, 16)):
        x = torch.randn(2, channels, side, side).contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, channels, 3, 3) / (channels * 9) ** 0.5
        ref = F.conv2d(x.double(), w.double(), padding=1).float()
        wh, wl = split(w)
        w3 = torch.cat([wh, wh, wl], 1).contiguous(memory_format=torch.channels_last)

        def cat(x=x, w3=w3):
            xh, xl = split(x)
            return F.conv2d(torch.cat([xh, xl, xh], 1), w3, padding=1)

        def sep(x=x, wh=wh, wl=wl):
            xh, xl = split(x)
            return F.conv2d(xh, wh, padding=1) + F.conv2d(xl, wh, padding=1) + F.conv2d(xh, wl, padding=1)

        def plain(x=x, w=w):
            return F.conv2d(x, w, padding=1)

        report(f"conv3x3 {channels}ch {side}x{side}", plain, cat, sep, plain, ref)
    for m, k, n in ((8192, 320, 320), (8192, 320, 2560), (2048, 1280, 5120)):
        a, b = torch.randn(m, k), torch.randn(k, n) / k ** 0.5
        ref = (a.double() @ b.double()).float()
        bh, bl = split(b)
        b3 = torch.cat([bh, bh, bl], 0)

        def cat(a=a, b3=b3):
            ah, al = split(a)
            return torch.cat([ah, al, ah], 1) @ b3

        def plain(a=a, b=b):
            return a @ b

        report(f"matmul {m}x{k}x{n}", plain, cat, None, plain, ref)


if __name__ == "__main__":
    main()
