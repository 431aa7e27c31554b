"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors that stand in for a word.

An embedding file holds n vectors of the text encoder's width. A1111 (modules/textual_inversion) names each by its
file name; where that name appears in a prompt, its tokens are replaced by the n vectors, which take n places in
the 75-token chunk (an embedding never straddles two chunks) and go into CLIP where token embeddings would, before
the position embeddings are added. Layouts read, told apart by their tensor names:
    A1111 .pt           {"string_to_param": {"*": (n, D)}, "name": ..., "step": ...}
    .safetensors        {"emb_params": (n, D)}
    diffusers concept   {"<token>": (D,)}  (one tensor, as `learned_embeds.bin`)
    SDXL                {"clip_l": (n, 768), "clip_g": (n, 1280)}: one set of vectors per text tower
"""
from __future__ import annotations

import copy
import hashlib
import pickle
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint.formats import detect_format, read_tensor_file
from .lora import NetworkError

EMBEDDING_EXTENSIONS = (".pt", ".safetensors", ".bin")
_WIDTH_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}


@dataclass
class Embedding:
    name: str
    vectors: torch.Tensor | dict[str, torch.Tensor]  # (n, D) fp32; SDXL: {"clip_l": (n, 768), "clip_g": (n, 1280)}
    path: Path

    def for_width(self, width: int) -> torch.Tensor:
        """The (n, width) vectors for a text tower of that width; NetworkError naming the family they are for."""
        if isinstance(self.vectors, dict):  # SDXL's: ViT-L's clip_l (768 wide), bigG's clip_g (1280)
            fitting = [v for v in self.vectors.values() if v.shape[1] == width]
            if len(fitting) != 1 or len(self.vectors) != 2:
                raise NetworkError(f"{self.path}: an SDXL embedding (clip_l/clip_g); this text encoder is "
                                   f"{width}-wide ({_WIDTH_FAMILIES.get(width, 'another model')})")
            return fitting[0]
        if self.vectors.shape[1] != width:
            family = _WIDTH_FAMILIES.get(self.vectors.shape[1], "another model")
            raise NetworkError(f"{self.path}: an embedding for {family} ({self.vectors.shape[1]}-wide vectors); "
                               f"this text encoder is {width}-wide")
        return self.vectors

    @property
    def short_hash(self) -> str:
        """A1111's "TI hashes" value: the first 12 hex digits of the whole file's sha256."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()[:12]


def read_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """An embedding file's vectors, (n, D) in fp32; pickles only through the weights-only loader."""
    path = Path(path)
    tensors = _flat_tensors(path)
    keys = list(tensors)
    if set(keys) == {"clip_l", "clip_g"}:
        vectors = {k: tensors[k].detach().float().clone() for k in keys}
        if any(v.dim() != 2 for v in vectors.values()) or len({len(v) for v in vectors.values()}) != 1:
            raise NetworkError(f"{path}: SDXL embedding vectors of shapes "
                               f"{[tuple(v.shape) for v in vectors.values()]}, expected (n, 768) and (n, 1280)")
        return Embedding(name or path.stem, vectors, path)
    params = [k for k in keys if k.startswith("string_to_param.") or k == "emb_params"]
    if len(params) > 1:
        raise NetworkError(f"{path}: holds {len(params)} embeddings; A1111 takes files with one")
    if not params and len(keys) != 1:
        raise NetworkError(f"{path}: not a textual-inversion embedding (no string_to_param or emb_params)")
    vectors = tensors[params[0] if params else keys[0]].detach().float().clone()
    if vectors.dim() == 1:  # a diffusers concept: one vector
        vectors = vectors[None]
    if vectors.dim() != 2:
        raise NetworkError(f"{path}: embedding vectors of shape {tuple(vectors.shape)}, expected (n, width)")
    return Embedding(name or path.stem, vectors, path)


def _flat_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by dotted name ("string_to_param.*" from A1111's nested dict); pickles are read by torch's
    weights-only unpickler, which refuses anything that would run code."""
    fmt = detect_format(path)
    if fmt == "safetensors":
        with ExitStack() as files:
            refs, _ = read_tensor_file(path, fmt, files)
            return {k: ref.load(None, torch.device("cpu")).clone() for k, ref in refs.items()}
    if fmt not in ("torch-zip", "pickle"):
        raise NetworkError(f"{path}: a {fmt}, not an embedding file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise NetworkError(f"{path}: refused: it holds objects other than tensors, which could run code") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise NetworkError(f"{path}: damaged embedding file ({str(e).splitlines()[0]})") from None
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)

    walk("", obj)
    return flat


class EmbeddingLibrary:
    """An embeddings folder (A1111's `embeddings/`): every file's name is a word that prompts may use. Names are read
    up front; a file is loaded when a prompt first uses it (and again when it changes on disk)."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None
        self._loaded: dict[Path, tuple[int, Embedding]] = {}

    def files(self) -> dict[str, Path]:
        if self.folder is None or not self.folder.is_dir():
            return {}
        found = {}
        for path in sorted(self.folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in EMBEDDING_EXTENSIONS and path.stat().st_size:
                found.setdefault(path.stem, path)
        return found

    def lookup(self, tokenizer) -> dict[int, list[tuple[list[int], Path]]]:
        """First token id -> [(the name's token ids, file)], longest first (A1111's ids_lookup)."""
        table: dict[int, list[tuple[list[int], Path]]] = {}
        for name, path in self.files().items():
            ids = tokenizer.encode(name)
            if ids:
                table.setdefault(ids[0], []).append((ids, path))
        for matches in table.values():
            matches.sort(key=lambda item: len(item[0]), reverse=True)
        return table

    def load(self, path: Path, width: int) -> Embedding:
        mtime = path.stat().st_mtime_ns
        cached = self._loaded.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, read_embedding(path))
            self._loaded[path] = cached
        embedding = cached[1]
        return Embedding(embedding.name, embedding.for_width(width), embedding.path)  # this tower's vectors


class EmbeddingMatcher:
    """What `prompts.tokenize_prompt` asks while it walks a prompt's tokens; remembers the embeddings it used."""

    def __init__(self, library: EmbeddingLibrary, tokenizer, width: int):
        self.library, self.width = library, width
        self.table = library.lookup(tokenizer)
        self.used: dict[str, Embedding] = {}

    def with_width(self, width: int) -> EmbeddingMatcher:
        """The same names, for a text tower `width` wide (SDXL's second tower); the embeddings used are shared."""
        other = copy.copy(self)  # shallow: the same table and `used`
        other.width = width
        return other

    def match(self, tokens: list[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at `position`, and how many tokens that name takes."""
        for ids, path in self.table.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                embedding = self.library.load(path, self.width)
                self.used[embedding.name] = embedding
                return embedding, len(ids)
        return None
