"""Our CLIP, VAE and UNet compute the same functions as transformers/diffusers, on the full SD 1.5 (and SD 2.x UNet)
sizes, with random weights carried across by diffusers' own single-file converters."""
import pytest
import torch

from reference import diffusers_unet, diffusers_vae, max_rel_err, prefixed, randomize_, transformers_clip
from sdtorch.config import SD1, SD2_UNET, CLIPTextConfig
from sdtorch.models import AutoencoderKL, CLIPTextModel, StableDiffusionModels, UNet

TOL = 1e-4  # fp32; the measured errors are ~1e-6 (summation order differs between implementations)


@pytest.fixture(scope="module")
def sd15_unet():
    torch.manual_seed(0)
    return randomize_(UNet(SD1.unet), seed=1).eval()


def unet_inputs(batch=2, h=8, w=12, context_dim=768, channels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, h, w, generator=g)
    t = torch.tensor([999.0, 1.0, 500.0, 250.0][:batch])  # a different timestep per sample
    context = torch.randn(batch, 77, context_dim, generator=g)
    return x, t, context


def test_state_dict_keys_are_the_original_checkpoint_layout():
    with torch.device("meta"):
        models = StableDiffusionModels(SD1)
    keys = set(models.state_dict())
    # a few keys every SD 1.x single-file checkpoint has, one per kind of module
    for k in ["model.diffusion_model.input_blocks.0.0.weight",
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
              "model.diffusion_model.input_blocks.3.0.op.weight",
              "model.diffusion_model.middle_block.1.proj_in.weight",
              "model.diffusion_model.output_blocks.2.1.conv.weight",
              "model.diffusion_model.output_blocks.5.2.conv.weight",
              "model.diffusion_model.time_embed.2.bias",
              "model.diffusion_model.out.2.weight",
              "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
              "first_stage_model.encoder.down.0.downsample.conv.weight",
              "first_stage_model.decoder.up.3.upsample.conv.weight",
              "first_stage_model.encoder.mid.attn_1.q.weight",
              "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
              "first_stage_model.quant_conv.weight", "first_stage_model.post_quant_conv.bias",
              "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
              "cond_stage_model.transformer.text_model.final_layer_norm.bias",
              "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"]:
        assert k in keys, k
    # 686 UNet + 248 VAE + 196 CLIP tensors: the counts of the original SD 1.5 checkpoint's weights
    assert sum(k.startswith("model.diffusion_model.") for k in keys) == 686
    assert sum(k.startswith("first_stage_model.") for k in keys) == 248
    assert sum(k.startswith("cond_stage_model.") for k in keys) == 196
    assert len(keys) == 686 + 248 + 196


def test_sd15_parameter_counts():
    with torch.device("meta"):
        models = StableDiffusionModels(SD1)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(models.unet) == 859_520_964
    assert count(models.vae) == 83_653_863
    assert count(models.text_encoder) == 123_060_480


@torch.no_grad()
def test_sd15_unet_matches_diffusers(sd15_unet):
    ref = diffusers_unet(prefixed("unet", sd15_unet.state_dict()), SD1)
    x, t, context = unet_inputs(batch=2, h=8, w=12)  # non-square latent (12 is no multiple of 8), a t per sample
    ours = sd15_unet(x, t, context)
    theirs = ref(x, t, encoder_hidden_states=context).sample
    assert ours.shape == (2, 4, 8, 12)
    assert max_rel_err(ours, theirs) < TOL


@torch.no_grad()
def test_per_sample_timesteps_equal_separate_calls(sd15_unet):
    x, t, context = unet_inputs(batch=2, h=8, w=8)
    both = sd15_unet(x, t, context)
    one_by_one = torch.cat([sd15_unet(x[i:i + 1], t[i:i + 1], context[i:i + 1]) for i in range(2)])
    assert max_rel_err(both, one_by_one) < TOL


@torch.no_grad()
def test_sd2_unet_matches_diffusers():
    unet = randomize_(UNet(SD2_UNET), seed=2).eval()
    ref = diffusers_unet(prefixed("unet", unet.state_dict()), SD1.replace(unet=SD2_UNET))
    x, t, context = unet_inputs(batch=2, h=8, w=8, context_dim=1024)
    assert max_rel_err(unet(x, t, context), ref(x, t, encoder_hidden_states=context).sample) < TOL


@torch.no_grad()
def test_sd15_vae_matches_diffusers():
    vae = randomize_(AutoencoderKL(SD1.vae), seed=3).eval()
    ref = diffusers_vae(prefixed("vae", vae.state_dict()), SD1)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 96, generator=g) * 2 - 1
    ours, theirs = vae.encode(image), ref.encode(image).latent_dist
    assert ours.mean.shape == (1, 4, 8, 12)
    assert max_rel_err(ours.mean, theirs.mean) < TOL
    assert max_rel_err(ours.logvar, theirs.logvar) < TOL
    z = torch.randn(1, 4, 8, 12, generator=g)
    decoded = vae.decode(z)
    assert decoded.shape == (1, 3, 64, 96)
    assert max_rel_err(decoded, ref.decode(z).sample) < TOL


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd15_clip_matches_transformers(clip_skip):
    clip = randomize_(CLIPTextModel(SD1.clip), seed=4).eval()
    ref = transformers_clip(prefixed("text_encoder", clip.state_dict()), SD1)
    ids = torch.randint(0, SD1.clip.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    out = ref(ids, output_hidden_states=True)
    # A1111's clip skip: hidden_states[-clip_skip] passed through the final LayerNorm
    expected = out.last_hidden_state if clip_skip == 1 else ref.final_layer_norm(out.hidden_states[-clip_skip])
    assert max_rel_err(clip(ids, clip_skip=clip_skip), expected) < TOL


@torch.no_grad()
def test_gelu_clip_variant_matches_transformers():
    cfg = SD1.replace(clip=CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, hidden_act="gelu"))
    clip = randomize_(CLIPTextModel(cfg.clip), seed=5).eval()
    ref = transformers_clip(prefixed("text_encoder", clip.state_dict()), cfg)
    ids = torch.randint(0, cfg.clip.vocab_size, (1, 77), generator=torch.Generator().manual_seed(1))
    assert max_rel_err(clip(ids), ref(ids).last_hidden_state) < TOL


def test_fp16_groupnorm_runs_in_fp32():
    from sdtorch.models.norm import GroupNorm32
    norm = GroupNorm32(4, 8)
    x = torch.randn(1, 8, 4, 4) * 1000  # large activations: the fp16 variance would overflow
    ref = norm(x)
    out = norm.half()(x.half())
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 1e-2  # fp16 output rounding only


def test_bad_inputs_raise_clear_errors(sd15_unet):
    x, t, context = unet_inputs(batch=1)
    with pytest.raises(ValueError, match="expects latents"):
        sd15_unet(torch.zeros(1, 9, 8, 8), t, context)
    with pytest.raises(ValueError, match="expects context"):
        sd15_unet(torch.zeros(1, 4, 8, 8), t, torch.zeros(1, 77, 1024))
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2))
    with pytest.raises(ValueError, match="token ids"):
        clip(torch.tensor([[0, 49408]]))
    vae = AutoencoderKL(SD1.vae.__class__(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="expected latents"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_position_embedding_codes_rows_and_columns_apart_and_adds_no_weights():
    import dataclasses

    from conftest import TINY
    from sdtorch.checkpoint.diffusers_configs import unet_to_diffusers
    from sdtorch.checkpoint.errors import UnsupportedModelError
    from sdtorch.models.unet import position_embedding_2d

    e = position_embedding_2d(4, 6, 16).view(4, 6, 16)
    assert torch.equal(e[:, :, :8], e[:, :1, :8].expand(4, 6, 8))  # the first half depends on the row only
    assert torch.equal(e[:, :, 8:], e[:1, :, 8:].expand(4, 6, 8))  # the second half on the column only
    assert len({tuple(v.tolist()) for v in e.view(24, 16)}) == 24  # every cell has its own code
    # positions are fractions of the side: the centre row of a 3-row grid is the centre of a 9-row one
    assert torch.allclose(position_embedding_2d(3, 3, 16)[4], position_embedding_2d(9, 9, 16)[40], atol=1e-6)

    plain = randomize_(UNet(TINY.unet), seed=1).eval()
    with_positions = UNet(dataclasses.replace(TINY.unet, position_embedding=True)).eval()
    with_positions.load_state_dict(plain.state_dict())  # strict: the same keys, no new weights
    x, t, context = unet_inputs(context_dim=TINY.unet.context_dim)
    with torch.no_grad():
        assert (with_positions(x, t, context) - plain(x, t, context)).abs().max() > 1e-3
    with pytest.raises(UnsupportedModelError, match="position embedding"):
        unet_to_diffusers(with_positions.config)
