"""Tiled VAE encode/decode: large images in overlapping tiles, blended with linear ramps so no seams show.

Memory then grows with the tile, not the image. Each tile is computed on its own, so its GroupNorm statistics are the
tile's (as in diffusers' `enable_vae_tiling`): a tiled result differs slightly from the untiled one, less so the
larger the tiles, and the overlap ramps keep tile borders from showing as seams.
"""
import torch

from .models.vae import DiagonalGaussian


def _ramp(length: int, overlap: int, device) -> torch.Tensor:
    """1D blend weights: rising over the first `overlap` samples, falling over the last, 1 in between."""
    i = torch.arange(length, device=device, dtype=torch.float32)
    if overlap <= 0:
        return torch.ones(length, device=device)
    return torch.minimum(torch.ones_like(i), torch.minimum((i + 0.5) / overlap, (length - i - 0.5) / overlap))


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]  # the last tile ends exactly at the border


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float, out_channels: int) -> torch.Tensor:
    """Apply `fn` (B, C, h, w) -> (B, out_channels, h·scale, w·scale) tile by tile over x and blend the results."""
    b, _, h, w = x.shape
    stride = tile - overlap
    out = None
    weight = None
    for top in _starts(h, tile, stride):
        for left in _starts(w, tile, stride):
            piece = fn(x[:, :, top:top + tile, left:left + tile]).float()
            if out is None:
                out = torch.zeros(b, out_channels, int(h * scale), int(w * scale), device=piece.device)
                weight = torch.zeros(1, 1, out.shape[2], out.shape[3], device=piece.device)
            ph, pw = piece.shape[2:]
            o = int(overlap * scale)
            wgt = _ramp(ph, o, piece.device)[:, None] * _ramp(pw, o, piece.device)[None, :]  # (ph, pw)
            oy, ox = int(top * scale), int(left * scale)  # the tile's corner in the output
            out[:, :, oy:oy + ph, ox:ox + pw] += piece * wgt
            weight[:, :, oy:oy + ph, ox:ox + pw] += wgt
    return out / weight


def decode_tiled(vae, z: torch.Tensor, tile: int = 64, overlap: int = 32) -> torch.Tensor:
    """(B, 4, h, w) latents -> (B, 3, 8h, 8w) images. The latent-resolution part (with the mid-block attention, which
    sees the whole image) runs once on everything; the memory-hungry upsampling path runs on tile×tile tiles."""
    f = vae.config.downsample_factor
    dec = vae.decoder
    h = dec.mid(dec.conv_in(vae.post_quant_conv(z)))
    return tiled(dec.upsample, h, tile, overlap, f, vae.config.out_channels)


def encode_tiled(vae, image: torch.Tensor, tile: int = 512, overlap: int = 256) -> torch.Tensor:
    """(B, 3, H, W) images -> (B, 4, H/8, W/8) posterior means: the full-resolution downsampling path on tile×tile
    pixel tiles, then the latent-resolution part (mid-block attention) once on everything."""
    cfg = vae.config
    enc = vae.encoder
    h = tiled(enc.downsample, image, tile, overlap, 1 / cfg.downsample_factor, cfg.ch * cfg.ch_mult[-1])
    return DiagonalGaussian(vae.quant_conv(enc.head(h))).mean
