"""One parity matrix: every exported variant × every runtime it was checked in, beside its latency and size.

The agreement figures are the ones the exporters measured when they wrote each file (ONNXExport:
ONNX Runtime vs PyTorch, ONNX Runtime's fused INT8 kernels, OpenVINO vs ONNX Runtime; TFLiteExport:
the LiteRT interpreter vs PyTorch), read from the variants and the export manifests; latency and size
come from the report's own measurement (ONNX Runtime, batch 1). A cell that was not measured is
``n/a`` rather than a guess.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from dms_lightning.report.measure import Report
from dms_lightning.utils.io import write_json_atomic, write_text_atomic

# Where an ONNX variant's parity figures sit in its recorded info (each names its runtime and reference).
_ONNX_FIGURES = ("parity", "onnxruntime_int8_kernels", "openvino")


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


def parity_matrix(report: Report, manifests: Sequence[dict] = ()) -> list[dict]:
    """Rows ``{variant, precision, runtime, reference, top1_agreement, max_abs_diff, latency_ms_p50, ...}``.

    ``max_abs_diff`` is kept for floating-point variants only (an INT8 graph is judged on top-1).
    """
    rows = []
    for variant in report.rows:
        float_variant = variant.precision not in ("int8", "int8_dynamic")
        for key in _ONNX_FIGURES:
            figures = variant.info.get(key)
            if not isinstance(figures, dict) or "top1_agreement" not in figures:
                continue
            rows.append({
                "variant": variant.name, "precision": variant.precision, "runtime": figures.get("runtime", key),
                "reference": figures.get("reference", "pytorch"), "top1_agreement": figures["top1_agreement"],
                "max_abs_diff": figures.get("max_abs_diff") if float_variant else None,
                "samples": figures.get("samples"),
                # The report times ONNX Runtime's CPU provider: its latency belongs to the ONNX Runtime rows.
                "latency_ms_p50": variant.latency_ms_p50 if key != "openvino" else None,
                "latency_ms_p99": variant.latency_ms_p99 if key != "openvino" else None,
                "size_mb": variant.file_size_mb,
            })
    measured = {variant.name for variant in report.rows}
    for manifest in manifests:
        for entry in manifest.get("artifacts", []):
            parity = entry.get("parity")
            if entry.get("format") != "tflite" or not isinstance(parity, dict) or entry.get("name") in measured:
                continue  # a file the report measured is a row above, with the report's own latency
            rows.append({
                "variant": entry["name"], "precision": entry.get("precision", ""), "runtime": parity.get("runtime"),
                "reference": parity.get("reference", "pytorch"), "top1_agreement": parity["top1_agreement"],
                "max_abs_diff": parity.get("max_abs_diff") if entry.get("precision") != "int8" else None,
                "samples": parity.get("samples"), "latency_ms_p50": entry.get("latency_ms_p50"), "latency_ms_p99": entry.get("latency_ms_p99"),
                "size_mb": entry.get("bytes", 0) / 1e6,
            })
    return rows


def parity_matrix_markdown(rows: Sequence[dict]) -> str:
    lines = ["| variant | precision | runtime | vs | top-1 agreement | max abs diff | p50 ms | p99 ms | size MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        agreement = f"{row['top1_agreement']:.2%}" if row.get("top1_agreement") is not None else "n/a"
        lines.append(f"| {row['variant']} | {row['precision']} | {row['runtime']} | {row['reference']} | {agreement} | "
                     f"{_cell(row, 'max_abs_diff', '.2g')} | {_cell(row, 'latency_ms_p50', '.2f')} | "
                     f"{_cell(row, 'latency_ms_p99', '.2f')} | {_cell(row, 'size_mb', '.2f')} |")
    return "\n".join(lines) + "\n"


def export_manifests(report: Report) -> list[dict]:
    """The ``manifest.json`` of every directory holding a measured variant (each read once)."""
    manifests, seen = [], set()
    for row in report.rows:
        path = Path(row.onnx_path).parent / "manifest.json"
        if path.is_file() and path.resolve() not in seen:
            seen.add(path.resolve())
            manifests.append(json.loads(path.read_text()))
    return manifests


def write_parity_matrix(report: Report, output_dir: str | Path) -> dict[str, Path]:
    """``parity_matrix.md`` and ``parity_matrix.json`` in ``output_dir``."""
    rows = parity_matrix(report, export_manifests(report))
    output_dir = Path(output_dir)
    text = ("# Parity matrix: variant × runtime\n\nTop-1 agreement with the reference named in `vs` on the "
            "exporters' parity images; max abs logit difference for floating-point variants; latency (ONNX "
            "Runtime CPU, batch 1) and size from the report.\n\n" + parity_matrix_markdown(rows))
    return {"parity_matrix_md": write_text_atomic(output_dir / "parity_matrix.md", text),
            "parity_matrix_json": write_json_atomic(output_dir / "parity_matrix.json", rows)}
