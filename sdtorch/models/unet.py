"""The denoising UNet of Stable Diffusion (Ho et al. 2020; Rombach et al. 2022, sec. 3.3).

ε_θ(x_t, t, c): a noised latent, its timestep and the text context -> the predicted noise (or v). Module names
mirror the original `ldm.modules.diffusionmodules.openaimodel.UNetModel`, so checkpoints load by prefix
(`model.diffusion_model.*`): input_blocks / middle_block / output_blocks, each block a list of layers.
"""
import math

import torch
from torch import nn

from ..config import UNetConfig
from .attention import BasicTransformerBlock
from .norm import GroupNorm32
from .stored import compute_dtype
from .upsample import Upsample


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of each sample's own timestep (Vaswani et al. 2017, sec. 3.5): (B,) -> (B, dim),
    cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_embedding_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sinusoidal positions (Vaswani et al. 2017, one half of the channels per axis as in ViT/MAE): (h·w, dim)
    for a row-major h x w grid; the first half encodes the row, the second the column. Positions are the cells'
    centres as fractions of the side (x 32), so "on the left" means the same at every image size."""
    rows = timestep_embedding((torch.arange(h, device=device) + 0.5) * (32 / h), dim // 2)  # (h, dim/2)
    cols = timestep_embedding((torch.arange(w, device=device) + 0.5) * (32 / w), dim - dim // 2)  # (w, dim/2)
    return torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1).reshape(h * w, dim)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, plus a skip (1x1 conv when widths differ)."""

    def __init__(self, cfg: UNetConfig, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(cfg.norm_groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(cfg.norm_groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)  # (B, C) -> (B, C, 1, 1), per-sample time
        return self.skip_connection(x) + self.out_layers(h)


class SpatialTransformer(nn.Module):
    """Transformer over the H·W positions of a feature map, cross-attending to the text context."""

    def __init__(self, cfg: UNetConfig, channels: int, depth: int, downsample: int = 1):
        super().__init__()
        heads, dim_head = cfg.heads_and_dim(channels)
        self.downsample = downsample  # the latent's size / this level's (token merging acts where it is 1)
        self.linear = cfg.use_linear_in_transformer
        self.position_embedding = cfg.position_embedding
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if self.linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, dim_head, cfg.context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H·W, C)
        if self.linear:
            tokens = self.proj_in(tokens)
        if self.position_embedding:
            tokens = tokens + position_embedding_2d(h, w, c, tokens.device).to(tokens.dtype)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, (h, w))
        if self.linear:
            tokens = self.proj_out(tokens)
        tokens = tokens.transpose(1, 2).reshape(b, c, h, w)  # (B, H·W, C) -> (B, C, H, W)
        if not self.linear:
            tokens = self.proj_out(tokens)
        return x + tokens


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.ModuleList):
    """One UNet block: layers applied in order, each given what it needs (time embedding, text context, or nothing)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                up_size: torch.Size | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        mc = cfg.model_channels
        emb_ch = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.adm_in_channels:  # SDXL: y (B, adm) -> (B, 4·mc), added to the time embedding (keys label_emb.0.*)
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(),
                                                         nn.Linear(emb_ch, emb_ch)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]  # widths of the activations the down path hands to the up path
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(cfg, ch, emb_ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(cfg, ch, cfg.depth(level), ds))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            [ResBlock(cfg, ch, emb_ch, ch), SpatialTransformer(cfg, ch, cfg.depth(), ds),
             ResBlock(cfg, ch, emb_ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(cfg, ch + skip_channels.pop(), emb_ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(cfg, ch, cfg.depth(level), ds))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(GroupNorm32(cfg.norm_groups, ch), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.feature_cache = None  # set by deep_cache() for one sampling run

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> None:
        cfg = self.config
        if (y is None) != (not cfg.adm_in_channels):
            raise ValueError(f"this UNet takes y (B, {cfg.adm_in_channels})" if cfg.adm_in_channels
                             else "this UNet takes no y (it has no added conditions)")
        if y is not None and y.shape != (x.shape[0], cfg.adm_in_channels):
            raise ValueError(f"UNet expects y ({x.shape[0]}, {cfg.adm_in_channels}), got {tuple(y.shape)}")
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet expects latents (B, {cfg.in_channels}, h, w), got {tuple(x.shape)}")
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            raise ValueError(f"UNet expects context (B={x.shape[0]}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected one timestep per sample, shape ({x.shape[0]},), got {tuple(t.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, h, w) noised latents, t (B,) timesteps (one per sample, may be fractional), context (B, L, D);
        y (B, adm_in_channels) the added conditions of UNets that have them (SDXL)."""
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        self.check_inputs(x, t, context, y)
        dtype = compute_dtype(self.time_embed[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))  # (B,) -> (B, 4·mc)
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        h = x.to(dtype)
        cache = self.feature_cache  # DeepCache (deep_cache.py): None = off
        cached = cache.reuse(x, t) if cache is not None else None  # a partial evaluation resumes from this
        skips = []
        for block in self.input_blocks[:cache.depth + 1] if cached is not None else self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context) if cached is None else cached
        for block in self.output_blocks[len(self.output_blocks) - len(skips):]:
            if cache is not None and cached is None and len(skips) == cache.depth + 1:
                cache.keep(x, h)  # the up path where the shallow branch joins it
            h = torch.cat([h, skips.pop()], dim=1)  # U-Net skip: concatenate on channels
            h = block(h, emb, context, up_size=skips[-1].shape[2:] if skips else None)
        return self.out(h)
