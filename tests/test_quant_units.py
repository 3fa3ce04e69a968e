"""Quantization building blocks without a Trainer: quantizers, BN folding, FX preparation, QDQ export, encodings."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn

from dms_lightning.export import encodings_from_qdq_onnx, export_qdq_onnx
from dms_lightning.export.runtimes import ort_session
from dms_lightning.quant import QuantizationConfig, QuantSpec, prepare_qat
from dms_lightning.quant.fake_quant import FakeQuantizer
from dms_lightning.quant.modules import QuantConvBn2d, fold_batch_norm
from dms_lightning.quant.spec import activation_spec, weight_spec


# One intra-op thread (conftest.one_torch_thread): on 2 shared cores, two OpenMP threads per test spin
# against other jobs.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _optimized_op_types(onnx_path, tmp_path) -> list[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def _calibrated(model: nn.Module, shape=(4, 1, 32, 32), steps: int = 3) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape))
    return model.eval()


def test_activation_ranges_change_only_in_training_mode():
    quantizer = FakeQuantizer(QuantSpec(8, symmetric=False, per_channel=False))
    quantizer.train()(torch.rand(64))
    before = (quantizer.min_val.clone(), quantizer.max_val.clone(), quantizer.scale.clone())
    quantizer.eval()(torch.rand(64) * 100)
    assert torch.equal(quantizer.min_val, before[0]) and torch.equal(quantizer.max_val, before[1])
    assert torch.equal(quantizer.scale, before[2])


def test_weights_get_int8_symmetric_per_channel_scales():
    quantizer = FakeQuantizer(weight_spec(8, True, True), num_channels=3, is_weight=True)
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.25], [-4.0, 3.0]])
    out = quantizer(weight)
    assert torch.allclose(quantizer.scale, torch.tensor([2.0, 0.5, 4.0]) / 127)
    assert torch.all(quantizer.zero_point == 0)
    assert torch.allclose(out, weight, atol=4.0 / 254)


def test_four_bit_weights_use_fifteen_levels():
    quantizer = FakeQuantizer(weight_spec(4, True, True), num_channels=1, is_weight=True)
    out = quantizer(torch.linspace(-1, 1, 101).reshape(1, -1))
    assert len(torch.unique(out)) == 15  # -7..7


def test_seven_bit_weights_stay_within_plus_minus_63():
    quantizer = FakeQuantizer(weight_spec(7, True, True), num_channels=1, is_weight=True)
    out = quantizer(torch.linspace(-1, 1, 301).reshape(1, -1))
    levels = torch.round(out / quantizer.scale.reshape(-1, 1)).unique()
    assert levels.min() == -63 and levels.max() == 63 and len(levels) == 127


@pytest.mark.parametrize("bits, make", [(16, lambda b: weight_spec(b, True, True)), (2, lambda b: weight_spec(b, True, True)),
                                        (4, lambda b: activation_spec(b, False))])
def test_unsupported_bit_width_is_rejected_with_field_name(bits, make):
    with pytest.raises(ValueError, match=rf"bits={bits}"):
        make(bits)


def test_batch_norm_folding_matches_conv_then_batch_norm():
    conv, bn = nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.eval()
    x = torch.randn(2, 3, 10, 10)
    weight, bias = fold_batch_norm(conv.weight, conv.bias, bn)
    assert torch.allclose(nn.functional.conv2d(x, weight, bias), bn(conv(x)), atol=1e-5)


def test_prepare_qat_keeps_parameter_identity_and_order():
    model = torchvision.models.resnet18(num_classes=5)
    before = [id(p) for p in model.parameters()]
    prepared = prepare_qat(model)
    assert [id(p) for p in prepared.parameters()] == before  # optimizers and DDP buckets stay valid
    assert sum(isinstance(m, QuantConvBn2d) for m in prepared.modules()) == 20  # every conv has its BN folded


def test_prepare_qat_rejects_model_without_quantizable_layers():
    with pytest.raises(ValueError, match="no quantizable layer"):
        prepare_qat(nn.Sequential(nn.ReLU(), nn.Flatten()))
    with pytest.raises(ValueError, match="no quantizable layer"):
        prepare_qat(nn.Sequential(nn.Linear(4, 4)), QuantizationConfig(exclude=("*",)))


class TwoStream(nn.Module):
    """Image + auxiliary vector, with a keyword-only argument (Lightning #7926, #15862)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Linear(4, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, image, aux, *, temperature: float = 1.0):
        pooled = self.conv(image).mean(dim=(2, 3))
        return self.head(torch.cat([pooled, self.aux(aux)], dim=1)) / temperature


def test_forward_with_several_inputs_and_keyword_arguments():
    model = TwoStream()
    prepared = prepare_qat(model)
    prepared.train()
    prepared(torch.randn(4, 1, 8, 8), torch.randn(4, 4), temperature=2.0).sum().backward()
    assert model.conv[0].weight.grad is not None and model.aux.weight.grad is not None
    prepared.eval()
    image, aux = torch.randn(2, 1, 8, 8), torch.randn(2, 4)
    out = prepared(image, aux, temperature=2.0)
    assert torch.allclose(out * 2.0, prepared(image, aux))
    quantized_inputs = {n.args[0].name for n in prepared.graph.nodes
                        if n.op == "call_module" and str(n.target).startswith("activation_quantizers.")}
    assert {"image", "aux"} <= quantized_inputs


@pytest.fixture(scope="module")
def resnet_qdq(tmp_path_factory):
    torch.manual_seed(0)
    prepared = _calibrated(prepare_qat(torchvision.models.resnet18(num_classes=5)), (4, 3, 32, 32))
    path = export_qdq_onnx(prepared, torch.zeros(1, 3, 32, 32), tmp_path_factory.mktemp("qdq") / "resnet.onnx")
    return prepared, path


def test_qdq_export_runs_as_integer_kernels_in_onnx_runtime(resnet_qdq, tmp_path):
    _, path = resnet_qdq
    ops = _optimized_op_types(path, tmp_path)
    assert ops.count("QLinearConv") == 20 and ops.count("QLinearAdd") == 8 and "QGemm" in ops
    assert "Conv" not in ops  # no conv fell back to float


def test_qdq_export_stores_int8_weights(resnet_qdq):
    _, path = resnet_qdq
    model = onnx.load(str(path))
    weights = [i for i in model.graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0].endswith(".weight") for n in model.graph.node)


def test_onnx_runtime_agrees_with_fake_quant_model(resnet_qdq):
    prepared, path = resnet_qdq
    x = torch.randn(16, 3, 32, 32)
    reference = prepared.eval()(x).detach().numpy()
    logits = ort_session(path).run(None, {"input": x.numpy()})[0]
    # Integer kernels round intermediate sums differently: allow a few steps of the logits' int8 grid.
    step = float(prepared.activation_quantizers.get_submodule(prepared.graph.output_node().args[0].target.split(".")[-1]).scale)
    assert np.abs(reference - logits).max() <= 5 * step


def test_encodings_are_keyed_by_onnx_tensor_names(resnet_qdq):
    _, path = resnet_qdq
    model = onnx.load(str(path))
    encodings = encodings_from_qdq_onnx(path)
    tensors = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    assert encodings["activation_encodings"] and set(encodings["activation_encodings"]) <= tensors
    assert {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= set(encodings["param_encodings"])  # torch names
    conv1 = encodings["param_encodings"]["conv1.weight"]
    assert len(conv1) == 64  # one entry per output channel
    assert all(e["bitwidth"] == 8 and e["offset"] == -128 and e["is_symmetric"] == "True" for e in conv1)
    for entries in encodings["activation_encodings"].values():
        (entry,) = entries
        assert entry["is_symmetric"] == "False" and -255 <= entry["offset"] <= 0
        assert entry["min"] == pytest.approx(entry["offset"] * entry["scale"])
        assert entry["max"] == pytest.approx(entry["min"] + 255 * entry["scale"])


@pytest.mark.parametrize("bits", [4, 7])
def test_narrow_weights_export_and_encode_with_their_bit_width(tmp_path, bits):
    torch.manual_seed(0)
    config = QuantizationConfig(weight=weight_spec(bits, True, True))
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 3))
    prepared = _calibrated(prepare_qat(model, config))
    path = export_qdq_onnx(prepared, torch.zeros(1, 1, 32, 32), tmp_path / f"w{bits}.onnx")
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4) and len(init.dims) > 1:
            values = onnx.numpy_helper.to_array(init).astype(np.int8)
            assert values.min() >= -(2 ** (bits - 1)) and values.max() <= 2 ** (bits - 1) - 1
    encodings = encodings_from_qdq_onnx(path)
    assert {e["bitwidth"] for v in encodings["param_encodings"].values() for e in v} == {bits}
    x = torch.randn(4, 1, 32, 32)
    step = float(prepared.activation_quantizers.get_submodule(prepared.graph.output_node().args[0].target.split(".")[-1]).scale)
    assert np.abs(ort_session(path).run(None, {"input": x.numpy()})[0] - prepared(x).detach().numpy()).max() <= 2 * step


def test_int4_weights_are_stored_as_int4_and_compute_what_int8_containers_do(tmp_path):
    torch.manual_seed(0)
    config = QuantizationConfig(weight=weight_spec(4, True, True))
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64 * 28 * 28, 5))
    prepared = _calibrated(prepare_qat(model, config))
    packed = export_qdq_onnx(prepared, torch.zeros(1, 1, 32, 32), tmp_path / "int4.onnx")
    containers = export_qdq_onnx(prepared, torch.zeros(1, 1, 32, 32), tmp_path / "int8.onnx", int4_weights=False)
    proto = onnx.load(str(packed))
    weights = [i for i in proto.graph.initializer if i.name.endswith("weight_quantized")]
    assert len(weights) == 3 and {i.data_type for i in weights} == {onnx.TensorProto.INT4}
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 21
    onnx.checker.check_model(proto, full_check=True)
    # half a byte per weight: the file shrinks by about the weights' int8 bytes / 2
    weight_count = sum(int(np.prod(i.dims)) for i in weights)
    assert containers.stat().st_size - packed.stat().st_size >= 0.45 * weight_count
    x = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(ort_session(packed).run(None, {"input": x})[0],
                                  ort_session(containers).run(None, {"input": x})[0])
    assert {e["bitwidth"] for v in encodings_from_qdq_onnx(packed)["param_encodings"].values() for e in v} == {4}


def test_write_encodings_is_json_with_both_sections(resnet_qdq, tmp_path):
    from dms_lightning.export import write_encodings

    _, path = resnet_qdq
    out = write_encodings(encodings_from_qdq_onnx(path), tmp_path / "enc.json")
    data = json.loads(out.read_text())
    assert set(data) >= {"activation_encodings", "param_encodings"}
    with pytest.raises(FileNotFoundError, match="onnx_path"):
        encodings_from_qdq_onnx(tmp_path / "missing.onnx")


def test_package_never_imports_torch_ao_quantization():
    import pathlib
    import re

    import dms_lightning

    pattern = re.compile(r"^\s*(import\s+torch\.ao\.quantization|from\s+torch\.ao\.quantization\b|"
                         r"from\s+torch\.ao\s+import\s+quantization)", re.MULTILINE)
    root = pathlib.Path(dms_lightning.__file__).parent
    assert [str(p) for p in root.rglob("*.py") if pattern.search(p.read_text())] == []


class _ShapeUser(nn.Module):
    """Conv → hardswish → a squeeze-excitation gate, then shape arithmetic (``x.size(0)``) before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish()
        self.fc1, self.relu, self.fc2, self.gate = nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1), nn.Hardsigmoid()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act(self.conv(x))
        x = x * self.gate(self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(x.mean((2, 3)).view(x.size(0), -1))


def test_every_tensor_placement_quantizes_what_full_integer_runtimes_keep_in_int8():
    from dms_lightning.quant.fake_quant import FakeQuantizer
    from dms_lightning.quant.prepare import QuantizationConfig, prepare_qat

    def quantized_inputs(gm):
        """The graph nodes each activation quantizer reads."""
        return {str(n.args[0]) for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(str(n.target)), FakeQuantizer)}

    net = _ShapeUser().eval()
    fused, every = (prepare_qat(net, QuantizationConfig(placement=p)) for p in ("fused", "every_tensor"))
    # fused: the hardswish output read by the pooling and the gate, the gate and the product stay float
    assert {"act", "gate", "mul"}.isdisjoint(quantized_inputs(fused))
    assert {"conv", "act", "gate", "mul", "mean", "mean_1"} <= quantized_inputs(every)
    # a layer's output its ReLU passes on is not quantized twice, and the shape arithmetic is left alone
    assert "fc1" not in quantized_inputs(every) and "relu" in quantized_inputs(every)
    assert "size" not in quantized_inputs(every)
    images = torch.randn(4, 3, 16, 16)
    for model in (fused, every):
        model.train()(images)
        assert model.eval()(images).shape == (4, 5)


def test_every_tensor_leaves_a_float_layer_whole():
    """A conv kept in float runs with its BatchNorm and activation as one float kernel: no Q/DQ inside it."""
    from dms_lightning.quant.fake_quant import FakeQuantizer
    from dms_lightning.quant.prepare import QuantizationConfig, prepare_qat

    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    qat = prepare_qat(net, QuantizationConfig(placement="every_tensor", exclude=("0",)))
    read = {str(n.args[0]) for n in qat.graph.nodes if n.op == "call_module"
            and isinstance(qat.get_submodule(str(n.target)), FakeQuantizer)}
    # the image (read only by the float conv), the float conv's output and its BatchNorm's stay float; the
    # float layer's activation output feeds an integer conv and carries a grid
    assert {"input_1", "_0", "_1"}.isdisjoint(read) and "_2" in read
    assert type(qat.get_submodule("1")) is nn.BatchNorm2d  # not folded: the conv is not quantized
    everything = prepare_qat(net, QuantizationConfig(placement="every_tensor"))
    assert "input_1" in {str(n.args[0]) for n in everything.graph.nodes if n.op == "call_module"
                         and isinstance(everything.get_submodule(str(n.target)), FakeQuantizer)}


def test_placement_is_checked_and_kept_in_the_config_record():
    from dms_lightning.quant.prepare import QuantizationConfig

    with pytest.raises(ValueError, match="placement='all'"):
        QuantizationConfig(placement="all")
    config = QuantizationConfig(placement="every_tensor")
    assert QuantizationConfig.from_dict(config.to_dict()).placement == "every_tensor"


@pytest.mark.parametrize("quant_min, quant_max", [(0, 255), (-128, 127), (0, 65535), (-8, 7)])
def test_cpu_fake_quantizer_is_torchs_op_bit_for_bit(quant_min, quant_max):
    # The vectorised CPU path must give torch's fake_quantize_per_tensor_affine exactly: outputs and
    # straight-through gradients, with rounding ties (half to even), saturation at both ends and NHWC inputs.
    from dms_lightning.quant.fake_quant import _FakeQuantizePerTensor

    generator = torch.Generator().manual_seed(0)
    for trial in range(12):
        scale = 0.25 if trial % 3 == 0 else float(torch.rand(1, generator=generator)) * 0.1 + 1e-4
        zero = int(torch.randint(quant_min, quant_max + 1, (1,), generator=generator)) if quant_min == 0 else 0
        if trial % 3 == 0:  # every value exactly half-way between two levels
            x = (torch.randint(-700, 700, (4, 6, 5, 5), generator=generator) + 0.5) * scale
        else:
            # From 20 % below the grid's lowest value to 20 % above its highest: both ends saturate.
            span = (torch.rand(4, 6, 5, 5, generator=generator) * 1.4 - 0.2) * (quant_max - quant_min)
            x = (span + quant_min - zero) * scale
        x = x.contiguous(memory_format=torch.channels_last) if trial % 2 else x
        scale_t, zero_t = torch.tensor(scale), torch.tensor(zero, dtype=torch.int32)
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours = _FakeQuantizePerTensor.apply(ours, scale_t, zero_t, quant_min, quant_max)
        y_theirs = torch.fake_quantize_per_tensor_affine(theirs, scale_t, zero_t, quant_min, quant_max)
        weights = torch.randn(x.shape, generator=generator)
        (y_ours * weights).sum().backward()
        (y_theirs * weights).sum().backward()
        assert torch.equal(y_ours, y_theirs)
        assert torch.equal(ours.grad, theirs.grad)
        assert 0 < int((ours.grad == 0).sum()) < x.numel() or trial % 3 == 0  # both clamped and passed values


def test_fake_quantizer_leaves_torchs_op_visible_to_exporters():
    # fake_quant_disabled (the float twin of a QAT network) and the tracers recognise torch's op: inside them
    # the quantizer calls it, so the bypass still yields the float tensor.
    from dms_lightning.export.qdq import fake_quant_disabled

    q = FakeQuantizer(QuantSpec(8, symmetric=False, per_channel=False)).train()
    q(torch.linspace(-1, 1, 100))
    x = torch.linspace(-1, 1, 7) / 3
    assert not torch.equal(q.eval()(x), x)
    with fake_quant_disabled():
        assert torch.equal(q(x), x)
