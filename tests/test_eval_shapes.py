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
    assert result["vae_round_trip"]["all_right"] == 1.0
    assert result["all_right"] == 1.0 and {n: g["all_right"] for n, g in result["by_shapes"].items()} == {1: 1, 2: 1}
    table = format_table(result)
    assert "position" in table and "2 shapes" in table and "everything" in table


def test_two_shape_scenes_are_scored_apart():
    """A generator that draws only the first shape of each caption gets one-shape scenes right and no two-shape scene
    fully right; the per-group counts add up to the whole."""
    from sdtorch.train.shapes import SceneSpec, caption, render, sample_scene

    class FirstShapeOnly(FakePipe):
        def txt2img(self, caption_text, seed, width, height, **kwargs):
            import random
            rng = random.Random(f"sdtorch-shapes:{EVAL_SEED}:{seed - EVAL_SEED}")
            scene = sample_scene(rng)
            assert caption(scene) == caption_text
            return [render(SceneSpec(scene.background, scene.shapes[:1]), width, rng)]

    result = evaluate(FirstShapeOnly(perfect=True), count=40)
    one, two = result["by_shapes"][1], result["by_shapes"][2]
    assert one["images"] + two["images"] == 40 and two["images"] > 5
    assert one["all_right"] == 1.0 and two["all_right"] == 0.0 and two["accuracy"]["count"] == 0.0
    assert abs(result["all_right"] - one["images"] / 40) < 1e-9


def test_a_blank_generator_scores_badly():
    result = evaluate(FakePipe(perfect=False), count=20)
    assert result["accuracy"]["color"] < 0.2 and result["accuracy"]["shape"] < 0.2
    # the VAE's ceiling is scored on the ground truths, not on the generated images: the identity "VAE" keeps them all
    assert result["vae_round_trip"]["all_right"] == 1.0


def test_the_vae_round_trip_is_scored_as_a_ceiling():
    """A "VAE" that keeps a quarter of the resolution loses the small shapes' outlines; the round-trip score says so."""
    import torch.nn.functional as F

    class BlurryVAE(FakePipe):
        def decode_latents(self, z):  # 4x4 block means, drawn back as blocks: a small circle comes back squarish
            return F.interpolate(F.avg_pool2d(z, 4), scale_factor=4, mode="nearest")

    result = evaluate(BlurryVAE(perfect=True), count=40)
    trip = result["vae_round_trip"]
    assert result["all_right"] == 1.0  # the generator itself is perfect
    assert trip["all_right"] < 1.0 and trip["accuracy"]["shape"] < 1.0
    assert sum(g["images"] for g in trip["by_shapes"].values()) == 40
    assert "VAE round trip" in format_table(result)


def test_the_evaluation_runs_on_a_real_pipeline():
    from conftest import TINY, tiny_models
    from sdtorch.pipeline import Pipeline
    from sdtorch.tokenizer import CLIPTokenizer

    pipe = Pipeline(tiny_models(), CLIPTokenizer.default(), TINY, device="cpu")
    result = evaluate(pipe, count=2, steps=2)
    assert set(result["accuracy"]) >= {"background", "color", "shape", "count"}
    assert torch.isfinite(torch.tensor(result["vae_psnr"]))
