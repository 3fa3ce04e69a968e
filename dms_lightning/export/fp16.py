"""FP16 ONNX: weights and arithmetic in float16, the middle step between FP32 and INT8 on GPUs and NPUs.

The network is cast to half precision in PyTorch and exported as it runs: every initializer and every
intermediate tensor of the graph is float16. By default the graph keeps float32 input and output (one
``Cast`` at each end), so an application written for the FP32 file feeds the FP16 one unchanged;
``io_dtype="float16"`` drops the casts for runtimes that want half-precision buffers end to end.

ONNX Runtime's CPU provider has no float16 kernel for most operators and runs them in float32 after
inserting casts, so on a CPU the parity check judges the float16 *weights and activations storage*; a
GPU provider, TensorRT or an NPU also computes in float16 (see ``trtexec --fp16`` in the TensorRT
bundle).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from dms_lightning.export.onnx_export import DEFAULT_OPSET, export_onnx
from dms_lightning.export.parity import ParityResult, check_runtime_parity

IO_DTYPES = ("float32", "float16")
# Logits of a float16 network differ from float32 by a few half-precision steps (2**-10 relative):
# for logits of magnitude ~10 that is ~1e-2, so the default tolerance leaves a margin of 5x.
DEFAULT_FP16_ATOL = 5e-2


class Float16Network(nn.Module):
    """``model`` cast to float16, optionally taking and returning float32 tensors.

    Example:
        >>> net = Float16Network(nn.Linear(4, 2))
        >>> net(torch.zeros(1, 4)).dtype
        torch.float32
    """

    def __init__(self, model: nn.Module, io_dtype: str = "float32") -> None:
        super().__init__()
        _check_io_dtype(io_dtype)
        self.model = copy.deepcopy(model).half()
        self.float_io = io_dtype == "float32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x.to(torch.float16))
        return logits.float() if self.float_io else logits


def _check_io_dtype(io_dtype: str) -> None:
    if io_dtype not in IO_DTYPES:
        raise ValueError(f"io_dtype={io_dtype!r} must be one of {IO_DTYPES}")


def export_fp16_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    io_dtype: str = "float32",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: dict[str, str] | None = None,
    exporter: str = "torchscript",
    simplify: bool = False,
) -> Path:
    """Export ``model`` (float32, left untouched) as a float16 ONNX graph at ``path``, atomically.

    ``io_dtype="float32"`` (default) keeps float32 input and output; ``"float16"`` makes them half too.
    Fake-quantized layers must be bypassed first (``fake_quant_disabled()``): an FP16 file is a float model.

    Example:
        >>> import tempfile, os
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
        >>> _ = net(torch.zeros(1, 3, 8, 8))
        >>> out = export_fp16_onnx(net, torch.zeros(1, 3, 8, 8), os.path.join(tempfile.mkdtemp(), "m.onnx"))
        >>> onnx_input_dtype(out)
        'float32'
    """
    _check_io_dtype(io_dtype)
    was_training = model.training
    half = Float16Network(model.cpu().float(), io_dtype).eval()
    example = example_input.detach().cpu().to(torch.float32 if io_dtype == "float32" else torch.float16)
    try:
        return export_onnx(half, example, path, opset=opset, dynamic_batch=dynamic_batch, metadata=metadata,
                           exporter=exporter, simplify=simplify)
    finally:
        model.train(was_training)


_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8"}


def onnx_input_dtype(model: str | Path | onnx.ModelProto) -> str:
    """The element type of the graph's first input as a numpy name (``"float32"``, ``"float16"`` ...)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    elem_type = proto.graph.input[0].type.tensor_type.elem_type
    return _ONNX_DTYPES.get(elem_type, onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)


def float16_fraction(model: str | Path | onnx.ModelProto) -> float:
    """Share of the graph's floating-point weight elements stored as float16 (1.0 for a full FP16 export)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    sizes = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for tensor in proto.graph.initializer:
        if tensor.data_type in sizes:
            sizes[tensor.data_type] += int(np.prod(tensor.dims)) if tensor.dims else 1
    total = sum(sizes.values())
    return sizes[onnx.TensorProto.FLOAT16] / total if total else 0.0


def onnxruntime_outputs_any_dtype(model: str | Path, inputs: np.ndarray) -> np.ndarray:
    """First output of ``model`` in ONNX Runtime (CPU) as float32, feeding ``inputs`` in the graph's input dtype."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feed = np.ascontiguousarray(inputs, dtype=onnx_input_dtype(model))
    return np.asarray(session.run(None, {session.get_inputs()[0].name: feed})[0], dtype=np.float32)


def check_fp16_parity(model: nn.Module, path: str | Path, inputs: torch.Tensor | np.ndarray, *,
                      atol: float | None = DEFAULT_FP16_ATOL, min_top1_agreement: float = 0.99,
                      raise_on_failure: bool = True) -> tuple[ParityResult, np.ndarray, np.ndarray]:
    """Compare the FP16 file at ``path`` (ONNX Runtime) with the float32 PyTorch ``model`` on ``inputs``.

    Returns ``(result, pytorch_logits, onnxruntime_logits)``; raises :class:`ParityError` when over
    tolerance and ``raise_on_failure``.
    """
    return check_runtime_parity(model, onnxruntime_outputs_any_dtype, path, inputs, atol=atol,
                                min_top1_agreement=min_top1_agreement, runtime="onnxruntime (fp16 file)",
                                label="FP16 export", raise_on_failure=raise_on_failure)
