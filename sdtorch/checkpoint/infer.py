"""What a checkpoint is, read from its keys and tensor shapes: the model family, and the config's sizes."""
import dataclasses
import re

import torch

from ..config import SDXL_FAMILIES, CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from ..models.stable_diffusion import PREFIXES, text_encoder_prefixes
from .errors import CheckpointError

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "the SDXL refiner", "sd3": "SD 3",
                "flux": "Flux",
                "vae": "a standalone VAE", "diffusers": "a diffusers-layout model (load its whole folder)",
                "lora": "a LoRA", "embedding": "a textual-inversion embedding", "unknown": "an unknown model"}

# (family, a key only that family has). First match wins: SDXL and SD 2.x also have model.diffusion_model.* keys.
FAMILY_MARKERS = [
    ("sdxl_refiner", re.compile(r"conditioner\.embedders\.0\.model\.")),  # bigG alone, as embedder 0
    ("sdxl", re.compile(r"conditioner\.embedders\.")),
    ("sd2", re.compile(r"cond_stage_model\.model\.")),  # OpenCLIP ViT-H: ...model.transformer.resblocks.*
    ("sd3", re.compile(r"(model\.diffusion_model\.)?joint_blocks\.")),
    ("flux", re.compile(r"(model\.diffusion_model\.)?double_blocks\.")),
    ("sd1", re.compile(r"model\.diffusion_model\.input_blocks\.")),
    ("vae", re.compile(r"(first_stage_model\.)?(encoder\.conv_in|decoder\.conv_out)\.")),
    ("diffusers", re.compile(r"(down_blocks|up_blocks|mid_block)\.\d")),
    ("lora", re.compile(r"lora_(unet|te)_|.*\.lora(_up|_down|_A|_B|\.up|\.down)\.")),
    ("embedding", re.compile(r"(string_to_param|emb_params|clip_[lg])$")),
]


def detect_family(keys) -> str:
    """'sd1' | 'sd2' | 'sdxl' | 'sdxl_refiner' | 'sd3' | 'flux' | 'vae' | 'diffusers' | 'lora' | 'embedding' |
    'unknown', from key names alone (FAMILY_NAMES says each in words)."""
    keys = list(keys)
    for family, marker in FAMILY_MARKERS:
        if any(marker.match(k) for k in keys):
            return family
    return "unknown"


def describe_keys(keys, limit: int = 5) -> str:
    """The first two dotted parts of a few distinct keys: what an unknown file holds, in a line."""
    heads = sorted({".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(heads[:limit]) + (f" (+{len(heads) - limit} more)" if len(heads) > limit else "") or "no tensors"


def infer_config(shapes: dict[str, tuple[int, ...]], family: str, where: str) -> ModelConfig:
    """`_infer_config`, where a tensor of the wrong rank or size for its name is a CheckpointError, not a crash."""
    try:
        return _infer_config(shapes, family, where)
    except (ValueError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: cannot work out the model's size: a tensor's shape does not fit "
                              f"{FAMILY_NAMES[family]} ({e})") from None


def _infer_config(shapes: dict[str, tuple[int, ...]], family: str, where: str) -> ModelConfig:
    """Sizes of a `family` model from its tensors' shapes (OpenCLIP towers already under our names). Head counts and
    norm groups leave no trace in shapes: they take the family's values (SD 1.x: 8 UNet heads; SD 2.x/SDXL: 64-wide
    UNet heads; 64-wide CLIP heads; 32 groups); our own files carry their config instead."""
    def part(prefix: str) -> _Shapes:
        return _Shapes({k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)},
                       f"{where}: cannot work out the model's size: {prefix}")
    unet = _unet(part(PREFIXES["unet"]))
    if family != "sd1":
        unet = dataclasses.replace(unet, num_head_channels=64)
    # OpenCLIP towers use exact GELU; SD 2.x's tokenizer pads with id 0 (A1111: id_pad = 0; SDXL's second tower's
    # does too, conditioning.tokenizers)
    clips = [_clip(part(prefix), openclip) for prefix, openclip in text_encoder_prefixes(family)]
    pad = 0 if family == "sd2" else None
    vae = _vae(part(PREFIXES["vae"]))
    sdxl = family in SDXL_FAMILIES
    if sdxl:  # SDXL's VAE was retrained with its own latent scale; its images are 1024² by default
        vae = dataclasses.replace(vae, scale_factor=0.13025)
    return ModelConfig(family=family, unet=unet, vae=vae, clip=clips[0], clip_2=clips[1] if len(clips) > 1 else None,
                       clip_pad_token_id=pad, resolution=1024 if sdxl else 512)


def infer_sd1_config(shapes: dict[str, tuple[int, ...]], where: str) -> ModelConfig:
    return infer_config(shapes, "sd1", where)


@torch.no_grad()
def sd2_predicts_v(unet) -> bool:
    """A1111's test for an SD 2.x file that says nothing of its parameterization (modules/sd_models_config.py): a
    768-v UNet, given a constant latent at t = 999, returns an output well below the input (v ≈ -x there), an ε UNet
    does not. One 8x8 forward pass."""
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, unet.config.context_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999.0], device=p.device), context)
    return (out.float() - x[:, :out.shape[1]].float()).mean().item() < -1


class _Shapes(dict):
    """Shapes of one part; a missing key is a CheckpointError that names it."""

    def __init__(self, shapes: dict, where: str):
        super().__init__(shapes)
        self.where = where

    def __missing__(self, key: str):
        raise CheckpointError(f"{self.where}{key} is missing")

    def indices(self, pattern: str) -> list[int]:
        """Sorted distinct values of the (\\d+) in `pattern` over all keys."""
        rx = re.compile(pattern)
        return sorted({int(m[1]) for k in self if (m := rx.match(k))})


def _unet(s: _Shapes) -> UNetConfig:
    mc, in_channels = s["input_blocks.0.0.weight"][:2]
    # with n res-blocks per level the downsamplers are input blocks (n+1)(i+1): the first gives n, their count the
    # number of levels
    downsamplers = s.indices(r"input_blocks\.(\d+)\.0\.op\.weight")
    n = downsamplers[0] - 1 if downsamplers else max(s.indices(r"input_blocks\.(\d+)\."))
    levels = len(downsamplers) + 1
    first_block = [(n + 1) * level + 1 for level in range(levels)]
    # blocks per transformer, level by level, 0 where a level has none (SDXL: 0, 2, 10); one number when all agree
    depths = [len(s.indices(rf"input_blocks\.{b}\.1\.transformer_blocks\.(\d+)\.")) for b in first_block]
    middle = len(s.indices(r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    return UNetConfig(
        in_channels=in_channels, out_channels=s["out.2.weight"][0], model_channels=mc,
        channel_mult=tuple(s[f"input_blocks.{b}.0.out_layers.3.weight"][0] // mc for b in first_block),
        num_res_blocks=n,
        attention_resolutions=tuple(2 ** level for level in reversed(range(levels)) if depths[level]),  # (4, 2, 1)
        transformer_depth=middle if set(depths) - {0} <= {middle} else tuple(depths),
        context_dim=s["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1],
        use_linear_in_transformer=len(s["middle_block.1.proj_in.weight"]) == 2,
        adm_in_channels=s["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in s else 0)


def _vae(s: _Shapes) -> VAEConfig:
    ch, in_channels = s["encoder.conv_in.weight"][:2]
    levels = len(s.indices(r"encoder\.down\.(\d+)\."))
    return VAEConfig(
        in_channels=in_channels, out_channels=s["decoder.conv_out.weight"][0], ch=ch,
        ch_mult=tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels)),
        num_res_blocks=len(s.indices(r"encoder\.down\.0\.block\.(\d+)\.")),
        z_channels=s["encoder.conv_out.weight"][0] // 2,  # the encoder outputs mean and log-variance
        embed_dim=s["quant_conv.weight"][0] // 2)


def _clip(s: _Shapes, openclip: bool = False) -> CLIPTextConfig:
    vocab, width = s["embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        hidden_act="gelu" if openclip else "quick_gelu",
        projection_dim=s["text_projection.weight"][0] if "text_projection.weight" in s else None,
        vocab_size=vocab, max_position_embeddings=s["embeddings.position_embedding.weight"][0], hidden_size=width,
        intermediate_size=s["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(s.indices(r"encoder\.layers\.(\d+)\.")),
        num_attention_heads=max(1, width // 64))  # OpenAI CLIP's text heads are 64 wide (ViT-L/14: 768 = 12 x 64)
