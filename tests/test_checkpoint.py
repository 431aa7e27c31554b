"""Checkpoints: every format loads to the exact weights it holds, writes back bit for bit, and diffusers reads what we
write. Random weights on a tiny config; a bad file fails with an error that names it; a malicious pickle never runs."""
import hashlib
import json
import os
import pickle
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from reference import (diffusers_unet, diffusers_vae, ldm_original_config, max_rel_err, prefixed, randomize_,
                       transformers_clip)
from sdtorch.checkpoint import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, KeyMismatchError,
                                NotACheckpointError, ShapeMismatchError, UnsafeCheckpointError, UnsupportedModelError,
                                convert, describe_model, detect_family, detect_format, load_checkpoint,
                                read_tensor_index, save_checkpoint, save_diffusers)
from sdtorch.checkpoint.diffusers_keys import from_diffusers, to_diffusers, unet_rules, vae_rules
from sdtorch.checkpoint.infer import infer_sd1_config
from sdtorch.config import SD1, CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from sdtorch.models import StableDiffusionModels
from sdtorch.models.stable_diffusion import PREFIXES
from sdtorch.tokenizer import CLIPTokenizer

# Tiny, yet with every case the key rules must get right: three UNet levels with attention at two (one upsampler
# behind an attention, one not), one VAE res-block per level (n != 2), four VAE levels (latents are H/8). Heads and
# norm groups take SD 1.x's values (8 UNet heads, 64-wide CLIP heads, 32 groups), so the shapes alone imply TINY.
TINY = ModelConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 1), num_heads=8,
                    context_dim=64),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    clip=CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1))


def random_models(cfg: ModelConfig = TINY, seed: int = 1) -> StableDiffusionModels:
    return randomize_(StableDiffusionModels(cfg), seed=seed).eval()


@pytest.fixture(scope="module")
def source() -> StableDiffusionModels:
    return random_models()


@pytest.fixture(scope="module")
def state(source) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in source.state_dict().items()}


@pytest.fixture(scope="module")
def saved(source, tmp_path_factory):
    """Our own .safetensors of `source`."""
    return save_checkpoint(source, tmp_path_factory.mktemp("saved") / "tiny.safetensors")


def assert_weights_equal(models: StableDiffusionModels, state: dict, dtype: torch.dtype | None = None):
    loaded = models.state_dict()
    assert loaded.keys() == state.keys()
    for key, want in state.items():
        want = want if dtype is None else want.to(dtype)
        assert loaded[key].dtype == want.dtype, key
        assert torch.equal(loaded[key], want), key  # bit for bit


@torch.no_grad()
def forward_all(models: StableDiffusionModels, in_channels: int = 4):
    """UNet, VAE decode and CLIP outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    cfg = models.config
    x = torch.randn(2, in_channels, 8, 8, generator=g)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    ids = torch.randint(0, cfg.clip.vocab_size, (2, 77), generator=g)
    return (models.unet(x, torch.tensor([999.0, 10.0]), context),
            models.vae.decode(torch.randn(1, 4, 4, 4, generator=g)), models.text_encoder(ids))


def assert_same_outputs(models, reference_models, in_channels: int = 4):
    for ours, ref in zip(forward_all(models, in_channels), forward_all(reference_models, in_channels),
                         strict=True):
        assert max_rel_err(ours, ref) <= 1e-6
        assert torch.equal(ours, ref)  # same weights, same code: identical


# ---------------------------------------------------------------- formats and our own files

def test_format_is_detected_by_content_not_extension(tmp_path, state):
    small = {"w": torch.ones(2)}
    save_file(small, tmp_path / "a.ckpt")
    torch.save(small, tmp_path / "b.safetensors")
    torch.save(small, tmp_path / "c.bin", _use_new_zipfile_serialization=False)
    assert detect_format(tmp_path / "a.ckpt") == "safetensors"
    assert detect_format(tmp_path / "b.safetensors") == "torch-zip"
    assert detect_format(tmp_path / "c.bin") == "pickle"


def test_save_then_load_is_bit_exact(saved, source, state):
    loaded = load_checkpoint(saved)
    assert loaded.config == TINY and loaded.source_format == "safetensors" and loaded.name == "tiny"
    assert_weights_equal(loaded.models, state)
    assert_same_outputs(loaded.models, source)
    assert not loaded.models.training
    assert not any(p.requires_grad for p in loaded.models.parameters())
    assert isinstance(loaded.tokenizer, CLIPTokenizer)
    # the header says what the file is, for us and for other tools
    shapes, metadata = read_tensor_index(saved)
    assert ModelConfig.from_dict(json.loads(metadata["sdtorch.config"])) == TINY
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert shapes == {k: tuple(v.shape) for k, v in state.items()}
    # a plain safetensors reader gets the same tensors
    assert all(torch.equal(t, state[k]) for k, t in load_file(saved).items())


def test_config_in_the_header_wins_over_shapes(tmp_path):
    # head counts, norm groups and the latent scale leave no trace in shapes: only the header can carry them
    cfg = TINY.replace(unet=UNetConfig(**{**TINY.unet.__dict__, "num_heads": 2, "norm_groups": 16}),
                       vae=VAEConfig(**{**TINY.vae.__dict__, "scale_factor": 0.13025}),
                       clip=CLIPTextConfig(**{**TINY.clip.__dict__, "num_attention_heads": 4}),
                       prediction_type="v_prediction")
    models = random_models(cfg, seed=3)
    path = save_checkpoint(models, tmp_path / "own.safetensors", metadata={"note": "ours"})
    loaded = load_checkpoint(path)
    assert loaded.config == cfg
    assert loaded.metadata["note"] == "ours"
    assert_same_outputs(loaded.models, models)
    # a config passed beside the models (as a pipeline holds it) may change the prediction type, not the sizes
    resaved = save_checkpoint(models, tmp_path / "eps.safetensors", config=cfg.replace(prediction_type="epsilon"))
    assert load_checkpoint(resaved).config == cfg.replace(prediction_type="epsilon")
    with pytest.raises(ValueError, match="other model sizes"):
        save_checkpoint(models, tmp_path / "bad.safetensors", config=TINY)
    # the same tensors without the header: SD 1.x's defaults are assumed
    save_file(models.state_dict(), tmp_path / "bare.safetensors")
    assert load_checkpoint(tmp_path / "bare.safetensors").config == TINY


def test_shapes_imply_the_config(tmp_path, source, state):
    save_file(state, tmp_path / "bare.safetensors")  # no metadata at all, as community files
    loaded = load_checkpoint(tmp_path / "bare.safetensors")
    assert loaded.config == TINY
    assert_same_outputs(loaded.models, source)
    with torch.device("meta"):
        sd15 = StableDiffusionModels(SD1).state_dict()
    assert infer_sd1_config({k: tuple(v.shape) for k, v in sd15.items()}, "sd15") == SD1


def test_fp16_convert_is_a_cast(tmp_path, saved, state):
    out = convert(saved, tmp_path / "half.safetensors", dtype=torch.float16)
    assert_weights_equal(load_checkpoint(out, dtype=torch.float16).models, state, torch.float16)
    # loading half weights as float32 (the default) is the exact upcast of the half values
    as_float = {k: v.half().float() for k, v in state.items()}
    assert_weights_equal(load_checkpoint(out).models, as_float)
    # and a plain conversion keeps the stored dtype: half stays half, bit for bit
    again = convert(out, tmp_path / "again.safetensors")
    assert all(t.dtype == torch.float16 for t in load_file(again).values())
    assert_weights_equal(load_checkpoint(again, dtype=torch.float16).models, state, torch.float16)


def test_unaligned_safetensors_from_old_writers(tmp_path, state):
    # safetensors < 0.3 did not pad its header: tensor data may start at any byte
    header, offset = {}, 0
    for key, t in state.items():
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + 4 * t.numel()]}
        offset += 4 * t.numel()
    raw = json.dumps(header).encode()
    raw += b" " * ((1 - len(raw)) % 4)  # 8 + len(raw) = 1 (mod 4): every float32 misaligned
    path = tmp_path / "old.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(t.numpy().tobytes() for t in state.values()))
    assert all(torch.equal(t, state[k]) for k, t in load_file(path).items())  # a valid file
    assert_weights_equal(load_checkpoint(path).models, state)
    assert_weights_equal(load_checkpoint(path, dtype=torch.float16).models, state, torch.float16)


def test_saving_over_the_loaded_file_keeps_the_loaded_model_intact(tmp_path, saved, state):
    path = tmp_path / "same.safetensors"
    path.write_bytes(saved.read_bytes())
    loaded = load_checkpoint(path)  # its weights are views of the memory-mapped file
    save_checkpoint(loaded, path, dtype=torch.float16)  # replaced atomically: the mapping keeps the old bytes
    assert_weights_equal(loaded.models, state)
    assert_weights_equal(load_checkpoint(path, dtype=torch.float16).models, state, torch.float16)


LDM_EXTRAS = {"betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000), "alphas_cumprod_prev": torch.rand(1000),
              "lvlb_weights": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
              "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict", "bare"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_ckpt_files_load(tmp_path, state, zip_format, wrapped, dtype):
    weights = {k: v.to(dtype) for k, v in state.items()} | LDM_EXTRAS
    obj = {"state_dict": weights, "global_step": 470000, "epoch": 6} if wrapped else weights
    path = tmp_path / "model.ckpt"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_checkpoint(path)
    assert loaded.source_format == ("torch-zip" if zip_format else "pickle")
    assert_weights_equal(loaded.models, {k: v.to(dtype).float() for k, v in state.items()})


def test_lightning_callback_objects_are_read_as_inert_data(tmp_path, state):
    # original LDM .ckpt files pickle a pytorch_lightning ModelCheckpoint next to the weights
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    callback = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = callback
    instance = callback()
    instance.best_model_score = torch.tensor(0.5)
    try:
        torch.save({"state_dict": state, "callbacks": {callback: {"monitor": "val/loss"}}, "cb": instance},
                   tmp_path / "ldm.ckpt")
    finally:
        for name in names:
            del sys.modules[name]
    assert_weights_equal(load_checkpoint(tmp_path / "ldm.ckpt").models, state)


def test_ema_weights_are_chosen_with_ema_true(tmp_path, state):
    ema_unet = random_models(seed=7).unet.state_dict()
    ema = {"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in ema_unet.items()}
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema  # LDM's dotless names
    save_file(state | ema | {"model_ema.num_updates": torch.tensor(5)}, tmp_path / "full.safetensors")
    assert_weights_equal(load_checkpoint(tmp_path / "full.safetensors").models, state)
    with_ema = state | prefixed("unet", ema_unet)
    assert_weights_equal(load_checkpoint(tmp_path / "full.safetensors", ema=True).models, with_ema)
    ema_only = convert(tmp_path / "full.safetensors", tmp_path / "ema_only.safetensors", ema=True)
    assert not any(k.startswith("model_ema.") for k in read_tensor_index(ema_only)[0])
    assert_weights_equal(load_checkpoint(ema_only).models, with_ema)
    save_file(state, tmp_path / "no_ema.safetensors")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_checkpoint(tmp_path / "no_ema.safetensors", ema=True)


def test_linear_vae_attention_and_old_clip_keys(tmp_path, source, state):
    # converted checkpoints store VAE attention projections as Linear (C, C); old transformers had no text_model level
    variant = {}
    for key, t in state.items():
        if ".mid.attn_1." in key and key.endswith("weight") and t.dim() == 4:
            t = t.flatten(1)
        variant[key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")] = t
    save_file(variant, tmp_path / "variant.safetensors")
    loaded = load_checkpoint(tmp_path / "variant.safetensors")
    assert_weights_equal(loaded.models, state)
    assert_same_outputs(loaded.models, source)


def test_inpainting_model_is_detected_from_the_input_conv(tmp_path):
    cfg = TINY.replace(unet=UNetConfig(**{**TINY.unet.__dict__, "in_channels": 9}))
    models = random_models(cfg, seed=4)
    save_file(models.state_dict(), tmp_path / "inpaint.safetensors")
    loaded = load_checkpoint(tmp_path / "inpaint.safetensors")
    assert loaded.config.unet.in_channels == 9
    assert_same_outputs(loaded.models, models, in_channels=9)


def test_v_prediction_from_argument_and_sidecar_yaml(tmp_path, state):
    path = tmp_path / "v.safetensors"
    save_file(state, path)
    assert load_checkpoint(path).config.prediction_type == "epsilon"
    assert load_checkpoint(path, prediction_type="v_prediction").config.prediction_type == "v_prediction"
    # A1111: a yaml beside the model, here shaped like v2-inference-v.yaml
    (tmp_path / "v.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n"
                                     "    parameterization: \"v\"\n    linear_start: 0.00085\n")
    assert load_checkpoint(path).config.prediction_type == "v_prediction"
    assert load_checkpoint(path, prediction_type="epsilon").config.prediction_type == "epsilon"  # argument wins
    with pytest.raises(ValueError, match="prediction_type"):
        load_checkpoint(path, prediction_type="v")


# ---------------------------------------------------------------- other families

def marker_file(path, keys):
    save_file({k: torch.zeros(1) for k in keys}, path)
    return path


def test_detect_family_from_keys(state):
    assert detect_family(state) == "sd1"
    assert detect_family(["model.diffusion_model.input_blocks.0.0.weight",
                          "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]) == "sd2"
    assert detect_family(["model.diffusion_model.input_blocks.0.0.weight",
                          "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert detect_family(["encoder.conv_in.weight", "decoder.conv_out.weight"]) == "vae"
    assert detect_family(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]) == "lora"
    assert detect_family(["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"]) == "diffusers"
    assert detect_family(["foo.bar"]) == "unknown"


def test_other_families_are_refused_by_name(tmp_path):
    sd3 = marker_file(tmp_path / "sd3.safetensors", ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"])
    with pytest.raises(UnsupportedModelError, match="not supported yet: SD 3"):
        load_checkpoint(sd3)
    flux = marker_file(tmp_path / "flux.safetensors", ["double_blocks.0.img_attn.qkv.weight"])
    with pytest.raises(UnsupportedModelError, match="not supported yet: Flux"):
        load_checkpoint(flux)
    odd = marker_file(tmp_path / "odd.safetensors", ["transformer.h.0.attn.weight", "lm_head.weight"])
    with pytest.raises(UnsupportedModelError, match=r"unknown model \(found lm_head.weight, transformer.h"):
        load_checkpoint(odd)
    vae = marker_file(tmp_path / "vae.safetensors", ["encoder.conv_in.weight", "decoder.conv_out.weight"])
    with pytest.raises(UnsupportedModelError, match="pass it as vae="):
        load_checkpoint(vae)


def test_describe_model_counts_each_part_and_reads_other_files_from_their_headers(tmp_path, saved, source):
    info = describe_model(saved)
    assert info["family"] == "SD 1.x" and info["format"] == "safetensors" and info["dtype"] == "float32"
    for part in ("unet", "vae", "text_encoder"):
        assert info[f"{part} parameters"] == f"{sum(p.numel() for p in getattr(source, part).parameters()):,}"
    assert info["sha256"] == hashlib.sha256(saved.read_bytes()).hexdigest()[:10]
    odd = marker_file(tmp_path / "odd.safetensors", ["transformer.h.0.attn.weight", "lm_head.weight"])
    assert describe_model(odd) == {"file": str(odd), "format": "safetensors", "family": "an unknown model",
                                   "tensors": 2,
                                   "supported": "no (sdtorch loads SD 1.x, SD 2.x, SDXL and the SDXL refiner models)"}


# ---------------------------------------------------------------- diffusers folders

@pytest.fixture(scope="module")
def diffusers_pipeline(source, tmp_path_factory):
    """diffusers' own pipeline holding `source`'s weights, carried over by diffusers' converters (reference.py)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    from sdtorch.checkpoint.diffusers_configs import scheduler_config

    def part(name):
        return prefixed(name, getattr(source, name).state_dict())
    vocab = tmp_path_factory.mktemp("tokenizer")
    CLIPTokenizer.default().save_pretrained_files(vocab)
    return StableDiffusionPipeline(
        vae=diffusers_vae(part("vae"), TINY), text_encoder=transformers_clip(part("text_encoder"), TINY),
        tokenizer=HFTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt")),
        unet=diffusers_unet(part("unet"), TINY), scheduler=PNDMScheduler.from_config(scheduler_config("v_prediction")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_diffusers_folder_loads_to_the_same_weights(tmp_path, diffusers_pipeline, source, state):
    diffusers_pipeline.save_pretrained(tmp_path / "pipe")
    assert detect_format(tmp_path / "pipe") == "diffusers-folder"
    loaded = load_checkpoint(tmp_path / "pipe")
    assert loaded.config == TINY.replace(prediction_type="v_prediction")  # from scheduler_config.json
    assert loaded.source_format == "diffusers-folder" and loaded.sha256_short is None
    assert_weights_equal(loaded.models, state)  # renames and reshapes only: bit-exact
    assert_same_outputs(loaded.models, source)
    assert torch.equal(loaded.tokenizer(["a photo of a cat"]), CLIPTokenizer.default()(["a photo of a cat"]))


def test_diffusers_fp16_variant_folder(tmp_path, diffusers_pipeline, state):
    half = diffusers_pipeline.to(torch.float16)
    try:
        half.save_pretrained(tmp_path / "pipe16", variant="fp16")
    finally:
        diffusers_pipeline.to(torch.float32)
    assert (tmp_path / "pipe16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = load_checkpoint(tmp_path / "pipe16", dtype=torch.float16)
    assert_weights_equal(loaded.models, state, torch.float16)


def test_written_diffusers_folder_loads_in_diffusers(tmp_path, saved, source, state):
    from diffusers import StableDiffusionPipeline

    folder = convert(saved, tmp_path / "out", to_diffusers=True)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    x, t, context = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999.0, 10.0]),
                     torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1)))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    ids = CLIPTokenizer.default()(["a photo of a cat", "an astronaut riding a horse"])
    with torch.no_grad():
        # another implementation, equal up to summation order (measured: UNet and CLIP 0, VAE 8e-7)
        assert max_rel_err(source.unet(x, t, context), pipe.unet(x, t, encoder_hidden_states=context).sample) < 1e-5
        assert max_rel_err(source.vae.decode(z), pipe.vae.decode(z).sample) < 1e-5
        assert max_rel_err(source.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state) < 1e-5
        assert torch.equal(pipe.tokenizer(["a photo of a cat"], padding="max_length", return_tensors="pt").input_ids,
                           CLIPTokenizer.default()(["a photo of a cat"]))
    assert_weights_equal(load_checkpoint(folder).models, state)  # and back, bit for bit
    with pytest.raises(ValueError, match="not empty"):
        save_diffusers(source, folder)


def test_diffusers_single_file_loader_reads_our_file(tmp_path, saved, source):
    from diffusers import StableDiffusionPipeline

    config_folder = convert(saved, tmp_path / "config", to_diffusers=True)
    pipe = StableDiffusionPipeline.from_single_file(str(saved), config=str(config_folder), local_files_only=True,
                                                    safety_checker=None)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with torch.no_grad():
        ours, theirs = source.unet(x, torch.tensor([500.0]), context), pipe.unet(x, 500, context).sample
    assert max_rel_err(ours, theirs) < 1e-5


def test_diffusers_key_rules_match_diffusers_converter(source):
    # our short rules against diffusers' own (test-only) converter: the same new key for the very same tensor
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    checkpoint, original = source.state_dict(), ldm_original_config(TINY)
    for part, rules, theirs in [
        ("unet", unet_rules(TINY.unet), convert_ldm_unet_checkpoint(
            checkpoint, create_unet_diffusers_config_from_ldm(original, checkpoint))),
        ("vae", vae_rules(TINY.vae), convert_ldm_vae_checkpoint(
            checkpoint, create_vae_diffusers_config_from_ldm(original, checkpoint)))]:
        ours = {to_diffusers(k, rules): t for k, t in getattr(source, part).state_dict().items()}
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k].flatten(), theirs[k].flatten()) for k in ours)  # VAE attention: (C,C) there
        assert {from_diffusers(k, rules) for k in ours} == getattr(source, part).state_dict().keys()


# ---------------------------------------------------------------- standalone VAE

@pytest.fixture(scope="module")
def other_vae():
    return random_models(seed=9).vae.state_dict()


@pytest.mark.parametrize("layout", ["original", "prefixed-ckpt", "diffusers-file", "diffusers-folder", "pipeline"])
def test_standalone_vae_replaces_the_checkpoints(tmp_path, saved, state, other_vae, layout):
    if layout == "original":
        vae = tmp_path / "vae.safetensors"
        save_file(other_vae, vae)
    elif layout == "prefixed-ckpt":  # LDM autoencoder checkpoints also keep their training loss
        vae = tmp_path / "vae.ckpt"
        torch.save({"state_dict": prefixed("vae", other_vae) | {"loss.logvar": torch.zeros(())}}, vae)
    else:
        diffusers_vae(prefixed("vae", other_vae), TINY).save_pretrained(tmp_path / "vae")
        vae = {"diffusers-folder": tmp_path / "vae", "pipeline": tmp_path,
               "diffusers-file": tmp_path / "vae" / "diffusion_pytorch_model.safetensors"}[layout]
    loaded = load_checkpoint(saved, vae=vae)
    assert_weights_equal(loaded.models, state | prefixed("vae", other_vae))


# ---------------------------------------------------------------- malicious pickles

class SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpenCall(SystemCall):
    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_plain_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("payload, writer, called", [
    (SystemCall, write_plain_pickle, "system"),
    (OpenCall, write_plain_pickle, "open"),
    (SystemCall, torch.save, "system"),
    (OpenCall, torch.save, "open"),
], ids=["pickle-system", "pickle-open", "torch-save-system", "torch-save-open"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, suffix, payload, writer, called):
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    writer({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": payload(marker)}}, path)
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load: unpickling it would call \S*{called}"):
        load_checkpoint(path)
    assert not marker.exists()


def test_pickle_with_unknown_opcodes_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "model.ckpt", "wb") as f:
        pickle.dump({"x": SystemCall(marker)}, f, protocol=4)  # plain pickle's framing, which torch's reader refuses
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "model.ckpt")
    assert not marker.exists()


# ---------------------------------------------------------------- errors name the file and the cause

def test_bad_files(tmp_path, saved):
    with pytest.raises(CheckpointNotFoundError, match="missing.safetensors: no such file"):
        load_checkpoint(tmp_path / "missing.safetensors")
    data = saved.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="half.safetensors: truncated"):
        load_checkpoint(tmp_path / "half.safetensors")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "zip.ckpt")
    zipped = (tmp_path / "zip.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(zipped[: len(zipped) // 2])
    with pytest.raises(CorruptCheckpointError, match="cut.ckpt: truncated or damaged"):
        load_checkpoint(tmp_path / "cut.ckpt")
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (tmp_path / "noise.safetensors").write_bytes(noise.numpy().tobytes())
    with pytest.raises(NotACheckpointError, match="noise.safetensors: not a checkpoint"):
        load_checkpoint(tmp_path / "noise.safetensors")
    (tmp_path / "image.ckpt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))
    with pytest.raises(NotACheckpointError, match="image.ckpt: not a checkpoint"):
        load_checkpoint(tmp_path / "image.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotACheckpointError, match="not a diffusers model"):
        load_checkpoint(tmp_path / "empty")


def test_missing_unexpected_and_misshapen_keys(tmp_path, state):
    dropped = sorted(k for k in state if k.startswith(PREFIXES["text_encoder"] + "encoder.layers.1."))[:7]
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "missing.safetensors")
    with pytest.raises(KeyMismatchError, match=r"missing.safetensors: keys do not match the model: 7 missing: "
                                               r"[^;]* and 2 more$") as err:
        load_checkpoint(tmp_path / "missing.safetensors")
    assert all(k in str(err.value) for k in dropped[:5])

    extra = "model.diffusion_model.output_blocks.99.0.weight"
    save_file(state | {extra: torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(KeyMismatchError, match=rf"1 unexpected: {extra}"):
        load_checkpoint(tmp_path / "extra.safetensors")

    key = PREFIXES["unet"] + "time_embed.0.weight"
    save_file(state | {key: torch.zeros(128, 31)}, tmp_path / "shape.safetensors")
    with pytest.raises(ShapeMismatchError, match=rf"{key}: file \(128, 31\), model \(128, 32\)"):
        load_checkpoint(tmp_path / "shape.safetensors")
    # an explicit config that does not fit the file
    save_file(state, tmp_path / "full.safetensors")
    wrong = TINY.replace(clip=CLIPTextConfig(**{**TINY.clip.__dict__, "intermediate_size": 96}))
    with pytest.raises(ShapeMismatchError, match=r"mlp.fc1.weight: file \(128, 64\), model \(96, 64\)"):
        load_checkpoint(tmp_path / "full.safetensors", config=wrong)


def test_all_errors_are_value_errors_and_arguments_are_checked(tmp_path, saved, source):
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointNotFoundError, FileNotFoundError)
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(saved, dtype=torch.int8)
    with pytest.raises(ValueError, match="safetensors only"):
        save_checkpoint(source, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="str to str"):
        save_checkpoint(source, tmp_path / "model.safetensors", metadata={"steps": 3})


# ---------------------------------------------------------------- how it loads

def test_loading_builds_on_meta_without_random_init(monkeypatch, saved, state):
    def no_init(*args, **kwargs):
        raise AssertionError("random init called while loading")
    for name in ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_"):
        monkeypatch.setattr(torch.nn.init, name, no_init)
    loaded = load_checkpoint(saved)
    assert not any(t.is_meta for t in loaded.models.state_dict().values())
    assert all(t.device.type == "cpu" for t in loaded.models.state_dict().values())
    assert_weights_equal(loaded.models, state)
    monkeypatch.undo()
    torch.nn.Linear(2, 2)  # the init is back for everyone else


def test_sha256_short_is_computed_on_first_use(saved):
    loaded = load_checkpoint(saved)
    assert "sha256_short" not in loaded.__dict__  # not hashed while loading
    assert loaded.sha256_short == hashlib.sha256(saved.read_bytes()).hexdigest()[:10]


def test_safetensors_whose_header_length_starts_with_0x80_is_not_a_pickle(tmp_path):
    """The 8-byte header length comes first; 128 mod 256 makes its first byte pickle's PROTO opcode."""
    path = tmp_path / "odd.safetensors"
    for pad in range(256):  # some name length puts the header's length at 128 mod 256
        save_file({"x" * pad: torch.zeros(1)}, path, metadata={"format": "pt"})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert detect_format(path) == "safetensors"
