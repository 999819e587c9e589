"""Which number format and compiler a device trains fastest in: the `precision: auto` and
`compile: auto` rules every trainer shares.

    >>> import torch
    >>> from llm_assets.lib.common.precision import autocast_dtype, bf16_native, cpu_bf16_flags
    >>> autocast_dtype("fp32", torch.device("cpu")) is None        # plain fp32, always
    True
    >>> autocast_dtype("bf16", torch.device("cpu"))                # asked for: bf16 autocast
    torch.bfloat16
    >>> sorted(cpu_bf16_flags("fpu avx512_bf16 sse2 amx_bf16".split()))   # what the probe looks for
    ['amx_bf16', 'avx512_bf16']
    >>> bf16_native(torch.device("cpu")) == bool(cpu_bf16_flags())  # this machine's answer
    True

`auto` means bf16 autocast where the hardware computes bf16 natively, fp32 elsewhere:
- CPU: the flags `amx_bf16` (Intel AMX tiles) or `avx512_bf16` (bf16 dot products: AMD Zen 4 and
  later, Intel Cooper Lake and later) in /proc/cpuinfo; torch's own `get_cpu_capability()` says only
  "AVX512" on such CPUs, so the flags are read directly. Measured on this project's 2-core AMD EPYC
  (avx512_bf16, no AMX), the demo model's bare training step (8 x 256 tokens, 2 threads): 2,575
  tokens/s fp32, 4,979 under bf16 autocast (with freed memory kept, common/memory.py). Without
  either flag bf16 is emulated and slower than fp32.
- CUDA: `torch.cuda.is_bf16_supported()` (Ampere and newer).
Autocast keeps the weights and optimizer in fp32 and runs matmuls in bf16, so no loss scaling is
needed (bf16 has fp32's exponent range).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
PRECISIONS = ("auto", "fp32", "bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_flags(flags: Iterable[str] | None = None) -> set[str]:
    """The native-bf16 flags among `flags` (default: this CPU's)."""
    return set(cpu_flags() if flags is None else flags) & set(BF16_CPU_FLAGS)


def bf16_native(device: torch.device) -> bool:
    """True where `device` computes bf16 in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_bf16_flags())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a `precision` setting (None = plain fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {PRECISIONS} (got {precision!r})")
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision: bf16 requested but this GPU does not support it")
        return torch.bfloat16
    if precision == "auto" and bf16_native(device):
        return torch.bfloat16
    return None


def use_compile(setting: str, device: torch.device) -> bool:
    """`compile: auto | on | off`. auto compiles on CUDA only: on this project's CPU the demo step ran
    4,698 tokens/s compiled against 4,979 eager (bf16 autocast; fp32: 2,911 vs 2,840), and compiling
    took 40-70 s on 2 cores. Measured again with torch 2.13: the bare bf16 step 0.30 s compiled vs
    0.39 s eager (the benchmark's ratio to fp32 eager 2.31 vs 1.78), but in the demo's real run
    (700 steps, cold compile cache) base_checkpoint took 349 s compiled against 299 s eager: ~55 s
    of compiling, then ~5,500 tokens/s against ~5,000. So on a CPU it still does not pay."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"compile: must be auto, on or off (got {setting!r})")
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda"
