"""The KL-regularized autoencoder of Latent Diffusion (Rombach et al. 2022, sec. 3): images <-> latents.

Module names mirror the original `ldm.modules.diffusionmodules.model` so checkpoints load by prefix
(`first_stage_model.*`). The encoder maps (B, 3, H, W) in [-1, 1] to a diagonal Gaussian over (B, 4, H/8, W/8).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .attention import attention
from .norm import GroupNorm32
from .upsample import Upsample


def _norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return GroupNorm32(cfg.norm_groups, channels, eps=1e-6)


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a fresh tensor, in place where no gradient is needed: at 512² a decoder activation is 134-268 MB."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(cfg, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(cfg, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(_silu(self.norm2(h)))
        if torch.is_grad_enabled():
            return self.nin_shortcut(x) + h
        return h.add_(self.nin_shortcut(x))  # the same sum, without a third full-size tensor


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, with 1x1-conv projections."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, C, H, W) -> (B, H·W, C)
        q, k, v = (p(n).flatten(2).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = attention(q, k, v, heads=1)  # (B, H·W, C)
        if x.is_contiguous(memory_format=torch.channels_last):  # stay channels-last: (B, H, W, C) is that, as a view
            out = out.view(b, h, w, c).permute(0, 3, 1, 2)
        else:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original pads right and bottom only (asymmetric), then a padding-0 stride-2 conv; padding=1 would shift
        # the latent grid by half a pixel per level (the "8-pixel shift" bug of some reimplementations).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            block_out = cfg.ch * mult
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(cfg, block_in, block_out))
                block_in = block_out
            stage.attn = nn.ModuleList()  # SD's autoencoder has no attention inside the resolution levels
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = MidBlock(cfg, block_in)
        self.norm_out = _norm(cfg, block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.downsample(x))

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution part, before the (global) mid-block attention: what tiled encoding splits into tiles."""
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)  # (B, C, H, W) -> (B, C, H/2, W/2)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Latent resolution: mid block with attention over all positions, then the Gaussian's moments."""
        return self.conv_out(_silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(cfg, block_in)
        # Stored lowest-resolution-last (up[0] is the full-resolution stage), applied in reverse, as the original.
        up = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[level]
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(cfg, block_in, block_out))
                block_in = block_out
            stage.attn = nn.ModuleList()
            if level != 0:
                stage.upsample = Upsample(block_in)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cfg, block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.mid(self.conv_in(z)))

    def upsample(self, h: torch.Tensor) -> torch.Tensor:
        """The full-resolution part, after the (global) mid-block attention: what tiled decoding splits into tiles."""
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv_out(_silu(self.norm_out(h)))


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), the VAE posterior (Kingma & Welling 2014)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as the original: keeps exp() finite

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device="cpu" if generator is None
                            else generator.device, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        return gaussian_kl(self.mean, self.logvar)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over latent dimensions (Kingma & Welling 2014, app. B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """(B, 3, H, W) image in [-1, 1] -> posterior over (B, 4, H/8, W/8) unscaled latents."""
        f = self.config.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected an image batch (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {x.shape[2]}x{x.shape[3]}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) unscaled latents -> (B, 3, 8h, 8w) image, roughly in [-1, 1]."""
        if z.dim() != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"expected latents (B, {self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))
