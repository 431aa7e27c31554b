"""Attention as the formula (explicit path) equals the fused kernel, and the recorded cross-attention maps are the
model's own probabilities: the right shapes, one unit of attention per position spread over the tokens."""
import pytest
import torch

import sdtorch.models.attention as attention_module
from conftest import TINY, tiny_models
from reference import max_rel_err
from sdtorch.attention_maps import (_grid, attention_maps, draw_word_maps, prompt_words, record_cross_attention,
                                    word_maps)
from sdtorch.models.attention import attention, attention_probs, explicit_attention
from sdtorch.pipeline import Pipeline
from sdtorch.tokenizer import CLIPTokenizer

PROMPT = "a red circle on the left and a blue square"
TOL = 1e-5  # fp32; the explicit product and the fused kernel differ by summation order only (measured ~1e-7)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_models(), CLIPTokenizer.default(), TINY, name="tiny", model_hash="0123456789", device="cpu")


# (queries, keys, heads, causal): UNet cross-attention, VAE single-head, CLIP causal self-attention, odd sizes
@pytest.mark.parametrize("n, m, heads, causal", [(64, 77, 8, False), (16, 16, 1, False), (77, 77, 4, True),
                                                 (5, 9, 4, False), (6, 6, 2, True)])
def test_explicit_attention_equals_sdpa(n, m, heads, causal):
    g = torch.Generator().manual_seed(n + m)
    q, k, v = torch.randn(2, n, heads * 16, generator=g), *torch.randn(2, 2, m, heads * 16, generator=g)
    fused = attention(q, k, v, heads, causal)
    with explicit_attention():
        explicit = attention(q, k, v, heads, causal)
    assert not attention_module._explicit  # the switch is restored on exit
    assert max_rel_err(explicit, fused) <= TOL


def test_attention_probs_rows_sum_to_one_and_respect_the_causal_mask():
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    p = attention_probs(q, k, causal=True)
    assert torch.allclose(p.sum(-1), torch.ones(1, 2, 6))
    assert (p.triu(1) == 0).all()


def test_whole_models_agree_on_the_explicit_path(pipe):
    """UNet (self- and cross-attention), CLIP (causal) and VAE (single head) through both paths."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    run = [lambda: pipe.unet(x, torch.tensor([500.0, 20.0]), ctx), lambda: pipe.text_encoder(ids),
           lambda: pipe.vae.decode(pipe.vae.encode(image).mean)]
    with torch.no_grad():
        fused = [f() for f in run]
        with explicit_attention():
            explicit = [f() for f in run]
    for a, b in zip(explicit, fused, strict=True):
        assert max_rel_err(a, b) <= TOL


def test_recorded_maps_have_the_latent_shape_and_sum_to_one_over_tokens(pipe):
    steps = 3
    with record_cross_attention(pipe.unet, images=2) as rec:
        pipe.txt2img(PROMPT, steps=steps, cfg=5, sampler="Euler", seed=1, batch=2, width=40, height=24)
    assert len(rec.calls) == steps  # one UNet call per Euler step
    for maps in rec.calls:
        assert maps.shape == (2, 77, 3, 5)  # (images, tokens, latent h, latent w): the guided batch of 4 halved
        assert torch.allclose(maps.sum(dim=1), torch.ones(2, 3, 5), atol=1e-5)
        assert (maps >= 0).all()
    assert rec.mean().shape == (2, 77, 3, 5)


def test_recording_does_not_change_the_image(pipe):
    kwargs = dict(steps=2, cfg=5, seed=3, width=32, height=32)
    plain = pipe.txt2img(PROMPT, **kwargs)[0]
    with record_cross_attention(pipe.unet, images=1):
        recorded = pipe.txt2img(PROMPT, **kwargs)[0]
    assert plain.tobytes() == recorded.tobytes()
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks  # the hooks are gone


def test_recorded_maps_are_the_models_own_cross_attention_averaged_over_heads_and_layers(pipe, monkeypatch):
    """Catch every cross-attention matrix the explicit path forms (keys = the 77 context tokens) and average them by
    hand: layer by layer, heads averaged, upsampled to the latent grid; the conditional half of the guided batch."""
    seen = []

    def spy(q, k, causal=False):
        p = attention_probs(q, k, causal)
        if k.shape[2] == 77 and q.shape[2] != 77:  # cross-attention in the UNet (self-attention has N = M)
            seen.append(p)
        return p

    monkeypatch.setattr(attention_module, "attention_probs", spy)
    ctx = pipe.encode_prompts(PROMPT, "", 1)
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad(), explicit_attention(), record_cross_attention(pipe.unet, images=1) as rec:
        pipe.unet(torch.cat([x, x]), torch.tensor([300.0, 300.0]), torch.cat([ctx[1], ctx[0]]))  # [uncond, cond]
    layers = [torch.nn.functional.interpolate(
        p[1:].mean(1).transpose(1, 2).reshape(1, 77, *_grid(p.shape[2], (4, 4))), size=(4, 4), mode="bilinear")
        for p in seen]
    assert len(layers) == sum(1 for name, _ in pipe.unet.named_modules() if name.endswith("attn2"))
    torch.testing.assert_close(rec.calls[0], torch.stack(layers).mean(0), rtol=0, atol=1e-6)


def test_word_maps_sum_the_tokens_of_each_word(pipe):
    maps = torch.rand(77, 4, 4)
    ids = pipe.tokenizer.encode("aquamarine")
    assert len(ids) > 1  # a word of several BPE tokens
    out = word_maps(maps, pipe.tokenizer, "an aquamarine circle", ["aquamarine", "circle"])
    torch.testing.assert_close(out["aquamarine"], maps[2:2 + len(ids)].sum(0))  # 0 is BOS, 1 "an"
    torch.testing.assert_close(out["circle"], maps[2 + len(ids)])
    two_chunks = torch.rand(154, 4, 4)  # BREAK starts a second 77-token chunk
    assert list(word_maps(two_chunks, pipe.tokenizer, "(red:1.2) circle, BREAK red")) == ["red", "circle"]
    with pytest.raises(ValueError, match="not in the prompt"):
        word_maps(maps, pipe.tokenizer, "a red circle", ["square"])


def test_prompt_words_drop_emphasis_syntax_and_repeats():
    assert prompt_words("a (red:1.3) circle, a [blue] square BREAK left") == ["a", "red", "circle", "blue", "square",
                                                                             "left"]


def test_attention_maps_draws_one_panel_per_word(pipe, tmp_path):
    image, maps = attention_maps(pipe, PROMPT, tmp_path / "maps.png", steps=2, seed=0, width=32, height=32)
    assert list(maps) == prompt_words(PROMPT)
    assert all(m.shape == (4, 4) for m in maps.values())
    assert (tmp_path / "maps.png").stat().st_size > 1000
    fig = draw_word_maps(image, maps)
    assert len(fig.axes) == len(maps) + 1
