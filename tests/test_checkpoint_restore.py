"""Resume of a plain user LightningModule (not ours) whose architecture pruning and QAT changed mid-fit.

The module defines no ``compression_target``, no ``on_load_checkpoint`` and no ``example_input_array``: the
callbacks alone must rebuild the recorded architecture (channels removed, then quantizers wrapped) before
Lightning loads the weights. A resumed run must end exactly where the uninterrupted run ended.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dms_lightning.callbacks import IterativePruning, QuantizationAwareTraining
from dms_lightning.quant import is_quantized

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0, limit_val_batches=1, deterministic=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class UserNet(LightningModule):
    """What a Lightning user writes: a network attribute, a loss, an optimizer, fixed-order data. Nothing more."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential()
        self.net.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.net.body = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.net.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(32, 1, 16, 16, generator=generator)
        self.labels = torch.randint(0, 4, (32,), generator=generator)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self(images), labels))

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.log("test_loss", F.cross_entropy(self(images), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def _loader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=8, shuffle=False)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()


def _callbacks(pruning: bool) -> list:
    qat = QuantizationAwareTraining(start_epoch=2 if pruning else 1, export=False)
    if not pruning:
        return [qat]
    return [IterativePruning("channel", target_sparsity=0.5, schedule="one_shot", start_epoch=1, min_channels=4),
            qat]


def _fit(module: UserNet, root: Path, pruning: bool, ckpt_path: Path | None = None) -> Trainer:
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", filename="e{epoch}", save_top_k=-1, save_last=True,
                                 auto_insert_metric_name=False)
    trainer = Trainer(max_epochs=4, callbacks=[*_callbacks(pruning), checkpoint], default_root_dir=root,
                      limit_train_batches=3, **TRAINER)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def _assert_same_network(resumed: nn.Module, uninterrupted: nn.Module) -> None:
    expected, actual = uninterrupted.state_dict(), resumed.state_dict()
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        torch.testing.assert_close(actual[key], value, msg=key)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain_qat")
    torch.manual_seed(0)
    module = UserNet()
    trainer = _fit(module, root, pruning=False)
    return root, module, trainer


@pytest.fixture(scope="module")
def pruned_qat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain_pruned_qat")
    torch.manual_seed(0)
    module = UserNet()
    widths = {n: m.out_channels for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}
    trainer = _fit(module, root, pruning=True)
    return root, module, trainer, widths


def test_plain_module_resumed_mid_qat_ends_like_the_uninterrupted_run(qat_run, tmp_path):
    root, uninterrupted, _ = qat_run
    assert is_quantized(uninterrupted)
    torch.manual_seed(1)  # another initialisation: everything must come from the checkpoint
    resumed = UserNet()
    _fit(resumed, tmp_path, pruning=False, ckpt_path=root / "ckpt" / "e1.ckpt")  # QAT started at epoch 1
    assert any("quantizer" in key for key in resumed.state_dict())
    _assert_same_network(resumed, uninterrupted)


@pytest.mark.parametrize("stopped_after", ["e1", "e2"], ids=["after_removal", "after_qat_started"])
def test_plain_module_resumed_after_pruning_and_qat_ends_like_the_uninterrupted_run(pruned_qat_run, stopped_after,
                                                                                   tmp_path):
    root, uninterrupted, _, widths = pruned_qat_run
    pruned = {n: m.conv.out_channels for n, m in uninterrupted.named_modules() if hasattr(m, "conv")}
    assert sum(pruned.values()) < sum(widths.values())
    torch.manual_seed(1)
    resumed = UserNet()
    _fit(resumed, tmp_path, pruning=True, ckpt_path=root / "ckpt" / f"{stopped_after}.ckpt")
    _assert_same_network(resumed, uninterrupted)


def test_plain_module_tests_the_best_checkpoint_after_qat(qat_run, tmp_path):
    root, uninterrupted, trainer = qat_run
    (result,) = trainer.test(uninterrupted, ckpt_path="best", verbose=False)
    assert torch.isfinite(torch.tensor(result["test_loss"]))
    # And in a fresh process-like setting: a full-size float module, the QAT callback, the last checkpoint.
    fresh = UserNet()
    tester = Trainer(callbacks=_callbacks(pruning=False), default_root_dir=tmp_path, **TRAINER)
    (again,) = tester.test(fresh, ckpt_path=root / "ckpt" / "last.ckpt", verbose=False)
    assert is_quantized(fresh)
    assert again["test_loss"] == pytest.approx(result["test_loss"], rel=1e-5)
