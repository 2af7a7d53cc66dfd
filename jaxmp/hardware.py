"""What the host CPU offers for low-precision matmuls, read once from ``/proc/cpuinfo``."""

from __future__ import annotations

import functools

__all__ = ["cpu_flags"]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (e.g. ``avx512_bf16``, ``amx_bf16``); empty where ``/proc/cpuinfo`` is absent."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
