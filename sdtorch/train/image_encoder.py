"""CLIP's image tower, a Vision Transformer (Dosovitskiy et al. 2021; Radford et al. 2021), for contrastive training.

Stable Diffusion never runs it: it is the other half of the CLIP objective that trains the text encoder. Attribute
names mirror Hugging Face's `CLIPVisionTransformer`, so its weights load into `transformers.CLIPModel` for testing.
"""
from dataclasses import dataclass

import torch
from torch import nn

from ..models.clip import CLIPEncoderLayer


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Field names as transformers' CLIPVisionConfig. Defaults: a tiny ViT for 64x64 images (8x8 patches)."""
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must divide into {self.num_attention_heads} heads")


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * cfg.hidden_size ** -0.5)
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, N, D), N = HW/p²
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, N + 1, D)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        # the text tower's layer without its causal mask: every patch attends to every patch
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal=False) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    """Images (B, 3, S, S) -> pooled features (B, D): the final-LayerNorm'ed class token."""

    def __init__(self, cfg: CLIPVisionConfig = CLIPVisionConfig()):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the reference's spelling
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")
        x = self.pre_layrnorm(self.embeddings(images))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])  # (B, N + 1, D) -> (B, D)
