"""The one encodings writer: AIMET-style JSON (SNPE / QNN ``--quantization_overrides``) and its coverage check.

Encodings are read from the ``QuantizeLinear``/``DequantizeLinear`` pairs of an exported QDQ graph (rather than
from PyTorch quantizer objects), so QAT, PTQ and a QDQ model from elsewhere share one code path and one
format, with its ``"version"``. An encoding names a tensor of the *float* graph given to the converter
(:func:`~dms_lightning.export.qdq.strip_qdq`) and its quantization grid::

    {"version": "0.6.1",
     "activation_encodings": {"/conv/Relu_output_0": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False",
                                                       "min": 0.0, "max": 6.0, "offset": 0, "scale": 0.0235}]},
     "param_encodings": {"conv.weight": [{...one per output channel...}]}}

Each entry is ``{bitwidth, min, max, scale, offset, is_symmetric, dtype}`` (``is_symmetric`` as the strings
``"True"``/``"False"``, as SNPE / QNN examples write it) with AIMET's convention
``real = (q_unsigned + offset) · scale``. A tensor the converter quantizes without an encoding gets a range calibrated from the calibration raws
instead of the one learned in QAT / measured in PTQ; a name that matches no tensor is silently ignored.
Both are the classic causes of an on-device accuracy drop, so :func:`check_encodings_coverage` lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from dms_lightning.export.qdq import ENCODINGS_VERSION, strip_qdq
from dms_lightning.utils.io import write_json_atomic

__all__ = ["ENCODINGS_VERSION", "EncodingsCoverage", "check_encodings_coverage", "encodings_from_qdq_model",
           "encodings_from_qdq_onnx", "invalid_encodings", "write_encodings", "write_encodings_for_onnx"]

_REQUIRED_FIELDS = ("bitwidth", "min", "max", "scale", "offset")
# Layers that run as integer matmuls on the NPU: their inputs and weights need a grid.
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class EncodingsCoverage:
    """Which tensors have an encoding.

    Attributes:
        missing: quantized tensors (Q/DQ in the INT8 graph) with no valid encoding, or encodings whose
            tensor is not in the float graph: the bundle would not reproduce the INT8 model.
        not_overridden: weights and inputs of weighted layers in the float graph that no encoding
            covers: the SDK calibrates them from the raws (expected for a float model, suspicious for QAT).
        covered: number of tensors with a valid encoding.
    """

    missing: list[str] = field(default_factory=list)
    not_overridden: list[str] = field(default_factory=list)
    covered: int = 0

    @property
    def complete(self) -> bool:
        return not self.missing and not self.not_overridden

    def to_dict(self) -> dict:
        return {"covered": self.covered, "missing": self.missing, "not_overridden": self.not_overridden}


def invalid_encodings(encodings: dict) -> list[str]:
    """Names of tensors whose encoding entries lack a field or have a non-positive / non-finite scale."""
    bad = []
    for section in ("activation_encodings", "param_encodings"):
        for name, entries in encodings.get(section, {}).items():
            if not isinstance(entries, list) or not entries:
                bad.append(name)
                continue
            for entry in entries:
                if any(key not in entry for key in _REQUIRED_FIELDS) or not math.isfinite(entry["scale"]) \
                        or entry["scale"] <= 0:
                    bad.append(name)
                    break
    return bad


def check_encodings_coverage(float_model: onnx.ModelProto, encodings: dict,
                             quantized_tensors: list[str] | None = None) -> EncodingsCoverage:
    """Check that every quantized tensor has an encoding that names a tensor of ``float_model``.

    Args:
        float_model: the graph handed to the converter.
        encodings: the ``--quantization_overrides`` document.
        quantized_tensors: tensors the INT8 model quantized (``StrippedQDQ.quantized_tensors``); when
            given, each must be encoded.
    """
    graph = float_model.graph
    tensors = ({value.name for value in graph.input} | {init.name for init in graph.initializer}
               | {out for node in graph.node for out in node.output})
    activations = encodings.get("activation_encodings", {})
    params = encodings.get("param_encodings", {})
    encoded = set(activations) | set(params)
    invalid = set(invalid_encodings(encodings))
    missing = [name for name in (quantized_tensors or []) if name not in encoded or name in invalid]
    missing += [name for name in sorted(encoded) if name not in tensors and name not in missing]
    missing += [name for name in sorted(invalid) if name not in missing]

    initializers = {init.name for init in graph.initializer}
    not_overridden: list[str] = []
    for node in graph.node:
        if node.op_type not in _WEIGHTED_OPS:
            continue
        for index, name in enumerate(node.input[:2]):
            if not name or name in not_overridden:
                continue
            if name in initializers and index == 1 and name not in params:
                not_overridden.append(name)
            elif name not in initializers and name not in activations:
                not_overridden.append(name)
    return EncodingsCoverage(missing=missing, not_overridden=not_overridden,
                             covered=len(encoded - invalid - set(missing)))


def encodings_from_qdq_model(model: onnx.ModelProto) -> dict:
    """Encodings of every quantized tensor of a QDQ ``ModelProto``, keyed by the tensor names of its float graph."""
    return strip_qdq(model).encodings


def encodings_from_qdq_onnx(onnx_path: str | Path | onnx.ModelProto) -> dict:
    """AIMET-style encodings of a QDQ ONNX model (a file or a ``ModelProto``), keyed by ONNX tensor names.

    Works for the models the package exports and for ONNX Runtime ``quantize_static`` output.

    Example:
        >>> enc = encodings_from_qdq_onnx("model_int8.onnx")  # doctest: +SKIP
        >>> enc["param_encodings"]["conv1.weight"][0]["bitwidth"]  # doctest: +SKIP
        8
    """
    if isinstance(onnx_path, onnx.ModelProto):
        model, label = onnx_path, "the model"
    else:
        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"onnx_path={str(path)!r} does not exist")
        model, label = onnx.load(str(path)), f"onnx_path={str(path)!r}"
    encodings = encodings_from_qdq_model(model)
    if not encodings["activation_encodings"] and not encodings["param_encodings"]:
        raise ValueError(f"{label} has no QuantizeLinear/DequantizeLinear with constant scales: "
                         "it is not a QDQ-quantized model")
    return encodings


def write_encodings(encodings: dict, path: str | Path) -> Path:
    """Write an encodings document (``StrippedQDQ.encodings``) as JSON to ``path``, atomically."""
    if encodings.get("version") != ENCODINGS_VERSION:
        raise ValueError(f"encodings['version']={encodings.get('version')!r} must be {ENCODINGS_VERSION!r}: build "
                         "the document with strip_qdq(...).encodings or encodings_from_qdq_onnx(...)")
    for key in ("activation_encodings", "param_encodings"):
        if not isinstance(encodings.get(key), dict):
            raise ValueError(f"encodings[{key!r}] must be a dict of tensor name -> list of entries")
    return write_json_atomic(path, encodings)


def write_encodings_for_onnx(onnx_path: str | Path, path: str | Path | None = None) -> Path:
    """Derive the encodings of ``onnx_path`` and write them beside it (``<model>.encodings.json`` by default)."""
    onnx_path = Path(onnx_path)
    target = Path(path) if path is not None else onnx_path.with_suffix(".encodings.json")
    return write_encodings(encodings_from_qdq_onnx(onnx_path), target)
