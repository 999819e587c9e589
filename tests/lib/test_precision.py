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


@pytest.mark.parametrize("flags", [{"sse2", "avx2", "avx512f"},  # emulated bf16
                                   {"sse2", "avx512f", "avx512_bf16"}])  # bf16 dot products, no AMX: measured no faster
def test_auto_stays_fp32_where_bf16_does_not_pay(monkeypatch, flags):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    assert not bf16_native(CPU)
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16  # asked for explicitly: honoured
    assert autocast_dtype("fp32", CPU) is None


def test_the_real_probe_reads_this_machines_flags():
    flags = cpu_flags()
    assert "fpu" in flags or not flags  # Linux lists fpu on every x86 CPU; elsewhere no cpuinfo
    native = "amx_bf16" in flags
    assert bf16_native(CPU) is native
    assert (autocast_dtype("auto", CPU) is torch.bfloat16) is native
    assert cpu_bf16_flags() == {"amx_bf16"} & flags


def test_unknown_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="compile"):
        use_compile("yes", CPU)


def test_compile_auto_skips_short_cpu_runs_and_several_cpu_processes():
    assert use_compile("auto", CPU, world=1, tokens=2_000_000)
    assert not use_compile("auto", CPU, world=1, tokens=30_000)  # over before compiling pays off
    assert not use_compile("auto", CPU, world=2, tokens=2_000_000)
    assert use_compile("on", CPU, world=2) and not use_compile("off", CPU, world=1)
