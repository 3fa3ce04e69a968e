"""The one INT8 export routine: a fake-quantized torch network → QDQ ONNX + encodings JSON, parity-checked.

ONNXExport (its own INT8 file and the networks QAT / PTQ hand down) and SNPEExport (the bundle's QDQ
reference and encodings) all call :func:`export_int8`, so every INT8 file of a run is written, named, encoded
and judged the same way (:class:`~dms_lightning.utils.artifacts.ParityRule`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from dms_lightning.export.encodings import DEFAULT_ENCODINGS_VERSION, check_encodings_version, write_encodings
from dms_lightning.export.onnx_export import DEFAULT_OPSET
from dms_lightning.export.parity import ParityError, ParityResult, check_parity, compare_outputs
from dms_lightning.export.qdq import StrippedQDQ, export_qdq_onnx, has_qdq, strip_qdq
from dms_lightning.export.runtimes import onnxruntime_outputs
from dms_lightning.utils.artifacts import ParityRule
from dms_lightning.utils.io import atomic_path


class NotQuantizedError(ValueError):
    """The network runs no ``torch.fake_quantize_*`` op, so its export has no QuantizeLinear/DequantizeLinear."""


@dataclass
class Int8Export:
    """What :func:`export_int8` wrote and how it was judged.

    Attributes:
        onnx_path: the INT8 QDQ model.
        encodings_path: its AIMET encodings JSON (keyed by the tensor names of ``stripped.model``).
        parity: the QDQ graph's semantics against PyTorch (the judged figure).
        fused_kernels: ONNX Runtime's fused CPU integer kernels against PyTorch (reported).
        stripped: the float twin of the graph and its encodings (what SNPE / QNN converters take).
    """

    onnx_path: Path
    encodings_path: Path
    parity: ParityResult
    fused_kernels: ParityResult
    stripped: StrippedQDQ = field(repr=False)
    reference: np.ndarray = field(repr=False)
    candidate: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {"onnx_path": str(self.onnx_path), "encodings_path": str(self.encodings_path),
                "parity": self.parity.to_dict(), "onnxruntime_int8_kernels": self.fused_kernels.to_dict()}


def default_encodings_path(onnx_path: str | Path) -> Path:
    """``<dir>/<stem>.encodings.json`` beside an ONNX file."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.encodings.json")


def export_int8(model: nn.Module, example_input: torch.Tensor, path: str | Path, images: torch.Tensor, *,
                rule: ParityRule, metadata: dict[str, str], encodings_path: str | Path | None = None,
                opset: int = DEFAULT_OPSET, exporter: str = "torchscript", dynamic_batch: bool = True,
                label: str | None = None, encodings_version: str = DEFAULT_ENCODINGS_VERSION,
                on_checked: Callable[[ParityResult, np.ndarray, np.ndarray], None] | None = None) -> Int8Export:
    """Write ``model`` as an INT8 QDQ ONNX file and its encodings, judged by ``rule`` on ``images``.

    Both files appear only once the model passed: a model over tolerance raises
    :class:`~dms_lightning.export.parity.ParityError` with the figures and nothing is left at ``path`` or
    ``encodings_path`` (default :func:`default_encodings_path`), written in AIMET format ``encodings_version``
    (:data:`~dms_lightning.export.encodings.ENCODINGS_VERSIONS`). ``on_checked(result, pytorch_logits,
    onnx_logits)`` runs before the judgement (to log or draw the figures, passed or not).

    Raises:
        NotQuantizedError: the export holds no QuantizeLinear/DequantizeLinear (no fake-quant op ran).
        ParityError: the QDQ graph disagrees with ``model`` beyond ``rule``.
    """
    check_encodings_version(encodings_version)
    path = Path(path)
    encodings_path = Path(encodings_path) if encodings_path is not None else default_encodings_path(path)
    label = label or path.stem
    with atomic_path(path) as tmp:
        export_qdq_onnx(model, example_input, tmp, metadata=metadata, opset=opset, exporter=exporter,
                        dynamic_batch=dynamic_batch)
        proto = onnx.load(str(tmp))
        if not has_qdq(proto):
            raise NotQuantizedError(f"{label}: the INT8 export has no QuantizeLinear/DequantizeLinear nodes (the network "
                                    "quantizes with ops other than torch's fake_quantize_*, or not at all)")
        # The graph's own semantics are judged (Q/DQ computed exactly, as an NPU runs them); ORT's fused integer
        # kernels are a property of the runtime and CPU, reported below.
        result, reference, candidate = check_parity(
            model, tmp, images, atol=rule.atol, min_top1_agreement=rule.min_top1_agreement, raise_on_failure=False,
            fuse_qdq=False)
        if on_checked is not None:
            on_checked(result, reference, candidate)
        if not result.passed:
            raise ParityError(f"{label} failed the parity check, not written: {result.describe()}")
        fused = compare_outputs(reference, onnxruntime_outputs(tmp, images.numpy()), atol=None,
                                min_top1_agreement=rule.min_top1_agreement,
                                runtime="onnxruntime (fused INT8 kernels)")
        if not fused.passed:
            rank_zero_warn(f"[dms_lightning] {label}: the graph matches PyTorch, but ONNX Runtime's fused INT8 kernels "
                           f"on this CPU do not: {fused.describe()}. The fused kernels requantize in fixed point where the "
                           "graph rounds in float (and on x86 CPUs without VNNI they run with exact integer "
                           "products, session.x64quantprecision); an NPU runs the graph's semantics")
        stripped = strip_qdq(proto)
    write_encodings(stripped.encodings, encodings_path, encodings_version)
    return Int8Export(path, encodings_path, result, fused, stripped, reference, candidate)
