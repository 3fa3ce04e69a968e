"""AIMET-style quantization encodings (SNPE / QNN ``--quantization_overrides``) read from a QDQ ONNX graph.

Reading the ranges back from the ``QuantizeLinear``/``DequantizeLinear`` pairs of the exported graph — rather
than from PyTorch quantizer objects — gives one code path for every producer: QAT exports, ONNX Runtime
PTQ, or a QDQ model from elsewhere. Tensors are keyed by their ONNX names, so the encodings match the
float graph a converter sees after it strips the Q/DQ pairs:

* ``activation_encodings[t]``: ``t`` is the float tensor a ``QuantizeLinear`` reads;
* ``param_encodings[w]``: ``w`` is the weight behind a ``DequantizeLinear`` (``foo_quantized`` → ``foo``,
  the naming both our exporter and ONNX Runtime's quantizer use); one entry per output channel.

Each entry is ``{bitwidth, min, max, scale, offset, is_symmetric, dtype}`` (``is_symmetric`` as the strings
``"True"``/``"False"``, as SNPE / QNN examples write it) with AIMET's convention
``real = (q_unsigned + offset) · scale``, i.e. ``offset = -zero_point`` for uint8 and ``-2^(b-1)`` for a
symmetric signed grid, ``min = offset · scale`` and ``max = min + (2^b − 1) · scale``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dms_lightning.quant.onnx_qdq import NARROW_WEIGHTS_KEY
from dms_lightning.utils.io import write_json_atomic

ENCODINGS_VERSION = "0.6.1"
_QUANTIZED_SUFFIX = "_quantized"


def _entries(scale: np.ndarray, zero_point: np.ndarray, bits: int) -> list[dict]:
    signed = np.issubdtype(zero_point.dtype, np.signedinteger)
    storage_min = -(2 ** (bits - 1)) if signed else 0
    symmetric = bool(signed and np.all(zero_point == 0))
    entries = []
    for s, z in zip(np.atleast_1d(scale).astype(np.float64), np.atleast_1d(zero_point).astype(np.int64)):
        offset = int(storage_min - z)
        low = offset * float(s)
        entries.append({"bitwidth": bits, "dtype": "int", "is_symmetric": str(symmetric), "min": low,
                        "max": low + (2 ** bits - 1) * float(s), "offset": offset, "scale": float(s)})
    return entries


def _bits(dtype: np.dtype) -> int:
    return np.iinfo(dtype).bits


def encodings_from_qdq_model(model: onnx.ModelProto) -> dict:
    """Encodings of every quantized tensor of a QDQ ``ModelProto`` (see :func:`encodings_from_qdq_onnx`)."""
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    narrow = {}
    for prop in model.metadata_props:
        if prop.key == NARROW_WEIGHTS_KEY:
            narrow = json.loads(prop.value)
    activations: dict[str, list[dict]] = {}
    params: dict[str, list[dict]] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        source = node.input[0]
        scale = constants.get(node.input[1])
        if scale is None:
            continue
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 else None
        if zero_point is None:
            zero_point = np.zeros_like(scale, dtype=np.uint8)  # ONNX default zero point: uint8 0
        if node.op_type == "QuantizeLinear" and source not in constants:
            activations[source] = _entries(scale, zero_point, _bits(zero_point.dtype))
        elif node.op_type == "DequantizeLinear" and source in constants:
            name = source[: -len(_QUANTIZED_SUFFIX)] if source.endswith(_QUANTIZED_SUFFIX) else source
            params[name] = _entries(scale, zero_point, narrow.get(source, _bits(constants[source].dtype)))
    return {"version": ENCODINGS_VERSION, "activation_encodings": activations, "param_encodings": params}


def encodings_from_qdq_onnx(onnx_path: str | Path) -> dict:
    """AIMET-style encodings of a QDQ ONNX model, keyed by ONNX tensor names.

    Works for the models QuantizationAwareTraining exports and for ONNX Runtime ``quantize_static`` output.

    Example:
        >>> enc = encodings_from_qdq_onnx("model_int8.onnx")  # doctest: +SKIP
        >>> enc["param_encodings"]["conv1.weight"][0]["bitwidth"]  # doctest: +SKIP
        8
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"onnx_path={str(path)!r} does not exist")
    encodings = encodings_from_qdq_model(onnx.load(str(path)))
    if not encodings["activation_encodings"] and not encodings["param_encodings"]:
        raise ValueError(f"onnx_path={str(path)!r} has no QuantizeLinear/DequantizeLinear with constant scales: "
                         "it is not a QDQ-quantized model")
    return encodings


def write_encodings(encodings: dict, path: str | Path) -> Path:
    """Write ``encodings`` as JSON to ``path`` atomically (the file SNPE / QNN take as ``--quantization_overrides``)."""
    for key in ("activation_encodings", "param_encodings"):
        if not isinstance(encodings.get(key), dict):
            raise ValueError(f"encodings[{key!r}] must be a dict of tensor name -> list of entries")
    return write_json_atomic(path, encodings)


def write_encodings_for_onnx(onnx_path: str | Path, path: str | Path | None = None) -> Path:
    """Derive the encodings of ``onnx_path`` and write them beside it (``<model>.encodings.json`` by default)."""
    onnx_path = Path(onnx_path)
    target = Path(path) if path is not None else onnx_path.with_suffix(".encodings.json")
    return write_encodings(encodings_from_qdq_onnx(onnx_path), target)
