"""The diffusion process: noise schedules (training and sampling), samplers, classifier-free guidance."""
from .guidance import CFGDenoiser, rescale_guidance
from .noise import PhiloxGenerator, SeededNoise, seed_noise
from .sample import sample
from .samplers import SAMPLERS, SCHEDULE_LABELS, SCHEDULES, SamplerInfo, get_sampler, get_sigmas, parse_sampler_name
from .schedule import (PREDICTION_TYPES, SPACINGS, DiscreteSchedule, convert_prediction, denoiser_scalings,
                       rescale_zero_terminal_snr, scaled_linear_betas, spaced_timesteps)

__all__ = [
    "CFGDenoiser", "rescale_guidance",
    "PhiloxGenerator", "SeededNoise", "seed_noise", "sample",
    "SAMPLERS", "SCHEDULE_LABELS", "SCHEDULES", "SamplerInfo", "get_sampler", "get_sigmas", "parse_sampler_name",
    "PREDICTION_TYPES", "SPACINGS", "DiscreteSchedule", "convert_prediction", "denoiser_scalings",
    "rescale_zero_terminal_snr", "scaled_linear_betas", "spaced_timesteps",
]
