"""CFGDenoiser: one batched UNet call for guidance (none extra at scale 1), the guidance and rescale formulas of
diffusers' pipeline, x̂0 for ε/v/x0 networks equal to diffusers' pred_original_sample, and inpainting's c_concat."""
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from sdtorch.diffusion import CFGDenoiser, DiscreteSchedule, rescale_guidance

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


class RecordingUNet:
    """A stand-in network that depends on every input (including extra channels) and records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append({"x": x.clone(), "t": t.clone(), "context": context.clone()})
        return (0.7 * x[:, :4] - 0.2 * x.mean(1, keepdim=True) + torch.sin(t / 100)[:, None, None, None]
                + context.mean((1, 2))[:, None, None, None])


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    schedule = DiscreteSchedule.scaled_linear()
    x = torch.randn(2, 4, 8, 8, generator=g) * 5
    cond, uncond = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    return schedule, x, cond, uncond


def test_scale_1_or_no_uncond_makes_one_call_of_batch_b(setup):
    schedule, x, cond, uncond = setup
    unet = RecordingUNet()
    denoiser = CFGDenoiser(unet, schedule)
    sigma = schedule.sigmas[500]
    out_no_uncond = denoiser(x, sigma, cond=cond)
    out_scale_1 = denoiser(x, sigma, cond=cond, uncond=uncond, cfg_scale=1.0)
    assert len(unet.calls) == 2 and all(c["x"].shape[0] == 2 for c in unet.calls)
    assert torch.equal(out_no_uncond, out_scale_1)
    c_in = 1 / (sigma**2 + 1) ** 0.5
    assert torch.equal(unet.calls[0]["t"], torch.tensor([500.0, 500.0]))  # a training σ maps to its integer t
    torch.testing.assert_close(out_no_uncond, x - sigma * unet(x * c_in, torch.tensor([500.0] * 2), cond))


def test_guidance_is_one_batched_call_uncond_first(setup):
    schedule, x, cond, uncond = setup
    unet = RecordingUNet()
    sigma = torch.tensor([schedule.sigmas[700], schedule.sigmas[20]])  # a σ per sample
    out = CFGDenoiser(unet, schedule)(x, sigma, cond=cond, uncond=uncond, cfg_scale=7.5)
    assert len(unet.calls) == 1
    call = unet.calls[0]
    assert call["x"].shape[0] == 4 and torch.equal(call["context"], torch.cat([uncond, cond]))
    assert torch.equal(call["t"], torch.tensor([700.0, 20.0, 700.0, 20.0]))

    c_in = (1 / (sigma**2 + 1) ** 0.5)[:, None, None, None]
    t = torch.tensor([700.0, 20.0])
    eps_u, eps_c = unet(x * c_in, t, uncond), unet(x * c_in, t, cond)
    torch.testing.assert_close(out, x - sigma[:, None, None, None] * (eps_u + 7.5 * (eps_c - eps_u)))


def test_rescale_matches_diffusers_rescale_noise_cfg(setup):
    schedule, x, cond, uncond = setup
    g = torch.Generator().manual_seed(1)
    guided, cond_pred = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
    for phi in (0.0, 0.7, 1.0):
        assert torch.equal(rescale_guidance(guided, cond_pred, phi), rescale_noise_cfg(guided, cond_pred, phi))

    unet = RecordingUNet()
    sigma = schedule.sigmas[300]
    out = CFGDenoiser(unet, schedule)(x, sigma, cond=cond, uncond=uncond, cfg_scale=5.0, guidance_rescale=0.7)
    c_in, t = 1 / (sigma**2 + 1) ** 0.5, torch.tensor([300.0] * 2)
    eps_u, eps_c = unet(x * c_in, t, uncond), unet(x * c_in, t, cond)
    eps = rescale_noise_cfg(eps_u + 5.0 * (eps_c - eps_u), eps_c, 0.7)
    torch.testing.assert_close(out, x - sigma * eps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoised_equals_diffusers_pred_original_sample(prediction_type, setup):
    schedule, x, cond, _ = setup
    scheduler = EulerDiscreteScheduler(**SD, prediction_type=prediction_type, timestep_spacing="leading")
    scheduler.set_timesteps(10)
    unet = RecordingUNet()
    for i in (0, 4, 9):
        t = scheduler.timesteps[i]
        scheduler._step_index = i
        x_in = scheduler.scale_model_input(x, t)
        ref = scheduler.step(unet(x_in, t.expand(2), cond), t, x).pred_original_sample
        ours = CFGDenoiser(unet, schedule, prediction_type)(x, scheduler.sigmas[i], cond=cond)
        # fp32: for v we multiply by 1/(σ²+1) where diffusers divides by σ²+1, a last-bit difference
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_sample_prediction_returns_the_network_output(setup):
    schedule, x, cond, _ = setup
    unet = RecordingUNet()
    out = CFGDenoiser(unet, schedule, "sample")(x, schedule.sigmas[100], cond=cond)
    assert torch.equal(out, unet(unet.calls[0]["x"], unet.calls[0]["t"], cond))


def test_c_concat_is_appended_unscaled_and_duplicated_for_guidance(setup):
    schedule, x, cond, uncond = setup
    unet = RecordingUNet()
    c_concat = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = schedule.sigmas[999]
    CFGDenoiser(unet, schedule)(x, sigma, cond=cond, uncond=uncond, cfg_scale=3.0, c_concat=c_concat)
    x_in = unet.calls[0]["x"]  # (2B, 9, h, w)
    assert x_in.shape == (4, 9, 8, 8)
    torch.testing.assert_close(x_in[:, :4], torch.cat([x, x]) / (sigma**2 + 1) ** 0.5)
    assert torch.equal(x_in[:, 4:], torch.cat([c_concat, c_concat]))


def test_quantized_timesteps_round_to_the_nearest_training_step(setup):
    schedule, x, cond, _ = setup
    sigma = (schedule.sigmas[400] * 0.7 + schedule.sigmas[401] * 0.3).expand(2)  # between t=400 and t=401
    unet = RecordingUNet()
    CFGDenoiser(unet, schedule)(x, sigma, cond=cond)
    CFGDenoiser(unet, schedule, quantize_timesteps=True)(x, sigma, cond=cond)
    assert 400.2 < unet.calls[0]["t"][0] < 400.4 and unet.calls[1]["t"].tolist() == [400.0, 400.0]


def test_half_precision_latents_keep_timesteps_exact(setup):
    """σ ≈ 14.61 is not representable in fp16; t is computed from the float32 σ, and x̂0 comes back in x's dtype."""
    schedule, x, cond, _ = setup
    unet = RecordingUNet()
    out = CFGDenoiser(unet, schedule)(x.half(), schedule.sigmas[999], cond=cond.half())
    assert unet.calls[0]["t"].tolist() == [999.0, 999.0] and unet.calls[0]["x"].dtype == torch.float16
    assert out.dtype == torch.float16


def test_bad_inputs_raise(setup):
    schedule, x, cond, uncond = setup
    denoiser = CFGDenoiser(RecordingUNet(), schedule)
    sigma = schedule.sigmas[10]
    with pytest.raises(ValueError, match="pad"):
        denoiser(x, sigma, cond=cond, uncond=uncond[:, :5], cfg_scale=2.0)
    with pytest.raises(ValueError, match="cond"):
        denoiser(x, sigma, cond=cond[:1])
    with pytest.raises(ValueError, match="sigma"):
        denoiser(x, torch.ones(3), cond=cond)
    with pytest.raises(ValueError, match="c_concat"):
        denoiser(x, sigma, cond=cond, c_concat=torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError, match="prediction_type"):
        CFGDenoiser(RecordingUNet(), schedule, "eps")


@pytest.mark.parametrize("all_steps", [False, True])
def test_ngms_skips_the_unconditional_pass_as_a1111_counts_calls(setup, all_steps):
    """A1111's "Negative Guidance minimum sigma" (sd_samplers_cfg_denoiser.py): below σ = s_min_uncond, the calls
    with an odd count since the sampler started (every call with the all-steps option) run the conditional half
    alone, and return what guidance scale 1 returns."""
    schedule, x, cond, uncond = setup
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1]
    unet = RecordingUNet()
    denoiser = CFGDenoiser(unet, schedule, s_min_uncond=1.5, s_min_uncond_all=all_steps)
    plain = CFGDenoiser(RecordingUNet(), schedule)
    skipped = []
    for i, sigma in enumerate(sigmas):
        out = denoiser(x, torch.tensor(sigma), cond=cond, uncond=uncond, cfg_scale=7.0)
        skip = (i % 2 == 1 or all_steps) and sigma < 1.5  # A1111's condition, written out
        skipped.append(unet.calls[-1]["x"].shape[0] == 2)
        reference = plain(x, torch.tensor(sigma), cond=cond, uncond=uncond, cfg_scale=1.0 if skip else 7.0)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert skipped == ([False, False, False, True, True, True, True] if all_steps
                       else [False, False, False, True, False, True, False])
    assert denoiser.skipped_uncond and denoiser.calls == len(sigmas)
    off = CFGDenoiser(RecordingUNet(), schedule, s_min_uncond=0.05)  # below every σ: nothing skipped
    for sigma in sigmas:
        off(x, torch.tensor(sigma), cond=cond, uncond=uncond, cfg_scale=7.0)
    assert not off.skipped_uncond
