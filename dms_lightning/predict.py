"""PredictionWriter: the class and per-class probabilities of every predicted image, as CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dms_lightning.utils.io import atomic_path


class PredictionWriter(BasePredictionWriter):
    """Write ``id, predicted class, label, p(class)...`` rows to ``output_path`` when prediction ends.

    Args:
        output_path: CSV file to write; default ``<log_dir>/predictions.csv``.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path
        self.written: Path | None = None

    @override
    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions, batch_indices) -> None:
        if trainer.global_rank != 0:
            return
        names = getattr(pl_module, "class_names", None)
        path = Path(self.output_path or Path(trainer.log_dir or ".") / "predictions.csv")
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = None
            for batch in predictions if isinstance(predictions[0], dict) else predictions[0]:
                probs = batch["probs"].cpu()
                names = names or [f"class_{i}" for i in range(probs.shape[1])]
                if writer is None:
                    writer = csv.writer(fh)
                    writer.writerow(["id", "predicted", "label"] + [f"p_{n}" for n in names])
                ids = batch.get("ids") or [""] * len(probs)
                labels = batch.get("label")
                for i, row in enumerate(probs.tolist()):
                    label = names[int(labels[i])] if labels is not None and int(labels[i]) >= 0 else ""  # -1: none
                    writer.writerow([ids[i], names[int(batch["pred"][i])], label] + [f"{p:.6f}" for p in row])
        self.written = path
        rank_zero_info(f"[dms_lightning] predictions written to {path}")
