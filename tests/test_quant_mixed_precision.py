"""16-bit activations (W8A16), per-layer precision overrides and automatic mixed precision: in the fake-quant
network, in the QDQ ONNX model ONNX Runtime runs, in the encodings and the SDK flags, and through the PTQ callback."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper
from torch import nn

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import ONNXExport, PostTrainingQuantization, QuantizationAwareTraining
from dms_lightning.export.encodings import write_encodings
from dms_lightning.export.qdq import export_qdq_onnx, strip_qdq
from dms_lightning.export.runtimes import ort_session
from dms_lightning.export.sdk import conversion_steps
from dms_lightning.quant import QuantizationConfig, post_training_quantize
from dms_lightning.quant.fake_quant import FakeQuantizer, named_activation_quantizers
from dms_lightning.quant.mixed_precision import layer_quantizers, select_mixed_precision
from dms_lightning.quant.spec import QuantSpec
from dms_lightning.quant.target import QuantizerWrapping

IMAGE = 32


# One intra-op thread (conftest.one_torch_thread): on 2 shared cores, two OpenMP threads per test spin
# against other jobs.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mobilenet() -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=5)
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None  # cumulative: BatchNorm statistics of real activations, not of the init
    with torch.no_grad():
        for _ in range(2):
            net.train()(torch.randn(16, 3, IMAGE, IMAGE))
    return net.eval()  # (untouched, eval-mode BatchNorm shrinks the logits of a fresh MobileNet to ~1e-11)


def _sqnr(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float(10 * torch.log10((reference ** 2).sum() / ((reference - candidate) ** 2).sum()))


class _Outlier(nn.Module):
    """A small CNN fed images with one hot pixel: a per-tensor 8-bit input grid spends its levels on it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 4)  # no pooling: every image gets its own logits

    def forward(self, x):
        x = nn.functional.relu6(self.conv1(x))  # ReLU6 bounds every tensor after the input
        x = nn.functional.relu6(self.conv2(x))
        x = nn.functional.relu6(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def _labelled(model: nn.Module, count: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(1)
    images = torch.randn(count, 3, 16, 16)
    images[:, :, 0, 0] = 500.0  # the outlier: an 8-bit grid over [-3, 500] has a step of 2
    with torch.no_grad():
        labels = model(images).argmax(1)  # float accuracy 100 %: every flip is the quantization's
    return [(images[i:i + 16], labels[i:i + 16]) for i in range(0, count, 16)]


# ---------------------------------------------------------------- the grid
def test_sixteen_bit_activations_are_far_closer_to_float_than_eight():
    net = _mobilenet()
    batches = [torch.randn(8, 3, IMAGE, IMAGE)]
    a8 = post_training_quantize(net, batches)
    a16 = post_training_quantize(net, batches, QuantizationConfig(activation=QuantSpec(16, False, False)))
    assert {q.spec.bits for q in named_activation_quantizers(a16).values()} == {16}
    for model in (a8, a16):  # weights pass through in both: the activation grid is what is compared
        for quantizer in model.modules():
            if isinstance(quantizer, FakeQuantizer) and quantizer.is_weight:
                quantizer.bypass = True
    with torch.no_grad():
        reference, low, high = net(batches[0]), a8(batches[0]), a16(batches[0])
    # 256 times finer steps: ~48 dB better in theory; clipping and the input grid take some of it.
    assert _sqnr(reference, high) > _sqnr(reference, low) + 30.0


def test_overrides_promote_the_named_layers_keep_float_ones_float_and_the_last_match_wins():
    net = _mobilenet()
    config = QuantizationConfig(precision={"features.*": "w8a16", "features.2.*": "w8a8", "classifier.3": "float"})
    assert config.layer_bits("features.1.block.0.0") == (8, 16)
    assert config.layer_bits("features.2.block.0.0") == (8, 8)
    assert config.layer_bits("classifier.0") == (8, 8)
    q = post_training_quantize(net, [torch.randn(4, 3, IMAGE, IMAGE)], config)
    layers = layer_quantizers(q)
    assert "classifier.3" not in layers and "classifier.0" in layers  # float: not quantized at all
    assert all(qz.spec.bits == 16 for qz in layers["features.1.block.0.0"])
    assert all(qz.spec.bits == 8 for qz in layers["classifier.0"])
    # A tensor between an 8-bit and a 16-bit layer takes the wider grid.
    assert {qz.spec.bits for qz in layers["features.2.block.0.0"]} == {8, 16}


@pytest.mark.parametrize("precision, message", [
    ({"features.*": "w8a12"}, "precision['features.*']='w8a12'"),
    ({"features.*": "int8"}, "'w8a16'"),
    ({"": "w8a16"}, "layer-name patterns"),
])
def test_bad_precision_is_an_error_naming_the_pattern_and_the_valid_choices(precision, message):
    with pytest.raises(ValueError) as caught:
        QuantizationConfig(precision=precision)
    assert message in str(caught.value)
    with pytest.raises(ValueError, match="precision"):
        QuantizationAwareTraining(precision=precision)


def test_callback_arguments_of_automatic_mixed_precision_are_checked_before_training():
    with pytest.raises(ValueError, match="max_accuracy_drop_pt=-1"):
        PostTrainingQuantization(max_accuracy_drop_pt=-1)
    with pytest.raises(ValueError, match="promote_to='w4a8'"):
        PostTrainingQuantization(max_accuracy_drop_pt=0.5, promote_to="w4a8")
    with pytest.raises(ValueError, match="max_promoted=1.5"):
        PostTrainingQuantization(max_accuracy_drop_pt=0.5, max_promoted=1.5)


def test_a_checkpoint_record_rebuilds_the_same_bit_widths():
    config = QuantizationConfig(precision={"features.0.*": "w8a16", "classifier.*": "w4a8"})
    assert QuantizationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    module = DMSClassifier("mobilenet_v3_small", image_size=IMAGE)
    record = {"active": True, "config": config.to_dict()}
    QuantizerWrapping.restore(module, record)
    layers = layer_quantizers(module.model)
    assert all(q.spec.bits == 16 for q in layers["features.0.0"])
    head = [name for name in layers if name.startswith("classifier.")]
    assert head and all(module.model.get_submodule(name).weight_quantizer.spec.bits == 4 for name in head)
    assert module.model.get_submodule("features.1.block.0.0").weight_quantizer.spec.bits == 8


# ---------------------------------------------------------------- what leaves the process
def test_w8a16_layers_export_as_16_bit_qdq_onnx_runtime_runs_and_the_encodings_carry_bw_16(tmp_path):
    net = _mobilenet()
    batches = [torch.randn(8, 3, IMAGE, IMAGE)]
    q = post_training_quantize(net, batches, QuantizationConfig(precision={"features.0.*": "w8a16"}))
    path = export_qdq_onnx(q, torch.zeros(1, 3, IMAGE, IMAGE), tmp_path / "mixed.onnx")
    proto = onnx.load(str(path))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 21
    zero_points = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    wide_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"
                  and zero_points.get(n.input[2], np.zeros((), np.uint8)).dtype == np.uint16]
    wide_quantizers = [name for name, qz in named_activation_quantizers(q).items() if qz.spec.bits == 16]
    assert len(wide_nodes) == len(wide_quantizers) >= 2

    images = torch.randn(6, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = q(images).numpy()
    # Unoptimised, ONNX Runtime computes the QDQ graph literally: our simulation, value for value. (Optimised,
    # its fused integer kernels round differently on CPUs without VNNI, for the 8-bit model as much as this one.)
    exact = ort_session(path, optimize=False)
    assert np.array_equal(exact.run(None, {"input": images.numpy()})[0], expected)
    fused = ort_session(path).run(None, {"input": images.numpy()})[0]
    assert fused.shape == expected.shape and np.isfinite(fused).all()

    stripped = strip_qdq(proto)
    widths = [entries[0]["bitwidth"] for entries in stripped.activation_encodings.values()]
    assert widths.count(16) == len(wide_quantizers) and widths.count(8) == len(widths) - len(wide_quantizers)
    assert all(entries[0]["bitwidth"] == 8 for entries in stripped.param_encodings.values())  # weights stay 8-bit
    written = write_encodings(stripped.encodings, tmp_path / "enc.json", "1.0.0")
    document = json.loads(Path(written).read_text())
    assert sorted(e["bw"] for e in document["activation_encodings"]).count(16) == len(wide_quantizers)


def test_sdk_steps_ask_for_16_bit_activations_only_for_a_uniform_w8a16_model():
    wide = conversion_steps(runtime="htp", has_encodings=True, activation_bits=16)
    default = conversion_steps(runtime="htp", has_encodings=True)
    args = {step.tool: step.args for step in wide}
    assert args["snpe-dlc-quantize"][-2:] == ["--act_bitwidth", "16"]
    assert "--act_bw" in args["qnn-onnx-converter"]
    assert not any("--act_bitwidth" in s.args or "--act_bw" in s.args for s in default)
    with pytest.raises(ValueError, match="activation_bits=12"):
        conversion_steps(runtime="htp", has_encodings=True, activation_bits=12)


# ---------------------------------------------------------------- automatic selection
def test_automatic_selection_promotes_the_layer_that_costs_the_accuracy():
    net = _Outlier().eval()
    data = _labelled(net)
    result = select_mixed_precision(net, [images for images, _ in data], data, max_accuracy_drop_pt=0.5,
                                    max_promoted=1)
    assert result.float_accuracy == 1.0
    assert result.uniform_accuracy < 0.9, "the fixture must make uniform W8A8 lose accuracy"
    # The outlier is the network input, conv1's input: promoting conv1 gives it 16 bits.
    assert result.met and result.promoted == ["conv1"], result.to_dict()
    assert result.ranking[0]["layer"] == "conv1" and len(result.ranking) == 4
    assert result.drop_pt <= 0.5
    assert result.precision == {result.promoted[0]: "w8a16"}
    promoted = layer_quantizers(result.model)[result.promoted[0]]
    assert all(q.spec.bits == 16 for q in promoted)
    with torch.no_grad():
        measured = torch.cat([result.model(x).argmax(1) == y for x, y in data]).float().mean()
    assert float(measured) == pytest.approx(result.accuracy)
    assert "conv" in result.to_markdown() and result.to_dict()["met"] is True


def test_automatic_selection_promotes_nothing_when_uniform_already_holds():
    net = _Outlier().eval()
    data = _labelled(net)
    result = select_mixed_precision(net, [x for x, _ in data], data, max_accuracy_drop_pt=100.0)
    assert result.promoted == [] and result.model is not None and not result.ranking


def test_ptq_callback_chooses_mixed_precision_in_a_fit_and_its_encodings_carry_16_bits(tmp_path):
    L.seed_everything(0)
    ptq = PostTrainingQuantization(calibration_batches=2, calibration_split="train", dirpath=str(tmp_path / "q"),
                                   precision={"features.0.*": "w8a16"}, max_accuracy_drop_pt=0.0, max_promoted=3,
                                   min_agreement=0.9)
    writer = ONNXExport(export_fp32=False, openvino=False, dirpath=str(tmp_path / "export"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        num_sanity_val_steps=0, callbacks=[ptq, writer], limit_train_batches=2)
    module = DMSClassifier("mobilenet_v3_small", image_size=IMAGE)
    datamodule = DMSDataModule(image_size=IMAGE, train_size=64, val_size=32, test_size=32, batch_size=16,
                               augment=False)
    trainer.fit(module, datamodule)
    chosen = ptq.result["mixed_precision"]
    assert ptq.mixed_precision is not None and chosen["quantized_layers"] > 20
    assert 1 <= len(chosen["promoted"]) <= 3 or chosen["met"]
    assert dict(ptq.config.precision) == {"features.0.*": "w8a16", **chosen["precision"]}
    wide = [name for name, q in named_activation_quantizers(module.model).items() if q.spec.bits == 16]
    assert len(wide) >= 2  # the stem's input and output at least
    encodings = json.loads((tmp_path / "q" / "ptq_int8.encodings.json").read_text())
    sections = encodings["activation_encodings"]
    widths = [e["bw"] for e in sections] if isinstance(sections, list) else [v[0]["bitwidth"] for v in sections.values()]
    assert widths.count(16) == len(wide)
    assert all(isinstance(q, FakeQuantizer) for q in named_activation_quantizers(module.model).values())
