"""Which number format and compiler a device trains fastest in: the `precision: auto` and
`compile: auto` rules every trainer shares.

    >>> import torch
    >>> from llm_assets.lib.common.precision import autocast_dtype, bf16_native, cpu_bf16_flags
    >>> autocast_dtype("fp32", torch.device("cpu")) is None        # plain fp32, always
    True
    >>> autocast_dtype("bf16", torch.device("cpu"))                # asked for: bf16 autocast
    torch.bfloat16
    >>> sorted(cpu_bf16_flags("fpu avx512_bf16 sse2 amx_bf16".split()))   # what the probe looks for
    ['amx_bf16']
    >>> bf16_native(torch.device("cpu")) == bool(cpu_bf16_flags())  # this machine's answer
    True

`auto` means bf16 autocast where the hardware computes bf16 natively, fp32 elsewhere:
- CPU: the flag `amx_bf16` (Intel AMX tiles) in /proc/cpuinfo; torch's own `get_cpu_capability()`
  says only "AVX512" on such a CPU, so the flag is read directly. AVX512-BF16 alone (`avx512_bf16`,
  dot products only) is not enough: measured on a 2-core Xeon with it and without AMX, the demo
  model's training step ran 2,780 tokens/s under bf16 autocast vs 2,820 in fp32, and a reward-model
  step 7.1 s vs 4.4 s; with AMX, bf16 matmuls ran 2.5-6x fp32 (docs/FIELD_NOTES). Without either,
  bf16 is emulated and slower still.
- CUDA: `torch.cuda.is_bf16_supported()` (Ampere and newer).
Autocast keeps the weights and optimizer in fp32 and runs matmuls in bf16, so no loss scaling is
needed (bf16 has fp32's exponent range).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16",)  # see the module docstring for why not avx512_bf16
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


# Below this many training tokens a CPU run is over before torch.compile pays off: compiling took
# 40-70 s on 2 cores (a fresh inductor cache), for a 1.58x faster demo step (3,216 -> 5,079 tokens/s).
COMPILE_MIN_CPU_TOKENS = 500_000


def use_compile(setting: str, device: torch.device, world: int = 1, tokens: int = COMPILE_MIN_CPU_TOKENS) -> bool:
    """`compile: auto | on | off` for a run training `tokens` tokens in `world` processes. auto
    compiles on CUDA, and on a CPU for one process training at least COMPILE_MIN_CPU_TOKENS;
    several CPU (gloo) processes stay eager: each would compile its own copy on the cores they share."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"compile: must be auto, on or off (got {setting!r})")
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" or (world == 1 and tokens >= COMPILE_MIN_CPU_TOKENS)
