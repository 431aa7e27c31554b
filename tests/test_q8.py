"""The low-memory mode: weights="q8" stores every Linear and Conv2d weight in int8 with fp16 block scales
(models/stored.py) and computes exactly the model those rounded weights describe."""
import pytest
import torch
from torch import nn

from conftest import TINY, tiny_models
from sdtorch.models import stored
from sdtorch.pipeline import Pipeline, Settings
from sdtorch.tokenizer import CLIPTokenizer
from test_stored import cast_at_load, layers

GENERATE = dict(steps=3, seed=1, width=64, height=64, sampler="Euler a")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    import sdtorch

    path = tmp_path_factory.mktemp("q8") / "model.safetensors"
    sdtorch.save(Pipeline(tiny_models(), CLIPTokenizer.default(), TINY, device="cpu"), path)
    return path


def dequantized_reference(path, q8: Pipeline) -> Pipeline:
    """The fp32 model whose layer weights are the q8 model's dequantized values (plain ops, no packing)."""
    reference = cast_at_load(path)
    q8_layers = dict(zip([id(m) for m in layers(reference.models)], layers(q8.models), strict=True))
    for layer in layers(reference.models):
        layer.weight.data = stored.weight_of(q8_layers[id(layer)], torch.float32)
    return reference


@torch.no_grad()
def test_each_block_of_32_inputs_rounds_to_int8_within_half_a_step_of_its_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Conv2d(32, 16, 3), nn.Conv2d(4, 8, 3))
    originals = [m.weight.detach().clone() for m in model]
    stored.quantize_q8(model)
    # 64 inputs: 2 blocks; 32·3·3: 9 blocks; 4·3·3 = 36 is no multiple of 32: one scale per output channel
    for layer, original, blocks in zip(model, originals, (2, 9, 1), strict=True):
        assert layer.weight.dtype == torch.int8 and layer.weight.shape == original.shape
        assert layer.weight_scale.dtype == torch.float16 and layer.weight_scale.shape == (original.shape[0], blocks, 1)
        step = layer.weight_scale.float()
        values = original.reshape(original.shape[0], blocks, -1)
        error = (stored.weight_of(layer, torch.float32).reshape(values.shape) - values).abs()
        assert (error <= step / 2 * (1 + 1e-3)).all()  # round to nearest (the fp16 scale's rounding: < 1e-3)
        assert layer.weight.abs().amax().item() == 127  # the scale is the block's largest magnitude / 127
    assert stored.is_quantized(model) and not any(k.endswith("weight_scale") for k in model.state_dict())


@torch.no_grad()
def test_a_q8_pipeline_computes_exactly_the_model_of_its_dequantized_weights(model_file):
    """int8 × fp16 scale is exact in fp32, so the per-call dequantization changes nothing beyond the rounding to int8:
    every part equals the fp32 model holding the dequantized weights, bit for bit."""
    import sdtorch

    pipe = sdtorch.load(model_file, device="cpu", weights="q8")
    assert pipe.dtype == torch.float32 and pipe.weights == "q8"
    assert all(m.weight.dtype == torch.int8 for m in layers(pipe.models))
    assert all(p.dtype == torch.float32 for n, p in pipe.models.named_parameters() if p.dtype != torch.int8)
    reference = dequantized_reference(model_file, pipe)
    tokens = pipe.tokenizer(["a red circle"])
    assert torch.equal(pipe.text_encoder(tokens), reference.text_encoder(tokens))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pipe.decode_latents(latents), reference.decode_latents(latents))
    settings = Settings("a red circle", **GENERATE)
    image = pipe.run(settings)
    assert torch.equal(image, reference.run(settings))  # q8 layers are never packed: the same plain ops
    assert all(m.weight.dtype == torch.int8 for m in layers(pipe.models))  # still q8 after a generation
    # and an approximation of the file's model: measured in docs/performance.md, here only that it is close
    assert (image - cast_at_load(model_file).run(settings)).abs().max().item() < 0.05


@torch.no_grad()
def test_q8_holds_a_quarter_of_the_layer_bytes_and_cannot_be_saved(model_file, tmp_path):
    import sdtorch

    full, q8 = sdtorch.load(model_file, device="cpu"), sdtorch.load(model_file, device="cpu", weights="q8")
    full_bytes = sum(m.weight.nbytes for m in layers(full.models))
    q8_bytes = sum(m.weight.nbytes + m.weight_scale.nbytes for m in layers(q8.models))
    assert q8_bytes < 0.3 * full_bytes  # 1 byte per weight + 2 per 32 weights (the first conv: per channel)
    with pytest.raises(ValueError, match="q8"):
        sdtorch.save(q8, tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match="weights"):
        sdtorch.load(model_file, device="cpu", weights="q4")


@torch.no_grad()
def test_a_lora_merges_into_the_dequantized_weights_and_leaves_the_int8_ones(model_file, tmp_path):
    import sdtorch
    from test_lora import kohya_file

    kohya_file(tmp_path / "ink.safetensors", tiny_models())
    pipe = sdtorch.load(model_file, device="cpu", weights="q8", lora_dir=tmp_path)
    before = {name: t.clone() for name, t in pipe.models.state_dict().items()}
    reference = dequantized_reference(model_file, pipe)
    reference.lora_dir = tmp_path
    settings = Settings("a cat <lora:ink:1>", **GENERATE)
    image = pipe.run(settings)
    # merged layers are packed for the loop (~1e-6 relative per layer against the reference's plain ops)
    assert (image - reference.run(settings)).abs().max().item() < 1e-4
    assert (image - pipe.run(Settings("a cat", **GENERATE))).abs().max().item() > 1e-3  # the LoRA did act
    after = pipe.models.state_dict()
    assert all(torch.equal(after[name], t) and after[name].dtype == t.dtype for name, t in before.items())


@torch.no_grad()
def test_q8_computes_in_bf16_on_request(model_file):
    import sdtorch

    q8 = sdtorch.load(model_file, device="cpu", weights="q8")
    pipe = sdtorch.load(model_file, device="cpu", weights="q8", dtype="bf16")
    assert all(m.weight.dtype == torch.int8 for m in layers(pipe.models))
    # the UNet computes in bf16; on the CPU the text encoder and the VAE stay fp32 (Pipeline.to)
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters() if p.dtype != torch.int8)
    assert all(p.dtype == torch.float32 for p in pipe.vae.parameters() if p.dtype != torch.int8)
    assert stored.compute_dtype(layers(pipe.unet)[0]) == torch.bfloat16
    settings = Settings("a red circle", **GENERATE)
    # bf16 keeps 8 bits of each activation: the same picture to a few hundredths of the [-1, 1] range
    assert (pipe.run(settings).float() - q8.run(settings)).abs().max().item() < 0.1


def test_generate_and_eval_take_weights_q8(tmp_path, model_file):
    from sdtorch.cli import main

    out = tmp_path / "q8.png"
    assert main(["generate", "a red circle", "--model", str(model_file), "--weights", "q8", "--steps", "2",
                 "-o", str(out), "--quiet", "--seed", "1"]) == 0
    assert out.stat().st_size > 0
    assert main(["eval", "shapes", "--weights", "q8", "--count", "2", "--steps", "2", "--quiet"]) == 0
