"""Every public Callback of dms_lightning, so configs say ``dms_lightning.callbacks.X``.

Each one also works in a plain Lightning project: it acts on ``pl_module.compression_target`` when the
module defines it (our modules: the classifier network / the distillation student), else on the module.
"""

from __future__ import annotations

import importlib

_LOCATIONS = {
    "BatchNormReestimation": "dms_lightning.models.batchnorm",
    "IterativePruning": "dms_lightning.pruning.callback",
    "QuantizationAwareTraining": "dms_lightning.quant.qat",
    "PostTrainingQuantization": "dms_lightning.quant.ptq",
    "QuantizationSensitivity": "dms_lightning.report.sensitivity",
    "ONNXExport": "dms_lightning.export.callbacks",
    "SNPEExport": "dms_lightning.export.snpe",
    "TritonExport": "dms_lightning.export.triton",
    "TensorRTExport": "dms_lightning.export.tensorrt",
    "TFLiteExport": "dms_lightning.export.tflite",
    "CompressionReport": "dms_lightning.report.callback",
    "PredictionWriter": "dms_lightning.predict",
}

__all__ = list(_LOCATIONS)


def __getattr__(name: str):
    # Imported on first use: a run that only trains does not pay for onnxruntime / torch-pruning imports.
    if name in _LOCATIONS:
        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'dms_lightning.callbacks' has no attribute {name!r}; callbacks: {__all__}")


def __dir__():
    return sorted(__all__)
