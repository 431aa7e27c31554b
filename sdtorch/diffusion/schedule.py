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


def normal_sigmas(schedule: DiscreteSchedule, steps: int, spacing: str | None = None) -> Tensor:
    """σ at n timesteps evenly spaced from t(σ_max) down to t(σ_min) (A1111's "Normal"), or at diffusers'
    `spacing` timesteps ("leading", "trailing", "linspace") when one is named.

    A1111 counts down (torch.linspace(t_max, t_min, n)), so one step starts at σ_max; diffusers' "linspace" counts up
    and reverses, so its one step is at t = 0 (σ_min)."""
    _check_steps(steps, schedule)
    if spacing is None:
        ends = schedule.sigma_to_t(torch.tensor([schedule.sigma_max, schedule.sigma_min], dtype=torch.float64))
        return _append_zero(_t_to_sigma_float32(schedule, torch.linspace(ends[0].item(), ends[1].item(), steps)))
    else:
        t = spaced_timesteps(steps, spacing, schedule.num_train_timesteps)
    return _append_zero(schedule.t_to_sigma(t))


def karras_sigmas(schedule: DiscreteSchedule, steps: int, rho: float = 7.0) -> Tensor:
    """Evenly spaced in σ^(1/ρ) from σ_max to σ_min (Karras et al. 2022, eq. 5).

    In float32 as k-diffusion computes it: A1111's Brownian-tree noise depends on the σs to the last bit (a one-ulp
    change in σ moves the tree's noise by ~1e-4), so these σs must be k-diffusion's own."""
    _check_steps(steps, schedule)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float32)
    max_inv_rho, min_inv_rho = schedule.sigma_max ** (1 / rho), schedule.sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Evenly spaced in log σ from σ_max to σ_min (k-diffusion's get_sigmas_exponential, in its float32)."""
    _check_steps(steps, schedule)
    log_sigmas = torch.linspace(math.log(schedule.sigma_max), math.log(schedule.sigma_min), steps, dtype=torch.float32)
    return _append_zero(log_sigmas.exp())


def sgm_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """σ at n+1 evenly spaced timesteps from T−1 to 0 with the last dropped (ComfyUI's "sgm_uniform")."""
    _check_steps(steps, schedule)
    t = torch.linspace(schedule.num_train_timesteps - 1, 0, steps + 1)[:-1]
    return _append_zero(_t_to_sigma_float32(schedule, t))


def simple_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Every (T/n)-th training σ counted down from σ_max, truncating (ComfyUI's "simple")."""
    _check_steps(steps, schedule)
    stride = schedule.num_train_timesteps / steps
    t = torch.tensor([schedule.num_train_timesteps - 1 - int(i * stride) for i in range(steps)])
    return _append_zero(schedule.sigmas[t])


# ---- A1111's schedule types (modules/sd_schedulers.py), each a function of (schedule, steps) ----------------------
# Some end at σ_min instead of 0 (KL Optimal) or give more σs than steps (DDIM): A1111 samples them as they are.

def uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """σ at n evenly spaced (fractional) timesteps from T−1 down to 0 (k-diffusion's DiscreteSchedule.get_sigmas,
    A1111's "Uniform" and, in exact arithmetic, its "Normal"). One step is σ_max alone."""
    _check_steps(steps, schedule)
    return _append_zero(_t_to_sigma_float32(schedule, torch.linspace(schedule.num_train_timesteps - 1, 0, steps)))


def _t_to_sigma_float32(schedule: DiscreteSchedule, t: Tensor) -> Tensor:
    """σ(t) interpolated in log σ as k-diffusion's DiscreteSchedule.t_to_sigma computes it, in float32 from float32 t:
    A1111's σs to the last bit (the Brownian-tree noise of its SDE samplers depends on them; see karras_sigmas)."""
    log_sigmas = schedule.sigmas.log()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def polyexponential_sigmas(schedule: DiscreteSchedule, steps: int, rho: float = 1.0) -> Tensor:
    """log σ = log σ_min + r^ρ·(log σ_max − log σ_min) for r from 1 down to 0 (k-diffusion's
    get_sigmas_polyexponential; A1111's default ρ = 1 makes it the exponential schedule)."""
    _check_steps(steps, schedule)
    ramp = torch.linspace(1, 0, steps, dtype=torch.float32) ** rho  # float32, as k-diffusion (see karras_sigmas)
    log_min, log_max = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
    return _append_zero((ramp * (log_max - log_min) + log_min).exp())


def kl_optimal_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """n+1 σs evenly spaced in arctan σ from σ_max to σ_min (Sabour et al. 2024, "Align Your Steps", eq. 9). As in
    A1111 the list ends at σ_min, not 0: the sampler's last step lands there and the image keeps that noise."""
    _check_steps(steps, schedule)
    # in float32 as A1111 computes it (see karras_sigmas for why the last bit matters)
    atan_min, atan_max = torch.tensor(schedule.sigma_min).atan(), torch.tensor(schedule.sigma_max).atan()
    frac = torch.arange(steps + 1) / steps
    return (frac * atan_min + (1.0 - frac) * atan_max).tan()


# NVIDIA's published 10-step Align Your Steps σs for SD 1.5 (research.nvidia.com/labs/toronto-ai/AlignYourSteps)
AYS_SD15_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def align_your_steps_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """The SD 1.5 Align Your Steps σs (Sabour et al. 2024), log-linearly interpolated to n σs unless n = 11, then 0
    (A1111's get_align_your_steps_sigmas). The table is for SD 1.5's training schedule and ignores `schedule`."""
    _check_steps(steps, schedule)
    if steps == len(AYS_SD15_SIGMAS):
        return _append_zero(torch.tensor(AYS_SD15_SIGMAS, dtype=torch.float64))
    # interpolate log σ on [0, 1] with the table's points equally spaced, ascending for np.interp, then descend again
    log_ascending = np.log(AYS_SD15_SIGMAS[::-1])
    xs = np.linspace(0, 1, len(AYS_SD15_SIGMAS))
    sigmas = np.exp(np.interp(np.linspace(0, 1, steps), xs, log_ascending))[::-1].copy()
    return _append_zero(torch.from_numpy(sigmas))


def ddim_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Training σs at t = 1, 1 + ⌊T/n⌋, 1 + 2⌊T/n⌋, … < T, descending, then 0 (A1111's "DDIM" schedule type). When n
    does not divide T this gives more than n σs, and A1111 runs them all."""
    _check_steps(steps, schedule)
    stride = max(schedule.num_train_timesteps // steps, 1)
    t = torch.arange(1, schedule.num_train_timesteps, stride).flip(0)
    return _append_zero(schedule.sigmas[t])


def beta_sigmas(schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """σ_min + F⁻¹(1 − i/(n−1))·(σ_max − σ_min), F the Beta(α, β) distribution function (Lee et al. 2024, "Beta
    Sampling is All You Need"; A1111's defaults α = β = 0.6), then 0."""
    _check_steps(steps, schedule)
    q = 1 - np.linspace(0, 1, steps)
    x = torch.tensor([beta_ppf(float(p), alpha, beta) for p in q], dtype=torch.float64)
    return _append_zero(schedule.sigma_min + x * (schedule.sigma_max - schedule.sigma_min))


def _betainc(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction evaluated with the modified
    Lentz method (Press et al., Numerical Recipes, §6.4); the symmetry I_x(a, b) = 1 − I_{1−x}(b, a) keeps it in
    the fraction's fast-converging range x < (a + 1)/(a + b + 2)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (math.lgamma(a) + math.lgamma(b)
                                                                       - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f


def beta_ppf(q: float, a: float, b: float) -> float:
    """The quantile x with I_x(a, b) = q, by bisection to the last bit of a float64 (scipy.stats.beta.ppf without
    scipy: 60 halvings of [0, 1] reach 1e-18)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _betainc(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
