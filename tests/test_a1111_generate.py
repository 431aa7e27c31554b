"""`sdtorch generate --from` on A1111's texts, and the hires fix (issue 18, points 6–8): A1111's settings in, A1111's
σs and noise out, on the tiny random model."""
from collections import defaultdict
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdtorch import pipeline as pipeline_module
from sdtorch.cli import build_parser, generation_settings
from sdtorch.diffusion import PhiloxGenerator, SeededNoise, get_sigmas
from sdtorch.diffusion.sample import a1111_timesteps, img2img_steps, plan, unipc_time_uniform_sigmas
from sdtorch.diffusion.samplers import SAMPLERS, get_sampler
from sdtorch.hires import resolve_upscaler, target_size, upscale_pixels
from sdtorch.metadata import save_png
from test_a1111 import A1111_LABELS
from test_pipeline import tiny_pipe

A1111_SAMPLERS = ["Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
                  "DDIM", "PLMS", "UniPC"]
# A1111's samplers_k_diffusion 'scheduler' option ("Automatic"); None: the model's own σs, i.e. "Uniform"
A1111_AUTOMATIC = {"DPM2": "karras", "DPM2 a": "karras", "DPM++ 2M": "karras", "DPM++ SDE": "karras",
                   "DPM++ 2M SDE": "exponential"}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


def settings_from(tmp_path, text, *extra):
    path = tmp_path / "a1111.png"
    save_png(Image.new("RGB", (8, 8)), path, text)
    # the settings given (by the PNG and the options); one not given reads as None (the pipeline's default applies)
    return defaultdict(lambda: None, generation_settings(build_parser().parse_args(["generate", "--from", str(path),
                                                                                  *extra])))


def a1111_sigmas(sampler, label, steps, schedule):
    """The σs A1111 samples txt2img with: DDIM/PLMS/UniPC ignore the schedule type; the others resolve Automatic
    to their own default and DPM2 builds one σ more and drops the next-to-last."""
    if sampler in ("DDIM", "PLMS"):
        return schedule.sigmas[a1111_timesteps(steps).flip(0)]
    if sampler == "UniPC":
        return unipc_time_uniform_sigmas(schedule, 999.0, len(a1111_timesteps(steps)))
    name = A1111_AUTOMATIC.get(sampler, "uniform") if label == "Automatic" else label
    return get_sigmas(schedule, steps, name.lower().replace(" ", "_"), discard_penultimate=sampler.startswith("DPM2"))


@pytest.mark.parametrize("sampler", A1111_SAMPLERS)
@pytest.mark.parametrize("label", A1111_LABELS)
def test_from_reads_every_label_and_sampler_as_a1111_runs_them(tmp_path, pipe, sampler, label):
    text = f"a cat\nSteps: 9, Sampler: {sampler}, Schedule type: {label}, CFG scale: 7, Seed: 4, Size: 64x48"
    s = settings_from(tmp_path, text)
    assert s["rng"] == "nv"  # no "RNG": A1111's default, GPU noise
    info, schedule_name = pipe.sampler_and_schedule(pipeline_module.Settings("a cat", sampler=s["sampler"],
                                                                             schedule=s["schedule"]))
    p = plan(info, pipe.schedule, s["steps"], schedule_name)
    assert torch.equal(p.sigmas, a1111_sigmas(sampler, label, 9, pipe.schedule).float())


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM", "DPM++ 2M Karras"])
@torch.no_grad()
def test_from_runs_with_a1111s_gpu_noise(tmp_path, pipe, monkeypatch, sampler):
    calls = record_sample_calls(monkeypatch)
    s = settings_from(tmp_path, f"a cat\nSteps: 3, Sampler: {sampler}, CFG scale: 7, Seed: 4, Size: 32x24")
    prompt, negative = s.pop("prompt"), s.pop("negative", "")
    s.pop("strength", None)
    images = pipe.txt2img(prompt, negative, **{k: v for k, v in s.items() if v is not None or k == "schedule"})
    assert images[0].size == (32, 24) and "RNG: NV" in images[0].info["parameters"]
    rng = calls[0]["rng"]
    assert isinstance(rng.generators[0], PhiloxGenerator) and rng.seeds == [4]
    # the first draw is CUDA's torch.randn((4, 3, 4)) for seed 4, as A1111 made it
    assert torch.equal(SeededNoise(4, 1, "nv").draw((4, 3, 4))[0], PhiloxGenerator(4).randn((4, 3, 4)))


def record_sample_calls(monkeypatch):
    """Wrap pipeline.sample to keep each call's arguments and result."""
    calls = []
    original = pipeline_module.sample

    def spy(denoiser, sampler, steps, schedule, rng, shape, **kwargs):
        out = original(denoiser, sampler, steps, schedule, rng, shape, **kwargs)
        calls.append(dict(sampler=sampler, steps=steps, rng=rng, shape=shape, out=out, **kwargs))
        return out

    monkeypatch.setattr(pipeline_module, "sample", spy)
    return calls


# ---- point 3: img2img in the pipeline ------------------------------------------------------------------------------

@torch.no_grad()
def test_img2img_runs_a1111s_step_count(pipe):
    sigmas_seen = []
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    pipe.img2img("a cat", init, strength=0.5, steps=6, sampler="Euler", seed=1,
                 callback=lambda i, total, x, sigma: sigmas_seen.append(float(sigma)))
    # A1111: t_enc = int(0.5·6) = 3, 4 steps from σ[6 − 3 − 1] of the 6-step uniform schedule
    full = get_sigmas(pipe.schedule, 6, "uniform")
    assert sigmas_seen == pytest.approx(full[2:-1].tolist(), rel=0) and len(sigmas_seen) == 4


# ---- point 8: hires fix --------------------------------------------------------------------------------------------

@torch.no_grad()
def test_hires_fix_is_a1111s_two_passes(pipe, monkeypatch):
    calls = record_sample_calls(monkeypatch)
    images = pipe.txt2img("a cat", steps=4, sampler="Euler a", seed=3, width=32, height=24, hires_scale=2.0,
                          hires_steps=3, hires_strength=0.5, hires_upscaler="Latent")
    assert images[0].size == (64, 48)
    first, second = calls
    assert first["shape"] == (4, 3, 4) and second["shape"] == (4, 6, 8)
    # the second pass: img2img of the bilinear latent upscale, A1111's fix-steps count, fresh noise of the same seed
    torch.testing.assert_close(second["init_latent"], F.interpolate(first["out"], size=(6, 8), mode="bilinear"),
                               rtol=0, atol=0)
    assert second["strength"] == 0.5 and second["img2img_fix_steps"] and second["steps"] == 3
    assert second["rng"] is not first["rng"] and second["rng"].seeds == [3]
    assert img2img_steps(3, 0.5, fix_steps=True) == (6, 2)  # 3 steps from σ[3] of a 6-step schedule
    p = plan(get_sampler("Euler a"), pipe.schedule, 3, None, strength=0.5, img2img_fix_steps=True)
    assert torch.equal(p.sigmas, get_sigmas(pipe.schedule, 6, "uniform")[3:])
    text = images[0].info["parameters"]
    for field in ("Size: 32x24", "Denoising strength: 0.5", "Hires upscale: 2", "Hires steps: 3",
                  "Hires upscaler: Latent"):
        assert field in text


@torch.no_grad()
def test_hires_fix_settings_round_trip_through_from(tmp_path, pipe):
    image = pipe.txt2img("a cat", steps=2, sampler="Euler", seed=3, width=32, height=32, hires_scale=1.5,
                         hires_steps=2, hires_strength=0.6, hires_upscaler="Lanczos")[0]
    assert image.size == (48, 48)
    path = tmp_path / "h.png"
    save_png(image, path, image.info["parameters"])
    s = generation_settings(build_parser().parse_args(["generate", "--from", str(path)]))
    assert (s["hires_scale"], s["hires_steps"], s["hires_upscaler"], s["hires_strength"], s["rng"]) == \
        (1.5, 2, "Lanczos", 0.6, "cpu")
    s = settings_from(tmp_path, "a\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Denoising strength: 0.4, "
                      "Hires resize: 1024x768, Hires upscaler: Latent (bicubic antialiased)")
    assert s["hires_resize"] == (1024, 768) and s["hires_strength"] == 0.4


def test_hires_target_size_as_a1111():
    assert target_size(512, 512, 2.0, None) == (1024, 1024, 0, 0)
    assert target_size(512, 768, 1.5, None) == (768, 1152, 0, 0)
    assert target_size(512, 512, None, (1024, 0)) == (1024, 1024, 0, 0)
    # both given: cover the box keeping the aspect, then crop the excess (in latent pixels)
    assert target_size(512, 512, None, (1024, 768)) == (1024, 1024, 0, 32)


def test_image_upscalers_resize_8_bit_images_as_a1111():
    pixels = torch.linspace(-1, 1, 3 * 8 * 8).reshape(1, 3, 8, 8)
    out = upscale_pixels(pixels, 16, 16, "Nearest")
    # nearest 2x of the truncated 8-bit image: every pixel repeated in a 2x2 block
    eight_bit = (255.0 * ((pixels + 1) / 2)).to(torch.uint8).float() / 255 * 2 - 1
    assert torch.equal(out, eight_bit.repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_network_upscalers_are_refused_by_name():
    for name in ("R-ESRGAN 4x+", "ESRGAN_4x", "SwinIR 4x", "LDSR"):
        with pytest.raises(ValueError, match=re.escape(f"hires upscaler '{name}' is not available in sdtorch")):
            resolve_upscaler(name)
    assert resolve_upscaler("latent (bicubic)") == "Latent (bicubic)"


def test_cli_refuses_a_network_upscaler_in_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sdtorch.cli", "generate", "x", "--hires-upscaler", "4x-UltraSharp"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "hires upscaler '4x-UltraSharp' is not available" in r.stderr


def test_every_sampler_has_an_a1111_plan():
    assert set(A1111_SAMPLERS) <= set(SAMPLERS)


def test_from_an_a1111_img2img_text_keeps_its_strength_and_step_rule(tmp_path, pipe):
    s = settings_from(tmp_path, "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 2, "
                      "Size: 64x64, Denoising strength: 0.45, RNG: CPU")
    assert s["strength"] == 0.45 and s["rng"] == "cpu" and s["hires_strength"] is None  # an img2img strength
    p = plan(get_sampler(s["sampler"]), pipe.schedule, s["steps"], s["schedule"], strength=s["strength"])
    # A1111: t_enc = int(0.45·20) = 9, so 10 steps from σ[20 − 9 − 1] of the 20-step Karras schedule
    assert torch.equal(p.sigmas, get_sigmas(pipe.schedule, 20, "karras")[10:])
