"""The built-in model's recipe (scripts/train_builtin.sh) runs: every stage for two steps on a little data, then the
export, the evaluation and (skipped here) the README's pictures, so the script cannot rot while it is not run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SMALL = "--steps 2 --batch-size 4 --data-size 16 --eval-every 1000 --sample-every 1000 --warmup-steps 1"


@pytest.mark.skipif(shutil.which("bash") is None, reason="the recipe is a bash script")
def test_the_recipe_runs_each_stage(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "CLIP_ARGS": SMALL, "VAE_ARGS": SMALL, "UNET_ARGS": f"{SMALL} --cache-encodings 16",
           "EVAL_ARGS": "--count 2 --steps 2", "MODEL_OUT": str(tmp_path / "builtin.safetensors"), "PICTURES": "0"}
    run = subprocess.run(["bash", "scripts/train_builtin.sh", str(tmp_path / "run")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for stage in ("clip", "vae", "unet"):
        assert (tmp_path / "run" / stage / "model.safetensors").is_file(), stage
    assert (tmp_path / "builtin.safetensors").stat().st_size > 0
    assert "2 shapes" in run.stdout or "1 shape" in run.stdout  # the evaluation's table
