"""The optimizer's companions in the training loop: parameter groups for AdamW, the learning-rate schedule, and an
exponential moving average of the weights."""
import math
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """Exponential moving average of the trainable weights (Polyak & Juditsky 1992), with the decay warmed up as
    min(decay, (1 + n)/(10 + n)) so the random initial weights fade out quickly (as diffusers' EMAModel)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        params = dict(module.named_parameters())
        # shadow += (1 - decay)·(param - shadow) for all tensors in one fused call: one kernel launch, not hundreds
        torch._foreach_lerp_(list(self.shadow.values()), [params[n].detach() for n in self.shadow], 1 - decay)

    @contextmanager
    def applied(self, module: nn.Module):
        """Use the averaged weights inside the block (for evaluation, samples and export), then restore."""
        params = dict(module.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        if state.keys() != self.shadow.keys():
            raise ValueError("the checkpoint's EMA weights do not match the model's trainable parameters")
        for name, value in state.items():
            self.shadow[name].copy_(value)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warmup from 0, then cosine decay to `min_ratio` (Loshchilov & Hutter 2017, no restarts)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only: decaying biases, norm gains and the CLIP temperature only hurts."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
