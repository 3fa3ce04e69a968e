"""Matplotlib figures shown in TensorBoard and in reports (headless: the Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix_figure(matrix, class_names: Sequence[str], title: str = "confusion matrix"):
    """A row-normalised confusion matrix (rows: true class) with the raw counts written in each cell."""
    counts = np.asarray(matrix, dtype=np.int64)
    rates = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    size = 1.6 + 0.75 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(class_names)), class_names, rotation=40, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, f"{counts[i, j]}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="recall of the true class")
    fig.tight_layout()
    return fig


def image_grid_figure(images, titles: Sequence[str], columns: int = 8):
    """Grayscale images (N × H × W, floats in [0, 1]) in a grid with a title each."""
    images = np.asarray(images)
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


def bar_chart_figure(labels: Sequence[str], values: Sequence[float], annotations: Sequence[str] | None = None, *,
                     xlabel: str = "", title: str = ""):
    """Horizontal bars, first label on top, with an optional text at the end of each bar."""
    height = 1.2 + 0.32 * len(labels)
    fig, ax = plt.subplots(figsize=(8.0, height))
    positions = np.arange(len(labels))[::-1]
    ax.barh(positions, values, color="tab:orange")
    ax.set_yticks(positions, labels, fontsize=7)
    for position, value, text in zip(positions, values, annotations or [""] * len(labels)):
        ax.text(value, position, f" {text}", va="center", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig
