"""Load time and peak memory of an SD 1.5-size checkpoint: sdtorch's loader against diffusers' from_single_file.

    python benchmarks/bench_load.py [--dir DIR] [--repeat 2]

Writes random SD 1.5 weights (1.07 B parameters) as fp32 (4.3 GB) and fp16 (2.1 GB) .safetensors without metadata,
as community files come, plus an offline diffusers config folder. Every load runs in a fresh subprocess, which
reports its load time, the time to then touch every weight once (memory-mapped weights are read on first touch, so
"load + touch" is the honest total), and its peak RSS (VmHWM) minus its RSS after imports. Targets (issue 3): load
time <= 0.5x diffusers, peak RSS <= 1.1x the loaded weights' bytes.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
CASES = [("fp32", "fp32"), ("fp16", "fp32"), ("fp16", "fp16")]  # (file dtype, load dtype)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(loader: str, path: str, dtype: str, config_dir: str) -> dict:
    """One load in this (fresh) process; returns its measurements."""
    if loader == "ours":
        from sdtorch.checkpoint import load_checkpoint
    else:
        from diffusers import StableDiffusionPipeline
    baseline = rss_kib("VmRSS")
    start = time.perf_counter()
    if loader == "ours":
        models = load_checkpoint(path, dtype=DTYPES[dtype]).models
        modules = [models.unet, models.vae, models.text_encoder]
    else:
        pipe = StableDiffusionPipeline.from_single_file(path, config=config_dir, local_files_only=True,
                                                        safety_checker=None, torch_dtype=DTYPES[dtype])
        modules = [pipe.unet, pipe.vae, pipe.text_encoder]
    loaded = time.perf_counter()
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) if p.dtype != torch.float32 else float(p.sum())
                       for m in modules for p in m.parameters())
    touched = time.perf_counter()
    return {"load_s": loaded - start, "touch_s": touched - loaded, "peak_bytes": (rss_kib("VmHWM") - baseline) * 1024,
            "weights_bytes": sum(p.numel() * p.element_size() for m in modules for p in m.parameters()),
            "checksum": checksum}


def make_files(folder: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    from sdtorch.checkpoint.diffusers_folder import write_diffusers_configs
    from sdtorch.config import SD1
    from sdtorch.models import StableDiffusionModels
    from sdtorch.tokenizer import CLIPTokenizer

    write_diffusers_configs(SD1, CLIPTokenizer.default(), folder / "config")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in StableDiffusionModels(SD1).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    files = {"fp32": folder / "sd15-fp32.safetensors", "fp16": folder / "sd15-fp16.safetensors"}
    save_file(state, files["fp32"])
    save_file({k: v.half() for k, v in state.items()}, files["fp16"])
    return files


def run_child(loader: str, path: Path, dtype: str, config_dir: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", loader, str(path), dtype, str(config_dir)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write the 6.4 GB of test files (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=2, help="loads per loader and case; the fastest is reported")
    parser.add_argument("--child", nargs=4, metavar=("LOADER", "PATH", "DTYPE", "CONFIG_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        files = make_files(folder)
        print(f"wrote SD 1.5-size files in {time.perf_counter() - start:.0f} s", flush=True)
        header = (f"{'file':>5} {'as':>5} {'loader':>9} {'load s':>8} {'+touch s':>9} {'peak GB':>8} {'weights GB':>11}"
                  f" {'peak/weights':>13}")
        rows, ratios = [header], []
        for file_dtype, dtype in CASES:
            for path in files.values():  # both files into the page cache, so neither loader pays the disk
                path.read_bytes()
            result = {}
            for loader in ("ours", "diffusers"):
                runs = [run_child(loader, files[file_dtype], dtype, folder / "config") for _ in range(args.repeat)]
                r = min(runs, key=lambda x: x["load_s"] + x["touch_s"])
                result[loader] = r
                rows.append(f"{file_dtype:>5} {dtype:>5} {loader:>9} {r['load_s']:8.2f}"
                            f" {r['load_s'] + r['touch_s']:9.2f} {r['peak_bytes'] / 1e9:8.2f}"
                            f" {r['weights_bytes'] / 1e9:11.2f} {r['peak_bytes'] / r['weights_bytes']:13.2f}")
                print(rows[-1], flush=True)
            ours, theirs = result["ours"], result["diffusers"]
            # both loaders must hold the same weights (sums differ only in summation order)
            assert abs(ours["checksum"] - theirs["checksum"]) <= 1e-3 * abs(theirs["checksum"]) + 1.0
            ratios.append(f"{file_dtype}->{dtype}: load {ours['load_s'] / theirs['load_s']:.2f}x, load+touch "
                          f"{(ours['load_s'] + ours['touch_s']) / (theirs['load_s'] + theirs['touch_s']):.2f}x, "
                          f"peak RSS {ours['peak_bytes'] / theirs['peak_bytes']:.2f}x diffusers")
        print("\n".join(["", *rows, "", "ours / diffusers:", *ratios]))


if __name__ == "__main__":
    main()
