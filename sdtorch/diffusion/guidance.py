"""Classifier-free guidance: the denoiser D(x, σ) that every sampler calls, built around the UNet."""
import torch
from torch import Tensor

from .schedule import DiscreteSchedule, _check_prediction_type, denoiser_scalings


def rescale_guidance(guided: Tensor, cond: Tensor, guidance_rescale: float) -> Tensor:
    """Scale the guided prediction to the per-sample std of the conditional one, then blend by φ
    (Lin et al. 2023, eqs. 15–16); applied to the raw network output, as diffusers' rescale_noise_cfg does."""
    dims = list(range(1, guided.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


class CFGDenoiser:
    """x̂0 = D(x, σ) from a UNet trained in VP: scale x to x_t, evaluate at t(σ), guide (Ho & Salimans 2022), and turn
    the ε/v/x0 output into x̂0 (Karras et al. 2022, Table 1).

    `unet(x, t, context)` takes x (B, C, h, w), t (B,) float timesteps and context (B, L, D). With
    `quantize_timesteps` the UNet sees the nearest training timestep instead of a fractional one (A1111's
    "Enable quantization in K samplers"; diffusers' DPM-Solver schedulers round their Karras timesteps the same way).

    `s_min_uncond` > 0 is A1111's "Negative Guidance minimum sigma" (NGMS), an approximation for speed: below that σ,
    every other model call (every call with `s_min_uncond_all`) skips the unconditional half and returns the
    conditional prediction alone, as guidance scale 1 would. Calls are counted from the sampler's start, as A1111's
    CFGDenoiser.step counts them (`calls`; set it to 0 before another sampling run).
    """

    def __init__(self, unet, schedule: DiscreteSchedule, prediction_type: str = "epsilon",
                 quantize_timesteps: bool = False, s_min_uncond: float = 0.0, s_min_uncond_all: bool = False):
        _check_prediction_type(prediction_type)
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.quantize_timesteps = quantize_timesteps
        self.s_min_uncond, self.s_min_uncond_all = s_min_uncond, s_min_uncond_all
        self.calls = 0
        self.skipped_uncond = False  # whether NGMS skipped any call (A1111 then writes "NGMS" into the infotext)

    def __call__(self, x: Tensor, sigma: Tensor, *, cond: Tensor, uncond: Tensor | None = None, cfg_scale: float = 1.0,
                 guidance_rescale: float = 0.0, c_concat: Tensor | None = None, y: Tensor | None = None,
                 uncond_y: Tensor | None = None) -> Tensor:
        """x (B, 4, h, w) at noise level σ (scalar or (B,)); cond/uncond (B, L, D); c_concat (B, 5, h, w) for
        9-channel inpainting UNets; y/uncond_y (B, adm) the added conditions of SDXL's UNet. Returns x̂0 (B, 4, h, w)."""
        batch = x.shape[0]
        # σ, t and the scalings stay in at least float32: σ ≈ 14.6 in fp16 would move t by a few tenths
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype)
        if sigma.dim() == 0:
            sigma = sigma.expand(batch)
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must be a scalar or ({batch},), got {tuple(sigma.shape)}")
        if cond.dim() != 3 or cond.shape[0] != batch:
            raise ValueError(f"cond must be ({batch}, L, D), got {tuple(cond.shape)}")
        skip_uncond = (self.s_min_uncond > 0 and (self.calls % 2 == 1 or self.s_min_uncond_all)
                       and float(sigma[0]) < self.s_min_uncond)
        self.calls += 1
        self.skipped_uncond |= skip_uncond
        guided = uncond is not None and cfg_scale != 1.0 and not skip_uncond
        if guided and uncond.shape != cond.shape:
            raise ValueError(f"uncond {tuple(uncond.shape)} must match cond {tuple(cond.shape)}; pad the shorter "
                             "prompt's context to the same length")

        c_skip, c_out, c_in = denoiser_scalings(sigma.reshape(-1, *([1] * (x.dim() - 1))), self.prediction_type)
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize_timesteps)  # (B,)
        x_in = (x * c_in).to(x.dtype)
        if c_concat is not None:
            if c_concat.shape[0] != batch or c_concat.shape[2:] != x.shape[2:]:
                raise ValueError(f"c_concat must be ({batch}, C, {x.shape[2]}, {x.shape[3]}), "
                                 f"got {tuple(c_concat.shape)}")
            x_in = torch.cat([x_in, c_concat.to(x_in.dtype)], dim=1)  # (B, 4, h, w) -> (B, 4 + C, h, w), not scaled

        added = {} if y is None else {"y": y}  # only UNets with added conditions take y
        if not guided:  # scale 1 (or NGMS) is the conditional prediction alone: no unconditional pass
            out = self.unet(x_in, t, cond, **added)
        else:
            if y is not None:
                added = {"y": torch.cat([uncond_y, y])}
            # One batched call, unconditional half first (as diffusers orders it): (2B, ...) -> 2 × (B, ...)
            out_uncond, out_cond = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]),
                                             torch.cat([uncond, cond]), **added).chunk(2)
            out = out_uncond + cfg_scale * (out_cond - out_uncond)
            if guidance_rescale > 0:
                out = rescale_guidance(out, out_cond, guidance_rescale)
        return (c_skip * x + c_out * out).to(x.dtype)
