"""`sdtorch serve`, driven as its users drive it: the real server (uvicorn, built-in model) on a free port, the
`webuiapi` client that A1111 users script with, raw HTTP for what a client should never send, and the page in a
headless Chromium. Every image the server returns for a seed must equal `sdtorch generate`'s, pixel for pixel."""
import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")

import sdtorch  # noqa: E402
from serve_helpers import AUTH, ENV, Server  # noqa: E402

PROMPT = "a large red circle in the center on a blue background"
SETTINGS = dict(steps=4, cfg_scale=7.0, width=64, height=64, sampler_name="Euler a")
CLI_SETTINGS = ["--steps", "4", "--cfg", "7", "--width", "64", "--height", "64", "--sampler", "Euler a", "--quiet"]
MAX_PIXELS = 256 * 256  # keeps the body limit small enough to test (1.7 MB)


def cli(out, *args):
    return subprocess.Popen([sys.executable, "-m", "sdtorch.cli", "generate", *map(str, args), "-o", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pixels(image_or_path) -> np.ndarray:
    if isinstance(image_or_path, Image.Image):
        return np.asarray(image_or_path.convert("RGB"))
    with Image.open(image_or_path) as im:
        return np.asarray(im.convert("RGB"))


def left_half_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    return mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two models in a models folder, the server on them, and the CLI's images for the same settings."""
    tmp = tmp_path_factory.mktemp("serve")
    models = tmp / "models"
    models.mkdir()
    shutil.copy(sdtorch.BUILTIN_MODEL, models / "builtin.safetensors")
    sdtorch.save(sdtorch.load(sdtorch.BUILTIN_MODEL), models / "second.safetensors", dtype="fp32")
    Image.fromarray(np.kron(np.eye(2, dtype=np.uint8)[..., None] * [200, 40, 90], np.ones((32, 32, 1), np.uint8))
                    .astype(np.uint8)).save(tmp / "init.png")
    left_half_mask().save(tmp / "mask.png")
    model = models / "builtin.safetensors"
    # the CLI's images, made while the server starts
    refs = {"txt2img": (tmp / "cli_txt2img.png", cli(tmp / "cli_txt2img.png", PROMPT, "--model", model, "--seed", 11,
                                                      *CLI_SETTINGS)),
            "img2img": (tmp / "cli_img2img.png", cli(tmp / "cli_img2img.png", "a blue square", "--model", model,
                                                      "--seed", 12, "--init-image", tmp / "init.png",
                                                      "--strength", 0.6, *CLI_SETTINGS)),
            "inpaint": (tmp / "cli_inpaint.png", cli(tmp / "cli_inpaint.png", "a yellow circle", "--model", model,
                                                      "--seed", 13, "--init-image", tmp / "init.png", "--mask",
                                                      tmp / "mask.png", "--strength", 0.9, *CLI_SETTINGS)),
            "hires": (tmp / "cli_hires.png", cli(tmp / "cli_hires.png", PROMPT, "--model", model, "--seed", 14,
                                                  "--hires-scale", 1.5, "--hires-strength", 0.6, "--hires-upscaler",
                                                  "Latent (nearest)", *CLI_SETTINGS))}
    server = Server("--models-dir", models, "--model", model, "--max-queue", 24, "--max-pixels", MAX_PIXELS,
                    "--outdir", tmp / "outputs")
    for _, proc in refs.values():
        assert proc.wait(timeout=300) == 0, proc.stdout.read()
    yield {"server": server, "tmp": tmp, "refs": {k: path for k, (path, _) in refs.items()}}
    server.stop()


@pytest.fixture(scope="module")
def api(setup):
    return webuiapi.WebUIApi(port=setup["server"].port, username=AUTH[0], password=AUTH[1], sampler="Euler a",
                             steps=4)


def post(setup, path, body=None, auth=AUTH, timeout=60, **kwargs):
    server = setup["server"]
    return requests.post(f"{server.url}/sdapi/v1/{path}", json=body, auth=auth, timeout=timeout, **kwargs)


def wait_until_running(api, step=1, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        progress = api.get_progress()
        if progress["state"]["job_count"] and progress["state"]["sampling_step"] >= step:
            return progress
        time.sleep(0.05)
    raise TimeoutError("no job started")


# -- the API through webuiapi ---------------------------------------------------------------------------------------
def test_txt2img_equals_the_cli_image_and_carries_its_parameters(api, setup):
    result = api.txt2img(prompt=PROMPT, seed=11, **SETTINGS)
    cli_png = setup["refs"]["txt2img"]
    assert np.array_equal(pixels(result.image), pixels(cli_png))
    with Image.open(cli_png) as im:
        assert result.image.info["parameters"] == im.info["parameters"]  # the same A1111 text the CLI writes
    assert result.info["seed"] == 11 and result.info["all_seeds"] == [11]
    assert result.info["infotexts"] == [result.image.info["parameters"]]
    assert {"subseed", "all_subseeds", "sd_model_name", "job_timestamp"} <= set(result.info)
    assert result.parameters["prompt"] == PROMPT and result.parameters["steps"] == 4


def test_hires_fix_equals_the_cli_image(api, setup):
    """enable_hr with A1111's hr_* fields runs the same second pass as `generate --hires-scale`."""
    result = api.txt2img(prompt=PROMPT, seed=14, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (nearest)",
                         denoising_strength=0.6, **SETTINGS)
    cli_png = setup["refs"]["hires"]
    assert result.image.size == (96, 96)
    assert np.array_equal(pixels(result.image), pixels(cli_png))
    with Image.open(cli_png) as im:
        assert result.image.info["parameters"] == im.info["parameters"]
    assert "Hires upscale: 1.5" in result.info["infotexts"][0] and result.info["denoising_strength"] == 0.6


def test_img2img_equals_the_cli_image(api, setup):
    init = Image.open(setup["tmp"] / "init.png")
    result = api.img2img(images=[init], prompt="a blue square", seed=12, denoising_strength=0.6, **SETTINGS)
    assert np.array_equal(pixels(result.image), pixels(setup["refs"]["img2img"]))
    assert result.parameters["init_images"] is None  # not echoed unless include_init_images


def test_inpaint_equals_the_cli_image(api, setup):
    init = Image.open(setup["tmp"] / "init.png")
    result = api.img2img(images=[init], mask_image=left_half_mask(), inpainting_fill=1, prompt="a yellow circle",
                         seed=13, denoising_strength=0.9, **SETTINGS)
    assert np.array_equal(pixels(result.image), pixels(setup["refs"]["inpaint"]))


def test_inpaint_fill_and_inverted_mask_keep_the_unmasked_part(api, setup):
    init = Image.open(setup["tmp"] / "init.png")
    result = api.img2img(images=[init], mask_image=left_half_mask(), inpainting_fill=0, inpainting_mask_invert=1,
                         prompt="x", seed=1, denoising_strength=0.9, mask_blur=0, **SETTINGS)
    # inverted: the right half is repainted, the left half is the original, pasted back
    assert np.array_equal(pixels(result.image)[:, :32], pixels(init)[:, :32])
    assert not np.array_equal(pixels(result.image)[:, 32:], pixels(init)[:, 32:])


def test_batches_and_iterations_number_seeds_as_a1111(api):
    result = api.txt2img(prompt=PROMPT, seed=100, batch_size=2, n_iter=2, **SETTINGS)
    assert result.info["all_seeds"] == [100, 101, 102, 103]
    assert [im.info["parameters"].split("Seed: ")[1].split(",")[0] for im in result.images] == ["100", "101", "102",
                                                                                                  "103"]


def test_options_switch_between_two_models(api):
    titles = api.util_get_model_names()
    assert [t.split(" [")[0] for t in titles] == ["builtin.safetensors", "second.safetensors"]
    api.util_set_model("second.safetensors", find_closest=False)
    try:
        assert api.util_get_current_model().split(" [")[0] == "second.safetensors"
        result = api.txt2img(prompt=PROMPT, seed=5, **SETTINGS)
        assert result.info["sd_model_name"] == "second" and "Model: second" in result.info["infotexts"][0]
        # one request may name another model without switching (override_settings, restored afterwards)
        other = api.txt2img(prompt=PROMPT, seed=5, override_settings={"sd_model_checkpoint": "builtin"}, **SETTINGS)
        assert other.info["sd_model_name"] == "builtin"
        assert api.get_options()["sd_model_checkpoint"].startswith("second.safetensors [")
    finally:
        api.set_options({"sd_model_checkpoint": "builtin.safetensors"})
    assert api.util_get_current_model() == "builtin.safetensors [4105794dbd]"  # A1111's title: name [short hash]


def test_clip_skip_override_reaches_the_pipeline(api):
    result = api.txt2img(prompt=PROMPT, seed=5, override_settings={"CLIP_stop_at_last_layers": 2}, **SETTINGS)
    assert "Clip skip: 2" in result.info["infotexts"][0] and result.info["clip_skip"] == 2


def test_token_merging_ratio_override_and_option_reach_the_pipeline(api):
    result = api.txt2img(prompt=PROMPT, seed=5, override_settings={"token_merging_ratio": 0.5}, **SETTINGS)
    assert "Token merging ratio: 0.5" in result.info["infotexts"][0]
    api.set_options({"token_merging_ratio": 0.3})
    try:
        assert "Token merging ratio: 0.3" in api.txt2img(prompt=PROMPT, seed=5, **SETTINGS).info["infotexts"][0]
    finally:
        api.set_options({"token_merging_ratio": 0.0})
    assert "Token merging" not in api.txt2img(prompt=PROMPT, seed=5, **SETTINGS).info["infotexts"][0]


def test_progress_preview_and_interrupt_while_a_job_runs(api):
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(api.txt2img, prompt=PROMPT, seed=1, steps=1000, width=64, height=64)
        progress = wait_until_running(api, step=2)
        assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
        assert progress["state"]["sampling_steps"] == 1000 and progress["state"]["job"] == "txt2img"
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert preview.size == (64, 64)  # the built-in model's VAE decodes the preview in full
        start = time.perf_counter()
        api.interrupt()
        result = job.result(timeout=30)
        stopped_in = time.perf_counter() - start
    assert result.images == [] and stopped_in < 5, stopped_in  # stopped after its current step
    assert api.get_progress()["state"]["job_count"] == 0


def test_skip_goes_on_with_the_next_batch(api):
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(api.txt2img, prompt=PROMPT, seed=1, steps=1000, n_iter=2, width=64, height=64)
        wait_until_running(api)
        api.skip()
        deadline = time.time() + 30
        while api.get_progress()["state"]["job_no"] != 1:
            assert time.time() < deadline
            time.sleep(0.05)
        api.interrupt()
        assert job.result(timeout=30).images == []


def test_png_info_reads_the_parameters(api, setup):
    with Image.open(setup["refs"]["txt2img"]) as im:
        result = api.png_info(im)
        text = im.info["parameters"]
    assert result.info == text
    p = result.parameters
    assert p["Prompt"] == PROMPT and p["Seed"] == "11" and p["Size-1"] == "64" and p["Sampler"] == "Euler a"


def test_lists_a_client_probes(api, setup):
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(api.util_get_sampler_names())
    assert {"automatic", "karras", "normal"} <= set(api.util_get_scheduler_names())
    assert api.get_sd_vae() == [] and api.get_cmd_flags()["api_auth"] == "***"  # never the credentials
    assert requests.get(setup["server"].url + "/internal/ping", auth=AUTH).json() == {}
    assert post(setup, "refresh-checkpoints").status_code == 200


def test_save_images_numbers_files_as_a1111(api, setup):
    api.txt2img(prompt=PROMPT, seed=40, batch_size=2, save_images=True, **SETTINGS)
    api.txt2img(prompt=PROMPT, seed=50, save_images=True, **SETTINGS)
    names = sorted(p.name for p in (setup["tmp"] / "outputs").iterdir())
    assert names == ["00000-40.png", "00001-41.png", "00002-50.png"]


# -- a client that goes away, a full queue ---------------------------------------------------------------------------
def test_a_client_that_disconnects_does_not_leave_the_worker_stuck(api, setup):
    with ThreadPoolExecutor(1) as pool:
        # the client gives up after 2 s; the server notices and stops its job at the next step
        job = pool.submit(post, setup, "txt2img", {"prompt": "x", "steps": 1000, "width": 64, "height": 64},
                          timeout=2)
        wait_until_running(api)
        with pytest.raises(requests.Timeout):
            job.result()
    deadline = time.time() + 10
    while api.get_progress()["state"]["job_count"]:
        assert time.time() < deadline, "the abandoned job still runs"
        time.sleep(0.1)
    assert api.txt2img(prompt=PROMPT, seed=11, **SETTINGS).images  # and the next one is served


def test_a_full_queue_answers_503_with_retry_after(api, setup):
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    with ThreadPoolExecutor(26) as pool:
        long_job = pool.submit(post, setup, "txt2img", {**body, "steps": 1000})
        wait_until_running(api)
        waiting = [pool.submit(post, setup, "txt2img", body) for _ in range(24)]  # --max-queue 24
        deadline = time.time() + 30
        while api.get_progress()["textinfo"].split(", ")[-1] != "24 queued":
            assert time.time() < deadline
            time.sleep(0.05)
        full = post(setup, "txt2img", body)
        api.interrupt()
        assert long_job.result().status_code == 200
        assert all(w.result().status_code == 200 for w in waiting)
    assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
    assert "queue is full" in full.json()["detail"]


# -- load -----------------------------------------------------------------------------------------------------------
def test_eight_clients_three_requests_each(setup, capsys):
    """8 clients each send 3 requests 50 ms apart without waiting: every answer is the one asked for, each client's
    answers come back in the order sent (one FIFO queue), none is lost, and the server's memory stays bounded."""
    server = setup["server"]
    before = server.memory()

    def client(c):
        def one(k):
            seed = 1000 + 10 * c + k
            r = post(setup, "txt2img", {"prompt": f"client {c} request {k}", "seed": seed, "steps": 2,
                                        "width": 64, "height": 64, "sampler_name": "Euler"}, timeout=300)
            return k, seed, r, time.perf_counter()

        with ThreadPoolExecutor(3) as pool:
            futures = []
            for k in range(3):
                futures.append(pool.submit(one, k))
                time.sleep(0.05)
            return [f.result() for f in futures]

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(client, range(8)))
    seconds = time.perf_counter() - start
    after = server.memory()
    for c, results in enumerate(answers):
        for k, seed, r, _ in results:
            assert r.status_code == 200, r.text
            info = json.loads(r.json()["info"])
            assert info["prompt"] == f"client {c} request {k}" and info["all_seeds"] == [seed]
            assert len(r.json()["images"]) == 1
        done = [t for *_, t in results]
        assert done == sorted(done), f"client {c}: answers out of order"
    assert after["VmHWM"] < 3 * 2 ** 30 and after["VmRSS"] - before["VmRSS"] < 300 * 2 ** 20
    with capsys.disabled():
        print(f"\nload: 24 requests in {seconds:.1f} s; server RSS {before['VmRSS'] / 2 ** 20:.0f} -> "
              f"{after['VmRSS'] / 2 ** 20:.0f} MiB, peak {after['VmHWM'] / 2 ** 20:.0f} MiB")


# -- what a client should never send ----------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bomb(side: int = 60000) -> bytes:
    """A 60000x60000 RGB PNG of a few kB: 10.8 GB once decompressed (the header says so before anything is read)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + 3 * side)
    idat = zlib.compress(row * 64, 9)  # the first 64 rows; a decoder would have to allocate the whole image
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def png(size=(64, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return b64(buffer.getvalue())


GOOD = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
# (what is tried, path, JSON body or raw bytes, auth, expected status, a word the error must contain)
MALFORMED = [
    ("steps is a word", "txt2img", {**GOOD, "steps": "many"}, AUTH, 422, "steps"),
    ("seed is a fraction", "txt2img", {**GOOD, "seed": 1.5}, AUTH, 422, "seed"),
    ("seed below -1", "txt2img", {**GOOD, "seed": -7}, AUTH, 422, "seed"),
    ("prompt is a number", "txt2img", {**GOOD, "prompt": 123}, AUTH, 422, "prompt"),
    ("100k-character prompt", "txt2img", {**GOOD, "prompt": "a" * 100_000}, AUTH, 422, "prompt"),
    ("negative width", "txt2img", {**GOOD, "width": -64}, AUTH, 422, "width"),
    ("zero height", "txt2img", {**GOOD, "height": 0}, AUTH, 422, "height"),
    ("width not a multiple of 8", "txt2img", {**GOOD, "width": 100}, AUTH, 422, "width"),
    ("4096x4096 over --max-pixels", "txt2img", {**GOOD, "width": 4096, "height": 4096}, AUTH, 422, "max-pixels"),
    ("batch_size 0", "txt2img", {**GOOD, "batch_size": 0}, AUTH, 422, "batch_size"),
    ("n_iter 1000", "txt2img", {**GOOD, "n_iter": 1000}, AUTH, 422, "n_iter"),
    ("cfg_scale NaN", "txt2img", {**GOOD, "cfg_scale": "nan"}, AUTH, 422, "cfg_scale"),
    ("unknown sampler", "txt2img", {**GOOD, "sampler_name": "Eulr a"}, AUTH, 422, "Euler a"),
    ("unknown scheduler", "txt2img", {**GOOD, "scheduler": "fancy"}, AUTH, 422, "scheduler"),
    ("hires with a network upscaler", "txt2img", {**GOOD, "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, AUTH,
     422, "hr_upscaler"),
    ("hires past --max-pixels", "txt2img", {**GOOD, "enable_hr": True, "hr_scale": 8}, AUTH, 422, "hr_scale"),
    ("hires with its own sampler", "txt2img", {**GOOD, "enable_hr": True, "hr_sampler_name": "DDIM"}, AUTH, 422,
     "hr_sampler_name"),
    ("override_settings is a list", "txt2img", {**GOOD, "override_settings": [1]}, AUTH, 422, "override_settings"),
    ("model ../../etc/passwd", "txt2img", {**GOOD, "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}},
     AUTH, 404, "sd_model_checkpoint"),
    ("clip skip 99", "txt2img", {**GOOD, "override_settings": {"CLIP_stop_at_last_layers": 99}}, AUTH, 422,
     "CLIP_stop_at_last_layers"),
    ("token merging ratio 1.5", "txt2img", {**GOOD, "override_settings": {"token_merging_ratio": 1.5}}, AUTH, 422,
     "token_merging_ratio"),
    ("body is not JSON", "txt2img", b"{prompt: x", AUTH, 422, "json"),
    ("body is a JSON list", "txt2img", [GOOD], AUTH, 422, "body"),
    ("body over the limit", "txt2img", {**GOOD, "padding": "x" * 2_000_000}, AUTH, 413, "larger"),
    ("no init image", "img2img", GOOD, AUTH, 422, "init_images"),
    ("init image not base64", "img2img", {**GOOD, "init_images": ["@@@ not base64 @@@"]}, AUTH, 422, "base64"),
    ("init image not an image", "img2img", {**GOOD, "init_images": [b64(b"hello, I am text")]}, AUTH, 422,
     "init_images"),
    ("init image a URL", "img2img", {**GOOD, "init_images": ["http://169.254.169.254/x.png"]}, AUTH, 422, "URL"),
    ("PNG bomb 60000x60000", "img2img", {**GOOD, "init_images": [b64(png_bomb())]}, AUTH, 413, "max-pixels"),
    ("PNG of 1024x1024 over --max-pixels", "img2img", {**GOOD, "init_images": [png((1024, 1024))]}, AUTH, 413,
     "1024x1024"),
    ("mask not an image", "img2img", {**GOOD, "init_images": [png()], "mask": b64(b"GIF89a junk")}, AUTH, 422, "mask"),
    ("denoising_strength 2", "img2img", {**GOOD, "init_images": [png()], "denoising_strength": 2}, AUTH, 422,
     "denoising_strength"),
    ("inpainting_fill latent noise", "img2img", {**GOOD, "init_images": [png()], "mask": png(), "inpainting_fill": 2},
     AUTH, 422, "inpainting_fill"),
    ("options: model /etc/passwd", "options", {"sd_model_checkpoint": "/etc/passwd"}, AUTH, 404, "/etc/passwd"),
    ("options: model ../second.safetensors", "options", {"sd_model_checkpoint": "../models/second.safetensors"},
     AUTH, 404, "sd_model_checkpoint"),
    ("options: clip skip a word", "options", {"CLIP_stop_at_last_layers": "two"}, AUTH, 422,
     "CLIP_stop_at_last_layers"),
    ("png-info of an empty string", "png-info", {"image": ""}, AUTH, 422, "image"),
    ("png-info without image", "png-info", {}, AUTH, 422, "image"),
    ("no credentials", "txt2img", GOOD, None, 401, "password"),
    ("wrong password", "txt2img", GOOD, (AUTH[0], "guess"), 401, "password"),
    ("unknown user", "txt2img", GOOD, ("root", AUTH[1]), 401, "password"),
]


def test_malformed_requests_get_a_4xx_naming_the_field(setup, api):
    rows = []
    for what, path, body, auth, status, word in MALFORMED:
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = requests.post(f"{setup['server'].url}/sdapi/v1/{path}", auth=auth, timeout=60, **kwargs)
        rows.append((what, r.status_code, r.text[:150]))
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        assert word.lower() in r.text.lower(), (what, r.text[:300])
        assert "Traceback" not in r.text and "File \"" not in r.text and len(r.text) < 5000, what
        json.loads(r.text)
    assert len(rows) >= 20
    chunks = (b'{"prompt": "' + b"x" * 2 ** 16 for _ in range(40))  # 2.6 MB without a Content-Length
    r = requests.post(f"{setup['server'].url}/sdapi/v1/txt2img", data=chunks, auth=AUTH, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]
    # the worker was never hurt: a good request still works
    assert api.txt2img(prompt=PROMPT, seed=11, **SETTINGS).images
    if os.environ.get("SDTORCH_SERVE_REPORT"):
        for what, code, text in rows:
            print(f"| {what} | {code} | {text} |")


def test_unknown_but_valid_a1111_fields_are_accepted(setup):
    r = post(setup, "txt2img", {**GOOD, "restore_faces": True, "tiling": False, "s_churn": 0.5, "hr_scale": 2,
                                "alwayson_scripts": {"ControlNet": {"args": []}}, "script_args": [], "styles": None,
                                "some_extension_field": {"x": [1, 2]}, "sampler_index": "Euler"})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["some_extension_field"] == {"x": [1, 2]}


# -- the page, in a real headless Chromium ----------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"  # the system's package (.ci/run installs it); playwright's own download is not used
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, setup):
    context = browser.new_context(http_credentials={"username": AUTH[0], "password": AUTH[1]},
                                  viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.goto(setup["server"].url + "/")
    page.wait_for_function("document.getElementById('sampler').options.length > 0")
    yield page
    context.close()


def image_of(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def set_form(page, prompt, seed, steps=4):
    page.fill("#prompt", prompt)
    page.select_option("#sampler", "Euler a")
    page.fill("#steps", str(steps))
    page.fill("#cfg", "7")
    page.fill("#seed", str(seed))


def test_page_makes_the_cli_image_and_reuses_its_seed(page, setup):
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"  # the model's size
    set_form(page, PROMPT, 11)
    page.click("#generate")
    page.wait_for_selector(".result img")
    assert np.array_equal(pixels(image_of(page.get_attribute(".result img", "src"))),
                          pixels(setup["refs"]["txt2img"]))
    assert "Seed: 11" in page.inner_text(".result pre")
    assert page.get_attribute(".result a", "download") == "11.png"
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "11"


def test_page_shows_progress_and_the_live_preview(page, api):
    set_form(page, PROMPT, 3, steps=1000)
    page.click("#generate")
    page.wait_for_function("document.getElementById('preview').src.startsWith('data:image/png')", timeout=60_000)
    assert page.eval_on_selector("#progress", "e => e.value") > 0
    api.interrupt()
    page.wait_for_function("!document.getElementById('generate').disabled", timeout=60_000)


def test_page_inpaints_a_painted_mask(page, setup):
    page.click("#tab-img2img")
    page.set_input_files("#init", str(setup["tmp"] / "init.png"))
    page.wait_for_function("document.getElementById('mask').width === 64")
    box = page.locator("#mask").bounding_box()  # 256 px on screen for 64 image pixels
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + 100, box["y"] + 200, steps=12)
    page.mouse.up()
    set_form(page, "a yellow circle", 13)
    page.fill("#strength", "0.9")
    page.select_option("#fill", "1")
    page.click("#generate")
    page.wait_for_selector(".result img")
    result = pixels(image_of(page.get_attribute(".result img", "src")))
    init = pixels(setup["tmp"] / "init.png")
    assert "Denoising strength: 0.9" in page.inner_text(".result pre")
    assert np.array_equal(result[:, 40:], init[:, 40:])  # far from the stroke (and its 4-pixel blur): the original
    assert not np.array_equal(result[5:50, 5:25], init[5:50, 5:25])  # under the stroke: repainted


def test_dropping_a_png_fills_the_form(page, setup):
    set_form(page, "something else", 999, steps=30)
    page.fill("#width", "128")
    data = b64(setup["refs"]["txt2img"].read_bytes())
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", data)
    page.wait_for_function("document.getElementById('seed').value === '11'")
    assert page.input_value("#prompt") == PROMPT and page.input_value("#steps") == "4"
    assert page.input_value("#width") == "64" and page.input_value("#sampler") == "Euler a"
    with Image.open(setup["refs"]["txt2img"]) as im:  # the schedule the CLI wrote ("Automatic", "Karras", ...)
        schedule = im.info["parameters"].split("Schedule type: ")[1].split(",")[0].lower().replace(" ", "_")
    assert page.input_value("#scheduler") == schedule


def test_page_screenshot(page):
    """A gallery of four images; saved for the README when SDTORCH_SCREENSHOT names a file."""
    set_form(page, PROMPT, 1, steps=20)
    page.fill("#batch", "4")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.result').length === 4", timeout=120_000)
    if os.environ.get("SDTORCH_SCREENSHOT"):
        page.screenshot(path=os.environ["SDTORCH_SCREENSHOT"])


@pytest.mark.parametrize("args, message", [
    (["--models-dir", "/no/such/folder"], "--models-dir: no such folder"),
    (["--api-auth", "no-password-here"], "--api-auth wants user:password"),
    (["--model", "/no/such/model.safetensors"], "--model: not found"),
])
def test_serve_refuses_bad_options_in_one_line(args, message):
    out = subprocess.run([sys.executable, "-m", "sdtorch.cli", "serve", *args], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and message in out.stderr, out.stderr


def test_the_linear_preview_beats_a_flat_colour():
    """Large VAEs get the fitted linear latent->RGB map (A1111's "Approx cheap"); on the built-in model, for shapes
    images it never saw, it must be closer to the VAE's own decode than the best single colour is."""
    from sdtorch import images as imgs
    from sdtorch.server.preview import fit_latent_to_rgb, linear_rgb
    from sdtorch.train.shapes import example

    pipe = sdtorch.load(sdtorch.BUILTIN_MODEL)
    weights = fit_latent_to_rgb(pipe)
    images = torch.cat([imgs.pil_to_tensor(example(7, i)[0]) for i in range(16)])
    latents = pipe.encode_image(images)
    decoded = torch.nn.functional.avg_pool2d(pipe.decode_latents(latents).clamp(-1, 1), 8)  # (16, 3, 8, 8)
    linear = (linear_rgb(latents, weights) - decoded).abs().mean().item() * 127.5
    flat = (decoded - decoded.mean((0, 2, 3), keepdim=True)).abs().mean().item() * 127.5
    assert linear < 0.75 * flat, (linear, flat)  # measured: 49.6 against 79.8 (in 0..255 units)



def test_ctrl_c_during_a_job_stops_the_server_and_answers_its_request_503():
    """The generations run in the server's main thread: Ctrl-C (SIGINT) there stops the running job and the server,
    and the request waiting on that job gets a 503 saying why, not a 500 or a hang."""
    import signal
    import threading

    server = Server(auth=None)
    answer = {}

    def ask():
        answer["response"] = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1000,
                                                                                   "width": 64, "height": 64},
                                           timeout=120)

    client = threading.Thread(target=ask)
    client.start()
    deadline = time.time() + 60
    while not requests.get(server.url + "/sdapi/v1/progress", timeout=5).json()["state"]["sampling_step"]:
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=30) == 0
    client.join(timeout=30)
    assert answer["response"].status_code == 503 and "stopping" in answer["response"].json()["detail"]
