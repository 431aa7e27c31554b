"""Attention (Vaswani et al. 2017) and the transformer pieces the UNet uses. CLIP and the VAE call the same
`attention` function with their own projection names.

`attention` runs PyTorch's fused `scaled_dot_product_attention`, which never forms the attention matrix. Inside
`explicit_attention()` it runs the formula as written instead, softmax(QKᵀ/√d)·V through `attention_probs`: slower and
O(N·M) in memory, but every step is a tensor a learner can print. The two agree to float rounding (tests: ≤ 1e-5 in
fp32). `sdtorch.attention_maps` records the cross-attention probabilities of a generation with hooks, using
`attention_probs` too.
"""
import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .token_merging import bipartite_merge

_explicit = False  # set by explicit_attention(); module-wide, like PyTorch's own backend switches


@contextlib.contextmanager
def explicit_attention(enabled: bool = True) -> Iterator[None]:
    """Within the block, `attention` computes softmax(QKᵀ/√d)·V step by step instead of calling the fused kernel."""
    global _explicit
    previous, _explicit = _explicit, enabled
    try:
        yield
    finally:
        _explicit = previous


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) -> (B, H, N, d): each head attends on its own d channels."""
    b, n, width = t.shape
    return t.view(b, n, heads, width // heads).transpose(1, 2)


def attention_probs(q: torch.Tensor, k: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The attention matrix softmax(QKᵀ/√d) (Vaswani et al. 2017, eq. 1): q (B, H, N, d), k (B, H, M, d) ->
    (B, H, N, M); row n says how query n shares its attention over the M keys (each row sums to 1)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, N, d) @ (B, H, d, M) -> (B, H, N, M)
    if causal:  # query i may only look at keys j <= i (CLIP's text tower, like a language model)
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """softmax(QKᵀ/√d)V over `heads` heads; q (B, N, H·d), k/v (B, M, H·d) -> (B, N, H·d)."""
    b, n, width = q.shape
    q, k, v = (split_heads(t, heads) for t in (q, k, v))  # SDPA wants the heads as a batch dimension
    # explicit: (B, H, N, M) @ (B, H, M, d) -> (B, H, N, d); the fused kernel computes the same without the matrix
    out = (attention_probs(q, k, causal) @ v if _explicit
           else F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    return out.transpose(1, 2).reshape(b, n, width)  # (B, H, N, d) -> (B, N, H·d)


class CrossAttention(nn.Module):
    """Multi-head attention of x over a context (self-attention when context is None), as in the LDM UNet."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))  # keys: to_out.0.*

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU unit (Shazeer 2020, "GLU Variants Improve Transformer"): x·GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP. On the CPU, when its hidden activations (2·mult·dim wide) would exceed `whole_bytes`, it runs over
    the tokens in chunks of `chunk_bytes`: for a 64x64 latent (batch 2, dim 320) the hidden layer is 168 MB, which
    glibc's allocator takes fresh from the OS (and the OS zeroes) at every call; in 16 MB chunks it is reused memory,
    ~25% faster on this project's CPU (149 vs 186 ms), and the peak drops by ~250 MB. Tokens are independent, so
    chunking changes only the rounding (~1e-7). Other devices, never measured, run the whole `self.net(x)`."""

    whole_bytes, chunk_bytes = 64 << 20, 16 << 20

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))  # net.0, net.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        row_bytes = self.net[0].proj.out_features * x.element_size()
        if x.device.type != "cpu" or tokens.shape[0] * row_bytes <= self.whole_bytes:
            return self.net(x)
        chunks = tokens.split(max(1, self.chunk_bytes // row_bytes))
        return torch.cat([self.net(chunk) for chunk in chunks]).view(*x.shape[:-1], -1)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the text, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.merge_ratio = 0.0  # token merging of the self-attention (token_merging.py; needs the grid's size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.merge_ratio and size is not None:
            merge, unmerge = bipartite_merge(x, *size, self.merge_ratio)
            x = x + unmerge(self.attn1(merge(self.norm1(x))))
        else:
            x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))
