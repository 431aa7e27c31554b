"""Teach the built-in model a shape it has never seen (a diamond, or a star) with a LoRA that `sdtorch train lora`
trains on generated pictures, and score before and after by pixel analysis (sdtorch/train/shapes_score.py, which
reads the new shapes too when asked).

    python scripts/lora_shape.py [RUN_DIR] [--shape diamond|star] [--steps N] [--picture docs/lora_diamond.png]

RUN_DIR (default runs/lora_SHAPE) gets data/ (48 scenes of the new shape and 16 ordinary ones, so the LoRA keeps
circles circles), lora/ (the training run; lora/model.safetensors is the kohya-format LoRA) and scores.json. Held-out
captions come from another seed: captions of the new shape (does it appear, in the right colour, place and size?)
and the ordinary evaluation captions (does the LoRA leave the rest of the model alone?), each generated without and
with <lora:SHAPE:1>; and, as the ceiling, the built-in VAE's own round trip of the new shape's true pictures: the
LoRA trains the UNet, and a shape the 8x8-latent VAE cannot reproduce cannot come out of it (a star comes back as a
pentagon).
"""
import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import sdtorch
from sdtorch.train.eval_shapes import EVAL_SEED
from sdtorch.images import pil_to_tensor, tensor_to_pil
from sdtorch.train.shapes import NEW_SHAPES, SHAPES, caption, example, render, sample_scene
from sdtorch.train.shapes_score import accuracy, score

KINDS = SHAPES + NEW_SHAPES
GENERATE = dict(steps=20, sampler="DPM++ 2M", cfg=5.0, width=64, height=64)


def new_example(shape: str, seed: int, index: int) -> tuple[Image.Image, str]:
    """A one-shape scene of the new shape (colour, size and position drawn as the grammar draws them)."""
    rng = random.Random(f"sdtorch-{shape}:{seed}:{index}")
    scene = sample_scene(rng, two_shapes_prob=0.0, shapes_from=(shape,))
    return render(scene, 64, rng), caption(scene)


def write_data(folder: Path, shape: str, new: int = 48, ordinary: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    items = [new_example(shape, 0, i) for i in range(new)] + [example(0, 10_000 + i) for i in range(ordinary)]
    for i, (image, text) in enumerate(items):
        image.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(text + "\n")


def scores(pipe, captions: list[str], lora: str | None) -> dict:
    results = []
    for i, text in enumerate(captions):
        prompt = text + (f" <lora:{lora}:1>" if lora else "")
        image = pipe.txt2img(prompt, seed=EVAL_SEED + i, **GENERATE)[0]
        results.append(score(text, image, KINDS))
    return accuracy(results)


@torch.no_grad()
def vae_round_trip(pipe, items: list[tuple[Image.Image, str]]) -> dict:
    """The scores of the VAE's reconstructions of the true pictures: what any UNet could at best get out of it."""
    results = []
    for image, text in items:
        out = pipe.decode_latents(pipe.encode_image(pil_to_tensor(image))).clamp(-1, 1)
        results.append(score(text, tensor_to_pil(out)[0], KINDS))
    return accuracy(results)


def picture(pipe, out: Path, lora: str, prompts: list[str], seeds=range(3)) -> None:
    """Each prompt's images without (left) and with the LoRA (right), drawn at twice their size."""
    cell, label_w, gap = 128, 300, 8
    width = label_w + 2 * len(seeds) * cell + gap
    grid = Image.new("RGB", (width, 16 + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_w, 2), "built-in model", fill="black")
    draw.text((label_w + len(seeds) * cell + gap, 2), f"with <lora:{lora}:1>", fill="black")
    for row, prompt in enumerate(prompts):
        for side, suffix in enumerate(("", f" <lora:{lora}:1>")):
            images = pipe.txt2img(prompt + suffix, seed=seeds[0], batch=len(seeds), **GENERATE)
            for col, image in enumerate(images):
                image = image.resize((cell, cell), Image.Resampling.NEAREST)
                grid.paste(image, (label_w + side * (len(seeds) * cell + gap) + col * cell, 16 + row * cell))
        draw.text((4, 16 + row * cell + cell // 2 - 6), prompt, fill="black")
    grid.save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?")
    parser.add_argument("--shape", choices=NEW_SHAPES, default="diamond")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--count", type=int, default=100, help="held-out captions of each kind")
    parser.add_argument("--picture", help="draw the before/after grid here (e.g. docs/lora_diamond.png)")
    args = parser.parse_args()
    shape = args.shape
    run = Path(args.run or f"runs/lora_{shape}")
    write_data(run / "data", shape)
    lora_dir = run / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "sdtorch.cli", "train", "lora", "--init", str(sdtorch.BUILTIN_MODEL),
                    "--data", str(run / "data"), "--holdout", "0", "--rank", "8", "--alpha", "8", "--text-encoder",
                    "--steps", str(args.steps), "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "20",
                    "--eval-every", "100000", "--sample-every", "100000", "--workers", "0", "--quiet",
                    "--out", str(run / "lora")], check=True)
    (lora_dir / f"{shape}.safetensors").write_bytes((run / "lora" / "model.safetensors").read_bytes())

    pipe = sdtorch.load(sdtorch.BUILTIN_MODEL, lora_dir=lora_dir)
    held_out = [new_example(shape, 1, i) for i in range(args.count)]
    ordinary = [example(EVAL_SEED, i)[1] for i in range(args.count)]
    ceiling = vae_round_trip(pipe, held_out)
    table = {name: {"without": scores(pipe, captions, None), "with": scores(pipe, captions, shape)}
             for name, captions in ((f"{shape} captions", [text for _, text in held_out]),
                                    ("ordinary captions", ordinary))}
    (run / "scores.json").write_text(json.dumps({**table, "vae round trip": ceiling}, indent=1))
    print(f"{'':<20}{'attribute':<12}{'without':>9}{'with LoRA':>11}{'VAE round trip':>16}")
    for name, result in table.items():
        for key in ("shape", "color", "position", "size", "count", "background"):
            if key in result["without"]:
                trip = f"{ceiling[key]:>16.1%}" if name != "ordinary captions" else ""
                print(f"{name:<20}{key:<12}{result['without'][key]:>9.1%}{result['with'][key]:>11.1%}{trip}")
    if args.picture:
        picture(pipe, Path(args.picture), shape, [f"a red {shape} on a white background",
                                                  f"a large yellow {shape} at the top left on a blue background",
                                                  f"a green {shape} on the right on a black background",
                                                  "a blue circle and a red square on a white background"])


if __name__ == "__main__":
    main()
