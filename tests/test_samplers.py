"""Every sampler reproduces the final latents of its diffusers scheduler run by hand (set_timesteps /
scale_model_input / step) from the same initial latent, context and — for the stochastic ones — the same noise;
plus the registry (names, aliases, "DPM++ 2M Karras" parsing) and the one-signature contract (callback, generator).

The ε-network is the `eps_models` fixture: sdtorch's UNet (tiny config, random weights) on our side and the same
weights converted to diffusers' UNet2DConditionModel by diffusers' own converter on the reference side.
"""
from dataclasses import dataclass, field

import pytest
import torch

from reference import diffusers_unet, max_rel_err, prefixed, randomize_
from sdtorch.config import SD1, UNetConfig
from sdtorch.diffusion import SAMPLERS, SCHEDULES, CFGDenoiser, DiscreteSchedule, get_sampler, get_sigmas, \
    parse_sampler_name
from sdtorch.models import UNet

TOL = 1e-4  # fp32; measured errors are 1e-7..1e-6 (the same math in a different order of float operations)
# SD 1.x's scheduler_config.json; spacing and the per-scheduler flags are set explicitly in each case
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           steps_offset=1)
TINY = SD1.replace(unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                   num_heads=4, context_dim=32))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def eps_models():
    """(ours, reference): ε-networks called as model(x, t, context), t a (B,) float tensor."""
    torch.manual_seed(0)
    ours = randomize_(UNet(TINY.unet), seed=1).eval()
    with torch.no_grad():
        # A random UNet predicts ε with std ~0.04, so the initial noise would dominate the final latents and hide
        # sampler errors; scaling the output conv makes ε̂ O(1), like a trained model's.
        ours.out[2].weight.mul_(25)
        ours.out[2].bias.mul_(25)
    reference = diffusers_unet(prefixed("unet", ours.state_dict()), TINY)
    return ours, lambda x, t, context: reference(x, t, encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)  # noise, context


@dataclass
class Case:
    sampler: str
    scheduler: str  # diffusers class
    scheduler_kwargs: dict
    sigmas: str = "leading"  # the "normal" schedule's spacing, or "karras", or "timesteps" (σ at the scheduler's)
    vp: bool = False  # the scheduler's latents are x_t = x/sqrt(σ² + 1), ours x
    end_at_alpha_0: bool = False  # the scheduler stops at ᾱ_0, not σ = 0 (set_alpha_to_one=False)
    noise: str | None = None  # "generator": both draw from equal CPU generators; "noise_sampler": inject ours
    sampler_kwargs: dict = field(default_factory=dict)
    step_kwargs: dict = field(default_factory=dict)  # for the scheduler's step()
    quantize: bool = False  # the scheduler feeds the UNet rounded timesteps


CASES = {
    # DDIM / PLMS: diffusers ends at ᾱ_0 (σ ≈ 0.029), not at x0; we give our sampler the same last σ to compare.
    "DDIM": Case("DDIM", "DDIMScheduler", dict(timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False),
                 vp=True, end_at_alpha_0=True),
    "DDIM eta=0.5": Case("DDIM", "DDIMScheduler", dict(timestep_spacing="leading", set_alpha_to_one=False,
                                                       clip_sample=False),
                         vp=True, end_at_alpha_0=True, noise="generator", sampler_kwargs=dict(eta=0.5),
                         step_kwargs=dict(eta=0.5)),
    "PLMS": Case("PLMS", "PNDMScheduler", dict(timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=True),
                 vp=True, end_at_alpha_0=True),
    "DDPM": Case("DDPM", "DDPMScheduler", dict(timestep_spacing="leading", clip_sample=False), vp=True,
                 noise="generator"),
    "Euler": Case("Euler", "EulerDiscreteScheduler", dict(timestep_spacing="leading")),
    # diffusers takes Karras' σ range from its spaced σs; "linspace" spacing spans the full training range, as ours
    "Euler Karras": Case("Euler", "EulerDiscreteScheduler", dict(timestep_spacing="linspace", use_karras_sigmas=True),
                         sigmas="karras"),
    "Euler a": Case("Euler a", "EulerAncestralDiscreteScheduler", dict(timestep_spacing="leading"), noise="generator"),
    "Heun": Case("Heun", "HeunDiscreteScheduler", dict(timestep_spacing="leading")),
    "LMS": Case("LMS", "LMSDiscreteScheduler", dict(timestep_spacing="leading")),
    "DPM2": Case("DPM2", "KDPM2DiscreteScheduler", dict(timestep_spacing="leading")),
    "DPM2 a": Case("DPM2 a", "KDPM2AncestralDiscreteScheduler", dict(timestep_spacing="leading"), noise="generator"),
    # DPMSolverMultistep's "leading" is its own (T // (n+1) strides); "trailing" is the common definition
    "DPM++ 2M": Case("DPM++ 2M", "DPMSolverMultistepScheduler", dict(timestep_spacing="trailing"), sigmas="trailing",
                     vp=True),
    "DPM++ 2M Karras": Case("DPM++ 2M", "DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), sigmas="karras",
                            vp=True, quantize=True),
    "DPM++ 2M SDE": Case("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                         dict(timestep_spacing="trailing", algorithm_type="sde-dpmsolver++"), sigmas="trailing",
                         vp=True, noise="generator"),
    "DPM++ SDE": Case("DPM++ SDE", "DPMSolverSDEScheduler", dict(timestep_spacing="leading"), noise="noise_sampler"),
    "UniPC": Case("UniPC", "UniPCMultistepScheduler", dict(timestep_spacing="trailing"), sigmas="trailing", vp=True),
    # A1111's UniPC settings (variant bh1, order 3, lower order at the end), ending at σ_min as A1111's does (diffusers'
    # bh1 step to σ = 0 is NaN); diffusers ports the same UniPC code
    "UniPC bh1 order 3": Case("UniPC", "UniPCMultistepScheduler",
                              dict(timestep_spacing="trailing", solver_type="bh1", solver_order=3,
                                   final_sigmas_type="sigma_min"),
                              sigmas="trailing", vp=True, end_at_alpha_0=True,
                              sampler_kwargs=dict(order=3, variant="bh1")),
    "LCM": Case("LCM", "LCMScheduler", {}, sigmas="timesteps", vp=True, noise="generator"),
}


def gaussian_noise_sampler(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(1, 4, 8, 8, generator=g)


def make_scheduler(case: Case):
    if case.scheduler == "LMSDiscreteScheduler":
        pytest.importorskip("scipy")  # diffusers' LMS integrates its coefficients with scipy
    if case.scheduler == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde")  # imported by the module; we inject our own noise sampler below
    import diffusers
    return getattr(diffusers, case.scheduler)(**SD_SCHEDULER_CONFIG, **case.scheduler_kwargs)


def run_reference(case, scheduler, eps, x, context, steps):
    scheduler.set_timesteps(steps)
    step_kwargs = dict(case.step_kwargs)
    if case.noise == "generator":
        step_kwargs["generator"] = torch.Generator().manual_seed(1)
    if case.noise == "noise_sampler":
        scheduler.noise_sampler = gaussian_noise_sampler(1)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = eps(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]), context)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def our_sigmas(case, schedule, steps, scheduler):
    if case.sigmas == "karras":
        sigmas = get_sigmas(schedule, steps, "karras")
    elif case.sigmas == "timesteps":
        scheduler.set_timesteps(steps)
        sigmas = torch.cat([schedule.t_to_sigma(scheduler.timesteps.double()), torch.zeros(1)])
    else:
        sigmas = get_sigmas(schedule, steps, "normal", spacing=case.sigmas)
    if case.end_at_alpha_0:
        sigmas[-1] = schedule.sigmas[0]
    return sigmas


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", list(CASES))
def test_sampler_matches_diffusers(name, steps, eps_models, inputs):
    case = CASES[name]
    ours_unet, reference_unet = eps_models
    noise, context = inputs
    schedule = DiscreteSchedule.scaled_linear()
    scheduler = make_scheduler(case)
    sigmas = our_sigmas(case, schedule, steps, scheduler)

    scheduler.set_timesteps(steps)
    x_ref = noise * scheduler.init_noise_sigma
    to_ours = (1 + sigmas[0] ** 2) ** 0.5 if case.vp else 1.0  # VP x_t = x/sqrt(σ² + 1)
    ref = run_reference(case, scheduler, reference_unet, x_ref, context, steps)

    kwargs = dict(case.sampler_kwargs)
    if case.noise == "generator":
        kwargs["generator"] = torch.Generator().manual_seed(1)
    if case.noise == "noise_sampler":
        kwargs["noise_sampler"] = gaussian_noise_sampler(1)
    denoiser = CFGDenoiser(ours_unet, schedule, quantize_timesteps=case.quantize)
    ours = SAMPLERS[case.sampler].fn(denoiser, x_ref * to_ours, sigmas, extra_args={"cond": context}, disable=True,
                                     **kwargs)
    if case.vp:
        ours = ours / (1 + sigmas[-1] ** 2) ** 0.5

    err = max_rel_err(ours, ref)
    print(f"{name} {steps} steps: max rel err {err:.2e}")
    assert err < TOL, f"{name} at {steps} steps: max relative error {err:.2e}"


def test_cfg_with_rescale_matches_diffusers_pipeline_math(eps_models, inputs):
    """Euler, 10 steps, CFG 7.5 with guidance_rescale 0.7, against diffusers' pipeline code for the same."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    ours_unet, reference_unet = eps_models
    noise, cond = inputs
    uncond = torch.randn(cond.shape, generator=torch.Generator().manual_seed(2))
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG, timestep_spacing="leading")
    scheduler.set_timesteps(10)
    x = noise * scheduler.init_noise_sigma
    x_start = x
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            out_uncond, out_cond = reference_unet(x_in, t.expand(2), torch.cat([uncond, cond])).chunk(2)
            out = rescale_noise_cfg(out_uncond + 7.5 * (out_cond - out_uncond), out_cond, guidance_rescale=0.7)
            x = scheduler.step(out, t, x).prev_sample

    schedule = DiscreteSchedule.scaled_linear()
    denoiser = CFGDenoiser(ours_unet, schedule)
    ours = SAMPLERS["Euler"].fn(denoiser, x_start, get_sigmas(schedule, 10, spacing="leading"), disable=True,
                                extra_args=dict(cond=cond, uncond=uncond, cfg_scale=7.5, guidance_rescale=0.7))
    err = max_rel_err(ours, x)
    print(f"Euler CFG 7.5 rescale 0.7: max rel err {err:.2e}")
    assert err < TOL


def test_dpmpp_2m_karras_20_steps_gives_finite_latents(eps_models, inputs):
    ours_unet, _ = eps_models
    noise, cond = inputs
    schedule = DiscreteSchedule.scaled_linear()
    info, schedule_name = parse_sampler_name("DPM++ 2M Karras")
    sigmas = get_sigmas(schedule, 20, schedule_name)
    x = info.fn(CFGDenoiser(ours_unet, schedule), noise * sigmas[0], sigmas, disable=True,
                extra_args=dict(cond=cond, uncond=torch.zeros_like(cond), cfg_scale=7.5))
    assert x.shape == noise.shape and torch.isfinite(x).all()


# ---- the one signature: every sampler, a cheap analytic denoiser -----------------------------------------------------

def toy_denoiser(x, sigma):
    """D(x, σ) of data that is a point mass at 0.5: a smooth, σ-dependent stand-in for a UNet."""
    return 0.5 + 0 * x + 0.1 * x / (1 + sigma[:, None, None, None] ** 2)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_reports_every_step_and_can_interrupt(name):
    schedule = DiscreteSchedule.scaled_linear()
    sigmas = get_sigmas(schedule, 6)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    seen = []
    out = SAMPLERS[name].fn(toy_denoiser, x, sigmas, callback=seen.append, disable=True,
                            generator=torch.Generator().manual_seed(0))
    assert [s["i"] for s in seen] == list(range(6))
    assert {"i", "x", "sigma", "sigma_hat", "denoised"} <= set(seen[0])
    assert torch.equal(seen[0]["sigma"], sigmas[0]) and seen[0]["denoised"].shape == x.shape
    assert out.shape == x.shape and torch.isfinite(out).all()

    class Interrupted(Exception):
        pass

    def stop_at_2(info):
        if info["i"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        SAMPLERS[name].fn(toy_denoiser, x, sigmas, callback=stop_at_2, disable=True)


@pytest.mark.parametrize("name", [n for n, info in SAMPLERS.items() if info.stochastic])
def test_stochastic_samplers_are_reproducible_from_a_generator(name):
    schedule = DiscreteSchedule.scaled_linear()
    sigmas = get_sigmas(schedule, 5)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    fn = SAMPLERS[name].fn

    def run(seed):
        return fn(toy_denoiser, x, sigmas, disable=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    calls = []

    def zero_noise(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return torch.zeros_like(x)

    fn(toy_denoiser, x, sigmas, disable=True, noise_sampler=zero_noise)
    assert calls and all(s > sn for s, sn in calls)  # a given noise_sampler is used, asked for (σ, σ_next < σ)


@pytest.mark.parametrize("name", [n for n, info in SAMPLERS.items() if not info.stochastic])
def test_deterministic_samplers_converge_to_the_data_point(name):
    """With D(x, σ) = 0.5 exactly, every sampler must end at 0.5 when its σ list ends in 0."""
    schedule = DiscreteSchedule.scaled_linear()
    sigmas = get_sigmas(schedule, 8)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    out = SAMPLERS[name].fn(lambda x, s: torch.full_like(x, 0.5), x, sigmas, disable=True)
    torch.testing.assert_close(out, torch.full_like(x, 0.5), rtol=0, atol=1e-5)


# ---- the registry ----------------------------------------------------------------------------------------------------

def test_registry_names_the_a1111_samplers_and_schedules():
    assert set(SAMPLERS) == {"DDIM", "DDPM", "PLMS", "Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM2 a", "DPM++ 2M",
                             "DPM++ 2M SDE", "DPM++ SDE", "UniPC", "LCM"}
    assert set(SCHEDULES) >= {"normal", "karras", "exponential", "sgm_uniform"}
    for info in SAMPLERS.values():
        assert info.default_schedule is None or info.default_schedule in SCHEDULES  # None: A1111's "Automatic"
        for alias in info.aliases:
            assert get_sampler(alias) is info, alias


def test_registry_says_which_samplers_take_eta():
    """The pipeline trusts `takes_eta` to refuse an eta a sampler would not use: it must match the signatures."""
    import inspect

    for info in SAMPLERS.values():
        assert info.takes_eta == ("eta" in inspect.signature(info.fn).parameters), info.name
    assert {n for n, i in SAMPLERS.items() if i.takes_eta} == {"DDIM", "Euler a", "DPM2 a", "DPM++ 2M SDE",
                                                                "DPM++ SDE"}


@pytest.mark.parametrize("name, expected", [
    ("euler_ancestral", "Euler a"), ("k_euler_a", "Euler a"), ("EULER A", "Euler a"), ("dpmpp_2m", "DPM++ 2M"),
    ("dpm++ 2m", "DPM++ 2M"), ("DPMPP_2M_SDE", "DPM++ 2M SDE"), ("dpm_2_ancestral", "DPM2 a"), ("uni_pc", "UniPC"),
    ("k_lms", "LMS"), ("Euler", "Euler"),
])
def test_get_sampler_ignores_case_spaces_and_accepts_aliases(name, expected):
    assert get_sampler(name).name == expected


@pytest.mark.parametrize("name, sampler, schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "karras"), ("DPM++ 2M", "DPM++ 2M", None), ("Euler a", "Euler a", None),
    ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "exponential"), ("DPM++ SDE Karras", "DPM++ SDE", "karras"),
    ("LCM SGM Uniform", "LCM", "sgm_uniform"), ("dpmpp_2m_karras", "DPM++ 2M", "karras"),
    ("DPM2 a Karras", "DPM2 a", "karras"),
])
def test_parse_sampler_name_splits_off_the_schedule(name, sampler, schedule):
    info, schedule_name = parse_sampler_name(name)
    assert (info.name, schedule_name) == (sampler, schedule)


def test_unknown_names_raise_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown sampler 'DPM\+\+ 2N'; did you mean 'DPM\+\+ 2M'\? choose from DDIM"):
        get_sampler("DPM++ 2N")
    with pytest.raises(ValueError, match="unknown sampler 'Eulr a'; did you mean 'Euler a'"):
        parse_sampler_name("Eulr a")
    with pytest.raises(ValueError, match="unknown sampler 'zzz'; choose from"):
        get_sampler("zzz")
    with pytest.raises(ValueError, match="unknown schedule 'karas'; did you mean 'karras'"):
        get_sigmas(DiscreteSchedule.scaled_linear(), 10, "karas")


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_get_sigmas_descends_to_zero(schedule_name, steps):
    sigmas = get_sigmas(DiscreteSchedule.scaled_linear(), steps, schedule_name)
    # A1111's exceptions, kept: "DDIM" gives one σ per stride of ⌊T/n⌋ (8 for n = 7); "KL Optimal" ends at σ_min
    count = len(range(1, 1000, 1000 // steps)) if schedule_name == "ddim" else steps
    assert sigmas.shape == (count + 1,) and sigmas.dtype == torch.float32
    last = sigmas[-1] if schedule_name != "kl_optimal" else sigmas[-1] - DiscreteSchedule.scaled_linear().sigma_min
    assert last.abs() < 1e-6 and (sigmas[:-1] > 0).all() and (sigmas[1:] < sigmas[:-1]).all()
