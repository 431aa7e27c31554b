"""The lecture's DDPM loop (VP coordinates, one timestep after the other) gives the image of the registry's "DDPM"
sampler (σ-space, Euler-ancestral with η = 1) run as the pipeline runs it: same model, same noise, same timesteps."""
import pytest
import torch

from sdtorch.diffusion import CFGDenoiser, DiscreteSchedule, get_sampler, get_sigmas, spaced_timesteps
from sdtorch.diffusion.ddpm import ddpm_sample, ddpm_step

TOL = 1e-5  # fp32: the same posterior in two coordinate systems, rounded differently (measured ~1e-6)


def toy_eps(x_t: torch.Tensor, t) -> torch.Tensor:
    """A smooth stand-in for a UNet's ε̂(x_t, t): mixes channels and depends on t, so every term of the step matters."""
    mix = torch.linspace(-1, 1, 16).reshape(4, 4)
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return torch.tanh(torch.einsum("oc,bchw->bohw", mix, x_t) + torch.sin(t / 150))


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_lecture_ddpm_equals_the_registry_sampler(steps):
    schedule = DiscreteSchedule.scaled_linear()
    timesteps = [int(t) for t in spaced_timesteps(steps, "leading")]  # 951, 901, ..., 1 for 20 steps (SD's config)

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    lecture = ddpm_sample(toy_eps, x_T, timesteps, schedule.alphas_cumprod, generator=g)

    # the pipeline's way: σ-space, x = x_T·sqrt(1 + σ_0²), the denoiser D(x, σ) around the same ε-network
    sampler = get_sampler("DDPM")
    sigmas = get_sigmas(schedule, steps, "normal", spacing="leading")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * (1 + sigmas[0] ** 2) ** 0.5
    denoiser = CFGDenoiser(lambda x_in, t, context: toy_eps(x_in, t), schedule)
    registry = sampler.fn(denoiser, x, sigmas, extra_args={"cond": torch.zeros(2, 1, 1)}, disable=True, generator=g)

    err = ((lecture - registry).abs().max() / registry.abs().max()).item()
    assert err <= TOL, err


def test_last_step_returns_the_mean_and_needs_no_noise():
    a = DiscreteSchedule.scaled_linear().alphas_cumprod
    x, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    x0 = (x - (1 - a[1]) ** 0.5 * eps) / a[1] ** 0.5
    # from t = 1 to the clean image: ᾱ_prev = 1, so the posterior mean is x̂0 itself
    torch.testing.assert_close(ddpm_step(eps, x, 1, -1, a), x0)
