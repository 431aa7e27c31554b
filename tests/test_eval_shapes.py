"""The shapes evaluation scores pixels, not the model: a perfect generator gets 100%, a blank one does not."""
import torch
from PIL import Image

from sdtorch.train.eval_shapes import EVAL_SEED, evaluate, format_table
from sdtorch.train.shapes import example


class FakePipe:
    """Returns the ground-truth render of each caption (or a blank image); its "VAE" is the identity."""

    def __init__(self, perfect: bool):
        self.perfect = perfect

    def txt2img(self, caption, seed, width, height, **kwargs):
        if self.perfect:  # evaluate() asks for caption i with seed EVAL_SEED + i: draw exactly that scene
            image, expected = example(EVAL_SEED, seed - EVAL_SEED, width)
            assert expected == caption
            return [image]
        return [Image.new("RGB", (width, height), (128, 128, 128))]

    def encode_image(self, x):
        return x

    def decode_latents(self, z):
        return z


def test_a_perfect_generator_scores_100_percent():
    result = evaluate(FakePipe(perfect=True), count=20)
    assert all(v == 1.0 for v in result["accuracy"].values()), result["accuracy"]
    assert result["vae_psnr"] > 60  # identity "VAE"
    assert "position" in format_table(result)


def test_a_blank_generator_scores_badly():
    result = evaluate(FakePipe(perfect=False), count=20)
    assert result["accuracy"]["color"] < 0.2 and result["accuracy"]["shape"] < 0.2


def test_the_evaluation_runs_on_a_real_pipeline():
    from conftest import TINY, tiny_models
    from sdtorch.pipeline import Pipeline
    from sdtorch.tokenizer import CLIPTokenizer

    pipe = Pipeline(tiny_models(), CLIPTokenizer.default(), TINY, device="cpu")
    result = evaluate(pipe, count=2, steps=2)
    assert set(result["accuracy"]) >= {"background", "color", "shape", "count"}
    assert torch.isfinite(torch.tensor(result["vae_psnr"]))
