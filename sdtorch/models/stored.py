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

from .. import WEIGHT_MODES, memory

HALF = (torch.float16, torch.bfloat16)
Q8_BLOCK = 32  # inputs per scale, as ggml's q8_0; a layer whose input count (I·kh·kw) it does not divide gets one
               # scale per output channel (the first conv's 4·3·3 inputs)
Q8_CHUNK = 1 << 18  # weights quantized at a time (1 MB in fp32)


def check_weights(weights: str | None) -> None:
    if weights is not None and weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be None (as the file stores them) or one of {WEIGHT_MODES}, got {weights!r}")


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
    # int8 -> fp32 then × scale, both exact in fp32 (8 + 11 significant bits); two vectorised passes beat one mixed one
    dequantized = weight.view(weight.shape[0], blocks, -1).to(torch.float32).mul_(layer.weight_scale.float())
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
        rows = original.reshape(-1, block)  # one block per row
        q = torch.empty(rows.shape, dtype=torch.int8)
        scale = torch.empty(len(rows), 1, dtype=torch.float16)
        step = max(1, Q8_CHUNK // block)
        for i in range(0, len(rows), step):  # a chunk at a time, so that the fp32 temporaries stay in the cache
            w = rows[i:i + step].to(torch.float32, copy=True)
            s = scale[i:i + step]
            s.copy_(torch.linalg.vector_norm(w, float("inf"), dim=1, keepdim=True) / 127)  # max|w| / 127, in fp16
            w.div_(s.float().masked_fill_(s == 0, 1))  # an all-zero block: q = 0 whatever its scale
            q[i:i + step] = w.round_().clamp_(-127, 127)  # round to nearest, cast to int8 by the copy
        assign_q8(module, q.view(original.shape), scale.view(original.shape[0], -1, 1))
        memory.release([original])
    return model


def assign_q8(layer: nn.Linear | nn.Conv2d, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Make `layer` hold the q8 weight `q` (int8, the layer's weight shape) with its (O, blocks, 1) block scales."""
    if q.dtype != torch.int8 or q.shape != layer.weight.shape or scale.dim() != 3 or scale.shape[0] != q.shape[0] \
            or scale.shape[2] != 1 or q[0].numel() % scale.shape[1]:
        raise ValueError(f"a q8 weight is int8 of the layer's shape {tuple(layer.weight.shape)} with (O, blocks, 1) "
                         f"scales, got {q.dtype} {tuple(q.shape)} and {tuple(scale.shape)}")
    layer._parameters["weight"] = nn.Parameter(q, requires_grad=False)
    layer.register_buffer("weight_scale", scale, persistent=False)


def q8_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """The block scales of `model`'s q8 layers, by the state-dict key a q8 file stores them under."""
    return {f"{name}.weight_scale": m.weight_scale for name, m in model.named_modules() if is_q8_layer(m)}


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of `model` holds a q8 weight."""
    return any(is_q8_layer(m) for m in model.modules())


def is_q8_layer(module: nn.Module) -> bool:
    """Whether `module` is a Linear or Conv2d holding a q8 (int8) weight."""
    return _layer(module) and module.weight.dtype == torch.int8


def compute_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make `model` compute in `dtype` (on its device), keeping Linear and Conv2d weights stored in half precision or
    q8 as they are, and for bf16 any other precision too (cast or dequantized per call, or packed per loop: see the
    module's text); every other tensor is cast. Idempotent."""
    for module in model.modules():
        quantized = is_q8_layer(module)
        keep = quantized or (_layer(module) and module.weight.dtype != dtype
                             and (dtype == torch.bfloat16 or (module.weight.dtype in HALF and dtype not in HALF)))
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
