"""LiteRT / TFLite export: FP32 and FP16 files, NHWC input, metadata, parity in the LiteRT interpreter."""

from __future__ import annotations

import json
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
                            layout="NHWC", parity_images=16)
    trainer = _trainer(tmp_path, [callback], epochs=1)
    trainer.fit(TinyClassifier(in_channels=3, fake_quant=True), _datamodule(channels=3))
    assert [p.name for p in (tmp_path / "export").glob("*.tflite")] == ["tiny_fp32.tflite"]
    entry = next(a for a in read_manifest(tmp_path / "export")["artifacts"] if a["name"] == "tiny_fp32_tflite")
    assert entry["parity"]["passed"] and entry["parity"]["max_abs_diff"] <= 1e-4
    assert entry["layout"] == "NHWC" and json.loads(entry["metadata"]["class_names"])[1] == "eyes_closed"


def test_tflite_export_validates_its_arguments_and_names_the_extra():
    from dms_lightning.export.tflite import TFLiteExport, export_tflite

    with pytest.raises(ValueError, match="TFLiteExport.layout='CHW'"):
        TFLiteExport(layout="CHW")
    with pytest.raises(ValueError, match=r"TFLiteExport.precisions=\['int4'\]"):
        TFLiteExport(precisions=["int4"])
    with pytest.raises(ValueError, match="precision='bf16'"):
        export_tflite(_cnn(), torch.zeros(1, 3, 8, 8), Path("unused.tflite"), precision="bf16")
    if not tflite_available():
        with pytest.raises(ModuleNotFoundError, match=r"dms_lightning\[tflite\]"):
            TFLiteExport()
