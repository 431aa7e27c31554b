"""The pictures a training run leaves: sample grids (PIL), and the loss curve (matplotlib, imported only when a curve
is drawn: it is the `plots` extra, so `import sdtorch` and a run without it stay light)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def image_grid(rows: list[torch.Tensor]) -> Image.Image:
    """Rows of (N, 3, H, W) images in [-1, 1] -> one PIL image, a row per tensor."""
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[2:]
    grid = Image.new("RGB", (n * w, len(rows) * h), (255, 255, 255))
    for i, row in enumerate(rows):
        pixels = ((row.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for j, image in enumerate(pixels):  # (H, W, 3) uint8 each
            grid.paste(Image.fromarray(image), (j * w, i * h))
    return grid


def smooth(values, window: int) -> np.ndarray:
    """Centered moving average over `window` (odd) points; near the ends the window shrinks to the points on both
    sides, so the line has no lag (an exponential average trails a falling loss) and tracks the data to its ends."""
    v = np.asarray(values, dtype=np.float64)
    i = np.arange(len(v))
    half = np.minimum(window // 2, np.minimum(i, len(v) - 1 - i))  # (N,) half-width at each point
    sums = np.concatenate(([0.0], np.cumsum(v)))
    return (sums[i + half + 1] - sums[i - half]) / (2 * half + 1)


def smoothing_window(points: int) -> int:
    """About a twentieth of the curve, odd: raw for short runs, a few hundred steps' average for long ones."""
    return 2 * (points // 40) + 1


def loss_figure(runs: dict[str, list[dict]], panel: tuple[float, float] = (6.4, 3.6)) -> Figure:
    """One panel per run: {title: log.jsonl records}. The logged training loss (each point the mean over a log
    interval) in grey, its centered moving average (`smooth`) in blue, the held-out loss (UNet runs) as orange dots.
    The loss axis is logarithmic when the curve spans more than a decade."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * len(runs), panel[1]), layout="constrained")
    for ax, (title, records) in zip(fig.subplots(1, len(runs), squeeze=False)[0], runs.items(), strict=True):
        train = [r for r in records if r["kind"] == "train"]
        steps, loss = np.array([r["step"] for r in train]), np.array([r["loss"] for r in train])
        window = smoothing_window(len(loss))
        ax.plot(steps, loss, color="0.7", linewidth=0.8, label="logged")
        ax.plot(steps, smooth(loss, window), color="C0", linewidth=2, label=f"centered mean of {window} points")
        held_out = [r for r in records if r["kind"] == "eval" and "loss" in r]
        if held_out:
            ax.plot([r["step"] for r in held_out], [r["loss"] for r in held_out], "o", color="C1", markersize=4,
                    label="held-out")
        if len(loss) and loss.min() > 0 and loss.max() > 10 * loss.min():
            ax.set_yscale("log")
        ax.set(title=title, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    return fig


def save_loss_plot(records: list[dict], path: str | Path, title: str = "training loss") -> bool:
    """Draw a run's loss curve into `path` (640x360); False, drawing nothing, where matplotlib is not installed."""
    try:
        figure = loss_figure({title: records})
    except ImportError:
        return False
    figure.savefig(path, dpi=100)
    return True
