"""precision: `auto` picks bf16 autocast only where the hardware computes bf16 natively."""

import pytest
import torch

from llm_assets.lib.common import precision
from llm_assets.lib.common.precision import autocast_dtype, bf16_native, cpu_bf16_flags, cpu_flags, use_compile

CPU = torch.device("cpu")


def test_auto_is_bf16_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"sse2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    assert bf16_native(CPU)
    assert autocast_dtype("auto", CPU) is torch.bfloat16


def test_auto_is_bf16_on_a_cpu_with_bf16_dot_products(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"sse2", "avx512f", "avx512_bf16"})  # Zen 4, no AMX
    assert bf16_native(CPU) and autocast_dtype("auto", CPU) is torch.bfloat16


def test_auto_stays_fp32_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"sse2", "avx2", "avx512f"})
    assert not bf16_native(CPU)
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16  # asked for explicitly: honoured
    assert autocast_dtype("fp32", CPU) is None


def test_the_real_probe_reads_this_machines_flags():
    flags = cpu_flags()
    assert "fpu" in flags or not flags  # Linux lists fpu on every x86 CPU; elsewhere no cpuinfo
    native = bool({"amx_bf16", "avx512_bf16"} & flags)
    assert bf16_native(CPU) is native
    assert (autocast_dtype("auto", CPU) is torch.bfloat16) is native
    assert cpu_bf16_flags() == {"amx_bf16", "avx512_bf16"} & flags


def test_unknown_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="compile"):
        use_compile("yes", CPU)


def test_compile_auto_is_for_cuda_only():
    assert not use_compile("auto", CPU)  # measured slower than eager on this CPU, and 40-70 s to compile
    assert use_compile("on", CPU) and not use_compile("off", CPU)
