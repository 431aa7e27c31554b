"""LoRA and LyCORIS networks: read the files people download, and apply them to a model as A1111 does.

A network file stores, per layer, a low-rank (or otherwise factored) update of that layer's weight. A1111
(extensions-builtin/Lora) adds it to the weight before the model runs:

    W' = W + ΔW · scale · multiplier,   scale = alpha / rank

with ΔW built per kind (Hu et al. 2021 for LoRA; LyCORIS, Yeh et al. 2024, for LoHa and LoKr):
    LoRA  ΔW = up · down                                   (3x3 "LoCon": up (O, r, 1, 1) after down (r, I, 3, 3))
    LoHa  ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b)              (Hadamard product of two low-rank matrices)
    LoKr  ΔW = w1 ⊗ w2                                     (Kronecker product; either factor may be low-rank)
    DoRA  the merged weight's columns rescaled to `dora_scale` (Liu et al. 2024), as A1111 does.

The layouts, told apart by tensor names (never by file name):
    kohya-ss / A1111   lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight, lora_te_text_model_..., .alpha
    diffusers / PEFT   unet.down_blocks.0....to_q.lora_A.weight (lora_B, lora.down/up, processor.to_q_lora.down)
    LyCORIS            lora_unet_... .hada_w1_a ... / .lokr_w1 ...

`apply_networks` patches the affected weights: each becomes a new fp32 tensor W' (one fused addmm), and the
original tensor is kept aside and put back by `restore`, so switching networks returns the base weights bit for bit.
A generation merges the text encoder's layers for the prompt's encoding and the UNet's for the sampling loop, and
restores each right after (`AppliedNetworks.merged`): a merged weight is ordinary memory that cannot leave RAM
between phases as a memory-mapped one does, so it exists only while its phase runs.
Chosen over computing the low-rank term beside each layer because the merged layer costs the same work per call as
the plain one, while the side term adds r·(in + out) multiply-adds per token to in·out (20% for rank 32 on a
320-wide layer), and because the Upsample's conv reads its weight directly (models/upsample.py), where no hook on
the layer would see it. A merged weight is ordinary memory, which `memory.release` cannot drop: on the CPU the
sampling loop packs it for oneDNN (models/packed.py), which then drops it, so RAM holds one copy, as without a LoRA.
benchmarks/bench_lora.py measures both ways.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import re
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import memory
from .models import stored
from .checkpoint.diffusers_keys import to_diffusers, unet_rules
from .checkpoint.formats import detect_format, read_tensor_file
from .checkpoint.infer import FAMILY_NAMES  # ModelConfig.family -> as messages name it

NETWORK_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
PARTS = ("unet", "text_encoder", "text_encoder_2")  # SDXL's second (bigG) tower is text_encoder_2, as diffusers

# suffix of a tensor name -> its role in the layer's update; longest first, so ".lora.down.weight" beats ".weight"
_ROLES = [
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"), (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"), (".lokr_w1", "lokr_w1"),
    (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_w2", "lokr_w2"), (".lokr_t2", "lokr_t2"),
    (".dora_scale", "dora_scale"), (".alpha", "alpha"), (".scale", "scale"),
]
# old diffusers attention processors: "attn1.processor.to_q_lora.down.weight" is the LoRA of "attn1.to_q"
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")
_TE_PROCESSOR = re.compile(r"\.(to_q|to_k|to_v|to_out)_lora\.")
_TE_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# keys only some families' networks have (A1111 tells them apart by ss_* metadata and layer shapes as well)
_FAMILY_KEYS = [("SDXL", re.compile(r"^(lora_te[12]_|text_encoder_2\.|lora_unet_(input|output)_blocks_\d+_1_"
                                    r"transformer_blocks_[1-9])")),
                ("SD 3", re.compile(r"^(lora_unet_joint_blocks_|transformer\.transformer_blocks\.)")),
                ("Flux", re.compile(r"^(lora_unet_double_blocks_|lora_unet_single_blocks_)"))]
_CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # attn2.to_k's input width per family


class NetworkError(ValueError):
    """A network file that cannot be used with this model; the message says why in one line."""


@dataclass
class LayerUpdate:
    """One layer's stored update: its tensors by role (down, up, hada_w1_a, lokr_w1, alpha, ...)."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        roles = self.tensors
        if "hada_w1_a" in roles:
            return "loha"
        if "lokr_w1" in roles or "lokr_w1_a" in roles:
            return "lokr"
        return "lora"

    def scale(self) -> float:
        """alpha / rank, or 1 when the file stores no alpha (A1111's NetworkModule.calc_scale)."""
        t = self.tensors
        if "scale" in t:
            return t["scale"].item()
        rank = {"lora": lambda: t["down"].shape[0], "loha": lambda: t["hada_w1_b"].shape[0],
                "lokr": lambda: (t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t
                                 else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None)}[self.kind]()
        if "alpha" not in t or rank is None:
            return 1.0
        return t["alpha"].item() / rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """ΔW in fp32, shaped like the layer's weight, before scale and multiplier."""
        t = {k: v.float() for k, v in self.tensors.items()}
        kind = self.kind
        if kind == "lora":
            if "mid" in t:
                raise NetworkError("LoCon with a Tucker 'lora_mid' factor is not supported")
            up, down = t["up"].flatten(1), t["down"]  # (O, r), (r, I[, kh, kw])
            delta = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])  # (O, I[, kh, kw])
        elif kind == "loha":
            if "hada_t1" in t:
                raise NetworkError("LoHa with Tucker factors (hada_t1) is not supported")
            delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])  # (O, I·kh·kw)
        else:
            if "lokr_t2" in t:
                raise NetworkError("LoKr with a Tucker factor (lokr_t2) is not supported")
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.dim() == 4:  # a conv factor: w1 (a, b) acts on the channel axes only
                w1 = w1[:, :, None, None]
            delta = torch.kron(w1, w2)
        if delta.numel() != shape.numel():
            raise NetworkError(f"its update has {tuple(delta.shape)} values for a weight of shape {tuple(shape)}")
        return delta.reshape(shape)

    def add_to(self, weight: torch.Tensor, factor: float) -> None:
        """weight += ΔW·scale·factor, in place (weight: fp32, contiguous). For LoRA one fused W + a·(up·down), which
        allocates nothing (addmm); DoRA's rescaling needs the merged weight, so it is built first."""
        t = self.tensors
        if self.kind == "lora" and "dora_scale" not in t and "mid" not in t:
            up, down = t["up"].to(weight).flatten(1), t["down"].to(weight).flatten(1)  # (O, r), (r, I·kh·kw)
            weight.view(weight.shape[0], -1).addmm_(up, down, alpha=self.scale() * factor)
            return
        delta = self.delta(weight.shape).to(weight.device) * self.scale()
        if "dora_scale" in t:
            delta = self.dora(weight + delta, weight)
        weight.add_(delta, alpha=factor)

    def dora(self, merged: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """DoRA (Liu et al. 2024, eq. 5) as A1111 applies it: the merged weight's input columns rescaled to the
        stored magnitudes; returns the resulting update."""
        scale = self.tensors["dora_scale"].float()
        columns = merged.transpose(0, 1).reshape(merged.shape[1], -1)  # (I, O·kh·kw)
        norm = columns.norm(dim=1).reshape(1, merged.shape[1], *[1] * (merged.dim() - 2))
        return merged * (scale.reshape(norm.shape) / norm) - weight


@dataclass
class Network:
    """A network file read and matched against a model: its layer updates by (part, module name)."""
    name: str
    path: Path
    layers: dict[tuple[str, str], LayerUpdate]
    metadata: dict[str, str]
    unmatched: list[str]  # stored layer names that match no layer of the model

    @functools.cached_property
    def short_hash(self) -> str:
        """A1111's "Lora hashes" value: sha256 of the tensor data after the header for .safetensors (kohya's
        "addnet" hash), of the whole file otherwise; first 12 hex digits."""
        return network_hash(self.path)[:12]


def network_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if detect_format(path) == "safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def layer_names(models) -> dict[str, tuple[str, str]]:
    """Every name a network file may give a Linear/Conv2d layer of `models` -> (part, module name): the kohya form of
    the diffusers and the original layout (lora_unet_down_blocks_0_..., lora_unet_input_blocks_1_1_...,
    lora_te_text_model_encoder_...) and the dotted diffusers/PEFT form (unet.down_blocks.0..., text_encoder....)."""
    names = {}
    rules = unet_rules(models.unet.config)
    towers = models.text_encoders
    for name, module in models.unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            diffusers = (to_diffusers(name + ".weight", rules) or name + ".weight").removesuffix(".weight")
            names["lora_unet_" + diffusers.replace(".", "_")] = ("unet", name)
            names["lora_unet_" + name.replace(".", "_")] = ("unet", name)
            names["unet." + diffusers] = ("unet", name)
    for i, tower in enumerate(towers):  # kohya: lora_te_ for one tower, lora_te1_/lora_te2_ for SDXL's two
        part = PARTS[1 + i]
        kohya = "lora_te_" if len(towers) == 1 else f"lora_te{i + 1}_"
        for name, module in tower.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                names[kohya + "text_model_" + name.replace(".", "_")] = (part, name)
                names[f"{part}.text_model.{name}"] = (part, name)
                names[f"{part}.{name}"] = (part, name)  # transformers >= 5.6 drops "text_model"
    return names


def _split_key(key: str) -> tuple[str, str] | None:
    """(layer name, role) of a tensor name, or None when it is not part of a layer update."""
    key = _PROCESSOR.sub(lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora.", key)
    if key.startswith(("text_encoder.", "text_encoder_2.")):
        key = _TE_PROCESSOR.sub(lambda m: f".{_TE_NAMES[m[1]]}.lora.", key)
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def read_network(path: str | Path, models, name: str | None = None) -> Network:
    """Read a LoRA/LyCORIS file (.safetensors, or a pickle through the weights-only loader) and match its layers
    against `models`; raises NetworkError for another model family, a file that is no network, or wrong shapes."""
    path = Path(path)
    with ExitStack() as files:
        refs, metadata = read_tensor_file(path, detect_format(path), files)
        tensors = {k: ref.load(None, torch.device("cpu")).clone() for k, ref in refs.items()}
    family, ours = network_family(tensors, metadata), FAMILY_NAMES[models.config.family]
    if family and family != ours:
        raise NetworkError(f"{path}: a LoRA for {family}; this model is {ours}")
    grouped: dict[str, LayerUpdate] = {}
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            continue
        layer, role = split
        grouped.setdefault(layer, LayerUpdate()).tensors[role] = tensor
    if not grouped:
        raise NetworkError(f"{path}: not a LoRA/LyCORIS file (no lora_down/lora_A/hada_/lokr_ tensors)")
    names = layer_names(models)
    layers, unmatched = {}, []
    for layer, update in grouped.items():
        target = names.get(layer)
        if target is None or set(update.tensors) <= {"alpha", "scale", "dora_scale"}:
            unmatched.append(layer)
            continue
        _check_shape(path, layer, update, _module(models, *target))
        layers[target] = update
    if not layers:
        raise NetworkError(f"{path}: none of its {len(grouped)} layers matches this model "
                           f"(e.g. {', '.join(sorted(grouped)[:3])})")
    if unmatched:  # reported, never dropped silently (A1111 logs them too)
        warnings.warn(f"{path}: {len(unmatched)} of its {len(grouped)} layers match no layer of this model "
                      f"(e.g. {', '.join(sorted(unmatched)[:3])})", stacklevel=2)
    return Network(name or path.stem, path, layers, metadata, sorted(unmatched))


def _module(models, part: str, name: str) -> nn.Module:
    model = models.unet if part == "unet" else models.text_encoders[PARTS.index(part) - 1]
    return model.get_submodule(name)


def network_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """The model family a network was made for, from kohya's ss_* metadata, keys only one family has, or the width
    its cross-attention keys read ("SD 1.x", "SD 2.x", "SDXL", "SD 3", "Flux"); None when nothing tells."""
    version = str(metadata.get("ss_base_model_version", ""))
    if version.startswith("sdxl"):
        return "SDXL"
    if metadata.get("ss_v2") == "True" or version.startswith("sd_v2"):
        return "SD 2.x"
    if version.startswith("sd_v1"):
        return "SD 1.x"
    for family, marker in _FAMILY_KEYS:
        if any(marker.match(k) for k in tensors):
            return family
    for key, t in tensors.items():  # the cross-attention's key projection reads the text encoder's width
        if "attn2" in key and ("to_k" in key) and _split_key(key) and _split_key(key)[1] == "down":
            return _CONTEXT_WIDTHS.get(t.shape[1])
    return None


def _check_shape(path: Path, layer: str, update: LayerUpdate, module: nn.Module) -> None:
    """The update's factors multiply out to the layer's weight shape: computed on the meta device (shapes only)."""
    try:
        LayerUpdate({k: v.to("meta") for k, v in update.tensors.items()}).delta(module.weight.shape)
    except NetworkError as e:
        raise NetworkError(f"{path}: {layer}: {e}") from None
    except RuntimeError as e:  # factors that do not multiply
        raise NetworkError(f"{path}: {layer}: damaged update ({str(e).splitlines()[0]})") from None


# ---- applying and restoring ------------------------------------------------------------------------------------------

class AppliedNetworks:
    """The networks a model carries: merged into one part's weights for the phase that runs it (`merged`), or into
    all of them until `restore` (`set`); the original weight tensors are kept aside and put back."""

    def __init__(self, models):
        self.models = models
        self.networks: list[tuple[Network, float, float]] = []  # what `merged` merges
        self.originals: dict[nn.Module, nn.Parameter] = {}

    def use(self, networks: list[tuple[Network, float, float]]) -> None:
        """The (network, unet multiplier, te multiplier) the next phases merge; [] for the base weights."""
        self.networks = list(networks)

    @contextlib.contextmanager
    def merged(self, *parts: str):
        """Within the block, `parts` ("unet", or the text encoders "text_encoder", "text_encoder_2") run with the
        networks merged; afterwards their original tensors are back and the merged ones freed. A generation merges
        each model for its own phase, so merged weights never sit in RAM beside the phases that do not use them (the
        VAE's decode, the next prompt's wait); merging a rank-32 LoRA into the SD 1.5 size's text encoder and UNet
        took 0.8-1.6 s a generation here (benchmarks/bench_lora.py)."""
        if not self.networks:
            yield
            return
        apply_networks(self.models, self.networks, self.originals, parts=parts)
        try:
            yield
        finally:
            self.restore()
            memory.trim_heap()  # the merged weights' freed blocks back to the OS, not kept for the next phase

    def set(self, networks: list[tuple[Network, float, float]]) -> None:
        """Merge these networks into every part until `restore` (for a caller that runs the models itself)."""
        self.restore()
        apply_networks(self.models, networks, self.originals)

    def restore(self) -> None:
        """Put every original weight back (the very tensors that were there: bit for bit)."""
        for module, original in self.originals.items():
            current = module.weight
            dtype = original.dtype if stored.is_stored(module) else current.dtype  # (a stored weight stays as stored)
            if original.device != current.device or original.dtype != dtype:  # the model moved meanwhile
                original = nn.Parameter(original.data.to(current.device, dtype), requires_grad=False)
            module._parameters["weight"] = original
        self.originals.clear()


@torch.no_grad()
def apply_networks(models, networks: list[tuple[Network, float, float]],
                   originals: dict[nn.Module, nn.Parameter], parts=PARTS) -> None:
    """Patch each affected layer's weight in `parts`: W' = W + Σ ΔW·scale·multiplier, added network after network
    in fp32 as A1111 does. W' is a new tensor; the original goes into `originals` (and its memory-mapped pages back
    to the OS: they fault in again, unchanged, if it is restored)."""
    for network, unet_multiplier, te_multiplier in networks:
        for (part, name), update in network.layers.items():
            multiplier = unet_multiplier if part == "unet" else te_multiplier
            if multiplier == 0 or part not in parts:
                continue
            module = _module(models, part, name)
            weight = module.weight
            if module in originals and weight.dtype == torch.float32:
                work = weight.detach()  # already a merged tensor of ours: updated in place
            else:  # a copy in fp32 (a q8 weight's dequantized values)
                work = stored.weight_of(module, torch.float32).detach()
                work = work.clone() if work.data_ptr() == weight.data_ptr() else work
            update.add_to(work, multiplier)
            if module not in originals:
                originals[module] = weight
                memory.release([weight])  # layer by layer, so RAM never holds both copies of many weights
            # in the dtype the layer computes in (fp32 for an fp16 weight kept as stored: models/stored.py)
            merged = nn.Parameter(work.to(stored.compute_dtype(module)), requires_grad=False)
            merged.original = originals[module]  # models/packed.py packs the merge and gives the layer this back
            module._parameters["weight"] = merged


# ---- finding files ---------------------------------------------------------------------------------------------------

def find_file(name: str, folder: Path | None, extensions=NETWORK_EXTENSIONS, what: str = "LoRA") -> Path:
    """The file a prompt names: a path, or NAME(.ext) in `folder` (subfolders too, as A1111 lists them); an unknown
    name is an error listing the close matches."""
    direct = Path(name)
    if direct.is_file():
        return direct
    candidates = {}
    if folder is not None and folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in extensions:
                candidates.setdefault(path.stem, path)
    if name in candidates:
        return candidates[name]
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    where = f"in {folder}" if folder is not None else "(no folder given)"
    raise NetworkError(f"{what} {name!r} not found {where}{hint}")
