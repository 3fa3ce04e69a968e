"""QuantizationAwareTraining in real (tiny) Lightning runs: each test is a failure of Lightning's removed QAT callback."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import ONNXExport, QuantizationAwareTraining
from dms_lightning.export import read_encodings
from dms_lightning.quant import is_quantized
from dms_lightning.quant.fake_quant import FakeQuantizer
from dms_lightning.quant.modules import QuantConvBn2d
from dms_lightning.utils.artifacts import variants

IMAGE = 32


# One intra-op thread (conftest.one_torch_thread): on 2 shared cores, two OpenMP threads per test spin
# against other jobs.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _datamodule() -> DMSDataModule:
    return DMSDataModule(image_size=IMAGE, train_size=64, val_size=32, test_size=64, batch_size=16, augment=False)


def _model() -> DMSClassifier:
    return DMSClassifier("mobilenet_v3_small", image_size=IMAGE, head_hidden=32)


def _trainer(root: Path, max_epochs: int, callbacks: list, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0,
                   callbacks=callbacks, limit_train_batches=2)
    options.update(kwargs)
    return L.Trainer(**options)


def _quant_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "quantizer" in k}


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """Two epochs (float, then QAT) with a checkpoint per epoch and the INT8 export at fit end."""
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("qat")
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", filename="e{epoch}", save_top_k=-1, monitor="val/acc",
                                 mode="max", save_last=True, auto_insert_metric_name=False)
    qat = QuantizationAwareTraining(start_epoch=1, dirpath=str(root / "quant"))
    writer = ONNXExport(export_fp32=False, export_int8=False, openvino=False, dirpath=str(root / "export"))
    model, datamodule = _model(), _datamodule()
    trainer = _trainer(root, 2, [qat, checkpoint, writer])
    trainer.fit(model, datamodule)
    return dict(root=root, trainer=trainer, model=model, datamodule=datamodule, qat=qat, checkpoint=checkpoint)


def test_model_is_float_before_start_epoch_and_quantized_after(qat_run):
    assert is_quantized(qat_run["model"].model)
    assert qat_run["qat"].quantized_since == 1
    before = torch.load(qat_run["root"] / "ckpt" / "e0.ckpt", weights_only=False)
    assert not any("quantizer" in k for k in before["state_dict"])
    assert before["dms_lightning"]["quantization"]["active"] is False


def test_fit_end_exports_int8_onnx_that_agrees_with_fake_quant_model(qat_run):
    (variant,) = [v for v in variants(qat_run["trainer"]) if v.producer == "QuantizationAwareTraining"]
    assert variant.precision == "int8" and Path(variant.onnx_path) == qat_run["root"] / "quant" / "qat_int8.onnx"
    assert Path(variant.onnx_path).is_file()
    parity = variant.info["parity"]
    assert parity["top1_agreement"] >= 0.99 and parity["samples"] == 64  # the whole test split
    encodings = read_encodings(variant.info["encodings_path"])
    assert encodings["activation_encodings"] and encodings["param_encodings"]


def test_quantization_callback_writes_no_file_itself(tmp_path):
    # quant/ is torch-only: without an exporter the network is handed down to nobody, and the run says so.
    L.seed_everything(0)
    qat = QuantizationAwareTraining(start_epoch=0, dirpath=str(tmp_path / "quant"))
    with pytest.warns(UserWarning, match="add dms_lightning.callbacks.ONNXExport"):
        _trainer(tmp_path, 1, [qat], limit_val_batches=1).fit(_model(), _datamodule())
    assert not (tmp_path / "quant").exists()
    assert [n.name for n in qat.int8_networks] == ["qat_int8"] and is_quantized(qat.int8_networks[0].network)


def test_validation_and_test_do_not_move_ranges(qat_run):
    # Lightning #8507: observers kept updating in eval loops, so the exported ranges depended on val data.
    model, trainer = qat_run["model"], qat_run["trainer"]
    before = _quant_state(model)
    trainer.validate(model, qat_run["datamodule"], verbose=False)
    trainer.test(model, qat_run["datamodule"], verbose=False)
    after = _quant_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_test_with_best_checkpoint_after_qat(qat_run, tmp_path):
    # Lightning #12896: trainer.test(ckpt_path="best") crashed on the QAT-converted model.
    model = copy.deepcopy(qat_run["model"])
    trainer = _trainer(tmp_path, 2, [copy.deepcopy(qat_run["checkpoint"])])
    trainer.checkpoint_callback.best_model_path = str(qat_run["root"] / "ckpt" / "e1.ckpt")
    (result,) = trainer.test(model, qat_run["datamodule"], ckpt_path="best", verbose=False)
    assert 0.0 <= result["test/acc"] <= 1.0 and is_quantized(model.model)


def test_checkpoint_from_before_qat_loads_into_quantized_model(qat_run, tmp_path):
    # "best" may be an epoch before QAT started: the in-memory QAT model goes back to float to load it.
    model = copy.deepcopy(qat_run["model"])
    trainer = _trainer(tmp_path, 2, [])
    trainer.test(model, qat_run["datamodule"], ckpt_path=str(qat_run["root"] / "ckpt" / "e0.ckpt"), verbose=False)
    assert not is_quantized(model.model)


def test_load_from_checkpoint_rebuilds_the_quantized_network(qat_run):
    # Lightning #6457: a QAT checkpoint could not be loaded into a freshly built model.
    reloaded = DMSClassifier.load_from_checkpoint(qat_run["root"] / "ckpt" / "last.ckpt", map_location="cpu")
    assert is_quantized(reloaded.model)
    x = torch.randn(4, 1, IMAGE, IMAGE)
    torch.testing.assert_close(reloaded.eval()(x), qat_run["model"].eval()(x))


def test_fit_called_twice_keeps_one_quantized_network(qat_run, tmp_path):
    # Lightning #7427: a second fit re-prepared the already converted model and crashed.
    model = copy.deepcopy(qat_run["model"])
    quantizers = sum(isinstance(m, FakeQuantizer) for m in model.modules())
    trainer = _trainer(tmp_path, 1, [QuantizationAwareTraining(start_epoch=0, export=False)], limit_train_batches=2,
                       limit_val_batches=1)
    trainer.fit(model, qat_run["datamodule"])
    assert sum(isinstance(m, FakeQuantizer) for m in model.modules()) == quantizers


def test_resume_from_mid_qat_checkpoint(qat_run, tmp_path):
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, freeze_observers_epoch=2, export=False)
    model = _model()
    trainer = _trainer(tmp_path, 3, [qat], limit_val_batches=1)
    trainer.fit(model, qat_run["datamodule"], ckpt_path=str(qat_run["root"] / "ckpt" / "e1.ckpt"))
    assert trainer.current_epoch == 3 and is_quantized(model.model)
    # The optimizer built after the restore trains the quantized network's own parameters.
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert all(bool(m.bn_frozen) for m in model.modules() if isinstance(m, QuantConvBn2d))
    assert not any(bool(m.observer_enabled) for m in model.modules() if isinstance(m, FakeQuantizer) and not m.is_weight)


def test_frozen_observers_keep_ranges_while_weights_train(tmp_path):
    datamodule = _datamodule()
    model = _model()
    qat = QuantizationAwareTraining(start_epoch=0, freeze_observers_epoch=1, freeze_bn_epoch=1, export=False)
    _trainer(tmp_path, 1, [qat], limit_val_batches=0, enable_checkpointing=False).fit(model, datamodule)
    after_first = {k: v for k, v in _quant_state(model).items() if "activation_quantizers" in k}
    # Epoch 0 (again) still observes, epoch 1 has frozen ranges.
    _trainer(tmp_path, 2, [qat], limit_val_batches=0, enable_checkpointing=False).fit(model, datamodule)
    assert all(bool(m.bn_frozen) for m in model.modules() if isinstance(m, QuantConvBn2d))
    frozen = {k: v for k, v in _quant_state(model).items() if "activation_quantizers" in k}
    assert any(not torch.equal(after_first[k], frozen[k]) for k in frozen)  # epoch 0 still observed
    before_epoch = frozen
    _trainer(tmp_path, 1, [QuantizationAwareTraining(start_epoch=0, freeze_observers_epoch=0, export=False)],
             limit_val_batches=0, enable_checkpointing=False).fit(model, datamodule)
    assert all(torch.equal(before_epoch[k], v) for k, v in _quant_state(model).items() if k in before_epoch)


def test_start_epoch_after_max_epochs_fails_before_training(tmp_path):
    trainer = _trainer(tmp_path, 2, [QuantizationAwareTraining(start_epoch=2)])
    with pytest.raises(MisconfigurationException, match="start_epoch=2.*max_epochs=2"):
        trainer.fit(_model(), _datamodule())
    assert trainer.global_step == 0


def test_model_without_quantizable_layers_fails_before_training(tmp_path):
    trainer = _trainer(tmp_path, 1, [QuantizationAwareTraining(exclude=["*"])])
    with pytest.raises(MisconfigurationException, match="no quantizable layer"):
        trainer.fit(_model(), _datamodule())
    assert trainer.global_step == 0


@pytest.mark.parametrize("kwargs, field", [(dict(weight_bits=3), "weight_bits=3"),
                                           (dict(activation_bits=4), "activation_bits=4"),
                                           (dict(start_epoch=2, freeze_bn_epoch=1), "freeze_bn_epoch=1"),
                                           (dict(start_epoch=-1), "start_epoch=-1")])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantizationAwareTraining(**kwargs)


@pytest.fixture(scope="module")
def pruned_qat_run(tmp_path_factory):
    """IterativePruning removes channels at its end_epoch (1); QAT wraps the smaller network from epoch 2."""
    from dms_lightning.pruning.callback import IterativePruning

    L.seed_everything(0)
    root = tmp_path_factory.mktemp("pruned_qat")
    model = _model()
    widths = sum(m.out_channels for m in model.model.modules() if isinstance(m, torch.nn.Conv2d))
    pruning = IterativePruning("channel", target_sparsity=0.3, schedule="linear", start_epoch=0, end_epoch=1,
                               min_channels=4)
    qat = QuantizationAwareTraining(start_epoch=2, dirpath=str(root / "quant"))
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    writer = ONNXExport(export_fp32=False, export_int8=False, openvino=False, dirpath=str(root / "export"))
    trainer = _trainer(root, 3, [pruning, qat, checkpoint, writer], limit_val_batches=1)
    trainer.fit(model, _datamodule())
    return dict(root=root, model=model, widths=widths, pruning=pruning, qat=qat, trainer=trainer)


def test_pruning_then_qat_in_one_run(pruned_qat_run):
    # Lightning #11047: pruning and QAT callbacks in one Trainer broke each other.
    model, qat = pruned_qat_run["model"], pruned_qat_run["qat"]
    convs = [m.conv for m in model.modules() if isinstance(m, QuantConvBn2d)]
    assert pruned_qat_run["pruning"].removed and is_quantized(model.model)
    assert sum(c.out_channels for c in convs) < pruned_qat_run["widths"]  # QAT wrapped the pruned network
    (variant,) = [v for v in variants(pruned_qat_run["trainer"]) if v.producer == "QuantizationAwareTraining"]
    assert variant.info["parity"]["top1_agreement"] >= 0.99


def test_pruned_qat_checkpoint_reloads(pruned_qat_run):
    # Restorers run in order: pruning (10) rebuilds the smaller widths, then quantization (20) re-wraps.
    reloaded = DMSClassifier.load_from_checkpoint(pruned_qat_run["root"] / "ckpt" / "last.ckpt", map_location="cpu")
    x = torch.randn(4, 1, IMAGE, IMAGE)
    torch.testing.assert_close(reloaded.eval()(x), pruned_qat_run["model"].eval()(x))
