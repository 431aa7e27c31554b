"""One rank-32 LoRA on the SD 1.5 size: UNet speed and peak RSS with none, with the LoRA merged into the
weights (sdtorch's way, `sdtorch.lora`), and with its low-rank term computed beside each layer (the alternative),
plus the time to switch LoRAs.

    python benchmarks/bench_lora.py [--rounds 3] [--size 256] [--steps 2] [--dir DIR | --files DIR]

Random SD 1.5 weights are written once as an fp32 .safetensors (memory-mapped as users load it), and a kohya LoRA
of rank 32 (alpha 16) on the layers kohya trains by default: the UNet's transformer blocks (attention, feed-forward,
proj_in/out) and the text encoder's attention and MLP. Each variant runs in its own process (its own peak RSS), the
variants take turns round after round so all see the same machine. Reported per variant: the median UNet call with
CFG (batch 2) after the first, which also packs the weights, and the process's peak RSS (load included).
A benchmark, never a test.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("none", "merged", "beside")


def make_files(folder: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    from sdtorch.checkpoint.diffusers_keys import to_diffusers, unet_rules
    from sdtorch.config import SD1
    from sdtorch.models import StableDiffusionModels

    with torch.device("meta"):
        models = StableDiffusionModels(SD1)
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in models.state_dict().items()},
              folder / "sd15.safetensors")
    rules, lora = unet_rules(SD1.unet), {}
    targets = [("lora_unet_" + to_diffusers(n + ".weight", rules).removesuffix(".weight").replace(".", "_"), m)
               for n, m in models.unet.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and (".transformer_blocks." in n
                                                             or n.endswith(("proj_in", "proj_out")))]
    targets += [("lora_te_text_model_" + n.replace(".", "_"), m) for n, m in models.text_encoder.named_modules()
                if isinstance(m, nn.Linear) and (".self_attn." in n or ".mlp." in n)]
    for key, m in targets:
        extra = (1, 1) if m.weight.dim() == 4 else ()
        lora[f"{key}.lora_down.weight"] = torch.randn(32, m.weight.shape[1], *extra, generator=g) * 0.01
        lora[f"{key}.lora_up.weight"] = torch.randn(m.weight.shape[0], 32, *extra, generator=g) * 0.01
        lora[f"{key}.alpha"] = torch.tensor(16.0)
    save_file(lora, folder / "lora32.safetensors")
    return folder / "sd15.safetensors", folder / "lora32.safetensors"


def add_beside(pipe, path: Path) -> None:
    """The alternative: y = layer(x) + scale · up(down(x)), computed by a forward hook, weights untouched."""
    from sdtorch.lora import read_network

    network = read_network(path, pipe.models)
    for (part, name), update in network.layers.items():
        layer = getattr(pipe.models, part).get_submodule(name)
        down, up, scale = update.tensors["down"], update.tensors["up"], update.scale()

        def hook(module, args, out, down=down, up=up, scale=scale):
            x = args[0]
            if isinstance(module, nn.Linear):
                return out + F.linear(F.linear(x, down), up) * scale
            return out + F.conv2d(F.conv2d(x, down), up) * scale

        layer.register_forward_hook(hook)


def child(variant: str, model: str, lora: str, size: int, steps: int) -> dict:
    """Load, merge or hook the LoRA, then time UNet calls with CFG (batch 2) as the sampling loop makes them: in the
    packed-weights block, the first call (which packs) untimed."""
    import sdtorch
    from sdtorch.models.packed import packed_weights

    pipe = sdtorch.load(model, lora_dir=str(Path(lora).parent))
    result = {}
    if variant == "merged":
        t0 = time.perf_counter()
        pipe.networks.set([(pipe.network("lora32"), 1.0, 1.0)])
        result["first_apply_s"] = time.perf_counter() - t0  # reading the file included
    elif variant == "beside":
        add_beside(pipe, Path(lora))
    with torch.inference_mode():
        cond, uncond = pipe.encode_prompts("a photo of a cat", "blurry", 1)
        context = torch.cat([uncond, cond])
        x = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500, 500])
        times = []
        with packed_weights(pipe.unet):
            for _ in range(steps + 1):
                start = time.perf_counter()
                pipe.unet(x, t, context)
                times.append(time.perf_counter() - start)
    result.update(step=statistics.median(times[1:]),
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    if variant == "merged":  # switching: back to the base weights, and the (already read) LoRA merged again
        t0 = time.perf_counter()
        pipe.networks.set([])
        t1 = time.perf_counter()
        pipe.networks.set([(pipe.network("lora32"), 1.0, 1.0)])
        result.update(restore_s=t1 - t0, apply_s=time.perf_counter() - t1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed UNet calls per process")
    parser.add_argument("--dir", help="where to write the 4.3 GB of weights (default: a temporary folder)")
    parser.add_argument("--files", help="a folder with sd15.safetensors and lora32.safetensors from an earlier run")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, model, lora, size, steps = args.child
        print(json.dumps(child(variant, model, lora, int(size), int(steps))))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = Path(args.files) if args.files else None
        model, lora = (files / "sd15.safetensors", files / "lora32.safetensors") if files else make_files(Path(tmp))
        results = {v: [] for v in VARIANTS}
        for round_ in range(args.rounds):
            for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                out = subprocess.run([sys.executable, __file__, "--child", variant, str(model), str(lora),
                                      str(args.size), str(args.steps)], capture_output=True, text=True, check=True)
                results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(variant, results[variant][-1], flush=True)
    base = {k: statistics.median(r[k] for r in results["none"]) for k in ("step", "peak_rss_gb")}
    for variant, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{variant:>7}: UNet step {med['step']:.2f} s ({med['step'] / base['step']:.3f}x), "
              f"peak RSS {med['peak_rss_gb']:.2f} GB "
              f"({med['peak_rss_gb'] / base['peak_rss_gb']:.3f}x)"
              + (f", restore {med['restore_s']:.2f} s, apply {med['apply_s']:.2f} s" if "apply_s" in med else ""))


if __name__ == "__main__":
    main()
