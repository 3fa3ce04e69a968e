"""One home per written file: every ONNX file has one metadata layout, every INT8 file one encodings format, and
Q/DQ weights are traced to their layer by name, never by value."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import ONNXExport, PostTrainingQuantization, QuantizationAwareTraining, SNPEExport
from dms_lightning.export import (
    ENCODINGS_VERSION,
    METADATA_KEYS,
    encodings_from_qdq_onnx,
    export_qdq_onnx,
    fake_quant_disabled,
    has_qdq,
    read_encodings,
    read_metadata,
)
from dms_lightning.export.qdq import NARROW_WEIGHTS_KEY
from dms_lightning.export.runtimes import onnxruntime_outputs
from dms_lightning.quant import prepare_qat
from dms_lightning.quant.fake_quant import TIE_MARGIN
from dms_lightning.report.__main__ import export_checkpoint

IMAGE = 32


class TwoConvs(nn.Module):
    """Two convs whose weights are each other's negation: their symmetric per-channel scales are equal."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        with torch.no_grad():
            self.b.weight.copy_(-self.a.weight)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean(dim=(2, 3))


def test_weights_with_equal_scales_stay_two_layers_in_the_qdq_graph(tmp_path):
    # The weights used to be matched to their layer by the bytes of their scale: equal scales collided and the
    # export failed onnx.checker ("b.weight_quantized initializer name is not unique").
    torch.manual_seed(0)
    prepared = prepare_qat(TwoConvs())
    prepared.train()(torch.randn(8, 4, 8, 8))
    assert torch.equal(prepared.a.weight_quantizer.scale, prepared.b.weight_quantizer.scale)
    path = export_qdq_onnx(prepared.eval(), torch.zeros(1, 4, 8, 8), tmp_path / "two.onnx")
    model = onnx.load(str(path))
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer
               if init.data_type == onnx.TensorProto.INT8 and len(init.dims) > 1}
    assert set(weights) == {"a.weight_quantized", "b.weight_quantized"}
    np.testing.assert_array_equal(weights["a.weight_quantized"], -weights["b.weight_quantized"])
    assert set(encodings_from_qdq_onnx(path)["param_encodings"]) == {"a.weight", "b.weight"}
    x = torch.randn(4, 4, 8, 8)
    reference = prepared(x).detach().numpy()
    np.testing.assert_allclose(onnxruntime_outputs(path, x.numpy(), fuse_qdq=False), reference, atol=1e-4)


def test_the_float_twin_block_leaves_torch_and_other_threads_alone():
    x = torch.linspace(-1, 1, 11)
    original = torch.fake_quantize_per_tensor_affine
    seen = {}

    def other_thread():
        seen["other"] = torch.fake_quantize_per_tensor_affine(x, 0.5, 0, -128, 127)

    with fake_quant_disabled():
        assert torch.fake_quantize_per_tensor_affine is original  # no global patch
        inside = torch.fake_quantize_per_tensor_affine(x, 0.5, 0, -128, 127)
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    torch.testing.assert_close(inside, x)  # bypassed in the block
    assert len(torch.unique(seen["other"])) == 5  # still quantized on another thread: grid -1, -0.5, 0, 0.5, 1


def _fit(root: Path, quantization) -> DMSDataModule:
    """A short fit whose quantization callback hands its network down to ONNXExport; the SNPE bundle follows."""
    L.seed_everything(0)
    datamodule = DMSDataModule(image_size=IMAGE, train_size=48, val_size=32, test_size=32, batch_size=16,
                               augment=False)
    model = DMSClassifier("mobilenet_v3_small", image_size=IMAGE, head_hidden=32)
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True), quantization,
                 ONNXExport(dirpath=str(root / "export"), name="student", checkpoint="last", openvino=False),
                 SNPEExport(dirpath=str(root / "export"), checkpoint="last", calibration_images=4)]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(root), callbacks=callbacks)
    trainer.fit(model, datamodule)
    return datamodule


@pytest.fixture(scope="module")
def quantized_runs(tmp_path_factory):
    """One run with QAT and one with PTQ (the two refuse to share a run), each exported and bundled."""
    qat_root, ptq_root = tmp_path_factory.mktemp("qat"), tmp_path_factory.mktemp("ptq")
    datamodule = _fit(qat_root, QuantizationAwareTraining(start_epoch=0, freeze_bn_epoch=1, parity_split="val",
                                                          dirpath=str(qat_root / "quant")))
    _fit(ptq_root, PostTrainingQuantization(calibration_batches=1, dirpath=str(ptq_root / "quant"),
                                            evaluate_batches=1, min_agreement=0.9))
    cli_export = export_checkpoint(qat_root / "ckpt" / "last.ckpt", qat_root / "cli" / "last.onnx",
                                   datamodule=datamodule)
    return dict(qat=qat_root, ptq=ptq_root, datamodule=datamodule, cli_export=cli_export)


def _written_onnx_files(runs) -> dict[str, Path]:
    qat, ptq = runs["qat"], runs["ptq"]
    return {"ONNXExport fp32": qat / "export/student_fp32.onnx", "ONNXExport int8": qat / "export/student_int8.onnx",
            "QAT int8": qat / "quant/qat_int8.onnx", "PTQ int8": ptq / "quant/ptq_int8.onnx",
            "SNPE static model": qat / "export/snpe_bundle/model.onnx",
            "SNPE static QDQ": qat / "export/snpe_bundle/model_qdq.onnx", "report CLI": runs["cli_export"]}


def test_every_onnx_file_the_package_writes_carries_the_same_metadata(quantized_runs):
    files = _written_onnx_files(quantized_runs)
    expected = quantized_runs["datamodule"].preprocessing
    keys = {}
    for label, path in files.items():
        metadata = read_metadata(path)  # the one reader raises on a missing key
        assert metadata["producer"] == "dms_lightning", label
        assert metadata["preprocessing"] == {k: expected[k] for k in metadata["preprocessing"]}, label
        assert metadata["class_names"] == expected["class_names"] and metadata["image_size"] == IMAGE, label
        keys[label] = {p.key for p in onnx.load(str(path), load_external_data=False).metadata_props} - {
            NARROW_WEIGHTS_KEY}
    assert all(found == set(METADATA_KEYS) for found in keys.values()), keys
    precisions = {label: read_metadata(path)["precision"] for label, path in files.items()}
    # The report CLI exported the QAT checkpoint: a fake-quantized network, so an INT8 file.
    assert {precisions[k] for k in ("ONNXExport int8", "QAT int8", "PTQ int8", "SNPE static QDQ", "report CLI")} == {
        "int8"}
    assert precisions["ONNXExport fp32"] == "fp32"


def test_report_cli_export_of_a_quantized_checkpoint_is_the_int8_file_onnx_export_wrote(quantized_runs):
    # Its weights are stored as integers like ONNXExport's, so the report's size column is the INT8 file's.
    cli, written = quantized_runs["cli_export"], quantized_runs["qat"] / "export/student_int8.onnx"
    integer = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    for path in (cli, written):
        weights = [t for t in onnx.load(str(path)).graph.initializer if t.name.endswith("weight_quantized")]
        assert weights and all(t.data_type in integer for t in weights), path
    assert cli.stat().st_size == pytest.approx(written.stat().st_size, rel=0.05)


@pytest.mark.parametrize("run, handed_down", [("qat", "qat_int8"), ("ptq", "ptq_int8")])
def test_quantization_onnx_export_and_bundle_write_identical_encodings_for_the_same_network(quantized_runs, run,
                                                                                           handed_down):
    root = quantized_runs[run]
    quantized = json.loads((root / f"quant/{handed_down}.encodings.json").read_text())
    onnx_export = json.loads((root / "export/student_int8.encodings.json").read_text())
    bundle = json.loads((root / "export/snpe_bundle/encodings.json").read_text())
    assert quantized["version"] == ENCODINGS_VERSION
    assert quantized["param_encodings"] and quantized["activation_encodings"]
    assert quantized == onnx_export == bundle
    assert has_qdq(onnx.load(str(root / f"quant/{handed_down}.onnx")))


@pytest.mark.parametrize("run", ["qat", "ptq"])
def test_the_bundle_input_grid_keeps_every_pixel_of_the_datamodule_off_a_rounding_tie(quantized_runs, run):
    # Runtimes round ties differently (ONNX Runtime: half to even, AIMET: half up): a pixel on a tie would be
    # quantized differently on each, as the default mean=0.5 / std=0.25 min-max grid did for every pixel.
    encodings = read_encodings(quantized_runs[run] / "export/snpe_bundle/encodings.json")
    (entry,) = encodings["activation_encodings"]["input"]
    grid = quantized_runs["datamodule"].input_values().double() / entry["scale"] - entry["offset"]
    inside = grid[(grid >= -0.5) & (grid <= 255.5)]
    assert float(((inside - inside.floor()) - 0.5).abs().min()) >= TIE_MARGIN


def _setup_only(tmp_path, callbacks) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=callbacks)
    datamodule = DMSDataModule(image_size=16, train_size=16, val_size=16, test_size=16, batch_size=16)
    with pytest.raises(MisconfigurationException) as raised:
        trainer.fit(DMSClassifier("mobilenet_v3_small", image_size=16), datamodule)
    assert trainer.global_step == 0
    return raised


def test_onnx_export_placed_before_a_quantization_callback_is_rejected_before_training(tmp_path):
    raised = _setup_only(tmp_path, [ONNXExport(), QuantizationAwareTraining(start_epoch=0)])
    assert "Put ONNXExport after them" in str(raised.value) and "QuantizationAwareTraining" in str(raised.value)


def test_onnx_export_with_nothing_to_write_is_rejected_before_training(tmp_path):
    raised = _setup_only(tmp_path, [ONNXExport(export_fp32=False, export_int8=False)])
    assert "leaves nothing to export" in str(raised.value)
