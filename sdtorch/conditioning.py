"""What the UNet is conditioned on, family by family: the one place where SD 1.x, SD 2.x and SDXL differ in use.

  SD 1.x  OpenAI CLIP ViT-L/14, last layer (A1111's "Clip skip" counts back from it), final LayerNorm: (1, 77k, 768)
  SD 2.x  OpenCLIP ViT-H/14, penultimate layer, final LayerNorm (ldm's FrozenOpenCLIPEmbedder, layer="penultimate");
          A1111 ignores "Clip skip" for it: (1, 77k, 1024)
  SDXL    ViT-L/14 and OpenCLIP ViT-bigG/14, both penultimate WITHOUT the final LayerNorm, concatenated on features:
          (1, 77k, 768 + 1280); plus y = [bigG's projected pooled text (1280), sin/cos embeddings (256 each) of the
          original size (h, w), crop top-left (top, left) and target size (h, w)] (Podell et al. 2023, sec. 2.2)
  SDXL refiner  ViT-bigG/14 alone, as SDXL uses it: (1, 77k, 1280); y = [pooled text (1280), embeddings of the
          original size, the crop, and an aesthetic score (A1111's defaults: 6 for the prompt, 2.5 for the negative)]
Prompts are split into chunks and weighted by each tower the same way (prompts.py); SDXL's pooled text is the first
chunk's, and an empty negative prompt is all zeros (A1111's force_zero_embeddings, diffusers'
force_zeros_for_empty_prompt).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SDXL_FAMILIES
from .models.unet import timestep_embedding
from .prompts import encode_prompt_pair

SIZE_EMBED_DIM = 256  # per number (sgm's ConcatTimestepEmbedderND outdim, diffusers' addition_time_embed_dim)
# the SDXL refiner's aesthetic-score conditions (A1111's sdxl_refiner_high/low_aesthetic_score options, diffusers'
# aesthetic_score/negative_aesthetic_score): trained on LAION aesthetic scores, high steers towards "beautiful"
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


@dataclass
class Conditioning:
    cond: torch.Tensor  # (1, L, D) context of the prompt
    uncond: torch.Tensor  # (1, L, D) of the negative prompt
    y: torch.Tensor | None = None  # (1, adm) SDXL's added conditions, prompt
    uncond_y: torch.Tensor | None = None  # negative prompt

    def denoiser_args(self, batch: int, device) -> dict:
        """The conditioning as CFGDenoiser keyword arguments, each repeated for `batch` images."""
        def rows(t):
            return t.expand(batch, *t.shape[1:]).to(device)
        args = {"cond": rows(self.cond), "uncond": rows(self.uncond)}
        if self.y is not None:
            args |= {"y": rows(self.y), "uncond_y": rows(self.uncond_y)}
        return args


class _Tower:
    """A CLIP tower with prompts.py's interface `text_encoder(ids, clip_skip) -> (k, 77, D)`, used as SDXL uses it:
    the penultimate layer without the final LayerNorm; the pooled text of the last call's rows is kept."""

    def __init__(self, clip):
        self.clip, self.pooled = clip, None

    def parameters(self):
        return self.clip.parameters()

    @property
    def embeddings(self):  # the token embedding that textual-inversion vectors stand in for
        return self.clip.embeddings

    def __call__(self, ids: torch.Tensor, clip_skip: int, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden, self.pooled = self.clip.hidden_and_pooled(ids, clip_skip=2, token_embeds=token_embeds)
        return hidden


def size_embedding(*groups) -> torch.Tensor:
    """SDXL's micro-conditioning numbers, e.g. (h, w), (top, left), (h, w) -> (1, 6·256): each number's own
    sinusoidal embedding (Vaswani et al. 2017, as the UNet's timesteps), cos first."""
    numbers = torch.tensor([n for group in groups for n in group], dtype=torch.float32)
    return timestep_embedding(numbers, SIZE_EMBED_DIM).reshape(1, -1)  # (6,) -> (6, 256) -> (1, 1536)


def sdxl_sizes(s) -> tuple:
    """Settings -> ((orig h, orig w), (crop top, crop left), (target h, target w)); A1111 conditions on the image's
    own size for both sizes and on crop (0, 0) (its sdxl_crop_top/left options)."""
    image = (s.height, s.width)
    sizes = tuple(s.original_size or image), tuple(s.crop_top_left), tuple(s.target_size or image)
    for name, pair in zip(("original_size", "crop_top_left", "target_size"), sizes, strict=True):
        if len(pair) != 2 or not all(isinstance(v, int) and v >= 0 for v in pair):
            raise ValueError(f"{name} must be two non-negative integers, got {pair!r}")
    return sizes


def size_params(s) -> dict:
    """SDXL's size conditions for the infotext, only where they differ from A1111's (which conditions on the image's
    size and crop 0, 0 and writes nothing): "Original size"/"Target size" as WxH like "Size", "Crop" as top,left."""
    def wxh(size):
        return None if size is None else f"{size[1]}x{size[0]}"
    return {"Original size": wxh(s.original_size), "Crop": None if tuple(s.crop_top_left) == (0, 0)
            else f"{s.crop_top_left[0]},{s.crop_top_left[1]}", "Target size": wxh(s.target_size)}


def tokenizers(config, tokenizer) -> tuple:
    """One tokenizer per text encoder: SDXL's bigG tower pads with 0 (OpenCLIP; A1111's id_pad, diffusers'
    tokenizer_2 pad "!"), its ViT-L tower with the end token like SD 1.x."""
    if config.family == "sdxl":
        return tokenizer, tokenizer.with_pad_token_id(0)
    return (tokenizer.with_pad_token_id(0),) if config.family == "sdxl_refiner" else (tokenizer,)


def encode_prompts(models, tokenizers, config, prompt: str, negative: str, clip_skip: int = 1,
                   sizes: tuple | None = None, embeddings=None) -> Conditioning:
    """The conditioning of (prompt, negative prompt) for `config.family`. `tokenizers`: one per text encoder.
    `sizes` (SDXL): ((orig h, orig w), (crop top, crop left), (target h, target w)). `embeddings`: an
    embeddings.EmbeddingMatcher for textual-inversion names (an SDXL embedding gives each tower its own vectors)."""
    towers = models.text_encoders
    if config.family == "sd1":
        return Conditioning(*encode_prompt_pair(towers[0], tokenizers[0], prompt, negative, clip_skip=clip_skip,
                                                embeddings=embeddings))
    if config.family == "sd2":  # the penultimate layer, normed, whatever the clip skip (A1111's OpenCLIP hijack)
        return Conditioning(*encode_prompt_pair(towers[0], tokenizers[0], prompt, negative, clip_skip=2,
                                                embeddings=embeddings))
    if config.family not in SDXL_FAMILIES:
        raise ValueError(f"unknown model family {config.family!r}")
    contexts, pooled = [], None
    for clip, tokenizer in zip(towers, tokenizers, strict=True):
        tower = _Tower(clip)
        matcher = embeddings.with_width(clip.config.hidden_size) if embeddings is not None else None
        contexts.append(encode_prompt_pair(tower, tokenizer, prompt, negative, embeddings=matcher))
        pooled = tower.pooled  # the last tower's (bigG's): rows of the prompt's chunks, then the negative's
    cond, uncond = (torch.cat(parts, dim=-1) for parts in zip(*contexts, strict=True))  # 2 × (1, 77k, 768 + 1280)
    k = cond.shape[1] // tokenizers[0].model_max_length
    pooled_cond, pooled_uncond = pooled[0:1], pooled[k:k + 1]  # each prompt's first chunk
    if negative == "":
        uncond, pooled_uncond = torch.zeros_like(uncond), torch.zeros_like(pooled_uncond)
    original_size, crop, target_size = sizes
    if config.family == "sdxl":
        numbers = size_embedding(original_size, crop, target_size)
        numbers_uncond = numbers
    else:  # the refiner: an aesthetic score where the base has the target size, the negative prompt's low
        numbers = size_embedding(original_size, crop, (AESTHETIC_SCORE,))
        numbers_uncond = size_embedding(original_size, crop, (NEGATIVE_AESTHETIC_SCORE,))
    return Conditioning(cond, uncond, torch.cat([pooled_cond, numbers.to(pooled.device, pooled.dtype)], dim=1),
                        torch.cat([pooled_uncond, numbers_uncond.to(pooled.device, pooled.dtype)], dim=1))
