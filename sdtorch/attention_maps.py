"""Where each word of the prompt looks: the UNet's cross-attention probabilities, recorded during a generation.

In every spatial transformer, each latent position (a query) spreads one unit of attention over the prompt's tokens
(the keys): softmax(QKᵀ/√d). Averaged over the heads and the layers, and upsampled to one grid, the column of one
word is a map of the image regions that read that word (DAAM, Tang et al. 2023).

    with record_cross_attention(pipe.unet, images=1) as rec:
        image = pipe.txt2img(prompt, seed=1)[0]
    maps = word_maps(rec.mean()[0], pipe.tokenizer, prompt)   # {word: (h, w) map}
    draw_word_maps(image, maps, "maps.png")

The recorder hooks the model's cross-attention modules from the outside (the models' code does not change) and
recomputes the probabilities from the same projections the module runs, so the fused SDPA kernel can stay on.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .models.attention import CrossAttention, attention_probs, split_heads
from .prompts import parse_prompt_attention, tokenize_prompt


class CrossAttentionMaps:
    """What `record_cross_attention` collected: one (B, L, h, w) tensor per UNet call, each position's attention over
    the L context tokens averaged over heads and layers at the latent resolution h x w (sums to 1 over L)."""

    def __init__(self, images: int | None):
        self.images = images
        self.calls: list[torch.Tensor] = []
        self._size: tuple[int, int] | None = None
        self._sum: torch.Tensor | None = None
        self._layers = 0

    def _begin(self, latent: torch.Tensor) -> None:
        self._size, self._sum, self._layers = tuple(latent.shape[-2:]), None, 0

    def _add(self, probs: torch.Tensor) -> None:
        """probs (B, H, N, L) of one layer -> its head average on the latent grid, added to this call's sum."""
        h, w = _grid(probs.shape[2], self._size)
        # (B, H, N, L) -> (B, L, h, w)
        avg = probs.float().mean(dim=1).transpose(1, 2).reshape(probs.shape[0], -1, h, w)
        # bilinear weights sum to 1, so every position still sums to 1 over the tokens
        avg = F.interpolate(avg, size=self._size, mode="bilinear", align_corners=False)
        self._sum = avg if self._sum is None else self._sum + avg
        self._layers += 1

    def _end(self) -> None:
        if self._sum is None:
            return
        maps = self._sum / self._layers  # (B', L, h, w)
        # classifier-free guidance runs [uncond, cond] as one batch (guidance.CFGDenoiser): keep the prompt's half
        if self.images is not None and maps.shape[0] == 2 * self.images:
            maps = maps[self.images:]
        self.calls.append(maps.cpu())
        self._sum = None

    def mean(self) -> torch.Tensor:
        """The maps averaged over every UNet call of the generation: (B, L, h, w)."""
        if not self.calls:
            raise RuntimeError("no cross-attention was recorded: did a UNet with spatial transformers run inside "
                               "record_cross_attention?")
        return torch.stack(self.calls).mean(dim=0)


def _grid(tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a feature map with `tokens` positions: the latent size halved (rounding up, as the UNet's
    stride-2 convolutions do) until it fits."""
    h, w = latent
    while h * w > tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"{tokens} attention positions do not fit a latent of {latent[0]}x{latent[1]}")
    return h, w


@contextlib.contextmanager
def record_cross_attention(unet: nn.Module, images: int | None = None) -> Iterator[CrossAttentionMaps]:
    """Record the cross-attention probabilities of every `unet` call inside the block. `images`: the batch the
    pipeline generates; a UNet batch twice as large is a guided call, and only its conditional half is kept."""
    record = CrossAttentionMaps(images)

    def on_cross_attention(module: CrossAttention, args, kwargs, output):
        x = args[0]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        if context is None:  # self-attention: the same module class, called without a context
            return
        with torch.no_grad():
            q, k = split_heads(module.to_q(x), module.heads), split_heads(module.to_k(context), module.heads)
            record._add(attention_probs(q, k))  # (B, H, N, L)

    handles = [unet.register_forward_pre_hook(lambda module, args: record._begin(args[0])),
               unet.register_forward_hook(lambda module, args, output: record._end())]
    handles += [m.register_forward_hook(on_cross_attention, with_kwargs=True)
                for m in unet.modules() if isinstance(m, CrossAttention)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def prompt_words(prompt: str) -> list[str]:
    """The distinct words of a prompt, in order, without A1111's emphasis syntax and BREAK."""
    words = []
    for text, weight in parse_prompt_attention(prompt):
        if text == "BREAK" and weight == -1:
            continue
        words += re.findall(r"[\w']+", text.lower())
    return list(dict.fromkeys(words))


def word_maps(maps: torch.Tensor, tokenizer, prompt: str, words: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-word maps from one image's token maps (L, h, w): a word's map is the sum over its tokens (a word may be
    several BPE tokens) at every place it occurs in the prompt. `words` default to all the prompt's words."""
    chunks = tokenize_prompt(tokenizer, prompt)
    # a longer negative prompt pads the prompt's context with empty chunks (prompts.encode_prompt_pair)
    chunks += tokenize_prompt(tokenizer, "") * max(0, maps.shape[0] // tokenizer.model_max_length - len(chunks))
    ids = [i for chunk in chunks for i in chunk.tokens]  # the context's L positions
    if len(ids) != maps.shape[0]:
        raise ValueError(f"the maps have {maps.shape[0]} tokens, the prompt {len(ids)}: record and read the same "
                         "prompt")
    out = {}
    for word in prompt_words(prompt) if words is None else words:
        word_ids = tokenizer.encode(word)
        n = len(word_ids)
        positions = [p for s in range(len(ids) - n + 1) if ids[s:s + n] == word_ids for p in range(s, s + n)]
        if not positions:
            raise ValueError(f"the word {word!r} is not in the prompt {prompt!r}")
        out[word] = maps[positions].sum(dim=0)  # (h, w)
    return out


def draw_word_maps(image, maps: dict[str, torch.Tensor], path: str | Path | None = None, title: str | None = None):
    """The image, then one panel per word: its map upsampled to the image, over the image in grey. Each panel is
    scaled from its own minimum (blue) to its maximum (red); its title gives the word's share of the attention, averaged
    over the image. Returns the matplotlib figure; writes it to `path` if given."""
    import numpy as np
    from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend, no global state

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    grey = rgb.mean(axis=2)
    n = len(maps) + 1
    fig = Figure(figsize=(1.6 * n, 1.95))
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(rgb)
    axes[0].set_title("image", fontsize=9)
    for ax, (word, m) in zip(axes[1:], maps.items(), strict=True):
        draw_map(ax, grey, m)
        ax.set_title(f"{word} {100 * m.mean().item():.0f}%", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def draw_map(ax, grey, word_map: torch.Tensor) -> None:
    """One word's (h, w) map on a matplotlib axis: upsampled (bicubic) to the grey image's size and laid over it,
    scaled from its own minimum (blue) to its maximum (red)."""
    up = F.interpolate(word_map[None, None].float(), size=grey.shape, mode="bicubic", align_corners=False)[0, 0]
    up = ((up - up.min()) / (up.max() - up.min()).clamp(min=1e-12)).numpy()
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
    ax.imshow(up, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    ax.set_axis_off()


def attention_maps(pipe, prompt: str, path: str | Path | None = None, words: list[str] | None = None, **kwargs):
    """Generate one image of `prompt` (txt2img keywords as `pipe.txt2img`) and return (image, {word: (h, w) map});
    with `path`, also draw the maps there."""
    with record_cross_attention(pipe.unet, images=kwargs.get("batch", 1)) as record:
        image = pipe.txt2img(prompt, **kwargs)[0]
    maps = word_maps(record.mean()[0], pipe.tokenizer, prompt, words)  # the first image's
    if path is not None:
        draw_word_maps(image, maps, path, title=prompt)
    return image, maps
