"""Hostile and careless input, probed: crafted and bit-flipped checkpoints, hostile images, hostile command lines,
concurrent writers, FIFOs. Every probe must end in a clear error (CheckpointError / ValueError; on the command line one
stderr line and exit 2) or a correct result: never a hang, a traceback, a lost file or a silently wrong image."""
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, tiny_models, tiny_pipeline
from sdtorch.checkpoint import CheckpointError, detect_format, load_checkpoint, read_tensor_index
from sdtorch.checkpoint.errors import UnsafeCheckpointError
from sdtorch.checkpoint.formats import write_safetensors
from sdtorch.cli import main, save_image
from sdtorch.images import load_image, prepare_mask, to_rgb
from sdtorch.metadata import png_with_parameters
from sdtorch.pipeline import GenerationInterrupted

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, flock and signals are POSIX")


@contextmanager
def deadline(seconds: int = 20):
    """A probe that hangs fails instead of hanging the suite."""
    def fail(*_):
        raise TimeoutError(f"hung for {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(capsys, *args) -> tuple[int, list[str]]:
    """`sdtorch ARGS` in this process: (exit code, stderr lines)."""
    with deadline(120):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(capsys, *args, contains: str = "") -> str:
    code, lines = cli(capsys, *args)
    assert code == 2 and len(lines) == 1, (code, lines)
    assert "Traceback" not in lines[0] and "internal error" not in lines[0]
    assert "weights_only=False" not in lines[0] and "weights_only` set to `False" not in lines[0]
    assert contains in lines[0], lines[0]
    return lines[0]


# -- files to probe with -------------------------------------------------------------------------------------------
def safetensors_bytes(header: dict, data: bytes = b"", pad_to: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    if pad_to is not None:
        raw += b" " * (pad_to - len(raw))
    return len(raw).to_bytes(8, "little") + raw + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from sdtorch.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(tiny_models(), path, config=TINY)
    return path


@pytest.fixture(scope="module")
def fifo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fifo") / "model.safetensors"
    os.mkfifo(path)
    return path


def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A PNG that claims width x height: IHDR with valid CRCs and a few bytes of pixel data (a decompression bomb
    costs its author nothing either)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    sizes = {"huge": (20000, 20000), "over_pillow": (10000, 10000), "over_max_pixels": (3000, 3000)}
    out = {}
    for name, (w, h) in sizes.items():
        out[name] = folder / f"{name}.png"
        out[name].write_bytes(png_header(w, h))
    return out


# -- 1. safetensors detected by structure, whatever the length's low byte ------------------------------------------
def test_every_low_byte_of_the_header_length_is_read_as_safetensors(tmp_path):
    data = torch.arange(2, dtype=torch.float32).numpy().tobytes()
    base = len(json.dumps({"w": entry()}).encode())
    for low in range(256):
        length = 256 * (base // 256 + 1) + low
        path = tmp_path / f"{low}.safetensors"
        path.write_bytes(safetensors_bytes({"w": entry()}, data, pad_to=length))
        assert path.read_bytes()[0] == low
        assert detect_format(path) == "safetensors", low
        assert read_tensor_index(path)[0] == {"w": (2,)}


def test_a_real_model_whose_header_length_starts_with_0x80_loads(tmp_path):
    """sdtorch's writer pads headers to multiples of 8: one file in 32 starts with 0x80. Pad one so it does."""
    tensors = {k: v.contiguous() for k, v in tiny_models().state_dict().items()}
    for extra in range(0, 4096, 8):
        path = tmp_path / "m.safetensors"
        write_safetensors(tensors, path, {"sdtorch.config": json.dumps(TINY.to_dict()), "pad": " " * extra})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert load_checkpoint(path).config == TINY


# -- 6 and 10. malformed safetensors headers, by construction ------------------------------------------------------
EIGHT = bytes(8)
MALFORMED = {
    "header is a list": ([1, 2], EIGHT),
    "entry not a dict": ({"w": [1, 2]}, EIGHT),
    "missing shape": ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, EIGHT),
    "float shape": ({"w": entry(shape=(2.0,))}, EIGHT),
    "negative shape": ({"w": entry(shape=(-2,))}, EIGHT),
    "bool shape": ({"w": entry(shape=(True, 2))}, EIGHT),
    "string shape": ({"w": {**entry(), "shape": "2"}}, EIGHT),
    "list dtype": ({"w": {**entry(), "dtype": ["F32"]}}, EIGHT),
    "unknown dtype": ({"w": entry(dtype="F33")}, EIGHT),
    "list __metadata__": ({"__metadata__": ["a"], "w": entry()}, EIGHT),
    "string __metadata__": ({"__metadata__": "a", "w": entry()}, EIGHT),
    "offsets not a pair": ({"w": {**entry(), "data_offsets": [0]}}, EIGHT),
    "offsets floats": ({"w": entry(offsets=(0.0, 8.0))}, EIGHT),
    "negative begin": ({"w": entry(offsets=(-8, 0)), "v": entry(offsets=(0, 8))}, EIGHT),
    "overlapping tensors": ({"w": entry(offsets=(0, 8)), "v": entry(offsets=(0, 8))}, EIGHT),
    "gap between tensors": ({"w": entry(offsets=(8, 16))}, bytes(16)),
    "bytes after the last tensor": ({"w": entry()}, bytes(12)),
    "truncated data": ({"w": entry(shape=(4,), offsets=(0, 16))}, EIGHT),
    "wrong byte count": ({"w": entry(shape=(3,))}, EIGHT),
    "overflowing shape": ({"w": entry(shape=(2 ** 62, 2 ** 62), offsets=(0, 8))}, EIGHT),
    "huge offsets": ({"w": entry(shape=(2,), offsets=(2 ** 64, 2 ** 64 + 8))}, EIGHT),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_safetensors_headers_are_one_checkpoint_error(tmp_path, name):
    header, data = MALFORMED[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    with pytest.raises(CheckpointError, match=str(path)):
        read_tensor_index(path)


def test_json_nested_100000_deep_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    raw = b"{" + b'"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(CheckpointError, match="nested too deep"):
        read_tensor_index(path)


# -- random byte flips, fixed seed ----------------------------------------------------------------------------------
def flipped(raw: bytes, rng: random.Random, count: int, region: int) -> bytes:
    data = bytearray(raw)
    for _ in range(count):
        i = rng.randrange(min(region, len(data)))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def test_random_byte_flips_in_a_model_header_load_or_fail_clearly(tmp_path, model):
    """150 copies of the model with 1-3 bits flipped in the length and header: each loads or raises a
    CheckpointError; nothing else (no KeyError, no TypeError, no hang, no huge allocation)."""
    raw = model.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    rng, outcomes = random.Random(1234), {"loaded": 0, "refused": 0}
    path = tmp_path / "flipped.safetensors"
    with deadline(120):
        for _ in range(150):
            path.write_bytes(flipped(raw, rng, rng.randint(1, 3), header_end))
            try:
                load_checkpoint(path)
                outcomes["loaded"] += 1
            except CheckpointError:
                outcomes["refused"] += 1
    assert outcomes["refused"] > 75, outcomes  # most flips break the JSON, a name, a size or an offset


def test_random_byte_flips_in_pickles_fail_clearly(tmp_path):
    """Legacy and zip pickles, truncated and bit-flipped: a CheckpointError every time."""
    rng = random.Random(99)
    sources = {}
    for legacy in (True, False):
        buffer = io.BytesIO()
        torch.save({"state_dict": {"w": torch.ones(4)}}, buffer, _use_new_zipfile_serialization=not legacy)
        sources[legacy] = buffer.getvalue()
    path = tmp_path / "model.ckpt"
    refused = 0
    for raw in sources.values():
        cases = [raw[:cut] for cut in (1, 2, 5, 20, len(raw) // 2, len(raw) - 3)]
        cases += [flipped(raw, rng, rng.randint(1, 4), len(raw)) for _ in range(150)]
        for case in cases:
            path.write_bytes(case)
            try:
                read_tensor_index(path)
            except CheckpointError as e:
                assert "weights_only" not in str(e)
                refused += 1
    assert refused > 100


def test_one_byte_0x80_file_and_evil_pickle_are_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    one = tmp_path / "one.ckpt"
    one.write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        read_tensor_index(one)
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        read_tensor_index(evil)
    assert "weights_only" not in str(info.value) and "system" in str(info.value)


# -- 4. stored configs checked before anything is built ------------------------------------------------------------
def with_config(tmp_path, model: Path, config) -> Path:
    from sdtorch.checkpoint.formats import SafetensorsFile

    st = SafetensorsFile(model)
    tensors = {k: ref.load(None, torch.device("cpu")) for k, ref in st.tensors().items()}
    st.close()
    path = tmp_path / "configured.safetensors"
    write_safetensors(tensors, path, {"sdtorch.config": config if isinstance(config, str) else json.dumps(config)})
    return path


@pytest.mark.parametrize("change, message", [
    ({"clip": {"num_hidden_layers": 1_000_000}}, "num_hidden_layers"),
    ({"clip": {"num_hidden_layers": 3}}, "does not match its tensors"),
    ({"unet": {"transformer_depth": 1_000_000}}, "transformer_depth"),
    ({"unet": {"transformer_depth": [1, 1_000_000]}}, "transformer_depth"),
    ({"unet": {"adm_in_channels": 1 << 30}}, "adm_in_channels"),
    ({"resolution": 100_000}, "resolution"),
    ({"resolution": 36}, "resolution"),
    ({"unet": {"model_channels": "abc"}}, "model_channels"),
    ({"unet": {"channel_mult": [1, 2.5]}}, "channel_mult"),
    ({"vae": {"scale_factor": "nan"}}, "scale_factor"),
    ({"clip": 5}, "sdtorch.config"),
    ({"unet": {"nonsense": 1}}, "nonsense"),
])
def test_stored_configs_are_checked_against_bounds_and_tensors(tmp_path, model, change, message):
    config = TINY.to_dict()
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    path = with_config(tmp_path, model, config)
    with deadline(20), pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("text", ["[1, 2]", "not json", "null", '"x"'])
def test_a_stored_config_of_the_wrong_type_is_a_checkpoint_error(tmp_path, model, text):
    with pytest.raises(CheckpointError, match="sdtorch.config"):
        load_checkpoint(with_config(tmp_path, model, text))


def test_an_integer_weight_is_refused(tmp_path, model):
    tensors = {k: v.contiguous() for k, v in tiny_models().state_dict().items()}
    key = next(iter(tensors))
    tensors[key] = tensors[key].to(torch.int32)
    path = tmp_path / "int.safetensors"
    write_safetensors(tensors, path, {"sdtorch.config": json.dumps(TINY.to_dict())})
    with pytest.raises(CheckpointError, match="not as a floating-point weight"):
        load_checkpoint(path)


# -- 3. FIFOs are never opened -------------------------------------------------------------------------------------
def test_fifos_are_refused_without_blocking(fifo, capsys, model):
    with deadline(20):
        with pytest.raises(CheckpointError, match="not a regular file"):
            detect_format(fifo)
        with pytest.raises(ValueError, match="not a regular file"):
            load_image(fifo)
        assert_one_line_error(capsys, "info", fifo, contains="not a regular file")
        assert_one_line_error(capsys, "generate", "x", "--model", fifo, "--quiet", contains="not a regular file")
        assert_one_line_error(capsys, "generate", "x", "--model", model, "--init-image", fifo, "--quiet",
                              contains="not a regular file")
        assert_one_line_error(capsys, "generate", "--from", fifo, contains="not a regular file")
        assert_one_line_error(capsys, "generate", "x", "--model", model, "--vae", fifo, "--quiet",
                              "--steps", 1, "--width", 32, "--height", 32, contains="not a regular file")


# -- 4 and 5. hostile images ---------------------------------------------------------------------------------------
def test_decompression_bombs_are_one_value_error(bombs):
    for name in ("huge", "over_pillow"):
        with deadline(10), pytest.raises(ValueError, match="more pixels than the limit"):
            load_image(bombs[name])
    with pytest.raises(ValueError, match="--max-pixels"):
        load_image(bombs["over_max_pixels"], max_pixels=2048 * 2048)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(to_rgb(load_image(path)))[0, 0].tolist() == [128, 128, 128]
    mask_path = tmp_path / "mask16.png"
    Image.fromarray(np.full((16, 16), round(0.015 * 65535), np.uint16)).save(mask_path)
    mask = prepare_mask(load_image(mask_path), 16, 16, blur=0)
    assert abs(mask.mean().item() - 4 / 255) < 1e-6  # 1.5% grey repaints 1.5%, not all of it
    raw = prepare_mask(Image.open(mask_path), 16, 16, blur=0)  # an image not read through load_image, too
    assert abs(raw.mean().item() - 4 / 255) < 1e-6


def test_exif_orientation_is_applied(tmp_path):
    """A 40x20 picture stored sideways with orientation 6 (rotate 90° clockwise to view), as a phone saves it."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    upright = load_image(path)
    assert upright.size == (20, 40)
    assert upright.getpixel((15, 5)) == (255, 0, 0)  # top-left goes to top-right when turned clockwise
    assert load_image(Image.open(path)).size == (20, 40)  # an image the caller opened is turned too


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "1", "I;16", "RGBA", "L", "I", "F"])
def test_every_pillow_mode_becomes_rgb(mode):
    image = Image.new("RGB", (8, 8), (200, 100, 50)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((8, 8), 1000, np.uint16))
    assert to_rgb(load_image(image)).mode == "RGB"


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"not an image at all",
                                     png_header(16, 16)[:30]])
def test_broken_images_are_one_value_error(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot read"):
        load_image(path)


# -- 10. hostile command lines: one line, exit 2 -------------------------------------------------------------------
GEN = ["generate", "x", "--steps", 1, "--width", 32, "--height", 32, "--quiet"]


def test_diffusers_folder_with_a_fifo_config_is_refused(tmp_path):
    folder = tmp_path / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    os.mkfifo(folder / "unet" / "config.json")
    with deadline(20), pytest.raises(CheckpointError):
        load_checkpoint(folder)


def test_hostile_generate_arguments(capsys, tmp_path, model, bombs):
    m = ["--model", model]
    (tmp_path / "dir.png").mkdir()
    one = tmp_path / "one.ckpt"
    one.write_bytes(b"\x80")
    bad_header = tmp_path / "bad.safetensors"
    bad_header.write_bytes(safetensors_bytes({"w": [1]}, EIGHT))
    small_png = tmp_path / "small.jpg"  # .jpg: the check below looks for left-behind .png outputs
    Image.new("RGB", (32, 32)).save(small_png, format="PNG")
    huge_config = TINY.to_dict()
    huge_config["clip"]["num_hidden_layers"] = 1_000_000
    huge = with_config(tmp_path, model, huge_config)
    cases = [
        (["info", huge], "num_hidden_layers"),
        ([*GEN, "--model", huge], "num_hidden_layers"),
        ([*GEN, *m, "--cfg", "nan"], "--cfg must be a finite number"),
        ([*GEN, *m, "--cfg", "inf"], "--cfg must be a finite number"),
        ([*GEN, *m, "--steps", "abc"], "invalid int value"),
        ([*GEN, *m, "--width", 30], "multiple of 8"),
        ([*GEN, *m, "--width", 4096, "--height", 4096], "more than --max-pixels"),
        ([*GEN, *m, "--max-pixels", "abc"], "pixel count"),
        ([*GEN, *m, "--max-pixels", "0"], "positive"),
        ([*GEN, *m, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
        ([*GEN, *m, "--device", "mps"], "--device mps"),
        ([*GEN, *m, "--sampler", "Eular"], "did you mean"),
        ([*GEN, *m, "-o", tmp_path / "dir.png"], "is a folder"),
        ([*GEN, *m, "-o", model], "is a file"),
        ([*GEN, *m, "--init-image", bombs["huge"]], "more pixels than the limit"),
        ([*GEN, *m, "--init-image", bombs["over_pillow"]], "more pixels than the limit"),
        ([*GEN, *m, "--init-image", bombs["over_max_pixels"]], "--max-pixels"),
        ([*GEN, *m, "--init-image", small_png, "--mask", bombs["huge"]], "--mask: "),
        ([*GEN, "--model", one], "truncated or damaged"),
        ([*GEN, "--model", bad_header], "damaged safetensors header"),
        ([*GEN, "--model", tmp_path / "missing.safetensors"], "model not found"),
        ([*GEN, *m, "--vae", bad_header], "damaged safetensors header"),
        (["generate", "--from", tmp_path / "missing.png"], "no such file"),
        (["generate", "--from", bombs["huge"]], "cannot read"),
        (["info", bombs["huge"]], "cannot read"),
        (["info", one], "truncated or damaged"),
        (["info", tmp_path / "missing"], "no such file"),
        (["eval", "shapes", "--count", 0], "--count"),
        (["eval", "shapes", "--device", "bogus"], "unknown device"),
        (["eval", "shapes", "--cfg", "nan"], "--cfg"),
        (["convert", model, tmp_path], "is a folder"),
        (["convert", model, model, "--diffusers"], "is a file"),
        (["dataset", "shapes", model, "--count", 2], "is a file"),
        (["dataset", "shapes", tmp_path / "d", "--count", 0], "--count"),
        (["samplers", "--bogus"], "unrecognized arguments"),
        (["nonsense"], "invalid choice"),
    ]
    for args, message in cases:
        assert_one_line_error(capsys, *args, contains=message)
    assert not [p for p in tmp_path.glob("*.png") if p.is_file()] and not list((tmp_path / "dir.png").iterdir())


def test_an_unsafe_model_is_one_line_without_weights_only_advice(capsys, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}, protocol=2))
    assert_one_line_error(capsys, *GEN, "--model", evil, contains="refused to load")
    assert not marker.exists()  # nothing ran


def shapes_folder(tmp_path: Path, metadata: bytes) -> Path:
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_bytes(metadata)
    return folder


TRAIN = ["train", "vae", "--data", "shapes", "--data-size", 8, "--holdout", 2, "--steps", 1, "--quiet",
         "--resolution", 16]


def test_hostile_train_arguments(capsys, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps(Evil(), protocol=2))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    not_state = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, not_state)
    out = ["--out", tmp_path / "run"]
    cases = [
        ([*TRAIN, *out, "--resume", evil], "refused to load"),
        ([*TRAIN, *out, "--resume", a_file], "not a checkpoint"),
        ([*TRAIN, *out, "--resume", not_state], "not a training checkpoint"),
        ([*TRAIN, *out, "--resume", tmp_path / "missing.pt"], "no checkpoint at"),
        ([*TRAIN, "--out", a_file], "is a file"),
        ([*TRAIN, *out, "--set", "vae.ch=abc"], "vae.ch"),
        ([*TRAIN, *out, "--set", "vae.ch_mult=[1, 0]"], "vae.ch_mult"),
        ([*TRAIN, *out, "--set", "vae.bogus=1"], "bogus"),
        ([*TRAIN, *out, "--set", "vae=3"], "CONFIG/--set"),
        ([*TRAIN, *out, "--set", "noequals"], "KEY=VALUE"),
        ([*TRAIN, *out, a_file], "not UTF-8 JSON"),
        ([*TRAIN, *out, "--steps", 0], "steps"),
        (["train", "clip", "--data", "shapes", *out, "--set", "vision.hidden_size=abc"], "vision.hidden_size"),
        ([*TRAIN, *out, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
    ]
    for args, message in cases:
        assert_one_line_error(capsys, *args, contains=message)
    for name, metadata in [("number", b"5\n"), ("latin-1", b'{"file_name": "a.png", "text": "caf\xe9"}\n'),
                           ("list", b"[1]\n"), ("no text", b'{"file_name": "a.png"}\n')]:
        folder = shapes_folder(tmp_path / name, metadata)
        assert_one_line_error(capsys, "train", "vae", "--data", folder, "--out", tmp_path / "run2", "--quiet",
                              contains="metadata.jsonl:1")


# -- 2. concurrent writers into one folder -------------------------------------------------------------------------
def test_threads_writing_into_one_folder_lose_no_image(tmp_path):
    image = png_with_parameters(Image.new("RGB", (8, 8)), "x\nSteps: 1")
    folder = tmp_path / "out"
    folder.mkdir()
    written = []

    def writer(seed):
        for k in range(6):
            written.append(save_image(image, folder / f"00000-{seed + k}.png", numbered=True))

    threads = [threading.Thread(target=writer, args=(100 * t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted(folder.glob("*.png"))
    assert len(files) == len(set(written)) == 36
    assert sorted(int(f.name[:5]) for f in files) == list(range(36))  # every number taken once
    assert not list(folder.glob(".*"))  # no temp file left


def test_processes_writing_into_one_folder_lose_no_image(tmp_path):
    """Four `sdtorch` writers (the code `generate -o DIR` runs to save) started at once, ten images each."""
    folder = tmp_path / "out"
    folder.mkdir()
    script = ("import sys; from pathlib import Path; from PIL import Image; from sdtorch.cli import save_image; "
              "from sdtorch.metadata import png_with_parameters; im = png_with_parameters(Image.new('RGB', (8, 8)), "
              "'x'); [save_image(im, Path(sys.argv[1]) / f'00000-{int(sys.argv[2]) + k}.png', True) "
              "for k in range(10)]")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder), str(1000 * p)]) for p in range(4)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    files = sorted(folder.glob("*.png"))
    assert len(files) == 40 and sorted(int(f.name[:5]) for f in files) == list(range(40))
    assert {f.name[6:-4] for f in files} == {str(1000 * p + k) for p in range(4) for k in range(10)}


def test_an_existing_numbered_file_is_never_replaced(tmp_path):
    image = png_with_parameters(Image.new("RGB", (8, 8), (9, 9, 9)), "x")
    (tmp_path / "00003-7.png").write_bytes(b"the user's own file")
    path = save_image(image, tmp_path / "00003-7.png", numbered=True)
    assert path.name == "00004-7.png" and (tmp_path / "00003-7.png").read_bytes() == b"the user's own file"


# -- 7 and 9. interrupts belong to their generation ----------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


SMALL = dict(steps=4, seed=1, width=32, height=32)


def test_an_interrupt_is_not_cleared_by_a_generation_that_starts_after_it(pipe):
    """Generation A is interrupted at step 1; before A checks its flag, generation B starts and runs to the end on the
    same pipeline (as a server's next job would). B must finish; A must still stop."""
    seen = {"b": None}

    def callback(step, total, latents, sigma):
        if step == 1 and seen["b"] is None:
            pipe.interrupt()
            seen["b"] = pipe.txt2img("b", **SMALL)  # started after the interrupt: not affected by it

    with pytest.raises(GenerationInterrupted, match="after step 1"):
        pipe.txt2img("a", callback=callback, **SMALL)
    assert len(seen["b"]) == 1


def test_an_interrupt_with_nothing_running_does_nothing(pipe):
    pipe.interrupt()
    assert len(pipe.txt2img("x", **SMALL)) == 1


def test_an_interrupt_during_the_vae_decode_returns_no_image(pipe, monkeypatch):
    original = type(pipe).decode_latents

    def decode(self, latents, tiled=False):
        self.interrupt()
        return original(self, latents, tiled)

    monkeypatch.setattr(type(pipe), "decode_latents", decode)
    with pytest.raises(GenerationInterrupted, match="after the last step"):
        pipe.txt2img("x", **SMALL)


def test_ctrl_c_during_the_vae_decode_writes_nothing_and_exits_130(capsys, tmp_path, model, monkeypatch):
    from sdtorch.pipeline import Pipeline

    original = Pipeline.decode_latents

    def decode(self, latents, tiled=False):
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, arriving after the last step
        return original(self, latents, tiled)

    monkeypatch.setattr(Pipeline, "decode_latents", decode)
    before = signal.getsignal(signal.SIGINT)
    code, lines = cli(capsys, *GEN, "--model", model, "-o", tmp_path / "out.png")
    assert code == 130 and "nothing written" in lines[-1]
    assert not list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGINT) is before  # the CLI's handler is gone again


# -- 8. training files: torn log lines, stale temp files ---------------------------------------------------------
def test_a_torn_last_log_line_is_left_out_and_appends_start_a_new_line(tmp_path):
    from sdtorch.train.engine import Run

    run = SimpleNamespace(out=tmp_path, is_main=True)
    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')  # killed mid-write
    with pytest.warns(UserWarning, match="log.jsonl:2"):
        assert Run.read_log(run) == [{"kind": "train", "step": 1}]
    Run.log(run, {"kind": "train", "step": 2})
    with pytest.warns(UserWarning, match="log.jsonl:2"):
        assert [r["step"] for r in Run.read_log(run)] == [1, 2]


def test_temp_files_of_dead_writers_are_removed(tmp_path):
    from sdtorch.train.engine import remove_stale_temp_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".step-00000010.pt.tmp-{dead.pid}"
    live = tmp_path / f".step-00000020.pt.tmp-{os.getpid()}"
    for path in (stale, live):
        path.write_bytes(b"half a checkpoint")
    remove_stale_temp_files(tmp_path)
    assert not stale.exists() and live.exists()


# -- 11. a batch equals its regenerations ---------------------------------------------------------------------------
def test_exact_batch_images_equal_their_single_regenerations_bit_for_bit(pipe):
    """Image k of a batch differed from the seed s+k image by 1/255 on a pixel (batch-dependent UNet/VAE kernels: seen
    on the built-in model, and on this tiny one at 64x64, image 2); with batch_exact every one is equal."""
    settings = dict(steps=3, width=64, height=64)
    pipe.batch_exact = True
    try:
        batch = pipe.txt2img("a red circle", seed=40, batch=3, **settings)
    finally:
        pipe.batch_exact = False
    for k, image in enumerate(batch):
        single = pipe.txt2img("a red circle", seed=40 + k, **settings)[0]
        assert np.array_equal(np.asarray(image), np.asarray(single)), k
