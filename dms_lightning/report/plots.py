"""Accuracy-vs-size and accuracy-vs-latency plots with the Pareto front highlighted; a confusion matrix per variant."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from dms_lightning.report.measure import Report, VariantMetrics
from dms_lightning.utils.io import atomic_path
from dms_lightning.utils.plotting import confusion_matrix_figure, plt

#: Plot name → (row attribute on the x axis, axis label). Lower x is better on both.
PARETO_AXES: dict[str, tuple[str, str]] = {
    "size": ("file_size_mb", "ONNX file size (MB, log scale)"),
    "latency": ("latency_ms_p50", "ONNX Runtime CPU latency p50, batch 1 (ms, log scale)"),
}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower-or-equal cost and higher-or-equal accuracy, one strictly.

    Example:
        >>> pareto_front([(10, 0.9), (5, 0.8), (6, 0.7), (1, 0.5)])
        [0, 1, 3]
    """
    front = []
    for i, (cost, score) in enumerate(points):
        dominated = any(c <= cost and s >= score and (c < cost or s > score)
                        for j, (c, s) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _plottable(rows: Sequence[VariantMetrics], attribute: str) -> list[VariantMetrics]:
    return [row for row in rows if row.accuracy is not None and getattr(row, attribute) > 0]


def pareto_figure(report: Report, axis: str = "size"):
    """A figure of accuracy against ``axis`` (``"size"`` or ``"latency"``); ``None`` if nothing has accuracy."""
    if axis not in PARETO_AXES:
        raise ValueError(f"axis={axis!r} must be one of {sorted(PARETO_AXES)}")
    attribute, label = PARETO_AXES[axis]
    rows = _plottable(report.rows, attribute)
    if not rows:
        return None
    points = [(getattr(row, attribute), 100.0 * row.accuracy) for row in rows]
    front = set(pareto_front(points))
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    others = [p for i, p in enumerate(points) if i not in front]
    if others:
        ax.scatter(*zip(*others), s=46, color="#9aa5b1", edgecolor="#52606d", zorder=3, label="dominated")
    front_points = sorted(points[i] for i in front)
    ax.plot(*zip(*front_points), color="#d64545", linewidth=1.6, zorder=2, drawstyle="steps-post")
    ax.scatter(*zip(*front_points), s=64, color="#d64545", edgecolor="#8a1c1c", zorder=4, label="Pareto front")
    for row, (x, y) in zip(rows, points):
        text = f"{row.name}\n{row.precision}" + (" (baseline)" if row.name == report.baseline else "")
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=7.5)
    ax.set_xscale("log")
    # Plain 1-2-5 tick labels: "3 MB" reads better than "3 × 10^0".
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%, ONNX Runtime)")
    ax.set_title(f"accuracy vs {axis}: better is up and to the left")
    ax.grid(True, which="both", alpha=0.3)
    low, high = min(p[0] for p in points), max(p[0] for p in points)
    ax.set_xlim(low / 1.6, high * 2.2)  # room on the right for the labels
    ys = [p[1] for p in points]
    margin = max(0.5, 0.1 * (max(ys) - min(ys)))
    ax.set_ylim(min(ys) - margin, max(ys) + 2 * margin)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def save_pareto_plots(report: Report, output_dir: str | Path, stem: str = "pareto") -> dict[str, Path]:
    """Write ``<stem>_size.png`` and ``<stem>_latency.png`` (atomically); return the written paths."""
    written = {}
    for axis in PARETO_AXES:
        fig = pareto_figure(report, axis)
        if fig is None:
            continue
        written[axis] = save_figure(fig, Path(output_dir) / f"{stem}_{axis}.png", dpi=120)
    return written


def confusion_figures(report: Report) -> dict[str, object]:
    """A confusion-matrix figure per variant that was measured on test data (name -> figure)."""
    figures = {}
    for row in report.rows:
        matrix = row.info.get("confusion_matrix")
        if matrix is None:
            continue
        names = row.class_names or [f"class_{i}" for i in range(len(matrix))]
        accuracy = "" if row.accuracy is None else f", top-1 {100 * row.accuracy:.2f} %"
        figures[row.name] = confusion_matrix_figure(matrix, names, f"{row.name}{accuracy}")
    return figures


def save_confusion_matrices(report: Report, output_dir: str | Path) -> dict[str, Path]:
    """Write ``confusion_<variant>.png`` for each measured variant (atomically); return the written paths."""
    written = {}
    for name, fig in confusion_figures(report).items():
        written[name] = save_figure(fig, Path(output_dir) / f"confusion_{name}.png", dpi=110)
    return written
