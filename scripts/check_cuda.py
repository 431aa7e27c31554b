"""The checks that need a CUDA GPU, which CI (CPU only) cannot run:   python scripts/check_cuda.py

On the tests' tiny random-weight SD model (tests/conftest.py) and its diffusers twin (tests/reference.py):
1. txt2img on CUDA equals diffusers' StableDiffusionPipeline on CUDA with the same weights, prompt and noise, in fp32,
   fp16 and bf16. In fp32 within 1e-3 as on the CPU (tests/test_pipeline.py); in fp16/bf16 within twice diffusers'
   own half-vs-fp32 difference (+1e-3): rounding is all that may separate the two.
2. A seed gives the same image on CUDA as on the CPU (fp32; cuDNN's TF32 convolutions off, so that the comparison
   measures our code, not the TF32 rounding).
3. offload=True (CLIP and the VAE on the CPU, the UNet on the GPU) gives the image of everything on the GPU.
4. An fp16 VAE that overflows decodes again in fp32: a finite image, equal to the fp32 decode.
5. The trainers run on CUDA: CLIP, VAE and UNet a few steps each, the UNet also with bf16 autocast; two
   --deterministic UNet runs log the same losses bit for bit.
Prints one line per check and exits 1 if any fails. CHECK_DEVICE=cpu runs the same code on the CPU (a dry run of
the script itself: there the comparisons are CPU against CPU).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import TINY  # noqa: E402
from sdtorch.pipeline import Settings, seed_noise  # noqa: E402
from test_pipeline import diffusers_scheduler, diffusers_twin, tiny_pipe  # noqa: E402
from test_train_engine import SMALL  # noqa: E402

DEVICE = os.environ.get("CHECK_DEVICE", "cuda")

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
SETTINGS = dict(steps=8, cfg=7.5, sampler="Euler", seed=42, width=64, height=48, batch=2)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
failures = []


def report(name: str, value: float, limit: float) -> None:
    ok = value <= limit
    if not ok:
        failures.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name:<58} {value:.2e} (limit {limit:.2e})", flush=True)


def ours(dtype: str, device: str = DEVICE, offload: bool = False) -> torch.Tensor:
    """Our txt2img images in [0, 1], (B, 3, H, W) float32 on the CPU."""
    pipe = tiny_pipe(device, dtype=dtype, offload=offload)
    with torch.no_grad():
        return ((pipe.run(Settings(PROMPT, NEGATIVE, **SETTINGS)).float().cpu() + 1) / 2).clamp(0, 1)


def theirs(dtype: str, tokenizer_dir: Path) -> torch.Tensor:
    """diffusers' txt2img images in [0, 1] from the same weights and seed noise (A1111's Euler: "linspace" spacing)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **diffusers_twin(tiny_pipe(), tokenizer_dir), scheduler=diffusers_scheduler("Euler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).to(DEVICE, DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    latents = seed_noise(42, 2, (4, 6, 8)).to(DEVICE, DTYPES[dtype])
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, height=48, width=64,
                    latents=latents, num_images_per_prompt=2, output_type="pt").images.float().cpu()


def check_against_diffusers(tmp: Path) -> None:
    reference = {dtype: theirs(dtype, tmp) for dtype in DTYPES}
    report("txt2img fp32 on CUDA vs diffusers fp32 on CUDA, max abs", (ours("fp32") - reference["fp32"]).abs().max(),
           1e-3)
    for dtype in ("fp16", "bf16"):
        own_rounding = (reference[dtype] - reference["fp32"]).abs().max()
        print(f"     diffusers {dtype} vs diffusers fp32, max abs: {own_rounding:.2e}")
        report(f"txt2img {dtype} on CUDA vs diffusers {dtype} on CUDA, max abs",
               (ours(dtype) - reference[dtype]).abs().max(), 2 * own_rounding + 1e-3)


def check_devices() -> None:
    torch.backends.cudnn.allow_tf32 = False
    # the same seed noise on every device; what remains is the kernels' rounding over 8 steps
    report("seed 42 on CUDA vs on the CPU (fp32), max abs", (ours("fp32") - ours("fp32", "cpu")).abs().max(), 1e-4)
    torch.backends.cudnn.allow_tf32 = True
    report("offload=True vs all on the GPU (fp16), max abs",
           (ours("fp16", offload=True) - ours("fp16")).abs().max(), 1e-2)  # CLIP and VAE run fp32 on the CPU then


def check_vae_fallback() -> None:
    pipe = tiny_pipe(DEVICE, dtype="fp32")
    conv = pipe.vae.decoder.conv_in  # x1e5: past fp16's 65504 in the decoder, normalised back in fp32
    with torch.no_grad():
        conv.weight.mul_(1e5), conv.bias.mul_(1e5)
        pipe.vae.half().float()
        latents = seed_noise(1, 1, (4, 8, 8)).to(DEVICE)
        reference = pipe.decode_latents(latents)
        pipe.vae.half()
        overflowed = not torch.isfinite(pipe.vae.decode((latents / TINY.vae.scale_factor).half())).all()
        out = pipe.decode_latents(latents)
    print(f"     the fp16 decode overflows: {overflowed}; VAE dtype afterwards: {next(pipe.vae.parameters()).dtype}")
    report("fp16 VAE overflow -> fp32 decode vs fp32 decode, max abs",
           (out - reference).abs().max() if overflowed and torch.isfinite(out).all() else float("inf"), 0.0)


def train(tmp: Path, kind: str, out: str, *extra: str) -> list[float]:
    """`sdtorch train KIND` on CUDA for a few steps; its logged training losses."""
    cmd = [sys.executable, "-m", "sdtorch.cli", "train", kind, "--data", "shapes", "--data-size", "256",
           "--resolution", "32", "--holdout", "8", "--steps", "8", "--batch-size", "8", "--warmup-steps", "2",
           "--log-every", "1", "--eval-every", "4", "--sample-every", "8", "--device", DEVICE, "--quiet",
           "--out", str(tmp / out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        return [float("nan")]
    records = [json.loads(line) for line in (tmp / out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def check_training(tmp: Path) -> None:
    for kind in ("clip", "vae"):
        losses = train(tmp, kind, kind, *(a for item in SMALL[kind] for a in ("--set", item)))
        report(f"train {kind} on CUDA: finite losses (1 = not)",
               float(not torch.isfinite(torch.tensor(losses)).all()), 0)
    parts = ["--clip", str(tmp / "clip" / "model.safetensors"), "--vae", str(tmp / "vae" / "model.safetensors"),
             *(a for item in SMALL["unet"] for a in ("--set", item))]
    bf16 = train(tmp, "unet", "unet-bf16", *parts, "--precision", "bf16")
    report("train unet on CUDA, bf16 autocast: finite losses (1 = not)",
           float(not torch.isfinite(torch.tensor(bf16)).all()), 0)
    a = train(tmp, "unet", "unet-a", *parts, "--deterministic")
    b = train(tmp, "unet", "unet-b", *parts, "--deterministic")
    print(f"     --deterministic losses: {a}")
    report("two --deterministic UNet runs, max |loss difference|",
           max(abs(x - y) for x, y in zip(a, b, strict=True)) if len(a) == len(b) == 8 else float("inf"), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else DEVICE}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for check in (lambda: check_against_diffusers(Path(tmp)), check_devices, check_vae_fallback,
                      lambda: check_training(Path(tmp))):
            try:
                check()
            except Exception as e:  # one broken check must not hide the others' results
                failures.append(repr(e))
                print(f"FAIL {e!r}", flush=True)
                import traceback
                traceback.print_exc()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
