"""The low-memory mode: weights="q8" stores every Linear and Conv2d weight in int8 with fp16 block scales
(models/stored.py) and computes exactly the model those rounded weights describe; `convert --weights q8` writes them
to a file that loads as they are."""
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
def test_q8_holds_a_quarter_of_the_layer_bytes(model_file):
    import sdtorch

    full, q8 = sdtorch.load(model_file, device="cpu"), sdtorch.load(model_file, device="cpu", weights="q8")
    full_bytes = sum(m.weight.nbytes for m in layers(full.models))
    q8_bytes = sum(m.weight.nbytes + m.weight_scale.nbytes for m in layers(q8.models))
    assert q8_bytes < 0.3 * full_bytes  # 1 byte per weight + 2 per 32 weights (the first conv: per channel)
    with pytest.raises(ValueError, match="weights"):
        sdtorch.load(model_file, device="cpu", weights="q4")


@torch.no_grad()
def test_a_q8_file_loads_memory_mapped_as_the_same_q8_model(model_file, tmp_path):
    """`convert --weights q8` writes the int8 weights and their scales; loading that file needs no --weights, reads
    them as written (no quantizing again) and makes the image the on-the-fly q8 mode makes, bit for bit."""
    import sdtorch
    from sdtorch.cli import main

    out = tmp_path / "q8.safetensors"
    assert main(["convert", str(model_file), str(out), "--weights", "q8"]) == 0
    on_the_fly, from_file = sdtorch.load(model_file, device="cpu", weights="q8"), sdtorch.load(out, device="cpu")
    # each layer weight: 1 byte and 2 per block of 32 instead of 4 (embeddings, norms and biases stay as they were)
    layer_weights = sum(m.weight.numel() for m in layers(from_file.models))
    assert model_file.stat().st_size - out.stat().st_size > (3 - 2 / 32) * layer_weights * 0.99
    assert from_file.weights == "q8" and all(m.weight.dtype == torch.int8 for m in layers(from_file.models))
    for a, b in zip(layers(on_the_fly.models), layers(from_file.models), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_scale, b.weight_scale)
    settings = Settings("a red circle", **GENERATE)
    assert torch.equal(on_the_fly.run(settings), from_file.run(settings))
    # and again through save: a q8 pipeline writes the same tensors
    again = sdtorch.save(from_file, tmp_path / "again.safetensors")
    assert torch.equal(sdtorch.load(again, device="cpu").run(settings), from_file.run(settings))
    from sdtorch.checkpoint import save_diffusers
    with pytest.raises(ValueError, match="int8"):
        save_diffusers(from_file.models, tmp_path / "folder")


def test_a_q8_file_with_a_scale_for_no_weight_or_an_unscaled_int8_weight_is_refused(model_file, tmp_path):
    import sdtorch
    from safetensors.torch import load_file, save_file
    from sdtorch.checkpoint import CheckpointError

    out = tmp_path / "q8.safetensors"
    sdtorch.save(sdtorch.load(model_file, device="cpu", weights="q8"), out)
    tensors = load_file(out)
    key = next(k for k in tensors if k.endswith(".weight_scale"))
    stray = dict(tensors, **{"nothing.weight_scale": tensors[key].clone()})
    save_file(stray, tmp_path / "stray.safetensors")
    with pytest.raises(CheckpointError, match="q8 scales for no weight"):
        sdtorch.load(tmp_path / "stray.safetensors", device="cpu")
    unscaled = {k: t for k, t in tensors.items() if k != key}
    save_file(unscaled, tmp_path / "unscaled.safetensors")
    with pytest.raises(CheckpointError, match="int8"):
        sdtorch.load(tmp_path / "unscaled.safetensors", device="cpu")


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


@torch.no_grad()
def test_an_sdxl_q8_file_keeps_its_openclip_tower_under_our_names_and_loads_back(sdxl_file, tmp_path):
    """OpenCLIP's fused q/k/v weight would need its scales fused too: a q8 file keeps our per-projection names."""
    import sdtorch
    from sdtorch.checkpoint import convert, read_tensor_index

    out = convert(sdxl_file, tmp_path / "sdxl-q8.safetensors", weights="q8")
    keys, _ = read_tensor_index(out)
    assert not any("in_proj_weight" in k for k in keys) and any(k.endswith("q_proj.weight_scale") for k in keys)
    on_the_fly, from_file = sdtorch.load(sdxl_file, device="cpu", weights="q8"), sdtorch.load(out, device="cpu")
    settings = Settings("a red circle", steps=2, seed=1, width=64, height=64, sampler="Euler")
    assert torch.equal(on_the_fly.run(settings), from_file.run(settings))
