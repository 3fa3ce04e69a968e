"""AdaRound: learned rounding of the weights of a calibrated fake-quant network (Nagel et al., 2020).

Rounding each weight to the nearest grid point minimises the error of the *weights*, not of the layer's
*output*: for a layer ``y = W x``, the rounding that minimises ``E‖W̃x − Wx‖²`` often rounds some weights the
other way ("Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020). AdaRound learns, per
weight, whether to round down or up: ``W̃ = s · (⌊W/s⌋ + h(V))`` with the rectified sigmoid
``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)`` (ζ = 1.1, γ = −0.1), ``V`` initialised so that ``h(V)`` is the
fractional part of ``W/s`` (``W̃ = W`` at the start), and minimises

    ‖f(x̂; W̃) − f(x; W)‖² + λ Σ (1 − |2h(V) − 1|^β)

by Adam, with β annealed from 20 to 2 after a warm-up without the regulariser, which pushes every ``h`` to
0 or 1. Layers are optimised one after another in graph order; each sees the input the INT8 simulation gives
it (``x̂``, with the earlier layers already rounded and every activation quantizer on) and is asked to
reproduce the float network's output of that layer (``f(x; W)``, every quantizer off): the paper's
"asymmetric reconstruction", which also absorbs the error of the layers before it. As in AIMET, the target is
the layer's own output (BatchNorm folded, before its activation) and the scales found by calibration stay.

The chosen grid point of each weight is stored as the layer's ``weight_offset`` buffer (see
:mod:`dms_lightning.quant.modules`): the deployed weight becomes ``s · n`` exactly, so the plain
round-to-nearest of the fake quantizer, of the QDQ ONNX, of the ``.tflite`` and of the encodings' float model
all give the learned integer ``n``. The float network (whose parameters the twin shares) is not changed.

Cost: ``iterations`` Adam steps of one layer on ``batch_size`` images, per quantized layer, plus two forwards
of the network over ``max_images`` images per layer to collect its input and target. The paper and AIMET use
10 000 steps per layer; :func:`adaround` defaults to 1000, measured in ``benchmarks/bench_mixed_precision.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from dms_lightning.quant.equalization import float_simulation
from dms_lightning.quant.modules import QUANTIZED_LAYERS, QuantLinear, set_weight_offset

_ZETA, _GAMMA = 1.1, -0.1


@dataclass
class AdaRoundResult:
    """What :func:`adaround` did.

    Attributes:
        layers: the layers rounded, in the order they were optimised.
        iterations: Adam steps per layer.
        flipped: per layer, the fraction of weights rounded to the other grid point than the nearest one.
        error_nearest, error_adaround: per layer, the mean squared error of its output in the INT8 simulation
            against the float network's, on the images used, with round-to-nearest and with the learned rounding
            (the layer's input is the simulation's in both, the earlier layers already rounded).
    """

    layers: list[str] = field(default_factory=list)
    iterations: int = 0
    flipped: dict[str, float] = field(default_factory=dict)
    error_nearest: dict[str, float] = field(default_factory=dict)
    error_adaround: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self) | {"error_ratio": self.error_ratio, "flipped_fraction": self.flipped_fraction}

    @property
    def flipped_fraction(self) -> float:
        """Mean over layers of the fraction of weights rounded the other way than round-to-nearest."""
        return sum(self.flipped.values()) / len(self.flipped) if self.flipped else 0.0

    @property
    def error_ratio(self) -> float:
        """Mean over layers of (error with the learned rounding) / (error with round-to-nearest)."""
        ratios = [self.error_adaround[n] / self.error_nearest[n] for n in self.layers if self.error_nearest[n] > 0]
        return sum(ratios) / len(ratios) if ratios else 1.0


def check_adaround_arguments(enabled: bool, iterations: int) -> None:
    """The ``adaround`` / ``adaround_iterations`` arguments of PTQ, checked before any work is done."""
    if not isinstance(enabled, bool):
        raise ValueError(f"adaround={enabled!r} must be true or false")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"adaround_iterations={iterations!r} must be a positive integer (Adam steps per layer)")


class _Stop(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a capture hook: the rest of the forward is not needed."""


def _layers_in_order(model: nn.Module) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    layers = {name: m for name, m in modules.items() if isinstance(m, QUANTIZED_LAYERS)}
    if isinstance(model, fx.GraphModule):
        ordered = [str(node.target) for node in model.graph.nodes if node.op == "call_module"]
        return {name: layers[name] for name in dict.fromkeys(ordered) if name in layers}
    return layers


def _capture(model: nn.Module, layer: nn.Module, images: torch.Tensor, chunk: int, want_output: bool
             ) -> torch.Tensor:
    """The input (or output) of ``layer`` when ``model`` runs on ``images``, chunk by chunk."""
    captured: list[torch.Tensor] = []

    def hook(_module, inputs, output):
        captured.append((output if want_output else inputs[0]).detach())
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        for start in range(0, images.shape[0], chunk):
            try:
                model(images[start:start + chunk])
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != math.ceil(images.shape[0] / chunk):
        raise RuntimeError(f"{type(layer).__name__} was not reached in the network's forward")
    return torch.cat(captured)


def _run(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, QuantLinear):
        return F.linear(x, weight, bias)
    return layer.conv._conv_forward(x, weight, bias)


def _reconstruction(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # AIMET's: the squared norm over channels, averaged over images and positions.
    return (output - target).pow(2).sum(dim=1).mean()


def _adaround_layer(layer: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, iterations: int,
                    batch_size: int, reg_weight: float, beta_range: tuple[float, float], warm_up: float, lr: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, float, float, float]:
    quantizer = layer.weight_quantizer
    with torch.no_grad():
        weight, bias = layer.deploy_weight_and_bias()
        weight, bias = weight.detach(), None if bias is None else bias.detach()
        view = (-1,) + (1,) * (weight.dim() - 1) if quantizer.per_channel else ()
        scale = quantizer.scale.detach().reshape(view)
        zero_point = quantizer.zero_point.detach().to(weight.dtype).reshape(view)
        quant_min, quant_max = quantizer.spec.quant_range
        ratio = weight / scale
        floor = torch.floor(ratio)
        rest = (ratio - floor).clamp(1e-4, 1 - 1e-4)
        logits = -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)

    def rounded(h: torch.Tensor) -> torch.Tensor:
        return scale * (torch.clamp(floor + h + zero_point, quant_min, quant_max) - zero_point)

    def error(w: torch.Tensor) -> float:
        total = 0.0
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                out = _run(layer, inputs[start:start + batch_size], w, bias)
                total += float(_reconstruction(out, target[start:start + batch_size])) * out.shape[0]
        return total / inputs.shape[0]

    nearest = rounded(torch.round(ratio) - floor)
    error_nearest = error(nearest)
    alpha = nn.Parameter(logits.clone())
    optimizer = torch.optim.Adam([alpha], lr=lr)
    start_beta, end_beta = beta_range
    warm = int(warm_up * iterations)
    with torch.enable_grad():
        for step in range(iterations):
            index = torch.randint(inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=generator)
            h = torch.clamp(torch.sigmoid(alpha) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
            loss = _reconstruction(_run(layer, inputs[index], rounded(h), bias), target[index])
            if step >= warm:
                progress = (step - warm) / max(iterations - warm, 1)
                beta = end_beta + (start_beta - end_beta) * (1 - progress)
                loss = loss + reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        chosen = rounded((alpha >= 0).to(weight.dtype))
        flipped = float((chosen != nearest).float().mean())
        error_adaround = error(chosen)
    return chosen - weight, flipped, error_nearest, error_adaround


@torch.no_grad()
def adaround(model: nn.Module, batches: Sequence[torch.Tensor], *, iterations: int = 1000, batch_size: int = 32,
             max_images: int | None = 256, reg_weight: float = 0.01, beta_range: tuple[float, float] = (20.0, 2.0),
             warm_up: float = 0.2, lr: float = 1e-2, seed: int = 0) -> AdaRoundResult:
    """Learn the rounding of every quantized layer's weights of a calibrated fake-quant ``model``, in place.

    Args:
        model: a prepared, calibrated network (its weight scales are kept).
        batches: calibration image batches; the first ``max_images`` images are used (``None``: all).
        iterations: Adam steps per layer (the paper and AIMET: 10 000).
        batch_size: images per step.
        reg_weight: λ, the weight of the rounding regulariser (AIMET's default 0.01).
        beta_range: β at the end of the warm-up and at the last step.
        warm_up: fraction of the steps without the regulariser.
        lr: Adam's learning rate.
        seed: of the images drawn per step, so a rerun gives the same rounding.

    Returns:
        The layers rounded, the fraction of weights flipped and the output error before / after, per layer.
    """
    for name, value, low in (("iterations", iterations, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images={max_images!r} must be a positive integer or None (all calibration images)")
    if not 0.0 <= warm_up < 1.0:
        raise ValueError(f"warm_up={warm_up!r} must be in [0, 1)")
    if not (len(beta_range) == 2 and beta_range[0] >= beta_range[1] > 0):
        raise ValueError(f"beta_range={beta_range!r} must be (start, end) with start >= end > 0")
    if not batches:
        raise ValueError("adaround() needs at least one batch")
    layers = _layers_in_order(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layer: prepare and calibrate it first")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    images = torch.cat([b.to(device) for b in batches])[:max_images]
    generator = torch.Generator().manual_seed(seed)
    result = AdaRoundResult(iterations=iterations)
    was_training = model.training
    model.eval()
    chunk = max(batch_size, 64)
    try:
        for name, layer in layers.items():
            inputs = _capture(model, layer, images, chunk, want_output=False)
            with float_simulation(model):
                target = _capture(model, layer, images, chunk, want_output=True)
            offset, flipped, before, after = _adaround_layer(
                layer, inputs, target, iterations=iterations, batch_size=batch_size, reg_weight=reg_weight,
                beta_range=tuple(beta_range), warm_up=warm_up, lr=lr, generator=generator)
            existing = getattr(layer, "weight_offset", None)
            set_weight_offset(layer, offset if existing is None else existing + offset)
            result.layers.append(name)
            result.flipped[name], result.error_nearest[name], result.error_adaround[name] = flipped, before, after
            del inputs, target
    finally:
        model.train(was_training)
    return result
