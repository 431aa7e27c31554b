"""An fp16 file computed in fp32 on the CPU: Linear/Conv2d weights stay as stored, memory-mapped (models/stored.py)."""
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import TINY, TINY_SDXL, tiny_models
from reference import randomize_
from sdtorch.checkpoint import load_checkpoint
from sdtorch.memory import resident_file_bytes
from sdtorch.models import StableDiffusionModels, packed
from sdtorch.models.upsample import Upsample
from sdtorch.pipeline import Pipeline, Settings
from sdtorch.tokenizer import CLIPTokenizer

GENERATE = dict(steps=3, seed=1, width=64, height=64, sampler="Euler a")
LINUX = sys.platform.startswith("linux")


def layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def fp16_file(tmp_path, cfg):
    import sdtorch

    models = tiny_models() if cfg is TINY else randomize_(StableDiffusionModels(cfg), seed=7).eval()
    path = tmp_path / "model-fp16.safetensors"
    sdtorch.save(Pipeline(models, CLIPTokenizer.default(), cfg, device="cpu"), path, dtype="fp16")
    return path


def cast_at_load(path) -> Pipeline:
    """The reference: every weight cast to fp32 while loading, as sdtorch did before keeping layers stored."""
    loaded = load_checkpoint(path, dtype=torch.float32)
    pipe = Pipeline(loaded.models, loaded.tokenizer, loaded.config, device="cpu")
    pipe.release_idle_weights = False  # plain ops, no packing
    return pipe


@torch.no_grad()
@pytest.mark.parametrize("cfg", [TINY, TINY_SDXL], ids=["sd1", "sdxl"])
def test_an_fp16_file_computes_in_fp32_with_its_layer_weights_kept_as_stored(tmp_path, cfg):
    import sdtorch

    path = fp16_file(tmp_path, cfg)
    pipe = sdtorch.load(path, device="cpu")
    assert pipe.dtype == torch.float32
    kept = {id(m.weight) for m in layers(pipe.models)}
    for name, p in pipe.models.named_parameters():
        assert p.dtype == (torch.float16 if id(p) in kept else torch.float32), name
    folded = {id(m.conv) for m in pipe.unet.modules() if isinstance(m, Upsample)}  # never called: folds its kernel
    unet_layers = [m for m in layers(pipe.unet) if id(m) not in folded]
    packs_at_step = []

    def look(step, total, latents, sigma):
        packs_at_step.append(sum(getattr(m.__dict__.get("forward"), "packed", None) is not None for m in unet_layers))

    settings = Settings("a red circle", **GENERATE)
    pixels = pipe.run(settings, callback=look)
    # fp16 -> fp32 is exact: only the packed kernels' rounding differs (~1e-6 relative per layer); pixels in [-1, 1]
    assert (pixels - cast_at_load(path).run(settings)).abs().max().item() < 1e-4
    if packed.available() and LINUX:  # the UNet sampled on packs of the casts; afterwards its pages are given back
        assert packs_at_step[0] > 0 and packs_at_step[0] == len(unet_layers)
        assert resident_file_bytes([m.weight for m in layers(pipe.unet)]) == 0
    assert all(not hasattr(f, "packed") for f in (m.__dict__.get("forward") for m in layers(pipe.unet)))


@torch.no_grad()
def test_stored_layers_equal_cast_at_load_bit_for_bit_without_packing(tmp_path):
    """The per-call cast of the plain ops (the text encoder and the VAE always, the UNet when not packing) is exact."""
    import sdtorch

    path = fp16_file(tmp_path, TINY)
    pipe, reference = sdtorch.load(path, device="cpu"), cast_at_load(path)
    pipe.release_idle_weights = False
    tokens = pipe.tokenizer(["a red circle"])
    assert torch.equal(pipe.text_encoder(tokens), reference.text_encoder(tokens))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pipe.decode_latents(latents), reference.decode_latents(latents))
    t, context = torch.tensor([500.0]), torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pipe.unet(latents, t, context), reference.unet(latents, t, context))


@torch.no_grad()
def test_a_lora_on_stored_layers_merges_in_fp32_and_leaves_the_files_bytes(tmp_path):
    """A LoRA merges into a stored fp16 layer in fp32 (not rounded back to fp16): the image equals the one of the
    model cast at load; afterwards every weight is the file's fp16 tensor again."""
    import sdtorch
    from test_lora import kohya_file

    path = fp16_file(tmp_path, TINY)
    kohya_file(tmp_path / "ink.safetensors", tiny_models())
    pipe = sdtorch.load(path, device="cpu", lora_dir=tmp_path)
    reference = cast_at_load(path)
    reference.lora_dir = tmp_path
    settings = Settings("a cat <lora:ink:1>", **GENERATE)
    # packed kernels' rounding (~1e-6 relative per layer); merged weights rounded to fp16 would differ by ~1e-3
    assert (pipe.run(settings) - reference.run(settings)).abs().max().item() < 1e-4
    file = load_file(path)
    state = pipe.models.state_dict()
    kept = {k for k in state if k.endswith("weight") and state[k].dim() >= 2 and state[k].dtype == torch.float16}
    assert kept and all(torch.equal(state[k], file[k]) for k in kept)


def test_moving_to_fp16_casts_every_weight_and_back_to_fp32_keeps_them_fp16(tmp_path):
    """Pipeline.to: another compute dtype casts every layer (no casting forward left behind); fp32 on the CPU again
    keeps the half-precision layer weights as they are."""
    import sdtorch

    pipe = sdtorch.load(fp16_file(tmp_path, TINY), device="cpu")
    pipe.release_idle_weights = False  # no packed loop: bf16 casts every weight too (see the next test)
    pipe.to(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters())
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())
    pipe.to(dtype=torch.float32)
    kept = {id(m.weight) for m in layers(pipe.unet)}
    assert all(p.dtype == (torch.bfloat16 if id(p) in kept else torch.float32) for p in pipe.unet.parameters())
    out = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.skipif(not packed.packs(torch.bfloat16), reason="this CPU has no oneDNN bf16 kernels: bf16 casts at load")
@pytest.mark.parametrize("half_file", [False, True])
def test_bf16_on_a_cpu_with_bf16_kernels_packs_the_files_weights_and_leaves_the_side_models_as_fp32(tmp_path,
                                                                                                    half_file):
    """sdtorch.load(dtype="bf16"): the UNet's layer weights stay as the file stores them (memory-mapped) and are
    packed in bf16 for the sampling loop, their mapped pages released; the text encoder and VAE compute in fp32 from
    the file's own weights, not from a bf16 rounding of them."""
    import sdtorch

    if half_file:
        path = fp16_file(tmp_path, TINY)
    else:
        path = tmp_path / "model.safetensors"
        sdtorch.save(Pipeline(tiny_models(), CLIPTokenizer.default(), TINY, device="cpu"), path)
    pipe = sdtorch.load(path, device="cpu", dtype="bf16")
    exact = sdtorch.load(path, device="cpu")
    stored_dtype = torch.float16 if half_file else torch.float32
    assert all(m.weight.dtype == stored_dtype and packed.stored.compute_dtype(m) == torch.bfloat16
               for m in layers(pipe.unet))
    assert all(p.dtype == torch.bfloat16 for n, p in pipe.unet.named_parameters() if not n.endswith("weight")
               or p.dim() < 2)
    with torch.inference_mode():  # the side models are the fp32 pipeline's, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(pipe.encode_prompts("a red circle", "ugly", 1),
                                                     exact.encode_prompts("a red circle", "ugly", 1), strict=True))
        z = torch.randn(1, 4, 8, 8)
        assert torch.equal(pipe.vae.decode(z), exact.vae.decode(z))
        x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 32)
        plain = pipe.unet(x, t, context)  # each weight cast to bf16 at the call
        with packed.packed_weights(pipe.unet):
            packs = pipe.unet(x, t, context)
            folded = {id(m.conv) for m in pipe.unet.modules() if isinstance(m, Upsample)}  # (its own 2x2 convs)
            assert all(m.forward.packed is not None for m in layers(pipe.unet) if id(m) not in folded)
        want = exact.unet(x, t, context)
    assert packs.dtype == plain.dtype == torch.bfloat16
    # bf16 rounding (8 significant bits) over the tiny UNet's layers; packs add the bias inside the kernel, in fp32
    assert (packs.float() - want).abs().max() <= 2e-2 * want.abs().max()
    assert (packs.float() - plain.float()).abs().max() <= 2e-2 * want.abs().max()
    image = pipe.run(Settings("a red circle", **GENERATE))
    assert torch.isfinite(image).all() and (image - exact.run(Settings("a red circle", **GENERATE))).abs().max() < 0.2
    if LINUX:  # after the loop the mapped weights are out of RAM: the packs stood in for them
        assert resident_file_bytes([m.weight for m in layers(pipe.unet)]) == 0
