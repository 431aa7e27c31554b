"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023), as A1111's "Token merging ratio" runs it.

Self-attention at the UNet's full latent resolution costs O(N²) in its N = h·w tokens; many of them (a flat sky, a
plain background) are nearly the same. Before a transformer block's self-attention, ToMe merges the r = ratio·N
tokens most similar to another one into it (their mean), runs the attention on the N - r tokens left, and copies each
merged token's result back to the tokens it stood for. An approximation: faster, with a quality cost that grows with
the ratio (docs/performance.md measures both).

Which tokens merge (bipartite soft matching, the paper's sec. 3): the grid is cut into 2×2 cells, whose top-left
token is a destination and the other three are sources (A1111 turns ToMe's random choice of the destination off).
Each source's best match is its most cosine-similar destination; the r sources with the best matches merge into
them. A1111's settings, the ones used here: only self-attention is merged (not cross-attention or the feed-forward),
and only at the full resolution (ToMe's max_downsample=1), so SDXL, which has no attention there, is unchanged.
"""
import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

STRIDE = 2  # ToMe's sx = sy: one destination per 2×2 cell


def bipartite_merge(x: torch.Tensor, h: int, w: int, ratio: float) -> tuple[Callable, Callable]:
    """(merge, unmerge) for the tokens x (B, h·w, C) of an h×w grid, chosen by x's cosine similarities: merge maps
    (B, N, D) to (B, N - r, D), unmerge maps the attention's output back to (B, N, D)."""
    b, n, _ = x.shape
    rows, cols = torch.arange(h, device=x.device)[:, None], torch.arange(w, device=x.device)[None, :]
    # destinations: the top-left token of each whole 2×2 cell; an odd last row or column holds only sources
    is_dst = ((rows % STRIDE == 0) & (rows < h // STRIDE * STRIDE) & (cols % STRIDE == 0)
              & (cols < w // STRIDE * STRIDE)).flatten()
    dst, src = is_dst.nonzero().squeeze(1), (~is_dst).nonzero().squeeze(1)
    r = min(int(n * ratio), len(src))
    if r <= 0:
        return (lambda t: t), (lambda t: t)
    unit = x / x.norm(dim=-1, keepdim=True)
    similarity = unit[:, src] @ unit[:, dst].transpose(1, 2)  # (B, sources, destinations), cosine
    best, best_dst = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)  # sources by how well they match
    merged, kept = order[:, :r], order[:, r:]  # (B, r), (B, S - r): indices into src
    into = best_dst.gather(1, merged)  # (B, r): the destination each merged source joins

    def rows_of(index: torch.Tensor, d: int) -> torch.Tensor:
        return index[..., None].expand(-1, -1, d)

    def merge(t: torch.Tensor) -> torch.Tensor:
        d = t.shape[-1]
        sources, destinations = t[:, src], t[:, dst]
        joined = destinations.scatter_reduce(1, rows_of(into, d), sources.gather(1, rows_of(merged, d)), "mean")
        return torch.cat([sources.gather(1, rows_of(kept, d)), joined], dim=1)  # the kept sources, then the dsts

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        d, k = t.shape[-1], kept.shape[1]
        kept_out, dst_out = t[:, :k], t[:, k:]
        out = t.new_empty(b, n, d)
        out[:, dst] = dst_out
        out.scatter_(1, rows_of(src[kept], d), kept_out)
        out.scatter_(1, rows_of(src[merged], d), dst_out.gather(1, rows_of(into, d)))  # a merged token: its dst's
        return out

    return merge, unmerge


@contextlib.contextmanager
def token_merging(unet: nn.Module, ratio: float) -> Iterator[None]:
    """Within the block, the self-attention of `unet`'s full-resolution transformer blocks runs on merged tokens."""
    if not 0 <= ratio < 1:
        raise ValueError(f"the token merging ratio must be in [0, 1), got {ratio}")
    blocks = [block for t in unet.modules() if getattr(t, "downsample", None) == 1
              for block in t.transformer_blocks]
    before = [block.merge_ratio for block in blocks]
    for block in blocks:
        block.merge_ratio = ratio
    try:
        yield
    finally:
        for block, was in zip(blocks, before, strict=True):
            block.merge_ratio = was
