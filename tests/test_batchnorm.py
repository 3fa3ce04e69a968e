"""BatchNorm re-estimation: exact statistics, weights and modes untouched, reproducible, and in a Lightning run."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.models.batchnorm import (
    CHECKPOINT_RECORD,
    BatchNormReestimation,
    reestimate_batch_norm,
    statistics_loader,
)


def _conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def test_statistics_are_the_population_mean_and_variance_of_the_inputs():
    net = _conv_bn()
    images = torch.randn(50, 1, 10, 10) * 2.0 + 3.0
    with torch.no_grad():
        features = net[0](images).double()
    expected_mean = features.mean(dim=(0, 2, 3))
    expected_var = features.var(dim=(0, 2, 3), unbiased=True)
    # Uneven batches (16, 16, 16, 2): equal weight per sample, not per batch.
    result = reestimate_batch_norm(net, DataLoader(TensorDataset(images), batch_size=16), num_batches=None)
    assert (result.layers, result.batches, result.samples) == (1, 4, 50)
    torch.testing.assert_close(net[1].running_mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var.double(), expected_var, rtol=1e-5, atol=1e-5)


def test_weights_modes_and_momenta_are_restored():
    net = _conv_bn()
    net[1].momentum = 0.3
    net.train()
    net[3].eval()  # a user's own mix of modes is kept as it was
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    reestimate_batch_norm(net, [torch.randn(8, 1, 10, 10) for _ in range(3)])
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items() if k in weights)
    assert net.training and net[1].training and not net[3].training and net[1].momentum == 0.3


def test_stale_statistics_are_repaired_and_the_eval_accuracy_comes_back():
    torch.manual_seed(0)
    images = torch.randn(120, 1, 8, 8)
    labels = (images.mean(dim=(1, 2, 3)) > 0).long()
    images = images * 4 + 10  # far from BatchNorm's initial mean 0 / variance 1
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        optimizer.step()
    net[2].reset_running_stats()  # what a short run leaves: statistics far from the trained weights'
    net.eval()
    stale = (net(images).argmax(1) == labels).float().mean()
    reestimate_batch_norm(net, DataLoader(TensorDataset(images), batch_size=40))
    repaired = (net(images).argmax(1) == labels).float().mean()
    assert stale < 0.8 and repaired > 0.95


def test_a_frozen_folded_batch_norm_is_left_alone_and_a_live_one_is_estimated_without_moving_observers():
    from dms_lightning.quant.modules import QuantConvBn2d
    from dms_lightning.quant.spec import weight_spec

    conv, bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
    host = QuantConvBn2d(conv, bn, weight_spec(8, symmetric=True, per_channel=True))
    images = torch.randn(32, 1, 8, 8) * 2 + 1
    host.bn_frozen.fill_(True)
    result = reestimate_batch_norm(host, [images])
    assert result.layers == 0 and result.skipped == [""] and torch.equal(bn.running_mean, torch.zeros(4))
    host.bn_frozen.fill_(False)
    host.eval()
    result = reestimate_batch_norm(host, [images])
    with torch.no_grad():
        expected = conv(images).mean(dim=(0, 2, 3))
    assert result.layers == 1 and not host.training
    torch.testing.assert_close(bn.running_mean, expected, rtol=0.05, atol=0.02)  # 8-bit folded weights


class _Tiny(LightningModule):
    """A plain user module (no compression_target): two BatchNorms, a few steps per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loaders():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(48, 1, 8, 8, generator=g) + 2, torch.randint(0, 2, (48,), generator=g)
    return (DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True),
            DataLoader(TensorDataset(images, labels), batch_size=16))


def test_callback_reestimates_each_short_epoch_logs_accuracy_and_records_it_in_the_checkpoint(tmp_path):
    train, val = _loaders()
    module = _Tiny()
    callback = BatchNormReestimation(num_batches=2)
    trainer = Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                      callbacks=[callback])
    trainer.fit(module, train, val)
    # 3 steps per epoch < 30 (momentum 0.1): once per epoch, the last one also serving as the train end.
    assert [e["reason"] for e in callback.history] == ["epoch end", "epoch end"]
    assert all(e["layers"] == 2 and e["samples"] == 32 and e["val_acc_after"] is not None for e in callback.history)
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert len(checkpoint["dms_lightning"][CHECKPOINT_RECORD]["history"]) == 2
    # The saved running statistics are the re-estimated ones.
    reference = _Tiny()
    reference.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(reference.net[1].running_mean, module.net[1].running_mean)


def test_same_statistics_run_to_run_although_the_training_loader_augments(tiny_datamodule):
    from types import SimpleNamespace

    datamodule = tiny_datamodule(augment=True, train_size=30, batch_size=8, image_size=32)
    datamodule.setup("fit")
    trainer = SimpleNamespace(datamodule=datamodule, train_dataloader=None, world_size=1, global_rank=0)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
        torch.manual_seed(global_seed)  # a different global RNG state each time
        reestimate_batch_norm(net, statistics_loader(trainer, seed=3), num_batches=None)
        results.append(torch.cat([bn.running_var for bn in net.modules() if isinstance(bn, nn.BatchNorm2d)]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_invalid_arguments_name_the_field():
    import pytest

    with pytest.raises(ValueError, match="num_batches=0"):
        BatchNormReestimation(num_batches=0)
    with pytest.raises(ValueError, match="every_epoch='sometimes'"):
        BatchNormReestimation(every_epoch="sometimes")
    with pytest.raises(ValueError, match="num_batches=-1"):
        reestimate_batch_norm(_conv_bn(), [], num_batches=-1)



def test_a_run_too_short_for_batch_norm_to_settle_is_told_how_to_fix_it(tmp_path):
    data = DMSDataModule(image_size=32, train_size=32, val_size=16, test_size=16, batch_size=16, augment=False)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                      default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="2 optimizer steps per epoch, fewer than the 30 .*bn_reestimation: true"):
        trainer.fit(DMSClassifier("mobilenet_v3_small", image_size=32), datamodule=data)
    with warnings.catch_warnings(record=True) as caught:  # with re-estimation on, nothing to warn about
        warnings.simplefilter("always")
        trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                          default_root_dir=str(tmp_path))
        trainer.fit(DMSClassifier("mobilenet_v3_small", image_size=32, bn_reestimation=True), datamodule=data)
    assert not [w for w in caught if "optimizer steps per epoch, fewer than" in str(w.message)]
