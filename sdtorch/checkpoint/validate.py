"""A model config from a file is input like any other: checked for types and sane sizes, and against the tensors'
shapes, before a module is built from it (a header claiming a million CLIP layers would otherwise build them)."""
import dataclasses
import math

from ..config import ModelConfig
from .errors import CorruptCheckpointError
from .infer import infer_sd1_config

# Upper bounds far above any released model (SD 1.x: 12 CLIP layers, 320 UNet channels, 512 pixels; SDXL: 10-deep
# transformers, 2048-wide context), low enough that building the modules cannot exhaust memory.
MAX_DEPTH = 256  # layers, blocks, levels, heads
MAX_WIDTH = 1 << 18  # channels, hidden sizes, vocabularies, positions
MAX_RESOLUTION = 16384
_DEPTHS = {"num_hidden_layers", "num_res_blocks", "transformer_depth", "num_heads", "num_attention_heads",
           "channel_mult", "ch_mult", "attention_resolutions"}
_SIGNED = {"num_head_channels", "clip_pad_token_id"}  # -1 / None mean "not used"
_ZERO_OK = {"adm_in_channels"}  # 0: no added conditions (all but SDXL)


def check_fields(obj, where: str, prefix: str = "", values: dict | None = None) -> None:
    """Every field of a config dataclass (nested ones too; `values` in place of its own, to check them before the
    dataclass is built from them) of its declared type and within bounds; a CorruptCheckpointError naming the field
    otherwise."""
    values = values or {}
    for f in dataclasses.fields(obj):
        name, value = prefix + f.name, values.get(f.name, getattr(obj, f.name))
        kind = (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))).replace(" ", "")
        if dataclasses.is_dataclass(value):
            check_fields(value, where, name + ".")
        elif kind in ("int", "int|None") and not (value is None and kind == "int|None"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise _bad(where, name, value, "not an integer")
            low = -1 if f.name in _SIGNED else 0 if f.name in _ZERO_OK else 1
            high = MAX_DEPTH if f.name in _DEPTHS else MAX_WIDTH
            if not low <= value <= high:
                raise _bad(where, name, value, f"outside [{low}, {high}]")
        elif kind == "int|tuple[int,...]":  # transformer_depth: one count, or one per level (SDXL: 0 = none there)
            counts = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_DEPTH for v in counts) \
                    or not 1 <= len(counts) <= 8:
                raise _bad(where, name, value, f"not 1 to 8 integers in [0, {MAX_DEPTH}]")
        elif kind == "tuple[int,...]":
            if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       and 1 <= v <= MAX_DEPTH for v in value):
                raise _bad(where, name, value, f"not a list of integers in [1, {MAX_DEPTH}]")
            if not 1 <= len(value) <= 8:
                raise _bad(where, name, value, "needs 1 to 8 levels")
        elif kind == "float":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise _bad(where, name, value, "not a finite number")
        elif kind in ("bool", "str") and not isinstance(value, {"bool": bool, "str": str}[kind]):
            raise _bad(where, name, value, f"not a {kind}")


def _bad(where: str, name: str, value, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: config {name}={value!r}: {why}")


def check_config(cfg: ModelConfig, where: str) -> None:
    """Types and bounds of every field (check_fields), and the sizes that must divide each other."""
    def bad(name: str, value, why: str):
        return _bad(where, name, value, why)

    check_fields(cfg, where)
    if cfg.resolution % 8 or not 8 <= cfg.resolution <= MAX_RESOLUTION:
        raise bad("resolution", cfg.resolution, f"not a multiple of 8 in [8, {MAX_RESOLUTION}]")
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise bad("prediction_type", cfg.prediction_type, "not epsilon or v_prediction")
    clip, unet, vae = cfg.clip, cfg.unet, cfg.vae
    if clip.hidden_size % clip.num_attention_heads:
        raise bad("clip.num_attention_heads", clip.num_attention_heads, f"does not divide {clip.hidden_size}")
    for part, groups, widths in (("unet", unet.norm_groups, [unet.model_channels * m for m in unet.channel_mult]),
                                 ("vae", vae.norm_groups, [vae.ch * m for m in vae.ch_mult])):
        if any(w % groups for w in widths):
            raise bad(f"{part}.norm_groups", groups, f"does not divide the widths {widths}")


def check_config_fits(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The sizes a stored config declares must be those its tensors have (read from their shapes, as for a file
    without a config): a mismatch is named here, before anything is built."""
    check_config(cfg, where)
    if cfg.family != "sd1":
        return  # the shapes of other families are read elsewhere; types and bounds are checked
    found = infer_sd1_config(shapes, where)
    wrong = []
    for part in ("unet", "vae", "clip"):
        declared, actual = getattr(cfg, part), getattr(found, part)
        for f in dataclasses.fields(actual):
            want, have = getattr(declared, f.name), getattr(actual, f.name)
            if f.name in ("num_heads", "num_attention_heads", "norm_groups", "hidden_act", "layer_norm_eps",
                          "num_head_channels", "position_embedding", "scale_factor"):
                continue  # not visible in shapes: the stored value is the only one
            if f.name == "attention_resolutions":
                want, have = sorted(want), sorted(have)
            if want != have:
                wrong.append(f"{part}.{f.name}={getattr(declared, f.name)!r} (tensors say {getattr(actual, f.name)!r})")
    if wrong:
        raise CorruptCheckpointError(f"{where}: its stored config does not match its tensors: " + "; ".join(wrong[:4]))
