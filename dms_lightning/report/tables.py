"""The compression report as markdown, CSV and JSON, each written atomically."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from dms_lightning.report.machine import machine_summary
from dms_lightning.report.measure import Report, VariantMetrics
from dms_lightning.utils.io import write_json_atomic, write_text_atomic

#: Scalar fields of a row, in CSV column order (``notes`` joined with "; ").
CSV_COLUMNS: tuple[str, ...] = (
    "name", "precision", "producer", "onnx_path", "file_size_bytes", "file_size_mb", "parameters", "macs",
    "quantized_weight_fraction", "latency_batch", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99",
    "latency_ms_mean", "latency_runs", "throughput_batch", "throughput_images_per_s", "static_batch", "accuracy",
    "macro_f1", "test_samples", "baseline", "size_ratio", "speedup", "params_ratio", "macs_ratio",
    "throughput_ratio", "accuracy_delta_pt", "macro_f1_delta_pt", "notes",
)


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def _count(value: int) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f} G"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return str(value)


def _times(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.1f}×" if value >= 10 else f"{value:.2f}×"


def _delta(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def markdown_table(report: Report) -> str:
    """The table alone: one row per variant, ratios against the baseline (marked with ``*``)."""
    header = ("| variant | precision | size (MB) | params | MACs | latency p50 / p90 / p99 (ms) | throughput (img/s) "
              "| accuracy (%) | macro-F1 | × smaller | × faster | Δ acc (pt) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in report.rows:
        name = f"**{row.name}** *" if row.name == report.baseline else row.name
        latency = (f"{_fmt(row.latency_ms_p50, '.2f')} / {_fmt(row.latency_ms_p90, '.2f')} / "
                   f"{_fmt(row.latency_ms_p99, '.2f')}")
        if row.latency_batch != 1:
            latency += f" (batch {row.latency_batch})"
        throughput = f"{_fmt(row.throughput_images_per_s, '.0f')} @ {row.throughput_batch}"
        if row.static_batch and row.throughput_batch == 1:
            throughput += " (static batch 1)"
        lines.append(
            f"| {name} | {row.precision} | {_fmt(row.file_size_mb, '.2f')} | {_count(row.parameters)} | "
            f"{_count(row.macs)} | {latency} | {throughput} | "
            f"{_fmt(None if row.accuracy is None else 100 * row.accuracy, '.2f')} | {_fmt(row.macro_f1, '.3f')} | "
            f"{_times(row.size_ratio)} | {_times(row.speedup)} | {_delta(row.accuracy_delta_pt)} |")
    return "\n".join(lines) + "\n"


def to_markdown(report: Report, title: str = "Compression report") -> str:
    """A self-contained markdown document: title, machine, settings, the table and any notes."""
    settings = report.settings
    parts = [
        f"# {title}\n",
        f"Machine: {machine_summary(report.machine)}.  ",
        f"Measured {report.machine.get('measured_at', '')}: ONNX Runtime CPU, batch-1 latency over "
        f"{settings.get('latency_runs')} runs after {settings.get('warmup_runs')} warm-up runs; throughput at "
        f"batch {settings.get('throughput_batch')}; accuracy and macro-F1 of the ONNX Runtime outputs on "
        f"{_test_samples(report.rows)} test images. Ratios are against the baseline **{report.baseline}** (*): "
        "× smaller = its file size / this one, × faster = its p50 latency / this one.\n",
        markdown_table(report),
    ]
    notes = [f"- {row.name}: {note}" for row in report.rows for note in row.notes]
    if notes:
        parts.append("Notes:\n\n" + "\n".join(notes) + "\n")
    return "\n".join(parts)


def _test_samples(rows: list[VariantMetrics]) -> str:
    counts = sorted({row.test_samples for row in rows if row.test_samples})
    return "/".join(str(c) for c in counts) if counts else "no"


def to_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        values = row.to_dict()
        values["notes"] = "; ".join(row.notes)
        writer.writerow({k: "" if values.get(k) is None else values.get(k) for k in CSV_COLUMNS})
    return buffer.getvalue()


def write_markdown(report: Report, path: str | Path, title: str = "Compression report") -> Path:
    return write_text_atomic(path, to_markdown(report, title))


def write_csv(report: Report, path: str | Path) -> Path:
    return write_text_atomic(path, to_csv(report))


def write_json(report: Report, path: str | Path) -> Path:
    return write_json_atomic(path, report.to_dict())


def write_tables(report: Report, output_dir: str | Path, stem: str = "report",
                 title: str = "Compression report") -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.json`` into ``output_dir``; return their paths."""
    output_dir = Path(output_dir)
    return {"markdown": write_markdown(report, output_dir / f"{stem}.md", title),
            "csv": write_csv(report, output_dir / f"{stem}.csv"),
            "json": write_json(report, output_dir / f"{stem}.json")}
