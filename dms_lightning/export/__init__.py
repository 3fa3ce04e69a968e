"""Export: ONNX (FP32, FP16 and INT8 QDQ) with parity checks, and Qualcomm SNPE/QNN deploy bundles.

Callbacks (``dms_lightning.callbacks.ONNXExport`` / ``.SNPEExport``) are imported lazily from
:mod:`dms_lightning.export.callbacks` and :mod:`dms_lightning.export.snpe`; the functions below work
without a Trainer.
"""

from dms_lightning.export.calibration import read_raw, to_nhwc, write_calibration_raws
from dms_lightning.export.fp16 import export_fp16_onnx
from dms_lightning.export.encodings import check_encodings_coverage, encodings_from_qdq_onnx
from dms_lightning.export.manifest import read_manifest, update_manifest
from dms_lightning.export.onnx_export import DEFAULT_OPSET, UnsupportedOperatorError, export_onnx
from dms_lightning.export.parity import ParityError, ParityResult, check_parity
from dms_lightning.export.qdq import fake_quant_disabled, has_qdq, make_static_batch, strip_qdq

__all__ = [
    "DEFAULT_OPSET", "ParityError", "ParityResult", "UnsupportedOperatorError", "check_encodings_coverage",
    "check_parity", "encodings_from_qdq_onnx", "export_fp16_onnx", "export_onnx", "fake_quant_disabled", "has_qdq",
    "make_static_batch", "read_manifest", "read_raw", "strip_qdq", "to_nhwc", "update_manifest",
    "write_calibration_raws",
]
