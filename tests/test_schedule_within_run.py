"""Pruning and QAT schedules against the run a Trainer really makes: max_steps, accumulation, early stops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dms_lightning.callbacks import IterativePruning, QuantizationAwareTraining
from dms_lightning.utils.run_length import run_length

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyNet(LightningModule):
    """A plain user LightningModule with 8 training batches of 4 images."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
        self.example_input_array = torch.zeros(1, 1, 8, 8)
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(32, 1, 8, 8, generator=generator)
        self.labels = torch.randint(0, 4, (32,), generator=generator)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=4)


class StopAfterEpoch(Callback):
    """Ends fit early, as EarlyStopping or a time limit would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class RunLengthSeen(Callback):
    def on_train_start(self, trainer, pl_module):
        self.length = run_length(trainer)


@pytest.mark.parametrize(("limits", "epoch", "step"), [
    (dict(max_epochs=3), 2, 23),
    (dict(max_steps=10), 1, 9),
    (dict(max_epochs=5, max_steps=10, accumulate_grad_batches=3), 3, 9),
    (dict(max_epochs=2, accumulate_grad_batches=3, limit_train_batches=0.5), 1, 3),
])
def test_run_length_counts_epochs_and_optimizer_steps(tmp_path, limits, epoch, step):
    seen = RunLengthSeen()
    Trainer(default_root_dir=tmp_path, callbacks=[seen], **limits, **TRAINER).fit(TinyNet())
    assert (seen.length.last_epoch, seen.length.last_step) == (epoch, step)


def test_qat_start_epoch_beyond_max_steps_fails_before_training(tmp_path):
    # 8 optimizer steps per epoch: max_steps=16 ends after epoch 1, so QAT from epoch 3 would never start.
    trainer = Trainer(max_steps=16, default_root_dir=tmp_path,
                      callbacks=[QuantizationAwareTraining(start_epoch=3, export=False)], **TRAINER)
    with pytest.raises(MisconfigurationException, match=r"start_epoch=3\) would never start.*epoch 1.*max_steps=16"):
        trainer.fit(TinyNet())
    assert trainer.global_step == 0


@pytest.mark.parametrize("method", ["unstructured", "channel"])
def test_pruning_epochs_beyond_max_steps_fail_before_training(tmp_path, method):
    pruning = IterativePruning(method, target_sparsity=0.5, start_epoch=0, end_epoch=3)
    trainer = Trainer(max_steps=16, default_root_dir=tmp_path, callbacks=[pruning], **TRAINER)
    with pytest.raises(MisconfigurationException, match=r"end_epoch=3\) reaches beyond the run: it ends at epoch 1"):
        trainer.fit(TinyNet())
    assert trainer.global_step == 0


def test_pruning_steps_beyond_accumulated_run_fail_before_training(tmp_path):
    # 8 batches, 4 per optimizer step: 2 steps per epoch, 6 in 3 epochs (steps 0-5).
    pruning = IterativePruning("unstructured", target_sparsity=0.5, start_step=0, end_step=8)
    trainer = Trainer(max_epochs=3, accumulate_grad_batches=4, default_root_dir=tmp_path, callbacks=[pruning],
                      **TRAINER)
    with pytest.raises(MisconfigurationException, match=r"end_step=8\).*ends at step 5.*accumulate_grad_batches=4"):
        trainer.fit(TinyNet())
    assert trainer.global_step == 0


def test_pruning_steps_within_accumulated_run_reach_the_target(tmp_path):
    pruning = IterativePruning("unstructured", target_sparsity=0.5, start_step=0, end_step=5)
    Trainer(max_epochs=3, accumulate_grad_batches=4, default_root_dir=tmp_path, callbacks=[pruning],
            **TRAINER).fit(TinyNet())
    assert pruning.history[-1]["target"] == pytest.approx(0.5)
    assert pruning.history[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_step_scheduled_channel_removal_during_qat_fails_before_training(tmp_path):
    # Removal at step 10 falls in epoch 1 (8 steps per epoch), when QAT has already wrapped the network.
    callbacks = [IterativePruning("channel", target_sparsity=0.5, start_step=0, end_step=10),
                 QuantizationAwareTraining(start_epoch=1, export=False)]
    trainer = Trainer(max_epochs=3, default_root_dir=tmp_path, callbacks=callbacks, **TRAINER)
    with pytest.raises(MisconfigurationException, match=r"start_epoch=1\) would start before "
                                                        r"IterativePruning\(end_step=10\).*in epoch 1"):
        trainer.fit(TinyNet())
    assert trainer.global_step == 0


def test_qat_warns_when_fit_stops_before_start_epoch(tmp_path):
    qat = QuantizationAwareTraining(start_epoch=3, export=False)
    trainer = Trainer(max_epochs=5, default_root_dir=tmp_path, callbacks=[qat, StopAfterEpoch(1)], **TRAINER)
    with pytest.warns(UserWarning, match=r"start_epoch=3\): fit ended at epoch 2 before quantization-aware"):
        trainer.fit(TinyNet())
    assert qat.quantized_since is None and qat.int8_networks == []


def test_unstructured_pruning_warns_when_fit_stops_before_the_schedule(tmp_path):
    pruning = IterativePruning("unstructured", target_sparsity=0.5, start_epoch=0, end_epoch=4)
    trainer = Trainer(max_epochs=5, default_root_dir=tmp_path, callbacks=[pruning, StopAfterEpoch(1)], **TRAINER)
    with pytest.warns(UserWarning, match=r"fit ended before the last pruning point.*sparsity 0\.\d+ of the target 0.5"):
        trainer.fit(TinyNet())
    assert pruning.history[-1]["target"] < 0.5
