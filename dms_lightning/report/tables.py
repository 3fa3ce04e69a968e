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
    if not value:  # not counted (a .tflite file: the report reads no graph statistics from it)
        return "n/a"
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


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def per_class_table(report: Report, metric: str = "recall") -> str:
    """One row per variant, one column per class: ``metric`` in % and its change vs the baseline in points.

    Safety classes (``report.safety["safety_classes"]``) are marked with ``†`` in the header; a cell whose
    recall drop broke the safety gate is bold and marked ``⚠``.
    """
    classes = next((row.class_names for row in report.rows if row.class_names), [])
    if not classes:
        return ""
    safety = report.safety or {}
    safety_classes = set(safety.get("safety_classes", []))
    flagged = {(v["variant"], v["class_name"]) for v in safety.get("violations", [])} if metric == "recall" else set()
    header = "| variant | " + " | ".join(f"{c} †" if c in safety_classes else c for c in classes) + " |"
    lines = [header, "|" + "---|" * (len(classes) + 1)]
    for row in report.rows:
        name = f"**{row.name}** *" if row.name == report.baseline else row.name
        cells = []
        for cls in classes:
            value = row.per_class.get(cls, {}).get(metric)
            delta = row.per_class_delta_pt.get(cls, {}).get(metric)
            cell = _pct(value) if row.name == report.baseline or delta is None else f"{_pct(value)} ({delta:+.1f})"
            cells.append(f"**{cell} ⚠**" if (row.name, cls) in flagged else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def safety_section(report: Report) -> str:
    """The safety gate's verdict in words (empty when no gate was applied)."""
    safety = report.safety
    if not safety:
        return ""
    limit = safety.get("max_recall_drop_pt")
    head = (f"Safety gate: recall on {', '.join(safety.get('safety_classes', []))} may drop at most {limit:g} pt "
            f"against {report.baseline} (on violation: {safety.get('on_violation')}).")
    violations = safety.get("violations", [])
    if not violations:
        return head + " Every variant passes.\n"
    items = [f"- **{v['variant']}**: {v['class_name']} recall {100 * v['recall']:.2f} % vs {100 * v['baseline_recall']:.2f} %"
             f" (-{v['drop_pt']:.2f} pt)" + ("" if v.get("accuracy_delta_pt") is None
                                               else f", top-1 {v['accuracy_delta_pt']:+.2f} pt") for v in violations]
    return head + f" **{len(violations)} violation(s):**\n\n" + "\n".join(items) + "\n"


def sensitivity_section(report: Report) -> str:
    """Every quantizer of each analysed network, worst first (empty when no sensitivity was measured)."""
    from dms_lightning.quant.sensitivity import SensitivityReport

    parts = []
    for name, data in (report.sensitivity or {}).items():
        analysed = SensitivityReport.from_dict(data)
        worst = ", ".join(f"`{row.name}` ({row.kind})" for row in analysed.worst(3))
        parts.append(f"Quantization sensitivity of **{name}** (every quantizer, worst first; most harmful: {worst}; "
                     f"chart: `{name}_sensitivity.png` where QuantizationSensitivity wrote it):\n\n"
                     + analysed.to_markdown(None))
    return "\n".join(parts)


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
    recall = per_class_table(report, "recall")
    if recall:
        parts += ["Per-class recall (%; in brackets the change against the baseline in pt; † safety class):\n",
                  recall, "Per-class precision (%, change in pt):\n", per_class_table(report, "precision")]
    safety = safety_section(report)
    if safety:
        parts.append(safety)
    sensitivity = sensitivity_section(report)
    if sensitivity:
        parts.append(sensitivity)
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
