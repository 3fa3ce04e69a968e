"""LiteRT / TFLite export: FP32 and FP16 files, NHWC input, metadata, parity in the LiteRT interpreter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dms_lightning.export.tflite import INSTALL_HINT, tflite_available

needs_tflite = pytest.mark.skipif(not tflite_available(), reason=f"the [tflite] extra is not installed: {INSTALL_HINT}")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 5)).eval()


@needs_tflite
def test_fp32_tflite_matches_pytorch_within_1e4_and_carries_the_metadata(tmp_path):
    from dms_lightning.export.tflite import check_tflite_parity, export_tflite, read_tflite_metadata

    net, images = _cnn(), torch.randn(24, 3, 16, 16)
    classes = ["alert", "eyes_closed", "yawning", "looking_away", "phone"]
    path = export_tflite(net, images[:1], tmp_path / "m.tflite",
                         metadata={"class_names": json.dumps(classes), "preprocessing": '{"image_size": 16}'})
    result = check_tflite_parity(net, path, images, atol=1e-4, min_top1_agreement=0.99)[0]
    assert result.passed and result.samples == 24
    metadata = read_tflite_metadata(path)
    assert json.loads(metadata["class_names"]) == classes
    assert metadata["layout"] == "NCHW" and metadata["precision"] == "fp32"
    assert json.loads(metadata["preprocessing"]) == {"image_size": 16}


@needs_tflite
def test_fp16_tflite_takes_nhwc_input_and_stores_half_precision_weights(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from dms_lightning.export.tflite import check_tflite_parity, export_tflite

    net, images = _cnn(), torch.randn(16, 3, 16, 16)
    path = export_tflite(net, images[:1], tmp_path / "m16.tflite", precision="fp16", layout="NHWC")
    interpreter = Interpreter(model_path=str(path))
    assert list(interpreter.get_input_details()[0]["shape"]) == [1, 16, 16, 3]
    weights = [d for d in interpreter.get_tensor_details() if d["dtype"] == np.float16]
    assert {tuple(d["shape"]) for d in weights} >= {(16, 3, 3, 3), (5, 16)}  # conv and linear weights in fp16
    result = check_tflite_parity(net, path, images, atol=5e-2, min_top1_agreement=0.99)[0]
    assert result.passed and result.max_abs_diff > 0  # the weights really were rounded


@needs_tflite
def test_tflite_export_callback_writes_parity_checked_files_listed_in_the_manifest(tmp_path):
    from test_export_callbacks import TinyClassifier, _datamodule, _trainer

    from dms_lightning.callbacks import TFLiteExport
    from dms_lightning.export.manifest import read_manifest

    torch.manual_seed(0)
    callback = TFLiteExport(dirpath=str(tmp_path / "export"), name="tiny", checkpoint="last", precisions=["fp32"],
                            layout="NHWC", parity_images=16, parity_split="test")
    trainer = _trainer(tmp_path, [callback], epochs=1)
    trainer.fit(TinyClassifier(in_channels=3, fake_quant=True), _datamodule(channels=3))
    assert [p.name for p in (tmp_path / "export").glob("*.tflite")] == ["tiny_fp32.tflite"]
    entry = next(a for a in read_manifest(tmp_path / "export")["artifacts"] if a["name"] == "tiny_fp32_tflite")
    assert entry["parity"]["passed"] and entry["parity"]["max_abs_diff"] <= 1e-4
    assert entry["parity"]["split"] == "test" and entry["parity"]["samples"] == 16
    assert entry["layout"] == "NHWC" and json.loads(entry["metadata"]["class_names"])[1] == "eyes_closed"


def test_tflite_export_validates_its_arguments_and_names_the_extra():
    from dms_lightning.export.tflite import TFLiteExport, export_tflite

    with pytest.raises(ValueError, match="TFLiteExport.layout='CHW'"):
        TFLiteExport(layout="CHW")
    with pytest.raises(ValueError, match=r"TFLiteExport.parity_split='train' must be one of \['val', 'test'\]"):
        TFLiteExport(parity_split="train", skip_if_unavailable=True)
    with pytest.raises(ValueError, match="TFLiteExport.int8_min_top1_agreement=1.5"):
        TFLiteExport(int8_min_top1_agreement=1.5)
    with pytest.raises(ValueError, match=r"TFLiteExport.precisions=\['int4'\]"):
        TFLiteExport(precisions=["int4"])
    with pytest.raises(ValueError, match="precision='bf16'"):
        export_tflite(_cnn(), torch.zeros(1, 3, 8, 8), Path("unused.tflite"), precision="bf16")
    if not tflite_available():
        with pytest.raises(ModuleNotFoundError, match=r"dms_lightning\[tflite\]"):
            TFLiteExport()


class _SqueezeNet(nn.Module):
    """The MobileNetV3 pieces the INT8 file must hold in integers: hardswish, a squeeze-excitation with
    hardsigmoid, a residual add, a max-pool and a global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.se_fc1, self.se_fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.se_act, self.gate = nn.ReLU(), nn.Hardsigmoid()
        self.pool, self.head = nn.MaxPool2d(2), nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x)
        scale = self.gate(self.se_fc2(self.se_act(self.se_fc1(y.mean((2, 3), keepdim=True)))))
        x = self.pool(x + y * scale)
        return self.head(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def _int8_network(images):
    from dms_lightning.quant.calibration import post_training_quantize

    torch.manual_seed(0)
    net = _SqueezeNet().eval()
    with torch.no_grad():
        for module in net.modules():  # non-trivial BatchNorm statistics, so folding is exercised
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return post_training_quantize(net, [images[:16], images[16:32]]).eval()


@needs_tflite
def test_int8_tflite_is_full_integer_and_carries_the_fake_quant_scales(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from dms_lightning.export.encodings import encodings_from_qdq_onnx
    from dms_lightning.export.qdq import export_qdq_onnx
    from dms_lightning.export.tflite import check_tflite_parity, export_tflite_model, read_tflite_metadata
    from dms_lightning.export.tflite_int8 import compare_with_encodings, float_operators

    images = torch.randn(64, 3, 16, 16)
    int8 = _int8_network(images)
    path, form = export_tflite_model(int8, images[:1], tmp_path / "m8.tflite", precision="int8", io="int8",
                                     calibration=images[:32])
    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    assert float_operators(path) == []  # every operator runs in integers
    kernels = {op["op_name"] for op in interpreter._get_ops_details()}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "HARD_SWISH", "FULLY_CONNECTED", "MAX_POOL_2D"} <= kernels
    result = check_tflite_parity(int8, path, images, atol=None, min_top1_agreement=0.0)[0]
    assert result.top1_agreement >= 0.95, result.describe()

    # Every encoding of the network's INT8 QDQ export (what the Qualcomm bundle carries) is in the file ...
    encodings = encodings_from_qdq_onnx(export_qdq_onnx(int8, images[:1], tmp_path / "q.onnx"))
    scales = compare_with_encodings(path, encodings, form.exceptions)
    assert scales["activation_encodings"] >= 5 and scales["weight_encodings"] == 5
    assert scales["activation_encodings_missing"] == [] and scales["weight_encodings_missing"] == []
    # ... and each int8 activation of the file that is not an encoding is one the export lists, with its reason.
    assert scales["tflite_activations_not_in_encodings"] > 0 and scales["tflite_activations_unexplained"] == []
    assert {e["source"] for e in form.exceptions} == {"calibrated at export", "fixed range"}
    assert all(e["reason"] for e in form.exceptions)
    listed = json.loads(read_tflite_metadata(path)["int8_scales"])
    assert listed["fixed range"] == ["gate (middle)"] and listed["carried"] == form.carried


@needs_tflite
@pytest.mark.parametrize("io, dtype", [("float", np.float32), ("uint8", np.uint8)])
def test_int8_tflite_input_and_output_type_and_nhwc_layout(tmp_path, io, dtype):
    from ai_edge_litert.interpreter import Interpreter

    from dms_lightning.export.tflite import check_tflite_parity, export_tflite

    images = torch.randn(32, 3, 16, 16)
    int8 = _int8_network(images)
    path = export_tflite(int8, images[:1], tmp_path / f"m_{io}.tflite", precision="int8", io=io, layout="NHWC",
                         calibration=images)
    feed = Interpreter(model_path=str(path)).get_input_details()[0]
    assert feed["dtype"] == dtype and list(feed["shape"]) == [1, 16, 16, 3]
    if io == "uint8":  # the same grid as int8, shifted by 128
        assert 0 <= feed["quantization"][1] <= 255
    assert check_tflite_parity(int8, path, images, atol=None, min_top1_agreement=0.9)[0].passed


def test_int8_tflite_refuses_a_float_network_and_16_bit_activations(tmp_path):
    from dms_lightning.export.tflite_int8 import integer_network
    from dms_lightning.quant.calibration import post_training_quantize
    from dms_lightning.quant.prepare import QuantizationConfig

    with pytest.raises(ValueError, match="not fake-quantized"):
        integer_network(_cnn(), torch.zeros(1, 3, 8, 8))
    images = torch.randn(8, 3, 16, 16)
    wide = post_training_quantize(_cnn(), [images], QuantizationConfig(precision={"3": "w8a16"}))
    with pytest.raises(ValueError, match="16-bit"):
        integer_network(wide, images)
    with pytest.raises(ValueError, match="io='int8' needs precision='int8'"):
        from dms_lightning.export.tflite import export_tflite

        export_tflite(_cnn(), images[:1], tmp_path / "x.tflite", io="int8")


@needs_tflite
def test_tflite_export_int8_after_ptq_carries_the_qualcomm_bundle_encodings(tmp_path):
    from test_export_callbacks import TinyClassifier, _datamodule, _trainer

    from dms_lightning.callbacks import CompressionReport, PostTrainingQuantization, SNPEExport, TFLiteExport
    from dms_lightning.export.manifest import read_manifest
    from dms_lightning.export.tflite_int8 import compare_with_encodings

    torch.manual_seed(0)
    export = tmp_path / "export"
    report = CompressionReport(output_dir=str(tmp_path / "report"), print_table=False, progress_bar=False,
                               log_to_tensorboard=False, latency_runs=5, warmup_runs=1)
    callbacks = [PostTrainingQuantization(calibration_batches=1, evaluate_batches=1, min_agreement=0.0, export=False),
                 SNPEExport(dirpath=str(export), checkpoint="last", calibration_images=4),
                 TFLiteExport(dirpath=str(export), name="tiny", checkpoint="last", io="int8", parity_images=16,
                              calibration_images=16, latency_runs=5, int8_min_top1_agreement=0.9), report]
    trainer = _trainer(tmp_path, callbacks, epochs=1)
    trainer.fit(TinyClassifier(in_channels=3), _datamodule(channels=3))
    # default precisions of a fake-quantized network: the float files and the INT8 one
    assert sorted(p.name for p in export.glob("*.tflite")) == ["tiny_fp16.tflite", "tiny_fp32.tflite",
                                                               "tiny_int8.tflite"]
    scales = compare_with_encodings(export / "tiny_int8.tflite",
                                    json.loads((export / "snpe_bundle" / "encodings.json").read_text()))
    assert scales["activation_encodings"] > 0 and scales["weight_encodings"] == 3
    assert scales["activation_encodings_missing"] == [] and scales["weight_encodings_missing"] == []
    entry = next(a for a in read_manifest(export)["artifacts"] if a["name"] == "tiny_int8_tflite")
    assert entry["parity"]["passed"] and entry["io"] == "int8" and entry["metadata"]["io"] == "int8"
    assert entry["int8_scales"]["encodings"]["activation_encodings_missing"] == []
    assert entry["int8_scales"]["encodings"]["tflite_activations_unexplained"] == []
    assert entry["parity"]["reference"] == "pytorch fake-quant" and entry["latency_ms_p50"] > 0
    assert entry["parity"]["min_top1_agreement"] == 0.9  # the INT8 bar, not the float files' 0.99
    fp32 = next(a for a in read_manifest(export)["artifacts"] if a["name"] == "tiny_fp32_tflite")
    assert fp32["parity"]["min_top1_agreement"] == 0.99
    # The report measures each file in the LiteRT interpreter like any other variant: accuracy, per class, latency.
    rows = {row.name: row for row in report.report.rows}
    assert {"tiny_fp32_tflite", "tiny_int8_tflite"} <= set(rows)
    assert rows["tiny_int8_tflite"].accuracy is not None and rows["tiny_int8_tflite"].latency_ms_p50 > 0
    assert rows["tiny_int8_tflite"].info["runtime"] == "litert" and rows["tiny_int8_tflite"].per_class
    matrix = (tmp_path / "report" / "parity_matrix.md").read_text()
    assert matrix.count("tiny_int8_tflite") == 1 and "pytorch fake-quant" in matrix


def test_tflite_export_can_skip_when_the_extra_is_missing(tmp_path, monkeypatch):
    import dms_lightning.export.tflite as tflite

    monkeypatch.setattr(tflite, "tflite_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"dms_lightning\[tflite\]"):
        tflite.TFLiteExport()
    with pytest.warns(UserWarning, match="no .tflite file will be written"):
        callback = tflite.TFLiteExport(dirpath=str(tmp_path), skip_if_unavailable=True)
    assert callback.export(None, None) == {} and list(tmp_path.iterdir()) == []


@needs_tflite
def test_fp16_tflite_of_a_model_whose_weights_sit_after_the_flatbuffer_keeps_them(tmp_path):
    # Over 256 KB of float16 weights, ai-edge-quantizer stores them after the flatbuffer (Buffer.offset); adding
    # our metadata used to repack the model without them ("Constant buffer ... out of range offset").
    from dms_lightning.export.tflite import check_tflite_parity, export_tflite, read_tflite_metadata

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 40),
                        nn.ReLU(), nn.Linear(40, 5)).eval()
    images = torch.randn(8, 3, 16, 16)
    path = export_tflite(net, images[:1], tmp_path / "wide16.tflite", precision="fp16", metadata={"k": "v"})
    assert read_tflite_metadata(path)["k"] == "v"
    assert check_tflite_parity(net, path, images, atol=5e-2, min_top1_agreement=0.99)[0].passed


@needs_tflite
def test_int8_tflite_of_an_every_tensor_network_needs_no_export_time_range(tmp_path):
    from dms_lightning.export.tflite import check_tflite_parity, export_tflite_model
    from dms_lightning.quant.calibration import post_training_quantize
    from dms_lightning.quant.prepare import QuantizationConfig

    images = torch.randn(48, 3, 16, 16)
    torch.manual_seed(0)
    int8 = post_training_quantize(_SqueezeNet().eval(), [images[:16], images[16:32]],
                                  QuantizationConfig(placement="every_tensor")).eval()
    path, form = export_tflite_model(int8, images[:1], tmp_path / "all.tflite", precision="int8",
                                     calibration=images[:32])
    # Only hardsigmoid's x/6 tensor, on its input's grid divided by 6: the integer model rounds where the
    # fake-quant network does, so its logits stay within about one output step of the fake-quant ones.
    assert [e["source"] for e in form.exceptions] == ["exact from the input grid"]
    assert check_tflite_parity(int8, path, images, atol=None, min_top1_agreement=0.99)[0].passed


@needs_tflite
def test_integer_form_rounds_hardsigmoid_once_as_the_fake_quant_network_does():
    from dms_lightning.export.tflite_int8 import ExactHardsigmoid, IntegerHardsigmoid, integer_network
    from dms_lightning.quant.calibration import post_training_quantize
    from dms_lightning.quant.prepare import QuantizationConfig

    images = torch.randn(64, 3, 16, 16)
    torch.manual_seed(0)
    int8 = post_training_quantize(_SqueezeNet().eval(), [images[:32]],
                                  QuantizationConfig(placement="every_tensor")).eval()
    form = integer_network(int8, images[:32])
    gates = [m for m in form.network.modules() if isinstance(m, ExactHardsigmoid)]
    assert len(gates) == 1 and not any(isinstance(m, IntegerHardsigmoid) for m in form.network.modules())
    with torch.no_grad():
        grid = gates[0].sixth_of_input  # every value of the gate's input grid, from its lowest to its highest
        x = 6 * grid.scale * (torch.arange(grid.quant_min, grid.quant_max + 1.0) - grid.zero_point)
        torch.testing.assert_close(gates[0](x).clamp(0, 1), nn.functional.hardsigmoid(x), rtol=0, atol=1e-6)
        # so the integer form computes what the fake-quant network computes, tensor for tensor
        torch.testing.assert_close(form.network(images), int8(images), rtol=0, atol=1e-4)


@needs_tflite
def test_tflite_export_of_a_plain_lightning_module_after_qat(tmp_path):
    """Someone's own LightningModule: no ``compression_target``, the network a child attribute, QAT wraps that
    child. The float files come from the child's float network, the INT8 one from the fake-quant twin."""
    from lightning.pytorch import LightningModule
    from test_export_callbacks import _datamodule, _trainer

    from dms_lightning.callbacks import QuantizationAwareTraining, TFLiteExport
    from dms_lightning.export.manifest import read_manifest
    from dms_lightning.export.tflite import tflite_outputs

    class Project(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _cnn().train()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    export = tmp_path / "export"
    callbacks = [QuantizationAwareTraining(start_epoch=0, export=False),
                 TFLiteExport(dirpath=str(export), name="own", checkpoint="last", parity_images=16,
                              calibration_images=16, latency_runs=0, int8_min_top1_agreement=0.9)]
    module = Project()
    _trainer(tmp_path, callbacks, epochs=1).fit(module, _datamodule(channels=3))

    assert sorted(p.name for p in export.glob("*.tflite")) == ["own_fp16.tflite", "own_fp32.tflite", "own_int8.tflite"]
    assert all(a["parity"]["passed"] for a in read_manifest(export)["artifacts"])
    # the FP32 file is the float network with the trained weights, not an untrained or fake-quantized copy
    from dms_lightning.quant import float_model

    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = float_model(module.net).eval()(images).numpy()
    assert np.abs(tflite_outputs(export / "own_fp32.tflite", images.numpy()) - expected).max() < 1e-4


@needs_tflite
@pytest.mark.parametrize("quantizer", ["qat", "ptq"])
def test_exporters_say_why_the_best_checkpoint_gives_no_int8_file(tmp_path, quantizer):
    """TinyClassifier's best epoch is always epoch 0: before QAT starts, and with PTQ every checkpoint is float."""
    from test_export_callbacks import TinyClassifier, _datamodule, _trainer

    from dms_lightning.callbacks import ONNXExport, PostTrainingQuantization, QuantizationAwareTraining, TFLiteExport

    torch.manual_seed(0)
    export = tmp_path / "export"
    quantize = (QuantizationAwareTraining(start_epoch=1, export=False) if quantizer == "qat" else
                PostTrainingQuantization(calibration_batches=1, evaluate_batches=1, min_agreement=0.0, export=False))
    callbacks = [quantize, ONNXExport(dirpath=str(export), name="tiny", parity_batches=1),
                 TFLiteExport(dirpath=str(export), name="tiny", parity_images=8, latency_runs=0)]
    why = "PostTrainingQuantization quantizes when fit ends" if quantizer == "ptq" else "it predates quantization-aware"
    with pytest.warns(UserWarning, match=rf"ONNXExport: the best checkpoint .* holds the float network: {why}") as seen:
        _trainer(tmp_path, callbacks, epochs=2).fit(TinyClassifier(in_channels=3), _datamodule(channels=3))
    assert any(re.search(rf"TFLiteExport: the best checkpoint .* float network: {why}.*checkpoint='last'", str(w.message))
               for w in seen)
    # what was written is what the warning says: float files only
    assert sorted(p.name for p in export.glob("*.tflite")) == ["tiny_fp16.tflite", "tiny_fp32.tflite"]
    assert not list(export.glob("*int8*.onnx"))


_RUN_WITH_XNNPACK = """
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1])  # LiteRT's default CPU path: the XNNPACK delegate
interpreter.allocate_tensors()
details = interpreter.get_input_details()[0]
interpreter.set_tensor(details["index"], np.zeros(details["shape"], details["dtype"]))
interpreter.invoke()
print("ran")
"""


def _switched_off_squeeze_excitation_file(tmp_path) -> Path:
    from dms_lightning.export.tflite import export_tflite_model
    from dms_lightning.quant.calibration import post_training_quantize

    torch.manual_seed(0)
    images = torch.randn(32, 3, 16, 16)
    net = _SqueezeNet().eval()
    with torch.no_grad():
        net.se_fc1.weight.mul_(10.0)  # a wide input x weight range ...
        net.se_fc1.bias.fill_(-500.0)  # ... but every pre-activation negative: the ReLU output is always 0
    int8 = post_training_quantize(net, [images[:16], images[16:]]).eval()
    path, _ = export_tflite_model(int8, images[:1], tmp_path / "dead_se.tflite", precision="int8", io="int8",
                                  calibration=images)
    return path


@needs_tflite
def test_int8_tflite_with_a_switched_off_squeeze_excitation_runs_in_litert_default_cpu_path(tmp_path):
    """Reproduces a main-job crash: training had switched off one squeeze-excitation block of the student (its ReLU
    output always 0), its observed range was ~2e-5 wide, the INT8 file's scale 7e-8; XNNPACK refuses a convolution
    whose input x weight / output scale reaches 256, and LiteRT 2.3 died of a double free instead of falling back.
    Activations are now quantized over at least MIN_ACTIVATION_RANGE, as SNPE's quantizer does."""
    import subprocess
    import sys

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from dms_lightning.export.tflite_int8 import xnnpack_refusals
    from dms_lightning.quant.fake_quant import MIN_ACTIVATION_RANGE

    path = _switched_off_squeeze_excitation_file(tmp_path)
    reference = Interpreter(model_path=str(path),
                            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    scales = [float(t["quantization_parameters"]["scales"][0]) for t in reference.get_tensor_details()
              if t["dtype"] == np.int8 and len(t["quantization_parameters"]["scales"]) == 1]
    assert min(scales) >= MIN_ACTIVATION_RANGE / 255 * (1 - 1e-6)
    assert xnnpack_refusals(path) == []

    run = subprocess.run([sys.executable, "-c", _RUN_WITH_XNNPACK, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "ran" in run.stdout, run.stderr[-2000:]


@needs_tflite
def test_a_file_xnnpack_would_refuse_is_named_instead_of_crashing_the_process(tmp_path, monkeypatch):
    from dms_lightning.export.tflite import LiteRTModel
    from dms_lightning.export.tflite_int8 import xnnpack_refusals

    monkeypatch.setattr("dms_lightning.quant.fake_quant.MIN_ACTIVATION_RANGE", 0.0)  # the scales before the floor
    path = _switched_off_squeeze_excitation_file(tmp_path)
    refused = xnnpack_refusals(path)
    assert len(refused) == 1 and "se_act" in refused[0] and "CONV_2D" in refused[0]
    with pytest.raises(ValueError, match=r"dead_se.tflite: XNNPACK, LiteRT's default CPU delegate, refuses 1 "):
        LiteRTModel(path)  # before: the process died here (double free)
