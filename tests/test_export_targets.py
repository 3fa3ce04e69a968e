"""Deployment targets beyond FP32 / INT8 ONNX: FP16 ONNX, the Triton model repository, TensorRT commands."""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_export_callbacks import TinyClassifier, _datamodule, _trainer
from torch import nn

from dms_lightning.callbacks import CompressionReport, ONNXExport, TensorRTExport, TritonExport
from dms_lightning.export.fp16 import check_fp16_parity, export_fp16_onnx, float16_fraction, onnx_input_dtype
from dms_lightning.export.manifest import read_manifest
from dms_lightning.export.triton import TritonSettings, triton_config_text, write_triton_repository
from dms_lightning.utils.artifacts import variants


def _cnn(width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.Hardswish(),
                         nn.Conv2d(width, width, 3, padding=1, groups=width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, 5)).eval()


@pytest.fixture(scope="module")
def targets_run(tmp_path_factory):
    """One fit of a fake-quant network exported in FP32, INT8 and FP16."""
    tmp = tmp_path_factory.mktemp("targets")
    torch.manual_seed(0)
    module, datamodule = TinyClassifier(in_channels=3, fake_quant=True), _datamodule(channels=3)
    onnx_export = ONNXExport(name="tiny", export_fp16=True, checkpoint="last")
    triton = TritonExport(max_batch_size=16, preferred_batch_sizes=[4, 8], max_queue_delay_microseconds=200,
                          instance_count=2, instance_kind="KIND_CPU")
    tensorrt = TensorRTExport(min_batch=1, opt_batch=4, max_batch=16)
    report = CompressionReport(output_dir=str(tmp / "report"), baseline="tiny_fp32", print_table=False,
                               progress_bar=False, log_to_tensorboard=False, warmup_runs=2, latency_runs=10,
                               throughput_runs=2)
    trainer = _trainer(tmp, [onnx_export, triton, tensorrt, report])
    trainer.fit(module, datamodule)
    return dict(trainer=trainer, module=module, datamodule=datamodule, dir=Path(trainer.log_dir) / "export",
                report=tmp / "report")


def test_fp16_export_stores_every_weight_in_half_precision_and_matches_pytorch(tmp_path):
    net, images = _cnn(), torch.randn(16, 3, 24, 24)
    fp32 = tmp_path / "m32.onnx"
    from dms_lightning.export import export_onnx

    export_onnx(net, images[:1], fp32)
    path = export_fp16_onnx(net, images[:1], tmp_path / "m16.onnx")
    assert float16_fraction(path) == 1.0 and float16_fraction(fp32) == 0.0
    assert onnx_input_dtype(path) == "float32"
    assert onnx.load(str(path)).graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert path.stat().st_size < 0.6 * fp32.stat().st_size
    result, reference, candidate = check_fp16_parity(net, path, images)
    assert result.passed and result.max_abs_diff < 1e-2 and result.max_abs_diff > 0  # really half precision
    assert next(net.parameters()).dtype == torch.float32  # the caller's model is left float32


def test_fp16_export_with_half_precision_io_takes_float16_input(tmp_path):
    net, images = _cnn(), torch.randn(4, 3, 24, 24)
    path = export_fp16_onnx(net, images[:1], tmp_path / "m16.onnx", io_dtype="float16")
    model = onnx.load(str(path))
    assert onnx_input_dtype(model) == "float16"
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert check_fp16_parity(net, path, images)[0].top1_agreement == 1.0


def test_fp16_export_rejects_an_unknown_io_dtype(tmp_path):
    with pytest.raises(ValueError, match="io_dtype='bfloat16'"):
        export_fp16_onnx(_cnn(), torch.zeros(1, 3, 8, 8), tmp_path / "m.onnx", io_dtype="bfloat16")
    with pytest.raises(ValueError, match="fp16_io_dtype='int8'"):
        ONNXExport(export_fp16=True, fp16_io_dtype="int8")
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_export_writes_a_parity_checked_fp16_variant_for_the_report(targets_run):
    directory = targets_run["dir"]
    assert {p.name for p in directory.glob("*.onnx")} == {"tiny_fp32.onnx", "tiny_int8.onnx", "tiny_fp16.onnx"}
    registered = {v.name: v for v in variants(targets_run["trainer"])}
    assert registered["tiny_fp16"].precision == "fp16"
    entry = next(a for a in read_manifest(directory)["artifacts"] if a["name"] == "tiny_fp16")
    assert entry["parity"]["passed"] and entry["io_dtype"] == "float32"
    assert entry["metadata"]["precision"] == "fp16" and "class_names" in entry["metadata"]
    assert float16_fraction(directory / "tiny_fp16.onnx") == 1.0
    # The FP16 file is the float network (fake quantization bypassed), not the INT8 one.
    images = next(iter(targets_run["datamodule"].val_dataloader()))[0]
    from dms_lightning.export import fake_quant_disabled

    with fake_quant_disabled():
        assert check_fp16_parity(targets_run["module"].model, directory / "tiny_fp16.onnx", images)[0].passed


_ELEM_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def _assert_config_matches_onnx(config, model: onnx.ModelProto, batched: bool) -> None:
    from tritonclient.grpc import model_config_pb2

    for configured, declared in ((config.input, model.graph.input), (config.output, model.graph.output)):
        assert [t.name for t in configured] == [v.name for v in declared]
        for tensor, value in zip(configured, declared):
            dims = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
            assert list(tensor.dims) == (dims[1:] if batched else dims)
            assert model_config_pb2.DataType.Name(tensor.data_type) == \
                _ELEM_TO_TRITON[value.type.tensor_type.elem_type]


def test_triton_repository_configs_parse_with_tritons_protobuf_and_match_the_onnx_files(targets_run):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient (pip install 'dms_lightning[triton]') ships "
                        "Triton's model-config protobuf")
    from tritonclient.grpc import model_config_pb2

    from dms_lightning.export.triton import parse_triton_config

    repository = targets_run["dir"] / "triton"
    assert sorted(p.name for p in repository.iterdir()) == ["tiny_fp16", "tiny_fp32", "tiny_int8"]
    for folder in repository.iterdir():
        served = folder / "1" / "model.onnx"
        assert served.read_bytes() == (targets_run["dir"] / f"{folder.name}.onnx").read_bytes()
        config = parse_triton_config(folder / "config.pbtxt")
        assert config.name == folder.name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 16
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert config.dynamic_batching.max_queue_delay_microseconds == 200
        assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] \
            == [(2, "KIND_CPU")]
        _assert_config_matches_onnx(config, onnx.load(str(served)), batched=True)
        assert config.output[0].label_filename == "labels.txt"
        assert (folder / "labels.txt").read_text().split() == targets_run["module"].class_names
    entry = next(a for a in read_manifest(targets_run["dir"])["artifacts"] if a["name"] == "triton_repository")
    assert entry["models"] == ["tiny_fp16", "tiny_fp32", "tiny_int8"] and entry["settings"]["max_batch_size"] == 16


def test_triton_config_of_a_static_batch_or_half_precision_io_model_follows_the_graph(tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient ships Triton's model-config protobuf")
    from dms_lightning.export import export_onnx
    from dms_lightning.export.triton import parse_triton_config

    net = _cnn(8)
    static = export_onnx(net, torch.zeros(1, 3, 16, 16), tmp_path / "static.onnx", dynamic_batch=False)
    half = export_fp16_onnx(net, torch.zeros(1, 3, 16, 16), tmp_path / "half.onnx", io_dtype="float16")
    folders = write_triton_repository({"static": static, "half": half}, tmp_path / "repo")
    config = parse_triton_config(folders["static"] / "config.pbtxt")
    # A static batch cannot be batched by the server: shapes served as they are, no scheduler.
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    _assert_config_matches_onnx(config, onnx.load(str(static)), batched=False)
    config = parse_triton_config(folders["half"] / "config.pbtxt")
    assert config.max_batch_size == 32 and list(config.input[0].dims) == [3, 16, 16]
    _assert_config_matches_onnx(config, onnx.load(str(half)), batched=True)


def test_triton_settings_and_model_names_are_validated():
    with pytest.raises(ValueError, match=r"TritonExport.preferred_batch_sizes=\[64\]"):
        TritonExport(max_batch_size=32, preferred_batch_sizes=[64])
    with pytest.raises(ValueError, match="TritonExport.instance_kind='GPU'"):
        TritonExport(instance_kind="GPU")
    with pytest.raises(ValueError, match="TritonExport.precisions='fp32'"):
        TritonExport(precisions="fp32")
    with pytest.raises(ValueError, match="name='../evil'"):
        triton_config_text(onnx.ModelProto(), "../evil", TritonSettings())


FAKE_TRTEXEC = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$RECORD"
for a in "$@"; do
  case "$a" in
    --onnx=*) [ -f "${a#--onnx=}" ] || { echo "missing ${a#--onnx=}" >&2; exit 2; };;
    --loadEngine=*) [ -f "${a#--loadEngine=}" ] || { echo "missing ${a#--loadEngine=}" >&2; exit 2; };;
    --saveEngine=*) touch "${a#--saveEngine=}";;
  esac
done
"""

# A stand-in for the tensorrt module that records what the build script asks of the builder.
FAKE_TENSORRT = """
import json, os
__version__ = "10.3.0"
CALLS = []
def _record(*call):
    CALLS.append(list(call))
    with open(os.environ["RECORD"], "w") as handle:
        json.dump(CALLS, handle)
class Logger:
    WARNING = 2
    def __init__(self, level): pass
class NetworkDefinitionCreationFlag:
    EXPLICIT_BATCH = 0
class BuilderFlag:
    FP16, INT8 = "FP16", "INT8"
class MemoryPoolType:
    WORKSPACE = "WORKSPACE"
class OnnxParser:
    num_errors = 0
    def __init__(self, network, logger): pass
    def parse_from_file(self, path):
        _record("parse", path)
        return os.path.isfile(path)
class _Config:
    def set_memory_pool_limit(self, pool, size): _record("workspace", size)
    def set_flag(self, flag): _record("flag", flag)
    def add_optimization_profile(self, profile): _record("profile", *profile.shapes)
class _Profile:
    def set_shape(self, name, low, opt, high): self.shapes = [name, list(low), list(opt), list(high)]
class Builder:
    def __init__(self, logger): pass
    def create_network(self, flags): return object()
    def create_builder_config(self): return _Config()
    def create_optimization_profile(self): return _Profile()
    def build_serialized_network(self, network, config): return b"engine"
"""


def test_tensorrt_bundle_scripts_are_valid_and_build_explicitly_quantized_engines_with_a_batch_profile(
        targets_run, tmp_path):
    bundle = targets_run["dir"] / "tensorrt"
    assert {p.name for p in bundle.iterdir()} == {"model_fp32.onnx", "model_int8.onnx", "build_engines.sh",
                                                 "build_engines_python.sh", "build_engine.py", "coverage.json"}
    for script in ("build_engines.sh", "build_engines_python.sh"):
        subprocess.run(["bash", "-n", str(bundle / script)], check=True)
    py_compile.compile(str(bundle / "build_engine.py"), cfile=str(tmp_path / "build_engine.pyc"), doraise=True)
    from dms_lightning.export import has_qdq

    assert has_qdq(onnx.load(str(bundle / "model_int8.onnx"))) and not has_qdq(onnx.load(str(bundle / "model_fp32.onnx")))
    # Run the trtexec lines with a trtexec that checks its inputs and writes its outputs.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "trtexec").write_text(FAKE_TRTEXEC)
    (tmp_path / "bin" / "trtexec").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", RECORD=str(tmp_path / "argv"))
    subprocess.run(["bash", str(bundle / "build_engines.sh")], check=True, env=env, capture_output=True)
    builds = [line.split() for line in (tmp_path / "argv").read_text().splitlines() if "--onnx=" in line]
    profile = ["--minShapes=input:1x3x16x16", "--optShapes=input:4x3x16x16", "--maxShapes=input:16x3x16x16"]
    by_engine = {next(a for a in argv if a.startswith("--saveEngine=")).split("=")[1]: argv for argv in builds}
    assert sorted(by_engine) == ["model_fp16.plan", "model_fp32.plan", "model_int8.plan"]
    assert "--onnx=model_int8.onnx" in by_engine["model_int8.plan"]
    assert {"--int8", "--fp16"} <= set(by_engine["model_int8.plan"])  # explicit INT8, FP16 fallback
    assert "--fp16" in by_engine["model_fp16.plan"] and "--int8" not in by_engine["model_fp16.plan"]
    assert not {"--int8", "--fp16"} & set(by_engine["model_fp32.plan"])
    assert all(set(profile) <= set(argv) for argv in builds)
    for engine in by_engine:
        (bundle / engine).unlink()
    # The Python API script asks the builder for the same thing.
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "tensorrt.py").write_text(FAKE_TENSORRT)
    env.update(PYTHONPATH=str(tmp_path / "fake"), RECORD=str(tmp_path / "calls.json"))
    command = next(line for line in (bundle / "build_engines_python.sh").read_text().splitlines() if "int8" in line)
    subprocess.run(["bash", "-c", command.replace("python3", sys.executable, 1)], check=True, env=env,
                   cwd=bundle, capture_output=True)
    calls = json.loads((tmp_path / "calls.json").read_text())
    assert ["parse", "model_int8.onnx"] in calls and ["flag", "INT8"] in calls and ["flag", "FP16"] in calls
    assert ["profile", "input", [1, 3, 16, 16], [4, 3, 16, 16], [16, 3, 16, 16]] in calls
    assert (bundle / "model_int8.plan").read_bytes() == b"engine"
    (bundle / "model_int8.plan").unlink()


def test_tensorrt_bundle_refuses_an_input_name_that_would_reach_the_scripts(tmp_path):
    from dms_lightning.export import export_onnx
    from dms_lightning.export.tensorrt import write_tensorrt_bundle

    path = export_onnx(_cnn(8), torch.zeros(1, 3, 8, 8), tmp_path / "m.onnx", input_name="x;touch pwned")
    with pytest.raises(ValueError, match="input name='x;touch pwned'"):
        write_tensorrt_bundle({"fp32": path}, tmp_path / "tensorrt")
    assert not (tmp_path / "tensorrt").exists()
    with pytest.raises(ValueError, match="TensorRTExport: min_batch=8, opt_batch=4"):
        TensorRTExport(min_batch=8, opt_batch=4)


def _tensorrt_and_gpu() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (its wheels come from NVIDIA's index)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


@pytest.mark.skipif(_tensorrt_and_gpu() is not None, reason=f"TensorRT engine build needs {_tensorrt_and_gpu()}")
def test_tensorrt_builds_a_real_int8_engine_from_the_qdq_model(targets_run):
    bundle = targets_run["dir"] / "tensorrt"
    command = next(line for line in (bundle / "build_engines_python.sh").read_text().splitlines() if "int8" in line)
    subprocess.run(["bash", "-c", command.replace("python3", sys.executable, 1)], check=True, cwd=bundle)
    assert (bundle / "model_int8.plan").stat().st_size > 0


class _WithDeterminant(nn.Module):
    """A classifier that also uses ``torch.linalg.det`` (ONNX ``Det``), which none of the targets runs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _cnn(4)[:-1]

    def forward(self, x):
        features = self.features(x)
        return features + torch.linalg.det(features.reshape(-1, 2, 2)).unsqueeze(1)


def test_coverage_flags_an_operator_each_target_lacks_and_says_what_happens_then(tmp_path):
    from dms_lightning.export import export_onnx
    from dms_lightning.export.coverage import TARGETS, check_coverage

    path = export_onnx(_WithDeterminant().eval(), torch.randn(1, 3, 8, 8), tmp_path / "det.onnx")
    coverage = check_coverage(path)
    assert set(coverage) == set(TARGETS)
    for target, result in coverage.items():
        assert not result.supported and list(result.unsupported) == ["Det"], target
        assert "Det" in result.describe() and result.fallback in result.describe()
    assert "CPU" in coverage["qnn_htp"].fallback and "CPU" in coverage["tflite"].fallback
    # The plain network has nothing any target lacks, and TFLite says which builtins it becomes.
    plain = check_coverage(export_onnx(_cnn(4), torch.randn(1, 3, 8, 8), tmp_path / "plain.onnx"))
    assert all(result.supported for result in plain.values())
    assert plain["tflite"].lowering["Conv"] == "CONV_2D / DEPTHWISE_CONV_2D"


def test_coverage_flags_uint8_activations_with_a_zero_point_for_tensorrt_but_not_for_the_htp(targets_run):
    from dms_lightning.export.coverage import check_coverage

    int8 = check_coverage(targets_run["dir"] / "tiny_int8.onnx")
    assert int8["qnn_htp"].supported and int8["tflite"].supported
    assert not int8["tensorrt"].unsupported and any("uint8" in p for p in int8["tensorrt"].quantization)
    entry = next(a for a in read_manifest(targets_run["dir"])["artifacts"] if a["name"] == "tiny_int8")
    assert entry["coverage"]["qnn_htp"]["supported"] and not entry["coverage"]["tensorrt"]["supported"]
    bundle_coverage = json.loads((targets_run["dir"] / "tensorrt" / "coverage.json").read_text())
    assert bundle_coverage["model_fp32.onnx"]["supported"] and not bundle_coverage["model_int8.onnx"]["supported"]


def test_operator_lists_name_their_source_and_tflite_lowerings_are_real_builtins():
    from dms_lightning.export.coverage import TARGETS, op_support

    for target in TARGETS:
        data = op_support(target)
        assert data["source"].startswith(("https://", "BuiltinOperator")) and data["version"] and data["fallback"]
        assert {"Conv", "Relu", "Gemm", "QuantizeLinear", "DequantizeLinear"} <= set(data["supported"])
    tflite = op_support("tflite")
    lowered = {name for builtins in tflite["lowering"].values() for name in builtins.split(" / ") if name}
    assert lowered <= set(tflite["builtins"]) and len(tflite["builtins"]) > 200
    assert "Det" in op_support("tensorrt")["unsupported"]
    with pytest.raises(ValueError, match="target='coreml'"):
        op_support("coreml")


def test_report_parity_matrix_has_every_variant_in_every_runtime_it_was_checked_in(targets_run):
    from dms_lightning.export.runtimes import openvino_available

    rows = json.loads((targets_run["report"] / "parity_matrix.json").read_text())
    cells = {(r["variant"], r["runtime"]): r for r in rows}
    for variant in ("tiny_fp32", "tiny_fp16", "tiny_int8"):
        assert any(v == variant and "onnxruntime" in runtime for v, runtime in cells), variant
    assert cells[("tiny_fp32", "onnxruntime")]["max_abs_diff"] <= 1e-3
    assert cells[("tiny_fp16", "onnxruntime (fp16 file)")]["top1_agreement"] >= 0.99
    int8 = cells[("tiny_int8", "onnxruntime (QDQ unfused)")]
    assert int8["max_abs_diff"] is None and int8["latency_ms_p50"] > 0 and int8["size_mb"] > 0
    if openvino_available():
        assert ("tiny_fp32", "openvino") in cells and cells[("tiny_fp32", "openvino")]["reference"] == "onnxruntime"
    assert "| tiny_fp16 | fp16 | onnxruntime (fp16 file) | pytorch |" in \
        (targets_run["report"] / "parity_matrix.md").read_text()


def test_parity_matrix_lists_litert_rows_from_the_export_manifest():
    from dms_lightning.report.measure import Report
    from dms_lightning.report.parity_matrix import parity_matrix

    manifest = {"artifacts": [{"name": "student_fp32_tflite", "format": "tflite", "precision": "fp32", "bytes": 2_000_000,
                               "parity": {"runtime": "litert", "reference": "pytorch", "top1_agreement": 1.0,
                                          "max_abs_diff": 3e-5, "samples": 64}}]}
    rows = parity_matrix(Report(rows=[], baseline="", machine={}, settings={}), [manifest])
    assert rows == [{"variant": "student_fp32_tflite", "precision": "fp32", "runtime": "litert", "reference": "pytorch",
                     "top1_agreement": 1.0, "max_abs_diff": 3e-5, "samples": 64, "latency_ms_p50": None,
                     "latency_ms_p99": None, "size_mb": 2.0}]
