"""Run an ONNX model in ONNX Runtime or (when installed) OpenVINO on a batch of NCHW float inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx


def _as_bytes(model: str | Path | onnx.ModelProto) -> bytes | str:
    return model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)


def _static_batch(model: str | Path | onnx.ModelProto) -> int | None:
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    dim = proto.graph.input[0].type.tensor_type.shape.dim
    return dim[0].dim_value if dim and dim[0].HasField("dim_value") else None


def onnxruntime_outputs(model: str | Path | onnx.ModelProto, inputs: np.ndarray, threads: int = 0,
                        fuse_qdq: bool = True) -> np.ndarray:
    """First output of ``model`` in ONNX Runtime (CPU) for ``inputs``; a static-batch model runs in chunks.

    ``fuse_qdq=False`` keeps QuantizeLinear/DequantizeLinear as separate ops computed in float (the
    graph's exact ONNX semantics) instead of ORT's fused integer kernels (QLinearConv ...), whose u8s8
    arithmetic can differ, notably on x86 CPUs without VNNI.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not fuse_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(_as_bytes(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    step = _static_batch(model) or len(inputs)
    chunks = [session.run(None, {name: inputs[i:i + step]})[0] for i in range(0, len(inputs), step)]
    return np.concatenate(chunks, axis=0)


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def openvino_outputs(model: str | Path, inputs: np.ndarray) -> np.ndarray:
    """First output of the ONNX file ``model`` compiled by OpenVINO for CPU in FP32 (no bf16/fp16 hint)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(model)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    step = _static_batch(model) or len(inputs)
    chunks = [np.asarray(compiled(inputs[i:i + step])[0]) for i in range(0, len(inputs), step)]
    return np.concatenate(chunks, axis=0)
