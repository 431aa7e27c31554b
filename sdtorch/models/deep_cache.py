"""DeepCache (Ma, Fang & Wang 2023): reuse the UNet's deep features across sampling steps.

From one step to the next the UNet's input changes little, and its deep, low-resolution features change least of
all (the paper's fig. 2). So only every `interval`-th evaluation runs the whole UNet ("full"); it keeps the up path's
activation where the shallow skip branch number `depth` joins it. The evaluations in between ("partial") run only
the shallow branch: the first depth + 1 input blocks, then the cached activation, concatenated with their skips,
through the last depth + 1 output blocks. The deep middle is skipped: at depth 0 a partial SD 1.5 evaluation runs
one conv and one full-resolution block. An approximation: faster, with a quality cost that grows with the interval
and with depth (docs/performance.md measures both).

The paper's uniform schedule, as its reference code (the DeepCache package's DeepCacheSDHelper, with
`cache_branch_id` = depth) runs it: evaluation 0, interval, 2·interval, ... are full. An evaluation is a run of UNet
calls at one timestep; a sampler that calls the UNet more than once there (the images of an exact batch one by one)
has each call's activation kept apart, and a call whose input shape changed since the full evaluation (NGMS dropped
the unconditional half) runs in full.
"""
import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class FeatureCache:
    """The state of one sampling run: which evaluation this is, and the activations of the last full one."""

    def __init__(self, interval: int, depth: int):
        self.interval, self.depth = interval, depth
        self.evaluation, self.timestep, self.call = -1, None, 0
        self.kept: dict[int, tuple[torch.Size, torch.Tensor]] = {}  # call -> (its input's shape, the activation)

    def reuse(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """Called once per UNet call with its input x (B, C, h, w) and timesteps t (B,): the cached activation to
        resume from, or None when this call runs in full (and keeps its activation with `keep`)."""
        timestep = float(t[0])
        if timestep != self.timestep:  # a new evaluation
            self.evaluation, self.timestep, self.call = self.evaluation + 1, timestep, 0
        else:
            self.call += 1
        kept = self.kept.get(self.call)
        partial = self.evaluation % self.interval != 0 and kept is not None and kept[0] == x.shape
        return kept[1] if partial else None

    def keep(self, x: torch.Tensor, activation: torch.Tensor) -> None:
        self.kept[self.call] = (x.shape, activation)


@contextlib.contextmanager
def deep_cache(unet: nn.Module, interval: int, depth: int = 0) -> Iterator[None]:
    """Within the block, `unet` runs in full only every `interval`-th evaluation (1 = always: off) and in between
    only its shallow branch number `depth` (0 = the shallowest: the first input and the last output block)."""
    blocks = len(unet.input_blocks)
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"the DeepCache interval must be an integer of at least 1 (1 = off), got {interval}")
    if not isinstance(depth, int) or not 0 <= depth < blocks:
        raise ValueError(f"the DeepCache depth must be an integer in [0, {blocks - 1}] for this UNet, got {depth}")
    before = unet.feature_cache
    unet.feature_cache = FeatureCache(interval, depth) if interval > 1 else None
    try:
        yield
    finally:
        unet.feature_cache = before
