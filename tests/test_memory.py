"""Releasing memory-mapped weights: pages go, values stay, written or ordinary memory is never dropped."""
import sys
from pathlib import Path

import pytest
import torch

from sdtorch.checkpoint.formats import SafetensorsFile, write_safetensors
from sdtorch.memory import PAGE, release, resident_file_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pagemap and madvise are Linux's")


def _mapped(tmp_path: Path, n: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """n tensors of 64 pages each: the originals, and zero-copy views of them in a memory-mapped safetensors file."""
    numel = 64 * PAGE // 4
    tensors = {f"w{i}": torch.arange(numel, dtype=torch.float32) * (i + 1) for i in range(n)}
    path = tmp_path / "w.safetensors"
    write_safetensors(tensors, path, {})
    reader = SafetensorsFile(path)
    loaded = {name: ref.load(torch.float32, torch.device("cpu")) for name, ref in reader.tensors().items()}
    reader.close()
    return tensors, loaded


def test_release_drops_mapped_pages_and_keeps_values(tmp_path):
    expected, loaded = _mapped(tmp_path)
    weights = list(loaded.values())
    assert resident_file_bytes(weights) == 0  # nothing touched yet: mapping reads nothing
    sums = [w.sum().item() for w in weights]  # touch every page
    touched = resident_file_bytes(weights)
    assert touched >= 3 * 62 * PAGE  # all but the partial pages at the edges of the data
    assert release(weights) == touched
    assert resident_file_bytes(weights) == 0
    for name, w in loaded.items():  # read back from the page cache, bit for bit
        assert torch.equal(w, expected[name])
    assert [w.sum().item() for w in weights] == sums


def test_written_weights_and_ordinary_memory_are_never_dropped(tmp_path):
    expected, loaded = _mapped(tmp_path)
    w0, w1 = loaded["w0"], loaded["w1"]
    w1.sum()
    w0.add_(1.0)  # copy-on-write: w0's pages are now this process's own memory, holding values the file lacks
    assert resident_file_bytes([w0]) == 0
    ordinary = torch.randn(64 * PAGE // 4)
    before = ordinary.clone()
    w1_resident = resident_file_bytes([w1])
    assert w1_resident > 0
    assert release([w0, w1, ordinary]) == w1_resident  # only w1's pages went
    assert resident_file_bytes([w1]) == 0
    assert torch.equal(w0, expected["w0"] + 1.0)
    assert torch.equal(w1, expected["w1"])
    assert torch.equal(ordinary, before)


def test_without_pagemap_nothing_is_released(tmp_path, monkeypatch):
    """Where /proc/self/pagemap cannot be read, no page can be proven clean: release does nothing, and says so."""
    import os

    from sdtorch import memory

    _, loaded = _mapped(tmp_path, n=1)
    w = loaded["w0"]
    w.sum()
    resident = resident_file_bytes([w])
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path) == "/proc/self/pagemap":
            raise PermissionError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(memory.os, "open", refuse)
    assert release([w]) == 0 and resident_file_bytes([w]) == 0  # the "0" of not knowing
    monkeypatch.undo()
    assert resident_file_bytes([w]) == resident > 0  # still resident


REUSE_CHECK = """
import resource, sys
import torch
from sdtorch.memory import PAGE, keep_freed_blocks

if not keep_freed_blocks():
    print("not glibc")
    sys.exit()

def faulted_fraction():
    before, pages = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, 0
    for mb in (12, 48, 100, 48, 12):
        a, b = torch.empty(mb * 2**18), torch.empty(mb * 2**18)  # mb megabytes each
        a.fill_(1.0)
        b.fill_(2.0)
        del a, b
        pages += 2 * mb * 2**20 // PAGE
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / pages

faulted_fraction(), faulted_fraction()  # the heap grows to hold them
# the best of three rounds: now and then the heap's top cannot grow in place and one block faults in once more
print(min(faulted_fraction() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_large_blocks_are_reused_instead_of_faulted_in_again():
    """After keep_freed_blocks, activations of 12-100 MB freed and allocated again reuse the heap's pages instead of
    new zero-filled ones (with glibc's defaults ~90-100% of their pages fault in again every round, measured). In the
    main thread, in a fresh process, as a command starts: the CLI and the server both generate in the main thread. A
    thread started later is not asserted: it may be handed an arena that a thread made before the call (CI's machine
    once gave one that faulted 23% of the pages in again), why the server generates in the main thread."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", REUSE_CHECK], capture_output=True, text=True, check=True).stdout
    if out.strip() == "not glibc":
        pytest.skip("not glibc")
    assert float(out) < 0.1, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_trim_heap_gives_freed_blocks_back_to_the_os():
    """A block the heap keeps after keep_freed_blocks (so it stays resident) leaves RSS after trim_heap."""
    from sdtorch.memory import keep_freed_blocks, trim_heap

    if not keep_freed_blocks():
        pytest.skip("not glibc")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    block = torch.empty(200 * 2**18)  # 200 MB, from the heap (below the 1 GiB mmap threshold)
    block.fill_(1.0)
    pin = torch.ones(2**16)  # allocated after it, so that the freed block is not simply the heap's top
    del block
    kept = rss()
    assert trim_heap()
    assert kept - rss() > 150 * 2**20
    del pin
