"""Export: every file the package writes. ONNX (FP32, FP16 and INT8 QDQ) with parity checks, one metadata
layout, one encodings writer, one INT8 routine, Qualcomm SNPE/QNN deploy bundles, Triton repositories.

Callbacks (``dms_lightning.callbacks.ONNXExport`` / ``.SNPEExport`` / ``.TritonExport``) live in
:mod:`dms_lightning.export.callbacks`, :mod:`dms_lightning.export.snpe` and :mod:`dms_lightning.export.triton`;
the functions below work without a Trainer.
"""

from dms_lightning.export.calibration import read_raw, to_nhwc, write_calibration_raws
from dms_lightning.export.encodings import (
    DEFAULT_ENCODINGS_VERSION,
    ENCODINGS_VERSION,
    ENCODINGS_VERSIONS,
    check_encodings_coverage,
    encodings_from_qdq_model,
    encodings_from_qdq_onnx,
    format_encodings,
    read_encodings,
    write_encodings,
    write_encodings_for_onnx,
)
from dms_lightning.export.fp16 import export_fp16_onnx
from dms_lightning.export.int8 import Int8Export, NotQuantizedError, export_int8
from dms_lightning.export.manifest import read_manifest, update_manifest
from dms_lightning.export.metadata import METADATA_KEYS, onnx_metadata, preprocessing_info, read_metadata
from dms_lightning.export.onnx_export import DEFAULT_OPSET, UnsupportedOperatorError, export_onnx
from dms_lightning.export.parity import ParityError, ParityResult, check_parity
from dms_lightning.export.qdq import export_qdq_onnx, fake_quant_disabled, has_qdq, make_static_batch, strip_qdq

__all__ = [
    "DEFAULT_ENCODINGS_VERSION", "DEFAULT_OPSET", "ENCODINGS_VERSION", "ENCODINGS_VERSIONS", "METADATA_KEYS", "Int8Export", "NotQuantizedError", "ParityError",
    "ParityResult", "UnsupportedOperatorError", "check_encodings_coverage", "check_parity",
    "encodings_from_qdq_model", "encodings_from_qdq_onnx", "export_fp16_onnx", "export_int8", "export_onnx",
    "export_qdq_onnx", "fake_quant_disabled", "format_encodings", "has_qdq", "make_static_batch", "onnx_metadata",
    "preprocessing_info", "read_manifest", "read_metadata", "read_raw", "strip_qdq", "to_nhwc", "update_manifest",
    "read_encodings", "write_calibration_raws", "write_encodings", "write_encodings_for_onnx",
]
