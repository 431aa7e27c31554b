"""Model sizes as plain dataclasses.

SD 1.x, SD 2.x and the project's own small models are configurations of the same classes, never copies.
Field names follow the original LDM/CompVis configs (`model_channels`, `channel_mult`, `attention_resolutions`, ...)
so a reader can hold them next to `v1-inference.yaml`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer (Radford et al. 2021). Defaults: OpenAI ViT-L/14's text tower, used by SD 1.x."""
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP, SD 2.x)
    layer_norm_eps: float = 1e-5
    # OpenCLIP's `text_projection` (no bias) from the pooled end-of-text state to the joint embedding; None: absent.
    # SDXL conditions its UNet on ViT-bigG's projected pooled text; SD 2.x files carry ViT-H's but never use it.
    projection_dim: int | None = None


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (Rombach et al. 2022, sec. 3). Defaults: SD 1.x/2.x's f=8, 4-channel autoencoder."""
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per resolution level; len-1 stride-2 downsamples
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215  # latents are multiplied by this so they have ~unit variance (SD paper, sec. 4.3.2)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """The denoising UNet (Ho et al. 2020; Rombach et al. 2022). Defaults: SD 1.x."""
    in_channels: int = 4  # 9 for inpainting models: latent + mask + masked-image latent
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors ("ds") that get a spatial transformer
    num_heads: int = 8  # used when num_head_channels == -1 (SD 1.x: 8 heads whatever the width)
    num_head_channels: int = -1  # SD 2.x: 64 channels per head, heads = width / 64
    transformer_depth: int | tuple[int, ...] = 1  # blocks per spatial transformer; SDXL: one count per level
    context_dim: int = 768
    # SDXL's "added conditions" (LDM's `adm`): a vector y of this width (pooled text + embedded size/crop numbers)
    # goes through its own MLP (`label_emb`) and is added to the time embedding; 0: no such input
    adm_in_channels: int = 0
    use_linear_in_transformer: bool = False  # SD 2.x: proj_in/proj_out are Linear instead of 1x1 conv
    # Not in SD: fixed 2D sinusoidal positions added to each transformer's tokens, so that a feature knows where in
    # the image it is and "on the left" can bind to the left (the built-in model's two-shape captions). No weights.
    position_embedding: bool = False
    norm_groups: int = 32

    def depth(self, level: int | None = None) -> int:
        """Transformer blocks at a level (None: the middle block, which has the deepest level's count)."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[-1 if level is None else level]

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of the transformer at a level of this width."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one Stable Diffusion model and run its diffusion process."""
    # "sd1" | "sd2" | "sdxl" | "sdxl_refiner": which text encoders and conditioning (sdtorch/conditioning.py)
    family: str = "sd1"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    clip_2: CLIPTextConfig | None = None  # SDXL's second text encoder (OpenCLIP ViT-bigG/14)
    prediction_type: str = "epsilon"  # one of diffusion.schedule.PREDICTION_TYPES
    clip_pad_token_id: int | None = None  # None: pad with <|endoftext|> as SD 1.x does
    resolution: int = 512  # the image side the model was trained at: the default width and height

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        def build(klass, values):
            values = dict(values)
            for f in dataclasses.fields(klass):
                if isinstance(values.get(f.name), list):
                    values[f.name] = tuple(values[f.name])
            known = {f.name for f in dataclasses.fields(klass)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {klass.__name__} fields: {sorted(unknown)}")
            return klass(**values)

        d = dict(d)
        parts = {"unet": UNetConfig, "vae": VAEConfig, "clip": CLIPTextConfig, "clip_2": CLIPTextConfig}
        for name, klass in parts.items():
            if d.get(name) is not None:
                d[name] = build(klass, d[name])
        return build(cls, d)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


SD1 = ModelConfig()
SD2_UNET = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
# OpenCLIP ViT-H/14's text tower (Cherti et al. 2023, LAION-2B): SD 2.x conditions on its penultimate layer
OPENCLIP_VIT_H = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                hidden_act="gelu", projection_dim=1024)
# SD 2.x (v2-inference.yaml / v2-inference-v.yaml): the 512 model predicts ε, the 768 one v; OpenCLIP pads with 0
SD2 = ModelConfig(family="sd2", unet=SD2_UNET, clip=OPENCLIP_VIT_H, clip_pad_token_id=0)
SD2_768_V = SD2.replace(prediction_type="v_prediction", resolution=768)
# SDXL 1.0 base (Podell et al. 2023; sgm's sd_xl_base.yaml): no attention at the full-resolution level, 2 and 10
# transformer blocks below it, a 2048-wide context (ViT-L 768 + ViT-bigG 1280), added conditions y of 1280 (pooled
# bigG text) + 6·256 (size/crop numbers), and a VAE of the same shape retrained with latents scaled by 0.13025
OPENCLIP_VIT_BIGG = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
SDXL_UNET = UNetConfig(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_head_channels=64,
                       transformer_depth=(0, 2, 10), context_dim=2048, use_linear_in_transformer=True,
                       adm_in_channels=2816)
SDXL = ModelConfig(family="sdxl", unet=SDXL_UNET, vae=VAEConfig(scale_factor=0.13025), clip=CLIPTextConfig(),
                   clip_2=OPENCLIP_VIT_BIGG, resolution=1024)
# SDXL 1.0 refiner (sgm's sd_xl_refiner.yaml): trained on the low-noise part of the schedule, to finish what the base
# began; 384 wide, four levels with 4 transformer blocks at the middle two, conditioned on bigG alone (a 1280-wide
# context) and y = pooled bigG text (1280) + 5·256 (original size, crop, and an aesthetic score in place of the size)
SDXL_REFINER_UNET = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2),
                               num_head_channels=64, transformer_depth=4, context_dim=1280,
                               use_linear_in_transformer=True, adm_in_channels=2560)
# the families in SDXL's latent space, conditioned on its size numbers (SDXL_FAMILIES: where a check says "SDXL")
SDXL_FAMILIES = ("sdxl", "sdxl_refiner")
SDXL_REFINER = ModelConfig(family="sdxl_refiner", unet=SDXL_REFINER_UNET, vae=VAEConfig(scale_factor=0.13025),
                           clip=OPENCLIP_VIT_BIGG, resolution=1024)
