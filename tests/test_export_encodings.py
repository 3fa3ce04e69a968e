"""The encodings JSON in each AIMET format version, checked against AIMET's schema without aimet installed, and
the input grid that keeps every pixel off a rounding tie (where runtimes round differently)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dms_lightning.callbacks import ONNXExport, SNPEExport
from dms_lightning.data.transforms import pixel_values
from dms_lightning.export import (
    DEFAULT_ENCODINGS_VERSION,
    ENCODINGS_VERSIONS,
    export_qdq_onnx,
    format_encodings,
    read_encodings,
    strip_qdq,
    write_encodings,
)
from dms_lightning.quant import prepare_qat
from dms_lightning.quant.fake_quant import TIE_MARGIN, FakeQuantizer
from dms_lightning.quant.prepare import graph_input_quantizers
from dms_lightning.quant.spec import activation_spec
from dms_lightning.quant.target import set_input_values


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    """A QDQ graph written by our own QAT path (uint8 activations, int8 per-channel weights) and its encodings."""
    torch.manual_seed(0)
    prepared = prepare_qat(SmallNet())
    for _ in range(3):
        prepared.train()(torch.randn(8, 1, 8, 8))
    path = export_qdq_onnx(prepared.eval(), torch.zeros(1, 1, 8, 8), tmp_path_factory.mktemp("enc") / "q.onnx")
    proto = onnx.load(str(path))
    return proto, strip_qdq(proto).encodings


def _qdq_grids(proto: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tensor of the float graph: (scale, zero point)}`` read from the DequantizeLinear nodes of the QDQ graph."""
    values = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    grids = {}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or values.get(node.input[2]) is None:
            continue
        if node.input[0] in values:  # an integer weight: its float twin is named after the layer
            name = node.input[0].removesuffix("_quantized")
        elif producers[node.input[0]].op_type == "QuantizeLinear":
            name = producers[node.input[0]].input[0]
        else:
            continue
        if values[node.input[2]].dtype != np.int32:  # not a bias
            grids[name] = (np.atleast_1d(values[node.input[1]]), np.atleast_1d(values[node.input[2]]))
    return grids


def test_1_0_0_sections_are_lists_of_aimet_entries_with_one_scale_and_offset_per_channel(qdq, tmp_path):
    proto, encodings = qdq
    document = json.loads(write_encodings(encodings, tmp_path / "e.json", "1.0.0").read_text())
    assert document["version"] == "1.0.0"
    grids = _qdq_grids(proto)
    for section in ("activation_encodings", "param_encodings"):
        entries = document[section]
        assert isinstance(entries, list) and entries
        for entry in entries:
            # AIMET's AffineEncoding._to_1_0_0 fields and types; aimet-onnx's loader validates these.
            assert set(entry) == {"name", "dtype", "enc_type", "bw", "is_sym", "scale", "offset"}
            assert entry["dtype"] == "INT" and entry["bw"] == 8 and isinstance(entry["is_sym"], bool)
            channels = len(grids[entry["name"]][0])
            assert len(entry["scale"]) == len(entry["offset"]) == channels
            assert entry["enc_type"] == ("PER_CHANNEL" if channels > 1 else "PER_TENSOR")
            assert all(isinstance(s, float) and s > 0 for s in entry["scale"])
            assert all(isinstance(o, int) and not isinstance(o, bool) for o in entry["offset"])
    weights = {entry["name"] for entry in document["param_encodings"]}
    assert weights == {"conv.weight", "fc.weight"}
    assert {entry["enc_type"] for entry in document["param_encodings"]} == {"PER_CHANNEL"}


@pytest.mark.parametrize("version", ENCODINGS_VERSIONS)
def test_offsets_of_every_version_give_the_grid_of_the_qdq_model(qdq, tmp_path, version):
    # AIMET: real = (q_unsigned + offset) * scale with q_unsigned in [0, 2**bw - 1], for signed grids too;
    # is_symmetric / is_sym says the grid is signed. ONNX: real = (q - zero_point) * scale.
    proto, encodings = qdq
    written = json.loads(write_encodings(encodings, tmp_path / "e.json", version).read_text())
    assert written["version"] == version
    entries = {}
    for section in ("activation_encodings", "param_encodings"):
        if version == "0.6.1":
            for name, per_channel in written[section].items():
                entries[name] = ([e["scale"] for e in per_channel], [e["offset"] for e in per_channel],
                                 per_channel[0]["is_symmetric"] == "True", per_channel[0]["bitwidth"])
                assert {e["is_symmetric"] for e in per_channel} <= {"True", "False"}
                assert {e["dtype"] for e in per_channel} == {"int"}
        else:
            for e in written[section]:
                entries[e["name"]] = (e["scale"], e["offset"], e["is_sym"], e["bw"])
    grids = _qdq_grids(proto)
    assert set(entries) == set(grids)
    for name, (scale, zero_point) in grids.items():
        scales, offsets, signed, bits = entries[name]
        assert signed == (zero_point.dtype == np.int8)
        np.testing.assert_array_equal(np.float32(scales), scale.astype(np.float32))
        q_onnx = np.arange(-128, 128) if signed else np.arange(256)
        q_unsigned = q_onnx + 128 if signed else q_onnx
        for s, o, z in zip(scales, offsets, np.broadcast_to(zero_point, scale.shape)):
            np.testing.assert_allclose((q_unsigned + o) * s, (q_onnx - int(z)) * s, rtol=0, atol=1e-9)
        if signed:
            assert set(offsets) == {-128}  # symmetric int8 weights: zero point 0


@pytest.mark.parametrize("version", ENCODINGS_VERSIONS)
def test_every_written_version_reads_back_to_the_same_encodings(qdq, tmp_path, version):
    _, encodings = qdq
    path = write_encodings(encodings, tmp_path / "e.json", version)
    assert read_encodings(path) == encodings
    assert format_encodings(read_encodings(path), version) == json.loads(path.read_text())


def test_the_default_version_is_aimets_current_export_format(qdq, tmp_path):
    _, encodings = qdq
    assert DEFAULT_ENCODINGS_VERSION == "1.0.0"
    assert json.loads(write_encodings(encodings, tmp_path / "e.json").read_text())["version"] == "1.0.0"


def test_an_unknown_version_is_rejected_naming_the_field_and_the_versions(qdq, tmp_path):
    _, encodings = qdq
    with pytest.raises(ValueError, match=r"version='2\.0\.0'.*'0\.6\.1', '1\.0\.0'"):
        write_encodings(encodings, tmp_path / "e.json", "2.0.0")
    assert not (tmp_path / "e.json").exists()
    with pytest.raises(ValueError, match=r"SNPEExport\.encodings_version='1\.0'"):
        SNPEExport(encodings_version="1.0")
    with pytest.raises(ValueError, match=r"ONNXExport\.encodings_version=None"):
        ONNXExport(encodings_version=None)


def _tie_distance(values: torch.Tensor, quantizer: FakeQuantizer) -> float:
    """Smallest distance (in grid steps) of a value inside the grid to a rounding tie."""
    grid = values.double() / quantizer.scale.double() + quantizer.zero_point.double()
    inside = grid[(grid >= -0.5) & (grid <= 255.5)]
    return float(((inside - inside.floor()) - 0.5).abs().min())


def test_the_input_grid_keeps_every_pixel_off_a_rounding_tie():
    # mean 0.5 / std 0.25 (the datamodule's default): the min/max grid's step is one pixel and every pixel lies
    # half-way between two levels, so torch / ONNX Runtime (half to even) and AIMET (half up) disagreed.
    pixels = pixel_values([0.5], [0.25])
    assert len(pixels) == 256
    plain = FakeQuantizer(activation_spec(8, False)).train()
    plain(pixels)
    assert _tie_distance(pixels, plain) < 1e-4

    quantizer = FakeQuantizer(activation_spec(8, False)).train()
    quantizer.exact_values = pixels
    quantizer(pixels)
    assert _tie_distance(pixels, quantizer) >= TIE_MARGIN
    # Every pixel still lands within half a step of its value (nothing clipped); the step is one 255th wider.
    scale, zero = float(quantizer.scale), int(quantizer.zero_point)
    assert float((quantizer(pixels) - pixels).abs().max()) <= scale / 2 + 1e-6
    assert scale <= float(plain.scale) * (1 + 1 / 255) * (1 + 1e-6)
    # Half to even (torch's fake quantization) and half up (AIMET) now give the same integers for every pixel.
    half_even = torch.round(pixels / quantizer.scale) + zero
    half_up = torch.floor(pixels / quantizer.scale + 0.5) + zero
    torch.testing.assert_close(half_even, half_up)


def test_the_pixel_values_reach_only_the_quantizer_of_the_network_input():
    holder = nn.Module()
    holder.net = prepare_qat(SmallNet())
    holder.net.train()(torch.randn(4, 1, 8, 8))
    pixels = pixel_values([0.5], [0.25])
    assert set_input_values(holder, pixels) == 1
    (graph_input,) = graph_input_quantizers(holder.net)
    assert graph_input.exact_values is pixels and _tie_distance(pixels, graph_input) >= TIE_MARGIN
    others = [m for m in holder.net.modules() if isinstance(m, FakeQuantizer) and m is not graph_input]
    assert others and all(q.exact_values is None for q in others)
