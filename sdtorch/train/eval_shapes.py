"""Evaluate a model on the shapes task by pixel analysis, never by the model itself.

Captions come from a seed the training never used; each generated image is scored by `shapes_score.score` (background
colour from the border, shape colour, kind, 3x3 cell and size from the pixels). The VAE is scored separately by the
PSNR of its reconstructions of the ground-truth renders of the same captions.
"""
import math
import time

import numpy as np
import torch

from ..images import pil_to_tensor
from .shapes import example
from .shapes_score import accuracy, score

EVAL_SEED = 777_777_777  # training uses seed 0 and its held-out split seed 1_000_003


@torch.no_grad()
def vae_psnr(pipe, images) -> float:
    """Mean PSNR (dB, pixel range [0, 255]) of the VAE round trip of `images`."""
    values = []
    for image in images:
        x = pil_to_tensor(image)
        y = pipe.decode_latents(pipe.encode_image(x)).clamp(-1, 1)
        mse = ((x - y.cpu()) / 2).pow(2).mean().item()  # in [0, 1] units
        values.append(10 * math.log10(1.0 / max(mse, 1e-12)))
    return float(np.mean(values))


def evaluate(pipe, count: int = 200, seed: int = EVAL_SEED, steps: int = 20, sampler: str = "DPM++ 2M",
             cfg: float = 5.0, size: int = 64, progress=None) -> dict:
    """Generate one image per caption and score it; returns per-attribute accuracy, VAE PSNR and timing."""
    scores, truths = [], []
    start = time.perf_counter()
    for i in range(count):
        truth, caption = example(seed, i, size)
        truths.append(truth)
        image = pipe.txt2img(caption, steps=steps, sampler=sampler, cfg=cfg, seed=seed + i, width=size,
                             height=size)[0]
        scores.append(score(caption, image))
        if progress is not None:
            progress(i + 1, count)
    seconds = time.perf_counter() - start
    return {"accuracy": accuracy(scores), "vae_psnr": vae_psnr(pipe, truths[:64]), "images": count,
            "seconds_per_image": seconds / count}


def format_table(result: dict) -> str:
    rows = [f"{'attribute':<12}{'accuracy':>9}"]
    for key in ("background", "color", "shape", "position", "size", "count"):
        if key in result["accuracy"]:
            rows.append(f"{key:<12}{result['accuracy'][key]:>9.1%}")
    rows.append(f"VAE PSNR: {result['vae_psnr']:.1f} dB over 64 ground-truth renders")
    rows.append(f"{result['images']} images, {result['seconds_per_image']:.2f} s per image")
    return "\n".join(rows)
