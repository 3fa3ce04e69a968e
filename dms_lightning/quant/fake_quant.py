"""FakeQuantizer: an observer plus ``torch.fake_quantize_per_*_affine`` in one module.

Built only on the two core fake-quantize ops, which have straight-through gradients and export to ONNX
``QuantizeLinear``/``DequantizeLinear``. torch's deprecated eager / FX quantization workflow is not used. On the
CPU the per-tensor op is computed by :class:`_FakeQuantizePerTensor`, the same arithmetic in vectorised passes
(torch's CPU kernel rounds one element at a time), except while an exporter or ``fake_quant_disabled`` watches.

Range tracking rules (each one fixes a bug users hit with Lightning's removed QAT callback):

* activation ranges move only in ``training`` mode: validation, test, predict and export never change them
  (Lightning #8507);
* weight ranges always follow the current weights (they are not data: no moving average is wanted);
* nothing is written while a tracer or exporter runs, so an export never perturbs the model.

Post-training calibration (:func:`dms_lightning.quant.calibration.calibrate`) attaches a range estimator
(:mod:`dms_lightning.quant.observers`) to each activation quantizer and switches every quantizer to pass
its input through, so statistics come from the float network; :meth:`FakeQuantizer.set_range` then fixes
the chosen range.

A quantizer that knows the discrete values its input takes (``exact_values``: the network input, which is an
8-bit camera frame normalised by a mean and a std) keeps every one of them away from a rounding tie. The
min/max grid of a ``mean=0.5`` input has a step of exactly one pixel and puts *every* pixel half-way between
two levels, where runtimes round differently (torch and ONNX Runtime: half to even; AIMET's simulation: half
up), so the same encodings gave different integers on each. The step is widened by 1/levels at a time until
no value is within :data:`TIE_MARGIN` of a tie.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from dms_lightning.quant.spec import QuantSpec

if TYPE_CHECKING:
    from dms_lightning.quant.observers import RangeEstimator

_MIN_SCALE = 1e-8
#: The narrowest range an activation is quantized over, as Qualcomm's SNPE quantizer enforces ("a minimum range of
#: 0.01") and TensorFlow's ``QuantizeV2`` (``ensure_minimum_range``). A tensor that is (nearly) always 0, e.g. the
#: ReLU output of a squeeze-excitation block that training switched off, otherwise gets a scale of ~1e-7: SNPE would
#: widen it (its DLC no longer the network QAT trained), and XNNPACK, LiteRT's default CPU delegate, refuses a
#: convolution whose input scale x weight scale / output scale reaches 256; LiteRT 2.3 then crashes (double free)
#: instead of falling back (``tests/test_export_tflite.py``).
MIN_ACTIVATION_RANGE = 0.01
#: Distance (in grid steps) every ``exact_values`` entry keeps from a rounding tie: float32 rounding of
#: ``x / scale`` is ~1e-5 steps, so the result does not depend on how a runtime divides or rounds.
TIE_MARGIN = 1e-3
_TIE_SEARCH_STEPS = 16


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class _FakeQuantizePerTensor(torch.autograd.Function):
    """``torch.fake_quantize_per_tensor_affine`` on the CPU, bit for bit, in a few vectorised passes.

    ATen's CPU kernel rounds one element at a time (about 4 ns an element on a 2-core x86 machine: 10 ms for one
    64 x 16 x 48 x 48 activation, 40x a ReLU of it), which made fake quantization most of a QAT step. The same
    arithmetic as that kernel: ``q = clamp(round_half_even(x * (1 / scale)) + zero_point, min, max)``,
    ``y = (q - zero_point) * scale`` in float32 (a value inside the grid is an integer below 2^24 all the way, so
    exact), and the straight-through gradient passes where ``round(...) + zero_point`` fell inside ``[min, max]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                quant_max: int) -> torch.Tensor:
        scale = scale.to(x.dtype)
        zero = zero_point.to(x.dtype)
        q = torch.mul(x, torch.reciprocal(scale)).round_().add_(zero)
        if ctx.needs_input_grad[0]:
            # 1.0 inside [min, max], else 0.0, in float: multiplying by a float mask is 3x faster than by a bool one.
            middle, half = (quant_min + quant_max) / 2, (quant_max - quant_min) / 2
            ctx.save_for_backward(torch.sub(q, middle).abs_().le_(half))
        return q.clamp_(quant_min, quant_max).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


# A torch without this query is taken to always have a mode active: torch's own op is then used everywhere.
_function_mode_active = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: True)


def _fast_path(x: torch.Tensor) -> bool:
    """Whether :class:`_FakeQuantizePerTensor` stands in for torch's op: float32 on the CPU, nothing watching.

    Exporters and ``fake_quant_disabled`` recognise torch's op by name (a tracer, a torch-function mode), so
    while either runs the op itself is called.
    """
    return x.device.type == "cpu" and x.dtype == torch.float32 and not _tracing() and not _function_mode_active()


class FakeQuantizer(nn.Module):
    """Simulates ``QuantizeLinear → DequantizeLinear`` on a tensor and tracks its range.

    Args:
        spec: the integer grid (bits, symmetric, per-channel).
        num_channels: channels of a per-channel quantizer (axis 0); 1 for per-tensor.
        is_weight: ``True`` for weights: the range is the current tensor's min/max, observed in every
            mode. ``False`` for activations: an exponential moving average of batch min/max
            (``averaging_constant``), observed only in training mode while ``observer_enabled``.
        averaging_constant: weight of the newest batch in the moving average of activation ranges.

    Example:
        >>> q = FakeQuantizer(QuantSpec(8, symmetric=False, per_channel=False))
        >>> _ = q.train()(torch.linspace(0, 2.55, 256))
        >>> round(float(q.scale), 4), int(q.zero_point)
        (0.01, 0)
    """

    #: Compute per-tensor fake quantization on the CPU with :class:`_FakeQuantizePerTensor` (equal to the bit,
    #: faster); ``False`` calls torch's kernel everywhere (``benchmarks/bench_overhead.py`` compares the two).
    vectorised_cpu: ClassVar[bool] = True

    scale: torch.Tensor
    zero_point: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor
    observer_enabled: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, spec: QuantSpec, num_channels: int = 1, is_weight: bool = False,
                 averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant={averaging_constant!r} must be in (0, 1]")
        self.spec, self.is_weight, self.averaging_constant = spec, is_weight, averaging_constant
        self.per_channel = spec.per_channel and is_weight
        shape = (num_channels,) if self.per_channel else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        self.register_buffer("observer_enabled", torch.tensor(True))
        self.register_buffer("initialized", torch.tensor(False))
        # Calibration state: plain attributes, never saved in a state_dict or checkpoint.
        self.range_estimator: RangeEstimator | None = None
        self.bypass = False
        # The discrete values the input takes, when known (set by the quantization callbacks from the datamodule).
        self.exact_values: torch.Tensor | None = None

    def extra_repr(self) -> str:
        kind = "weight" if self.is_weight else "activation"
        grid = "symmetric" if self.spec.symmetric else "affine"
        return f"{kind}, {self.spec.bits}-bit {grid}, {'per-channel' if self.per_channel else 'per-tensor'}"

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the range with ``x`` and recompute scale and zero point."""
        x = x.detach().float()
        if self.per_channel:
            low, high = torch.aminmax(x.reshape(x.shape[0], -1), dim=1)
        else:
            low, high = torch.aminmax(x)
        if self.is_weight or not bool(self.initialized):
            self.min_val.copy_(low)
            self.max_val.copy_(high)
        else:
            self.min_val.lerp_(low, self.averaging_constant)
            self.max_val.lerp_(high, self.averaging_constant)
        self.initialized.fill_(True)
        self.update_qparams()

    @torch.no_grad()
    def update_qparams(self) -> None:
        """Scale and zero point from ``min_val``/``max_val`` (the range always contains 0, as QDQ requires)."""
        low = torch.clamp(self.min_val, max=0.0)
        high = torch.clamp(self.max_val, min=0.0)
        quant_min, quant_max = self.spec.quant_range
        if self.spec.symmetric:
            limit = self.spec.symmetric_limit
            scale = torch.clamp(torch.maximum(-low, high) / limit, min=_MIN_SCALE)
        else:
            scale = torch.clamp((high - low) / (quant_max - quant_min), min=_MIN_SCALE)
        if not self.is_weight:
            scale = torch.clamp(scale, min=MIN_ACTIVATION_RANGE / (quant_max - quant_min))
        if self.exact_values is not None and not self.per_channel:
            scale = self._tie_free_scale(scale, low)
        self.scale.copy_(scale)
        if self.spec.symmetric:
            self.zero_point.zero_()
        else:
            self.zero_point.copy_(self._zero_point(scale, low))

    def _zero_point(self, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        quant_min, quant_max = self.spec.quant_range
        if self.spec.symmetric:
            return torch.zeros_like(scale, dtype=torch.int32)
        return torch.clamp(quant_min - torch.round(low / scale), quant_min, quant_max).int()

    def _tie_free_scale(self, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """The smallest step ``>= scale`` (in 1/levels increments) leaving every exact value off a rounding tie."""
        quant_min, quant_max = self.spec.quant_range
        values = self.exact_values.detach().to(torch.float64).flatten()
        for step in range(_TIE_SEARCH_STEPS):
            # float32, as stored in the buffer and in the ONNX initializer.
            candidate = (scale.double() * (1 + step / (quant_max - quant_min))).float()
            grid = values / candidate.double() + self._zero_point(candidate, low).double()
            inside = grid[(grid > quant_min - 0.5) & (grid < quant_max + 0.5)]  # the rest clamps, deterministic
            if inside.numel() == 0 or float(((inside - inside.floor()) - 0.5).abs().min()) >= TIE_MARGIN:
                return candidate
        return scale

    @torch.no_grad()
    def set_range(self, low: float, high: float) -> None:
        """Fix the range to ``[low, high]`` (widened to contain 0) and recompute scale and zero point."""
        if not low <= high:
            raise ValueError(f"low={low!r} must be <= high={high!r}")
        self.min_val.fill_(low)
        self.max_val.fill_(high)
        self.initialized.fill_(True)
        self.update_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x  # an index or a shape a traced graph passes along (placement="every_tensor")
        if self.range_estimator is not None and not _tracing():
            self.range_estimator.observe(x)
        if self.bypass:
            return x
        if not _tracing() and bool(self.observer_enabled) and (self.is_weight or self.training):
            self.observe(x)
        if not bool(self.initialized):
            # No range yet (evaluated before any training batch): pass through rather than clamp to 0.
            return x
        return self.fake_quantize(x)

    def _snap(self, x: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, 0, quant_min, quant_max)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, quant_min, quant_max)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        quant_min, quant_max = self.spec.quant_range
        if self.spec.bits < 8 and _tracing():
            # ONNX QuantizeLinear stores at least 8 bits: export the weight already snapped to the narrow grid
            # (as a constant, via numpy, so the tracer folds it) inside an int8 container of the same scale.
            with torch.no_grad():
                snapped = self._snap(x.detach(), quant_min, quant_max)
            x = torch.from_numpy(snapped.cpu().numpy().copy()).to(x.device)
            quant_min, quant_max = (-128, 127) if self.spec.signed else (0, 255)
        elif self.spec.bits > 8 and _tracing():
            # The TorchScript exporter writes 8-bit Q/DQ only: trace an 8-bit pair with this scale, and
            # export_qdq_onnx gives it a 16-bit zero point (found by this quantizer's scale initializer).
            container = (-128, 127) if self.spec.signed else (0, 255)
            zero_point = torch.clamp(self.zero_point, *container)
            return torch.fake_quantize_per_tensor_affine(x, self.scale, zero_point, *container)  # activations: per tensor
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, 0, quant_min, quant_max)
        if self.vectorised_cpu and _fast_path(x):
            return _FakeQuantizePerTensor.apply(x, self.scale, self.zero_point, quant_min, quant_max)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, quant_min, quant_max)


def activation_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    return [m for m in model.modules() if isinstance(m, FakeQuantizer) and not m.is_weight]


def named_activation_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """``{module name: quantizer}`` of the activation quantizers of ``model`` (a shared one listed once)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizer) and not m.is_weight}


def set_observers_enabled(model: nn.Module, enabled: bool) -> None:
    """Freeze (``False``) or unfreeze the activation ranges of every quantizer in ``model``."""
    for quantizer in activation_quantizers(model):
        quantizer.observer_enabled.fill_(enabled)


@torch.no_grad()
def sync_activation_ranges(model: nn.Module) -> None:
    """Average activation ranges over data-parallel processes (one all-reduce), so every rank exports the same model.

    A no-op outside ``torch.distributed``. Weight ranges need no sync: DDP keeps weights identical.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    quantizers = [q for q in activation_quantizers(model) if bool(q.initialized)]
    if not quantizers:
        return
    packed = torch.cat([torch.stack([q.min_val.reshape(()), q.max_val.reshape(())]) for q in quantizers])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= dist.get_world_size()
    for i, quantizer in enumerate(quantizers):
        quantizer.min_val.fill_(packed[2 * i])
        quantizer.max_val.fill_(packed[2 * i + 1])
        quantizer.update_qparams()
