"""Quantization, torch only: fake-quant modules on core torch ops, BatchNorm folding, QAT and PTQ callbacks.

Public API::

    from dms_lightning.quant import prepare_qat, QuantizationConfig
    from dms_lightning.quant import post_training_quantize, CalibrationConfig   # PTQ without a Trainer
    from dms_lightning.quant import quantization_sensitivity                      # which quantizers cost accuracy
    from dms_lightning.quant import select_mixed_precision                        # W8A16 where it matters
    from dms_lightning.callbacks import QuantizationAwareTraining, PostTrainingQuantization

Nothing here writes a file: the fake-quantized network flows down to ``dms_lightning.export``
(``export_qdq_onnx``, ``export_int8``, ``encodings_from_qdq_onnx``), which never imports quantization back.

Checkpoints of a fake-quantized network name :class:`~dms_lightning.quant.target.QuantizerWrapping`, which
re-applies the wrappers to a freshly built model (after channel removal) before the weights load.
"""

from __future__ import annotations

from dms_lightning.quant.calibration import calibrate, post_training_quantize
from dms_lightning.quant.mixed_precision import MixedPrecisionResult, select_mixed_precision
from dms_lightning.quant.observers import CalibrationConfig
from dms_lightning.quant.prepare import QuantizationConfig, float_model, is_quantized, prepare_qat
from dms_lightning.quant.sensitivity import SensitivityReport, quantization_sensitivity
from dms_lightning.quant.spec import QuantSpec
from dms_lightning.quant.target import QuantizerWrapping

__all__ = ["CalibrationConfig", "QuantSpec", "QuantizationConfig", "QuantizerWrapping", "calibrate", "prepare_qat",
           "post_training_quantize", "is_quantized", "float_model", "quantization_sensitivity", "SensitivityReport",
           "select_mixed_precision", "MixedPrecisionResult"]
