"""Layer weights kept in the precision their file stores, computed in another (ComfyUI calls this "manual cast").

Most downloaded checkpoints are fp16; on the CPU sdtorch computes in fp32. Casting every weight at load would hold
the whole model in fp32 in ordinary memory (10.3 GB for SDXL's UNet), which can neither be handed back to the OS
between phases nor packed for oneDNN without a second copy. Instead each Linear and Conv2d keeps its file's weight
(a view of the file's memory map: read on first touch, released after each phase) and casts it at every call; the
small rest (norms, embeddings, biases) is cast once at load. The fp16 -> fp32 cast is exact, so the results are those
of a model cast at load. In the pipeline's sampling loop the UNet runs inside `packed.packed_weights`, which packs each
layer's cast once for the whole loop; the per-call cast runs in the text encoder and the VAE, a few times a generation.
"""
import torch
import torch.nn.functional as F
from torch import nn

HALF = (torch.float16, torch.bfloat16)


class CastingForward:
    """Stands in for one Linear or Conv2d layer's `forward` (an instance attribute shadows the class's method): the
    weight cast to `dtype` for this call only."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, dtype: torch.dtype):
        self.layer, self.dtype = layer, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        weight = layer.weight.to(self.dtype)  # a no-op where the weight is in `dtype` already (a merged LoRA)
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, layer.bias)
        return layer._conv_forward(x, weight, layer.bias)


def compute_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make `model` compute in `dtype` (on its device), keeping Linear and Conv2d weights stored in half precision as
    they are (cast per call, see the module's text); every other tensor is cast. Idempotent."""
    for module in model.modules():
        keep = _layer(module) and module.weight.dtype in HALF and dtype not in HALF
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                continue
            if keep and name == "weight":
                continue
            cast = tensor.detach().to(dtype)
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(cast, requires_grad=tensor.requires_grad)
            else:
                module._buffers[name] = cast
        if keep:
            module.forward = CastingForward(module, dtype)
        elif isinstance(module.__dict__.get("forward"), CastingForward):
            del module.forward
    return model


def cast_all(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`model.to(device, dtype)`, every weight cast: the casting forwards go, as nothing is left to cast."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), CastingForward):
            del module.forward
    return model.to(device, dtype)


def is_stored(layer: nn.Module) -> bool:
    """Whether `layer` keeps a weight in another precision than it computes in."""
    return isinstance(_own_forward(layer), CastingForward)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype `layer`'s weight takes part in its computation with."""
    forward = _own_forward(layer)
    return forward.dtype if isinstance(forward, CastingForward) else layer.weight.dtype


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: that of its first parameter which is not a stored layer weight."""
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not (name == "weight" and is_stored(module)):
                return parameter.dtype
    raise ValueError("the model has no parameters to tell its dtype")


def _own_forward(layer: nn.Module):
    forward = layer.__dict__.get("forward")
    return getattr(forward, "inner", forward)  # under packed_weights, the casting forward it stands in front of


def _layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight is not None
