"""Someone's DataModule yields dict batches (``{"image": ..., "label": ...}``, as many projects and Hugging Face style
datasets do): every callback that reads the run's data finds the images and the labels in them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dms_lightning.utils.predictions import batch_images, batch_labels, require_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dict_batches(items):
    return {"pixel_values": torch.stack([i[0] for i in items]), "labels": torch.stack([i[1] for i in items])}


class DictData(LightningDataModule):
    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 3, (96,), generator=generator)
        images = torch.randn(96, 1, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1).float()
        self.data = TensorDataset(images, labels)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=True, collate_fn=_dict_batches)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=32, collate_fn=_dict_batches)

    test_dataloader = val_dataloader


class DictModule(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["pixel_values"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["pixel_values"]).argmax(1) == batch["labels"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_images_and_labels_are_found_in_tuples_and_dicts():
    images, labels = torch.zeros(2, 1, 4, 4), torch.tensor([1, 2])
    for batch in ((images, labels), [images, labels, "ids"], {"image": images, "label": labels},
                  {"pixel_values": images, "targets": labels}):
        assert batch_images(batch) is images and torch.equal(batch_labels(batch), labels)
    assert batch_labels(images) is None and batch_labels({"image": images}) is None
    assert batch_labels((images, ["a.png", "b.png"])) is None  # file names are not labels
    assert batch_labels((images, torch.eye(2))) is None  # nor are one-hot targets
    with pytest.raises(ValueError, match=r"sensitivity needs labelled batches.*'label'.*keys \['image'\]"):
        require_labels({"image": images}, "sensitivity")
    with pytest.raises(TypeError, match=r"keys \['frames'\].*'pixel_values'"):
        batch_images({"frames": images})


def test_every_data_reading_callback_works_on_dict_batches(tmp_path):
    from dms_lightning.callbacks import (BatchNormReestimation, CompressionReport, ONNXExport, QuantizationAwareTraining,
                                         QuantizationSensitivity)

    torch.manual_seed(0)
    reestimation = BatchNormReestimation(num_batches=2)
    sensitivity = QuantizationSensitivity(dirpath=str(tmp_path / "sensitivity"), batches=1)
    report = CompressionReport(output_dir=str(tmp_path / "report"), print_table=False, progress_bar=False,
                               log_to_tensorboard=False, warmup_runs=1, latency_runs=3, throughput_runs=1)
    callbacks = [QuantizationAwareTraining(start_epoch=1, export=False), reestimation, sensitivity,
                 ONNXExport(dirpath=str(tmp_path / "export"), checkpoint="last", parity_batches=1), report]
    trainer = Trainer(max_epochs=2, callbacks=callbacks, default_root_dir=str(tmp_path), logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(DictModule(), DictData())

    # BatchNorm re-estimation measured validation accuracy (it skipped it silently on dict batches)
    assert reestimation.history and all(event["val_acc_after"] is not None for event in reestimation.history)
    assert sensitivity.sensitivity_reports and list((tmp_path / "sensitivity").glob("*_sensitivity.md"))
    rows = {row.name: row for row in report.report.rows}
    assert {"model_fp32", "model_int8"} <= set(rows)
    assert all(row.accuracy is not None and row.test_samples == 96 for row in rows.values())
