"""The forward process and the σ schedules equal diffusers' (bit for bit where both compute in the same precision),
and the prediction-type conversions invert the forward process."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale_zero_terminal_snr

from sdtorch.diffusion import PREDICTION_TYPES, DiscreteSchedule, convert_prediction, denoiser_scalings, \
    rescale_zero_terminal_snr, scaled_linear_betas, spaced_timesteps
from sdtorch.diffusion.schedule import exponential_sigmas, karras_sigmas, normal_sigmas, sgm_uniform_sigmas, \
    simple_sigmas

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule.scaled_linear()


def euler(**kwargs) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**{**SD, **kwargs})


def test_betas_alphas_cumprod_and_sigmas_equal_diffusers(schedule):
    ref = DDPMScheduler(**SD)
    assert torch.equal(scaled_linear_betas(), ref.betas)
    assert torch.equal(schedule.alphas_cumprod, ref.alphas_cumprod)
    # Euler keeps the training σs, descending, with a 0 appended
    assert torch.equal(schedule.sigmas, euler().sigmas[:-1].flip(0))
    assert schedule.num_train_timesteps == 1000
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-4)


def test_zero_terminal_snr_matches_diffusers():
    betas = scaled_linear_betas()
    assert torch.equal(rescale_zero_terminal_snr(betas), diffusers_rescale_zero_terminal_snr(betas))
    zsnr = DiscreteSchedule.scaled_linear(zero_terminal_snr=True)
    assert zsnr.alphas_cumprod[-1] == 0  # exact for add_noise: x_T is pure noise
    torch.testing.assert_close(zsnr.alphas_cumprod, DDPMScheduler(**SD, rescale_betas_zero_snr=True).alphas_cumprod,
                               rtol=0, atol=0)
    # σ-space clamps ᾱ_T to 2^-24 as diffusers' σ schedulers do: σ_max ≈ 4096 instead of ∞
    assert zsnr.sigma_max == pytest.approx(euler(rescale_betas_zero_snr=True).sigmas.max().item(), rel=1e-7)
    assert zsnr.sigma_max == pytest.approx(4096, rel=1e-6)


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_add_noise_and_v_target_match_diffusers_with_a_timestep_per_sample(zero_terminal_snr):
    schedule = DiscreteSchedule.scaled_linear(zero_terminal_snr=zero_terminal_snr)
    ref = DDPMScheduler(**SD, rescale_betas_zero_snr=zero_terminal_snr)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 999, 500, 17])
    assert torch.equal(schedule.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(schedule.training_target(x0, noise, t, "v_prediction"), ref.get_velocity(x0, noise, t))
    assert torch.equal(schedule.training_target(x0, noise, t, "epsilon"), noise)
    assert torch.equal(schedule.training_target(x0, noise, t, "sample"), x0)


def test_add_noise_rejects_bad_timesteps(schedule):
    x = torch.zeros(2, 4, 8, 8)
    for bad in [torch.tensor([1.5, 2.0]), torch.tensor([1]), torch.tensor([[1, 2]]), torch.tensor([0, 1000]),
                torch.tensor([-1, 3])]:
        with pytest.raises(ValueError):
            schedule.add_noise(x, x, bad)
    with pytest.raises(ValueError, match="same shape"):
        schedule.add_noise(x, x[:1], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="prediction_type"):
        schedule.training_target(x, x, torch.tensor([1, 2]), "eps")


@pytest.mark.parametrize("from_type", PREDICTION_TYPES)
@pytest.mark.parametrize("to_type", PREDICTION_TYPES)
def test_convert_prediction_agrees_with_the_forward_process(from_type, to_type, schedule):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([3, 400, 990])
    x_t = schedule.add_noise(x0, noise, t)
    alpha_bar = schedule.alphas_cumprod[t][:, None, None, None]
    output = schedule.training_target(x0, noise, t, from_type)
    converted = convert_prediction(output, x_t, alpha_bar, from_type, to_type)
    # fp32; eps -> x0 at t=990 divides by sqrt(ᾱ) ≈ 0.07, which amplifies rounding ~14x
    torch.testing.assert_close(converted, schedule.training_target(x0, noise, t, to_type), rtol=0, atol=2e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_denoiser_scalings_recover_x0_from_an_exact_prediction(prediction_type, schedule):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x) equals x0 when F outputs the exact training target for x_t = c_in·x."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([3, 400, 999])
    sigma = schedule.sigmas[t][:, None, None, None]
    x = x0 + sigma * noise  # σ-space
    c_skip, c_out, c_in = denoiser_scalings(sigma, prediction_type)
    torch.testing.assert_close(c_in * x, schedule.add_noise(x0, noise, t), rtol=0, atol=1e-5)
    target = schedule.training_target(x0, noise, t, prediction_type)
    torch.testing.assert_close(c_skip * x + c_out * target, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 7, 10, 25, 50, 333])
def test_spaced_timesteps_equal_diffusers(spacing, steps):
    ref = euler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert torch.equal(spaced_timesteps(steps, spacing).float(), ref.timesteps)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [7, 10, 25])
def test_normal_sigmas_equal_diffusers_at_integer_timesteps(spacing, steps, schedule):
    ref = euler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert torch.equal(normal_sigmas(schedule, steps, spacing), ref.sigmas)


def test_linspace_sigmas_interpolate_in_log_sigma(schedule):
    """At fractional timesteps we interpolate log σ (k-diffusion, A1111, ComfyUI); diffusers' Euler interpolates σ
    linearly. Ours is the inverse of diffusers' own _sigma_to_t, and the two differ by the curvature of log σ between
    neighbouring training steps: a few 1e-6 of σ."""
    ref = euler(timestep_spacing="linspace")
    ref.set_timesteps(7)  # timesteps 999, 832.5, ...: fractional (with 10 steps they happen to be integers)
    sigmas = normal_sigmas(schedule, 7, "linspace")
    t_back = ref._sigma_to_t(sigmas[:-1].double().numpy(), np.log(schedule.sigmas.double().numpy()))
    np.testing.assert_allclose(t_back, ref.timesteps.numpy(), rtol=0, atol=1e-3)
    assert sigmas[0] == schedule.sigmas[-1] and sigmas[-2] == schedule.sigmas[0]
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-5, atol=0)
    assert not torch.equal(sigmas, ref.sigmas)


@pytest.mark.parametrize("steps", [2, 10, 25])  # 1 step: diffusers' range collapses to the one spaced σ
def test_karras_and_exponential_sigmas_equal_diffusers(steps, schedule):
    # "linspace" spacing makes diffusers take σ_min/σ_max over the whole training range, as k-diffusion does
    for flag, ours in [("use_karras_sigmas", karras_sigmas), ("use_exponential_sigmas", exponential_sigmas)]:
        ref = euler(timestep_spacing="linspace", **{flag: True})
        ref.set_timesteps(steps)
        # ours are k-diffusion's float32 arithmetic (A1111's σs to the bit: test_a1111.py), diffusers' are float64
        # rounded once: up to ~8e-7 apart, a few float32 ulps
        torch.testing.assert_close(ours(schedule, steps), ref.sigmas, rtol=1e-6, atol=0)


def test_sgm_uniform_sigmas(schedule):
    # with 9 steps ComfyUI's sgm_uniform lands on integer timesteps 999, 888, ..., 111: diffusers' σ there
    ref = euler()
    ref.set_timesteps(timesteps=list(range(999, 0, -111)))
    # k-diffusion's float32 exp(log σ) (A1111's to the bit) can move σ by an ulp from the training σ diffusers takes
    torch.testing.assert_close(sgm_uniform_sigmas(schedule, 9), ref.sigmas, rtol=3e-7, atol=0)
    # otherwise fractional timesteps linspace(T-1, 0, n+1)[:-1]
    sigmas = sgm_uniform_sigmas(schedule, 10)
    torch.testing.assert_close(schedule.sigma_to_t(sigmas[:-1]), torch.linspace(999, 0, 11)[:-1], rtol=0, atol=1e-3)


def test_simple_sigmas(schedule):
    for steps in (10, 25, 50):  # every (T/n)-th σ from the top: trailing spacing when n divides T
        assert torch.equal(simple_sigmas(schedule, steps), normal_sigmas(schedule, steps, "trailing"))
    assert torch.equal(simple_sigmas(schedule, 7)[:-1], schedule.sigmas[[999 - int(i * 1000 / 7) for i in range(7)]])


def test_sigma_to_t_matches_diffusers_and_inverts_t_to_sigma(schedule):
    ref = euler()
    log_sigmas = np.log(schedule.sigmas.double().numpy())
    sigmas = torch.exp(torch.linspace(np.log(schedule.sigma_min), np.log(schedule.sigma_max), 257)).float()
    t = schedule.sigma_to_t(sigmas)
    ref_t = ref._sigma_to_t(sigmas.double().numpy(), log_sigmas)
    np.testing.assert_allclose(t.double().numpy(), ref_t, rtol=0, atol=1e-4)
    assert torch.equal(schedule.sigma_to_t(sigmas, quantize=True), torch.from_numpy(ref_t).round().float())
    torch.testing.assert_close(schedule.t_to_sigma(t), sigmas, rtol=2e-6, atol=0)
    # training σs map to their exact integer timesteps, and back
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas), torch.arange(1000).float())
    assert torch.equal(schedule.t_to_sigma(torch.arange(1000)), schedule.sigmas)
    # outside the trained range t clamps to [0, T-1]; shapes are kept
    assert schedule.sigma_to_t(torch.tensor([1e-3, 100.0])).tolist() == [0.0, 999.0]
    assert schedule.sigma_to_t(torch.tensor(1.0)).shape == ()


def test_spacing_and_steps_are_validated(schedule):
    with pytest.raises(ValueError, match="unknown timestep spacing 'lead'"):
        spaced_timesteps(10, "lead")
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="steps"):
            karras_sigmas(schedule, bad)
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.ones(1))
