"""Keep freed memory in the process while training: glibc's malloc hands every block it got from
mmap (blocks over 128 kB to 32 MB, by its sliding threshold) back to the kernel when torch frees it,
so a training step that allocates and frees the same activations every step page-faults them in
afresh every step. Measured in demo pretraining on this 2-core machine: 110,000 minor faults per
second and half of the CPU time in the kernel.

    >>> from llm_assets.lib.common.memory import keep_freed_memory
    >>> keep_freed_memory() in (True, False)    # True on glibc; a no-op elsewhere
    True

`keep_freed_memory()` turns off malloc's mmap path and its heap trimming for the rest of the process
(`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 2 GiB)`), so freed blocks stay on the heap
and the next step reuses them: the process keeps its peak heap until it exits. Call it in processes
that train (the pretraining worker, the post-training steps), not in ones that measure memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_TRIM_NEVER = 2**31 - 1  # the largest int mallopt takes: heap tops under 2 GiB are never trimmed


def keep_freed_memory() -> bool:
    """Keep freed heap memory in this process (see the module docstring); True when glibc took it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER))
