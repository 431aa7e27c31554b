"""One generation in latent space: the σ list, where x starts, the sampler loop, its noise and where it ends.

    x_start = noise·σ_0 (txt2img) or init + noise·σ_0 (img2img)  ──sampler(D, x, σs, noise)──▶  x at the last σ

`sample()` is the one definition of that, used by the pipeline (both hires-fix passes) and by training previews.
Two conventions decide the details where A1111 and diffusers differ:

  * "a1111" (the default): A1111's schedules, its img2img step count `int(min(strength, 0.999)·steps) + 1` starting
    at σ[steps − t_enc − 1] (or with "img2img_fix_steps", exactly `steps` steps), DDIM and PLMS on A1111's uniform
    timesteps 1, 1 + ⌊T/n⌋, … ending at t = 1, UniPC bh1 of order 3 on time-uniform steps, and Brownian-tree noise
    for the DPM++ SDE samplers (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_samplers_common.py).
  * "diffusers": what diffusers' pipelines do, for comparing with them: img2img skips the first
    steps − int(steps·strength) σs, DDIM/PLMS walk "leading" timesteps to ᾱ_0, UniPC is bh2 of order 2.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .noise import SeededNoise, brownian_noise_or_none
from .samplers import SamplerInfo, get_sigmas, get_sampler, resolve_schedule
from .schedule import DiscreteSchedule

CONVENTIONS = ("a1111", "diffusers")
A1111_TIMESTEP_SAMPLERS = ("DDIM", "PLMS", "UniPC")  # A1111 runs these on its own timesteps, ignoring the schedule
# A1111's own samplers (the others it runs with k-diffusion's σ functions); DDPM and LCM are not among them
SAMPLER_NAMES_A1111 = ("Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
                       *A1111_TIMESTEP_SAMPLERS)


@dataclass
class Plan:
    """What `sample` will run: σs to walk, the σ the noise is added at, and the VP scalings at both ends."""
    sigmas: Tensor  # (k+1,) the σs the sampler walks; k = 0 means nothing to denoise
    all_sigmas: Tensor  # the whole schedule the σs were cut from (the Brownian tree spans its positive σs)
    noise_sigma: float  # img2img: the init latent is noised to this σ (A1111's DDIM/PLMS/UniPC: one step above)
    vp_start: bool = False  # x_start is a VP sample (unit variance for txt2img), re-expressed at σ_0
    vp_end: bool = False  # the result is the VP sample at the last σ: divide by sqrt(1 + σ²)
    sampler_options: tuple = ()
    log_alpha_timesteps: bool = False  # σ ↔ t by UniPC's log-α interpolation instead of log σ (LogAlphaTimesteps)


def img2img_steps(steps: int, strength: float, fix_steps: bool = False) -> tuple[int, int]:
    """A1111's (schedule length, t_enc) for img2img (sd_samplers_common.setup_img2img_steps): t_enc + 1 steps are
    run from the end of a `schedule length` schedule. By default t_enc = int(min(strength, 0.999)·steps) of a
    `steps`-long schedule; with "img2img_fix_steps" the schedule is int(steps/min(strength, 0.999)) long and
    exactly `steps` steps are run (A1111's hires-fix pass always counts this way)."""
    if fix_steps:
        return (int(steps / min(strength, 0.999)) if strength > 0 else 0), steps - 1
    return steps, int(min(strength, 0.999) * steps)


def a1111_timesteps(steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """A1111's DDIM/PLMS/UniPC timesteps: range(0, T, ⌊T/n⌋) + 1, clipped to T−1 (more than n when n ∤ T)."""
    return (torch.arange(0, num_train_timesteps, num_train_timesteps // steps) + 1).clamp(0, num_train_timesteps - 1)


def unipc_time_uniform_sigmas(schedule: DiscreteSchedule, t_start: float, steps: int) -> Tensor:
    """σ at steps+1 timesteps evenly spaced from t_start down to 0, as UniPC's "time_uniform" skip type places them
    (Zhao et al. 2023; A1111's NoiseScheduleVP): log α = ½ log ᾱ is interpolated linearly between training timesteps,
    σ = sqrt(1 − α²)/α."""
    t = torch.linspace(t_start, 0, steps + 1, dtype=torch.float64)
    log_alpha = 0.5 * schedule.alphas_cumprod.double().log()
    low = t.floor().long().clamp(max=schedule.num_train_timesteps - 2)
    w = t - low
    log_a = (1 - w) * log_alpha[low] + w * log_alpha[low + 1]
    return ((1 - (2 * log_a).exp()).sqrt() / log_a.exp()).float()


def plan(info: SamplerInfo, schedule: DiscreteSchedule, steps: int, schedule_name: str | None = None, *,
         strength: float | None = None, convention: str = "a1111", img2img_fix_steps: bool = False) -> Plan:
    """The σs of a generation; `strength` None is txt2img."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choose from {', '.join(CONVENTIONS)}")
    schedule_name = resolve_schedule(schedule_name)
    a1111 = convention == "a1111"
    options = info.a1111_options if a1111 else ()
    if a1111 and schedule_name is None and info.name in A1111_TIMESTEP_SAMPLERS:
        return _plan_a1111_timesteps(info, schedule, steps, strength, img2img_fix_steps)

    vp = info.vp
    if strength is not None and a1111:
        total, t_enc = img2img_steps(steps, strength, img2img_fix_steps)
    else:
        total, t_enc = steps, None
    if total < 1:  # img2img_fix_steps with strength 0
        return Plan(torch.zeros(1), torch.zeros(1), 0.0)
    name = schedule_name or info.default_schedule or ("normal" if not a1111 else "uniform")
    spacing = None
    if name == "normal" and (not a1111 or info.name not in SAMPLER_NAMES_A1111):
        # diffusers' timesteps: SD's "leading" for the VP samplers, "linspace" (= k-diffusion's) for the others
        spacing = "leading" if vp else "linspace"
    sigmas = get_sigmas(schedule, total, name, spacing=spacing,
                        discard_penultimate=a1111 and info.discard_penultimate)
    if info.ends_at_t0:
        sigmas[-1] = schedule.sigma_min  # they stop at the first training timestep, not at σ = 0
    run = sigmas
    if strength is not None:
        # A1111: t_enc + 1 steps from σ[total − t_enc − 1]; diffusers: skip the first steps − int(steps·strength)
        run = sigmas[total - t_enc - 1:] if a1111 else sigmas[steps - int(steps * strength):]
    noise_sigma = run[0].item() if len(run) else 0.0
    return Plan(run, sigmas, noise_sigma, vp_start=vp and strength is None, vp_end=info.ends_at_t0,
                sampler_options=options)


def _plan_a1111_timesteps(info, schedule, steps, strength, fix_steps) -> Plan:
    """A1111's DDIM, PLMS and UniPC (modules/sd_samplers_timesteps*.py) in σ-space. They run in VP: txt2img starts
    from unit-variance noise, and the result is the VP sample at the last timestep. img2img keeps t_enc of the
    timesteps, noises the image to timestep[t_enc] and starts sampling at timestep[t_enc − 1], one below."""
    total, t_enc = (steps, None) if strength is None else img2img_steps(steps, strength, fix_steps)
    if total < 1:
        return Plan(torch.zeros(1), torch.zeros(1), 0.0)
    ts = a1111_timesteps(total, schedule.num_train_timesteps)
    kept = ts if t_enc is None else ts[:t_enc]
    noise_sigma = math.inf if t_enc is None else schedule.sigmas[ts[t_enc]].item()
    if len(kept) == 0:
        sigmas = torch.tensor([noise_sigma])  # nothing to run: the noised image is the result (A1111's too)
    elif info.name == "UniPC":
        # time-uniform steps from the last kept timestep down to t = 0 (σ_min); as many steps as timesteps kept
        t_start = float(schedule.num_train_timesteps - 1) if t_enc is None else float(kept[-1])
        sigmas = unipc_time_uniform_sigmas(schedule, t_start, len(kept))
    else:
        # the model is evaluated at kept[-1] … kept[1]; the last step lands on kept[0] (t = 1), not on ᾱ_0
        sigmas = schedule.sigmas[kept.flip(0)]
    return Plan(sigmas.float(), sigmas.float(), noise_sigma, vp_start=True, vp_end=True,
                sampler_options=info.a1111_options, log_alpha_timesteps=info.name == "UniPC")


class LogAlphaTimesteps:
    """σ → t as UniPC's NoiseScheduleVP maps them: log α = ½ log ᾱ linear between training timesteps. Between
    them this t differs from the log-σ interpolation (DiscreteSchedule.sigma_to_t) by up to ~0.003."""

    def __init__(self, schedule: DiscreteSchedule):
        self.schedule = schedule
        self.log_alpha = 0.5 * schedule.alphas_cumprod.double().log()  # (T,), decreasing

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        sigma = torch.as_tensor(sigma)
        log_a = -0.5 * torch.log1p(sigma.detach().to("cpu", torch.float64).reshape(-1) ** 2)  # α = 1/sqrt(1 + σ²)
        # the last training timestep whose log α is >= the query, and the fraction of the way to the next one
        low = (self.log_alpha[:, None] >= log_a).sum(0).sub(1).clamp(0, len(self.log_alpha) - 2)
        w = (self.log_alpha[low] - log_a) / (self.log_alpha[low] - self.log_alpha[low + 1])
        t = low + w.clamp(0, 1)
        return (t.round() if quantize else t).to(sigma.device, torch.float32).reshape(sigma.shape)


@torch.no_grad()
def sample(denoiser, sampler: str | SamplerInfo, steps: int, schedule: DiscreteSchedule, rng: SeededNoise,
           shape: tuple[int, ...], *, schedule_name: str | None = None, init_latent: Tensor | None = None,
           strength: float | None = None, latent_mask: Tensor | None = None, convention: str = "a1111",
           img2img_fix_steps: bool = False, eta: float | None = None, extra_args: dict | None = None,
           callback=None, device="cpu") -> Tensor:
    """Latents (B, *shape) of one generation: draw the noise from `rng`, start at the first σ, run the sampler,
    undo the VP scaling at the end. `denoiser(x, σ, **extra_args)` returns x̂0. img2img passes `init_latent` and
    `strength`; inpainting with an ordinary model also `latent_mask` (1 = repaint), blended at every step.
    `callback` gets k-diffusion's step dict plus "total", the number of steps."""
    info = get_sampler(sampler) if isinstance(sampler, str) else sampler
    p = plan(info, schedule, steps, schedule_name, strength=None if init_latent is None else strength,
             convention=convention, img2img_fix_steps=img2img_fix_steps)
    noise = rng.draw(shape).to(device, torch.float32)  # (B, *shape): each image's first draw
    sigmas = p.sigmas.to(device)
    if init_latent is None:
        # pure noise at σ_0; a VP sampler's unit-variance x_T is σ_0·sqrt(1 + 1/σ_0²) in σ-space
        x = noise * (sigmas[0] * (1 + sigmas[0] ** -2) ** 0.5) if p.vp_start else noise * sigmas[0]
    else:
        init_latent = init_latent.to(device)
        if len(sigmas) < 2 and not p.vp_start:  # nothing to denoise (strength 0)
            return init_latent
        x = init_latent + noise * p.noise_sigma
        if p.vp_start:  # noised in VP at noise_sigma, sampled from σ_0: sqrt(ᾱ) changes between the two
            x = x * ((sigmas[0] ** 2 + 1) / (p.noise_sigma ** 2 + 1)) ** 0.5
    if len(sigmas) < 2:
        return x / (1 + sigmas[-1] ** 2) ** 0.5 if p.vp_end else x
    if p.log_alpha_timesteps and hasattr(denoiser, "schedule"):
        denoiser = copy.copy(denoiser)  # A1111's UniPC feeds the UNet the timestep its log-α interpolation gives
        denoiser.schedule = LogAlphaTimesteps(schedule)
    if latent_mask is not None:
        denoiser = _BlendDenoiser(denoiser, init_latent, noise, latent_mask)

    kwargs = dict(p.sampler_options)
    if eta is not None:
        if not info.takes_eta:
            raise ValueError(f"sampler {info.name} takes no eta")
        kwargs["eta"] = eta
    noise_sampler = None
    if convention == "a1111" and info.brownian_noise:
        noise_sampler = brownian_noise_or_none(x, p.all_sigmas, rng.seeds)
    total = len(sigmas) - 1
    on_step = None if callback is None else (lambda d: callback({**d, "total": total}))
    x = info.fn(denoiser, x, sigmas, extra_args=extra_args or {}, callback=on_step, disable=True,
                noise_sampler=noise_sampler or rng.sampler(x), **kwargs)
    if p.vp_end:  # the VP sample at the last σ is sqrt(ᾱ)·x
        x = x / (1 + sigmas[-1] ** 2) ** 0.5
    return x


class _BlendDenoiser:
    """Inpainting with an ordinary model: outside the mask, the sample is the original noised to the current σ, and
    the denoised estimate is the original itself (what diffusers/ComfyUI do for 4-channel models)."""

    def __init__(self, inner, x0, noise, mask):
        self.inner, self.x0, self.noise, self.mask = inner, x0, noise, mask

    def __call__(self, x, sigma, **kwargs):
        s = sigma.reshape(-1, 1, 1, 1) if torch.is_tensor(sigma) and sigma.dim() else sigma
        x = self.mask * x + (1 - self.mask) * (self.x0 + self.noise * s)
        denoised = self.inner(x, sigma, **kwargs)
        return self.mask * denoised + (1 - self.mask) * self.x0
