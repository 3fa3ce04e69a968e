"""What machine a latency was measured on: a latency without its CPU, cores and runtime means nothing."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from dms_lightning.utils.cpu import cpu_flags

# CPU features that decide ONNX Runtime's INT8 speed (VNNI dot products) and FP32 kernels.
_INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    present = cpu_flags()
    return [flag for flag in _INTERESTING_FLAGS if flag in present]


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil is a dependency of lightning's extras, not of ours
        return None


def machine_info(threads: int | None = None) -> dict:
    """CPU model, core counts, CPU features, OS and runtime versions, and the intra-op thread count used.

    Example:
        >>> info = machine_info(threads=1)
        >>> sorted(info)[:3]
        ['cpu_flags', 'cpu_model', 'logical_cores']
    """
    import numpy
    import onnx
    import onnxruntime

    info = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": numpy.__version__,
        "execution_provider": "CPUExecutionProvider",
        "intra_op_threads": threads,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
    return info


def machine_summary(info: dict) -> str:
    """One line for the head of a table: ``AMD EPYC, 2 cores (2 usable), ORT 1.31.1, 1 thread``."""
    flags = ", ".join(info.get("cpu_flags") or []) or "no AVX2"
    threads = info.get("intra_op_threads")
    text = (f"{info.get('cpu_model')} ({info.get('logical_cores')} logical cores, {info.get('usable_cores')} usable; "
            f"{flags}), {info.get('os')}, onnxruntime {info.get('onnxruntime')} CPUExecutionProvider")
    if threads is not None:
        text += f", {threads} intra-op thread{'s' if threads != 1 else ''}"
    return text
