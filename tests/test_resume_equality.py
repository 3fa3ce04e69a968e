"""A ``fit`` resumed from ``last.ckpt`` ends exactly where the uninterrupted run ends, with our data module and modules.

Lightning restores weights, optimizers, schedulers and loops, but not the random generators: before, a run resumed at
epoch ``k`` shuffled, augmented, dropped out and mixed as the uninterrupted run did at epoch 0, and ended elsewhere
(every case below failed). The checkpoint now carries the generators and which augmented view comes next
(:mod:`dms_lightning.utils.rng`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from dms_lightning import DistillationModule, DMSClassifier, DMSDataModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = dict(image_size=32, train_size=64, val_size=16, test_size=16, batch_size=16)
EPOCHS = 3


class _StopAfter(Callback):
    """An interruption: the run stops after ``epochs`` epochs of a longer schedule (its last.ckpt is written)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


class _UserNet(LightningModule):
    """A user's own module (no checkpoint hooks of ours) on our data module."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 5))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, make_module, data: dict, ckpt_path: str | None = None, stop_after: int | None = None) -> dict:
    seed_everything(3)
    module = make_module()
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True)] + ([_StopAfter(stop_after)] if stop_after else [])
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                      default_root_dir=str(root), callbacks=callbacks)
    trainer.fit(module, DMSDataModule(**DATA, **data), ckpt_path=ckpt_path)
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_resume_equals_uninterrupted(tmp_path, make_module, data: dict) -> None:
    uninterrupted = _fit(tmp_path / "whole", make_module, data)
    _fit(tmp_path / "interrupted", make_module, data, stop_after=1)
    resumed = _fit(tmp_path / "resumed", make_module, data, ckpt_path=str(tmp_path / "interrupted" / "last.ckpt"))
    differ = [k for k, v in uninterrupted.items() if v.is_floating_point() and not torch.equal(v, resumed[k])]
    assert not differ, f"the resumed run ended elsewhere: {differ[:4]}"
    assert any(v.is_floating_point() and not torch.equal(v, torch.zeros_like(v)) for v in resumed.values())


def _classifier() -> DMSClassifier:
    return DMSClassifier(backbone="mobilenet_v3_small", num_classes=5, image_size=32)  # dropout 0.2 in its head


@pytest.mark.parametrize("data", [
    dict(augment=True),  # fresh augmentation every epoch, shuffled
    dict(augment=True, augment_views=2),  # fixed views, read in turn
    dict(augment=False),  # shuffling and dropout only
    dict(augment=True, balance="sampler"),  # class-balanced draws with replacement
], ids=["augment", "views", "plain", "balanced-sampler"])
def test_classifier_resumed_ends_like_the_uninterrupted_run(tmp_path, data):
    _assert_resume_equals_uninterrupted(tmp_path, _classifier, data)


def test_a_users_module_on_our_data_resumes_like_the_uninterrupted_run(tmp_path):
    _assert_resume_equals_uninterrupted(tmp_path, _UserNet, dict(augment=True))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_train_batches=1,
                      limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(DMSClassifier("resnet18", image_size=32), datamodule=DMSDataModule(**DATA, augment=False))
    trainer.save_checkpoint(root / "teacher.ckpt", weights_only=True)
    return str(root / "teacher.ckpt")


def test_distillation_with_mixup_resumed_ends_like_the_uninterrupted_run(tmp_path, teacher_ckpt):
    def make():
        return DistillationModule(student="mobilenet_v3_small", teacher_checkpoint=teacher_ckpt, image_size=32,
                                  mixing="mixup")

    _assert_resume_equals_uninterrupted(tmp_path, make, dict(augment=True))


def test_loading_a_checkpoint_to_evaluate_leaves_the_random_generators_alone(tmp_path):
    _fit(tmp_path, _classifier, dict(augment=True), stop_after=1)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "rng_states" in checkpoint["dms_lightning"] and "rng_states" in checkpoint["DMSDataModule"]
    stripped = tmp_path / "without_rng.ckpt"
    del checkpoint["dms_lightning"]["rng_states"], checkpoint["DMSDataModule"]["rng_states"]
    torch.save(checkpoint, stripped)

    def evaluate(path) -> torch.Tensor:
        torch.manual_seed(11)
        DMSClassifier.load_from_checkpoint(path)
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.test(_classifier(), DMSDataModule(**DATA), ckpt_path=str(path), verbose=False)
        return torch.get_rng_state()

    assert torch.equal(evaluate(tmp_path / "last.ckpt"), evaluate(stripped)), "evaluation restored the generators"


@pytest.mark.parametrize("stop_after", [1, 3], ids=["after-pruning", "mid-qat"])
def test_the_main_jobs_schedule_resumed_ends_like_the_uninterrupted_run(tmp_path, teacher_ckpt, stop_after):
    """configs/distill.yaml in small: the teacher's outputs cached per fixed view, channel pruning in epochs 0-1
    (removed at the end of 1), QAT from epoch 2 with BatchNorm and observers frozen in the last epoch."""
    from dms_lightning.callbacks import IterativePruning, QuantizationAwareTraining

    def make():
        return DistillationModule(student="mobilenet_v3_small", teacher_checkpoint=teacher_ckpt, image_size=32,
                                  teacher_cache=True, attention_transfer=[{"student": "features.3", "teacher": "layer2"}])

    def fit(root, ckpt_path=None, stop=None):
        seed_everything(3)
        module = make()
        callbacks = [IterativePruning(method="channel", target_sparsity=0.3, start_epoch=0, end_epoch=1, round_to=8),
                     QuantizationAwareTraining(start_epoch=2, freeze_bn_epoch=4, freeze_observers_epoch=4,
                                               export=False),
                     ModelCheckpoint(dirpath=root, save_last=True)] + ([_StopAfter(stop)] if stop else [])
        trainer = Trainer(accelerator="cpu", devices=1, max_epochs=5, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                          default_root_dir=str(root), callbacks=callbacks)
        trainer.fit(module, DMSDataModule(**DATA, augment=True, augment_views=1), ckpt_path=ckpt_path)
        return {k: v.clone() for k, v in module.state_dict().items()}

    uninterrupted = fit(tmp_path / "whole")
    fit(tmp_path / "interrupted", stop=stop_after)
    resumed = fit(tmp_path / "resumed", ckpt_path=str(tmp_path / "interrupted" / "last.ckpt"))
    assert resumed.keys() == uninterrupted.keys()
    differ = [k for k, v in uninterrupted.items() if v.is_floating_point() and not torch.equal(v, resumed[k])]
    assert not differ, f"the resumed run ended elsewhere: {differ[:4]}"
