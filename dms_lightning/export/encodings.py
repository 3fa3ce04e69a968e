"""The one encodings writer: AIMET encodings JSON (SNPE / QNN ``--quantization_overrides``) and its coverage check.

Encodings are read from the ``QuantizeLinear``/``DequantizeLinear`` pairs of an exported QDQ graph (rather than
from PyTorch quantizer objects), so QAT, PTQ and a QDQ model from elsewhere share one code path and one
format. An encoding names a tensor of the *float* graph given to the converter
(:func:`~dms_lightning.export.qdq.strip_qdq`) and its quantization grid. In memory (``StrippedQDQ.encodings``)
the document has the keyed layout of AIMET's format 0.6.1::

    {"version": "0.6.1",
     "activation_encodings": {"/conv/Relu_output_0": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False",
                                                       "min": 0.0, "max": 6.0, "offset": 0, "scale": 0.0235}]},
     "param_encodings": {"conv.weight": [{...one per output channel...}]}}

:func:`write_encodings` writes it in the format version asked for (:data:`ENCODINGS_VERSIONS`):

* ``"0.6.1"`` (legacy; SNPE 1.x and early QNN): the layout above. ``is_symmetric`` is the string
  ``"True"``/``"False"``, one entry per channel.
* ``"1.0.0"`` (the default, :data:`DEFAULT_ENCODINGS_VERSION`: what aimet-onnx 2.x exports unless told
  otherwise, and what current QNN / QAIRT converters read): both sections are *lists* of
  ``{"name", "dtype": "INT", "enc_type": "PER_TENSOR" | "PER_CHANNEL", "bw", "is_sym" (bool), "scale": [...],
  "offset": [...]}``, one scale and offset per channel.

Both versions use AIMET's convention ``real = (q_unsigned + offset) · scale``: the offset is that of the
*unsigned* grid ``[0, 2**bw - 1]`` (``-128`` for a symmetric int8 weight), and ``is_symmetric`` / ``is_sym``
says the grid is signed (AIMET reads a signed dtype from it). A tensor the converter quantizes without an
encoding gets a range calibrated from the calibration raws instead of the one learned in QAT / measured in PTQ;
a name that matches no tensor is silently ignored. Both are the classic causes of an on-device accuracy drop,
so :func:`check_encodings_coverage` lists them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from dms_lightning.export.qdq import DOCUMENT_VERSION, strip_qdq
from dms_lightning.utils.io import write_json_atomic

__all__ = ["DEFAULT_ENCODINGS_VERSION", "ENCODINGS_VERSION", "ENCODINGS_VERSIONS", "EncodingsCoverage",
           "check_encodings_coverage", "check_encodings_version", "encodings_from_qdq_model",
           "encodings_from_qdq_onnx", "format_encodings", "invalid_encodings", "read_encodings", "write_encodings",
           "write_encodings_for_onnx"]

#: AIMET encodings format versions the writer produces (``"2.0.0"``, ONNX-style ``y_scale`` / ``y_zero_point``
#: entries, is not among them: aimet-onnx 2.42's ``load_encodings_to_sim`` and QNN's overrides take 0.6.1 / 1.0.0).
ENCODINGS_VERSIONS = ("0.6.1", "1.0.0")
#: The version written unless one is asked for: aimet-onnx 2.x's own export default (``AIMET_ENCODING_VERSION``).
DEFAULT_ENCODINGS_VERSION = "1.0.0"
#: The version every encodings JSON of the package carries by default (kept name; see ``DEFAULT_ENCODINGS_VERSION``).
ENCODINGS_VERSION = DEFAULT_ENCODINGS_VERSION

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


def check_encodings_version(version: str, field: str = "encodings_version") -> str:
    """``version`` when it is one of :data:`ENCODINGS_VERSIONS`; a ``ValueError`` naming ``field`` otherwise."""
    if version not in ENCODINGS_VERSIONS:
        raise ValueError(f"{field}={version!r} is not an encodings format version this writer produces; "
                         f"use one of {list(ENCODINGS_VERSIONS)} (AIMET 0.6.1 legacy, 1.0.0 current)")
    return version


def _check_document(encodings: dict) -> None:
    if encodings.get("version") != DOCUMENT_VERSION:
        raise ValueError(f"encodings['version']={encodings.get('version')!r} must be {DOCUMENT_VERSION!r} (the "
                         "in-memory layout): build the document with strip_qdq(...).encodings, "
                         "encodings_from_qdq_onnx(...) or read_encodings(...)")
    for key in ("activation_encodings", "param_encodings"):
        if not isinstance(encodings.get(key), dict):
            raise ValueError(f"encodings[{key!r}] must be a dict of tensor name -> list of entries")


def _entries_1_0_0(section: dict[str, list[dict]]) -> list[dict]:
    # One dict per tensor, its channels' scales and offsets as lists (AIMET's AffineEncoding._to_1_0_0).
    return [{"name": name, "dtype": "INT", "enc_type": "PER_CHANNEL" if len(entries) > 1 else "PER_TENSOR",
             "bw": entries[0]["bitwidth"], "is_sym": entries[0]["is_symmetric"] == "True",
             "scale": [entry["scale"] for entry in entries], "offset": [int(entry["offset"]) for entry in entries]}
            for name, entries in section.items()]


def _entries_0_6_1(section: list[dict], label: str) -> dict[str, list[dict]]:
    keyed = {}
    for entry in section:
        missing = [key for key in ("name", "dtype", "bw", "is_sym", "scale", "offset") if key not in entry]
        if missing or entry["dtype"] != "INT":
            raise ValueError(f"{label}: entry {entry.get('name')!r} is not an integer 1.0.0 encoding "
                             f"(missing {missing}, dtype {entry.get('dtype')!r})")
        bits, symmetric = int(entry["bw"]), bool(entry["is_sym"])
        keyed[entry["name"]] = [{
            "bitwidth": bits, "dtype": "int", "is_symmetric": str(symmetric),
            "max": float(scale * (2 ** bits - 1 + int(offset))), "min": float(scale * int(offset)),
            "offset": int(offset), "scale": float(scale),
        } for scale, offset in zip(entry["scale"], entry["offset"])]
    return keyed


def format_encodings(encodings: dict, version: str = DEFAULT_ENCODINGS_VERSION) -> dict:
    """The in-memory document (``StrippedQDQ.encodings``) in the layout of format ``version``."""
    _check_document(encodings)
    check_encodings_version(version, "version")
    if version == "0.6.1":
        return {"version": "0.6.1", "activation_encodings": encodings["activation_encodings"],
                "param_encodings": encodings["param_encodings"]}
    return {"version": "1.0.0", "activation_encodings": _entries_1_0_0(encodings["activation_encodings"]),
            "param_encodings": _entries_1_0_0(encodings["param_encodings"])}


def read_encodings(source: str | Path | dict) -> dict:
    """An encodings JSON (a path or a parsed document) of any version in :data:`ENCODINGS_VERSIONS`, in memory layout.

    Example:
        >>> enc = read_encodings("snpe_bundle/encodings.json")  # doctest: +SKIP
        >>> enc["param_encodings"]["conv1.weight"][0]["offset"]  # doctest: +SKIP
        -128
    """
    label = "the document"
    if not isinstance(source, dict):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"encodings path {str(path)!r} does not exist")
        label, source = repr(str(path)), json.loads(path.read_text())
    version = source.get("version")
    check_encodings_version(version, f"{label} version")
    if version == "0.6.1":
        document = {"version": DOCUMENT_VERSION, "activation_encodings": source.get("activation_encodings"),
                    "param_encodings": source.get("param_encodings")}
        _check_document(document)
        return document
    for key in ("activation_encodings", "param_encodings"):
        if not isinstance(source.get(key), list):
            raise ValueError(f"{label}: {key!r} of a 1.0.0 document must be a list of entries")
    return {"version": DOCUMENT_VERSION,
            "activation_encodings": _entries_0_6_1(source["activation_encodings"], label),
            "param_encodings": _entries_0_6_1(source["param_encodings"], label)}


def write_encodings(encodings: dict, path: str | Path, version: str = DEFAULT_ENCODINGS_VERSION) -> Path:
    """Write an encodings document (``StrippedQDQ.encodings``) as JSON in format ``version`` to ``path``, atomically."""
    return write_json_atomic(path, format_encodings(encodings, version))


def write_encodings_for_onnx(onnx_path: str | Path, path: str | Path | None = None,
                             version: str = DEFAULT_ENCODINGS_VERSION) -> Path:
    """Derive the encodings of ``onnx_path`` and write them beside it (``<model>.encodings.json`` by default)."""
    check_encodings_version(version, "version")
    onnx_path = Path(onnx_path)
    target = Path(path) if path is not None else onnx_path.with_suffix(".encodings.json")
    return write_encodings(encodings_from_qdq_onnx(onnx_path), target, version)
