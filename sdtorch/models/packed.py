"""CPU inference on weights packed once for oneDNN, instead of at every call.

PyTorch's CPU `F.conv2d` takes its weight in the plain (O, I, kh, kw) layout, and oneDNN copies it into the blocked
layout it computes with at every call; `F.linear` copies its bias over the whole output before the matrix product
adds into it. oneDNN's own ops, the ones PyTorch's compiler uses for frozen models (`mkldnn._convolution_pointwise`,
`mkldnn._linear_pointwise`), take a weight packed beforehand and add the bias in the kernel. On this project's 2-core
CPU an SD 1.5 UNet step (512x512, CFG) runs 7-8% faster on packed weights; results differ from the plain ops' by
rounding only (~1e-6 relative).

`packed_weights(model)` packs each Linear and Conv2d of `model` at its first call inside the block (the first call
tells the kernel its input size); on exit the packs are freed and their pages handed back to the OS
(`memory.trim_heap`). A pack is a copy of its weight, so by default it is kept only where it replaces one: where the
original is a view of a file's memory map, whose pages go back to the OS once packed (`memory.release`): an fp32
.safetensors loaded as it is, or an fp16 one whose layers keep their stored weights (models/stored.py), packed from
their fp32 cast. Weights in ordinary memory run the plain ops, so that RAM never holds two copies. A LoRA-merged
weight (ordinary memory that exists only for the sampling loop, sdtorch/lora.py) is packed and then dropped: the
layer gets its original back, and its pack carries the merge until the block ends.
Layers computing in bf16 are packed too where oneDNN has native bf16 kernels (`packs`): the pack is the bf16 cast of
the file's weight, which a bf16 pipeline keeps as stored (pipeline._place), so the step runs on packs as the fp32 one
does (on an AMX Xeon ~0.7x the step on plain bf16 weights, whose blocked copies oneDNN makes at every call); a stored
layer whose original is in ordinary memory keeps its pack beside it, since its plain form casts at every call.
Inference only: while autograd records, layers run as usual.

The pipeline packs its UNet for each generation's sampling loop and frees the packs before the VAE decodes. Packing
the SD 1.5 UNet makes the first step ~2 s slower (10.2 against 8.2 s here), repaid by the third step.
"""
import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .. import memory
from . import stored
from .upsample import Upsample


def available() -> bool:
    """Whether this PyTorch has the oneDNN ops (CPU builds for x86 and ARM do)."""
    ops = ("_reorder_linear_weight", "_linear_pointwise", "_convolution_pointwise")
    return (torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, op) for op in ops)
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


def packs(dtype: torch.dtype) -> bool:
    """Whether layers computing in `dtype` are packed: fp32, and bf16 where oneDNN has native bf16 kernels."""
    if dtype == torch.bfloat16:
        return available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32 and available()


TRIM_EVERY = 64 << 20  # bytes of dropped LoRA-merged weights between two heap trims
_untrimmed = 0  # bytes of them dropped since the last trim


class _PackedForward:
    """Stands in for one layer's `forward` (as an instance attribute, which shadows the class's method)."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, duplicates_ok: bool):
        self.layer, self.duplicates_ok = layer, duplicates_ok
        self.inner = layer.__dict__.get("forward")  # the layer's own stand-in (a stored.CastingForward), if any
        self.packed, self.plain, self.carries_merge = None, False, False
        self.dtype = stored.compute_dtype(layer)
        if isinstance(layer, nn.Conv2d):
            self.conv_args = list(layer.padding), list(layer.stride), list(layer.dilation), layer.groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if self.plain or torch.is_grad_enabled() or x.dtype != self.dtype or x.device.type != "cpu":
            if self.carries_merge:  # the layer's own weight lacks the LoRA now: running it would drop the LoRA
                raise RuntimeError("a LoRA-merged layer was packed and can only run on its pack inside the block")
            return self.plain_forward(x)
        if self.packed is None:
            packed = self.pack(x)
            original = getattr(layer.weight, "original", None)
            if original is not None:
                # a LoRA-merged weight (sdtorch/lora.py), ordinary memory: the pack takes its place, and the layer
                # holds its original again (its mapped pages released), so RAM keeps one copy, packed
                global _untrimmed
                _untrimmed += layer.weight.nbytes
                layer._parameters["weight"] = original
                self.packed, self.carries_merge = packed, True
                if _untrimmed >= TRIM_EVERY:  # freed merged blocks back to the OS, not kept beside the packs; in
                    _untrimmed = 0            # batches, as each trim walks the whole heap
                    memory.trim_heap()
            else:
                # the pack stays if the original's memory-mapped pages could be given back (the original is not
                # read again in the block): RAM then holds one copy of the weight, not two
                released = memory.release([layer.weight])
                # (a bf16 layer's weight stored in another precision would be cast whole at every plain call: its
                # pack stays even beside an original in ordinary memory)
                if not (self.duplicates_ok or released >= layer.weight.nbytes - 2 * memory.PAGE
                        or (self.dtype == torch.bfloat16 and stored.is_stored(layer))):
                    self.plain = True
                    return self.plain_forward(x)
                self.packed = packed
        if isinstance(layer, nn.Linear):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, layer.bias, "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, layer.bias, *self.conv_args, "none", [], "")

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) if self.inner is not None else type(self.layer).forward(self.layer, x)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """The weight, in the layer's compute dtype, in oneDNN's layout for inputs like x (an opaque oneDNN tensor)."""
        weight = stored.weight_of(self.layer, self.dtype)  # a weight stored in another precision: its cast
        if isinstance(self.layer, nn.Linear):
            return torch.ops.mkldnn._reorder_linear_weight(weight, x.numel() // x.shape[-1])
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), *self.conv_args, list(x.shape))


def _packable(layer: nn.Module) -> bool:
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return False
    if not packs(stored.compute_dtype(layer)) or layer.weight.device.type != "cpu":
        return False
    if stored.is_q8_layer(layer):  # q8: a pack would be a full fp32 copy, what the mode exists to avoid
        return False
    # oneDNN's convolution pads with zeros only, and takes explicit padding (not "same"/"valid")
    return isinstance(layer, nn.Linear) or (layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


@contextlib.contextmanager
def packed_weights(model: nn.Module, duplicates_ok: bool = False) -> Iterator[None]:
    """Within the block, `model`'s CPU Linear and Conv2d layers computing in a dtype `packs` covers run on packed
    weights (see the module's text).
    By default only where the pack replaces a memory-mapped original; `duplicates_ok`: everywhere, keeping both."""
    layers = [m for m in model.modules() if _packable(m)]
    forwards = [_PackedForward(layer, duplicates_ok) for layer in layers]
    for layer, forward in zip(layers, forwards, strict=True):
        layer.forward = forward
    # the folded upsampling convs (upsample.py) compute their phase kernels once for the loop, not at every call
    upsamplers = [m for m in model.modules() if isinstance(m, Upsample)] if layers else []
    for upsampler in upsamplers:
        upsampler.kept_kernels = {}
    try:
        yield
    finally:
        for upsampler in upsamplers:
            upsampler.kept_kernels = None
        for layer, forward in zip(layers, forwards, strict=True):
            if forward.inner is not None:
                layer.forward = forward.inner
            else:
                layer.__dict__.pop("forward", None)
        if any(forward.packed is not None for forward in forwards):
            for forward in forwards:
                forward.packed = None
            # the packs (a model's worth of memory) go back to the OS, not to the heap's free lists: otherwise the
            # phases after the loop, which allocate differently, would keep them resident and grow beside them
            memory.trim_heap()
