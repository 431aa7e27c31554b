"""Evaluate a model on the shapes task by pixel analysis, never by the model itself.

Captions come from a seed the training never used; each generated image is scored by `shapes_score.score` (background
colour from the border, shape colour, kind, 3x3 cell and size from the pixels). The VAE is scored apart, on the
ground-truth renders of the same captions: the PSNR of its round trip, and the same score of the round trip, which is
the most any generator decoding through this VAE could get (on the shipped model, small squares and triangles come back
with rounded corners and some read as circles).
"""
import math
import time

import numpy as np
import torch

from PIL import Image

from ..images import pil_to_tensor, tensor_to_pil
from .shapes import example
from .shapes_score import accuracy, parse_caption, score

PSNR_IMAGES = 64  # the VAE PSNR is the mean over the first 64 captions, as reported since it was first measured
EVAL_SEED = 777_777_777  # training uses seed 0 and its held-out split seed 1_000_003


@torch.no_grad()
def round_trip(pipe, image: Image.Image) -> tuple[Image.Image, float]:
    """The VAE's reconstruction of `image` (encode, decode) and its PSNR (dB, pixel range [0, 255])."""
    x = pil_to_tensor(image)
    y = pipe.decode_latents(pipe.encode_image(x)).clamp(-1, 1).cpu()
    mse = ((x - y) / 2).pow(2).mean().item()  # in [0, 1] units
    return tensor_to_pil(y)[0], 10 * math.log10(1.0 / max(mse, 1e-12))


def evaluate(pipe, count: int = 200, seed: int = EVAL_SEED, steps: int = 20, sampler: str = "DPM++ 2M",
             cfg: float = 5.0, size: int = 64, progress=None, **settings) -> dict:
    """Generate one image per caption and score it; returns per-attribute accuracy (over all captions, and apart for
    one- and two-shape scenes), the share of scenes with every named attribute right, VAE PSNR, the same scores of the
    VAE's round trip of each caption's ground truth ("vae_round_trip": the decoder's ceiling) and timing. Other
    `settings` go to txt2img as they are (e.g. ngms=1.0, to measure an approximation's cost)."""
    scores, truths, captions, counts, psnrs, trip_scores = [], [], [], [], [], []
    start = time.perf_counter()
    for i in range(count):
        truth, caption = example(seed, i, size)
        truths.append(truth)
        captions.append(caption)
        image = pipe.txt2img(caption, steps=steps, sampler=sampler, cfg=cfg, seed=seed + i, width=size,
                             height=size, **settings)[0]
        scores.append(score(caption, image))
        counts.append(len(parse_caption(caption).shapes))
        if progress is not None:
            progress(i + 1, count)
    seconds = time.perf_counter() - start
    for truth, caption in zip(truths, captions, strict=True):
        reconstruction, psnr = round_trip(pipe, truth)
        psnrs.append(psnr)
        trip_scores.append(score(caption, reconstruction))
    return {**summary(scores, counts), "vae_psnr": float(np.mean(psnrs[:PSNR_IMAGES])),
            "vae_round_trip": summary(trip_scores, counts), "images": count, "seconds_per_image": seconds / count}


def summary(scores: list[dict], counts: list[int]) -> dict:
    """Accuracy and all-right share of `scores`, over all of them and by the number of shapes each caption names."""
    by_shapes = {n: [s for s, c in zip(scores, counts, strict=True) if c == n] for n in sorted(set(counts))}
    return {"accuracy": accuracy(scores), "all_right": all_right(scores),
            "by_shapes": {n: {"images": len(group), "accuracy": accuracy(group), "all_right": all_right(group)}
                          for n, group in by_shapes.items()}}


def all_right(scores: list[dict]) -> float:
    """The share of images with every attribute their caption names right (count and background included)."""
    return sum(all(v is not False for v in s.values()) for s in scores) / max(len(scores), 1)


def format_table(result: dict) -> str:
    groups = [("all", result["accuracy"], result["all_right"])]
    groups += [(f"{n} shape{'s' * (n > 1)}", g["accuracy"], g["all_right"])
               for n, g in sorted(result.get("by_shapes", {}).items())]
    rows = [f"{'attribute':<14}" + "".join(f"{name:>10}" for name, _, _ in groups)]
    for key in ("background", "color", "shape", "position", "size", "count"):
        if key in result["accuracy"]:
            rows.append(f"{key:<14}" + "".join(f"{acc[key]:>10.1%}" if key in acc else f"{'-':>10}"
                                               for _, acc, _ in groups))
    rows.append(f"{'everything':<14}" + "".join(f"{right:>10.1%}" for _, _, right in groups))
    rows.append(f"{'images':<14}" + "".join(f"{n:>10}" for n in [result["images"]] + [
        g["images"] for _, g in sorted(result.get("by_shapes", {}).items())]))
    rows.append(f"VAE PSNR: {result['vae_psnr']:.1f} dB over {min(PSNR_IMAGES, result['images'])} ground-truth renders")
    if "vae_round_trip" in result:
        trip = result["vae_round_trip"]
        shares = [f"{trip['all_right']:.1%}"] + [f"{n} shape{'s' * (n > 1)} {g['all_right']:.1%}"
                                                 for n, g in sorted(trip["by_shapes"].items())]
        rows.append(f"VAE round trip of the ground truths, everything right (no generator can beat it through this "
                    f"VAE): {', '.join(shares)}")
    rows.append(f"{result['seconds_per_image']:.2f} s per image; 'everything': every attribute the caption names right")
    return "\n".join(rows)
