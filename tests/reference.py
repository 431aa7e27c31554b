"""Carry our weights to the reference implementations (diffusers / transformers) with *their* converters.

The UNet and VAE go through `diffusers.loaders.single_file_utils` exactly as diffusers loads a single-file SD
checkpoint; our state dict keys ARE that checkpoint layout, so no mapping of ours is involved.
"""
import torch

from sdtorch.config import ModelConfig
from sdtorch.models.stable_diffusion import PREFIXES


def ldm_original_config(cfg: ModelConfig) -> dict:
    """The `v1-inference.yaml`-shaped dict diffusers' converters read, written from our config."""
    u, v = cfg.unet, cfg.vae
    unet_params = {
        "in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions), "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult), "transformer_depth": u.transformer_depth,
        "context_dim": u.context_dim, "use_linear_in_transformer": u.use_linear_in_transformer,
    }
    if u.num_head_channels == -1:
        unet_params["num_heads"] = u.num_heads
    else:
        unet_params["num_head_channels"] = u.num_head_channels
    ddconfig = {"in_channels": v.in_channels, "out_ch": v.out_channels, "ch": v.ch, "ch_mult": list(v.ch_mult),
                "num_res_blocks": v.num_res_blocks, "z_channels": v.z_channels}
    return {"model": {"params": {
        "scale_factor": v.scale_factor,
        "unet_config": {"params": unet_params},
        "first_stage_config": {"params": {"ddconfig": ddconfig, "embed_dim": v.embed_dim}},
    }}}


def diffusers_unet(checkpoint: dict, cfg: ModelConfig):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(ldm_original_config(cfg), checkpoint, image_size=64)
    config["norm_num_groups"] = cfg.unet.norm_groups
    if cfg.unet.num_head_channels != -1 and not cfg.unet.use_linear_in_transformer:
        config["attention_head_dim"] = [m * cfg.unet.model_channels // cfg.unet.num_head_channels
                                        for m in cfg.unet.channel_mult]
    model = UNet2DConditionModel(**config)
    model.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return model.eval()


def diffusers_vae(checkpoint: dict, cfg: ModelConfig):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config = create_vae_diffusers_config_from_ldm(ldm_original_config(cfg), checkpoint, image_size=256)
    config["norm_num_groups"] = cfg.vae.norm_groups
    model = AutoencoderKL(**config)
    model.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return model.eval()


def transformers_clip(checkpoint: dict, cfg: ModelConfig):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    c = cfg.clip
    config = CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                            max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
                            layer_norm_eps=c.layer_norm_eps, attn_implementation="eager")
    model = CLIPTextModel(config)
    state = convert_ldm_clip_checkpoint(checkpoint)  # -> "text_model.*", the transformers<5.6 layout
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state.pop("embeddings.position_ids", None)
    model.load_state_dict(state, strict=True)
    return model.eval()


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values, including norms and biases (default init leaves those at 1/0,
    which would hide a swapped weight/bias or a missing norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") or "layer_norm" in name \
                    and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() <= 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return module


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: relative to the output's scale, so near-zero entries don't dominate."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def prefixed(part: str, state: dict) -> dict:
    return {PREFIXES[part] + k: v for k, v in state.items()}
