"""SD 2.x (and SDXL): the other families as configurations of the same modules, against transformers/diffusers.

Tiny random models with each family's topology: OpenCLIP towers (GELU, projection, penultimate layer), 64-wide UNet
heads with linear projections, v-prediction. Weights reach the references through diffusers' own single-file
converters or through folders we write, so our key rules are checked against theirs as well.
"""
import pytest
import torch

from conftest import TINY_SDXL
from reference import max_rel_err, randomize_
from sdtorch.checkpoint import convert, load_checkpoint, save_checkpoint
from sdtorch.checkpoint.infer import sd2_predicts_v
from sdtorch.config import SD2, SD2_768_V, CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from sdtorch.models import StableDiffusionModels
from sdtorch.pipeline import Pipeline, Settings, seed_noise
from sdtorch.tokenizer import CLIPTokenizer

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"

# SD 2.x's topology at small widths: 64-wide UNet heads (1 and 2 of them), linear projections, an OpenCLIP tower of
# 3 GELU layers (one 64-wide head) with its projection, SD's f=8 VAE at width 32. Head widths and norm groups are the
# family's, so that a bare file's shapes imply exactly this config.
TINY_SD2 = ModelConfig(
    family="sd2", prediction_type="v_prediction", clip_pad_token_id=0, resolution=768,
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(1, 2), num_head_channels=64,
                    context_dim=64, use_linear_in_transformer=True),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    clip=CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                        hidden_act="gelu", projection_dim=64))


def to_unit(pixels):
    return (pixels / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def sd2_models():
    return randomize_(StableDiffusionModels(TINY_SD2), seed=4).eval()


@pytest.fixture(scope="module")
def sd2_file(sd2_models, tmp_path_factory):
    return save_checkpoint(sd2_models, tmp_path_factory.mktemp("sd2") / "sd2.safetensors")


def test_sd2_single_file_has_openclip_keys(sd2_file):
    from safetensors import safe_open

    with safe_open(sd2_file, "pt") as f:
        keys = set(f.keys())
    prefix = "cond_stage_model.model."
    assert {prefix + k for k in ("positional_embedding", "token_embedding.weight", "ln_final.weight",
                                 "text_projection", "transformer.resblocks.2.attn.in_proj_weight",
                                 "transformer.resblocks.2.attn.in_proj_bias", "transformer.resblocks.0.mlp.c_fc.bias",
                                 "transformer.resblocks.0.ln_1.weight")} <= keys
    assert not any(k.startswith("cond_stage_model.transformer") or "q_proj" in k for k in keys)


def test_openclip_tower_equals_transformers_through_diffusers_converter(sd2_models, sd2_file):
    """diffusers' convert_open_clip_checkpoint (fused in_proj split, text_projection transposed) takes our file's
    tower into transformers' CLIPTextModelWithProjection; SD 2.x uses the penultimate layer, final LayerNorm applied."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModelWithProjection

    c = TINY_SD2.clip
    ref = CLIPTextModelWithProjection(HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads, hidden_act="gelu",
        projection_dim=c.projection_dim, attn_implementation="eager")).eval()
    file = load_file(sd2_file)
    state = convert_open_clip_checkpoint(ref, file)
    # diffusers drops SD 2's projection (unused there); OpenCLIP applies it as x @ P, a Linear of weight Pᵀ
    state["text_projection.weight"] = file["cond_stage_model.model.text_projection"].t()
    ref.load_state_dict(state, strict=False)
    assert not {k for k in ref.state_dict() if "position_ids" not in k} - state.keys()
    ids = CLIPTokenizer.default(pad_token_id=0)(["a photo of a cat", "an astronaut riding a horse"])
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        penultimate = ref.text_model.final_layer_norm(out.hidden_states[-2])
        tower = sd2_models.text_encoder
        assert max_rel_err(tower(ids, clip_skip=2), penultimate) < 1e-5
        _, pooled = tower.hidden_and_pooled(ids)
        assert max_rel_err(pooled, out.text_embeds) < 1e-5


def test_sd2_file_loads_back_bit_exact_and_is_sd2(sd2_models, sd2_file):
    loaded = load_checkpoint(sd2_file)
    assert loaded.config == TINY_SD2
    for k, v in sd2_models.state_dict().items():
        assert torch.equal(loaded.models.state_dict()[k], v), k


def test_sd2_shapes_imply_the_config_and_the_parameterization_is_tested(tmp_path, sd2_models):
    """A bare SD 2.x file (no header): sizes from shapes, 64-wide UNet heads, pad 0; v or ε from A1111's test."""
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(save_checkpoint(sd2_models, tmp_path / "full.safetensors")), bare)  # header dropped
    loaded = load_checkpoint(bare)
    assert loaded.config.family == "sd2" and loaded.config.unet.num_head_channels == 64
    assert loaded.config.clip == TINY_SD2.clip and loaded.config.clip_pad_token_id == 0
    v = sd2_predicts_v(loaded.models.unet)
    assert loaded.config.prediction_type == ("v_prediction" if v else "epsilon")
    assert loaded.config.resolution == (768 if v else 512)
    bare.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_checkpoint(bare).config.prediction_type == "v_prediction"  # the sidecar wins


def test_a1111_v_test_reads_the_output_at_t_999():
    """v ≈ -x at the last timestep: an output below the input by more than 1 means v (modules/sd_models_config.py)."""
    unet = StableDiffusionModels(TINY_SD2).unet.eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
        assert not sd2_predicts_v(unet)  # output 0, input 0.5: -0.5
        unet.out[2].bias.fill_(-2.0)
        assert sd2_predicts_v(unet)  # -2.5


@pytest.fixture(scope="module")
def sd2_folder(sd2_file, tmp_path_factory):
    return convert(sd2_file, tmp_path_factory.mktemp("sd2dir") / "folder", to_diffusers=True)


def euler(prediction_type):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type=prediction_type, timestep_spacing="linspace")


@torch.no_grad()
def test_sd2_txt2img_equals_diffusers_on_our_folder(sd2_file, sd2_folder):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(sd2_folder, local_files_only=True)
    assert ref.text_encoder.config.num_hidden_layers == 2  # the penultimate layer is diffusers' last
    ref.scheduler = euler("v_prediction")
    ref.set_progress_bar_config(disable=True)
    s = Settings(PROMPT, NEGATIVE, steps=4, cfg=7.5, sampler="Euler", seed=3, width=48, height=32)
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=32, width=48,
                 latents=seed_noise(3, 1, (4, 4, 6)), output_type="pt").images
    for path in (sd2_file, sd2_folder):  # the single file, and the folder read back (a zero 3rd layer added)
        loaded = load_checkpoint(path)
        assert loaded.config.family == "sd2" and loaded.config.prediction_type == "v_prediction"
        pipe = Pipeline(loaded.models, loaded.tokenizer, loaded.config, device="cpu")
        ours = pipe.run(Settings(**{**s.__dict__}))
        assert ours.shape == theirs.shape == (1, 3, 32, 48)
        assert (to_unit(ours) - theirs).abs().max() < 1e-3


@torch.no_grad()
def test_sd2_folder_to_single_file_and_back(sd2_folder, tmp_path):
    """A folder's tower has no last layer; its single file gets a zero one, the identity, so that every tool's
    "penultimate layer" is the folder's last."""
    single = convert(sd2_folder, tmp_path / "back.safetensors")
    loaded, folder = load_checkpoint(single), load_checkpoint(sd2_folder)
    assert loaded.config.family == "sd2"
    last = "cond_stage_model.model.encoder.layers.2."
    assert all(not t.any() for k, t in loaded.models.state_dict().items() if k.startswith(last))
    ids = CLIPTokenizer.default(pad_token_id=0)([PROMPT])
    assert torch.equal(loaded.models.text_encoder(ids, clip_skip=2), folder.models.text_encoder(ids, clip_skip=2))
    again = convert(single, tmp_path / "again", to_diffusers=True)
    assert load_checkpoint(again).config == folder.config


def test_sd2_single_file_loads_in_diffusers_from_single_file(sd2_file, sd2_folder, sd2_models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(sd2_file), config=str(sd2_folder), local_files_only=True,
                                                    safety_checker=None)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    ids = CLIPTokenizer.default(pad_token_id=0)([PROMPT])
    with torch.no_grad():
        assert max_rel_err(sd2_models.unet(x, torch.tensor([500.0]), context),
                           pipe.unet(x, 500, context).sample) < 1e-5
        # diffusers' SD 2 text encoder keeps the converted layers it has a place for (its config: 2 of 3)
        assert max_rel_err(sd2_models.text_encoder(ids, clip_skip=2), pipe.text_encoder(ids).last_hidden_state) < 1e-5


def test_full_size_sd2_keys_match_diffusers_on_meta():
    """The 512 and 768-v configs at full size, on the meta device: our key rules map every UNet and tower tensor of
    the original layout onto diffusers' SD 2 UNet and transformers' 23-layer ViT-H, shape for shape."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel

    from sdtorch.checkpoint.diffusers_configs import clip_to_transformers, unet_to_diffusers
    from sdtorch.checkpoint.diffusers_folder import diffusers_clip, part_to_diffusers

    assert SD2_768_V.unet == SD2.unet and SD2_768_V.resolution == 768
    with torch.device("meta"):
        ours = StableDiffusionModels(SD2)
        unet_config = {k: v for k, v in unet_to_diffusers(SD2.unet).items() if not k.startswith("_")}
        ref_unet = UNet2DConditionModel(**unet_config)
        hf = clip_to_transformers(diffusers_clip(SD2), 49406, 49407, 0)
        ref_clip = CLIPTextModel(HFConfig(**{k: v for k, v in hf.items() if k != "architectures"}))
    assert unet_config["attention_head_dim"] == [5, 10, 20, 20]  # heads of 64 channels, as SD 2's config says
    unet = part_to_diffusers("unet", ours.unet.state_dict(), SD2)
    assert {k: v.shape for k, v in unet.items()} == {k: v.shape for k, v in ref_unet.state_dict().items()}
    clip = part_to_diffusers("text_encoder", ours.text_encoder.state_dict(), SD2)
    clip = {k.removeprefix("text_model."): v.shape for k, v in clip.items()}
    ref_shapes = {k.removeprefix("text_model."): v.shape for k, v in ref_clip.state_dict().items()
                  if "position_ids" not in k}
    assert clip == ref_shapes and ref_clip.config.num_hidden_layers == 23
    # ViT-H's text tower: tokens 49408·1024 + positions 77·1024 + 24 layers of 12,596,224 + final norm 2·1024 +
    # projection 1024² = 354,032,640 (OpenCLIP's tables round it to 354.03 M)
    assert sum(p.numel() for p in ours.text_encoder.parameters()) == 354_032_640


def test_info_names_the_family(sd2_file):
    from test_cli import sdtorch

    r = sdtorch("info", sd2_file)
    assert r.returncode == 0, r.stderr
    for expected in ["family: SD 2.x", "prediction type: v_prediction", "default size: 768x768",
                     "text_encoder parameters:"]:
        assert expected in r.stdout, (expected, r.stdout)


# ---------------------------------------------------------------- SDXL

# TINY_SDXL and the sdxl_models / sdxl_file / sdxl_folder fixtures are conftest's (tests/test_refiner.py uses them too)


def test_sdxl_single_file_layout_and_bare_shapes(sdxl_models, sdxl_file, sdxl_folder, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(sdxl_file, "pt") as f:
        keys = set(f.keys())
    assert {"conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
            "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight",
            "model.diffusion_model.label_emb.0.2.bias"} <= keys
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)  # no attention at level 0
    loaded = load_checkpoint(sdxl_file)
    assert loaded.config == TINY_SDXL
    for k, v in sdxl_models.state_dict().items():
        assert torch.equal(loaded.models.state_dict()[k], v), k
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(sdxl_file), bare)  # no header: the family and the shapes say it all
    assert load_checkpoint(bare).config == TINY_SDXL
    from_folder = load_checkpoint(sdxl_folder)  # the diffusers folder we wrote, read back: the same model
    assert from_folder.config == TINY_SDXL
    for k, v in sdxl_models.state_dict().items():
        assert torch.equal(from_folder.models.state_dict()[k], v), k


def test_bigg_tower_equals_transformers_with_projection(sdxl_models, sdxl_file):
    """diffusers' converter takes our file's bigG into CLIPTextModelWithProjection: SDXL's context is the
    penultimate hidden state without the final LayerNorm, its pooled text `text_embeds`."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModelWithProjection

    c = TINY_SDXL.clip_2
    ref = CLIPTextModelWithProjection(HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads, hidden_act="gelu",
        projection_dim=c.projection_dim, attn_implementation="eager")).eval()
    state = convert_open_clip_checkpoint(ref, load_file(sdxl_file), prefix="conditioner.embedders.1.model.")
    ref.load_state_dict(state, strict=False)
    assert not {k for k in ref.state_dict() if "position_ids" not in k} - state.keys()
    ids = CLIPTokenizer.default(pad_token_id=0)(["a photo of a cat", "an astronaut riding a horse"])
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hidden, pooled = sdxl_models.text_encoders[1].hidden_and_pooled(ids)
    assert max_rel_err(hidden, out.hidden_states[-2]) < 1e-5
    assert max_rel_err(pooled, out.text_embeds) < 1e-5


@pytest.mark.parametrize("negative", [NEGATIVE, ""], ids=["negative", "empty-negative-is-zeros"])
@torch.no_grad()
def test_sdxl_txt2img_equals_diffusers(sdxl_file, sdxl_folder, negative):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True)
    ref.scheduler = euler("epsilon")
    ref.set_progress_bar_config(disable=True)
    sizes = {} if negative else dict(original_size=(64, 96), crop_top_left=(8, 4), target_size=(40, 48))
    s = Settings(PROMPT, negative, steps=3, cfg=6.0, sampler="Euler", seed=5, width=48, height=32, **sizes)
    theirs = ref(PROMPT, negative_prompt=negative or None, num_inference_steps=3, guidance_scale=6.0, height=32,
                 width=48, latents=seed_noise(5, 1, (4, 4, 6)), output_type="pt",
                 **{"crops_coords_top_left" if k == "crop_top_left" else k: v for k, v in sizes.items()}).images
    loaded = load_checkpoint(sdxl_file)
    pipe = Pipeline(loaded.models, loaded.tokenizer, loaded.config, device="cpu")
    ours = pipe.run(s)
    assert ours.shape == theirs.shape == (1, 3, 32, 48)
    assert (to_unit(ours) - theirs).abs().max() < 1e-3


def test_sdxl_single_file_loads_in_diffusers_from_single_file(sdxl_file, sdxl_folder, sdxl_models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(sdxl_file), config=str(sdxl_folder), local_files_only=True)
    g = torch.Generator().manual_seed(0)
    x, context, y = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 192, generator=g), torch.randn(1, 1664,
                                                                                                          generator=g)
    with torch.no_grad():
        theirs = pipe.unet(x, 500, context, added_cond_kwargs={"text_embeds": y[:, :128], "time_ids": torch.tensor(
            [[64.0, 96, 8, 4, 40, 48]])}).sample
        from sdtorch.conditioning import size_embedding
        y = torch.cat([y[:, :128], size_embedding((64, 96), (8, 4), (40, 48))], dim=1)
        assert max_rel_err(sdxl_models.unet(x, torch.tensor([500.0]), context, y), theirs) < 1e-5
        ids = CLIPTokenizer.default()([PROMPT])
        ours_l, _ = sdxl_models.text_encoders[0].hidden_and_pooled(ids)
        assert max_rel_err(ours_l, pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]) < 1e-5


def test_full_size_sdxl_matches_diffusers_config_and_keys_on_meta():
    """SDXL base at full size on the meta device: the UNet config is the one stabilityai's unet/config.json states,
    and every UNet and text tower tensor maps onto diffusers'/transformers' models shape for shape."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModelWithProjection

    from sdtorch.checkpoint.diffusers_configs import clip_to_transformers, unet_from_diffusers, unet_to_diffusers
    from sdtorch.checkpoint.diffusers_folder import part_to_diffusers
    from sdtorch.config import SDXL

    published = {"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
                 "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True}
    assert unet_from_diffusers(published, "sdxl") == SDXL.unet
    ours_json = unet_to_diffusers(SDXL.unet)
    assert {k: ours_json[k] for k in published} == published
    with torch.device("meta"):
        ours = StableDiffusionModels(SDXL)
        ref_unet = UNet2DConditionModel(**{k: v for k, v in ours_json.items() if not k.startswith("_")})
        hf = clip_to_transformers(SDXL.clip_2, 49406, 49407, 0)
        ref_bigg = CLIPTextModelWithProjection(HFConfig(**{k: v for k, v in hf.items() if k != "architectures"}))
    unet = part_to_diffusers("unet", ours.unet.state_dict(), SDXL)
    assert {k: v.shape for k, v in unet.items()} == {k: v.shape for k, v in ref_unet.state_dict().items()}
    assert sum(p.numel() for p in ours.unet.parameters()) == sum(p.numel() for p in ref_unet.parameters())
    bigg = part_to_diffusers("text_encoder_2", ours.text_encoders[1].state_dict(), SDXL)
    assert {k: v.shape for k, v in bigg.items()} == {k: v.shape for k, v in ref_bigg.state_dict().items()
                                                    if "position_ids" not in k}
    assert SDXL.vae.scale_factor == 0.13025 and SDXL.resolution == 1024


def test_sdxl_sizes_are_written_when_not_a1111s_defaults(sdxl_models):
    pipe = Pipeline(sdxl_models, CLIPTokenizer.default(), TINY_SDXL, device="cpu")
    plain = pipe.infotext_params(Settings(PROMPT, width=48, height=32), with_image=False)
    assert "Original size" not in str({k for k, v in plain.items() if v is not None})
    params = pipe.infotext_params(Settings(PROMPT, width=48, height=32, original_size=(64, 96), crop_top_left=(8, 4),
                                           target_size=(40, 48)), with_image=False)
    assert (params["Original size"], params["Crop"], params["Target size"]) == ("96x64", "8,4", "48x40")
    from sdtorch.metadata import params_to_kwargs  # --from reads them back as the settings they came from
    assert params_to_kwargs({k: params[k] for k in ("Original size", "Crop", "Target size")}) == dict(
        original_size=(64, 96), crop_top_left=(8, 4), target_size=(40, 48))
    with pytest.raises(ValueError, match="crop_top_left must be two non-negative integers"):
        pipe.run(Settings(PROMPT, steps=1, width=32, height=32, crop_top_left=(-1, 0)))


def test_size_conditioning_is_refused_for_other_families():
    from conftest import TINY, tiny_models
    from sdtorch.pipeline import SettingError

    pipe = Pipeline(tiny_models(), CLIPTokenizer.default(), TINY, device="cpu")
    with pytest.raises(SettingError, match="condition SDXL models only; this is an SD1 model"):
        pipe.txt2img(PROMPT, steps=1, width=32, height=32, original_size=(64, 64))


def test_an_sdxl_refiner_is_told_by_its_keys(tmp_path):
    """bigG alone, as embedder 0, is the refiner (tests/test_refiner.py runs it); a stub with its keys is read as one
    and refused for what it lacks, naming the file."""
    from safetensors.torch import save_file

    from sdtorch.checkpoint import CheckpointError
    from sdtorch.checkpoint.infer import detect_family

    path = tmp_path / "refiner.safetensors"
    stub = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)}
    save_file(stub, path)
    assert detect_family(stub) == "sdxl_refiner"
    with pytest.raises(CheckpointError, match="refiner.safetensors"):
        load_checkpoint(path)


@torch.no_grad()
def test_sdxl_img2img_equals_diffusers(sdxl_file, sdxl_folder):
    import numpy as np
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from sdtorch.images import pil_to_tensor

    ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_folder, local_files_only=True)
    ref.scheduler = euler("epsilon")
    ref.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    loaded = load_checkpoint(sdxl_file)
    pipe = Pipeline(loaded.models, loaded.tokenizer, loaded.config, device="cpu")
    ours = pipe.run(Settings(PROMPT, NEGATIVE, steps=4, cfg=5.0, sampler="Euler", seed=7, width=48, height=32,
                             strength=0.6, convention="diffusers"), init_image=init)  # diffusers' step count
    # diffusers takes our (posterior-mean) init latents directly and draws the same seed's noise
    theirs = ref(PROMPT, image=pipe.encode_image(pil_to_tensor(init)), strength=0.6, negative_prompt=NEGATIVE,
                 num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
                 output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, 32, 48)
    assert (to_unit(ours) - theirs).abs().max() < 1e-3


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_9_channel_inpainting_models_equal_diffusers(family, tmp_path):
    """SD 2.x and SDXL inpainting models (9 input channels: latents, mask, masked image's latents) against diffusers'
    inpainting pipelines on our folder, inside the mask (outside it sdtorch pastes the original back, as A1111 does)."""
    import numpy as np
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
    from PIL import Image

    from sdtorch.images import pil_to_tensor

    base = {"sd2": TINY_SD2, "sdxl": TINY_SDXL}[family]
    cfg = base.replace(unet=base.unet.__class__(**{**base.unet.__dict__, "in_channels": 9}))
    path = save_checkpoint(randomize_(StableDiffusionModels(cfg), seed=13).eval(), tmp_path / "inpaint.safetensors")
    folder = convert(path, tmp_path / "folder", to_diffusers=True)
    loaded = load_checkpoint(path)
    assert loaded.config.unet.in_channels == 9
    pipe = Pipeline(loaded.models, loaded.tokenizer, loaded.config, device="cpu")
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (8, 0, 32, 32))  # repaint columns 8-31
    s = Settings(PROMPT, NEGATIVE, steps=4, cfg=5.0, sampler="Euler", seed=9, width=48, height=32, strength=0.75,
                 convention="diffusers")
    ours = pipe.run(s, init_image=init, mask=mask, mask_blur=0)
    kind = {"sd2": StableDiffusionInpaintPipeline, "sdxl": StableDiffusionXLInpaintPipeline}[family]
    ref = kind.from_pretrained(folder, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = euler(cfg.prediction_type)
    ref.set_progress_bar_config(disable=True)
    image = pil_to_tensor(init)
    masked = image * (pil_to_tensor(mask.convert("RGB"))[:, :1] < 0)  # the part to repaint zeroed, as both do
    # our posterior-mean latents for both the image and the masked image (diffusers would sample the posterior)
    theirs = ref(PROMPT, image=pipe.encode_image(image), mask_image=mask, masked_image_latents=pipe.encode_image(
        masked), strength=0.75, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0, height=32,
        width=48, generator=torch.Generator().manual_seed(9), output_type="pt").images
    inside = (slice(None), slice(None), slice(None), slice(8, 32))
    assert (to_unit(ours)[inside] - theirs[inside]).abs().max() < 1e-3
    outside = to_unit(ours)[..., 40:]
    assert torch.allclose(outside, (image[..., 40:] / 2 + 0.5).clamp(0, 1), atol=1e-6)  # the original, pasted back
