"""The forward (noising) process and the noise levels a sampler walks down.

One process, two coordinates, used side by side:
  * VP, what the UNet is trained on: x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε at integer timesteps t ∈ [0, T).
  * σ-space, what samplers integrate (Karras et al. 2022): x = x0 + σ·ε with σ = sqrt((1 − ᾱ)/ᾱ),
    i.e. x = x_t/sqrt(ᾱ_t).
`DiscreteSchedule` holds ᾱ and maps σ ↔ t; training calls `add_noise`, samplers take σ lists from the functions below.
"""
import math

import numpy as np
import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def scaled_linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> Tensor:
    """SD's β schedule, linear in sqrt(β) (Rombach et al. 2022), in float32 as the reference computes it."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(ᾱ) so the last timestep is pure noise, keeping ᾱ_0 (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


class DiscreteSchedule:
    """ᾱ_t of a model trained on T discrete timesteps, and the σ ↔ t maps samplers need (after k-diffusion's
    DiscreteSchedule).

    The tensors live on the CPU; σ ↔ t maps are computed there in float64 and returned on the caller's device.
    """

    def __init__(self, alphas_cumprod: Tensor):
        if alphas_cumprod.dim() != 1 or len(alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor of at least 2 timesteps, "
                             f"got {tuple(alphas_cumprod.shape)}")
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)
        # A zero-terminal-SNR schedule has ᾱ_T = 0, i.e. σ_T = ∞. For σ-space, clamp ᾱ to 2⁻²⁴ (σ_max ≈ 4096) as
        # diffusers' σ-based schedulers do; `add_noise` keeps the exact ᾱ.
        alphas_cumprod = self.alphas_cumprod.clamp(min=2.0**-24)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # (T,), increasing with t
        self.log_sigmas = self.sigmas.double().log()

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      zero_terminal_snr: bool = False) -> "DiscreteSchedule":
        """The schedule of SD 1.x/2.x (defaults), optionally rescaled to zero terminal SNR."""
        betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(torch.cumprod(1 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Timestep of each σ, interpolating linearly in log σ between training timesteps (as k-diffusion does);
        `quantize` rounds to the nearest training timestep instead."""
        sigma = torch.as_tensor(sigma)
        log_sigma = sigma.detach().to("cpu", torch.float64).clamp(min=1e-10).log().reshape(-1)
        dists = log_sigma - self.log_sigmas[:, None]  # (T, N)
        if quantize:
            t = dists.abs().argmin(dim=0).double()
        else:
            # low: the last training timestep whose σ is <= the query; interpolate towards low + 1
            low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.num_train_timesteps - 2)
            low_ls, high_ls = self.log_sigmas[low], self.log_sigmas[low + 1]
            w = ((low_ls - log_sigma) / (low_ls - high_ls)).clamp(0, 1)
            t = (1 - w) * low + w * (low + 1)
        return t.to(sigma.device, torch.float32).reshape(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ at each (possibly fractional) timestep, interpolating linearly in log σ (the inverse of `sigma_to_t`)."""
        t = torch.as_tensor(t)
        tt = t.detach().to("cpu", torch.float64).clamp(0, self.num_train_timesteps - 1)
        low, high, w = tt.floor().long(), tt.ceil().long(), tt.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(t.device, torch.float32)

    def _alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """ᾱ at integer timesteps t (B,), shaped (B, 1, 1, ...) to broadcast against `like`."""
        if t.dim() != 1 or t.shape[0] != like.shape[0] or t.is_floating_point():
            raise ValueError(f"t must be a ({like.shape[0]},) integer tensor of timesteps, "
                             f"got {t.dtype} {tuple(t.shape)}")
        if t.min() < 0 or t.max() >= self.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), got {t.min()}..{t.max()}")
        alpha_bar = self.alphas_cumprod.to(like.device, like.dtype)[t.to(like.device)]
        return alpha_bar.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, with a timestep per sample (Ho et al. 2020, eq. 4)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} and x0 {tuple(x0.shape)} must have the same shape")
        alpha_bar = self._alpha_bar(t, x0)
        return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str = "epsilon") -> Tensor:
        """What a model of `prediction_type` should output for x_t = add_noise(x0, noise, t): ε, v or x0."""
        _check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        alpha_bar = self._alpha_bar(t, x0)
        return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * x0  # v (Salimans & Ho 2022, §4)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose from {', '.join(PREDICTION_TYPES)}")


def convert_prediction(output: Tensor, x_t: Tensor, alpha_bar: Tensor, from_type: str, to_type: str) -> Tensor:
    """Re-express a model output as an ε, v or x0 prediction, from x_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε and
    v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 (Salimans & Ho 2022, §4). `alpha_bar` broadcasts against x_t."""
    _check_prediction_type(from_type)
    _check_prediction_type(to_type)
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if from_type == "epsilon":
        eps, x0 = output, (x_t - s * output) / a
    elif from_type == "v_prediction":
        eps, x0 = a * output + s * x_t, a * x_t - s * output
    else:
        eps, x0 = (x_t - a * output) / s, output
    return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[to_type]


def denoiser_scalings(sigma: Tensor, prediction_type: str = "epsilon") -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) with D(x, σ) = c_skip·x + c_out·F(c_in·x, t(σ)) for a network F trained in VP
    (Karras et al. 2022, Table 1): c_in = 1/sqrt(σ² + 1) turns x = x0 + σε back into x_t."""
    _check_prediction_type(prediction_type)
    c_in = 1 / (sigma**2 + 1) ** 0.5
    if prediction_type == "epsilon":  # x0 = x − σ·ε
        return torch.ones_like(sigma), -sigma, c_in
    if prediction_type == "v_prediction":  # x0 = sqrt(ᾱ)·x_t − sqrt(1 − ᾱ)·v, with sqrt(ᾱ) = c_in
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in
    return torch.zeros_like(sigma), torch.ones_like(sigma), c_in


# ---- timestep spacings and σ schedules: each returns σ_0 > ... > σ_{n-1} followed by a final 0 --------------------

def _check_steps(steps: int, schedule: DiscreteSchedule) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be an integer in [1, {schedule.num_train_timesteps}], got {steps!r}")


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def spaced_timesteps(steps: int, spacing: str = "leading", num_train_timesteps: int = 1000,
                     steps_offset: int = 1) -> Tensor:
    """`steps` descending timesteps chosen as diffusers' `timestep_spacing` does (Lin et al. 2023, Table 2).

    leading: every ⌊T/n⌋-th step counted up from 0, plus `steps_offset` (SD 1.x's scheduler config uses 1);
    trailing: every (T/n)-th step counted down from T−1; linspace: n evenly spaced (fractional) steps from T−1 to 0.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    if spacing == "leading":
        t = (np.arange(steps) * (num_train_timesteps // steps)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        t = np.round(num_train_timesteps - np.arange(steps) * (num_train_timesteps / steps)) - 1
    elif spacing == "linspace":
        t = np.linspace(0, num_train_timesteps - 1, steps)[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    return torch.from_numpy(t.astype(np.float64))


def normal_sigmas(schedule: DiscreteSchedule, steps: int, spacing: str = "leading") -> Tensor:
    """σ at the `spacing` timesteps: the schedule diffusers' schedulers use by default."""
    _check_steps(steps, schedule)
    t = spaced_timesteps(steps, spacing, schedule.num_train_timesteps)
    return _append_zero(schedule.t_to_sigma(t))


def karras_sigmas(schedule: DiscreteSchedule, steps: int, rho: float = 7.0) -> Tensor:
    """Evenly spaced in σ^(1/ρ) from σ_max to σ_min (Karras et al. 2022, eq. 5)."""
    _check_steps(steps, schedule)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = schedule.sigma_max ** (1 / rho), schedule.sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Evenly spaced in log σ from σ_max to σ_min (k-diffusion's get_sigmas_exponential)."""
    _check_steps(steps, schedule)
    log_sigmas = torch.linspace(math.log(schedule.sigma_max), math.log(schedule.sigma_min), steps, dtype=torch.float64)
    return _append_zero(log_sigmas.exp())


def sgm_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """σ at n+1 evenly spaced timesteps from T−1 to 0 with the last dropped (ComfyUI's "sgm_uniform")."""
    _check_steps(steps, schedule)
    t = torch.linspace(schedule.num_train_timesteps - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    return _append_zero(schedule.t_to_sigma(t))


def simple_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Every (T/n)-th training σ counted down from σ_max, truncating (ComfyUI's "simple")."""
    _check_steps(steps, schedule)
    stride = schedule.num_train_timesteps / steps
    t = torch.tensor([schedule.num_train_timesteps - 1 - int(i * stride) for i in range(steps)])
    return _append_zero(schedule.sigmas[t])
