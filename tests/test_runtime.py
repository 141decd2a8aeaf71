"""runtime.precision: auto picks bf16 only where the hardware runs it natively."""

import logging

from wsss.config import load_config
from wsss.config.runtime import cpu_bf16_flags, resolve_precision

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile avx512_bf16\n"
LAPTOP = "flags\t\t: fpu sse2 avx avx2 fma\n"


def test_cpu_flags_decide_the_automatic_precision():
    assert cpu_bf16_flags(ZEN4) == ["avx512_bf16"]
    assert cpu_bf16_flags(SAPPHIRE) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags(LAPTOP) == []
    assert resolve_precision("cpu", ZEN4)[0] == "bf16"
    precision, why = resolve_precision("cpu", LAPTOP)
    assert precision == "fp32" and "no native bf16" in why


def test_onednn_limited_below_avx512_bf16_counts_as_no_bf16(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_bf16_flags() == []


def test_auto_is_resolved_at_load_and_explicit_values_stay(monkeypatch, caplog):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # this machine behaves as a CPU without bf16 units
    with caplog.at_level(logging.INFO, logger="wsss.config"):
        cfg = load_config(None, ["runtime.accelerator=cpu"])
    assert cfg.runtime.precision == "fp32"
    assert any("auto -> fp32" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wsss.config"):
        assert load_config(None, ["runtime.accelerator=cpu", "runtime.precision=bf16"]).runtime.precision == "bf16"
    assert any("emulated" in r.message for r in caplog.records)
    assert load_config(None, ["runtime.precision=fp32"]).runtime.precision == "fp32"
