"""The callbacks under Trainer precisions that convert the network itself ("64-true", "bf16-true")."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from dms_lightning import DMSDataModule
from dms_lightning.callbacks import (
    BatchNormReestimation,
    IterativePruning,
    ONNXExport,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyNet(LightningModule):
    """A plain user LightningModule; its example input is float32 like any user's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
        self.example_input_array = torch.zeros(1, 1, 32, 32)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _datamodule() -> DMSDataModule:
    return DMSDataModule(image_size=32, train_size=32, val_size=16, test_size=16, batch_size=16, augment=False)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_pruning_qat_and_export_run_on_a_converted_network(tmp_path, precision):
    module = TinyNet()
    pruning = IterativePruning("channel", target_sparsity=0.5, start_epoch=0, end_epoch=0)
    callbacks = [pruning,
                 BatchNormReestimation(num_batches=1), QuantizationAwareTraining(start_epoch=1),
                 ONNXExport(checkpoint="last", dirpath=str(tmp_path / "export"))]
    Trainer(max_epochs=2, precision=precision, default_root_dir=tmp_path, callbacks=callbacks,
            **TRAINER).fit(module, _datamodule())
    assert pruning.removed and sum(p.numel() for p in module.parameters()) < sum(
        p.numel() for p in TinyNet().parameters())
    for name in ("model_fp32.onnx", "model_int8.onnx"):
        onnx.checker.check_model(onnx.load(str(tmp_path / "export" / name)))


def test_post_training_quantization_runs_on_a_float64_network(tmp_path):
    ptq = PostTrainingQuantization(calibration_batches=1)
    callbacks = [BatchNormReestimation(num_batches=1), ptq, ONNXExport(checkpoint="last")]
    Trainer(max_epochs=1, precision="64-true", default_root_dir=tmp_path, callbacks=callbacks,
            **TRAINER).fit(TinyNet(), _datamodule())
    assert ptq.result["activation_quantizers"] > 0
    assert (tmp_path / "quantization" / "ptq_int8.onnx").is_file()
