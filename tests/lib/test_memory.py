"""kept_freed_memory: freed big blocks stay in the process inside the context and go back to the kernel
after it. Whether that saves page faults and time per training step is measured by
benchmarks/kept_memory.py, not asserted here: the fault count of a step depends on what else the
machine runs (a test that counted faults failed in CI beside another process)."""

import subprocess
import sys

import pytest

# A fresh process, so the allocator starts from glibc's defaults: a 64 MB block (over the 32 MB that
# glibc's sliding mmap threshold can reach) is freed, and RSS says whether it left the process.
CHILD = """
import contextlib, sys, psutil, torch
from llm_assets.lib.common.memory import kept_freed_memory
rss = lambda: psutil.Process().memory_info().rss
with kept_freed_memory() if sys.argv[1] == "keep" else contextlib.nullcontext() as kept:
    block = torch.ones(2**24)  # 64 MB, written, so its pages are resident
    before = rss()
    del block
    print(kept, (before - rss()) // 2**20)  # MB that left the process when the block was freed
"""


def mb_returned_on_free(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    kept, mb = out.split()
    return kept, int(mb)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_stay_in_the_process_inside_the_context():
    _, default = mb_returned_on_free("default")
    kept, returned = mb_returned_on_free("keep")
    assert kept == "True"
    assert default >= 60  # glibc's default: the block came from mmap and was unmapped on free
    assert returned < 4  # kept: it stays on the heap, for the next step to reuse without faulting


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_memory_goes_back_to_the_kernel_after_the_context():
    import psutil
    import torch

    from llm_assets.lib.common.memory import kept_freed_memory

    rss = lambda: psutil.Process().memory_info().rss
    with kept_freed_memory():
        blocks = [torch.ones(2**20 * 16) for _ in range(4)]  # 4 x 64 MB on the heap
        del blocks
        held = rss()
    assert held - rss() > 200 * 2**20  # trimmed on exit: the 256 MB freed inside is returned
