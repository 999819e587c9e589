"""kept_freed_memory: freed big blocks are reused, not handed back to the kernel and faulted in again."""

import subprocess
import sys

import pytest

# An lm-head-sized step: (2048 tokens x 256) -> 8192 logits, 64 MB of fp32 logits and as much gradient;
# glibc's malloc serves blocks over 32 MB from mmap whatever its sliding threshold has learnt.
CHILD = """
import resource, sys, torch
import contextlib
from llm_assets.lib.common.memory import kept_freed_memory
torch.manual_seed(0)
head, x = torch.nn.Linear(256, 8192), torch.randn(2048, 256)
target = torch.randint(0, 8192, (2048,))

def step():
    torch.nn.functional.cross_entropy(head(x), target).backward()

faults = []
with kept_freed_memory() if sys.argv[1] == "keep" else contextlib.nullcontext() as kept:
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sorted(faults[4:])[4])  # the median step once the heap has grown (4-5 steps here)
"""


def faults_per_step(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    kept, count = out.split()
    return kept, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_training_step_reuses_freed_blocks_instead_of_faulting_them_in_again():
    _, default = faults_per_step("default")
    kept, reused = faults_per_step("keep")
    assert kept == "True"
    assert default > 16_000  # glibc's default: at least the logits' 64 MB (16k pages) faulted in a step
    assert reused < default / 10  # kept: the blocks stay mapped and the next step reuses them


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
