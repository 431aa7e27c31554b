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
    pipe.to(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters())
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())
    pipe.to(dtype=torch.float32)
    kept = {id(m.weight) for m in layers(pipe.unet)}
    assert all(p.dtype == (torch.bfloat16 if id(p) in kept else torch.float32) for p in pipe.unet.parameters())
    out = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
