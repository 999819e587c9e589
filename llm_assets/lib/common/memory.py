"""Keep freed memory in the process while training: glibc's malloc hands every block it got from
mmap (blocks over 128 kB to 32 MB, by its sliding threshold) back to the kernel when torch frees it,
so a training step that allocates and frees the same activations every step page-faults them in
afresh every step. Measured in demo pretraining on this 2-core machine: 88,000 minor faults per
step (110,000 a second), half of the CPU time in the kernel; inside `kept_freed_memory()`, 0.6.

    >>> import torch
    >>> from llm_assets.lib.common.memory import kept_freed_memory
    >>> with kept_freed_memory() as kept:     # True on glibc; a no-op elsewhere
    ...     _ = torch.ones(2**20).sum()       # freed blocks stay on the heap for the next step
    >>> kept in (True, False)
    True

Inside the context, malloc's mmap path and heap trimming are off (`mallopt(M_MMAP_MAX, 0)`,
`mallopt(M_TRIM_THRESHOLD, 2 GiB)`), so freed blocks stay on the heap and the next step reuses
them. On exit they go back to glibc's default values (the mmap threshold then stays at its initial
128 kB instead of sliding) and `malloc_trim(0)` returns the free heap to the kernel, so what runs
next in the process (an evaluation measuring its memory, say) sees an allocator that returns memory.
One case stays on mmap whatever M_MMAP_MAX says: a block a non-main thread allocates beyond its
arena's 64 MB heap, which glibc then maps alone: the likely cause of the 16,384 faults a step (one
64 MB logits gradient) seen once in CI. `benchmarks/kept_memory.py` counts them on a given machine. Not thread-safe against a concurrent second training in one process (none runs so).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
_TRIM_NEVER = 2**31 - 1  # the largest int mallopt takes: heap tops under 2 GiB are never trimmed
_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024}  # glibc's own


def _glibc():
    """glibc's handle, or None where malloc is not glibc's (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # AttributeError where they do not exist
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def kept_freed_memory() -> Iterator[bool]:
    """Keep freed heap memory in this process for the duration (see the module docstring); yields
    True when glibc took the setting."""
    libc = _glibc()
    kept = bool(libc) and bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER))
    try:
        yield kept
    finally:
        if libc:
            for param, value in _DEFAULTS.items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)
