"""Training checkpoints: a run's whole state in `checkpoints/step-00001000.pt` (torch.save of tensors and plain
containers, so that torch.load(weights_only=True) reads it), written so that a crash never leaves half a file, and
the global RNG states it carries for an exact resume. (Model files for SD tools are `sdtorch.checkpoint`'s.)
"""
import os
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


@contextmanager
def atomic_file(path: str | Path):
    """Open a temp file that becomes `path` when the block ends, so a crash leaves either the old file or the whole
    new one: write, fsync, rename over `path`, then fsync the folder so the rename itself is on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def remove_stale_temp_files(folder: Path) -> None:
    """Temp files of writes a kill interrupted (`.NAME.tmp-PID`, see atomic_file) whose process is gone."""
    for tmp in folder.glob(".*.tmp-*"):
        pid = tmp.name.rpartition(".tmp-")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours (EPERM)
        return True
    return True


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp files of an interrupted write are never matched)."""
    return sorted((Path(out_dir) / "checkpoints").glob("step-*.pt"))


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """The checkpoint `resume` names: a path, or "latest" (None when the run has none yet: start fresh)."""
    if resume == "latest":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    return path


def rng_state() -> dict:
    """Every global RNG's state as tensors and plain containers, so `torch.load(weights_only=True)` reads it."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
