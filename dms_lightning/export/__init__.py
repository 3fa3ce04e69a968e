"""Export: ONNX (FP32 and INT8 QDQ) with parity checks, and Qualcomm SNPE/QNN deploy bundles."""

from dms_lightning.export.onnx_export import export_onnx

__all__ = ["export_onnx"]
