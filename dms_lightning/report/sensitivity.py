"""QuantizationSensitivity: the per-quantizer sensitivity of a run's fake-quantized networks, as files and pictures.

The analysis is :func:`dms_lightning.quant.sensitivity.quantization_sensitivity` (torch only); this callback
runs it at the end of ``fit`` and writes what a person reads: a markdown table of the worst quantizers, every
row as JSON, and a bar chart, also shown in TensorBoard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from dms_lightning.quant.sensitivity import SensitivityReport, named_quantizers, quantization_sensitivity
from dms_lightning.utils.artifacts import quantized_networks
from dms_lightning.utils.io import atomic_path, write_json_atomic, write_text_atomic
from dms_lightning.utils.plotting import bar_chart_figure
from dms_lightning.utils.predictions import split_dataloaders
from dms_lightning.utils.tensorboard import log_figure, log_text
from dms_lightning.utils.validation import check_int


def sensitivity_figure(report: SensitivityReport, count: int = 20):
    """Bar chart of the SQNR of the worst ``count`` quantizers (short bars hurt most), accuracy drop annotated."""
    rows = report.rows[:count]
    return bar_chart_figure([f"{row.name} ({row.kind[0]})" for row in rows],
                            [min(row.sqnr_db, 99.0) for row in rows],
                            [f"{100 * (row.only - report.float_accuracy):+.1f} pt" for row in rows],
                            xlabel="SQNR of the logits with only this quantizer on (dB)",
                            title="quantization sensitivity (worst first)")


class QuantizationSensitivity(Callback):
    """At the end of ``fit``: :func:`quantization_sensitivity` of every fake-quantized network of the run.

    Place it after :class:`~dms_lightning.callbacks.QuantizationAwareTraining` or
    :class:`~dms_lightning.callbacks.PostTrainingQuantization` (it reads the networks they hand down; in a run
    without them, the LightningModule itself when it holds fake quantizers). For each network it writes
    ``<dirpath>/<name>_sensitivity.{md,json,png}`` (table of the worst ``top`` quantizers, every row, bar
    chart) and logs the chart and the table to TensorBoard (``quantization/sensitivity/<name>``). A
    :class:`~dms_lightning.callbacks.CompressionReport` placed after it adds the table to its report.

    Args:
        dirpath: output folder (default ``<log_dir>/quantization``).
        split: ``"val"`` or ``"test"``: the labelled batches analysed.
        batches: batches of that split (``None``: all).
        images: at most this many images of them (``None``: all); the cost is two forward passes of them per
            quantizer.
        kinds: ``["weight", "activation"]`` or one of them.
        top: rows in the markdown table and the chart.
    """

    def __init__(self, dirpath: str | None = None, split: str = "val", batches: int | None = 4,
                 kinds: Sequence[str] = ("weight", "activation"), top: int = 15, images: int | None = None) -> None:
        super().__init__()
        if split not in ("val", "test"):
            raise ValueError(f"QuantizationSensitivity: split={split!r} must be 'val' or 'test'")
        check_int("QuantizationSensitivity: batches", batches, 1, optional=True, hint="(or None for the whole split)")
        check_int("QuantizationSensitivity: top", top, 1)
        check_int("QuantizationSensitivity: images", images, 1, optional=True, hint="(or None for every image)")
        self.images = images
        if not kinds or set(kinds) - {"weight", "activation"}:
            raise ValueError(f"QuantizationSensitivity: kinds={list(kinds)!r}: choose from 'weight' and 'activation'")
        self.dirpath, self.split, self.batches, self.kinds, self.top = dirpath, split, batches, tuple(kinds), top
        self.sensitivity_reports: dict[str, SensitivityReport] = {}

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        networks = [(n.name, n.network) for n in quantized_networks(trainer)]
        if not networks and named_quantizers(pl_module):
            networks = [(type(pl_module).__name__.lower(), pl_module)]
        if not networks:
            rank_zero_warn("QuantizationSensitivity: no fake-quantized network in this run; place it after "
                           "QuantizationAwareTraining or PostTrainingQuantization")
            return
        loader = split_dataloaders(trainer, self.split)
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            rank_zero_warn(f"QuantizationSensitivity: the run has no {self.split} dataloader; nothing analysed")
            return
        for name, network in networks:
            self.sensitivity_reports[name] = quantization_sensitivity(network, loader, batches=self.batches,
                                                                    kinds=self.kinds, images=self.images)
        self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: Trainer) -> None:
        import matplotlib.pyplot as plt

        folder = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "quantization")
        folder.mkdir(parents=True, exist_ok=True)
        for name, report in self.sensitivity_reports.items():
            table = report.to_markdown(self.top)
            write_text_atomic(folder / f"{name}_sensitivity.md", f"# Quantization sensitivity: {name}\n\n{table}")
            write_json_atomic(folder / f"{name}_sensitivity.json", report.to_dict())
            figure = sensitivity_figure(report, self.top)
            with atomic_path(folder / f"{name}_sensitivity.png") as tmp:
                figure.savefig(tmp, format="png", dpi=110)
            log_figure(trainer, f"quantization/sensitivity/{name}", figure)
            plt.close(figure)
            log_text(trainer, f"quantization/sensitivity/{name}", table)
