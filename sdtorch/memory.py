"""Give the memory of idle memory-mapped weights back to the OS between the phases of a generation.

A model loaded from a .safetensors file with no cast keeps its weights as views of the file's memory map (see
checkpoint/formats.py): pages are read on first touch and then count in the process's resident memory for good. A
generation uses its models one after another (text encoder, then UNet, then VAE), so on the CPU only one of them
needs to be resident at a time. `release(tensors)` drops the pages of weights that are done for now
(madvise MADV_DONTNEED): they stay in the OS page cache and fault back in, unchanged, when next used.

Only pages that still mirror their file are dropped. /proc/self/pagemap says page by page whether a page is
file-backed; a weight written in place (copy-on-write made its pages anonymous memory) or any ordinary tensor is never
touched, so nothing can change value. Linux only; elsewhere `release` does nothing.
"""
import ctypes
import functools
import mmap
import os
import sys
from collections.abc import Iterable

import numpy as np
import torch

PAGE = mmap.PAGESIZE
_PRESENT = np.uint64(1 << 63)  # pagemap bits (Documentation/admin-guide/mm/pagemap.rst)
_FILE_OR_SHARED = np.uint64(1 << 61)
_SUPPORTED = sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")


def _page_spans(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """Merged, page-aligned [start, end) address ranges inside the CPU tensors' storages (rounded inwards, so a page
    shared with memory outside them is left alone)."""
    spans = []
    for t in tensors:
        if t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        begin, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        begin, end = -(-begin // PAGE) * PAGE, end // PAGE * PAGE
        if end > begin:
            spans.append((begin, end))
    merged: list[list[int]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(b, e) for b, e in merged]


def _file_pages(pagemap: int, begin: int, end: int) -> np.ndarray:
    """Per page of [begin, end): True where the page is resident and backed by a file (or shared memory)."""
    n = (end - begin) // PAGE
    entries = np.frombuffer(os.pread(pagemap, 8 * n, begin // PAGE * 8), dtype=np.uint64)
    return ((entries & _PRESENT) != 0) & ((entries & _FILE_OR_SHARED) != 0)


def resident_file_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' pages that are resident and file-backed (what `release` would drop)."""
    fd = _open_pagemap()
    if fd is None:
        return 0
    try:
        return sum(int(_file_pages(fd, b, e).sum()) * PAGE for b, e in _page_spans(tensors))
    finally:
        os.close(fd)


def release(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident, file-backed pages of `tensors` from this process (they fault back in on use); returns the
    bytes released. Tensors in ordinary memory, on other devices, or written since they were mapped are kept."""
    fd = _open_pagemap()
    if fd is None:
        return 0
    released = 0
    try:
        for begin, end in _page_spans(tensors):
            droppable = _file_pages(fd, begin, end).astype(np.int8)
            edges = np.flatnonzero(np.diff(np.concatenate(([0], droppable, [0]))))  # run starts, run ends
            for first, last in zip(edges[::2], edges[1::2], strict=True):
                address, length = begin + int(first) * PAGE, int(last - first) * PAGE
                if _libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), mmap.MADV_DONTNEED) == 0:
                    released += length
    finally:
        os.close(fd)
    return released


def _open_pagemap() -> int | None:
    """A descriptor of /proc/self/pagemap, or None where there is none to read (not Linux, or a sandbox hiding it):
    then nothing is released, since nothing could be proven safe to drop."""
    if not _SUPPORTED:
        return None
    try:
        return os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


# ---- the allocator ---------------------------------------------------------------------------------------------------
# glibc serves every block above its mmap threshold (at most 32 MB, often far less) with a fresh mmap and unmaps it on
# free; the kernel then zero-fills every page of the next such block on first touch. A UNet step at 64x64 latents
# (512x512 images) allocates and frees gigabytes of such activations: 630k page faults (2.5 GB zeroed) per step on this
# CPU. Keeping freed blocks in the heap for reuse removed them (10.6 -> 9.9 s a step, measured in one process).
# That holds for the main thread's heap only: each other thread gets an arena of 64 MB heaps, so a larger block is
# mmapped again whatever the threshold says (a 200 MB tensor made and freed 10 times in a thread: 977k page faults,
# 0 in the main thread). With one arena every thread allocates from the main heap; one thread generates at a time,
# so its lock costs nothing measurable. A thread picks its arena at its first malloc: tune before starting threads.
# Even then a thread may be handed an arena some thread made before the call (import-time threads do, on some
# machines), so the CLI and the server generate in the main thread.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap
TRIM_THRESHOLD = 1 << 31  # the heap keeps up to 2 GiB of free memory at its top instead of returning it at once


def _glibc(name: str, *argtypes):
    """glibc's malloc function `name` with its argument types, or None where there is none (not Linux, or a libc
    without it: musl has no mallopt or malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(_libc(), name, None)
    if function is not None:
        function.argtypes = list(argtypes)
    return function


@functools.cache
def keep_freed_blocks() -> bool:
    """Tune glibc's malloc (process-wide, once) so that large freed blocks are reused rather than unmapped and
    faulted in again, in this thread and every thread started after it; returns whether it applied (glibc on Linux
    only). A CPU pipeline calls it when built with tune_allocator=True, as the command line builds it: a library must
    not change its host's allocator unasked."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return all([mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                mallopt(M_ARENA_MAX, 1)])


def trim_heap() -> bool:
    """Hand the free pages inside glibc's heap back to the OS now (`malloc_trim(0)`); returns whether it could. For
    memory the process is done with for a while, such as a model's packed weights freed after the sampling loop, which
    `keep_freed_blocks` would otherwise keep resident for the phases after it. glibc on Linux only."""
    malloc_trim = _glibc("malloc_trim", ctypes.c_size_t)
    if malloc_trim is None:
        return False
    malloc_trim(0)  # its result says whether any memory went back, which is not a failure when none was free
    return True
