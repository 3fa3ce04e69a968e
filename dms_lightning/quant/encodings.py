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

from pathlib import Path

import onnx

from dms_lightning.utils.io import write_json_atomic

ENCODINGS_VERSION = "0.6.1"


def encodings_from_qdq_model(model: onnx.ModelProto) -> dict:
    """Encodings of every quantized tensor of a QDQ ``ModelProto`` (see :func:`encodings_from_qdq_onnx`).

    The keys are the tensor names of the float graph :func:`~dms_lightning.export.qdq.strip_qdq` derives
    from ``model`` — the graph the SNPE / QNN converters are given — so every entry matches a tensor there.
    """
    from dms_lightning.export.qdq import strip_qdq

    return {"version": ENCODINGS_VERSION, **strip_qdq(model).encodings}


def encodings_from_qdq_onnx(onnx_path: str | Path | onnx.ModelProto) -> dict:
    """AIMET-style encodings of a QDQ ONNX model (a file or a ``ModelProto``), keyed by ONNX tensor names.

    Works for the models QuantizationAwareTraining exports and for ONNX Runtime ``quantize_static`` output.

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
