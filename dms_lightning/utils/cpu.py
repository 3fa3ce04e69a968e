"""The CPU's integer-arithmetic features: they decide what an INT8 model computes in ONNX Runtime, and how fast.

ONNX Runtime multiplies uint8 activations by int8 weights. On x86-64 CPUs with VNNI (``avx512_vnni``,
``avx_vnni``, AMX) one instruction sums four such products into int32, exactly. Without VNNI (SSE4.1, AVX2, and
AVX-512 without VNNI) its default kernels use ``vpmaddubsw``, which adds *pairs* of products into int16 and
saturates: a pair of activations near 255 times weights near 127 no longer fits, and the INT8 model computes
something its own QDQ graph, an NPU or LiteRT would not.

Example:
    >>> isinstance(int8_pair_sums_saturate(), bool)
    True
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

#: CPU flags (``/proc/cpuinfo``) of x86 dot-product instructions that sum 8-bit products into int32 exactly.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); empty where they cannot be read. Read once."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.lower().startswith(("flags", "features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_pair_sums_saturate() -> bool:
    """Whether ONNX Runtime's default uint8 x int8 kernels on this CPU add pairs of products in saturating int16.

    True on x86-64 without VNNI, and on an x86-64 CPU whose flags cannot be read (the safe assumption); False on
    VNNI CPUs and on Arm (whose dot-product kernels accumulate in int32).
    """
    if platform.machine().lower() not in _X86:
        return False
    flags = cpu_flags()
    return not flags or not any(flag in flags for flag in VNNI_FLAGS)
