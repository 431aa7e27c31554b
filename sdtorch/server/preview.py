"""The live preview: the running step's latent as a picture, cheap enough to make while the worker samples.

The sampler's x at noise level σ is x_0 + σ·ε. SD's scale factor gives the latents about unit variance, so the
Wiener estimate E[x_0 | x] = x / (1 + σ²) (a unit Gaussian prior) shows the picture fading in, not colour noise.

- Small VAEs (the built-in model's decoder has 0.6 M parameters: ~12 ms for 64x64) decode that estimate in full.
- Large ones (SD 1.5: ~10 s at 512² on a CPU, which would steal the worker's cores) use A1111's "Approx cheap" idea:
  one linear map per latent pixel, 4 channels + bias -> RGB. Its matrix is fitted to whichever VAE is loaded, once:
  least squares from the latents of 16 procedural shapes images (sdtorch.train.shapes: flat colours and sharp
  edges) to the mean colour of the 8x8 pixels each latent pixel covers. Random colour patches would do for SD's VAE,
  but the built-in VAE only knows the shapes' palette (its round trip of random colours is off by 51/255).
"""
from __future__ import annotations

import io

import torch

from .. import images as imgs

FULL_DECODE_MAX_PARAMETERS = 5_000_000
IMAGES = 16  # 64x64 each: a fraction of a second to encode even for SD 1.5


@torch.no_grad()
def fit_latent_to_rgb(pipe, seed: int = 0) -> torch.Tensor:
    """(C+1, 3) matrix W with [latent, 1] @ W ≈ the mean colour in [-1, 1] of the 8x8 pixels under a latent pixel."""
    from ..train.shapes import example

    images = torch.cat([imgs.pil_to_tensor(example(seed, i)[0]) for i in range(IMAGES)])  # (N, 3, 64, 64)
    latents = pipe.encode_image(images).float().cpu()  # (N, C, 8, 8), scaled as the sampler sees them
    x = torch.cat([latents, torch.ones_like(latents[:, :1])], 1).permute(0, 2, 3, 1).flatten(0, 2)  # (N·64, C+1)
    y = torch.nn.functional.avg_pool2d(images, 8).permute(0, 2, 3, 1).flatten(0, 2)  # (N·64, 3)
    return torch.linalg.lstsq(x, y).solution


def linear_rgb(latents: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, h, w) colours in [-1, 1] through the fitted map."""
    x = torch.cat([latents, torch.ones_like(latents[:, :1])], 1).permute(0, 2, 3, 1)  # (B, h, w, C+1)
    return (x @ weights).permute(0, 3, 1, 2).clamp(-1, 1)


class Previewer:
    """Makes the preview PNG of one pipeline's running latent (first image of the batch)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.full = sum(p.numel() for p in pipe.vae.decoder.parameters()) <= FULL_DECODE_MAX_PARAMETERS
        self.weights = None

    @torch.no_grad()
    def png(self, latents: torch.Tensor, sigma: float) -> bytes:
        x0 = latents[:1].float() / (1 + float(sigma) ** 2)
        if self.full:
            pixels = self.pipe.decode_latents(x0)
        else:
            if self.weights is None:
                self.weights = fit_latent_to_rgb(self.pipe)
            pixels = linear_rgb(x0.cpu(), self.weights)
        buffer = io.BytesIO()
        imgs.tensor_to_pil(pixels)[0].save(buffer, format="PNG")
        return buffer.getvalue()
