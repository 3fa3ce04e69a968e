"""The report's numbers against independent measurements: plain onnxruntime, torch-side counts, the files."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassF1Score

from dms_lightning import DMSDataModule
from dms_lightning.export import export_onnx
from dms_lightning.report import MeasureSettings, build_report, count_onnx_macs, count_parameters, measure_onnx
from dms_lightning.report.plots import pareto_front, save_pareto_plots
from dms_lightning.report.tables import write_tables
from dms_lightning.utils.artifacts import Variant

IMAGE_SIZE = 32
FAST = MeasureSettings(threads=1, warmup_runs=2, latency_runs=25, throughput_batch=8, throughput_runs=3)


class SmallConvNet(nn.Module):
    """Conv-BN-ReLU, depthwise and pointwise convs, pooling and a Linear head: the layer types we count."""

    def __init__(self, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, groups=width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def torch_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of Conv2d / Linear counted from the actual output tensors of a PyTorch forward pass."""
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] \
                * module.kernel_size[1]
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(example)
    for handle in handles:
        handle.remove()
    return total


@pytest.fixture(scope="module")
def small_net() -> nn.Module:
    """Trained for a few steps, so its predictions spread over several classes (a real F1 to compare)."""
    torch.manual_seed(0)
    net = SmallConvNet()
    dm = DMSDataModule(image_size=IMAGE_SIZE, train_size=64, val_size=8, test_size=8, batch_size=32, augment=False)
    batches = list(dm.train_dataloader())
    optimizer = torch.optim.Adam(net.parameters(), lr=0.03)
    for step in range(10):
        images, labels = batches[step % len(batches)]
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def onnx_files(small_net, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("report_models")
    wide = SmallConvNet(width=24).eval()
    example = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return {
        "small": str(export_onnx(small_net, example, root / "small.onnx")),
        "wide": str(export_onnx(wide, example, root / "wide.onnx")),
        "static": str(export_onnx(small_net, example, root / "static.onnx", dynamic_batch=False)),
    }


@pytest.fixture(scope="module")
def test_loader():
    dm = DMSDataModule(image_size=IMAGE_SIZE, train_size=8, val_size=8, test_size=40, batch_size=16, augment=False)
    return dm.test_dataloader()


@pytest.fixture(scope="module")
def two_variant_report(onnx_files, test_loader):
    variants = [Variant("wide", onnx_files["wide"]), Variant("small", onnx_files["small"], producer="test")]
    return build_report(variants, test_loader, baseline="wide", settings=FAST)


def test_accuracy_f1_and_size_match_plain_onnxruntime(onnx_files, test_loader):
    row = measure_onnx(onnx_files["small"], test_loader, settings=FAST)

    session = ort.InferenceSession(onnx_files["small"], providers=["CPUExecutionProvider"])
    logits, labels = [], []
    for images, targets in test_loader:
        logits.append(session.run(None, {"input": images.numpy()})[0])
        labels.append(targets.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    f1 = MulticlassF1Score(num_classes=5, average="macro")(torch.from_numpy(logits), torch.from_numpy(labels))

    assert len(np.unique(logits.argmax(1))) > 1, "test precondition: predictions spread over classes"
    assert row.test_samples == len(labels) == 40
    assert row.accuracy == float((logits.argmax(1) == labels).mean())
    assert row.macro_f1 == pytest.approx(float(f1), abs=1e-6)
    assert row.file_size_bytes == len(open(onnx_files["small"], "rb").read())


def test_parameters_match_torch_count_with_batchnorm_folded(small_net, onnx_files):
    bn = small_net.features[1]
    # The exporter folds BN into the bias-less conv before it: BN's 2·C parameters become C bias values.
    expected = sum(p.numel() for p in small_net.parameters()) - bn.num_features

    assert count_parameters(onnx.load(onnx_files["small"])) == expected


def test_macs_match_torch_forward_hook_count(small_net, onnx_files):
    example = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)

    assert count_onnx_macs(onnx.load(onnx_files["small"])) == torch_macs(small_net, example)
    assert count_onnx_macs(onnx.load(onnx_files["small"]), batch_size=4) == 4 * torch_macs(small_net, example)


def test_int8_qdq_model_counts_float_equivalent_parameters_and_macs(onnx_files, test_loader, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": images.numpy()} for images, _ in test_loader])

        def get_next(self):
            return next(self.batches, None)

    int8_path = tmp_path / "small_int8.onnx"
    quantize_static(onnx_files["small"], str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    fp32, int8 = onnx.load(onnx_files["small"]), onnx.load(str(int8_path))
    row = measure_onnx(int8_path, test_loader, settings=FAST)

    assert any(node.op_type == "DequantizeLinear" for node in int8.graph.node)
    assert row.precision == "int8"
    assert row.parameters == count_parameters(fp32)
    assert row.macs == count_onnx_macs(fp32)
    assert row.quantized_weight_fraction > 0.9
    # INT8 accuracy is also given for the QDQ graph's own arithmetic, recomputed here independently.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    hits = [(session.run(None, {"input": x.numpy()})[0].argmax(1) == y.numpy()) for x, y in test_loader]
    assert row.info["accuracy_qdq_graph"] == pytest.approx(float(np.concatenate(hits).mean()))
    assert any("QDQ graph" in note for note in row.notes)


def test_latency_percentiles_are_ordered_and_machine_recorded(two_variant_report):
    for row in two_variant_report.rows:
        assert 0 < row.latency_ms_p50 <= row.latency_ms_p90 <= row.latency_ms_p99
        assert row.latency_runs == FAST.latency_runs and row.latency_batch == 1
        assert row.throughput_batch == FAST.throughput_batch and row.throughput_images_per_s > 0
    machine = two_variant_report.machine
    assert machine["onnxruntime"] == ort.__version__
    assert machine["intra_op_threads"] == 1 and machine["logical_cores"] >= 1 and machine["cpu_model"]


def test_ratios_and_accuracy_delta_are_against_the_baseline(two_variant_report):
    base, small = two_variant_report.row("wide"), two_variant_report.row("small")

    assert base.size_ratio == base.speedup == 1.0 and base.accuracy_delta_pt == 0.0
    assert small.size_ratio == pytest.approx(base.file_size_bytes / small.file_size_bytes)
    assert small.macs_ratio == pytest.approx(base.macs / small.macs) and small.macs_ratio > 1
    assert small.speedup == pytest.approx(base.latency_ms_p50 / small.latency_ms_p50)
    assert small.accuracy_delta_pt == pytest.approx(100 * (small.accuracy - base.accuracy))
    assert small.baseline == "wide"


def test_static_batch_model_is_measured_at_batch_one_and_says_so(onnx_files, test_loader):
    row = measure_onnx(onnx_files["static"], test_loader, settings=FAST)
    dynamic = measure_onnx(onnx_files["small"], test_loader, settings=FAST)

    assert row.static_batch and row.latency_batch == 1 and row.throughput_batch == 1
    assert any("static batch 1" in note for note in row.notes)
    # Fed one image at a time, the static graph classifies exactly like the dynamic one.
    assert row.accuracy == dynamic.accuracy and row.test_samples == 40


def test_report_files_are_written_and_parseable(two_variant_report, tmp_path):
    written = write_tables(two_variant_report, tmp_path)
    plots = save_pareto_plots(two_variant_report, tmp_path)

    data = json.loads(written["json"].read_text())
    assert data["baseline"] == "wide" and [v["name"] for v in data["variants"]] == ["wide", "small"]
    assert data["machine"]["intra_op_threads"] == 1
    rows = list(csv.DictReader(written["csv"].open()))
    assert [r["name"] for r in rows] == ["wide", "small"]
    assert float(rows[1]["size_ratio"]) == pytest.approx(two_variant_report.row("small").size_ratio)
    markdown = written["markdown"].read_text()
    assert "| variant |" in markdown and "small" in markdown and "onnxruntime" in markdown
    assert set(plots) == {"size", "latency"}
    for path in plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.partial"))


def test_pareto_front_keeps_only_undominated_variants():
    # (size, accuracy): the 6 MB / 70 % model is beaten by the 5 MB / 80 % one.
    points = [(45.0, 94.2), (12.0, 93.8), (6.0, 70.0), (5.0, 80.0), (1.0, 50.0)]

    assert pareto_front(points) == [0, 1, 3, 4]


def test_accuracy_pass_runs_on_its_own_thread_count_with_the_same_result(onnx_files, test_loader, monkeypatch):
    import dataclasses

    from dms_lightning.report import measure

    opened = []
    original = measure.open_session
    monkeypatch.setattr(measure, "open_session",
                        lambda path, threads=1, fuse_qdq=True: opened.append(threads) or original(path, threads, fuse_qdq))
    one = measure_onnx(onnx_files["small"], test_loader, settings=dataclasses.replace(FAST, accuracy_threads=1))
    assert opened == [1], "with accuracy_threads == threads the latency session is reused"
    two = measure_onnx(onnx_files["small"], test_loader, settings=dataclasses.replace(FAST, accuracy_threads=2))

    assert opened == [1, 1, 2]  # latency / throughput on `threads`, the accuracy pass on its own session
    assert two.info["confusion_matrix"] == one.info["confusion_matrix"]
    assert (two.accuracy, two.macro_f1) == (one.accuracy, one.macro_f1)


def test_invalid_measure_settings_name_the_field():
    with pytest.raises(ValueError, match="accuracy_threads=0"):
        MeasureSettings(accuracy_threads=0)
    with pytest.raises(ValueError, match="threads=0"):
        MeasureSettings(threads=0)
    with pytest.raises(ValueError, match="max_test_batches"):
        MeasureSettings(max_test_batches=0)
