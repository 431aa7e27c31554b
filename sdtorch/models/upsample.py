"""The UNet's and the VAE's `Upsample`: 2x nearest-neighbour upsampling, then a 3x3 convolution — computed without
making the upsampled image.

Output pixel (2i+a, 2j+b) of conv3x3(nearest2x(x)) reads upsampled rows 2i+a-1 .. 2i+a+1, which are input rows
(i-1, i, i) for a = 0 and (i, i, i+1) for a = 1 (columns alike). So each of the four output phases (a, b) is a 2x2
convolution of x itself, whose taps are sums of the 3x3 kernel's taps that land on the same input pixel. Four 2x2
convolutions at the input's size do 16 multiply-adds per weight and input pixel where the 3x3 one on the 4x larger
image does 36: 2.25x less work for the same result (up to rounding), and no 4x-sized intermediate.

The plain form, `conv(interpolate(x))`, stays the reference and runs everywhere but the CPU: the phases were measured
faster on the CPU only (docs/performance.md), and tests hold the two forms equal.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .stored import weight_of


# ROWS[a][p][r] = 1 when row r of the 3x3 kernel lands on row p of phase a's 2x2 kernel: (r0, r1+r2), (r0+r1, r2)
ROWS = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1.0, 1, 0], [0, 0, 1]]])
# TAPS[(a, b, p, q), (r, s)]: the same for both axes at once, 16 phase taps from 9 kernel taps
TAPS = torch.einsum("apr,bqs->abpqrs", ROWS, ROWS).reshape(16, 9)


@functools.cache
def taps_on(device: torch.device) -> torch.Tensor:
    """TAPS transposed, on `device`: copied there once, not at every call (a host-to-GPU copy waits for the GPU).
    Made outside inference mode, so that training can use it after a sampling preview."""
    with torch.inference_mode(False):
        return TAPS.T.to(device)


def phase_kernels(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(O, I, 3, 3) kernel -> (2, 2, O, I, 2, 2) in `dtype` (default: the weight's): [a][b] is the 2x2 kernel of
    output phase (row a, column b).
    One matrix product folds every phase's taps (in fp32 even for fp16 weights): it runs at every call, and for the
    UNet's 1280-wide convs it is ~3x faster than summing and stacking the taps one by one (~50 vs ~140 ms)."""
    o, i = weight.shape[:2]
    folded = weight.float().reshape(o * i, 9) @ taps_on(weight.device)  # (O·I, 16): taps (a, b, p, q)
    return folded.to(dtype or weight.dtype).view(o, i, 2, 2, 2, 2).permute(2, 3, 0, 1, 4, 5)


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d, kept: dict | None = None) -> torch.Tensor:
    """conv(interpolate(x, scale_factor=2, mode="nearest")) for a 3x3, padding-1 `conv`; keeps x's memory format.
    `kept`: a dict where the phase kernels are kept by dtype and taken from at later calls (inference only)."""
    b, _, h, w = x.shape
    kernels = kept.get(x.dtype) if kept is not None else None
    if kernels is None:
        kernels = phase_kernels(weight_of(conv, torch.float32), x.dtype)  # x's dtype: a stored fp16 or q8 weight's too
        if kept is not None and not torch.is_grad_enabled():
            kept[x.dtype] = kernels
    padded = F.pad(x, (1, 1, 1, 1))
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out_channels = conv.out_channels
    # the four phases are written interleaved into one tensor that views as (B, C, 2H, 2W)
    out = x.new_empty((b, h, 2, w, 2, out_channels) if nhwc else (b, out_channels, h, 2, w, 2))
    for a in (0, 1):
        for c in (0, 1):
            phase = F.conv2d(padded[:, :, a:a + h + 1, c:c + w + 1], kernels[a, c], conv.bias)
            if nhwc:
                out[:, :, a, :, c, :] = phase.permute(0, 2, 3, 1)
            else:
                out[:, :, :, a, :, c] = phase
    if nhwc:
        return out.view(b, 2 * h, 2 * w, out_channels).permute(0, 3, 1, 2)
    return out.view(b, out_channels, 2 * h, 2 * w)


class Upsample(nn.Module):
    """2x nearest upsampling + 3x3 conv (keys: conv.*). `size` (the UNet's matching skip) other than exactly 2x, for
    latents whose sides are not multiples of 8 (as ComfyUI and diffusers allow), upsamples to that size first."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.kept_kernels = None  # a dict while packed.packed_weights keeps the phase kernels for a sampling loop

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        doubled = (2 * x.shape[2], 2 * x.shape[3])
        size = doubled if size is None else tuple(size)
        if x.device.type == "cpu" and size == doubled:
            # the same map as the line below, computed in four phases
            return upsample_conv(x, self.conv, self.kept_kernels)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B, C, H, W) -> (B, C, 2H, 2W)
