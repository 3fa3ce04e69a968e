"""The one ONNX metadata layout: written by :func:`onnx_metadata`, read back by :func:`read_metadata`.

Every ONNX file the package writes (ONNXExport FP32 / INT8, the INT8 variants of QAT and PTQ, the SNPE
bundle's models, ``python -m dms_lightning.report --ckpt``) carries the same ``metadata_props`` keys, so a
deployment engineer reads any of them the same way::

    producer       "dms_lightning"
    variant        e.g. "student_int8"
    precision      "fp32" or "int8"
    source         JSON: where the weights came from (checkpoint, epoch ...), {} when unknown
    class_names    JSON list (null when the run has none)
    image_size     JSON number
    channels       JSON number
    mean, std      JSON lists (null when unknown)
    layout         "NCHW"
    scale          "1/255" (pixels are divided by 255, then normalised; empty when unknown)
    preprocessing  JSON object with all the preprocessing fields above, in one place

Values are strings (ONNX stores strings); plain ``onnx`` reads them, :func:`read_metadata` decodes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from torch import nn

PRODUCER = "dms_lightning"
#: Preprocessing fields, each also a key of its own.
PREPROCESSING_FIELDS = ("class_names", "image_size", "channels", "mean", "std", "layout", "scale")
#: Every key of the layout, in the order written.
METADATA_KEYS = ("producer", "variant", "precision", "source", *PREPROCESSING_FIELDS, "preprocessing")
_TEXT_FIELDS = ("producer", "variant", "precision", "layout", "scale")


def preprocessing_info(datamodule, module: nn.Module | None, example_input: torch.Tensor) -> dict:
    """The preprocessing fields of a model: the datamodule's ``preprocessing`` dict, else the module's
    ``class_names`` / ``image_size`` / ``in_channels`` attributes, else the example input's shape."""
    info: dict = {}
    if isinstance(getattr(datamodule, "preprocessing", None), dict):
        info.update(datamodule.preprocessing)
    for key, attribute in (("class_names", "class_names"), ("image_size", "image_size"), ("channels", "in_channels")):
        if info.get(key) is None and getattr(module, attribute, None) is not None:
            info[key] = getattr(module, attribute)
    if info.get("channels") is None:
        info["channels"] = int(example_input.shape[1])
    if info.get("image_size") is None:
        info["image_size"] = int(example_input.shape[-1])
    info.setdefault("layout", "NCHW")
    if info.get("class_names") is not None:
        info["class_names"] = list(info["class_names"])
    return {key: info.get(key) for key in PREPROCESSING_FIELDS}


def onnx_metadata(preprocessing: dict, *, variant: str, precision: str, source: dict | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (every key of :data:`METADATA_KEYS`, as strings).

    ``preprocessing`` is :func:`preprocessing_info`'s dict (missing fields are written as ``null``).
    """
    fields = {key: preprocessing.get(key) for key in PREPROCESSING_FIELDS}
    values = {"producer": PRODUCER, "variant": variant, "precision": precision, "source": source or {}, **fields,
              "preprocessing": fields}
    return {key: ("" if value is None else str(value)) if key in _TEXT_FIELDS else json.dumps(value)
            for key, value in values.items()}


def read_metadata(model: str | Path | onnx.ModelProto) -> dict:
    """The layout's keys of an ONNX file's ``metadata_props``, decoded (JSON values parsed, text kept).

    Raises:
        ValueError: the file lacks a key of the layout (it was not written by this package).
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    props = {prop.key: prop.value for prop in proto.metadata_props}
    missing = [key for key in METADATA_KEYS if key not in props]
    if missing:
        label = "the model" if isinstance(model, onnx.ModelProto) else str(model)
        raise ValueError(f"{label} lacks the dms_lightning metadata keys {missing} (found {sorted(props)})")
    return {key: (props[key] or None) if key in _TEXT_FIELDS else json.loads(props[key]) for key in METADATA_KEYS}
