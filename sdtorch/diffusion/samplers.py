"""Samplers in σ-space, k-diffusion style, and the registry that names them as A1111 does.

Every sampler has the one signature

    sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None, **kw)

where `model(x, σ, **extra_args)` returns the denoised estimate x̂0 = D(x, σ) (see guidance.CFGDenoiser), x starts at
σ_0 (x_T = noise·σ_0) and `sigmas` (n+1,) usually ends in 0. Deterministic samplers ignore `noise_sampler`/`generator`;
stochastic ones take their noise from `noise_sampler(σ, σ_next)` if given, else draw it on the CPU from `generator`
so that a seed gives the same image on every device. `callback({"i", "x", "sigma", "sigma_hat", "denoised"})` runs
once per step; an exception it raises stops sampling and propagates.

The discrete-time samplers (DDIM, DDPM, PLMS, LCM) are their update rules rewritten with x = x_t/sqrt(ᾱ_t), as
ComfyUI and k-diffusion do. Where that changes a result against diffusers it is only at the end: diffusers' DDIM and
PNDM stop at ᾱ_0 (σ ≈ 0.029, "set_alpha_to_one=False"), ours step to σ = 0 when the σ list ends in 0.
"""
import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import trange

from .schedule import (DiscreteSchedule, align_your_steps_sigmas, beta_sigmas, ddim_sigmas, exponential_sigmas,
                       karras_sigmas, kl_optimal_sigmas, normal_sigmas, polyexponential_sigmas, sgm_uniform_sigmas,
                       simple_sigmas, uniform_sigmas)

# ---- shared pieces --------------------------------------------------------------------------------------------------


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dσ of the probability-flow ODE, (x − D(x, σ))/σ (Karras et al. 2022, eqs. 1 and 3); equals ε̂."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(σ_down, σ_up): a deterministic step to σ_down plus fresh noise of std σ_up lands at σ_next with the variance of
    DDIM's η-posterior (Song et al. 2021, eq. 16): σ_up = η·σ_next·sqrt(1 − σ_next²/σ²), σ_down² + σ_up² = σ_next²."""
    if eta == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def default_noise_sampler(x: Tensor, generator: torch.Generator | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """noise(σ, σ_next) ~ N(0, I) shaped like x: drawn in float32 on the CPU from `generator`, then moved to x's
    device and dtype, so a seed reproduces the same noise on every device (and the same as diffusers' CPU generator)."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"noise is drawn on the CPU for reproducibility: pass a CPU torch.Generator, "
                         f"got one on {generator.device}")

    def noise(sigma, sigma_next):
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    return noise


def _report(callback, i, x, sigma, denoised) -> None:
    if callback is not None:  # "sigma_hat" is k-diffusion's key for the churned σ; no sampler here churns
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _check_sigmas(x: Tensor, sigmas: Tensor) -> None:
    if sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if x.dim() < 2:
        raise ValueError(f"x must be batched (B, ...), got shape {tuple(x.shape)}")


# ---- first-order and ancestral ---------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                           generator=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with Euler steps: Euler to σ_down, then add noise of std σ_up (k-diffusion)."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0 and sigma_up > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None,
                eta=0.0):
    """DDIM (Song et al. 2021, eq. 12). In σ-space its update x̂0 + sqrt(σ_next² − σ_up²)·ε̂ + σ_up·z is exactly the
    Euler-ancestral step with the same η; η = 0 is the plain Euler step."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, noise_sampler, generator, eta=eta)


def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None):
    """DDPM ancestral sampling (Ho et al. 2020, eqs. 6–7). Its posterior, written in σ-space, has mean
    x̂0 + (σ_next/σ)²·(x − x̂0) and std σ_next·sqrt(1 − σ_next²/σ²): the Euler-ancestral step with η = 1."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, noise_sampler, generator, eta=1.0)


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM, Luo et al. 2023): jump to x̂0, re-noise to
    σ_next with fresh noise."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
    return x


# ---- second-order single-step ----------------------------------------------------------------------------------------


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); the final step to σ = 0 is an Euler step."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
        x = x + (d + d_2) / 2 * dt  # trapezoid: the mean of the slopes at both ends
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1) in σ: the slope at the log-σ midpoint sqrt(σ·σ_next) carries the
    full step (k-diffusion's DPM2); the final step to σ = 0 is an Euler step."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
            continue
        x = _dpm_2_step(model, x, sigmas[i], sigmas[i + 1], d, s_in, extra_args)
    return x


def _dpm_2_step(model, x, sigma, sigma_to, d, s_in, extra_args):
    """Midpoint step from σ to σ_to: Euler to sqrt(σ·σ_to), then the whole step with the slope found there."""
    sigma_mid = (sigma * sigma_to) ** 0.5
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
    return x + d_2 * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                           generator=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver-2 steps to σ_down, then noise of std σ_up (k-diffusion's DPM2 a)."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm_2_step(model, x, sigmas[i], sigma_down, d, s_in, extra_args)
        if sigmas[i + 1] > 0 and sigma_up > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                     generator=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic): two ancestral DPM-Solver++(1) stages per step, the second from a data estimate mixed
    at λ-fraction r (k-diffusion's DPM++ SDE, after Lu et al. 2022b). A1111 draws its noise from a Brownian tree; we
    draw independent Gaussians, so images match A1111's only in distribution."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        # λ = −log σ; the intermediate point sits at λ + r·h
        lam, lam_next = -sigma.log(), -sigma_next.log()
        sigma_s = (-(lam + r * (lam_next - lam))).exp()
        # stage 1: ancestral DPM-Solver++(1) (= DDIM) step to σ_s
        sd, su = get_ancestral_step(sigma, sigma_s, eta)
        x_2 = denoised + (sd / sigma) * (x - denoised)
        if su > 0:
            x_2 = x_2 + noise_sampler(sigma, sigma_s) * s_noise * su
        denoised_2 = model(x_2, sigma_s * s_in, **extra_args)
        # stage 2: the same step to σ_next, from a data estimate extrapolated through the intermediate point
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        sd, su = get_ancestral_step(sigma, sigma_next, eta)
        x = denoised_d + (sd / sigma) * (x - denoised_d)
        if su > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * su
    return x


# ---- multistep -------------------------------------------------------------------------------------------------------


def _lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial of node σ_{i−j} over nodes σ_i … σ_{i−order+1}."""
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()  # a polynomial, so the integral is exact (diffusers/k-diffusion use quadrature)
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None,
               order=4):
    """Linear multistep: integrate the polynomial through the last `order` slopes over each step (k-diffusion's LMS)."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    sigmas_host = sigmas.detach().double().cpu().tolist()
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        coeffs = [_lms_coefficient(sigmas_host, i, j, len(ds)) for j in range(len(ds))]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


# Adams–Bashforth weights for equal steps, newest slope first, and their common denominator
_ADAMS_BASHFORTH = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None):
    """PLMS (Liu et al. 2022, eq. 12): fourth-order Adams–Bashforth on ε̂ with equal-step weights, started by one
    Heun step, as diffusers' PNDMScheduler runs it with skip_prk_steps. n steps cost n+1 model calls."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        ds = (ds + [d])[-4:]
        if i == 0 and sigmas[i + 1] > 0:
            # no history yet: a Heun step, whose end-point slope is then discarded (PNDM keeps only d_0)
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
            continue
        weights, denominator = _ADAMS_BASHFORTH[len(ds)]
        x = x + sum(w * d for w, d in zip(weights, reversed(ds), strict=True)) / denominator * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                    generator=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): second-order multistep on the data prediction in
    λ = −log σ; the first step and the step to σ = 0 are first order."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()  # λ_next − λ
        denoised_d = denoised
        if old_denoised is not None:
            r = h_last / h
            denoised_d = denoised + (denoised - old_denoised) / (2 * r)
        x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                        generator=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, eq. 18 with the 2M midpoint correction; k-diffusion's). A1111 draws
    its noise from a Brownian tree; we draw independent Gaussians, as diffusers does."""
    _check_sigmas(x, sigmas)
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        h_eta = h * (eta + 1)
        x = (sigma_next / sigma) * (-h * eta).exp() * x - torch.expm1(-h_eta) * denoised
        if old_denoised is not None:
            r = h_last / h
            x = x - 0.5 * torch.expm1(-h_eta) * (denoised - old_denoised) / r
        if eta > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * h * eta)).sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def _unipc_update(x, sigma, sigma_next, sigmas_hist, denoised_hist, variant, denoised_next=None):
    """One UniPC update of x at σ (the newest history point) to σ_next, in λ = −log σ with data prediction.

    Without `denoised_next` this is the predictor UniP-p, p = len(history); given the model's output at σ_next it is
    the corrector UniC-p, which treats that output as one more point at r = 1 (Zhao et al. 2023, Algorithms 1–2).
    """
    lam = -sigma.double().log().item()
    h = -sigma_next.double().log().item() - lam
    m0 = denoised_hist[-1]
    # earlier points, newest first, at λ-offsets r_k·h from the base
    rks = [(-s.double().log().item() - lam) / h for s in reversed(sigmas_hist[:-1])]
    d1s = [(m - m0) / rk for m, rk in zip(reversed(denoised_hist[:-1]), rks, strict=True)]
    if denoised_next is not None:
        rks.append(1.0)
        d1s.append(denoised_next - m0)
    hh = -h  # data prediction integrates in −λ
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1  # B(h), §3.4
    # b_k = k!·h·φ_{k+1}(h)/B(h) via the recurrence φ_{k+1} = (φ_k − 1/k!)/h
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_next = (sigma_next / sigma) * x - h_phi_1 * m0
    if not rks:
        return x_next
    if len(rks) == 1:
        rhos = [0.5]  # the paper's (and diffusers') choice for UniP-2 / UniC-1
    else:
        r_matrix = torch.tensor([[rk**k for rk in rks] for k in range(len(rks))], dtype=torch.float64)
        rhos = torch.linalg.solve(r_matrix, torch.tensor(b, dtype=torch.float64)).tolist()
    return x_next - b_h * sum(rho * d1 for rho, d1 in zip(rhos, d1s, strict=True))


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None,
                 order=2, variant="bh2"):
    """UniPC (Zhao et al. 2023): a UniP-`order` multistep predictor, and a UniC corrector that reuses each new model
    output to refine the point it was computed at, so correction costs no extra calls. Orders ramp up from 1 at the
    start and back down to 1 at the end, as diffusers' UniPCMultistepScheduler does (lower_order_final)."""
    _check_sigmas(x, sigmas)
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    sigmas_hist, denoised_hist = [], []
    x_prev, prev_order = None, 0
    for i in trange(n, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised  # the order-1 step to σ = 0 lands on x̂0; correcting x first would not change it
            continue
        if x_prev is not None:
            x = _unipc_update(x_prev, sigmas[i - 1], sigma, sigmas_hist[-prev_order:], denoised_hist[-prev_order:],
                              variant, denoised_next=denoised)
        sigmas_hist, denoised_hist = (sigmas_hist + [sigma])[-order:], (denoised_hist + [denoised])[-order:]
        step_order = min(order, i + 1, n - i)
        x_prev, prev_order = x, step_order
        x = _unipc_update(x, sigma, sigma_next, sigmas_hist[-step_order:], denoised_hist[-step_order:], variant)
    return x


# ---- the registry ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler: its function, how A1111, k-diffusion and ComfyUI name it, and how A1111 runs it."""
    name: str  # as A1111 shows it
    fn: Callable
    aliases: tuple[str, ...]  # k-diffusion / ComfyUI / old A1111 ids
    stochastic: bool  # draws noise at its default settings
    # what A1111's "Automatic" schedule picks for it; None: the model's own σs ("uniform") for k-diffusion samplers,
    # A1111's own timesteps for DDIM, PLMS and UniPC
    default_schedule: str | None = None
    # A1111/diffusers run these in VP space: they start from unit-variance VP noise and walk SD's "leading" timesteps
    vp: bool = False
    ends_at_t0: bool = False  # ...and stop at the first training timestep (σ_min), not at σ = 0
    takes_eta: bool = False  # has an `eta` argument (DDIM's η, the ancestral noise scale)
    # A1111 builds steps + 1 σs and drops the next-to-last (its "discard_next_to_last_sigma" sampler option)
    discard_penultimate: bool = False
    brownian_noise: bool = False  # A1111 draws its noise from a Brownian tree seeded by the image's seed
    a1111_options: tuple[tuple[str, object], ...] = ()  # keyword arguments A1111's implementation runs it with


_SAMPLER_LIST = [
    SamplerInfo("DDIM", sample_ddim, ("ddim",), False, vp=True, ends_at_t0=True, takes_eta=True),
    SamplerInfo("DDPM", sample_ddpm, ("ddpm",), True, "normal", vp=True),
    SamplerInfo("PLMS", sample_plms, ("plms", "pndm"), False, vp=True, ends_at_t0=True),
    SamplerInfo("Euler", sample_euler, ("euler", "k_euler"), False),
    SamplerInfo("Euler a", sample_euler_ancestral, ("euler_ancestral", "k_euler_a", "k_euler_ancestral"), True,
                takes_eta=True),
    SamplerInfo("Heun", sample_heun, ("heun", "k_heun"), False),
    SamplerInfo("LMS", sample_lms, ("lms", "k_lms"), False),
    SamplerInfo("DPM2", sample_dpm_2, ("dpm_2", "k_dpm_2"), False, "karras", discard_penultimate=True),
    SamplerInfo("DPM2 a", sample_dpm_2_ancestral, ("dpm_2_ancestral", "k_dpm_2_a", "k_dpm_2_ancestral"), True,
                "karras", takes_eta=True, discard_penultimate=True),
    SamplerInfo("DPM++ 2M", sample_dpmpp_2m, ("dpmpp_2m", "k_dpmpp_2m"), False, "karras"),
    SamplerInfo("DPM++ 2M SDE", sample_dpmpp_2m_sde, ("dpmpp_2m_sde", "k_dpmpp_2m_sde"), True, "exponential",
                takes_eta=True, brownian_noise=True),
    SamplerInfo("DPM++ SDE", sample_dpmpp_sde, ("dpmpp_sde", "k_dpmpp_sde"), True, "karras", takes_eta=True,
                brownian_noise=True),
    # A1111's options uni_pc_variant "bh1", uni_pc_order 3 (and "time_uniform", lower order final: see sample.py)
    SamplerInfo("UniPC", sample_unipc, ("uni_pc", "unipc"), False,
                a1111_options=(("order", 3), ("variant", "bh1"))),
    SamplerInfo("LCM", sample_lcm, ("lcm",), True, "sgm_uniform", vp=True),
]
SAMPLERS: dict[str, SamplerInfo] = {info.name: info for info in _SAMPLER_LIST}

# A1111's schedule types (its "Schedule type" setting): name -> σ function of (schedule, steps)
SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "polyexponential": polyexponential_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "kl_optimal": kl_optimal_sigmas,
    "align_your_steps": align_your_steps_sigmas,
    "simple": simple_sigmas,
    "normal": normal_sigmas,  # the only one that takes diffusers' `spacing`
    "ddim": ddim_sigmas,
    "beta": beta_sigmas,
}
# ...as A1111's infotext writes them; "Automatic" is the sampler's default
SCHEDULE_LABELS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                   "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                   "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM",
                   "beta": "Beta"}


def _key(name: str) -> str:
    """Lookup key: case, spaces, '_' and '-' ignored, '+' read as 'p' ("DPM++ 2M" == "dpmpp_2m")."""
    return re.sub(r"[\s_\-]+", "", name.lower()).replace("+", "p")


_SAMPLER_KEYS = {_key(n): info for info in _SAMPLER_LIST for n in (info.name, *info.aliases)}
_SCHEDULE_KEYS = {_key(n): n for n in SCHEDULE_LABELS} | {_key(v): n for n, v in SCHEDULE_LABELS.items()}


def _unknown(kind: str, name: str, choices: dict[str, str]) -> ValueError:
    """ValueError naming the closest choice; `choices` maps spellings to canonical names."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=1, cutoff=0.6)
    canonical = {c.lower(): v for c, v in choices.items()}
    hint = f" did you mean '{canonical[close[0]]}'?" if close else ""
    options = ", ".join(dict.fromkeys(choices.values()))
    return ValueError(f"unknown {kind} '{name}';{hint} choose from {options}")


def get_sampler(name: str) -> SamplerInfo:
    """The sampler called `name` (A1111 name or alias; case, spaces and underscores ignored)."""
    info = _SAMPLER_KEYS.get(_key(name))
    if info is None:
        raise _unknown("sampler", name, {n: i.name for i in _SAMPLER_LIST for n in (i.name, *i.aliases)})
    return info


def parse_sampler_name(name: str) -> tuple[SamplerInfo, str | None]:
    """Split an A1111 name such as "DPM++ 2M Karras" into (sampler, schedule); schedule is None when not named."""
    key = _key(name)
    if key in _SAMPLER_KEYS:
        return _SAMPLER_KEYS[key], None
    for schedule_key, schedule in _SCHEDULE_KEYS.items():
        if key.endswith(schedule_key) and key[: -len(schedule_key)] in _SAMPLER_KEYS:
            return _SAMPLER_KEYS[key[: -len(schedule_key)]], None if schedule == "automatic" else schedule
    return get_sampler(name), None  # raises, with a suggestion


def resolve_schedule(name: str | None) -> str | None:
    """The canonical schedule name for an A1111 label or name ("SGM Uniform", "sgm_uniform"); None for None and
    "Automatic" (the sampler's default)."""
    if name is None:
        return None
    canonical = _SCHEDULE_KEYS.get(_key(name))
    if canonical is None:
        raise _unknown("schedule", name, {n: n for n in SCHEDULE_LABELS})
    return None if canonical == "automatic" else canonical


def get_sigmas(schedule: DiscreteSchedule, steps: int, schedule_name: str = "normal", spacing: str | None = None,
               discard_penultimate: bool = False) -> Tensor:
    """The noise levels of `schedule_name`, from σ_max down, usually n+1 ending in 0. `spacing` picks diffusers'
    timesteps for the "normal" schedule (None: A1111's). `discard_penultimate` builds n+1 steps and drops the
    next-to-last σ, as A1111 does for DPM2 and DPM2 a."""
    canonical = resolve_schedule(schedule_name)
    if canonical is None:
        raise ValueError("the 'Automatic' schedule depends on the sampler: resolve it first")
    steps_built = steps + 1 if discard_penultimate else steps
    if canonical == "normal":
        sigmas = normal_sigmas(schedule, steps_built, spacing)
    else:
        sigmas = SCHEDULES[canonical](schedule, steps_built)
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas
