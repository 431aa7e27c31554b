"""The models a server may load: files under --models-dir (and the one given by --model), looked up by name only.

A request names a model by A1111's title ("sub/name.safetensors [hash]"), its file name or its stem; the name is
matched against this list, never joined to a path, so "../x" or "/etc/passwd" can name nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")


@dataclass
class Checkpoint:
    title: str  # A1111: the path relative to the models folder
    path: Path
    hash: str | None = None  # A1111's short hash, known once the model has been loaded

    @property
    def model_name(self) -> str:
        return Path(self.title).with_suffix("").as_posix() if self.path.is_file() else self.title

    def as_a1111(self) -> dict:
        title = f"{self.title} [{self.hash}]" if self.hash else self.title
        return {"title": title, "model_name": self.model_name, "hash": self.hash, "sha256": None,
                "filename": str(self.path), "config": None}


class Checkpoints:
    def __init__(self, models_dir: str | Path | None, extra: str | Path | None = None):
        self.models_dir = Path(models_dir) if models_dir else None
        self.extra = Path(extra) if extra else None
        self.items: dict[str, Checkpoint] = {}
        self.refresh()

    def refresh(self) -> None:
        """Scan the folder again (A1111's refresh-checkpoints); hashes already known are kept."""
        found = {}
        if self.models_dir is not None and self.models_dir.is_dir():
            for path in sorted(self.models_dir.rglob("*")):
                is_model = path.is_file() and path.suffix.lower() in MODEL_SUFFIXES
                if is_model or (path.is_dir() and (path / "model_index.json").is_file()):
                    title = path.relative_to(self.models_dir).as_posix()
                    found[title] = Checkpoint(title, path)
        if self.extra is not None and all(c.path.resolve() != self.extra.resolve() for c in found.values()):
            found.setdefault(self.extra.name, Checkpoint(self.extra.name, self.extra))
        for title, checkpoint in found.items():
            if title in self.items:
                checkpoint.hash = self.items[title].hash
        self.items = found

    def find(self, name: str) -> Checkpoint | None:
        """The checkpoint with this title, title + " [hash]", file name or stem; None if there is none."""
        name = _HASH_SUFFIX.sub("", name.strip())
        for checkpoint in self.items.values():
            if name in (checkpoint.title, checkpoint.model_name, checkpoint.path.name, checkpoint.path.stem):
                return checkpoint
        return None

    def of_path(self, path: Path) -> Checkpoint | None:
        return next((c for c in self.items.values() if c.path.resolve() == path.resolve()), None)
