"""Post-training quantization: the ONNX Runtime function and the PostTrainingQuantization callback."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import PostTrainingQuantization
from dms_lightning.export import export_onnx
from dms_lightning.quant import encodings_from_qdq_onnx
from dms_lightning.quant.evaluate import ort_session
from dms_lightning.quant.ptq import quantize_onnx
from dms_lightning.utils.artifacts import variants

IMAGE = 32


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread: on the shared 2-core machine two OpenMP threads per test spin against other jobs.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _datamodule() -> DMSDataModule:
    return DMSDataModule(image_size=IMAGE, train_size=64, val_size=32, test_size=64, batch_size=16, augment=False)


def _trainer(root: Path, callbacks: list) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root),
                     num_sanity_val_steps=0, callbacks=callbacks, limit_val_batches=1)


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="module")
def fp32_resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = DMSClassifier("resnet18", image_size=IMAGE).model.eval()
    path = export_onnx(model, torch.zeros(1, 1, IMAGE, IMAGE), tmp_path_factory.mktemp("ptq") / "fp32.onnx")
    batches = [torch.randn(8, 1, IMAGE, IMAGE) for _ in range(3)]
    return path, batches


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_static_calibration_methods_give_qdq_models_that_fuse_to_integer_convs(fp32_resnet, tmp_path, method):
    import onnxruntime as ort

    fp32, batches = fp32_resnet
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", batches, calibration_method=method, calibration_batches=2)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    optimized = _ops(Path(options.optimized_model_filepath))
    assert optimized.count("QLinearConv") == 20 and "Conv" not in optimized  # BN-folded biases stay int32
    x = batches[0].numpy()
    reference = ort_session(fp32).run(None, {"input": x})[0]
    logits = ort_session(int8).run(None, {"input": x})[0]
    assert np.abs(logits - reference).max() < 0.2 * np.abs(reference).max() + 0.05


def test_dynamic_quantization_stores_int8_weights(fp32_resnet, tmp_path):
    fp32, _ = fp32_resnet
    int8 = quantize_onnx(fp32, tmp_path / "dyn.onnx", mode="dynamic")
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    assert "DynamicQuantizeLinear" in _ops(int8) or "MatMulInteger" in _ops(int8) or "ConvInteger" in _ops(int8)


def test_excluded_op_types_and_nodes_stay_float(fp32_resnet, tmp_path):
    fp32, batches = fp32_resnet
    first_conv = next(n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv")
    int8 = quantize_onnx(fp32, tmp_path / "partial.onnx", batches, exclude_op_types=["Gemm"],
                         exclude_nodes=[first_conv])
    model = onnx.load(str(int8))
    producers = {o: n for n in model.graph.node for o in n.output}

    def weight_is_quantized(node) -> bool:
        source = producers.get(node.input[1])
        return source is not None and source.op_type == "DequantizeLinear"

    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    assert gemms and not any(weight_is_quantized(n) for n in gemms)
    assert not weight_is_quantized(convs[first_conv])
    assert sum(weight_is_quantized(n) for n in convs.values()) == len(convs) - 1


def test_more_calibration_batches_than_data_is_an_error(fp32_resnet, tmp_path):
    fp32, batches = fp32_resnet
    with pytest.raises(ValueError, match="calibration_batches=5 but the calibration data has only 3 batches"):
        quantize_onnx(fp32, tmp_path / "x.onnx", batches, calibration_batches=5)
    assert not (tmp_path / "x.onnx").exists()


def test_callback_quantizes_at_fit_end_and_reports_accuracy(tmp_path):
    L.seed_everything(0)
    ptq = PostTrainingQuantization(calibration_batches=2, dirpath=str(tmp_path / "q"))
    trainer = _trainer(tmp_path, [ptq])
    trainer.fit(DMSClassifier("mobilenet_v3_small", image_size=IMAGE, head_hidden=32), _datamodule())
    result = ptq.result
    assert 0.0 <= result["onnx_accuracy"] <= 1.0 and result["agreement_with_fp32"] >= 0.5
    encodings = json.loads(Path(result["encodings_path"]).read_text())
    assert encodings == encodings_from_qdq_onnx(result["onnx_path"])
    (variant,) = variants(trainer)
    assert (variant.name, variant.precision, variant.producer) == ("ptq_int8", "int8", "PostTrainingQuantization")


def test_callback_rejects_more_calibration_batches_than_available_before_training(tmp_path):
    trainer = _trainer(tmp_path, [PostTrainingQuantization(calibration_batches=50)])
    with pytest.raises(MisconfigurationException, match="calibration_batches=50 but the calibration data has only 2"):
        trainer.fit(DMSClassifier("mobilenet_v3_small", image_size=IMAGE, head_hidden=32), _datamodule())
    assert trainer.global_step == 0


@pytest.mark.parametrize("kwargs, field", [(dict(calibration_method="kl"), "calibration_method='kl'"),
                                           (dict(mode="int4"), "mode='int4'"),
                                           (dict(calibration_batches=0), "calibration_batches=0"),
                                           (dict(calibration_split="test"), "calibration_split='test'")])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PostTrainingQuantization(**kwargs)
