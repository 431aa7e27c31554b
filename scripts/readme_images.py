"""Make the README's pictures: a grid of built-in-model samples, and the three training loss curves side by side,
drawn from the runs' log.jsonl (needs matplotlib: the `plots` extra).

    python scripts/readme_images.py [RUN_DIR]      (RUN_DIR as given to scripts/train_builtin.sh)
"""
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

import sdtorch
from sdtorch.cli import BUILTIN_MODEL
from sdtorch.train.plots import loss_figure

PROMPTS = [
    "a large red circle in the center on a blue background",
    "a small yellow square at the top left on a black background",
    "a green triangle at the bottom right on a white background",
    "a large purple square on the left on a yellow background",
    "a blue circle at the top and an orange triangle at the bottom on a white background",
    "a white triangle in the center on a green background",
]
SEEDS = range(4)


def samples_grid(out: Path) -> None:
    pipe = sdtorch.load(BUILTIN_MODEL)
    cell, label_w = 64, 360
    grid = Image.new("RGB", (label_w + cell * len(SEEDS), cell * len(PROMPTS)), "white")
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(PROMPTS):
        images = pipe.txt2img(prompt, steps=20, sampler="DPM++ 2M", cfg=5, seed=SEEDS[0], batch=len(SEEDS),
                              width=cell, height=cell)
        for col, image in enumerate(images):
            grid.paste(image, (label_w + col * cell, row * cell))
        words = prompt.split()
        lines = [" ".join(words[:8]), " ".join(words[8:])]
        draw.multiline_text((4, row * cell + 18), "\n".join(line for line in lines if line), fill="black")
    grid.save(out, optimize=True)


def loss_curves(run: Path, out: Path) -> None:
    titles = {"clip": "CLIP (contrastive)", "vae": "VAE (reconstruction)", "unet": "UNet (noise prediction)"}
    logs = {title: [json.loads(line) for line in (run / part / "log.jsonl").read_text(encoding="utf-8").splitlines()]
            for part, title in titles.items()}
    loss_figure(logs).savefig(out, dpi=100)


if __name__ == "__main__":
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/builtin")
    docs = Path(__file__).resolve().parent.parent / "docs"
    samples_grid(docs / "samples.png")
    loss_curves(run, docs / "loss_curves.png")
    print(f"wrote {docs / 'samples.png'} and {docs / 'loss_curves.png'}")
