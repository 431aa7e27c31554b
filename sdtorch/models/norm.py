"""Normalization layers that stay in fp32 when the weights are fp16/bf16."""
import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32, as the original's `GroupNorm32`: fp16 variance over a large group overflows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        if x.device.type == "cpu":  # PyTorch's CPU kernel takes half input with fp32 affine and accumulates in fp32
            return F.group_norm(x, self.num_groups, w, b, self.eps)  # (without two casts of x: ~3x faster)
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
