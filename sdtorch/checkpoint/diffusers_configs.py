"""Our config dataclasses <-> the JSON configs of a diffusers folder (unet/, vae/, text_encoder/, scheduler/)."""
from ..config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from .errors import CheckpointError, UnsupportedModelError

# The diffusers config format we write; every diffusers release since 0.14 (the attention renames) reads it.
DIFFUSERS_FORMAT_VERSION = "0.30.0"


def unet_from_diffusers(d: dict, where: str) -> UNetConfig:
    """UNet2DConditionModel's config.json -> UNetConfig, refusing the features SD 1.x/2.x/SDXL have not got."""
    for feature in ("addition_embed_type", "class_embed_type", "encoder_hid_dim", "time_cond_proj_dim"):
        if d.get(feature) is not None and (feature, d[feature]) != ("addition_embed_type", "text_time"):
            raise UnsupportedModelError(f"{where}: not supported yet: a UNet with {feature}={d[feature]!r}")
    # SDXL's "text_time": pooled text + embedded time ids, 256 wide each as sgm has them
    if d.get("addition_embed_type") == "text_time" and d.get("addition_time_embed_dim", 256) != 256:
        raise UnsupportedModelError(f"{where}: not supported yet: addition_time_embed_dim "
                                    f"{d['addition_time_embed_dim']}")
    widths = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    mc = widths[0]
    if any(w % mc for w in widths):
        raise CheckpointError(f"{where}: block_out_channels {widths} are not multiples of the first")
    if not isinstance(d.get("layers_per_block", 2), int):
        raise UnsupportedModelError(f"{where}: not supported yet: a different layers_per_block per level")
    down = d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    # diffusers' SD configs put the number of HEADS in `attention_head_dim` (a misnomer it keeps for compatibility);
    # `num_attention_heads`, when set, is the same thing under its right name
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    if len(set(heads)) == 1:
        num_heads, num_head_channels = heads[0], -1  # SD 1.x: 8 heads at every width
    else:
        per_head = {w // h for w, h in zip(widths, heads, strict=True)}
        if len(per_head) != 1:
            raise UnsupportedModelError(f"{where}: not supported yet: heads {heads} for widths {widths}")
        num_heads, num_head_channels = 8, per_head.pop()  # SD 2.x: 64 channels per head
    depth = d.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        # diffusers gives levels without attention a depth too; ours is 0 there, as the single file's shapes say
        depths = [n if kind.startswith("CrossAttn") else 0 for n, kind in zip(depth, down, strict=True)]
        nonzero = set(depths) - {0}
        depth = nonzero.pop() if len(nonzero) == 1 else tuple(depths)
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(w // mc for w in widths), num_res_blocks=d.get("layers_per_block", 2),
        attention_resolutions=tuple(2 ** i for i, kind in reversed(list(enumerate(down)))
                                    if kind.startswith("CrossAttn")),
        num_heads=num_heads, num_head_channels=num_head_channels, transformer_depth=depth,
        context_dim=d.get("cross_attention_dim", 1280), use_linear_in_transformer=d.get("use_linear_projection", False),
        norm_groups=d.get("norm_num_groups", 32),
        adm_in_channels=d.get("projection_class_embeddings_input_dim") or 0 if d.get("addition_embed_type") else 0)


def unet_to_diffusers(u: UNetConfig) -> dict:
    if u.position_embedding:
        raise UnsupportedModelError("diffusers' UNet2DConditionModel has no position embedding: this model (such as "
                                    "the built-in one) has no diffusers form; keep it as a single file")
    widths = [u.model_channels * m for m in u.channel_mult]
    levels = len(widths)
    heads = [u.heads_and_dim(w)[0] for w in widths]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "act_fn": "silu", "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "block_out_channels": widths, "center_input_sample": False, "cross_attention_dim": u.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if 2 ** i in u.attention_resolutions else "DownBlock2D"
                             for i in range(levels)],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,  # our timestep embedding: cos first
        "in_channels": u.in_channels, "layers_per_block": u.num_res_blocks, "mid_block_scale_factor": 1,
        "norm_eps": 1e-5, "norm_num_groups": u.norm_groups, "out_channels": u.out_channels, "sample_size": 64,
        "transformer_layers_per_block": u.transformer_depth if isinstance(u.transformer_depth, int)
        else [max(1, n) for n in u.transformer_depth],  # diffusers wants a depth even where there is no attention
        "up_block_types": ["CrossAttnUpBlock2D" if 2 ** (levels - 1 - i) in u.attention_resolutions else "UpBlock2D"
                           for i in range(levels)],
        "use_linear_projection": u.use_linear_in_transformer,
        **({"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": u.adm_in_channels} if u.adm_in_channels else {}),
    }


def vae_from_diffusers(d: dict, where: str) -> VAEConfig:
    """AutoencoderKL's config.json -> VAEConfig."""
    if not d.get("use_quant_conv", True) or not d.get("use_post_quant_conv", True) \
            or not d.get("mid_block_add_attention", True):
        raise UnsupportedModelError(f"{where}: not supported yet: an autoencoder without quant convs or mid attention")
    widths = list(d.get("block_out_channels", (64,)))
    ch = widths[0]
    latent = d.get("latent_channels", 4)
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), ch=ch,
                     ch_mult=tuple(w // ch for w in widths), num_res_blocks=d.get("layers_per_block", 1),
                     z_channels=latent, embed_dim=latent, norm_groups=d.get("norm_num_groups", 32),
                     scale_factor=d.get("scaling_factor", 0.18215))


def vae_to_diffusers(v: VAEConfig) -> dict:
    if v.z_channels != v.embed_dim:
        raise ValueError(f"diffusers' AutoencoderKL has one latent_channels; this VAE has z_channels={v.z_channels} "
                         f"and embed_dim={v.embed_dim}")
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_FORMAT_VERSION, "act_fn": "silu",
        "block_out_channels": [v.ch * m for m in v.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult), "in_channels": v.in_channels,
        "out_channels": v.out_channels, "latent_channels": v.z_channels, "layers_per_block": v.num_res_blocks,
        "norm_num_groups": v.norm_groups, "sample_size": 512, "scaling_factor": v.scale_factor,
    }


CLIP_FIELDS = ("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "hidden_act", "layer_norm_eps")


def clip_from_transformers(d: dict, projected: bool = False) -> CLIPTextConfig:
    """transformers' CLIPTextConfig JSON -> ours (fields missing from the JSON take transformers' defaults,
    which are OpenAI's ViT-L/14 text tower but for the width); `projected`: a CLIPTextModelWithProjection's."""
    defaults = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8}
    return CLIPTextConfig(**{f: d.get(f, defaults.get(f, getattr(CLIPTextConfig, f))) for f in CLIP_FIELDS},
                          projection_dim=d.get("projection_dim", 512) if projected else None)


def clip_to_transformers(c: CLIPTextConfig, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> dict:
    projected = c.projection_dim is not None  # SDXL's bigG: CLIPTextModelWithProjection
    return {"architectures": ["CLIPTextModelWithProjection" if projected else "CLIPTextModel"],
            "model_type": "clip_text_model", "dtype": "float32",
            **{f: getattr(c, f) for f in CLIP_FIELDS}, "attention_dropout": 0.0, "dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02, "projection_dim": c.projection_dim or 768,
            "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}


def scheduler_config(prediction_type: str, family: str = "sd1") -> dict:
    """SD's training schedule (Rombach et al. 2022, v1-inference.yaml; the same for SD 2.x and SDXL) as the scheduler
    config the releases ship: PNDM for SD 1.x/2.x, Euler for SDXL."""
    config = {"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
              "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
              "trained_betas": None, "prediction_type": prediction_type}
    if family == "sdxl":
        config |= {"_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                   "timestep_spacing": "leading", "use_karras_sigmas": False}
    return config


def model_index(cfg: ModelConfig) -> dict:
    if cfg.family == "sdxl":
        return {"_class_name": "StableDiffusionXLInpaintPipeline" if cfg.unet.in_channels == 9
                else "StableDiffusionXLPipeline", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
                "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None],
                "image_encoder": [None, None], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"]}
    pipeline = "StableDiffusionInpaintPipeline" if cfg.unet.in_channels == 9 else "StableDiffusionPipeline"
    return {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}
