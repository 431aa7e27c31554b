"""The `sdtorch` command, run as a user runs it: a subprocess against a small random-weight checkpoint."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_models
from sdtorch.metadata import save_png

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
FAST = ["--steps", "2", "--width", "32", "--height", "32", "--quiet"]


def sdtorch(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "sdtorch.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from sdtorch.checkpoint import save_checkpoint
    from conftest import TINY

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(tiny_models(), path, config=TINY)
    return path


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory, model):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("vae") / "other-vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_models(seed=10).vae.state_dict().items()}, path)  # encoder.* keys
    return path


def params_of(path):
    with Image.open(path) as im:
        return im.info["parameters"]


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_writes_a_png_with_a1111_parameters(model, tmp_path):
    out = tmp_path / "a.png"
    r = sdtorch("generate", "a red circle", "--model", model, "--seed", 5, "-o", out, *FAST)
    assert r.returncode == 0, r.stderr
    assert "seed: 5" in r.stdout and str(out) in r.stdout
    text = params_of(out)
    assert text.startswith("a red circle\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, "
                           "Size: 32x32, Model hash: ")
    assert "Model: tiny" in text
    assert Image.open(out).size == (32, 32)


def test_every_generation_option(model, vae_file, tmp_path):
    folder = tmp_path / "outs"
    args = ["generate", "a (blue:1.2) square", "--model", model, "--negative", "green", "--cfg", "4.5",
            "--sampler", "DPM++ 2M", "--schedule", "karras", "--seed", 11, "--width", 48, "--height", 32, "-n", 2,
            "--clip-skip", 2, "--device", "cpu", "--dtype", "fp32", "--vae", vae_file, "--steps", 3, "-o", folder,
            "--quiet"]
    r = sdtorch(*args)
    assert r.returncode == 0, r.stderr
    first = sorted(folder.glob("*.png"))
    assert [p.name for p in first] == ["00000-11.png", "00001-12.png"]
    assert params_of(first[1]) == ("a (blue:1.2) square\nNegative prompt: green\nSteps: 3, Sampler: DPM++ 2M, "
                                   "Schedule type: Karras, CFG scale: 4.5, Seed: 12, Size: 48x32, Model hash: "
                                   + params_of(first[1]).split("Model hash: ")[1].split(",")[0]
                                   + ", Model: tiny, Clip skip: 2, RNG: CPU")
    r = sdtorch(*args)  # a second run never overwrites: numbering continues
    assert r.returncode == 0, r.stderr
    assert [p.name for p in sorted(folder.glob("*.png"))] == ["00000-11.png", "00001-12.png", "00002-11.png",
                                                             "00003-12.png"]
    assert np.array_equal(pixels(folder / "00000-11.png"), pixels(folder / "00002-11.png"))
    # --vae really replaces the decoder: same latents, different pixels than the model's own VAE
    own = args[:args.index("--vae")] + args[args.index("--vae") + 2:args.index("-o")] + ["-o", tmp_path / "own.png"]
    r = sdtorch(*own, "--quiet")
    assert r.returncode == 0, r.stderr
    assert not np.array_equal(pixels(tmp_path / "own.png"), pixels(folder / "00000-11.png"))


def test_img2img_and_inpaint(model, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(init)
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (0, 0, 16, 32))
    m.save(mask)
    r = sdtorch("generate", "x", "--model", model, "--init-image", init, "--strength", 0.5, "-o", tmp_path / "i.png",
                "--seed", 1, *FAST)
    assert r.returncode == 0, r.stderr
    assert "Denoising strength: 0.5" in params_of(tmp_path / "i.png")
    r = sdtorch("generate", "x", "--model", model, "--init-image", init, "--mask", mask, "--mask-blur", 0,
                "-o", tmp_path / "m.png", "--seed", 1, *FAST)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels(tmp_path / "m.png")[:, 16:], pixels(init)[:, 16:])  # unmasked half kept


def test_metadata_round_trip_regenerates_identical_pixels(model, tmp_path):
    first = tmp_path / "first.png"
    r = sdtorch("generate", "a triangle, (big:1.1)", "--model", model, "--negative", "a, b", "--sampler",
                "DPM++ 2M SDE", "--seed", -1, "-o", first, *FAST)
    assert r.returncode == 0, r.stderr
    info = sdtorch("info", first)
    assert info.returncode == 0 and info.stdout.strip() == params_of(first)
    again = tmp_path / "again.png"
    r = sdtorch("generate", "--from", first, "--model", model, "-o", again, "--quiet")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels(first), pixels(again))
    assert params_of(again) == params_of(first)
    r = sdtorch("generate", "--from", first, "--model", model, "--seed", 3, "-o", tmp_path / "o.png", "--quiet")
    assert "Seed: 3," in params_of(tmp_path / "o.png")  # options override the stored parameters


def test_progress_bar_shows_speed(model, tmp_path):
    r = sdtorch("generate", "x", "--model", model, "--steps", 3, "--width", 32, "--height", 32, "-o",
                tmp_path / "p.png")
    assert r.returncode == 0, r.stderr
    assert "it/s" in r.stderr or "s/it" in r.stderr
    assert "3/3" in r.stderr


def test_info_describes_a_model(model):
    r = sdtorch("info", model)
    assert r.returncode == 0, r.stderr
    for expected in ["family: SD 1.x", "prediction type: epsilon", "unet parameters:", "vae parameters:",
                     "text_encoder parameters:", "dtype: float32", "sha256:"]:
        assert expected in r.stdout


def test_samplers_lists_samplers_and_schedules():
    r = sdtorch("samplers")
    assert r.returncode == 0
    for name in ["Euler a", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "LCM", "karras", "exponential"]:
        assert name in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model.safetensors"], "model not found: /no/such/model.safetensors"),
    (["--width", 30], "--width must be a positive multiple of 8, got 30"),
    (["--height", 0], "--height must be a positive multiple of 8, got 0"),
    (["--steps", 0], "--steps must be at least 1, got 0"),
    (["--strength", 1.5, "--init-image", "README.md"], "--strength must be in [0, 1], got 1.5"),
    (["--sampler", "Eular"], "unknown sampler 'Eular'; did you mean 'Euler'?"),
    (["--init-image", "/no/such.png"], "--init-image: no such file: /no/such.png"),
    (["--init-image", "pyproject.toml"], "--init-image: cannot read pyproject.toml as an image"),
    (["-o", "pyproject.toml/sub"], "output folder pyproject.toml/sub is not writable"),
    (["--original-size", "1024x768"], "--original-size, --target-size and --crop-top-left condition SDXL models"),
])
def test_errors_are_one_line_with_exit_code_2(model, args, message):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = ["generate", "x", "--model", model, "--steps", "1", "--width", "32", "--height", "32", "--quiet"]
    r = sdtorch(*base, *args, cwd=repo)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback(model):
    r = sdtorch("--debug", "generate", "x", "--model", model, "--sampler", "Eular", "--quiet")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_ctrl_c_stops_after_the_current_step_and_writes_nothing(model, tmp_path):
    out = tmp_path / "never.png"
    proc = subprocess.Popen([sys.executable, "-m", "sdtorch.cli", "generate", "x", "--model", str(model), "--steps",
                             "500", "--width", "64", "--height", "64", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    seen = []

    def read():
        for chunk in iter(lambda: proc.stderr.read(1), b""):
            seen.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 60
    while b"/500" not in b"".join(seen) and time.time() < deadline:  # the progress bar is running
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    reader.join(timeout=5)
    err = b"".join(seen).decode()
    assert "interrupted after step" in err and "nothing written" in err
    assert not out.exists()


def test_hires_fix_options_and_from_an_a1111_text(model, tmp_path):
    out = tmp_path / "h.png"
    r = sdtorch("generate", "a square", "--model", model, "--steps", 2, "--seed", 5, "--width", 32, "--height", 32,
                "--hires-scale", 2, "--hires-steps", 1, "--hires-upscaler", "Latent (nearest)", "--hires-strength",
                0.5, "-o", out, "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 64)
    assert params_of(out).endswith("Denoising strength: 0.5, RNG: CPU, Hires upscale: 2, Hires steps: 1, "
                                   "Hires upscaler: Latent (nearest)")
    # an A1111 text: "Schedule type: Automatic", no RNG key (GPU noise, read as NV)
    a1111 = tmp_path / "a1111.png"
    save_png(Image.new("RGB", (8, 8)), a1111, "a circle\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, "
             "CFG scale: 7, Seed: 9, Size: 32x32")
    out2 = tmp_path / "again.png"
    r = sdtorch("generate", "--from", a1111, "--model", model, "-o", out2, "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Sampler: Euler a, Schedule type: Automatic" in params_of(out2) and "RNG: NV" in params_of(out2)


def test_attention_maps_draws_the_words_of_the_prompt(model, tmp_path):
    out = tmp_path / "maps.png"
    r = sdtorch("generate", "a red circle", "--model", model, "--seed", "1", "-o", tmp_path / "x.png",
                "--attention-maps", out, *FAST)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.width > 3 * im.height  # the image and one panel per word ("a", "red", "circle") side by side
    r = sdtorch("generate", "a red circle", "--model", model, "-o", tmp_path / "y.png", "--attention-maps",
                tmp_path / "maps.jpg", *FAST)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and ".png" in r.stderr
