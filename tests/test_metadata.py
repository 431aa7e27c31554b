"""A1111 "parameters" text: exact layout, parsing it back as A1111 does, typed values, and the PNG text chunk."""
import random

import pytest
from PIL import Image

from sdtorch.metadata import (
    format_parameters, params_to_kwargs, parse_parameters, png_with_parameters, read_parameters, save_png,
)

PARAMS = {
    "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 123,
    "Size": "512x512", "Model hash": "abcdef0123", "Model": "name", "Clip skip": 2, "Denoising strength": 0.75,
}
PARAMS_LINE = ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, "
               "Model hash: abcdef0123, Model: name, Clip skip: 2, Denoising strength: 0.75")


def test_layout_is_a1111s():
    text = format_parameters("a photo of a cat", "blurry, lowres", PARAMS)
    assert text == f"a photo of a cat\nNegative prompt: blurry, lowres\n{PARAMS_LINE}"


def test_empty_negative_and_none_values_are_left_out():
    params = {"Steps": 20, "Sampler": "Euler", "Model hash": None, "CFG scale": 7.5, "Seed": 1}
    assert format_parameters("cat", "", params) == "cat\nSteps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 1"
    assert format_parameters("cat", None, params) == "cat\nSteps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 1"


def test_values_with_separators_are_json_quoted():
    params = {"Steps": 20, "Lora hashes": "a: 1f, b: 2e", "Note": 'say "hi"', "Ünïcode": "日本, 語", "Seed": 1}
    assert format_parameters("x", "", params) == (
        'x\nSteps: 20, Lora hashes: "a: 1f, b: 2e", Note: "say \\"hi\\"", Ünïcode: "日本, 語", Seed: 1')


def test_multi_line_prompts():
    text = format_parameters("line one,\n(line two:1.2)", "bad\nworse", {"Steps": 5, "Seed": 2, "Size": "64x32"})
    assert text == "line one,\n(line two:1.2)\nNegative prompt: bad\nworse\nSteps: 5, Seed: 2, Size: 64x32"
    assert parse_parameters(text) == ("line one,\n(line two:1.2)", "bad\nworse",
                                      {"Steps": "5", "Seed": "2", "Size": "64x32"})


def test_parse_reads_a1111s_own_example():
    text = ("girl with an artist's beret, determined, blue eyes, ((eyeshadow)), (coquettish), detailed\n"
            "Negative prompt: ugly, (((deformed))), [blurry], bad anatomy\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b\n")
    prompt, negative, params = parse_parameters(text)
    assert prompt == "girl with an artist's beret, determined, blue eyes, ((eyeshadow)), (coquettish), detailed"
    assert negative == "ugly, (((deformed))), [blurry], bad anatomy"
    assert params == {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086",
                      "Size": "512x512", "Model hash": "45dee52b"}


def test_a_last_line_with_fewer_than_three_fields_belongs_to_the_prompt():
    # A1111's rule: only a line with >= 3 "Key: value" fields is read as parameters.
    assert parse_parameters("a cat\nSteps: 20, Seed: 1") == ("a cat\nSteps: 20, Seed: 1", "", {})
    assert parse_parameters("just a prompt") == ("just a prompt", "", {})


def test_bad_keys_are_rejected():
    for key in ("Steps:", "a,b", "X", "trailing ", ""):
        with pytest.raises(ValueError):
            format_parameters("p", "", {key: 1})


def random_text(rng, alphabet, n):
    return "".join(rng.choice(alphabet) for _ in range(n))


def random_prompt(rng):
    """Lines without surrounding whitespace, none starting with "Negative prompt:": A1111 strips each line."""
    alphabet = list("abc xyz,:;\"'()[]\\{}|=.-_0123456789") + ["é", "日本", "🙂", "ß", "BREAK"]
    lines = [random_text(rng, alphabet, rng.randint(1, 30)).strip() for _ in range(rng.randint(1, 3))]
    return "\n".join(line for line in lines if line) or "p"


def random_value(rng):
    alphabet = list("abc XY,:\"'\\/-_.0123456789\n") + ["é", "日本", "🙂"]
    return rng.choice([rng.randint(-5, 2**32), rng.random() * 30, round(rng.random(), 2), rng.random() > 0.5,
                       random_text(rng, alphabet, rng.randint(0, 12))])


def test_format_parse_format_round_trips_on_random_inputs():
    rng = random.Random(0)
    keys = ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Lora hashes", "Hires upscaler",
            "TI hashes", "Emphasis", "Version", "Clip skip", "Denoising strength", "A-b/c d"]
    for _ in range(500):
        prompt = random_prompt(rng)
        negative = random_prompt(rng) if rng.random() < 0.7 else ""
        params = {key: random_value(rng) for key in rng.sample(keys, rng.randint(3, len(keys)))}
        text = format_parameters(prompt, negative, params)
        parsed_prompt, parsed_negative, parsed = parse_parameters(text)
        assert (parsed_prompt, parsed_negative) == (prompt, negative), text
        assert list(parsed) == list(params), text
        assert format_parameters(parsed_prompt, parsed_negative, parsed) == text


def test_params_to_kwargs_types_the_values():
    _, _, params = parse_parameters(f"cat\n{PARAMS_LINE}, Lora hashes: \"a: 1\"")
    assert params_to_kwargs(params) == {
        "steps": 20, "sampler": "DPM++ 2M", "schedule": "Karras", "cfg": 7.0, "seed": 123, "width": 512,
        "height": 512, "model_hash": "abcdef0123", "model": "name", "clip_skip": 2, "strength": 0.75,
    }
    assert params_to_kwargs({"Size": "640x384", "Seed": "-1"}) == {"width": 640, "height": 384, "seed": -1}


@pytest.mark.parametrize("params", [{"Size": "512"}, {"Steps": "twenty"}, {"CFG scale": "7,5"}])
def test_params_to_kwargs_rejects_unreadable_values(params):
    with pytest.raises(ValueError, match=list(params)[0]):
        params_to_kwargs(params)


def test_png_write_read_round_trip(tmp_path):
    image = Image.new("RGB", (8, 4), (10, 200, 30))
    text = format_parameters("a (cat:1.2), 日本 🙂\nsecond line", "blurry", PARAMS)
    path = tmp_path / "out.png"
    save_png(image, path, text)
    assert read_parameters(path) == text
    assert read_parameters(str(path)) == text
    with Image.open(path) as reopened:
        assert reopened.size == (8, 4) and reopened.getpixel((0, 0)) == (10, 200, 30)
        assert read_parameters(reopened) == text

    in_memory = png_with_parameters(image, text)
    assert in_memory.format == "PNG" and read_parameters(in_memory) == text
    assert in_memory.mode == image.mode and in_memory.tobytes() == image.tobytes()


def test_png_without_parameters_reads_none(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("L", (2, 2)).save(path)
    assert read_parameters(path) is None
