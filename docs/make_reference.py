"""Regenerate docs/reference.md from the public classes' signatures and docstrings.

    python docs/make_reference.py

tests/test_docs.py fails when the committed file is out of date, so the reference never drifts from the code.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

PUBLIC = [
    ("dms_lightning", "DMSDataModule"),
    ("dms_lightning", "DMSClassifier"),
    ("dms_lightning", "DistillationModule"),
    ("dms_lightning.callbacks", "IterativePruning"),
    ("dms_lightning.callbacks", "QuantizationAwareTraining"),
    ("dms_lightning.callbacks", "PostTrainingQuantization"),
    ("dms_lightning.callbacks", "QuantizationSensitivity"),
    ("dms_lightning.callbacks", "ONNXExport"),
    ("dms_lightning.callbacks", "SNPEExport"),
    ("dms_lightning.callbacks", "TritonExport"),
    ("dms_lightning.callbacks", "TensorRTExport"),
    ("dms_lightning.callbacks", "TFLiteExport"),
    ("dms_lightning.callbacks", "CompressionReport"),
    ("dms_lightning.callbacks", "BatchNormReestimation"),
    ("dms_lightning.callbacks", "PredictionWriter"),
    ("dms_lightning.pruning", "remove_pruned_channels"),
    ("dms_lightning.quant", "post_training_quantize"),
    ("dms_lightning.quant", "quantization_sensitivity"),
    ("dms_lightning.export", "export_onnx"),
    ("dms_lightning.export", "export_fp16_onnx"),
]


def _signature(obj) -> str:
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    lines = []
    for p in params:
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text = "*" + text
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + text
        if p.default is not inspect.Parameter.empty:
            text += f"={p.default!r}"
        lines.append(f"    {text},")
    return f"{obj.__name__}(\n" + "\n".join(lines) + "\n)"


def render() -> str:
    out = ["# API reference", "",
           "Generated from the code by `python docs/make_reference.py`; do not edit by hand.",
           "Configs name these as `class_path: <module>.<name>`.", ""]
    for module_name, name in PUBLIC:
        obj = getattr(importlib.import_module(module_name), name)
        out += [f"## `{module_name}.{name}`", "", "```python", _signature(obj), "```", "",
                inspect.cleandoc(obj.__doc__ or "(no docstring)"), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    (Path(__file__).parent / "reference.md").write_text(render())
