"""Exact rewrites for speed and memory: the Upsample's phase decomposition, the FeedForward's token chunks."""
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


def test_feed_forward_in_chunks_equals_whole():
    """The FeedForward's token chunking (for large latents) changes only the rounding, and trains the same."""
    from sdtorch.models.attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(32)
    x = torch.randn(2, 300, 32, requires_grad=True)
    whole = ff(x)
    ff.whole_bytes, ff.chunk_bytes = 0, 64 * 1024  # rows of 1 KB (256 fp32 hidden values): 9 chunks of 64, one of 24
    chunked = ff(x)
    assert chunked.shape == whole.shape
    assert ((chunked - whole).abs().max() / whole.abs().max()).item() < 1e-6
    grad = torch.randn(whole.shape)
    for a, b in zip(torch.autograd.grad(chunked, [x, ff.net[0].proj.weight], grad),
                    torch.autograd.grad(whole, [x, ff.net[0].proj.weight], grad)):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
