"""Post-training quantization: torch-side calibration (callback and function), range estimators, and the
ONNX Runtime quantize_static path for FP32 ONNX files (dms_lightning.export.ort_quantize)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import onnx
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import ONNXExport, PostTrainingQuantization, QuantizationAwareTraining
from dms_lightning.export import encodings_from_qdq_onnx, export_onnx, export_qdq_onnx, read_encodings
from dms_lightning.export.ort_quantize import quantize_onnx
from dms_lightning.export.runtimes import loader_logits, ort_session, top1_agreement, torch_logits
from dms_lightning.quant import CalibrationConfig, QuantizationConfig, float_model, is_quantized, post_training_quantize
from dms_lightning.quant.fake_quant import named_activation_quantizers
from dms_lightning.quant.observers import RANGE_ESTIMATORS
from dms_lightning.quant.prepare import graph_output_quantizers
from dms_lightning.quant.spec import QuantSpec
from dms_lightning.utils.artifacts import variants

IMAGE = 32


# One intra-op thread (conftest.one_torch_thread): on 2 shared cores, two OpenMP threads per test spin
# against other jobs.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _datamodule(**kwargs) -> DMSDataModule:
    options = dict(image_size=IMAGE, train_size=64, val_size=32, test_size=64, batch_size=16, augment=False)
    return DMSDataModule(**{**options, **kwargs})


def _trainer(root: Path, callbacks: list, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root),
                   num_sanity_val_steps=0, callbacks=callbacks, limit_val_batches=1)
    return L.Trainer(**{**options, **kwargs})


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


# ---------------------------------------------------------------- the callback
@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory):
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("ptq_run")
    ptq = PostTrainingQuantization(calibration_batches=2, calibration_split="train", dirpath=str(root / "q"))
    writer = ONNXExport(export_fp32=False, export_int8=False, openvino=False, dirpath=str(root / "export"))
    trainer = _trainer(root, [ptq, writer], limit_train_batches=2)
    module = DMSClassifier("resnet18", image_size=IMAGE)
    datamodule = _datamodule()
    trainer.fit(module, datamodule)
    return trainer, module, ptq, datamodule


def test_callback_leaves_the_network_fake_quantized_with_calibrated_frozen_ranges(ptq_run):
    trainer, module, ptq, _ = ptq_run
    assert is_quantized(module.model)
    quantizers = named_activation_quantizers(module.model)
    assert len(quantizers) == len(ptq.ranges) > 10
    for name, quantizer in quantizers.items():
        assert bool(quantizer.initialized) and not bool(quantizer.observer_enabled), name
        assert float(quantizer.max_val) > float(quantizer.min_val), name
    frozen = {k: v.clone() for k, v in module.model.state_dict().items() if "activation_quantizers" in k}
    module.model.train()(torch.randn(4, 1, IMAGE, IMAGE) * 10)  # a training-mode forward must not move them
    module.model.eval()
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in frozen.items())


def test_callback_exports_an_int8_model_that_onnxruntime_runs_like_the_fake_quant_model(ptq_run):
    trainer, module, ptq, datamodule = ptq_run
    result = ptq.result
    assert 0.0 <= result["int8_accuracy"] <= 1.0 and result["agreement_with_fp32"] >= 0.5
    (variant,) = variants(trainer)  # handed down to ONNXExport, which wrote and listed it
    assert (variant.name, variant.precision, variant.producer) == ("ptq_int8", "int8", "PostTrainingQuantization")
    assert variant.info["calibration_method"] == "minmax"
    assert Path(variant.onnx_path).parent.name == "q" and "QuantizeLinear" in _ops(Path(variant.onnx_path))
    assert variant.info["parity"]["top1_agreement"] >= 0.98 and variant.info["parity"]["samples"] == 64
    logits, _ = loader_logits(ort_session(variant.onnx_path, fuse_qdq=False), datamodule.test_dataloader())
    reference, _ = torch_logits(module.model, datamodule.test_dataloader())
    assert top1_agreement(logits, reference) >= 0.98
    encodings = read_encodings(variant.info["encodings_path"])
    assert encodings == encodings_from_qdq_onnx(variant.onnx_path)


def test_test_after_fit_evaluates_the_quantized_network(ptq_run):
    trainer, module, ptq, datamodule = ptq_run
    (metrics,) = trainer.test(module, datamodule, verbose=False)
    assert abs(metrics["test/acc"] - ptq.result["int8_accuracy"]) < 1e-6


def test_best_checkpoint_from_before_ptq_loads_into_the_float_network(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    ptq = PostTrainingQuantization(calibration_batches=1, export=False)
    trainer = _trainer(tmp_path, [ptq, checkpoint], enable_checkpointing=True, limit_train_batches=1)
    module = DMSClassifier("mobilenet_v3_small", image_size=IMAGE, head_hidden=32)
    datamodule = _datamodule()
    trainer.fit(module, datamodule)
    assert is_quantized(module.model)
    (metrics,) = trainer.test(module, datamodule, ckpt_path="best", verbose=False)
    assert not is_quantized(module.model) and abs(metrics["test/acc"] - ptq.result["fp32_accuracy"]) < 1e-6


def test_callback_rejects_more_calibration_batches_than_available_before_training(tmp_path):
    trainer = _trainer(tmp_path, [PostTrainingQuantization(calibration_batches=50)])
    with pytest.raises(MisconfigurationException, match="calibration_batches=50 but the calibration data has only 2"):
        trainer.fit(DMSClassifier("mobilenet_v3_small", image_size=IMAGE, head_hidden=32), _datamodule())
    assert trainer.global_step == 0


def test_callback_refuses_to_run_with_qat(tmp_path):
    trainer = _trainer(tmp_path, [QuantizationAwareTraining(), PostTrainingQuantization(calibration_batches=1)])
    with pytest.raises(MisconfigurationException, match="QuantizationAwareTraining in one run"):
        trainer.fit(DMSClassifier("mobilenet_v3_small", image_size=IMAGE, head_hidden=32), _datamodule())
    assert trainer.global_step == 0


def test_second_ptq_callback_is_refused_before_training_naming_both(tmp_path):
    # The first one quantizes the network in place at fit end; the second would find it quantized and write nothing.
    first = PostTrainingQuantization(calibration_batches=1)
    second = PostTrainingQuantization(calibration_batches=2, filename="ptq_two_batches")
    trainer = _trainer(tmp_path, [first, second, ONNXExport(checkpoint="last")])
    module = DMSClassifier("mobilenet_v3_small", image_size=IMAGE, head_hidden=32)
    with pytest.raises(MisconfigurationException, match=r"PostTrainingQuantization is listed 2 times .*"
                                                        r"filename='ptq_int8', filename='ptq_two_batches'.*"
                                                        r"post_training_quantize"):
        trainer.fit(module, _datamodule())
    assert trainer.global_step == 0 and not is_quantized(module.model)


class _PlainModule(L.LightningModule):
    """A user module that has never heard of dms_lightning: no compression_target, no example_input_array."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 7))

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_callback_quantizes_a_plain_lightning_module(tmp_path):
    L.seed_everything(0)
    module = _PlainModule()
    ptq = PostTrainingQuantization(calibration_batches=1, export=False)
    _trainer(tmp_path, [ptq], limit_train_batches=1, limit_val_batches=0).fit(module, _datamodule())
    assert is_quantized(module.features) and is_quantized(module.head)
    assert all(bool(q.initialized) for q in named_activation_quantizers(module).values())
    assert module(torch.randn(2, 1, IMAGE, IMAGE)).shape == (2, 7)


@pytest.mark.parametrize("kwargs, field", [
    (dict(calibration_method="kl"), "calibration_method='kl'"),
    (dict(mode="int4"), "mode='int4'"),
    (dict(mode="dynamic"), "mode='dynamic'.*ort_quantize"),
    (dict(calibration_batches=0), "calibration_batches=0"),
    (dict(calibration_split="test"), "calibration_split='test'"),
    (dict(percentile=40.0), "percentile=40.0"),
    (dict(weight_bits=6), "weight_bits=6"),
    (dict(reduce_range=True, weight_bits=4), "reduce_range=True"),
    (dict(exclude_nodes=["/fc/*"]), r"exclude_nodes=\['/fc/\*'\].*exclude="),
    (dict(exclude_op_types=["Gemm"]), "exclude_op_types=.*quantize_linear=False"),
    (dict(include=[""]), "include="),
    (dict(evaluate_batches=0), "evaluate_batches=0"),
    (dict(filename="a/b"), "filename='a/b'"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PostTrainingQuantization(**kwargs)


def test_calibration_loader_is_deterministic_and_unaugmented():
    datamodule = _datamodule(augment=True)
    first = torch.cat([batch[0] for batch in datamodule.calibration_dataloader("train")])
    second = torch.cat([batch[0] for batch in datamodule.calibration_dataloader("train")])
    assert torch.equal(first, second) and len(first) == 64
    with pytest.raises(ValueError, match="split='holdout'"):
        datamodule.calibration_dataloader("holdout")


# ---------------------------------------------------------------- the function and the estimators
def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def _batches_with_outliers(count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 1, 32, 32, generator=generator) for _ in range(count)]
    batches[1][0, 0, 0, 0] = 60.0  # one pixel in 24576: a sensor glitch
    return batches


def test_post_training_quantize_returns_the_calibrated_twin_and_keeps_the_float_network():
    net = _small_net()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    batches = _batches_with_outliers()
    int8 = post_training_quantize(net, batches, QuantizationConfig())
    assert float_model(int8) is net and not is_quantized(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())  # weights frozen
    assert all(bool(q.initialized) and not bool(q.observer_enabled) for q in named_activation_quantizers(int8).values())
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert (int8(x) - net(x)).abs().max() < 0.05 * net(x).abs().max() + 0.02


def _input_range(method: str) -> tuple[float, float]:
    calibration = CalibrationConfig(method, percentile=99.99)  # the outlier is 0.004 % of the values
    int8 = post_training_quantize(_small_net(), _batches_with_outliers(), calibration=calibration)
    quantizer = next(iter(named_activation_quantizers(int8).values()))  # the network input's quantizer
    return float(quantizer.min_val), float(quantizer.max_val)


def test_percentile_and_entropy_clip_an_outlier_that_minmax_keeps():
    low, high = _input_range("minmax")
    assert high == pytest.approx(60.0)
    for method in ("percentile", "entropy"):
        clipped_low, clipped_high = _input_range(method)
        assert low <= clipped_low < 0 < clipped_high < 0.5 * high, method
        assert clipped_high > 2.0, method  # the bulk of a unit Gaussian is kept
    # One value in 24576: clipping it costs more squared error than 8-bit rounding saves, so MSE keeps most of it.
    mse_low, mse_high = _input_range("mse")
    assert low <= mse_low < 0 < mse_high <= high


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_clipping_estimators_never_clip_the_logits(method):
    # A clipped top logit ties with the next one and the tie picks the class by index: the network's outputs
    # keep the range they were seen in.
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 5)).eval()
    batches = _batches_with_outliers()
    with torch.no_grad():
        logits = torch.cat([net(b) for b in batches])
    int8 = post_training_quantize(net, batches, calibration=CalibrationConfig(method, percentile=99.0))
    (output,) = graph_output_quantizers(int8)
    assert float(output.min_val) == pytest.approx(float(logits.min()), rel=1e-5)
    assert float(output.max_val) == pytest.approx(float(logits.max()), rel=1e-5)
    hidden = [q for q in named_activation_quantizers(int8).values() if q is not output]
    assert hidden  # the other tensors are still calibrated by the estimator


def test_entropy_is_not_fooled_by_the_zeros_of_a_relu6_output():
    # Half of a ReLU6 output is exactly 0; the rest spreads over (0, 6]. The zero spike once made KL clip at
    # a quarter of the range (MobileNetV2: 79 % -> 30 % top-1).
    generator = torch.Generator().manual_seed(0)
    values = torch.empty(200_000).exponential_(1 / 0.6, generator=generator).clamp(max=6.0)  # 4 % above 1.5
    values[:100_000] = 0.0
    estimator = CalibrationConfig("entropy").estimator()
    for index in range(estimator.passes):
        estimator.start_pass(index)
        estimator.observe(values)
    low, high = estimator.range(QuantSpec(8, symmetric=False, per_channel=False))
    assert low == 0.0 and high > 4.0  # (with the zero spike counted: 1.49)


@pytest.mark.parametrize("method", sorted(RANGE_ESTIMATORS))
def test_estimators_keep_the_whole_range_of_outlier_free_uniform_data(method):
    estimator = CalibrationConfig(method).estimator()
    data = torch.linspace(0.0, 6.0, 100_000)
    for index in range(estimator.passes):
        estimator.start_pass(index)
        estimator.observe(data)
    low, high = estimator.range(QuantSpec(8, symmetric=False, per_channel=False))
    assert low == 0.0 and high == pytest.approx(6.0, rel=0.02)


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_onnxruntime_runs_the_exported_ptq_model_like_the_fake_quant_model(tmp_path, method):
    torch.manual_seed(0)
    net = DMSClassifier("resnet18", image_size=IMAGE).model.eval()
    batches = [torch.randn(16, 1, IMAGE, IMAGE) for _ in range(2)]
    int8 = post_training_quantize(net, batches, calibration=CalibrationConfig(method))
    path = export_qdq_onnx(int8, torch.zeros(1, 1, IMAGE, IMAGE), tmp_path / "ptq.onnx")
    images = torch.randn(64, 1, IMAGE, IMAGE)
    loader = [(images[i:i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 64, 16)]
    graph, _ = loader_logits(ort_session(path, fuse_qdq=False), loader)
    reference, _ = torch_logits(int8, loader)
    assert top1_agreement(graph, reference) >= 0.98
    assert np.abs(graph - reference).max() < 0.1 * np.abs(reference).max()


@pytest.mark.parametrize("kwargs, field", [(dict(method="kl"), "calibration_method='kl'"),
                                           (dict(percentile=101), "percentile=101"),
                                           (dict(bins=10), "bins=10")])
def test_calibration_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CalibrationConfig(**kwargs)


def test_function_rejects_an_already_quantized_network_and_too_few_batches():
    net = _small_net()
    with pytest.raises(ValueError, match="calibration_batches=5 but the calibration data has only 3 batches"):
        post_training_quantize(net, _batches_with_outliers(), calibration_batches=5)
    int8 = post_training_quantize(net, _batches_with_outliers())
    with pytest.raises(ValueError, match="already fake-quantized"):
        post_training_quantize(int8, _batches_with_outliers())


def test_batchnorm_hook_runs_on_the_float_network_before_calibration():
    seen = []

    def reestimate(model, batches):
        seen.append((is_quantized(model), len(batches)))

    post_training_quantize(_small_net(), _batches_with_outliers(), reestimate_batchnorm=reestimate)
    assert seen == [(False, 3)]


def test_old_import_path_names_the_new_home():
    with pytest.raises(ImportError, match="dms_lightning.export.ort_quantize"):
        from dms_lightning.quant.ptq import quantize_onnx  # noqa: F401


# ---------------------------------------------------------------- ONNX Runtime's quantize_static on an ONNX file
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
