"""sdtorch.diffusion.sample, the one definition of a generation: it gives the images the pipeline's own loop gave
before it existed, and the pipeline and the training preview go through it."""
import pytest
import torch

from sdtorch.diffusion import SAMPLERS, DiscreteSchedule, SeededNoise, get_sigmas, sample

# the schedule each sampler used before the refactor when none was named
OLD_DEFAULTS = {"DPM++ 2M": "karras", "DPM++ 2M SDE": "exponential", "DPM++ SDE": "karras", "LCM": "sgm_uniform"}
OLD_VP = {"DDIM": True, "DDPM": False, "PLMS": True, "LCM": False}  # name -> ends at t0, for the VP samplers


def old_pipeline_loop(info, denoiser, steps, schedule, seed, batch, shape, init=None, strength=None):
    """The sampling part of Pipeline.run as it was before sample() (commit 834a0d4), kept here as the reference."""
    vp = info.name in OLD_VP
    sigmas = get_sigmas(schedule, steps, OLD_DEFAULTS.get(info.name, "normal"),
                        spacing="leading" if vp else "linspace")
    if OLD_VP.get(info.name):
        sigmas[-1] = schedule.sigma_min
    rng = SeededNoise(seed, batch)
    noise = rng.draw(shape).to(torch.float32)
    if init is not None:
        sigmas = sigmas[steps - int(steps * strength):]
    if len(sigmas) < 2:
        return init
    start = sigmas[0] * (1 + sigmas[0] ** -2) ** 0.5 if vp and init is None else sigmas[0]
    x = noise * start if init is None else init + noise * sigmas[0]
    latents = info.fn(denoiser, x, sigmas, extra_args={}, disable=True, noise_sampler=rng.sampler(x))
    if OLD_VP.get(info.name):
        latents = latents / (1 + sigmas[-1] ** 2) ** 0.5
    return latents


def toy_denoiser(x, sigma, **_):
    """A smooth stand-in for D(x, σ): shrinks towards a fixed pattern, more at high σ."""
    s = sigma.reshape(-1, 1, 1, 1)
    target = torch.linspace(-1, 1, x[0].numel()).reshape(x.shape[1:])
    return (x + s**2 * target) / (1 + s**2)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("img2img", [False, True])
def test_sample_gives_the_old_pipeline_loops_latents(name, img2img):
    schedule = DiscreteSchedule.scaled_linear()
    info = SAMPLERS[name]
    init = torch.linspace(-1, 1, 2 * 4 * 3 * 5).reshape(2, 4, 3, 5) if img2img else None
    strength = 0.6 if img2img else None
    old = old_pipeline_loop(info, toy_denoiser, 7, schedule, 5, 2, (4, 3, 5), init, strength)
    new = sample(toy_denoiser, name, 7, schedule, SeededNoise(5, 2), (4, 3, 5), init_latent=init, strength=strength,
                 schedule_name=OLD_DEFAULTS.get(name, "normal"), convention="diffusers")
    # the same arithmetic in the same order: bit-identical
    assert torch.equal(new, old)


def test_the_pipeline_and_the_training_preview_sample_through_it():
    import inspect

    from sdtorch import pipeline
    from sdtorch.train import objectives

    for module in (pipeline, objectives):
        source = inspect.getsource(module)
        assert "sample(" in source and ".fn(" not in source  # no sampler is called around sample()
