"""Draw every figure of the tour (docs/tour/) from the shipped built-in model: deterministic, CPU, about a minute.

    python scripts/make_docs_figures.py [--out docs/tour] [--only NAME ...]

Each figure is one function below, named as its file (`fig_02_noising` writes 02_noising.png); the chapters of
docs/tour/ show them and say what to look for. Fixed seeds throughout, so a rerun redraws the same pictures.
"""
from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

import sdtorch
from sdtorch.attention_maps import draw_map, record_cross_attention, word_maps
from sdtorch.diffusion import CFGDenoiser, get_sigmas
from sdtorch.diffusion.samplers import sample_euler
from sdtorch.images import pil_to_tensor, tensor_to_pil
from sdtorch.models.unet import timestep_embedding
from sdtorch.pipeline import seed_noise
from sdtorch.train.shapes import SceneSpec, ShapeSpec, example, render

DOCS = Path(__file__).resolve().parent.parent / "docs" / "tour"
DPI = 80
PROMPT = "a large red circle on the left and a blue square on the right on a white background"
SCENE = SceneSpec("white", (ShapeSpec("circle", "red", "large", 3), ShapeSpec("square", "blue", "medium", 5)))
matplotlib.rcParams.update({"font.size": 9, "axes.titlesize": 9, "figure.dpi": DPI})


class Lab:
    """The built-in model and a few shortcuts the figures share."""

    def __init__(self):
        self.pipe = sdtorch.load(sdtorch.BUILTIN_MODEL, device="cpu")
        self.cfg = self.pipe.config
        self.latent_shape = (self.cfg.unet.out_channels, self.cfg.resolution // 8, self.cfg.resolution // 8)

    def images(self, prompt, **kwargs):
        kwargs = {"steps": 20, "cfg": 5, "sampler": "DPM++ 2M", **kwargs}
        return self.pipe.txt2img(prompt, **kwargs)

    def encode(self, image) -> torch.Tensor:
        return self.pipe.encode_image(pil_to_tensor(image))  # (1, 4, 8, 8), scaled latents

    def decode(self, latents: torch.Tensor) -> list:
        return tensor_to_pil(self.pipe.decode_latents(latents))


def show(ax, image, title=None):
    ax.imshow(np.asarray(image), interpolation="nearest")
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title)


def grid(rows: int, cols: int, cell: float = 1.0, title_room: float = 0.3) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cols * cell, rows * (cell + title_room)))
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def save(fig: Figure, out: Path, name: str) -> Path:
    """Write the figure as a 256-colour PNG: a third of the size of matplotlib's RGBA file, and no visible change."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    rgb = Image.open(buffer).convert("RGB")
    path = out / f"{name}.png"
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def save_against_t(fig: Figure, axes, out: Path, name: str) -> Path:
    """Plots against the timestep: label the shared x axis, light grid, save."""
    for ax in axes:
        ax.set_xlabel("timestep t")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, out, name)


# ---- 1. generative models -------------------------------------------------------------------------------------------

def fig_01_conditioning(lab: Lab, out: Path) -> Path:
    """Top: training images. Middle: samples of p(x), the empty prompt. Bottom: samples of p(x | c)."""
    n = 8
    data = [example(seed=7, index=i)[0] for i in range(n)]
    free = lab.images("", cfg=1, seed=0, batch=n)
    cond = lab.images("a red circle on a white background", seed=0, batch=n)
    fig, axes = grid(3, n, title_room=0.1)
    for row, (images, label) in enumerate([(data, "data x"), (free, "p(x)"), (cond, "p(x | c)")]):
        for col, image in enumerate(images):
            show(axes[row, col], image)
        axes[row, 0].text(-8, 32, label, ha="right", va="center")
    fig.subplots_adjust(left=0.12, right=0.99, top=0.98, bottom=0.02, wspace=0.05, hspace=0.08)
    return save(fig, out, "01_conditioning")


# ---- 2. the forward process -----------------------------------------------------------------------------------------

def fig_02_schedule(lab: Lab, out: Path) -> Path:
    s = lab.pipe.schedule
    t = np.arange(s.num_train_timesteps)
    abar = s.alphas_cumprod.numpy()
    fig = Figure(figsize=(9, 2.4))
    axes = fig.subplots(1, 3)
    axes[0].plot(t, abar ** 0.5, label="√ᾱ (signal)")
    axes[0].plot(t, (1 - abar) ** 0.5, label="√(1−ᾱ) (noise)")
    axes[0].legend(frameon=False)
    axes[1].semilogy(t, s.sigmas.numpy())
    axes[1].set_title("σ = √((1−ᾱ)/ᾱ)")
    axes[2].semilogy(t, abar / (1 - abar))
    axes[2].set_title("SNR = ᾱ/(1−ᾱ) = 1/σ²")
    axes[0].set_title("x_t = √ᾱ·x₀ + √(1−ᾱ)·ε")
    return save_against_t(fig, axes, out, "02_schedule")


def fig_02_noising(lab: Lab, out: Path) -> Path:
    """One image's latent noised at t = 0 ... 999 (add_noise), shown as its first latent channel and decoded."""
    image = render(SCENE, 64, random.Random(0))
    x0 = lab.encode(image)
    ts = [0, 50, 100, 200, 300, 400, 500, 600, 800, 999]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xt = torch.cat([lab.pipe.schedule.add_noise(x0, noise, torch.tensor([t])) for t in ts])
    decoded = lab.decode(xt)
    fig, axes = grid(2, len(ts))
    for col, t in enumerate(ts):
        axes[0, col].imshow(xt[col, 0].numpy(), cmap="gray", vmin=-3, vmax=3, interpolation="nearest")
        axes[0, col].set_axis_off()
        axes[0, col].set_title(f"t={t}")
        show(axes[1, col], decoded[col])
    axes[0, 0].text(-1, 3.5, "latent\nchannel 0", ha="right", va="center")
    axes[1, 0].text(-4, 32, "decoded", ha="right", va="center")
    fig.subplots_adjust(left=0.1, right=0.99, top=0.88, bottom=0.02, wspace=0.05, hspace=0.25)
    return save(fig, out, "02_noising")


# ---- 3. the training objective --------------------------------------------------------------------------------------

def fig_03_loss_by_t(lab: Lab, out: Path) -> Path:
    """The built-in UNet's noise-prediction loss ‖ε̂ − ε‖² on fresh shapes images, at each noise level, and the error
    of the x̂0 it implies."""
    unet, s = lab.pipe.unet, lab.pipe.schedule
    pairs = [example(seed=1234, index=i) for i in range(32)]
    x0 = torch.cat([lab.encode(im) for im, _ in pairs])
    context = torch.cat([lab.pipe.encode_prompts(c, "", 1)[0] for _, c in pairs])
    g = torch.Generator().manual_seed(0)
    ts = list(range(0, 1000, 50)) + [999]
    eps_loss, x0_err = [], []
    with torch.no_grad():
        for t in ts:
            noise = torch.randn(x0.shape, generator=g)
            tt = torch.full((len(pairs),), t)
            xt = s.add_noise(x0, noise, tt)
            eps = unet(xt, tt.float(), context)
            abar = s.alphas_cumprod[t]
            x0_hat = (xt - (1 - abar) ** 0.5 * eps) / abar ** 0.5
            eps_loss.append(((eps - noise) ** 2).mean().item())
            x0_err.append(((x0_hat - x0) ** 2).mean().item())
    fig = Figure(figsize=(7, 2.5))
    axes = fig.subplots(1, 2)
    axes[0].plot(ts, eps_loss, marker=".")
    axes[0].axhline(1.0, color="gray", ls="--", lw=1)
    axes[0].text(500, 0.93, "guessing ε̂ = 0", color="gray", ha="center", va="top")
    axes[0].set_title("‖ε̂ − ε‖², the training loss")
    axes[0].set_ylim(0, 1.1)
    axes[1].semilogy(ts, x0_err, marker=".")
    axes[1].set_title("‖x̂₀ − x₀‖², the image it implies")
    return save_against_t(fig, axes, out, "03_loss_by_t")


# ---- 4. sampling ----------------------------------------------------------------------------------------------------

def fig_04_trajectory(lab: Lab, out: Path) -> Path:
    """One Euler generation written out: the sample x at each σ and the denoiser's guess x̂0 = D(x, σ)."""
    pipe, steps = lab.pipe, 10
    cond, uncond = pipe.encode_prompts(PROMPT, "", 1)
    sigmas = get_sigmas(pipe.schedule, steps, "karras")
    x = seed_noise(1, 1, lab.latent_shape) * sigmas[0]  # x_T: unit noise scaled to σ_max
    denoiser = CFGDenoiser(pipe.unet, pipe.schedule, lab.cfg.prediction_type)
    xs, x0s = [], []

    def keep(info):
        xs.append(info["x"] / (1 + info["sigma"] ** 2) ** 0.5)  # back to x_t's scale (what the VAE can decode)
        x0s.append(info["denoised"])

    final = sample_euler(denoiser, x, sigmas, extra_args={"cond": cond, "uncond": uncond, "cfg_scale": 5.0},
                         callback=keep, disable=True)
    x_images, x0_images = lab.decode(torch.cat(xs + [final])), lab.decode(torch.cat(x0s))
    fig, axes = grid(2, steps + 1)
    for i in range(steps + 1):
        show(axes[0, i], x_images[i], f"σ={sigmas[i]:.2g}")
        if i < steps:
            show(axes[1, i], x0_images[i])
        else:
            axes[1, i].set_axis_off()
    axes[0, 0].text(-4, 32, "x", ha="right", va="center")
    axes[1, 0].text(-4, 32, "x̂₀", ha="right", va="center")
    fig.subplots_adjust(left=0.05, right=0.99, top=0.88, bottom=0.02, wspace=0.05, hspace=0.25)
    return save(fig, out, "04_trajectory")


def fig_04_samplers(lab: Lab, out: Path) -> Path:
    """The same prompt and seed through five samplers, at 10 and 30 steps."""
    names = ["DDPM", "DDIM", "Euler", "Euler a", "DPM++ 2M"]
    step_counts = [10, 30]
    fig, axes = grid(len(step_counts), len(names), cell=1.3)
    for row, steps in enumerate(step_counts):
        for col, name in enumerate(names):
            show(axes[row, col], lab.images(PROMPT, sampler=name, steps=steps, seed=3)[0], f"{name}, {steps}")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.02, wspace=0.05, hspace=0.3)
    return save(fig, out, "04_samplers")


def fig_04_sigmas(lab: Lab, out: Path) -> Path:
    """20-step σ lists; "normal" with the evenly spaced timesteps the pipeline gives the k-diffusion samplers."""
    fig = Figure(figsize=(4.5, 2.6))
    ax = fig.subplots()
    for name in ["normal", "karras", "exponential"]:
        sig = get_sigmas(lab.pipe.schedule, 20, name, spacing="linspace")[:-1]  # the final 0 has no log
        ax.semilogy(sig.numpy(), marker=".", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("σ")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, out, "04_sigmas")


# ---- 5. guidance ----------------------------------------------------------------------------------------------------

def fig_05_cfg(lab: Lab, out: Path) -> Path:
    scales = [1, 2, 3, 5, 7.5, 10, 15]
    prompt = "a small yellow triangle at the top right on a purple background"
    fig, axes = grid(1, len(scales), cell=1.2)
    for col, scale in enumerate(scales):
        show(axes[0, col], lab.images(prompt, cfg=scale, seed=2)[0], f"cfg {scale}")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.82, bottom=0.02, wspace=0.05)
    return save(fig, out, "05_cfg")


def fig_05_negative(lab: Lab, out: Path) -> Path:
    """A prompt that leaves the colour open, without a negative prompt, with a one-word one, with a whole caption."""
    prompt = "a large circle in the center on a white background"
    negatives = ["", "orange", "a large orange circle in the center on a white background"]
    fig, axes = grid(len(negatives), 4, cell=1.25, title_room=0.25)
    for row, negative in enumerate(negatives):
        for col, image in enumerate(lab.images(prompt, negative=negative, seed=10, batch=4)):
            show(axes[row, col], image)
        label = f"negative prompt: {negative!r}" if negative else "no negative prompt"
        axes[row, 0].set_title(label if len(label) < 60 else label.replace(" on a", "\non a"), loc="left")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.4)
    return save(fig, out, "05_negative")


# ---- 6. the VAE -----------------------------------------------------------------------------------------------------

def fig_06_latents(lab: Lab, out: Path) -> Path:
    image = render(SCENE, 64, random.Random(0))
    z = lab.encode(image)
    recon = lab.decode(z)[0]
    fig, axes = grid(1, 6, cell=1.3)
    show(axes[0, 0], image, "image 64×64×3")
    for c in range(4):
        axes[0, c + 1].imshow(z[0, c].numpy(), cmap="coolwarm", vmin=-3, vmax=3, interpolation="nearest")
        axes[0, c + 1].set_axis_off()
        axes[0, c + 1].set_title(f"latent ch {c} (8×8)")
    show(axes[0, 5], recon, "decoded")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.85, bottom=0.02, wspace=0.08)
    return save(fig, out, "06_latents")


# ---- 7. CLIP --------------------------------------------------------------------------------------------------------

def fig_07_text_similarity(lab: Lab, out: Path) -> Path:
    """Cosine similarity of the built-in text encoder's outputs (mean over the prompt's tokens) for a few captions."""
    captions = ["a red circle", "a red square", "a blue circle", "a blue square", "a red circle on the left",
                "a red circle on the right", "a green triangle at the top", "a small green triangle"]
    pipe = lab.pipe
    feats = []
    with torch.no_grad():
        for c in captions:
            ids = pipe.tokenizer.encode(c)
            hidden = pipe.encode_prompts(c, "", 1)[0][0, 1:1 + len(ids)]  # the caption's own tokens, no BOS/padding
            feats.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
    sim = torch.stack(feats) @ torch.stack(feats).T
    fig = Figure(figsize=(5.2, 4.0))
    ax = fig.subplots()
    im = ax.imshow(sim.numpy(), cmap="viridis")
    ax.set_xticks(range(len(captions)), captions, rotation=60, ha="right")
    ax.set_yticks(range(len(captions)), captions)
    for i in range(len(captions)):
        for j in range(len(captions)):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if sim[i, j] > sim.mean() else "white")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return save(fig, out, "07_text_similarity")


# ---- 8. the UNet ----------------------------------------------------------------------------------------------------

LAYER_LABELS = {"Conv2d": "conv", "ResBlock": "res", "SpatialTransformer": "attn", "Downsample": "down",
                "Upsample": "up"}


def unet_blocks(unet, latent_shape, context_dim):
    """(name, output shape, layers) for every block of one forward pass, recorded by hooks on the model."""
    rows, handles = [], []
    blocks = [(f"in {i}", b) for i, b in enumerate(unet.input_blocks)] + [("mid", unet.middle_block)]
    blocks += [(f"out {i}", b) for i, b in enumerate(unet.output_blocks)]
    for name, block in blocks:
        layers = "+".join(LAYER_LABELS.get(type(layer).__name__, type(layer).__name__) for layer in block)
        handles.append(block.register_forward_hook(
            lambda m, a, o, name=name, layers=layers: rows.append((name, tuple(o.shape[1:]), layers))))
    with torch.no_grad():
        unet(torch.zeros(1, *latent_shape), torch.tensor([500.0]), torch.zeros(1, 77, context_dim))
    for h in handles:
        h.remove()
    return rows


def fig_08_unet(lab: Lab, out: Path) -> Path:
    """The UNet drawn from the model object: one box per block at the height of its resolution, its width its
    channels; orange boxes hold a spatial transformer; arrows are the skip connections."""
    rows = unet_blocks(lab.pipe.unet, lab.latent_shape, lab.cfg.unet.context_dim)
    n_in = len(lab.pipe.unet.input_blocks)
    top = max(r[1][1] for r in rows)
    fig = Figure(figsize=(9, 3.0))
    ax = fig.subplots()
    centres = []
    for i, (name, (c, h, w), layers) in enumerate(rows):
        y = np.log2(top / h)  # 0 at full latent resolution, 1 at half, ...
        width = 0.25 + 0.5 * c / max(r[1][0] for r in rows)
        color = "tab:orange" if "attn" in layers else "tab:blue"
        ax.add_patch(Rectangle((i - width / 2, -y - 0.3), width, 0.6, color=color, alpha=0.8))
        ax.text(i, -y - 0.38, f"{name}\n{layers}\n{c}×{h}×{w}", ha="center", va="top", fontsize=6)
        centres.append((i, -y))
    # input block k hands its output to output block (n_in - 1 - k), through the concatenation in UNet.forward
    n_out = len(rows) - n_in - 1
    for k in range(n_in):
        j = n_in + 1 + (n_out - 1 - k)
        (x1, y1), (x2, y2) = centres[k], centres[j]
        ax.add_patch(FancyArrowPatch((x1, y1 + 0.3), (x2, y2 + 0.3), connectionstyle="arc3,rad=-0.25",
                                     arrowstyle="->", color="gray", lw=0.7, mutation_scale=6))
    for (x1, y1), (x2, y2) in zip(centres, centres[1:], strict=False):
        ax.plot([x1, x2], [y1, y2], color="black", lw=0.5, zorder=0)
    ax.set_xlim(-1, len(rows))
    ax.set_ylim(-np.log2(top) - 1.0, 1.5)
    ax.set_axis_off()
    ax.set_title("the built-in UNet: latent 4×8×8 in, ε̂ 4×8×8 out; orange blocks hold a spatial transformer, "
                 "grey arrows are the skips")
    fig.tight_layout()
    return save(fig, out, "08_unet")


def fig_08_timestep(lab: Lab, out: Path) -> Path:
    t = torch.arange(0, 1000, 2.0)
    emb = timestep_embedding(t, lab.cfg.unet.model_channels)
    fig = Figure(figsize=(5, 2.4))
    ax = fig.subplots()
    ax.imshow(emb.T.numpy(), aspect="auto", cmap="coolwarm", extent=(0, 1000, emb.shape[1], 0), interpolation="nearest")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("channel (cos | sin)")
    ax.set_title(f"timestep_embedding(t, {emb.shape[1]})")
    fig.tight_layout()
    return save(fig, out, "08_timestep")


def fig_08_norms(lab: Lab, out: Path) -> Path:
    """Which values share one mean and variance: for a (C, H·W) feature map of one image, GroupNorm (the UNet, per
    image and group of channels) against LayerNorm (the transformer, per token over all channels)."""
    c, hw, groups = 8, 12, 4
    fig = Figure(figsize=(6, 2.4))
    axes = fig.subplots(1, 2)
    group_of = np.repeat(np.arange(groups), c // groups)[:, None] * np.ones((1, hw))
    token_of = np.ones((c, 1)) * np.arange(hw)[None]
    for ax, data, title in [(axes[0], group_of, f"GroupNorm({groups} groups)"),
                            (axes[1], token_of, "LayerNorm over channels")]:
        ax.imshow(data, cmap="tab20", interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("position (H·W)")
        ax.set_ylabel("channel")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("one colour = the values normalised together (one image)")
    fig.tight_layout()
    return save(fig, out, "08_norms")


# ---- 9. attention ---------------------------------------------------------------------------------------------------

def fig_09_attention(lab: Lab, out: Path) -> Path:
    """Per-word cross-attention maps at steps of one generation and averaged over all of them (DAAM)."""
    words = ["red", "circle", "left", "blue", "square", "right"]
    steps, shown = 20, [0, 4, 9, 14, 19]
    with record_cross_attention(lab.pipe.unet, images=1) as rec:
        image = lab.images(PROMPT, steps=steps, seed=1)[0]
    per_step = [word_maps(m[0], lab.pipe.tokenizer, PROMPT, words) for m in rec.calls]
    mean = word_maps(rec.mean()[0], lab.pipe.tokenizer, PROMPT, words)
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255
    columns = [(f"step {i + 1}", per_step[i]) for i in shown] + [("mean", mean)]
    fig, axes = grid(len(words), len(columns) + 1, title_room=0.05)
    for row, word in enumerate(words):
        show(axes[row, 0], image)
        axes[row, 0].text(-6, 32, word, ha="right", va="center", fontsize=10)
        for col, (label, maps) in enumerate(columns, start=1):
            ax = axes[row, col]
            draw_map(ax, grey, maps[word])
            if row == 0:
                ax.set_title(label)
    fig.subplots_adjust(left=0.1, right=0.99, top=0.95, bottom=0.01, wspace=0.05, hspace=0.05)
    return save(fig, out, "09_attention")


FIGURES = {name[4:]: fn for name, fn in globals().items() if name.startswith("fig_")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--only", nargs="*", choices=sorted(FIGURES), help="draw only these figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # the built-in model's layers are too small to split across threads: one thread is as fast on a quiet machine,
    # and on a busy one two threads wait for each other (several times slower)
    torch.set_num_threads(1)
    start = time.perf_counter()
    lab = Lab()
    for name in args.only or FIGURES:
        t = time.perf_counter()
        path = FIGURES[name](lab, args.out)
        print(f"{path}  {time.perf_counter() - t:.1f} s", flush=True)
    print(f"{len(args.only or FIGURES)} figures in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
