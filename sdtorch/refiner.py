"""A1111's "Refiner": a second model finishes the sampling run the first began.

SDXL's refiner (Podell et al. 2023, sec. 2.5) was trained on the low-noise end of the schedule only, to add detail
once the base model has laid out the picture; any other model with the same latent space can take that role too (A1111
allows it: an SD 1.5 fine-tune refining another). The sampler runs once, over the whole schedule: its first model calls
go to the base, and from the switch on every call goes to the refiner, with the refiner's own conditioning of the same
prompts. The sampler's state (x, its history) carries on unchanged.

A1111 decides at each model call from the σ the sampler asks about: t = the training timestep whose σ is nearest, and
the refiner takes over once (999 - t) / 1000 ≥ "Refiner switch at" (so 0.8 hands the last fifth of the noise levels,
by timestep, to the refiner; 1 never switches). The images' parameters then carry "Refiner: name [hash]" and
"Refiner switch at", and A1111 decodes the latents with the refiner's VAE, the model loaded at the end.
"""
from collections.abc import Callable

import torch

from .diffusion.schedule import DiscreteSchedule


def completed_ratio(schedule: DiscreteSchedule, sigma: torch.Tensor) -> float:
    """How far through the schedule σ is, as A1111 measures it for the switch: (999 - nearest t) / 1000."""
    t = int(torch.argmin((schedule.sigmas - sigma.max().to(schedule.sigmas)).abs()))
    return (999 - t) / 1000


class Handover:
    """A denoiser that is `base` until the switch, then `refiner` called with `refiner_args` (its conditioning) in
    place of the base's; `on_switch` runs once, when it happens (the pipeline frees the base's packed weights)."""

    def __init__(self, base, refiner, refiner_args: dict, schedule: DiscreteSchedule, switch_at: float,
                 on_switch: Callable[[], None] = lambda: None):
        self.base, self.refiner, self.refiner_args = base, refiner, refiner_args
        self.schedule, self.switch_at, self.on_switch = schedule, switch_at, on_switch
        self.switched = False

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **args) -> torch.Tensor:
        if not self.switched and completed_ratio(self.schedule, torch.as_tensor(sigma)) >= self.switch_at:
            self.switched = True
            self.refiner.calls = self.base.calls  # one count of model calls for NGMS, as A1111's one CFGDenoiser
            self.on_switch()
        if self.switched:
            return self.refiner(x, sigma, **(args | self.refiner_args))
        return self.base(x, sigma, **args)

    @property
    def skipped_uncond(self) -> bool:
        return self.base.skipped_uncond or self.refiner.skipped_uncond
