"""Pruning and QAT in one Trainer: their ordering is checked in ``setup``, before any training step; masks keep
working (measured and exported) while QAT trains."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from onnx import numpy_helper
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dms_lightning.callbacks import IterativePruning, ONNXExport, QuantizationAwareTraining
from dms_lightning.utils.artifacts import variants
from dms_lightning.utils.validation import check_fraction, check_int, check_names

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class UserNet(LightningModule):
    def __init__(self, fixed_width_layers: list[str] | None = None, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))
        if fixed_width_layers is not None:
            self.fixed_width_layers = fixed_width_layers

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 1, 8, 8, generator=generator),
                             torch.randint(0, 4, (16,), generator=generator))
        return DataLoader(data, batch_size=8)


def _pruning(**kwargs) -> IterativePruning:
    return IterativePruning("channel", target_sparsity=0.5, min_channels=4, **kwargs)


@pytest.mark.parametrize("pruning_first", [True, False], ids=["pruning_listed_first", "qat_listed_first"])
@pytest.mark.parametrize("end_epoch, start_epoch", [(2, 2), (3, 2)], ids=["same_epoch", "pruning_reaches_into_qat"])
def test_qat_starting_before_channel_removal_is_refused_naming_both_fields(pruning_first, end_epoch, start_epoch,
                                                                          tmp_path):
    pruning = _pruning(start_epoch=0, end_epoch=end_epoch)
    qat = QuantizationAwareTraining(start_epoch=start_epoch, export=False)
    trainer = Trainer(max_epochs=5, callbacks=[pruning, qat] if pruning_first else [qat, pruning],
                      default_root_dir=tmp_path, **TRAINER)
    module = UserNet()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(MisconfigurationException,
                       match=rf"QuantizationAwareTraining\(start_epoch={start_epoch}\).*"
                             rf"IterativePruning\(end_epoch={end_epoch}\).*start_epoch>={end_epoch + 1}"):
        trainer.fit(module)
    assert trainer.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_default_end_epoch_counts_as_the_last_epoch(tmp_path):
    trainer = Trainer(max_epochs=4, callbacks=[_pruning(start_epoch=0), QuantizationAwareTraining(start_epoch=2)],
                      default_root_dir=tmp_path, **TRAINER)
    with pytest.raises(MisconfigurationException, match=r"end_epoch=None, i\.e\. the last epoch 3"):
        trainer.fit(UserNet())
    assert trainer.global_step == 0


def test_masks_only_pruning_may_overlap_qat(tmp_path):
    # Unstructured masks act on the parameters QAT shares: nothing is resized, so nothing to refuse.
    pruning = IterativePruning("unstructured", target_sparsity=0.5, start_epoch=0, end_epoch=2)
    qat = QuantizationAwareTraining(start_epoch=1, export=False)
    module = UserNet()
    Trainer(max_epochs=3, callbacks=[pruning, qat], default_root_dir=tmp_path, limit_train_batches=1,
            **TRAINER).fit(module)
    assert pruning.next_point == 3
    weights = [p for n, p in module.named_parameters() if n.endswith("weight") and p.dim() > 1]
    assert sum(int((w == 0).sum()) for w in weights[1:-1]) > 0


@pytest.mark.parametrize("pruning_kwargs", [dict(method="unstructured"), dict(method="n_m"),
                                            dict(method="channel", remove_channels=False, min_channels=4)],
                         ids=["unstructured", "n_m", "channel_masks"])
def test_sparse_qat_measures_masks_and_exports_them_in_int8(pruning_kwargs, tiny_datamodule, fast_trainer_kwargs):
    # Pruning keeps masking after QAT wrapped the network (sparse QAT): the masks stay keyed by the float
    # network's names (net.3.weight, which the twin holds as net.3.conv.weight), the logged sparsity and MACs
    # are measured on them, and the INT8 model handed to export carries the zeros.
    pruning = IterativePruning(target_sparsity=0.5, start_epoch=0, end_epoch=2, **pruning_kwargs)
    root = Path(fast_trainer_kwargs["default_root_dir"])
    qat = QuantizationAwareTraining(start_epoch=1, dirpath=str(root / "quant"))
    writer = ONNXExport(export_fp32=False, export_int8=False, openvino=False, dirpath=str(root / "export"))
    module = UserNet(classes=5)  # the synthetic data's classes
    float_weights = dict(module.named_parameters())  # QAT's twin shares these tensors
    trainer = Trainer(**{**fast_trainer_kwargs, "max_epochs": 3}, callbacks=[pruning, qat, writer],
                      limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_datamodule(image_size=32, channels=1, train_size=32, val_size=16,
                                                   test_size=16))

    assert qat.quantized_since == 1 and pruning.next_point == 3
    pruned = [float_weights[name] for name in ("net.3.weight", "net.6.weight")]  # first conv, classifier kept
    zeros = sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)
    last = pruning.history[-1]
    assert last["sparsity"] == pytest.approx(zeros) and last["sparsity"] >= 0.5
    # Every conv of UserNet keeps the 32 x 32 input size; the classifier runs once.
    nonzero = {name: int(torch.count_nonzero(w)) for name, w in float_weights.items() if w.dim() > 1}
    convs = ("net.0.weight", "net.3.weight", "net.6.weight")
    assert last["macs"] == 32 * 32 * sum(nonzero[name] for name in convs) + nonzero["net.11.weight"]
    (variant,) = [v for v in variants(trainer) if v.producer == "QuantizationAwareTraining"]
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(variant.onnx_path).graph.initializer}
    int8_weights = {name: torch.from_numpy(initializers[name + "_quantized"].copy()) for name in pruning.masks
                    if name + "_quantized" in initializers}
    assert {"net.3.weight", "net.6.weight"} <= set(int8_weights)
    for name, int8_weight in int8_weights.items():
        assert not int8_weight[~pruning.masks[name].cpu()].any(), name


@pytest.mark.parametrize("method", ["unstructured", "channel"])
def test_sparse_qat_resumed_from_a_quantized_checkpoint_prunes_as_the_uninterrupted_run(method, tiny_datamodule,
                                                                                         fast_trainer_kwargs):
    # The resumed run finds the network already wrapped by QAT when pruning traces it (on_fit_start).
    def callbacks() -> list:
        return [IterativePruning(method, target_sparsity=0.5, start_epoch=0, end_epoch=3, remove_channels=False,
                                 min_channels=4), QuantizationAwareTraining(start_epoch=1, export=False)]

    root = Path(fast_trainer_kwargs["default_root_dir"])
    run = {**fast_trainer_kwargs, "max_epochs": 4, "limit_train_batches": 1, "limit_val_batches": 0}
    data = dict(image_size=32, channels=1, train_size=32, val_size=16, test_size=16)
    checkpoint = ModelCheckpoint(dirpath=root, filename="e{epoch}", save_top_k=-1, auto_insert_metric_name=False)
    first = callbacks()
    Trainer(**{**run, "enable_checkpointing": True}, callbacks=[*first, checkpoint]).fit(
        UserNet(classes=5), datamodule=tiny_datamodule(**data))
    resumed = callbacks()
    Trainer(**run, callbacks=resumed).fit(UserNet(classes=5), datamodule=tiny_datamodule(**data),
                                          ckpt_path=str(root / "e1.ckpt"))  # taken in QAT's first epoch

    assert [h["point"] for h in resumed[0].history] == [0.0, 1.0, 2.0, 3.0]
    for key in ("sparsity", "macs"):
        assert [h[key] for h in resumed[0].history] == pytest.approx([h[key] for h in first[0].history]), key
    assert resumed[0].history[-1]["sparsity"] >= 0.5


def test_plain_module_without_example_input_is_pruned_from_the_first_batch(tmp_path):
    module = UserNet()
    assert getattr(module, "example_input_array", None) is None
    pruning = _pruning(schedule="one_shot", start_epoch=0)
    Trainer(max_epochs=1, callbacks=[pruning], default_root_dir=tmp_path, limit_train_batches=1, **TRAINER).fit(module)
    assert pruning.removed and module.net[3].out_channels == 16
    assert module(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_fixed_width_layers_of_the_module_keep_their_channels(tmp_path):
    module = UserNet(fixed_width_layers=["net.3"])
    pruning = _pruning(schedule="one_shot", start_epoch=0)
    Trainer(max_epochs=1, callbacks=[pruning], default_root_dir=tmp_path, limit_train_batches=1, **TRAINER).fit(module)
    assert pruning.removed and module.net[3].out_channels == 32
    assert module.net[6].out_channels == 16  # the other conv is pruned as usual


def test_fixed_width_layers_naming_no_module_fails_before_training(tmp_path):
    trainer = Trainer(max_epochs=1, callbacks=[_pruning(schedule="one_shot", start_epoch=0)], default_root_dir=tmp_path,
                      **TRAINER)
    with pytest.raises(ValueError, match=r"UserNet\.fixed_width_layers: 'net\.99'"):
        trainer.fit(UserNet(fixed_width_layers=["net.99"]))
    assert trainer.global_step == 0


@pytest.mark.parametrize("call, message", [
    (lambda: check_int("frequency", 0, minimum=1), r"frequency=0 must be an integer >= 1"),
    (lambda: check_int("start_epoch", True, minimum=0), r"start_epoch=True must be a non-negative integer"),
    (lambda: check_int("parity_batches", 0, minimum=1, optional=True), r"parity_batches=0 .*\(or None\)"),
    (lambda: check_fraction("target_sparsity", 1.0, high_inclusive=False), r"target_sparsity=1\.0 must be in \[0, 1\)"),
    (lambda: check_names("ignored_layers", "features.0"), r"ignored_layers='features\.0' must be a list"),
])
def test_shared_validation_names_the_field_the_value_and_what_is_valid(call, message):
    with pytest.raises(ValueError, match=message):
        call()
