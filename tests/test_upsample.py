"""The Upsample's phase decomposition equals nearest-2x upsampling followed by the 3x3 convolution."""
import pytest
import torch
import torch.nn.functional as F

from sdtorch.models.upsample import Upsample


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 6, 1, 1), (1, 6, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_equals_interpolate_then_conv(shape, channels_last):
    torch.manual_seed(0)
    up = Upsample(6)
    x = torch.randn(shape, requires_grad=True)
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out = up(xin)
    assert out.shape == ref.shape
    if shape[2] * shape[3] > 1:  # a 1x1 image is both layouts at once
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # fp32: the 2x2 kernels' taps are sums of the 3x3's, so rounding differs in the last bits
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-6
    grad = torch.randn(ref.shape)
    g_ref = torch.autograd.grad(ref, [x, up.conv.weight, up.conv.bias], grad)
    g_out = torch.autograd.grad(out, [x, up.conv.weight, up.conv.bias], grad)
    for a, b in zip(g_out, g_ref):  # trainable through the kernel folding
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_upsample_to_an_odd_skip_size():
    torch.manual_seed(0)
    up = Upsample(4)
    x = torch.randn(1, 4, 5, 7)
    ref = up.conv(F.interpolate(x, size=(11, 14), mode="nearest"))
    assert torch.equal(up(x, size=torch.Size((11, 14))), ref)
