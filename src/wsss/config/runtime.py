"""``runtime.precision: auto``: bf16 autocast where the hardware runs it natively, fp32 elsewhere.

bf16 autocast is only fast where the matrix units take bf16: GPUs with bf16 support (Ampere and later) and x86 CPUs
with AVX-512 bf16 or AMX. Elsewhere PyTorch emulates it, and a CPU without them trains *slower* in bf16 than in fp32:
on the AMD EPYC of benchmarks/RESULTS.md (section 18) restricted to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, as a laptop
CPU without AVX-512 is), a classifier step ran at 0.2 images/s in bf16 against 4.4 in fp32; with its AVX-512 bf16,
bf16 is 1.3-2.0x faster than fp32. So ``auto`` asks the hardware, never a benchmark at start-up.

The choice is made once, when the config is loaded: the run's ``config.yaml`` and every stage key record the
precision that ran (a run moved to other hardware recomputes what the precision changes).
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

log = logging.getLogger("wsss.config")

#: x86 CPU flags (Linux /proc/cpuinfo) whose matrix instructions take bf16 natively
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags of this CPU (from ``/proc/cpuinfo``, or the given text); [] where that file does not
    exist (macOS, Windows) or ``ONEDNN_MAX_CPU_ISA`` limits oneDNN to an ISA below AVX-512 bf16."""
    if cpuinfo is None:
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
        if isa and not ("BF16" in isa or "AMX" in isa or isa == "ALL"):
            return []
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [f for f in BF16_CPU_FLAGS if f in flags]


def resolve_precision(accelerator: str, cpuinfo: str | None = None) -> tuple[str, str]:
    """``(precision, why)`` for ``runtime.precision: auto`` on ``accelerator`` (cpu, cuda, gpu or auto)."""
    if accelerator in ("cuda", "gpu", "auto"):
        import torch

        if torch.cuda.is_available():
            if torch.cuda.is_bf16_supported():
                return "bf16", f"{torch.cuda.get_device_name()} supports bf16"
            return "fp32", f"{torch.cuda.get_device_name()} has no bf16 support"
        if accelerator != "auto":
            return "fp32", "no CUDA device visible"
    flags = cpu_bf16_flags(cpuinfo)
    if flags:
        return "bf16", f"the CPU has {', '.join(flags)}"
    return "fp32", f"the CPU ({platform.machine() or 'unknown'}) has no native bf16 ({' / '.join(BF16_CPU_FLAGS)})"


def resolved(cfg):
    """``cfg`` with ``runtime.precision: auto`` replaced by what this machine runs natively (logged)."""
    import dataclasses

    if cfg.runtime.precision == "bf16" and cfg.runtime.accelerator in ("cpu", "auto"):
        precision, why = resolve_precision(cfg.runtime.accelerator)
        if precision == "fp32":
            log.warning("runtime.precision=bf16, but %s: bf16 is emulated here and many times slower than fp32; "
                        "runtime.precision=auto picks fp32 on this machine", why)
    if cfg.runtime.precision != "auto":
        return cfg
    precision, why = resolve_precision(cfg.runtime.accelerator)
    log.info("runtime.precision auto -> %s (%s)", precision, why)
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, precision=precision))


def autocast(device, precision: str):
    """The autocast context of ``runtime.precision`` on ``device`` (a torch.device or its type): bf16 autocast for
    ``bf16``, a disabled one for ``fp32``. Every inference path (maps, prediction, segment, the refiners) uses it."""
    import torch

    kind = device if isinstance(device, str) else device.type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


__all__ = ["BF16_CPU_FLAGS", "autocast", "cpu_bf16_flags", "resolve_precision", "resolved"]
