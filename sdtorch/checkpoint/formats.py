"""Tensor files, read without trusting them: safetensors, torch's zip pickles, legacy pickles.

The format is decided by the first bytes, never by the extension: a pickle renamed `.safetensors` is still a pickle.
Tensors come back as `TensorRef`s (shape and dtype known, bytes not yet read), so a loader can check a whole file
against a model before it reads a single weight.
"""
import hashlib
import json
import mmap
import os
import pickle
import re
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch

from .errors import CheckpointNotFoundError, CorruptCheckpointError, NotACheckpointError, UnsafeCheckpointError

# safetensors' dtype names (https://github.com/huggingface/safetensors, "Format")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_SAFETENSORS_HEADER = 100_000_000  # the format's own limit; a larger "length" means these bytes are something else


@dataclass(frozen=True)
class TensorRef:
    """A tensor still in its file: shape and dtype from the header; `load` reads it, cast and placed."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    fetch: Callable[[torch.dtype, torch.device], torch.Tensor]

    def load(self, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        """The tensor in `dtype` (None: as stored; integer tensors are never cast) on `device`."""
        target = self.dtype if dtype is None or not self.dtype.is_floating_point else dtype
        return self.fetch(target, device)

    def reshaped(self, shape: tuple[int, ...]) -> "TensorRef":
        return TensorRef(tuple(shape), self.dtype, lambda dtype, device: self.fetch(dtype, device).reshape(shape))

    def transformed(self, shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor]) -> "TensorRef":
        """This tensor through `fn` (a slice, a transpose...) once read, as a contiguous tensor of its own."""
        return TensorRef(tuple(shape), self.dtype, lambda dtype, device: fn(self.fetch(dtype, device)).contiguous())


def detect_format(path: str | Path) -> str:
    """'safetensors' | 'torch-zip' | 'pickle' | 'diffusers-folder', from the content; raises CheckpointError."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
            return "diffusers-folder"
        raise NotACheckpointError(f"{path}: a folder, but not a diffusers model (no model_index.json, no unet/)")
    check_regular_file(path)
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors first, by its whole structure (8-byte little-endian header length, then the JSON header's "{"): the
    # length's low byte can be anything, 0x80 (pickle's PROTO opcode) included
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= MAX_SAFETENSORS_HEADER:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"  # torch.save's default since 1.6: a zip holding data.pkl and one file per storage
    if head[:1] == b"\x80":
        return "pickle"  # the PROTO opcode: a raw pickle (torch.save's legacy format, or plain pickle.dump)
    raise NotACheckpointError(f"{path}: not a checkpoint: neither safetensors, a torch zip nor a pickle "
                              f"(starts with {head[:8]!r})")


def check_regular_file(path: Path) -> None:
    """Only regular files are opened: a FIFO would block the reader forever, a device could be endless."""
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise NotACheckpointError(f"{path}: not a regular file (a FIFO, socket or device)")


class SafetensorsFile:
    """A safetensors file: an 8-byte little-endian length, a JSON header {name: {dtype, shape, data_offsets}}, then
    the tensors' bytes. The header is checked against the file's size on open, so a truncated download fails here,
    naming the file, before any weight is read.

    Tensors are read through a private memory map: those that need no cast stay zero-copy views of it (pages are
    read on first touch and count once); those cast or moved are converted one at a time, and their source pages
    unmapped right after, so the file is never held in memory alongside its converted copy.
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (held open for lazy reads; closed by close())
        try:
            self._parse_header()
            # ACCESS_COPY (MAP_PRIVATE): writable views without touching the file; callers replace files atomically
            # (see write_safetensors), so a mapped file is never truncated under a loaded model
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        n = int.from_bytes(self._file.read(8), "little")
        if 8 + n > size:
            raise CorruptCheckpointError(f"{self.path}: truncated: its header alone needs {8 + n} bytes, "
                                         f"the file has {size}")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{self.path}: damaged safetensors header ({e})") from None
        except RecursionError:  # JSON nested thousands deep: no real header is
            raise CorruptCheckpointError(f"{self.path}: damaged safetensors header (nested too deep)") from None
        self.data_start = 8 + n
        self.metadata, self.entries = parse_safetensors_header(header, size - self.data_start, str(self.path))
        self.entries = {name: (dtype, shape, self.data_start + begin) for name, (dtype, shape, begin)
                        in self.entries.items()}

    def tensors(self) -> dict[str, TensorRef]:
        return {name: TensorRef(shape, dtype, self._fetcher(name)) for name, (dtype, shape, _) in self.entries.items()}

    def _fetcher(self, name: str):
        return lambda dtype, device: self._read(name, dtype, device)

    def _read(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        stored, shape, offset = self.entries[name]
        numel = torch.Size(shape).numel()
        if numel == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        if offset % stored.itemsize:
            # files from safetensors < 0.3 do not pad their header, so a tensor may sit unaligned: read it into
            # aligned memory rather than hand kernels a misaligned pointer
            raw = torch.empty(numel * stored.itemsize, dtype=torch.uint8)
            self._file.seek(offset)
            if self._file.readinto(raw.numpy()) != raw.numel():
                raise CorruptCheckpointError(f"{self.path}: truncated while reading {name}")
            return raw.view(stored).reshape(shape).to(device=device, dtype=dtype)
        view = torch.frombuffer(self._map, dtype=stored, count=numel, offset=offset).reshape(shape)
        if dtype == stored and device.type == "cpu":
            return view  # zero-copy: the OS reads these pages on first touch
        converted = view.to(device=device, dtype=dtype)
        self._release(offset, numel * stored.itemsize)
        return converted

    def _release(self, offset: int, size: int) -> None:
        """Unmap a converted tensor's source pages: only its copy is kept, and holding both would make an fp16 -> fp32
        load peak at 1.5x the weights. Pages shared with a neighbouring tensor stay (the range is rounded inwards)."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # not on Windows: the pages then stay until the load ends
            return
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + size) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        # the map itself stays open while loaded tensors view it; it is released with the last of them
        self._file.close()


def parse_safetensors_header(header, data_size: int, where: str) -> tuple[dict[str, str], dict]:
    """(metadata, {name: (dtype, shape, begin)}) of a parsed JSON header, checked as the reference library checks it:
    every entry a {dtype, shape, data_offsets} of the right types, and the tensors tiling the data exactly, in offset
    order, with no gap, overlap or byte outside it (so no tensor can read the header or another tensor's bytes)."""
    def bad(what: str):
        return CorruptCheckpointError(f"{where}: damaged safetensors header: {what}")

    if not isinstance(header, dict):
        raise bad(f"a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise bad(f"__metadata__ is a {type(metadata).__name__}, not an object of strings")
    entries, spans = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise bad(f"{name}: not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"{name}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"{name}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise bad(f"{name}: data_offsets {offsets!r} is not [begin, end]")
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[dtype], tuple(shape), offsets
        if end - begin != torch.Size(shape).numel() * dtype.itemsize:
            raise CorruptCheckpointError(f"{where}: {name}: {end - begin} bytes cannot hold {shape} {dtype}")
        entries[name] = (dtype, shape, begin)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"{name} starts at data byte {begin}, expected {position} (tensors overlap or leave a gap)")
        position = end
    if position > data_size:
        raise CorruptCheckpointError(f"{where}: truncated: its tensors need {position} bytes of data, "
                                     f"the file has {data_size}")
    if position < data_size:
        raise bad(f"{data_size - position} bytes after the last tensor belong to none")
    return {str(k): str(v) for k, v in metadata.items()}, entries


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _InertObject:
    """Stands in for the PyTorch Lightning callback objects that original LDM .ckpt files carry next to their
    weights: unpickled into this empty class, so their plain-data state is kept and no Lightning code runs."""


# Names that real SD checkpoints pickle besides tensors, mapped to inert stand-ins (ComfyUI and A1111 allow the same).
_INERT_GLOBALS = [(_InertObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def read_torch_pickle(path: Path, fmt: str) -> dict[str, TensorRef]:
    """Tensors of a .ckpt/.pt/.bin, unpickled by torch's weights-only unpickler: a payload that would call anything
    (os.system, open, ...) is refused before it runs. Zip files are memory-mapped; a `state_dict` wrapper is removed."""
    obj = safe_torch_load(path, fmt)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise NotACheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: TensorRef(tuple(t.shape), t.dtype, _caster(t)) for k, t in obj.items() if isinstance(t, torch.Tensor)}


def safe_torch_load(path: Path, fmt: str | None = None):
    """torch.load with weights_only=True, every failure a CheckpointError naming the file (never torch's advice to
    retry with weights_only=False: that would run whatever the file holds). `fmt` None: detected."""
    fmt = fmt or detect_format(path)
    if fmt not in ("torch-zip", "pickle"):
        raise NotACheckpointError(f"{path}: a {fmt}, not a torch.save file")
    try:
        with ExitStack() as stack, torch.serialization.safe_globals(_INERT_GLOBALS):
            if path.name.endswith(".safetensors"):
                # torch.load picks its reader by the path's extension; a pickle mislabelled .safetensors goes in as an
                # open file instead (which torch cannot memory-map: a rare file, read whole)
                source, mmap_it = stack.enter_context(open(path, "rb")), False
            else:
                source, mmap_it = path, fmt == "torch-zip"
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap_it)
    except pickle.UnpicklingError as e:
        called = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = (f"unpickling it would call {called[1]}" if called
                else "it holds objects other than tensors (" + _first_line_of_unpickler_error(str(e)) + ")")
        raise UnsafeCheckpointError(
            f"{path}: refused to load: {what}, which could run arbitrary code. sdtorch reads only tensors from pickle "
            f"checkpoints; use a .safetensors release of this model") from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways (EOF, IndexError, OverflowError, ...)
        first = (str(e).splitlines() or [""])[0] or e.__class__.__name__
        raise CorruptCheckpointError(f"{path}: truncated or damaged {fmt} file ({first})") from None


def _caster(t: torch.Tensor):
    return lambda dtype, device: t.to(device=device, dtype=dtype)  # no copy when nothing changes


def _first_line_of_unpickler_error(message: str) -> str:
    """The line saying what was refused; torch's lines advising weights_only=False are never shown."""
    found = re.search(r"(Unsupported[^\n]*)", message)
    if found:
        return found[1].strip()
    lines = [line.strip() for line in message.splitlines() if line.strip() and "weights_only" not in line]
    return lines[0] if lines else "unsupported content"


def read_tensor_file(path: Path, fmt: str, files: ExitStack) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """(tensors, safetensors header metadata) of one file; `files` keeps it open until the caller is done."""
    if fmt == "safetensors":
        st = SafetensorsFile(path)
        files.callback(st.close)
        return st.tensors(), st.metadata
    if fmt in ("torch-zip", "pickle"):
        return read_torch_pickle(path, fmt), {}
    raise NotACheckpointError(f"{path}: a {fmt}, expected a single tensor file")


def read_tensor_index(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(shape of every tensor, header metadata) of a single file, reading no weights where the format allows:
    what `sdtorch info` shows, and what `detect_family` looks at."""
    path = Path(path)
    with ExitStack() as files:
        tensors, metadata = read_tensor_file(path, detect_format(path), files)
        return {k: ref.shape for k, ref in tensors.items()}, metadata


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file straight from the tensors' memory (no second copy), atomically: into a temporary file
    beside `path`, then renamed over it. An interrupted write never leaves half a file, and a model still
    memory-mapped from the old file keeps reading the old (unlinked) bytes."""
    # widest dtypes first: with the data start padded to 8 bytes, every tensor then sits aligned to its element size
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {"__metadata__": metadata}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_NAMES or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: can only write contiguous CPU tensors of {list(SAFETENSORS_NAMES)}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name in order:
                f.write(tensors[name].reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cpu_tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` ready to be written: detached, on the CPU, contiguous, floating tensors cast to `dtype` (None: as is)."""
    dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
    return t.detach().to(device="cpu", dtype=dtype).contiguous()


def sha256_of_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
