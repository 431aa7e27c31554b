"""Token merging (models/token_merging.py) against tomesd as A1111 applies it, and its A1111 setting."""
import copy

import pytest
import torch

from conftest import TINY, tiny_models, tiny_pipeline
from sdtorch.models.token_merging import bipartite_merge, token_merging


def a1111_tome(models, ratio: float):
    """The models patched as A1111's "Token merging ratio" patches its ldm model (sd_models.apply_token_merging)."""
    import tomesd

    patched = copy.deepcopy(models)
    tomesd.apply_patch(patched, ratio=ratio, use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)
    for block in patched.modules():
        if type(block).__name__ == "ToMeBlock":  # ldm's block runs `_forward` (through its checkpoint wrapper)
            block.forward = lambda x, context, size=None, b=block: b._forward(x, context)
    return patched


@pytest.mark.parametrize("size", [(16, 16), (12, 10), (9, 11)])
@pytest.mark.parametrize("ratio", [0.3, 0.6])
@torch.no_grad()
def test_the_unet_with_token_merging_is_tomesds_as_a1111_patches_it(size, ratio):
    models = tiny_models()
    reference = a1111_tome(models, ratio)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *size, generator=g)
    t, context = torch.tensor([500.0, 20.0]), torch.randn(2, 7, TINY.unet.context_dim, generator=g)
    exact = models.unet(x, t, context)
    with token_merging(models.unet, ratio):
        merged = models.unet(x, t, context)
    want = reference.unet(x, t, context)
    # the same tokens merge; the attention sums its (permuted) tokens in another order: float rounding only
    assert (merged - want).abs().max() <= 1e-5 * want.abs().max()
    assert (merged - exact).abs().max() > 1e-3 * exact.abs().max()  # and it did change the result
    assert torch.equal(models.unet(x, t, context), exact)  # undone when the block ends


def test_merge_then_unmerge_gives_every_merged_token_its_destinations_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, generator=g)
    x[0, 5] = x[0, 0] * 3  # token 5 (row 1, col 1) points the way of destination 0 (its cell's top left)
    merge, unmerge = bipartite_merge(x, 4, 4, ratio=1 / 16)  # r = 1: the best-matching source merges
    merged = merge(x)
    assert merged.shape == (1, 15, 8)
    out = unmerge(merged)
    assert torch.allclose(out[0, 0], (x[0, 0] + x[0, 5]) / 2) and torch.equal(out[0, 5], out[0, 0])
    others = [i for i in range(16) if i not in (0, 5)]
    assert torch.equal(out[0, others], x[0, others])  # every other token passes through unchanged
    with pytest.raises(ValueError, match="ratio"), token_merging(tiny_models().unet, 1.0):
        pass


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.mark.parametrize("hires", [False, True])
def test_the_token_merging_ratio_is_written_as_a1111_writes_it_and_read_back(pipe, hires):
    """A1111 writes "Token merging ratio" when it is not 0, and with hires fix "Token merging ratio hr" (the hires
    ratio, else the first pass's); --from's reading of the text repeats the image."""
    import numpy as np

    from sdtorch.cli import a1111_settings
    from sdtorch.metadata import params_to_kwargs, parse_parameters

    settings = dict(steps=4, sampler="Euler", seed=4, width=32, height=32, **({"hires_scale": 1.5} if hires else {}))
    base = pipe.txt2img("a red circle", "blurry", **settings)[0]
    fast = pipe.txt2img("a red circle", "blurry", token_merging_ratio=0.5, **settings)[0]
    assert not np.array_equal(np.asarray(base), np.asarray(fast))
    text = fast.info["parameters"]
    assert "Token merging ratio: 0.5" in text and ("Token merging ratio hr: 0.5" in text) == hires
    assert "Token merging" not in base.info["parameters"]
    prompt, negative, params = parse_parameters(text)
    again = pipe.txt2img(prompt, negative, **{k: v for k, v in a1111_settings(params_to_kwargs(params)).items()
                                              if k not in ("prompt", "negative")})[0]
    assert np.array_equal(np.asarray(fast), np.asarray(again))
    with pytest.raises(ValueError, match="token_merging_ratio"):
        pipe.txt2img("a red circle", token_merging_ratio=1.5, **settings)
