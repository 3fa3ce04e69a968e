"""Deployment targets beyond FP32 / INT8 ONNX: FP16 ONNX, the Triton model repository, TensorRT commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_export_callbacks import TinyClassifier, _datamodule, _trainer
from torch import nn

from dms_lightning.callbacks import ONNXExport, TritonExport
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
    trainer = _trainer(tmp, [onnx_export, triton])
    trainer.fit(module, datamodule)
    return dict(trainer=trainer, module=module, datamodule=datamodule, dir=Path(trainer.log_dir) / "export")


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
