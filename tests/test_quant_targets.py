"""Target profiles: the device decides placement, signedness and the precisions a run may ask for."""

from __future__ import annotations

import lightning as L
import pytest
from torch import nn

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import ONNXExport, PostTrainingQuantization, QuantizationAwareTraining
from dms_lightning.export.runtimes import ort_session
from dms_lightning.quant import prepare_qat
from dms_lightning.quant.targets import TargetProfile, register_target, target_names, target_profile
from dms_lightning.utils.artifacts import variants

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_target_picks_its_placement_and_activation_grid():
    htp, x86, arm = (QuantizationAwareTraining(target=name).config for name in ("htp", "cpu_x86", "cpu_arm"))
    assert (htp.placement, htp.activation.quant_range) == ("every_tensor", (0, 255))
    assert (x86.placement, x86.activation.quant_range) == ("every_tensor", (0, 255))
    assert (arm.placement, arm.activation.quant_range) == ("every_tensor", (-128, 127))
    assert all(c.weight.per_channel and c.weight.symmetric and c.weight.bits == 8 for c in (htp, x86, arm))
    # No target: the defaults as they always were.
    plain = QuantizationAwareTraining().config
    assert (plain.placement, plain.activation.quant_range, plain.weight.bits) == ("fused", (0, 255), 8)
    # An explicit argument wins over the profile where the device can run it.
    assert QuantizationAwareTraining(target="cpu_x86", placement="fused").config.placement == "fused"
    assert PostTrainingQuantization(target="cpu_x86", reduce_range=True).config.weight.bits == 7


def test_the_x86_target_keeps_a_shallow_image_stem_in_float():
    from dms_lightning.quant.prepare import QuantizationConfig, quantizable_layers

    def network(channels, kernel=3):
        return nn.Sequential(nn.Conv2d(channels, 16, kernel), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16),
                             nn.Conv2d(16, 8, 1))

    x86 = QuantizationAwareTraining(target="cpu_x86").config
    assert x86.min_integer_reduction == 32
    # 3x3 stems of grayscale and RGB images (dot products of 9 and 27 values) stay float; a 3x3 conv over 8
    # channels (72), a 7x7 grayscale stem (49, ResNet's) and the depthwise conv (1 channel per group) do not
    assert quantizable_layers(network(1), x86) == quantizable_layers(network(3), x86) == ["2", "3"]
    assert quantizable_layers(network(8), x86) == quantizable_layers(network(1, 7), x86) == ["0", "2", "3"]
    assert QuantizationAwareTraining(target="htp").config.min_integer_reduction == 0
    assert QuantizationAwareTraining(target="cpu_x86", min_integer_reduction=0).config.min_integer_reduction == 0
    assert QuantizationConfig.from_dict(x86.to_dict()) == x86  # what a checkpoint records rebuilds the same
    with pytest.raises(ValueError, match=r"min_integer_reduction=-1 must be an integer >= 0"):
        QuantizationConfig(min_integer_reduction=-1)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(target="cpu_x86", activation_bits=16), r"activation_bits=16 is not run by target='cpu_x86'.*\[8\]"),
    (dict(target="cpu_x86", weight_bits=4), r"weight_bits=4 is not run by target='cpu_x86'.*\[7, 8\]"),
    (dict(target="cpu_arm", precision={"features.0.*": "w8a16"}),
     r"precision\['features.0.\*'\]='w8a16' is not run by target='cpu_arm'"),
    (dict(target="npu"), r"target='npu' is not a known target: use one of \['cpu_arm', 'cpu_x86', 'htp'"),
])
def test_a_precision_the_device_lacks_is_refused_before_training(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)
    # The NPU has both: no error.
    QuantizationAwareTraining(target="htp", activation_bits=16, precision={"features.0.*": "w4a8"})


def test_mixed_precision_on_a_cpu_target_must_promote_to_float():
    with pytest.raises(ValueError, match="promote_to='w8a16' is not run by target='cpu_x86'.*promote_to='float'"):
        PostTrainingQuantization(target="cpu_x86", max_accuracy_drop_pt=0.5)
    PostTrainingQuantization(target="cpu_x86", max_accuracy_drop_pt=0.5, promote_to="float")


def test_layers_the_device_pads_are_named_quantized_or_not():
    net = nn.Sequential(nn.Conv2d(1, 40, 3), nn.ReLU(), nn.Conv2d(40, 64, 1), nn.Flatten(), nn.LazyLinear(5))
    net(__import__("torch").zeros(1, 1, 8, 8))
    assert target_profile("htp").misaligned_layers(net) == {"0": 40}
    assert target_profile("cpu_x86").misaligned_layers(net) == {}
    assert target_profile("htp").misaligned_layers(prepare_qat(net)) == {"0": 40}  # the wrapper's name


def test_a_registered_target_is_usable_by_name():
    profile = register_target(TargetProfile(
        name="test_dsp", device="a test DSP", placement="fused", symmetric_activations=True, weight_bits=8,
        per_channel_weights=False, activation_bits=(8,), weight_bits_supported=(8,), channel_alignment=4,
        reasons={"weights": "per-tensor only"}))
    assert "test_dsp" in target_names()
    config = QuantizationAwareTraining(target="test_dsp").config
    assert not config.weight.per_channel and config.activation.symmetric
    assert "per-tensor only" in profile.summary()
    with pytest.raises(ValueError, match="weight_bits=8 is not in weight_bits_supported"):
        TargetProfile(name="bad", device="x", placement="fused", symmetric_activations=False, weight_bits=8,
                      per_channel_weights=True, activation_bits=(8,), weight_bits_supported=(4,), channel_alignment=8)


def test_the_target_and_its_reasons_reach_the_exported_variant(tmp_path):
    L.seed_everything(0)
    ptq = PostTrainingQuantization(calibration_batches=1, target="cpu_arm", dirpath=str(tmp_path / "q"))
    writer = ONNXExport(export_fp32=False, export_int8=False, openvino=False, dirpath=str(tmp_path / "export"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        num_sanity_val_steps=0, limit_train_batches=1, limit_val_batches=1, callbacks=[ptq, writer])
    datamodule = DMSDataModule(image_size=32, train_size=32, val_size=16, test_size=16, batch_size=16, augment=False)
    trainer.fit(DMSClassifier("mobilenet_v3_small", image_size=32, head_hidden=32), datamodule)
    (variant,) = variants(trainer)
    assert variant.info["target"]["name"] == "cpu_arm"
    assert "S8S8" in variant.info["target_summary"]
    # The exported graph quantizes activations to int8 (signed), as the profile says.
    session = ort_session(variant.onnx_path, fuse_qdq=False)
    assert session is not None
    import onnx

    model = onnx.load(variant.onnx_path)
    zero_points = {init.name: init.data_type for init in model.graph.initializer}
    activation_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_q and all(zero_points[n.input[2]] == onnx.TensorProto.INT8 for n in activation_q)


def test_a_relu_student_runs_its_activations_inside_the_integer_convolutions(tmp_path):
    """Hard-swish has no integer kernel in ONNX Runtime: each one is a float island between DQ and Q."""
    import onnx
    import onnxruntime as ort
    import torch

    from dms_lightning.export.qdq import export_qdq_onnx
    from dms_lightning.quant import post_training_quantize

    example = torch.zeros(1, 1, 32, 32)
    calibration = [torch.randn(4, 1, 32, 32)]
    float_ops = {}
    for activation in ("default", "relu"):
        network = DMSClassifier("mobilenet_v3_small", image_size=32, head_hidden=32, activation=activation).model
        int8 = post_training_quantize(network.eval(), calibration, target_profile("cpu_x86").config())
        path = export_qdq_onnx(int8, example, tmp_path / f"{activation}.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp_path / f"{activation}_ort.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
        ops = [n.op_type for n in graph.node]
        # the grayscale 3x3 stem stays a float conv reading the image (min_integer_reduction), the rest is integer
        assert ops.count("QLinearConv") == 51 and (graph.node[0].op_type, graph.node[0].input[0]) == ("Conv", "input")
        float_ops[activation] = {op: ops.count(op) for op in ("DequantizeLinear", "HardSigmoid", "Mul")}
    # Hard-swish: 17 float islands (DQ, HardSigmoid, Mul, Q) beside the 9 squeeze-excitation gates, and the
    # float stem's own hard-swish (HardSigmoid, Mul before its Q).
    assert float_ops["default"] == {"DequantizeLinear": 27, "HardSigmoid": 27, "Mul": 18}
    # ReLU: only the 9 gates are left in float.
    assert float_ops["relu"] == {"DequantizeLinear": 10, "HardSigmoid": 9, "Mul": 0}
