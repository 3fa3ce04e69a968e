"""Numerical parity between the PyTorch model and its exported ONNX graph, on real validation images.

Two figures decide whether an export can be trusted: the largest absolute difference of the logits
and the fraction of samples whose top-1 class agrees. FP32 graphs should match to ~1e-5; an INT8 QDQ
graph matches its fake-quant PyTorch twin up to rounding ties (a quantization step here and there), so
for it the top-1 agreement is the figure that matters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from dms_lightning.export.runtimes import onnxruntime_outputs, top1_agreement, torch_outputs


class ParityError(ValueError):
    """The exported model does not reproduce the reference within tolerance."""


@dataclass
class ParityResult:
    """Agreement of ``runtime`` with ``reference`` on ``samples`` inputs.

    ``atol=None`` means the absolute difference is reported but not judged.
    """

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    samples: int
    atol: float | None
    min_top1_agreement: float
    reference: str = "pytorch"
    runtime: str = "onnxruntime"
    #: Samples whose top-1 differs although the reference's own top-2 margin is within ``2 · atol``: a near
    #: tie that logits within the tolerance may flip either way. They count as agreeing.
    near_ties: int = 0
    #: The split the inputs came from (``"val"``, ``"test"``, ...), for the log line and the manifest.
    split: str = "val"

    @property
    def judged_agreement(self) -> float:
        """Top-1 agreement with near ties (see :attr:`near_ties`) counted as agreeing."""
        return self.top1_agreement + (self.near_ties / self.samples if self.samples else 0.0)

    @property
    def passed(self) -> bool:
        within = self.atol is None or self.max_abs_diff <= self.atol
        return within and self.judged_agreement >= self.min_top1_agreement

    def describe(self) -> str:
        tolerance = "not judged" if self.atol is None else f"tolerance {self.atol:g}"
        ties = (f", {self.near_ties} of the differing samples a near tie of the {self.reference} logits (top-2 "
                f"margin within 2 × {self.atol:g}), counted as agreeing" if self.near_ties else "")
        images = {"val": "validation", "train": "training"}.get(self.split, self.split)
        return (f"{self.runtime} vs {self.reference} on {self.samples} {images} images: max |diff| "
                f"{self.max_abs_diff:.3g} ({tolerance}), top-1 agreement {self.top1_agreement:.2%}{ties} "
                f"(required {self.min_top1_agreement:.2%})")

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, *, atol: float | None,
                    min_top1_agreement: float, reference_name: str = "pytorch",
                    runtime: str = "onnxruntime") -> ParityResult:
    """Parity figures of ``candidate`` against ``reference`` logits (both ``N × classes``)."""
    if reference.shape != candidate.shape:
        raise ParityError(f"{runtime} output shape {candidate.shape} differs from {reference_name} {reference.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    agreement = top1_agreement(reference, candidate)
    near_ties = 0
    if atol is not None and len(reference):
        # A flip the tolerance itself allows: the reference barely prefers its class over the candidate's.
        rows = np.arange(len(reference))
        ours, theirs = reference.argmax(axis=1), candidate.argmax(axis=1)
        margin = reference[rows, ours].astype(np.float64) - reference[rows, theirs].astype(np.float64)
        near_ties = int(((ours != theirs) & (margin <= 2 * atol)).sum())
    return ParityResult(float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0, agreement,
                        int(len(reference)), atol, min_top1_agreement, reference_name, runtime, near_ties)


def check_runtime_parity(model: nn.Module, run, path: str | Path, inputs: torch.Tensor | np.ndarray, *,
                         atol: float | None, min_top1_agreement: float, runtime: str, label: str,
                         raise_on_failure: bool = True, split: str = "val"
                         ) -> tuple[ParityResult, np.ndarray, np.ndarray]:
    """Compare ``run(path, inputs)`` (a runtime executing the written file) with the PyTorch ``model``.

    Returns ``(result, pytorch_logits, runtime_logits)``; raises :class:`ParityError` naming ``label``
    when over tolerance and ``raise_on_failure``. ``split`` names the split ``inputs`` came from.
    """
    inputs = np.asarray(inputs.detach().cpu() if isinstance(inputs, torch.Tensor) else inputs, dtype=np.float32)
    reference = torch_outputs(model, inputs)
    candidate = run(path, inputs)
    result = compare_outputs(reference, candidate, atol=atol, min_top1_agreement=min_top1_agreement, runtime=runtime)
    result.split = split
    if raise_on_failure and not result.passed:
        raise ParityError(f"{label} {Path(path).name}: parity check failed: {result.describe()}")
    return result, reference, candidate


def check_parity(model: nn.Module, onnx_model: str | Path | onnx.ModelProto, inputs: torch.Tensor | np.ndarray, *,
                 atol: float | None = 1e-3, min_top1_agreement: float = 0.99, label: str = "model",
                 raise_on_failure: bool = True, fuse_qdq: bool = True
                 ) -> tuple[ParityResult, np.ndarray, np.ndarray]:
    """Run ``model`` (PyTorch) and ``onnx_model`` (ONNX Runtime) on ``inputs`` and compare.

    Returns ``(result, pytorch_logits, onnxruntime_logits)``. Raises :class:`ParityError` with the figures
    when the result is over tolerance and ``raise_on_failure``. ``fuse_qdq=False`` checks an INT8 QDQ
    graph's own semantics rather than ORT's fused integer kernels (see ``onnxruntime_outputs``).

    Example:
        >>> import tempfile, os
        >>> from dms_lightning.export import export_onnx
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> path = export_onnx(net, torch.zeros(1, 1, 4, 4), os.path.join(tempfile.mkdtemp(), "m.onnx"))
        >>> check_parity(net, path, torch.randn(8, 1, 4, 4))[0].passed
        True
    """
    inputs = np.asarray(inputs.detach().cpu() if isinstance(inputs, torch.Tensor) else inputs, dtype=np.float32)
    reference = torch_outputs(model, inputs)
    candidate = onnxruntime_outputs(onnx_model, inputs, fuse_qdq=fuse_qdq)
    result = compare_outputs(reference, candidate, atol=atol, min_top1_agreement=min_top1_agreement,
                             runtime="onnxruntime" if fuse_qdq else "onnxruntime (QDQ unfused)")
    if raise_on_failure and not result.passed:
        raise ParityError(f"{label}: parity check failed: {result.describe()}")
    return result, reference, candidate


def parity_figure(reference: np.ndarray, candidate: np.ndarray, result: ParityResult, title: str):
    """Scatter of reference vs exported logits and a histogram of their absolute differences."""
    from dms_lightning.utils.plotting import plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.scatter(reference.ravel(), candidate.ravel(), s=6, alpha=0.6)
    low, high = float(min(reference.min(), candidate.min())), float(max(reference.max(), candidate.max()))
    left.plot([low, high], [low, high], color="grey", linewidth=0.8)
    left.set_xlabel(f"{result.reference} logit")
    left.set_ylabel(f"{result.runtime} logit")
    left.set_title(f"top-1 agreement {result.top1_agreement:.1%}")
    diff = np.abs(reference - candidate).ravel()
    log_diff = np.log10(np.maximum(diff, 1e-12))
    low, high = float(log_diff.min(initial=-12.0)), float(log_diff.max(initial=-12.0))
    right.hist(log_diff, bins=40, range=(low, max(high, low + 1.0)))  # a constant offset is one bar
    if result.atol:
        right.axvline(np.log10(result.atol), color="red", linestyle="--", label=f"tolerance {result.atol:g}")
        right.legend(fontsize=8)
    right.set_xlabel("log10 |difference|")
    right.set_ylabel("logits")
    right.set_title(f"max |diff| {result.max_abs_diff:.2g}")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
