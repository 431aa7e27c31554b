"""Layer weights kept in the precision their file stores, computed in another (ComfyUI calls this "manual cast").

Most downloaded checkpoints are fp16; on the CPU sdtorch computes in fp32. Casting every weight at load would hold
the whole model in fp32 in ordinary memory (10.3 GB for SDXL's UNet), which can neither be handed back to the OS
between phases nor packed for oneDNN without a second copy. Instead each Linear and Conv2d keeps its file's weight
(a view of the file's memory map: read on first touch, released after each phase) and casts it at every call; the
small rest (norms, embeddings, biases) is cast once at load. The fp16 -> fp32 cast is exact, so the results are those
of a model cast at load. In the pipeline's sampling loop the UNet runs inside `packed.packed_weights`, which packs each
layer's cast once for the whole loop; the per-call cast runs in the text encoder and the VAE, a few times a generation.

The low-memory mode (`weights="q8"`, stable-diffusion.cpp's q8_0) stores each Linear and Conv2d weight as int8 with
one scale per block of Q8_BLOCK consecutive inputs of an output channel: w ≈ q·s, s = max|w_block| / 127 (symmetric
absmax rounding, Dettmers et al. 2022 without outlier handling). A quarter of fp32's memory; each call dequantizes
its layer (never packed: a pack would be an fp32 copy). An approximation: its cost is measured in docs/performance.md.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import memory

HALF = (torch.float16, torch.bfloat16)
Q8_BLOCK = 32  # inputs per scale, as ggml's q8_0; a layer whose input count (I·kh·kw) it does not divide gets one
               # scale per output channel (the first conv's 4·3·3 inputs)


class CastingForward:
    """Stands in for one Linear or Conv2d layer's `forward` (an instance attribute shadows the class's method): the
    weight cast to `dtype` for this call only."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, dtype: torch.dtype):
        self.layer, self.dtype = layer, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        weight = weight_of(layer, self.dtype)  # a no-op where the weight is in `dtype` already (a merged LoRA)
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, layer.bias)
        return layer._conv_forward(x, weight, layer.bias)


def weight_of(layer: nn.Linear | nn.Conv2d, dtype: torch.dtype) -> torch.Tensor:
    """`layer`'s weight as it takes part in a computation in `dtype`: cast, or dequantized from q8."""
    weight = layer.weight
    if weight.dtype != torch.int8:
        return weight.to(dtype)
    blocks = layer.weight_scale.shape[1]  # (O, blocks, 1) scales of (O, blocks, block) int8 values
    dequantized = torch.mul(weight.view(weight.shape[0], blocks, -1), layer.weight_scale.float())  # int8 x fp32
    return dequantized.view(weight.shape).to(dtype)


def quantize_q8(model: nn.Module) -> nn.Module:
    """Store every Linear and Conv2d weight of `model` as int8 with fp16 block scales (see the module's text); the
    original's memory-mapped pages are handed back as each layer is done, so the full-precision model is never
    resident at once. Call `compute_in` afterwards to choose the dtype the layers compute in."""
    for module in model.modules():
        if not (_layer(module) and module.weight.is_floating_point()):
            continue
        original = module.weight.detach()
        count = original[0].numel()
        block = Q8_BLOCK if count % Q8_BLOCK == 0 else count
        w = original.float().reshape(original.shape[0], count // block, block)
        scale = (w.abs().amax(dim=2, keepdim=True) / 127).half()  # stored in fp16, as ggml's q8_0
        safe = scale.float().masked_fill(scale == 0, 1)  # an all-zero block: q = 0 whatever its scale
        q = torch.round(w / safe).clamp_(-127, 127).to(torch.int8)
        module._parameters["weight"] = nn.Parameter(q.view(original.shape), requires_grad=False)
        module.register_buffer("weight_scale", scale, persistent=False)
        memory.release([original])
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of `model` holds a q8 weight."""
    return any(_layer(m) and m.weight.dtype == torch.int8 for m in model.modules())


def compute_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make `model` compute in `dtype` (on its device), keeping Linear and Conv2d weights stored in half precision or
    q8 as they are (cast or dequantized per call, see the module's text); every other tensor is cast. Idempotent."""
    for module in model.modules():
        quantized = _layer(module) and module.weight.dtype == torch.int8
        keep = quantized or (_layer(module) and module.weight.dtype in HALF and dtype not in HALF)
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                continue
            if (keep and name == "weight") or (quantized and name == "weight_scale"):
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
    """`model.to(device, dtype)`, every weight cast: the casting forwards go, as nothing is left to cast. (A q8
    model keeps its int8 weights: place it with `compute_in`.)"""
    if is_quantized(model):
        raise ValueError("a q8 model cannot be cast; use compute_in")
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
