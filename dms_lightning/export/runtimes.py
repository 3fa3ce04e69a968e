"""The one runtime module: ONNX Runtime sessions, logits of ONNX models over inputs or a loader, batch
splitting; OpenVINO when installed. The PyTorch side and the figures (top-1 agreement, accuracy) come from
:mod:`dms_lightning.utils.predictions` and are re-exported here.

Every place that runs an exported model (parity checks, the INT8 export, PTQ, the SNPE bundle, benchmarks)
goes through :func:`ort_session` and :func:`onnxruntime_outputs`, so a session is configured one way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dms_lightning.utils.cpu import int8_pair_sums_saturate
from dms_lightning.utils.predictions import (
    accuracy,
    batch_images,
    require_labels,
    top1_agreement,
    torch_logits,
    torch_outputs,
)

__all__ = ["EXACT_INT8_PRODUCTS", "accuracy", "batches_of", "exact_int8_products_needed", "loader_logits",
           "onnxruntime_outputs", "openvino_available", "openvino_outputs", "ort_session", "ort_session_options",
           "session_outputs", "static_batch", "top1_agreement", "torch_logits", "torch_outputs"]

ModelLike = str | Path | onnx.ModelProto

#: ONNX Runtime's session option for exact 8-bit integer products on x86 CPUs without VNNI: it converts the
#: int8 weights to uint8 and multiplies uint8 x uint8, which cannot saturate (and is slower there).
EXACT_INT8_PRODUCTS = "session.x64quantprecision"
#: Int8 weights within +-64 cannot saturate a pair sum (255 x 64 x 2 < 32768): 7-bit weights need no exact mode.
_SAFE_WEIGHT = 64


def exact_int8_products_needed(model: ModelLike) -> bool:
    """Whether ONNX Runtime's default kernels on this CPU could saturate while running ``model``.

    True when the CPU adds uint8 x int8 products in saturating int16 pairs
    (:func:`~dms_lightning.utils.cpu.int8_pair_sums_saturate`: x86-64 without VNNI) and ``model`` holds int8
    weights beyond +-64 (8-bit ones; 7-bit weights, ONNX Runtime's ``reduce_range``, never saturate).
    """
    if not int8_pair_sums_saturate():
        return False
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    for initializer in proto.graph.initializer:
        if initializer.data_type == onnx.TensorProto.INT8 and initializer.data_location != onnx.TensorProto.EXTERNAL:
            values = numpy_helper.to_array(initializer)
            if values.size and int(np.abs(values.astype(np.int16)).max()) > _SAFE_WEIGHT:
                return True
    return False


def ort_session_options(model: ModelLike, threads: int | None = None, fuse_qdq: bool = True, optimize: bool = True,
                        exact_int8: bool | None = None):
    """The ``onnxruntime.SessionOptions`` every session of the package uses (arguments: :func:`ort_session`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if not fuse_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if exact_int8 if exact_int8 is not None else (fuse_qdq and exact_int8_products_needed(model)):
        options.add_session_config_entry(EXACT_INT8_PRODUCTS, "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def ort_session(model: ModelLike, threads: int | None = None, fuse_qdq: bool = True, optimize: bool = True,
                exact_int8: bool | None = None):
    """A CPU ONNX Runtime session for an ONNX file or ``ModelProto``.

    Args:
        model: path or ``ModelProto``.
        threads: intra-op threads (one inter-op thread); ``None``: ONNX Runtime's default.
        fuse_qdq: ``False`` keeps QuantizeLinear/DequantizeLinear as float ops (the QDQ graph's exact ONNX
            semantics, what an NPU converter reads) instead of ORT's fused integer kernels (QLinearConv ...).
        optimize: all graph optimisations (``False``: none, the graph's values exactly as written).
        exact_int8: set ``session.x64quantprecision`` (:data:`EXACT_INT8_PRODUCTS`). ``None`` (default): where
            it matters, i.e. on an x86 CPU without VNNI running a model with 8-bit weights, whose default u8 x s8
            kernels saturate int16 pair sums (emulated on the main job's INT8 student: 97.6 -> 97.0 % top-1) and
            so compute something the NPU, LiteRT and the QDQ graph do not. It costs speed there; on VNNI CPUs it
            changes no output but makes the INT8 model about 25 % slower, so it stays off.
    """
    import onnxruntime as ort

    options = ort_session_options(model, threads, fuse_qdq, optimize, exact_int8)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def static_batch(model: ModelLike) -> int | None:
    """The fixed batch size of ``model``'s first input, or ``None`` when the batch axis is dynamic."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    dim = proto.graph.input[0].type.tensor_type.shape.dim
    return dim[0].dim_value if dim and dim[0].HasField("dim_value") else None


def batches_of(inputs: np.ndarray, step: int | None) -> Iterator[np.ndarray]:
    """``inputs`` in chunks of ``step`` samples (all at once when ``step`` is ``None``)."""
    step = step or len(inputs) or 1
    for start in range(0, len(inputs), step):
        yield inputs[start:start + step]


def session_outputs(session, inputs: np.ndarray, step: int | None = None) -> np.ndarray:
    """First output of ``session`` for ``inputs``, run ``step`` samples at a time."""
    name = session.get_inputs()[0].name
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    return np.concatenate([session.run(None, {name: chunk})[0] for chunk in batches_of(inputs, step)], axis=0)


def onnxruntime_outputs(model: ModelLike, inputs: np.ndarray, threads: int | None = None,
                        fuse_qdq: bool = True) -> np.ndarray:
    """First output of ``model`` in ONNX Runtime (CPU) for ``inputs``; a static-batch model runs in chunks.

    ``fuse_qdq=False``: see :func:`ort_session`.
    """
    return session_outputs(ort_session(model, threads, fuse_qdq), inputs, static_batch(model))


def loader_logits(session, batches: Iterable, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of an ONNX Runtime ``session`` over ``(images, labels, ...)`` batches (first ``limit``)."""
    logits, labels = [], []
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            break
        logits.append(session_outputs(session, batch_images(batch).cpu().numpy()))
        labels.append(require_labels(batch, "loader_logits").cpu().numpy())
    return np.concatenate(logits), np.concatenate(labels)


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def openvino_outputs(model: str | Path, inputs: np.ndarray) -> np.ndarray:
    """First output of the ONNX file ``model`` compiled by OpenVINO for CPU in FP32 (no bf16/fp16 hint)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(model)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    chunks = [np.asarray(compiled(chunk)[0]) for chunk in batches_of(inputs, static_batch(model))]
    return np.concatenate(chunks, axis=0)
