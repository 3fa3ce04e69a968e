"""Range estimators: how post-training calibration turns observed activations into a quantizer's ``[min, max]``.

Statistics are collected on the float network (every quantizer passes its input through unchanged, as
ONNX Runtime's and NNCF's calibrations do), one estimator per activation quantizer; then each estimator
picks the range for the quantizer's integer grid (:class:`~dms_lightning.quant.spec.QuantSpec`), so a
16-bit or a narrower grid gets the clipping that suits it:

* ``minmax``: the smallest and largest value seen (ONNX Runtime ``MinMax``).
* ``percentile``: clip the tails at the ``percentile``-th percentile of ``|x|`` on a 2048-bin histogram of
  absolute values, clamped to the values seen (ONNX Runtime ``Percentile`` with its defaults).
* ``entropy``: the clipping threshold whose quantized histogram is closest in KL divergence to the
  observed one (TensorRT's calibration: Migacz, "8-bit Inference with TensorRT", GTC 2017).
* ``mse``: the clipping range with the smallest expected squared quantization error (clipping error
  outside, ``scale²/12`` rounding error inside).

Histogram estimators take two passes over the calibration batches: the first learns the min / max, the
second fills a histogram over exactly that range (no re-binning as the range grows, so the result does
not depend on batch order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dms_lightning.quant.spec import QuantSpec

DEFAULT_BINS = 2048


class RangeEstimator:
    """Observes the tensors reaching one activation quantizer and picks its range.

    Subclasses set ``passes`` (how many times calibration feeds the batches) and implement
    :meth:`observe` and :meth:`range`.
    """

    passes: int = 1

    def __init__(self) -> None:
        self.low = math.inf
        self.high = -math.inf
        self.current_pass = 0

    def start_pass(self, index: int) -> None:
        self.current_pass = index

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if self.current_pass == 0:
            self.low = min(self.low, float(x.min()))
            self.high = max(self.high, float(x.max()))

    @property
    def observed(self) -> bool:
        return self.low <= self.high

    def range(self, spec: QuantSpec) -> tuple[float, float]:
        """``(min, max)`` of the quantizer (before it is widened to contain 0)."""
        raise NotImplementedError


class MinMaxEstimator(RangeEstimator):
    """The smallest and largest value over all calibration batches."""

    def range(self, spec: QuantSpec) -> tuple[float, float]:
        return self.low, self.high


class HistogramEstimator(RangeEstimator):
    """Pass 1: min / max. Pass 2: a ``bins``-bin histogram over ``[min, max]`` (of ``|x|`` if ``absolute``)."""

    passes = 2
    absolute = False

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        super().__init__()
        self.bins = bins
        self.hist: torch.Tensor | None = None

    def _edges(self) -> tuple[float, float]:
        if self.absolute:
            return 0.0, max(abs(self.low), abs(self.high))
        return self.low, self.high

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if self.current_pass == 0:
            super().observe(x)
            return
        lo, hi = self._edges()
        if hi <= lo:
            return
        values = x.detach().float().flatten()
        if self.absolute:
            values = values.abs()
        counts = torch.histc(values, bins=self.bins, min=lo, max=hi).double().cpu()
        self.hist = counts if self.hist is None else self.hist + counts

    def _histogram(self) -> tuple[np.ndarray, np.ndarray] | None:
        lo, hi = self._edges()
        if self.hist is None or hi <= lo or float(self.hist.sum()) == 0:
            return None
        return self.hist.numpy(), np.linspace(lo, hi, self.bins + 1)

    def range(self, spec: QuantSpec) -> tuple[float, float]:
        histogram = self._histogram()
        if histogram is None:  # a constant tensor: nothing to clip
            return self.low, self.high
        threshold = self.threshold(*histogram, spec)
        return max(self.low, -threshold), min(self.high, threshold)

    def threshold(self, hist: np.ndarray, edges: np.ndarray, spec: QuantSpec) -> float:
        raise NotImplementedError


class PercentileEstimator(HistogramEstimator):
    """``|x|`` clipped at its ``percentile``-th percentile (ONNX Runtime's ``Percentile`` calibrator)."""

    absolute = True

    def __init__(self, percentile: float = 99.999, bins: int = DEFAULT_BINS) -> None:
        super().__init__(bins)
        self.percentile = percentile

    def threshold(self, hist: np.ndarray, edges: np.ndarray, spec: QuantSpec) -> float:
        cdf = np.cumsum(hist) / hist.sum()
        index = int(np.searchsorted(cdf, self.percentile / 100.0))
        return float(edges[min(index + 1, len(edges) - 1)])


def _levels(spec: QuantSpec, signed_data: bool) -> int:
    """Integer levels available to the magnitude of the data: half the grid when the data has both signs."""
    levels = 2 ** spec.bits
    return levels // 2 if signed_data or spec.symmetric else levels


class EntropyEstimator(HistogramEstimator):
    """The threshold minimising KL(observed || quantized) on the histogram of ``|x|`` (TensorRT's calibrator).

    For each candidate threshold ``edges[i]`` the first ``i`` bins (outliers folded into the last) are the
    reference distribution; merged into as many groups as the grid has levels for the magnitude and
    expanded back over their non-empty bins, they are the candidate quantized distribution.
    """

    absolute = True
    #: Candidate thresholds tried (evenly spaced bin edges from ``levels`` to all bins); TensorRT tries every edge.
    candidates = 512

    def threshold(self, hist: np.ndarray, edges: np.ndarray, spec: QuantSpec) -> float:
        levels = min(_levels(spec, self.low < 0 < self.high), len(hist))
        # The first bin of |x| holds every exact zero: half of a ReLU / ReLU6 output. Merged with its neighbours
        # into one level and spread back over them, that spike dominates the divergence at every threshold but
        # the smallest, so KL picked ~1.5 for MobileNetV2's ReLU6 outputs (30 % top-1). NVIDIA's
        # pytorch-quantization sets the zero bin to its neighbour's count for this reason; so do we.
        hist = hist.copy()
        if len(hist) > 1:
            hist[0] = hist[1]
        tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = hist[i:].sum()
        best, best_index = math.inf, len(hist)
        for i in np.unique(np.linspace(levels, len(hist), self.candidates).astype(int)):
            sliced = hist[:i]
            reference = sliced.copy()
            reference[-1] += tail[i]
            group = (np.arange(i) * levels) // i
            nonzero = sliced > 0
            sums = np.bincount(group, weights=sliced, minlength=levels)
            counts = np.bincount(group, weights=nonzero, minlength=levels)
            candidate = np.where(nonzero, sums[group] / np.maximum(counts[group], 1), 0.0)
            divergence = _kl_divergence(reference, candidate)
            if divergence < best:
                best, best_index = divergence, i
        return float(edges[best_index])


def _kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> float:
    p = p / p.sum()
    total = q.sum()
    if total <= 0:
        return math.inf
    q = q / total
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], eps))))


class MSEEstimator(HistogramEstimator):
    """The clipping range ``α · [min, max]`` with the smallest expected squared quantization error."""

    candidates = np.linspace(1.0, 0.2, 81)

    def range(self, spec: QuantSpec) -> tuple[float, float]:
        histogram = self._histogram()
        if histogram is None:
            return self.low, self.high
        hist, edges = histogram
        centers = (edges[:-1] + edges[1:]) / 2
        quant_min, quant_max = spec.quant_range
        errors = []
        for alpha in self.candidates:
            low, high = min(self.low * alpha, 0.0), max(self.high * alpha, 0.0)
            if spec.symmetric:
                scale = max(-low, high) / spec.symmetric_limit
                low, high = -scale * spec.symmetric_limit, scale * spec.symmetric_limit
            else:
                scale = (high - low) / (quant_max - quant_min)
            scale = max(scale, 1e-12)
            clipped = np.clip(centers, low, high)
            error = np.where(centers == clipped, scale ** 2 / 12.0, (centers - clipped) ** 2)
            errors.append(float(np.dot(hist, error)))
        alpha = float(self.candidates[int(np.argmin(errors))])
        return self.low * alpha if self.low < 0 else self.low, self.high * alpha if self.high > 0 else self.high


#: Calibration methods by name (variation as data): each builds a fresh estimator for one quantizer.
RANGE_ESTIMATORS = {
    "minmax": lambda config: MinMaxEstimator(),
    "percentile": lambda config: PercentileEstimator(config.percentile, config.bins),
    "entropy": lambda config: EntropyEstimator(config.bins),
    "mse": lambda config: MSEEstimator(config.bins),
}
CALIBRATION_METHODS = tuple(RANGE_ESTIMATORS)


@dataclass(frozen=True)
class CalibrationConfig:
    """How activation ranges are estimated from calibration batches.

    Args:
        method: ``"minmax"``, ``"percentile"``, ``"entropy"`` or ``"mse"``.
        percentile: the percentile of ``|x|`` kept by ``"percentile"`` (ONNX Runtime's default 99.999).
        bins: histogram bins of the histogram methods.

    Example:
        >>> CalibrationConfig("percentile", percentile=99.99).estimator().passes
        2
    """

    method: str = "minmax"
    percentile: float = 99.999
    bins: int = DEFAULT_BINS

    def __post_init__(self) -> None:
        if self.method not in RANGE_ESTIMATORS:
            raise ValueError(f"calibration_method={self.method!r} must be one of {list(CALIBRATION_METHODS)}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile!r} must be a number in (50, 100]")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 256:
            raise ValueError(f"bins={self.bins!r} must be an integer >= 256")

    def estimator(self) -> RangeEstimator:
        return RANGE_ESTIMATORS[self.method](self)
