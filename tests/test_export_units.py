"""Export building blocks without a Trainer: raws, QDQ stripping and encodings, parity, errors, SDK commands."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dms_lightning.export import (
    ParityError,
    UnsupportedOperatorError,
    check_encodings_coverage,
    check_parity,
    export_onnx,
    has_qdq,
    make_static_batch,
    read_raw,
    strip_qdq,
    write_calibration_raws,
)
from dms_lightning.export.runtimes import onnxruntime_outputs
from dms_lightning.export.sdk import conversion_steps, render_convert_script


class FakeQuantCNN(nn.Module):
    """Conv-BN-ReLU ×2 → pool → Linear, with uint8 activations and int8 per-channel weights fake-quantized."""

    def __init__(self, in_channels: int = 1, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    @staticmethod
    def activation(x: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, 0, 255)

    @staticmethod
    def weight(w: torch.Tensor) -> torch.Tensor:
        scale = (w.detach().abs().flatten(1).amax(dim=1) / 127).clamp_min(1e-8)
        return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(len(w), dtype=torch.int32), 0, -128, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, 0.05, 128, 0, 255)
        x = torch.relu(self.bn1(nn.functional.conv2d(x, self.weight(self.conv1.weight), self.conv1.bias, padding=1)))
        x = self.activation(self.activation(x, 0.03), 0.03)  # quantized twice in a row, as around a Dropout
        x = torch.relu(self.bn2(nn.functional.conv2d(x, self.weight(self.conv2.weight), self.conv2.bias, padding=1)))
        x = self.activation(x.mean(dim=(2, 3)), 0.02)
        return nn.functional.linear(x, self.weight(self.fc.weight), self.fc.bias)


def test_raw_files_round_trip_to_the_model_input(tmp_path):
    images = torch.randn(3, 3, 8, 6)
    files = write_calibration_raws(images, tmp_path, input_name="input")
    lines = (tmp_path / "input_list.txt").read_text().split()
    assert lines == [f"input:=calibration/sample_{i:04d}.raw" for i in range(3)]
    for index, path in enumerate(files):
        raw = np.fromfile(path, dtype=np.float32)
        assert raw.size == 3 * 8 * 6
        nchw = raw.reshape(8, 6, 3).transpose(2, 0, 1)  # NHWC on disk → the model's C×H×W
        np.testing.assert_array_equal(nchw, images[index].numpy())
        np.testing.assert_array_equal(read_raw(path, (8, 6, 3)), images[index].permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="expected 48"):
        read_raw(files[0], (4, 4, 3))


def test_parity_failure_detected_when_model_is_perturbed(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    path = export_onnx(model, torch.zeros(1, 1, 16, 16), tmp_path / "m.onnx")
    images = torch.randn(16, 1, 16, 16)
    result, _, _ = check_parity(model, path, images)
    assert result.passed and result.max_abs_diff < 1e-5 and result.top1_agreement == 1.0
    with torch.no_grad():
        model[4].bias += torch.tensor([0.0, 0.5, -0.5])
    with pytest.raises(ParityError, match=r"max \|diff\| 0\.5.*top-1 agreement"):
        check_parity(model, path, images, label="perturbed")


def test_unsupported_operator_names_the_op_and_the_layer(tmp_path):
    class Warp(nn.Module):
        def forward(self, x):
            return nn.functional.grid_sample(x, torch.zeros(x.shape[0], 4, 4, 2), align_corners=False)

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(Warp()), nn.Flatten())
    target = tmp_path / "warp.onnx"
    with pytest.raises(UnsupportedOperatorError) as info:
        export_onnx(model, torch.zeros(1, 1, 12, 12), target, opset=13)
    message = str(info.value)
    assert "aten::grid_sampler" in message and "1.0 (Warp)" in message and "opset >= 16" in message
    assert list(tmp_path.iterdir()) == []  # nothing half-written beside the target


def test_metadata_is_readable_with_plain_onnx(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    metadata = {"class_names": json.dumps(["alert", "phone"]), "mean": "[0.5]", "std": "[0.25]", "image_size": "4"}
    export_onnx(model, torch.zeros(1, 1, 4, 4), tmp_path / "m.onnx", metadata=metadata)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["class_names"]) == ["alert", "phone"] and props["std"] == "[0.25]"


def test_simplify_folds_shape_arithmetic_and_keeps_outputs_metadata_and_dynamic_batch(tmp_path):
    pytest.importorskip("onnxslim")  # part of the dev extra, so CI runs this

    class Flattening(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 14 * 14, 3)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            return self.fc(x.reshape(x.shape[0], -1))  # Shape → Gather → Unsqueeze → Concat → Reshape

    model = Flattening().eval()
    paths = {flag: export_onnx(model, torch.zeros(1, 1, 16, 16), tmp_path / f"{flag}.onnx", simplify=flag,
                               metadata={"class_names": "[]"}) for flag in (False, True)}
    plain, slim = (onnx.load(str(paths[flag])) for flag in (False, True))
    assert len(slim.graph.node) < len(plain.graph.node)
    assert "Shape" not in {node.op_type for node in slim.graph.node}
    assert {p.key: p.value for p in slim.metadata_props}["class_names"] == "[]"
    x = torch.randn(3, 1, 16, 16)  # batch 3: the batch axis stays dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnxruntime_outputs(paths[True], x.numpy()), expected, atol=1e-5)


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    torch.manual_seed(0)
    model = FakeQuantCNN().eval()
    path = tmp_path_factory.mktemp("qdq") / "q.onnx"
    export_onnx(model, torch.zeros(1, 1, 16, 16), path)
    return model, onnx.load(str(path))


def test_strip_qdq_gives_a_float_graph_with_weights_on_the_encoded_grid(qdq_model):
    model, proto = qdq_model
    assert has_qdq(proto)
    stripped = strip_qdq(proto)
    assert not has_qdq(stripped.model)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in stripped.model.graph.initializer}
    assert set(stripped.param_encodings) == {"conv1.weight", "conv2.weight", "fc.weight"}
    for name, entries in stripped.param_encodings.items():
        assert len(entries) == weights[name].shape[0]  # per output channel
        for channel, entry in zip(weights[name], entries):
            # real = scale * (q + offset), q in [0, 255]: a float weight of the bundle is an exact grid point.
            q = channel / entry["scale"] - entry["offset"]
            np.testing.assert_allclose(q, np.round(q), atol=1e-3)
            assert q.min() >= -1e-3 and q.max() <= 255 + 1e-3 and entry["is_symmetric"] == "True"
    graph_input = stripped.activation_encodings["input"][0]
    assert graph_input["offset"] == -128 and graph_input["scale"] == pytest.approx(0.05)
    assert graph_input["min"] == pytest.approx(-6.4) and graph_input["max"] == pytest.approx(6.35)


def test_stripped_graph_requantized_with_its_encodings_reproduces_the_int8_model(qdq_model):
    _, proto = qdq_model
    stripped = strip_qdq(proto)
    images = np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32)
    # Re-insert fake quantization from the JSON alone: the SDK's view of the bundle.
    requantized = _requantize(stripped.model, stripped.activation_encodings)
    np.testing.assert_allclose(onnxruntime_outputs(requantized, images), onnxruntime_outputs(proto, images),
                               atol=1e-4)


def _requantize(model: onnx.ModelProto, activations: dict) -> onnx.ModelProto:
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    nodes = list(graph.graph.node)
    del graph.graph.node[:]
    for name, (entry,) in activations.items():
        q = f"{name}__q"
        scale = onnx.numpy_helper.from_array(np.array(entry["scale"], np.float32), f"{q}_s")
        zero = onnx.numpy_helper.from_array(np.array(-entry["offset"], np.uint8), f"{q}_z")
        graph.graph.initializer.extend([scale, zero])
        for node in nodes:
            for i, value in enumerate(node.input):
                if value == name:
                    node.input[i] = f"{q}_dq"
        graph.graph.node.extend([onnx.helper.make_node("QuantizeLinear", [name, scale.name, zero.name], [f"{q}_q"]),
                                 onnx.helper.make_node("DequantizeLinear", [f"{q}_q", scale.name, zero.name],
                                                       [f"{q}_dq"])])
    graph.graph.node.extend(nodes)
    return onnx.shape_inference.infer_shapes(graph)


def test_coverage_lists_quantized_tensors_without_encoding(qdq_model):
    _, proto = qdq_model
    stripped = strip_qdq(proto)
    complete = check_encodings_coverage(stripped.model, stripped.encodings, stripped.quantized_tensors)
    assert complete.missing == [] and complete.covered == len(stripped.quantized_tensors)
    encodings = json.loads(json.dumps(stripped.encodings))
    del encodings["param_encodings"]["conv2.weight"]
    encodings["activation_encodings"]["no_such_tensor"] = encodings["activation_encodings"]["input"]
    broken = check_encodings_coverage(stripped.model, encodings, stripped.quantized_tensors)
    assert broken.missing == ["conv2.weight", "no_such_tensor"]
    assert "conv2.weight" in broken.not_overridden


def test_make_static_batch_fixes_batch_one(qdq_model):
    _, proto = qdq_model
    static = make_static_batch(strip_qdq(proto).model)
    dims = [d.dim_value for d in static.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 16, 16]
    assert onnxruntime_outputs(static, np.zeros((3, 1, 16, 16), np.float32)).shape == (3, 5)


def test_convert_script_has_the_sdk_commands_for_the_runtime():
    cpu = render_convert_script(conversion_steps(runtime="cpu", has_encodings=False), runtime="cpu")
    assert "snpe-onnx-to-dlc --input_network model.onnx --output_path snpe/model.dlc\n" in cpu
    assert "--override_params" not in cpu and "qnn-context-binary-generator" not in cpu
    assert "qnn-onnx-converter --input_network model.onnx --output_path qnn/model.cpp\n" in cpu  # float on CPU
    assert "-t aarch64-android" in cpu
    with pytest.raises(ValueError, match="runtime='npu'"):
        conversion_steps(runtime="npu", has_encodings=False)


def test_parity_counts_a_flipped_near_tie_within_the_tolerance_but_not_a_real_flip():
    from dms_lightning.export.parity import compare_outputs

    reference = np.array([[2.0, 1.99, 0.0]] + [[3.0, 0.0, 0.0]] * 63, dtype=np.float32)
    candidate = reference.copy()
    candidate[0] = [1.995, 1.996, 0.0]  # the near tie flips within |diff| 0.005
    result = compare_outputs(reference, candidate, atol=0.05, min_top1_agreement=0.99)
    assert result.top1_agreement == pytest.approx(63 / 64) and result.near_ties == 1 and result.passed
    assert "near tie" in result.describe()
    candidate[1] = [0.0, 3.0, 0.0]  # a confident sample flips: over the tolerance and not a tie
    result = compare_outputs(reference, candidate, atol=0.05, min_top1_agreement=0.9)
    assert result.near_ties == 1 and result.judged_agreement == pytest.approx(63 / 64) and not result.passed
    int8 = compare_outputs(reference, candidate, atol=None, min_top1_agreement=0.99)  # no tolerance, no ties
    assert int8.near_ties == 0 and not int8.passed


def test_a_failed_runtime_parity_check_names_the_split_its_images_came_from(tmp_path):
    from dms_lightning.export.parity import ParityError, check_runtime_parity, torch_outputs

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    images = torch.randn(5, 1, 2, 2)

    def wrong_runtime(path, inputs):
        return -torch_outputs(model, inputs)

    with pytest.raises(ParityError, match="on 5 test images"):
        check_runtime_parity(model, wrong_runtime, tmp_path / "m.bin", images, atol=1e-4, min_top1_agreement=0.99,
                             runtime="fake", label="export", split="test")
