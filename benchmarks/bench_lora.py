"""One rank-32 LoRA on the SD 1.5 size: generation speed and peak RSS with none, with the LoRA merged into each
model's weights for its phase (sdtorch's way, `sdtorch.lora`), and with its low-rank term computed beside each layer
(the alternative), plus the time to merge and restore (what switching LoRAs costs).

    python benchmarks/bench_lora.py [--rounds 3] [--size 512] [--steps 4] [--dir DIR | --files DIR]

Random SD 1.5 weights are written once as an fp32 .safetensors (memory-mapped as users load it), and a kohya LoRA
of rank 32 (alpha 16) on the layers kohya trains by default: the UNet's transformer blocks (attention, feed-forward,
proj_in/out) and the text encoder's attention and MLP. Each variant runs in its own process (its own peak RSS), the
variants take turns round after round so all see the same machine. Reported per variant: the median sampling step
with CFG after the first (which also packs the weights), the whole txt2img call, and the process's peak RSS (load
and VAE decode included), each also as its ratio to "none" in the same round.
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
    """Load, then one generation as a user runs it (tune_allocator as the command line): the prompt carries the
    LoRA's tag ("merged": each model merged for its own phase), or the LoRA is hooked beside its layers, or none.
    Reported: the median step (the first, which also packs, left out), the whole generation, and peak RSS."""
    import sdtorch

    pipe = sdtorch.load(model, lora_dir=str(Path(lora).parent), tune_allocator=True)
    prompt = "a photo of a cat" + (" <lora:lora32:1>" if variant == "merged" else "")
    if variant == "beside":
        add_beside(pipe, Path(lora))
    stamps = []
    start = time.perf_counter()
    pipe.txt2img(prompt, steps=steps, width=size, height=size, seed=0, sampler="Euler",
                 callback=lambda *_: stamps.append(time.perf_counter()))
    result = dict(generation=time.perf_counter() - start,
                  step=statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False)),
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    if variant == "merged":  # what a generation pays to merge the (already read) LoRA, and to restore
        networks = pipe.networks
        networks.use([(pipe.network("lora32"), 1.0, 1.0)])
        t0 = time.perf_counter()
        with networks.merged("text_encoder"):
            pass
        with networks.merged("unet"):
            t1 = time.perf_counter()
        result.update(merge_s=t1 - t0, restore_s=time.perf_counter() - t1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of each generation")
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
    print(f"SD 1.5 size, {args.size}x{args.size}, {args.steps} Euler steps with CFG, {args.rounds} rounds; "
          f"ratios to 'none' per round (median, min-max)")
    for variant, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}

        def ratio(key, runs=runs):
            r = [run[key] / base[key] for run, base in zip(runs, results["none"], strict=True)]
            return f"{statistics.median(r):.3f}x ({min(r):.3f}-{max(r):.3f})"

        print(f"{variant:>7}: step {med['step']:.2f} s {ratio('step')}, generation {med['generation']:.1f} s "
              f"{ratio('generation')}, peak RSS {med['peak_rss_gb']:.2f} GB {ratio('peak_rss_gb')}"
              + (f"; merge {med['merge_s']:.2f} s, restore {med['restore_s']:.3f} s" if "merge_s" in med else ""))


if __name__ == "__main__":
    main()
