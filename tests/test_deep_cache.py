"""DeepCache (models/deep_cache.py) against the paper's own code (the DeepCache package's DeepCacheSDHelper on
diffusers' UNet, the same random weights), and its setting in the PNG text."""
import types

import numpy as np
import pytest
import torch

from conftest import TINY, tiny_models, tiny_pipeline
from reference import diffusers_unet
from sdtorch.models.deep_cache import deep_cache
from sdtorch.models.stable_diffusion import PREFIXES


def reference_unet(models, interval: int, branch: int):
    """diffusers' UNet of the same weights with DeepCache's helper on (uniform schedule), and its timestep list."""
    from DeepCache import DeepCacheSDHelper

    checkpoint = {PREFIXES["unet"] + k: v for k, v in models.unet.state_dict().items()}
    unet = diffusers_unet(checkpoint, TINY)
    timesteps = [999.0, 800.0, 600.0, 450.0, 300.0, 150.0, 50.0]
    helper = DeepCacheSDHelper(types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(
        timesteps=torch.tensor(timesteps))))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return unet, timesteps


@pytest.mark.parametrize("interval,depth", [(3, 0), (2, 1), (3, 2), (4, 3), (2, 5)])
@torch.no_grad()
def test_a_sampling_run_with_deep_cache_is_the_papers_code(interval, depth):
    models = tiny_models()
    reference, timesteps = reference_unet(models, interval, depth)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 7, TINY.unet.context_dim, generator=g)
    x = torch.randn(2, 4, 16, 16, generator=g)
    outputs = []
    with deep_cache(models.unet, interval, depth):
        for t in timesteps:  # as a sampler: each evaluation's input moves on from the last one's output
            ours = models.unet(x, torch.tensor([t, t]), context)
            want = reference(x, torch.tensor(t), context).sample
            # the same blocks run on the same cached activations; float rounding only (as test_unet's 1e-5)
            assert (ours - want).abs().max() <= 1e-5 * want.abs().max()
            outputs.append(ours)
            x = x - 0.1 * ours
    exact = models.unet(x, torch.tensor([50.0, 50.0]), context)
    with deep_cache(models.unet, interval, depth):
        models.unet(x, torch.tensor([999.0, 999.0]), context)  # a full evaluation: cached
        partial = models.unet(x, torch.tensor([50.0, 50.0]), context)
    assert (partial - exact).abs().max() > 1e-3 * exact.abs().max()  # the partial evaluation did reuse
    assert models.unet.feature_cache is None  # undone when the block ends


@torch.no_grad()
def test_each_call_at_one_timestep_keeps_its_own_activation_and_a_changed_shape_runs_in_full():
    models = tiny_models()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 1, 4, 16, 16, generator=g)
    context = torch.randn(1, 7, TINY.unet.context_dim, generator=g)
    t0, t1 = torch.tensor([900.0]), torch.tensor([700.0])
    with deep_cache(models.unet, 2, 0):  # images one by one: two calls per evaluation
        models.unet(a, t0, context), models.unet(b, t0, context)
        partial_a, partial_b = models.unet(a, t1, context), models.unet(b, t1, context)
    with deep_cache(models.unet, 2, 0):  # the same for each image alone
        models.unet(b, t0, context)
        alone_b = models.unet(b, t1, context)
    assert torch.equal(partial_b, alone_b) and not torch.equal(partial_a, partial_b)
    with deep_cache(models.unet, 2, 0):
        models.unet(torch.cat([a, b]), torch.cat([t0, t0]), context.expand(2, -1, -1))
        halved = models.unet(b, t1, context)  # the batch halved (NGMS): nothing cached fits
    assert torch.equal(halved, models.unet(b, t1, context))
    for interval, depth in [(0, 0), (2, 6), (2.5, 0)]:
        with pytest.raises(ValueError, match="DeepCache"), deep_cache(models.unet, interval, depth):
            pass


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.mark.parametrize("hires", [False, True])
def test_deep_cache_is_written_into_the_png_text_and_from_repeats_the_image(pipe, hires):
    from sdtorch.cli import a1111_settings
    from sdtorch.metadata import params_to_kwargs, parse_parameters

    settings = dict(steps=6, sampler="DPM++ 2M", seed=4, width=32, height=32, **({"hires_scale": 1.5} if hires else {}))
    base = pipe.txt2img("a red circle", "blurry", **settings)[0]
    fast = pipe.txt2img("a red circle", "blurry", deep_cache_interval=3, deep_cache_depth=1, **settings)[0]
    assert not np.array_equal(np.asarray(base), np.asarray(fast))
    text = fast.info["parameters"]
    assert "DeepCache interval: 3, DeepCache depth: 1" in text and "DeepCache" not in base.info["parameters"]
    prompt, negative, params = parse_parameters(text)
    again = pipe.txt2img(prompt, negative, **{k: v for k, v in a1111_settings(params_to_kwargs(params)).items()
                                              if k not in ("prompt", "negative")})[0]
    assert np.array_equal(np.asarray(fast), np.asarray(again))
    assert pipe.unet.feature_cache is None
    with pytest.raises(ValueError, match="deep_cache_interval"):
        pipe.txt2img("a red circle", deep_cache_interval=0, **settings)
    with pytest.raises(ValueError, match="DeepCache depth"):
        pipe.txt2img("a red circle", deep_cache_interval=2, deep_cache_depth=9, **settings)
