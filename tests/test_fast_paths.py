"""Exact rewrites for speed and memory: the Upsample's phase decomposition, the FeedForward's token chunks, the
CPU's packed weights."""
import sys

import pytest
import torch
import torch.nn.functional as F

from sdtorch.models import packed
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
    for a, b in zip(g_out, g_ref, strict=True):  # trainable through the kernel folding
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
                    torch.autograd.grad(whole, [x, ff.net[0].proj.weight], grad), strict=True):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_the_fast_forms_run_on_the_cpu_only(monkeypatch):
    """Both rewrites were measured on the CPU alone; on another device (here "meta", which any torch has) the plain
    forms run: the nearest-upsampled 3x3 conv, and the FeedForward on all tokens at once."""
    from sdtorch.models import upsample
    from sdtorch.models.attention import FeedForward

    phases = []
    monkeypatch.setattr(upsample, "upsample_conv", lambda x, conv, kept: phases.append(x.device.type) or conv(
        F.interpolate(x, scale_factor=2.0, mode="nearest")))
    up = Upsample(4)
    for device in ("cpu", "meta"):
        assert up.to(device)(torch.zeros(1, 4, 3, 5, device=device)).shape == (1, 4, 6, 10)
    assert phases == ["cpu"]
    ff = FeedForward(8)
    ff.whole_bytes, ff.chunk_bytes = 0, 1024  # rows of 256 bytes: chunks of 4 tokens
    calls = []
    ff.net.register_forward_hook(lambda module, args, out: calls.append(args[0].device.type))
    for device in ("cpu", "meta"):
        ff.to(device)(torch.zeros(1, 10, 8, device=device))
    assert calls == ["cpu"] * 3 + ["meta"]


needs_onednn = pytest.mark.skipif(not packed.available(), reason="this PyTorch has no oneDNN")


def _packs(model: torch.nn.Module) -> list:
    return [m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__]


@needs_onednn
@pytest.mark.parametrize("linear_proj", [False, True], ids=["sd1", "sd2-linear-proj"])
def test_packed_weights_equal_the_plain_layers(linear_proj):
    """In the block every Linear and Conv2d runs oneDNN on a weight packed at its first call (at one input size,
    reused at others); the results differ from the plain layers' by rounding only; after it the layers are plain.
    SD 2.x's Linear proj_in takes a transposed (non-contiguous) view."""
    import dataclasses

    from conftest import TINY
    from reference import randomize_
    from sdtorch.models.unet import UNet

    torch.manual_seed(0)
    unet = randomize_(UNet(dataclasses.replace(TINY.unet, use_linear_in_transformer=linear_proj)), seed=1).eval()
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    inputs = [(torch.randn(2, 4, 16, 24), torch.tensor([500.0, 20.0]), torch.randn(2, 7, 32)),
              (torch.randn(1, 4, 8, 8), torch.tensor([999.0]), torch.randn(1, 77, 32))]
    with torch.no_grad():
        plain = [unet(*args) for args in inputs]
        with packed.packed_weights(unet, duplicates_ok=True):  # weights in ordinary memory: packed only when told
            packs = _packs(unet)
            outs = [unet(*args) for args in inputs]
            was_packed = [p.packed is not None for p in packs]
        assert not _packs(unet) and all(p.packed is None for p in packs)  # the packs are freed
        # plain again, bit for bit
        assert all(torch.equal(unet(*args), ref) for args, ref in zip(inputs, plain, strict=True))
    assert len(packs) == len(layers)
    upsample_convs = {id(m.conv) for m in unet.modules() if isinstance(m, Upsample)}  # they fold their own kernels
    assert was_packed == [id(p.layer) not in upsample_convs for p in packs]
    for out, ref in zip(outs, plain, strict=True):
        # fp32: oneDNN's kernels sum in another order than MKL's; ~1e-6 relative per layer, through ~40 layers
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


@needs_onednn
def test_packed_weights_step_aside_for_autograd():
    from conftest import tiny_models

    unet = tiny_models().unet
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, 32)
    with packed.packed_weights(unet, duplicates_ok=True):
        unet(x, t, ctx).square().mean().backward()  # the packed ops have no gradients: the plain ones run
        assert all(p.packed is None for p in _packs(unet))
    assert all(p.grad is not None for p in unet.out.parameters())


@needs_onednn
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pagemap and madvise are Linux's")
def test_a_pack_replaces_a_mapped_weight_and_never_duplicates_one_in_ram(tmp_path):
    """RAM holds one copy of a weight: a memory-mapped original gives its pages back once packed; a weight in
    ordinary memory (nothing to give back) stays unpacked, and its layer runs the plain op."""
    from sdtorch.checkpoint.formats import SafetensorsFile, write_safetensors
    from sdtorch.memory import resident_file_bytes

    torch.manual_seed(0)
    mapped, ordinary = torch.nn.Linear(512, 256), torch.nn.Linear(512, 256)
    write_safetensors({"weight": mapped.weight.detach().clone()}, tmp_path / "w.safetensors", {})
    reader = SafetensorsFile(tmp_path / "w.safetensors")
    mapped.weight = torch.nn.Parameter(reader.tensors()["weight"].load(torch.float32, torch.device("cpu")))
    reader.close()
    model = torch.nn.Sequential(mapped, ordinary)
    x = torch.randn(3, 512)
    with torch.no_grad():
        ref = mapped(x), ordinary(x)
        assert resident_file_bytes([mapped.weight]) > 0  # read by the plain layer
        with packed.packed_weights(model):
            out = mapped(x), ordinary(x)
            assert resident_file_bytes([mapped.weight]) == 0
            assert mapped.forward.packed is not None and ordinary.forward.packed is None
    assert ((out[0] - ref[0]).abs().max() / ref[0].abs().max()).item() < 1e-5
    assert torch.equal(out[1], ref[1])


@needs_onednn
def test_a_lora_merged_weight_is_packed_and_dropped(monkeypatch):
    """A weight that carries a LoRA merge (ordinary memory, `.original` the layer's own tensor; sdtorch/lora.py) is
    packed, then the layer holds its original again: the pack computes the merged layer, and running the layer
    plainly inside the block (where the LoRA is only in the pack) is refused instead of silently dropping it. The
    dropped merged weights' memory goes back to the OS once TRIM_EVERY bytes of them are freed (else the heap keeps
    it beside the packs: +0.5 GB peak on the SD 1.5 size, measured)."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 32))
    layer, second = layers
    x = torch.randn(5, 64)
    for one in layers:
        original = one.weight
        merged = torch.nn.Parameter(original.detach() + 0.1 * torch.randn(original.shape), requires_grad=False)
        merged.original = original
        one._parameters["weight"] = merged
    original = layer.weight.original
    trims = []
    monkeypatch.setattr(packed.memory, "trim_heap", lambda: trims.append(1) or True)
    monkeypatch.setattr(packed, "TRIM_EVERY", 32 * 64 * 4 + 1)  # more than the first weight, less than both
    monkeypatch.setattr(packed, "_untrimmed", 0)
    with torch.no_grad():
        ref = layer(x)
        with packed.packed_weights(layers):
            out = layer(x)
            assert layer.weight is original and layer.forward.carries_merge and not trims
            second(out)
            assert trims == [1]
            assert torch.allclose(layer(x), out)  # the pack again, not the original
            with torch.enable_grad(), pytest.raises(RuntimeError, match="LoRA"):
                layer(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5  # rounding of oneDNN's kernel only


def test_in_a_packed_loop_the_upsampling_folds_its_kernels_once(monkeypatch):
    """Inside packed_weights the folded upsampling keeps its phase kernels (per dtype) for the loop instead of folding
    them at every call: the same result, and nothing kept after the block or while autograd records."""
    from sdtorch.models import upsample

    up = Upsample(16).eval()
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 1), up)  # (packed_weights keeps kernels beside packs)
    x = torch.randn(1, 16, 6, 6)
    want = up(x)
    folds = []
    fold = upsample.phase_kernels
    monkeypatch.setattr(upsample, "phase_kernels", lambda *a: folds.append(1) or fold(*a))
    with torch.no_grad(), packed.packed_weights(model, duplicates_ok=True):
        outs = [up(x) for _ in range(3)]
    assert len(folds) == 1 and all(torch.equal(out, want) for out in outs)
    assert up.kept_kernels is None
    with packed.packed_weights(model, duplicates_ok=True):
        up(x.requires_grad_()).sum().backward()
        up(x)
    assert len(folds) == 3  # with gradients: folded at each call, never kept
