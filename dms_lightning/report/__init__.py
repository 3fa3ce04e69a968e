"""Report: size, parameters, MACs, ONNX Runtime latency / throughput and accuracy of every exported variant.

:func:`measure_onnx` measures one ONNX file, :func:`build_report` a set of variants against a baseline;
:mod:`~dms_lightning.report.tables` writes markdown / CSV / JSON and :mod:`~dms_lightning.report.plots` the
Pareto plots. :class:`~dms_lightning.callbacks.CompressionReport` does all of it at the end of ``fit``;
``python -m dms_lightning.report`` does it for given ONNX files and checkpoints.
"""

from dms_lightning.report.graph import count_onnx_macs, count_parameters, detect_precision
from dms_lightning.report.machine import machine_info
from dms_lightning.report.measure import (
    MeasureSettings,
    Report,
    VariantMetrics,
    build_report,
    compare_to_baseline,
    measure_onnx,
)
from dms_lightning.report.plots import pareto_front, save_pareto_plots
from dms_lightning.report.tables import markdown_table, to_markdown, write_tables

__all__ = [
    "MeasureSettings", "Report", "VariantMetrics", "build_report", "compare_to_baseline", "count_onnx_macs",
    "count_parameters", "detect_precision", "machine_info", "markdown_table", "measure_onnx", "pareto_front",
    "save_pareto_plots", "to_markdown", "write_tables",
]
