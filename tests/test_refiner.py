"""The SDXL refiner and A1111's "Refiner" handover, against diffusers' refiner pipeline (ensemble of experts)."""
import pytest
import torch
from PIL import Image

from reference import ldm_original_config, max_rel_err, randomize_
from sdtorch.checkpoint import UnsupportedModelError, convert, load_checkpoint, save_checkpoint
from sdtorch.conditioning import encode_prompts, tokenizers
from sdtorch.config import SDXL_REFINER, CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from sdtorch.metadata import parse_parameters
from sdtorch.models import StableDiffusionModels
from sdtorch.pipeline import Pipeline, SettingError, Settings, seed_noise
from sdtorch.refiner import completed_ratio
from test_families import NEGATIVE, PROMPT, euler, to_unit

# The refiner's topology at small widths: four levels, attention (2 blocks) at the middle two only, 64-wide heads, a
# bigG-like tower (128 wide, GELU, projection) as the only text encoder; y = 128 pooled + 5·256 numbers
TINY_REFINER = ModelConfig(
    family="sdxl_refiner", resolution=1024,
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), attention_resolutions=(4, 2), num_head_channels=64,
                    transformer_depth=2, context_dim=128, use_linear_in_transformer=True,
                    adm_in_channels=128 + 5 * 256),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scale_factor=0.13025),
    clip=CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                        hidden_act="gelu", projection_dim=128))


@pytest.fixture(scope="module")
def refiner_models():
    return randomize_(StableDiffusionModels(TINY_REFINER), seed=11).eval()


@pytest.fixture(scope="module")
def refiner_file(refiner_models, tmp_path_factory):
    return save_checkpoint(refiner_models, tmp_path_factory.mktemp("refiner") / "refiner.safetensors")


def diffusers_refiner(path, folder, force_zeros: bool):
    """diffusers' StableDiffusionXLImg2ImgPipeline as the refiner's model_index.json builds it (bigG alone, aesthetic
    scores), its parts converted from our file by diffusers' own single-file converters."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_open_clip_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModelWithProjection
    from transformers import CLIPTokenizer as HFTokenizer

    from reference import diffusers_vae

    checkpoint = load_file(path)
    original = ldm_original_config(TINY_REFINER)
    original["model"]["params"]["unet_config"]["params"] |= {"num_classes": "sequential",
                                                             "adm_in_channels": TINY_REFINER.unet.adm_in_channels}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=64)
    # diffusers tells SDXL's "text_time" added conditions by the context width (2048 or 1280); this one is 128
    config |= {"class_embed_type": None, "addition_embed_type": "text_time", "addition_time_embed_dim": 256}
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    c = TINY_REFINER.clip
    bigg = CLIPTextModelWithProjection(HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads, hidden_act="gelu",
        projection_dim=c.projection_dim, attn_implementation="eager"))
    bigg.load_state_dict(convert_open_clip_checkpoint(bigg, checkpoint, prefix="conditioner.embedders.0.model."),
                         strict=False)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=diffusers_vae(checkpoint, TINY_REFINER), text_encoder=None, text_encoder_2=bigg.eval(), tokenizer=None,
        tokenizer_2=HFTokenizer.from_pretrained(folder / "tokenizer_2"), unet=unet.eval(),
        scheduler=euler("epsilon"), requires_aesthetics_score=True, force_zeros_for_empty_prompt=force_zeros)
    pipe.vae.config.scaling_factor = TINY_REFINER.vae.scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_refiner_file_layout_config_and_family(refiner_models, refiner_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(refiner_file, "pt") as f:
        keys = set(f.keys())
    assert "conditioner.embedders.0.model.transformer.resblocks.2.attn.in_proj_weight" in keys
    assert not any(k.startswith("conditioner.embedders.1.") for k in keys)
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)  # no attention at level 0
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(refiner_file), bare)  # no header: keys and shapes say it all
    loaded = load_checkpoint(bare)
    assert loaded.config == TINY_REFINER
    for k, v in refiner_models.state_dict().items():
        assert torch.equal(loaded.models.state_dict()[k], v), k
    with pytest.raises(UnsupportedModelError, match="refiner as a diffusers folder"):
        convert(refiner_file, tmp_path / "folder", to_diffusers=True)


def test_full_size_refiner_matches_diffusers_shapes_on_meta():
    """The full-size config (sgm's sd_xl_refiner.yaml: 384 wide, attention_resolutions [2, 4], transformer_depth 4,
    context 1280, adm 2560) maps onto the UNet diffusers' converter makes of that yaml, tensor for tensor."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from sdtorch.checkpoint.diffusers_folder import part_to_diffusers

    original = ldm_original_config(SDXL_REFINER)
    original["model"]["params"]["unet_config"]["params"] |= {"num_classes": "sequential", "adm_in_channels": 2560}
    config = create_unet_diffusers_config_from_ldm(original, {}, image_size=1024)
    assert config["addition_embed_type"] == "text_time"  # diffusers takes a 1280-wide context for SDXL's kind
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"]
    with torch.device("meta"):
        ours = StableDiffusionModels(SDXL_REFINER)
        ref = UNet2DConditionModel(**config)
    unet = part_to_diffusers("unet", ours.unet.state_dict(), SDXL_REFINER)
    assert {k: v.shape for k, v in unet.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.unet.parameters()) == sum(p.numel() for p in ref.parameters())
    assert ours.text_encoders[0].state_dict()["text_projection.weight"].shape == (1280, 1280)  # the pooled text


@torch.no_grad()
@pytest.mark.parametrize("negative", [NEGATIVE, ""], ids=["negative", "empty-negative-is-zeros"])
def test_refiner_conditioning_and_unet_equal_diffusers(refiner_file, sdxl_folder, negative):
    """The refiner's conditioning as diffusers' refiner pipeline makes it: bigG's penultimate layer, the pooled text,
    and time ids (original size, crop, aesthetic score: 6 for the prompt, 2.5 for the negative); and its UNet's
    output on them."""
    ref = diffusers_refiner(refiner_file, sdxl_folder, force_zeros=True)
    loaded = load_checkpoint(refiner_file)
    models, cfg = loaded.models, loaded.config
    c = encode_prompts(models, tokenizers(cfg, loaded.tokenizer), cfg, PROMPT, negative,
                       sizes=((40, 56), (8, 4), (32, 48)))
    cond, uncond, pooled, pooled_uncond = ref.encode_prompt(PROMPT, negative_prompt=negative or None, device="cpu",
                                                            do_classifier_free_guidance=True)
    assert max_rel_err(c.cond, cond) < 1e-5 and max_rel_err(c.y[:, :128], pooled) < 1e-5
    if negative:
        assert max_rel_err(c.uncond, uncond) < 1e-5 and max_rel_err(c.uncond_y[:, :128], pooled_uncond) < 1e-5
    else:  # A1111 and diffusers (force_zeros_for_empty_prompt): zeros for an empty negative prompt
        assert not c.uncond.any() and not c.uncond_y[:, :128].any() and not uncond.any()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[40.0, 56, 8, 4, 6.0], [40.0, 56, 8, 4, 2.5]])  # diffusers' refiner add_time_ids
    theirs = ref.unet(x, 400, torch.cat([cond, uncond]), added_cond_kwargs={
        "text_embeds": torch.cat([pooled, pooled_uncond]), "time_ids": time_ids}).sample
    ours = models.unet(x, torch.tensor([400.0, 400.0]), torch.cat([c.cond, c.uncond]), torch.cat([c.y, c.uncond_y]))
    assert max_rel_err(ours, theirs) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("negative", [NEGATIVE, ""], ids=["negative", "empty-negative"])
def test_base_then_refiner_equals_diffusers_ensemble_of_experts(sdxl_file, sdxl_folder, refiner_file, negative):
    """Settings(refiner=..., refiner_switch_at=0.5) at 4 Euler steps: A1111 hands the calls at t = 333 and 0 to the
    refiner ((999 - t) / 1000 ≥ 0.5), which is diffusers' denoising_end=0.5 on the base and denoising_start=0.5 on
    the refiner for this schedule (999, 666 | 333, 0); the refiner's VAE decodes, as in both."""
    from diffusers import StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True)
    base.scheduler = euler("epsilon")
    base.set_progress_bar_config(disable=True)
    kwargs = dict(negative_prompt=negative or None, num_inference_steps=4, guidance_scale=6.0)
    handed = base(PROMPT, height=32, width=48, latents=seed_noise(5, 1, (4, 4, 6)), denoising_end=0.5,
                  output_type="latent", **kwargs).images
    theirs = diffusers_refiner(refiner_file, sdxl_folder, force_zeros=True)(
        PROMPT, image=handed, denoising_start=0.5, output_type="pt", **kwargs).images
    loaded = load_checkpoint(sdxl_file)
    pipe = Pipeline(loaded.models, loaded.tokenizer, loaded.config, device="cpu")
    s = Settings(PROMPT, negative, steps=4, cfg=6.0, sampler="Euler", seed=5, width=48, height=32,
                 refiner=str(refiner_file), refiner_switch_at=0.5)
    pixels, resolved = pipe.run_resolved(s)
    assert (to_unit(pixels) - theirs).abs().max() < 1e-3
    refiner = pipe.refiner_pipeline(refiner_file)
    assert resolved.hashes["Refiner"] == f"refiner [{refiner.model_hash}]"
    # and the same run without a refiner is another image: the handover did something
    assert (pipe.run(Settings(PROMPT, negative, steps=4, cfg=6.0, sampler="Euler", seed=5, width=48, height=32))
            - pixels).abs().max() > 0.05


def test_the_switch_follows_a1111s_timestep_rule():
    """(999 - t) / 1000 with t the training timestep whose σ is nearest: the switch at 0.8 comes at t ≤ 199."""
    from sdtorch.diffusion.schedule import DiscreteSchedule

    schedule = DiscreteSchedule.scaled_linear()
    for t in (999, 500, 200, 199, 0):
        assert completed_ratio(schedule, schedule.sigmas[t]) == (999 - t) / 1000
    between = (schedule.sigmas[199] * 0.6 + schedule.sigmas[200] * 0.4)  # nearer 199's
    assert completed_ratio(schedule, between.reshape(1)) == 0.8


def test_refiner_parameters_in_the_png_and_the_calls_each_model_gets(sdxl_file, refiner_file):
    """The PNG says "Refiner: name [hash], Refiner switch at: 0.8" (A1111's keys) only when the switch happened; the
    base gets the calls before it, the refiner the ones after; switch_at 1 never switches."""
    import sdtorch

    pipe = sdtorch.load(sdxl_file, device="cpu")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *_: calls.append("base"))
    refiner = pipe.refiner_pipeline(refiner_file)
    refiner.unet.register_forward_pre_hook(lambda *_: calls.append("refiner"))
    image = pipe.txt2img(PROMPT, steps=10, sampler="Euler", seed=1, width=32, height=32, refiner=str(refiner_file))[0]
    # Euler's 10 uniform timesteps 999, 888, ..., 111, 0: (999 - t) / 1000 ≥ 0.8 from t = 111 on, 2 steps
    assert calls == ["base"] * 8 + ["refiner"] * 2
    _, _, params = parse_parameters(image.info["parameters"])
    assert params["Refiner"] == f"refiner [{refiner.model_hash}]" and params["Refiner switch at"] == "0.8"
    calls.clear()
    never = pipe.txt2img(PROMPT, steps=4, sampler="Euler", seed=1, width=32, height=32, refiner=str(refiner_file),
                         refiner_switch_at=1.0)[0]
    assert calls == ["base"] * 4 and "Refiner" not in parse_parameters(never.info["parameters"])[2]


def test_refiner_errors_are_one_clear_line(sdxl_file, tmp_path):
    import sdtorch
    from conftest import tiny_models

    pipe = sdtorch.load(sdxl_file, device="cpu")
    sd1 = save_checkpoint(tiny_models(), tmp_path / "sd1.safetensors")
    with pytest.raises(SettingError, match="is SD 1.x, whose latents are not those of this SDXL model"):
        pipe.txt2img(PROMPT, steps=2, width=32, height=32, refiner=str(sd1))
    with pytest.raises(SettingError, match="refiner_switch_at must be in"):
        pipe.txt2img(PROMPT, steps=2, width=32, height=32, refiner=str(sd1), refiner_switch_at=0)
    with pytest.raises(SettingError, match="hires fix"):
        pipe.txt2img(PROMPT, steps=2, width=32, height=32, refiner=str(sd1), hires_scale=2)


def test_cli_refiner_and_regenerating_its_png(sdxl_file, refiner_file, tmp_path):
    """`--refiner FILE --refiner-switch-at F` writes A1111's keys; `--from` that PNG needs the refiner's file again
    (the PNG names it, it cannot say where it is): without it one line and exit 2, with it the same image."""
    import numpy as np

    from test_cli import sdtorch

    first = tmp_path / "first.png"
    args = ["generate", PROMPT, "--model", sdxl_file, "--steps", 4, "--sampler", "Euler", "--seed", 3, "--width", 32,
            "--height", 32, "--quiet"]
    done = sdtorch(*args, "--refiner", refiner_file, "--refiner-switch-at", 0.5, "-o", first)
    assert done.returncode == 0, done.stderr
    params = parse_parameters(Image.open(first).info["parameters"])[2]
    assert params["Refiner"].startswith("refiner [") and params["Refiner switch at"] == "0.5"
    refused = sdtorch("generate", "--model", sdxl_file, "--from", first, "-o", tmp_path / "no.png")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--refiner" in refused.stderr and "refiner [" in refused.stderr
    again = sdtorch("generate", "--model", sdxl_file, "--from", first, "--refiner", refiner_file, "--quiet",
                    "-o", tmp_path / "again.png")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(tmp_path / "again.png")))
    missing = sdtorch(*args, "--refiner", tmp_path / "nope.safetensors", "-o", tmp_path / "x.png")
    assert missing.returncode == 2 and "--refiner: model not found" in missing.stderr


def test_the_api_takes_a1111s_refiner_fields(sdxl_file, refiner_file, tmp_path):
    """POST /sdapi/v1/txt2img with A1111's refiner_checkpoint (a title from /sdapi/v1/sd-models) and
    refiner_switch_at; a name that is no model there is a 404 naming the field, as for sd_model_checkpoint."""
    import json
    import shutil

    import requests

    from serve_helpers import Server

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(sdxl_file, models / "base.safetensors")
    shutil.copy(refiner_file, models / "refiner.safetensors")
    server = Server("--models-dir", models, "--model", models / "base.safetensors", auth=None)
    try:
        body = dict(prompt=PROMPT, steps=4, sampler_name="Euler", width=32, height=32, seed=2,
                    refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.5)
        answer = requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        infotext = json.loads(answer.json()["info"])["infotexts"][0]
        assert "Refiner: refiner [" in infotext and "Refiner switch at: 0.5" in infotext
        wrong = requests.post(server.url + "/sdapi/v1/txt2img", json=body | {"refiner_checkpoint": "../x"},
                              timeout=60)
        assert wrong.status_code == 404 and wrong.json()["detail"][0]["loc"] == ["body", "refiner_checkpoint"]
    finally:
        server.stop()
