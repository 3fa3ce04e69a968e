"""Quantization, torch only: fake-quant modules on core torch ops, BatchNorm folding, QAT and PTQ callbacks.

Public API::

    from dms_lightning.quant import prepare_qat, QuantizationConfig
    from dms_lightning.quant import post_training_quantize, CalibrationConfig   # PTQ without a Trainer
    from dms_lightning.callbacks import QuantizationAwareTraining, PostTrainingQuantization

Nothing here writes a file: the fake-quantized network flows down to ``dms_lightning.export``
(``export_qdq_onnx``, ``export_int8``, ``encodings_from_qdq_onnx``), which never imports quantization back.

Importing this package registers the checkpoint restorer (order 20, after pruning's 10) that re-applies
fake-quant wrappers to a freshly built model before a QAT checkpoint's weights load.
"""

from __future__ import annotations

from torch import nn

from dms_lightning.quant.calibration import calibrate, post_training_quantize
from dms_lightning.quant.observers import CalibrationConfig
from dms_lightning.quant.prepare import QuantizationConfig, float_model, is_quantized, prepare_qat
from dms_lightning.quant.spec import QuantSpec
from dms_lightning.utils.checkpoint import register_architecture_restorer

CHECKPOINT_RECORD = "quantization"


def _restore_quantization(pl_module: nn.Module, record: dict) -> None:
    from dms_lightning.quant.target import dequantize_target, quantize_target, target_is_quantized

    if record.get("active") and not target_is_quantized(pl_module):
        quantize_target(pl_module, QuantizationConfig.from_dict(record["config"]))
    elif not record.get("active") and target_is_quantized(pl_module):
        # A checkpoint from before QAT started (e.g. test(ckpt_path="best") chose it): back to float.
        dequantize_target(pl_module)


register_architecture_restorer(CHECKPOINT_RECORD, _restore_quantization, order=20)


__all__ = ["CHECKPOINT_RECORD", "CalibrationConfig", "QuantSpec", "QuantizationConfig", "calibrate", "prepare_qat",
           "post_training_quantize", "is_quantized", "float_model"]
