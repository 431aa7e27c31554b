"""DDPM sampling as the lecture writes it: in VP coordinates x_t, one integer timestep after the other, with the
posterior q(x_{t-1} | x_t, x̂0) of Ho et al. (2020, eqs. 6-7) spelled out term by term.

The registry's "DDPM" (`samplers.sample_ddpm`) is the same step rewritten in σ-space (x = x_t/sqrt(ᾱ_t)), where it
becomes the Euler-ancestral step with η = 1; tests/test_ddpm.py checks that the two give the same image.
"""
import torch
from torch import Tensor


def ddpm_step(eps: Tensor, x_t: Tensor, t: int, t_prev: int, alphas_cumprod: Tensor,
              noise: Tensor | None = None) -> Tensor:
    """x_{t_prev} ~ q(x_{t_prev} | x_t, x̂0) given the model's noise prediction ε̂ = eps at timestep t.
    `t_prev` < 0 means "to the clean image" (ᾱ = 1). `noise` ~ N(0, I) is needed unless t_prev < 0."""
    alpha_bar = alphas_cumprod[t]
    alpha_bar_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(alpha_bar)
    alpha = alpha_bar / alpha_bar_prev  # the α of one (possibly strided) step, from t_prev to t
    beta = 1 - alpha
    # x̂0 from x_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε (eq. 4 solved for x0, with ε̂ for ε)
    x0 = (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    # the posterior's mean: a blend of x̂0 and x_t (eq. 7)
    x0_coeff = alpha_bar_prev**0.5 * beta / (1 - alpha_bar)
    x_t_coeff = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
    mean = x0_coeff * x0 + x_t_coeff * x_t
    if t_prev < 0:
        return mean  # the last step returns the mean: no noise is added to the final image
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta  # β̃ (eq. 7)
    return mean + variance**0.5 * noise


@torch.no_grad()
def ddpm_sample(eps_model, x_T: Tensor, timesteps: list[int], alphas_cumprod: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
    """The whole reverse process (Ho et al. 2020, Algorithm 2) over descending `timesteps`: start from pure noise x_T
    (unit variance), and at each t ask the model for ε̂ = eps_model(x_t, t) and take one `ddpm_step`. Noise is drawn
    on the CPU from `generator`, one draw per step that adds noise, as the registry's samplers draw it."""
    x = x_T
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = eps_model(x, t)
        noise = None if t_prev < 0 else torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        x = ddpm_step(eps, x, t, t_prev, alphas_cumprod, noise)
    return x
