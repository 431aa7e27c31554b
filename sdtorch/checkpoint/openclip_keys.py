"""OpenCLIP's text-tower names (SD 2.x and SDXL single files) <-> our CLIP's (Hugging Face's), by a few rules.

OpenCLIP (github.com/mlfoundations/open_clip) builds the same pre-LN transformer as OpenAI's CLIP under other names:
`transformer.resblocks.{i}` for `encoder.layers.{i}`, `ln_1`/`ln_2`, `mlp.c_fc`/`mlp.c_proj`, and PyTorch's
`nn.MultiheadAttention`, whose q, k and v projections are one fused `in_proj_weight` (3D, D) stacked q, k, v. Its
`text_projection` is a bare (D, P) matrix used as x @ P, i.e. the transpose of a Linear weight.
"""
import torch

from .formats import TensorRef

# (OpenCLIP name, ours) after the tower's prefix; inside `transformer.resblocks.{i}.` the layer renames below
TOWER = (("positional_embedding", "embeddings.position_embedding.weight"),
         ("token_embedding.weight", "embeddings.token_embedding.weight"),
         ("ln_final.", "final_layer_norm."), ("transformer.resblocks.", "encoder.layers."))
LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
         ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))
FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
PROJECTION = ("text_projection", "text_projection.weight")
# in OpenCLIP's state but no part of the text tower's function: the contrastive temperature
IGNORED = ("logit_scale",)


def _rename(name: str, pairs, to_ours: bool) -> str | None:
    for theirs, ours in pairs:
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def from_openclip(tensors: dict[str, TensorRef], prefix: str) -> dict[str, TensorRef]:
    """The tensors with OpenCLIP keys under `prefix` renamed to ours (the fused in_proj split into q, k, v); keys no
    rule claims are kept as they are, for the key check to name."""
    out = {}
    for key, ref in tensors.items():
        if not key.startswith(prefix):
            out[key] = ref
            continue
        name = key[len(prefix):]
        if name in IGNORED:
            continue
        if name == PROJECTION[0]:  # (D, P) used as x @ P -> Linear weight (P, D)
            out[prefix + PROJECTION[1]] = ref.transformed(ref.shape[::-1], lambda t: t.t())
            continue
        ours = _rename(name, TOWER, to_ours=True)
        if ours is None:
            out[key] = ref
            continue
        layer, _, rest = ours.removeprefix("encoder.layers.").partition(".")
        if ours.startswith("encoder.layers.") and rest in FUSED:
            width = ref.shape[0] // 3  # rows: q, then k, then v
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{prefix}encoder.layers.{layer}.self_attn.{proj}.{FUSED[rest]}"] = ref.transformed(
                    (width, *ref.shape[1:]), lambda t, i=i, w=width: t[i * w:(i + 1) * w])
        elif ours.startswith("encoder.layers."):
            renamed = _rename(rest, LAYER, to_ours=True)
            out[prefix + (f"encoder.layers.{layer}.{renamed}" if renamed else ours)] = ref
        else:
            out[prefix + ours] = ref
    return out


def to_openclip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Our tower's tensors under `prefix` in OpenCLIP's names: q, k, v fused into in_proj, the projection as x @ P."""
    out = {}
    for key, t in state.items():
        if not key.startswith(prefix):
            out[key] = t
            continue
        name = key[len(prefix):]
        if name == PROJECTION[1]:
            out[prefix + PROJECTION[0]] = t.t().contiguous()
            continue
        if name.startswith("encoder.layers."):
            layer, _, rest = name.removeprefix("encoder.layers.").partition(".")
            base = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue  # fused with q below
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                parts = [state[f"{prefix}encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[base + f"attn.in_proj_{kind}"] = torch.cat(parts)
                continue
            out[base + _rename(rest, LAYER, to_ours=False)] = t
            continue
        out[prefix + _rename(name, TOWER, to_ours=False)] = t
    return out
