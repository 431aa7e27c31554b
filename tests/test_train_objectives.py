"""The objectives against their references: CLIP's image tower and contrastive loss against transformers' CLIPModel,
the UNet loss against diffusers' DDPMScheduler + UNet2DConditionModel, min-SNR weights against diffusers'
training recipe, and the VAE loss against its definition."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, tiny_models
from reference import diffusers_unet, max_rel_err, prefixed, randomize_
from sdtorch.config import CLIPTextConfig, VAEConfig
from sdtorch.diffusion.schedule import DiscreteSchedule
from sdtorch.tokenizer import CLIPTokenizer
from sdtorch.train.image_encoder import CLIPVisionConfig
from sdtorch.train.objectives import (CLIPObjective, UNetObjective, VAEObjective, edge_map, min_snr_weight,
                                      seeded_generators, seeded_randn, use_gradient_checkpointing)

TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=32)
VISION = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=3)
CAPTIONS = ["a red circle on a blue background", "a small green square at the top left on a white background",
            "a large yellow triangle on a black background", ""]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On the shared 2-core test machine two spinning OpenMP threads make these tiny ops many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clip_objective() -> CLIPObjective:
    torch.manual_seed(0)
    objective = CLIPObjective(TEXT, VISION, projection_dim=16)
    randomize_(objective, seed=1)
    with torch.no_grad():
        objective.logit_scale.fill_(2.0)
    return objective


def _transformers_clip(objective: CLIPObjective):
    from transformers import CLIPConfig, CLIPModel

    t, v = TEXT, VISION
    config = CLIPConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act),
        vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                           intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                           num_attention_heads=v.num_attention_heads, hidden_act=v.hidden_act),
        projection_dim=16, attn_implementation="eager")
    model = CLIPModel(config)
    model.load_state_dict(objective.state_dict(), strict=True)  # same attribute names: no key mapping
    return model.eval()


def test_clip_loss_and_embeddings_match_transformers_clipmodel():
    objective = _clip_objective()
    reference = _transformers_clip(objective)
    ids = CLIPTokenizer.default()(CAPTIONS, max_length=TEXT.max_position_embeddings)
    images = torch.rand(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    loss, metrics = objective({"image": images, "ids": ids})
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=images, return_loss=True)
    assert max_rel_err(objective.embed_images(images).detach(), out.image_embeds) < 1e-5
    assert max_rel_err(objective.embed_text(ids).detach(), out.text_embeds) < 1e-5
    assert abs(loss.item() - out.loss.item()) / out.loss.item() < 1e-5
    assert metrics["temperature"].item() == pytest.approx(torch.tensor(-2.0).exp().item(), rel=1e-6)
    vision = reference.vision_model(pixel_values=images).pooler_output
    assert max_rel_err(objective.vision_model(images).detach(), vision) < 1e-5


def test_clip_retrieval_counts_a_hit_when_the_caption_matches():
    objective = _clip_objective().eval()
    ids = CLIPTokenizer.default()(CAPTIONS, max_length=TEXT.max_position_embeddings)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    batch = {"image": images, "ids": ids, "caption": CAPTIONS}
    best = (objective.embed_text(ids) @ objective.embed_images(images).T).argmax(1)
    result = objective.evaluate([batch])
    assert result["retrieval_top1"] == (best == torch.arange(4)).float().mean().item()
    assert result["chance"] == 0.25
    with pytest.raises(ValueError, match="expected images"):
        objective.vision_model(torch.zeros(1, 3, 16, 16))


def test_vae_loss_is_reconstruction_plus_weighted_kl():
    torch.manual_seed(0)
    cfg = VAEConfig(ch=16, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=8)
    objective = VAEObjective(cfg, "mse", kl_weight=0.5)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    seeds = torch.tensor([11, 12])
    loss, metrics = objective({"image": images, "seed": seeds})
    posterior = objective.vae.encode(images)
    eps = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    recon = objective.vae.decode(posterior.mean + posterior.std * eps)
    expected = F.mse_loss(recon, images) + 0.5 * posterior.kl().mean() / (3 * 32 * 32)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    result = objective.evaluate([{"image": images, "seed": seeds}])
    z = posterior.mean + posterior.std * eps
    assert result["scale_factor"] == pytest.approx(1 / z.std().item(), rel=1e-5)
    assert objective.scale_factor == result["scale_factor"]
    with pytest.raises(ValueError):
        VAEObjective(cfg, "lpips")


def test_decoder_only_vae_trains_the_decoder_alone_and_keeps_the_latent_space():
    torch.manual_seed(0)
    cfg = VAEConfig(ch=16, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=8, scale_factor=0.3)
    full = VAEObjective(cfg, "mse", kl_weight=0.5)
    frozen = VAEObjective(cfg, "mse", kl_weight=0.5, decoder_only=True, cache_items=8)
    frozen.load_state_dict(full.state_dict())
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {"image": images, "seed": torch.tensor([11, 12, 13])}
    # the same objective value (the KL is a constant of the frozen encoder, still logged)
    assert frozen(batch)[0].item() == pytest.approx(full(batch)[0].item(), rel=1e-6)
    optimizer = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    for _ in range(2):  # the second step reads the encoder's posterior from the cache
        optimizer.zero_grad()
        frozen(batch)[0].backward()
        optimizer.step()
    after = frozen.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("vae.decoder.", "vae.post_quant_conv.")) for k in changed)
    assert frozen.cache.misses == 3 and frozen.cache.hits == 6  # three calls, the encoder ran in the first only
    cached = frozen(batch)[0].item()
    frozen.cache = None
    assert frozen(batch)[0].item() == pytest.approx(cached, rel=1e-6)
    frozen.evaluate([batch])
    assert frozen.scale_factor == 0.3  # the UNets trained on this latent space were trained with this scale
    with pytest.raises(ValueError, match="frozen encoder"):
        VAEObjective(cfg, "mse", cache_items=8)


def test_vae_without_latent_noise_decodes_the_posterior_mean():
    torch.manual_seed(0)
    cfg = VAEConfig(ch=16, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=8)
    objective = VAEObjective(cfg, "l1", kl_weight=0.5, latent_noise=0.0)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss, _ = objective({"image": images, "seed": torch.tensor([11, 12])})
    posterior = objective.vae.encode(images)
    expected = F.l1_loss(objective.vae.decode(posterior.mean), images) + 0.5 * posterior.kl().mean() / (3 * 32 * 32)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="latent_noise"):
        VAEObjective(cfg, latent_noise=-1.0)


def test_edge_weight_weighs_the_pixels_beside_each_edge():
    images = torch.full((1, 3, 16, 16), -1.0)
    images[0, 1, 3:7, 4:9] = 0.8  # a green rectangle: rows 3-6, columns 4-8
    images[0, 0, 9, 1] = -1.02  # a step below the threshold is no edge
    # a pixel is beside an edge when its 3x3 neighbourhood holds both colours: one ring inside and one outside
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[3:7, 4:9] = True
    expected = torch.zeros(16, 16)
    for r in range(16):
        for c in range(16):
            around = inside[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
            expected[r, c] = float(around.any() and not around.all())
    assert torch.equal(edge_map(images)[0, 0], expected)
    assert expected.sum() == 14 + 22  # the rings: the 4x5 rectangle's border inside, a 6x7 one outside

    cfg = VAEConfig(ch=16, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=8)
    torch.manual_seed(0)
    weighted = VAEObjective(cfg, "mse", kl_weight=0.0, latent_noise=0.0, edge_weight=4.0)
    batch = {"image": images, "seed": torch.tensor([3])}
    loss, _ = weighted(batch)
    error = (weighted.vae.decode(weighted.vae.encode(images).mean) - images).pow(2)  # (1, 3, 16, 16)
    weight = 1 + 4.0 * expected
    assert loss.item() == pytest.approx(((error * weight).sum() / (3 * weight.sum())).item(), rel=1e-6)
    weighted.edge_weight = 0.0
    assert weighted(batch)[0].item() == pytest.approx(error.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="edge_weight"):
        VAEObjective(cfg, edge_weight=-1.0)


def test_seeded_noise_depends_only_on_each_samples_seed():
    a = seeded_randn(seeded_generators(torch.tensor([5, 6, 7])), (2, 3), torch.device("cpu"))
    b = seeded_randn(seeded_generators(torch.tensor([7])), (2, 3), torch.device("cpu"))
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_recipe(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    t = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(scheduler, t)
    # diffusers' examples/text_to_image/train_text_to_image.py
    expected = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    expected = expected / snr if prediction_type == "epsilon" else expected / (snr + 1)
    ac = DiscreteSchedule.scaled_linear().alphas_cumprod[t]
    assert max_rel_err(min_snr_weight(ac / (1 - ac), 5.0, prediction_type), expected) < 1e-5
    assert min_snr_weight(torch.tensor([0.0]), 5.0, "epsilon").item() == 1.0  # zero terminal SNR stays finite


def _unet_objective(prediction_type="epsilon", gamma=None, cache_items=0, latent_noise=1.0):
    models = tiny_models(TINY.replace(prediction_type=prediction_type))
    empty = CLIPTokenizer.default()([""])
    return UNetObjective(models, empty, min_snr_gamma=gamma, cache_items=cache_items, latent_noise=latent_noise)


@pytest.mark.parametrize("prediction_type,gamma,latent_noise", [("epsilon", None, 1.0), ("v_prediction", 5.0, 1.0),
                                                                ("epsilon", None, 0.0)])
def test_unet_loss_matches_diffusers_training_step(prediction_type, gamma, latent_noise):
    """diffusers' train_text_to_image step on the same latents, noise and timesteps gives the same loss (with
    latent_noise 0, on the posterior mean: the latents of a VAE trained without sampling)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    objective = _unet_objective(prediction_type, gamma, latent_noise=latent_noise)
    models, cfg = objective.models, objective.models.config
    unet = diffusers_unet(prefixed("unet", models.unet.state_dict()), cfg)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ids = CLIPTokenizer.default()(CAPTIONS[:3])
    seeds = torch.tensor([101, 202, 303])
    loss, _ = objective({"image": images, "ids": ids, "seed": seeds})

    # what our objective draws from each sample's seed, in order: timestep, posterior noise, diffusion noise
    gens = seeded_generators(seeds)
    t = torch.cat([torch.randint(1000, (1,), generator=g) for g in gens])
    posterior = models.vae.encode(images)
    eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in gens])
    noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in gens])
    with torch.no_grad():
        latents = (posterior.mean + latent_noise * posterior.std * eps) * cfg.vae.scale_factor
        noisy = scheduler.add_noise(latents, noise, t)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        pred = unet(noisy, t, models.text_encoder(ids)).sample
        if gamma is None:
            expected = F.mse_loss(pred, target)
        else:
            snr = compute_snr(scheduler, t)
            weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / (snr + 1)
            expected = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
    assert abs(loss.item() - expected.item()) / expected.item() < 1e-4  # float32 UNet vs diffusers' UNet


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = {"image": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1,
             "ids": CLIPTokenizer.default()(CAPTIONS[:2]), "seed": torch.tensor([1, 2])}
    grads = []
    for checkpointed in (False, True):
        objective = _unet_objective()
        unet = objective.models.unet
        if checkpointed:
            use_gradient_checkpointing([*unet.input_blocks, unet.middle_block, *unet.output_blocks])
        objective(batch)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert max_rel_err(grads[1], grads[0]) < 1e-6
    assert sorted(objective.state_dict()) == sorted(_unet_objective().state_dict())  # keys unchanged


def test_encoding_cache_gives_the_losses_of_fresh_encodings():
    """Cached VAE latents and text contexts change nothing: batches that repeat images and captions (in another
    order, with other seeds) give the uncached loss; the encoders run once per distinct image and caption."""
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    ids = CLIPTokenizer.default()(CAPTIONS[:3])
    batches = [{"image": images, "ids": ids, "seed": torch.tensor([1, 2, 3])},
               {"image": images[[2, 0, 2]], "ids": ids[[2, 0, 2]], "seed": torch.tensor([4, 5, 6])}]
    plain, cached = _unet_objective(), _unet_objective(cache_items=10)  # same seeded weights
    calls = []
    encode = cached.models.vae.encode
    cached.models.vae.encode = lambda x: calls.append(len(x)) or encode(x)
    for batch in batches:
        assert max_rel_err(cached(batch)[0], plain(batch)[0]) < 1e-6  # batch composition may move the last bit
    assert calls == [3]  # the second batch's images were all seen
    assert (cached.latent_cache.hits, cached.latent_cache.misses) == (3, 3)
    assert cached.text_cache.misses == 3 and len(cached.text_cache.store) == 3
    small = _unet_objective(cache_items=1)  # full: later rows are still encoded, just not kept
    assert max_rel_err(small(batches[0])[0], plain(batches[0])[0]) < 1e-6
    assert len(small.latent_cache.store) == 1


def test_train_text_encoder_gives_the_text_encoder_the_denoising_loss_gradient():
    """Frozen (SD's way) the text encoder gets no gradient and its outputs may be cached; with train_text_encoder its
    parameters are trainable, get the loss's gradient (equal to a finite difference along it), and nothing caches."""
    batch = {"image": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1,
             "ids": CLIPTokenizer.default()(CAPTIONS[:2]), "seed": torch.tensor([1, 2])}
    frozen = _unet_objective(cache_items=4)
    assert not any(p.requires_grad for p in frozen.models.text_encoder.parameters())
    models = tiny_models()
    trained = UNetObjective(models, CLIPTokenizer.default()([""]), cache_items=4, train_text_encoder=True)
    assert trained.text_cache is None and trained.latent_cache is not None
    assert all(p.requires_grad for p in models.text_encoder.parameters())
    loss = trained(batch)[0]
    assert abs(loss.item() - frozen(batch)[0].item()) < 1e-6  # the same loss: only the gradients differ
    loss.backward()
    grads = {n: p.grad for n, p in models.text_encoder.named_parameters()}
    assert all(g is not None for g in grads.values())
    direction = {n: g / torch.cat([g.flatten() for g in grads.values()]).norm() for n, g in grads.items()}
    slope = sum((grads[n] * d).sum() for n, d in direction.items()).item()
    with torch.no_grad():
        for n, p in models.text_encoder.named_parameters():
            p += 1e-3 * direction[n]
        ahead = trained(batch)[0].item()
    assert abs((ahead - loss.item()) / 1e-3 - slope) < 0.05 * abs(slope)  # first order: the loss moves as predicted


def test_unet_objective_rejects_mismatched_parts():
    bad = TINY.replace(unet=TINY.unet.__class__(**{**TINY.unet.__dict__, "context_dim": 48}))
    with pytest.raises(ValueError, match="does not fit"):
        UNetObjective(tiny_models(bad), CLIPTokenizer.default()([""]))


@torch.no_grad()
def test_unet_preview_is_the_pipelines_generation():
    """The preview samples through diffusion.sample, as the pipeline: seeds 0..n-1, the sampler's own schedule."""
    from sdtorch.diffusion import CFGDenoiser, SeededNoise, sample

    objective = _unet_objective().eval()
    models = objective.models
    ids = CLIPTokenizer.default()(["a red square", "a blue circle"])
    images = torch.zeros(2, 3, 16, 16)
    rows = objective.preview({"ids": ids, "image": images}, count=2, steps=2)
    cond, uncond = models.text_encoder(ids), models.text_encoder(objective.empty_ids.expand(2, -1))
    side = 16 // models.config.vae.downsample_factor
    latents = sample(CFGDenoiser(models.unet, objective.schedule, objective.prediction_type), "DPM++ 2M", 2,
                     objective.schedule, SeededNoise(0, 2), (models.config.unet.out_channels, side, side),
                     extra_args={"cond": cond, "uncond": uncond, "cfg_scale": 5.0})
    expected = models.vae.decode(latents / models.config.vae.scale_factor).float()
    assert torch.equal(rows[1], expected)
