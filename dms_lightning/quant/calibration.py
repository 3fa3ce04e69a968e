"""Post-training calibration of a fake-quantized network: activation ranges from real batches, then frozen.

The steps of :func:`post_training_quantize`, in order (each one a function, so later algorithms slot in
between them without touching the others):

1. ``reestimate_batchnorm(float_model, batches)``: optional hook on the float network (BatchNorm
   statistics re-estimated on the calibration images) — runs before anything is quantized;
2. :func:`~dms_lightning.quant.prepare.prepare_qat`: the same fake-quant twin QAT trains, so the QDQ
   export and the encodings are the same code path for QAT and PTQ;
3. :func:`calibrate`: statistics of every activation quantizer's input on the *float* network (all
   quantizers pass through), a range per quantizer from its estimator, weight ranges from the weights;
4. observers and folded BatchNorms frozen: the network is the deployable INT8 simulation.

Weight-side PTQ algorithms (:mod:`dms_lightning.quant.equalization`: cross-layer equalization before
step 2, bias correction after step 3) and per-layer sensitivity work on this same prepared network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import fx, nn

from dms_lightning.quant.adaround import adaround as learn_rounding
from dms_lightning.quant.adaround import check_adaround_arguments
from dms_lightning.quant.equalization import correct_bias, equalize_cross_layer
from dms_lightning.quant.fake_quant import FakeQuantizer, named_activation_quantizers
from dms_lightning.quant.modules import QUANTIZED_LAYERS
from dms_lightning.quant.observers import CalibrationConfig
from dms_lightning.quant.prepare import (
    QuantizationConfig,
    graph_output_quantizers,
    is_quantized,
    prepare_qat,
    set_quantizers_state,
)
from dms_lightning.utils.compression import as_network_input
from dms_lightning.utils.predictions import batch_images

#: ``reestimate_batchnorm(float_model, batches)``: re-estimate BatchNorm statistics before calibration.
BatchNormHook = Callable[[nn.Module, Sequence[torch.Tensor]], None]


def check_calibration_batches(batches: Iterable, calibration_batches: int | None, field: str = "calibration_batches"
                              ) -> None:
    """Raise when the data has fewer batches than asked for (a silent short calibration skews ranges)."""
    if calibration_batches is not None and (isinstance(calibration_batches, bool)
                                            or not isinstance(calibration_batches, int) or calibration_batches < 1):
        raise ValueError(f"{field}={calibration_batches!r} must be a positive integer (or None: all batches)")
    available = len(batches) if hasattr(batches, "__len__") else None
    if calibration_batches is not None and available is not None and calibration_batches > available:
        raise ValueError(f"{field}={calibration_batches} but the calibration data has only {available} batches; "
                         f"use {field} <= {available} or more calibration data")


def _images(batch) -> torch.Tensor:
    try:
        return batch_images(batch).detach().float()
    except TypeError as err:
        raise TypeError(f"calibration batches must be image tensors / arrays or (images, labels, ...) tuples: {err}") \
            from err


def calibration_inputs(data: Iterable, calibration_batches: int | None = None) -> list[torch.Tensor]:
    """The first ``calibration_batches`` input batches of ``data`` (a DataLoader, or tensors / arrays).

    Read once and kept, so every calibration pass sees the same images in the same order.
    """
    check_calibration_batches(data, calibration_batches)
    inputs = []
    for i, batch in enumerate(data):
        if calibration_batches is not None and i >= calibration_batches:
            break
        inputs.append(_images(batch))
    if not inputs:
        raise ValueError("the calibration data yielded no batch")
    return inputs


@contextlib.contextmanager
def _collecting(quantizers: Iterable[FakeQuantizer], estimators: dict[str, object],
                names: dict[str, FakeQuantizer]) -> Iterator[None]:
    quantizers = list(quantizers)
    try:
        for quantizer in quantizers:
            quantizer.bypass = True
        for name, quantizer in names.items():
            quantizer.range_estimator = estimators[name]
        yield
    finally:
        for quantizer in quantizers:
            quantizer.bypass = False
            quantizer.range_estimator = None


@torch.no_grad()
def set_weight_ranges(model: nn.Module) -> None:
    """Weight ranges of every quantized layer from its deployed (BatchNorm-folded) weight."""
    for module in model.modules():
        if isinstance(module, QUANTIZED_LAYERS):
            weight, _ = module.deploy_weight_and_bias()
            module.weight_quantizer.observe(weight)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Sequence[torch.Tensor], config: CalibrationConfig | None = None
              ) -> dict[str, tuple[float, float]]:
    """Set every activation range of a fake-quantized ``model`` from ``batches`` and freeze it.

    Runs ``model`` in eval mode (BatchNorm on running statistics, no weight changes) over ``batches``
    once per pass of the estimator, with every quantizer passing its input through; sets each activation
    quantizer's range with ``config``'s estimator, the weight ranges from the weights, and freezes
    observers and folded BatchNorms. ``model`` may be a prepared network or any module holding them
    (a LightningModule). Its train / eval mode is restored.

    Returns:
        ``{quantizer name: (min, max)}`` of the ranges chosen (before widening to contain 0).
    """
    config = config or CalibrationConfig()
    quantizers = named_activation_quantizers(model)
    if not quantizers:
        raise ValueError(f"{type(model).__name__} has no activation quantizer: prepare it first "
                         "(dms_lightning.quant.prepare_qat)")
    if not batches:
        raise ValueError("calibrate() needs at least one batch")
    estimators = {name: config.estimator() for name in quantizers}
    passes = max(estimator.passes for estimator in estimators.values())
    everything = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    was_training = model.training
    model.eval()
    try:
        with _collecting(everything, estimators, quantizers):
            for index in range(passes):
                for estimator in estimators.values():
                    estimator.start_pass(index)
                for inputs in batches:
                    model(as_network_input(inputs, model))
    finally:
        model.train(was_training)
    ranges = {}
    outputs = {id(q) for q in graph_output_quantizers(model)}
    for name, quantizer in quantizers.items():
        estimator = estimators[name]
        if not estimator.observed:
            raise ValueError(f"activation quantizer {name!r} saw no tensor during calibration: it is not on the "
                             "path of the network's forward")
        # The network's outputs (logits) are never clipped: a clipped top logit ties with the next one, and
        # a tie decides the class by index. Clipping estimators did exactly that to MobileNetV2 (30 % top-1).
        low, high = (estimator.low, estimator.high) if id(quantizer) in outputs else estimator.range(quantizer.spec)
        quantizer.set_range(low, high)
        ranges[name] = (low, high)
    set_weight_ranges(model)
    set_quantizers_state(model, observers=False, bn_frozen=True)
    return ranges


def post_training_quantize(
    model: nn.Module,
    calibration_data: Iterable,
    config: QuantizationConfig | None = None,
    calibration: CalibrationConfig | None = None,
    *,
    calibration_batches: int | None = None,
    reestimate_batchnorm: BatchNormHook | None = None,
    cross_layer_equalization: bool = False,
    relu6: str = "clamp",
    bias_correction: bool = False,
    adaround: bool = False,
    adaround_iterations: int = 1000,
) -> fx.GraphModule:
    """The calibrated fake-quant twin of a float ``model``, without a Trainer.

    Args:
        model: a float, ``torch.fx``-traceable network (not modified, except by ``reestimate_batchnorm``).
        calibration_data: a DataLoader of ``(images, labels, ...)`` or an iterable of image tensors / arrays.
        config: what is quantized and how (default int8 per-channel weights, uint8 activations).
        calibration: the range estimator (default ``minmax``).
        calibration_batches: batches of ``calibration_data`` to use (``None``: all).
        reestimate_batchnorm: called as ``reestimate_batchnorm(model, batches)`` on the float network
            before it is quantized.
        cross_layer_equalization: equalize the weight ranges of consecutive convs of ``model`` first, in place
            (:func:`~dms_lightning.quant.equalization.equalize_cross_layer`; its function is unchanged except
            where ``relu6="relu"`` replaces a ReLU6 between two equalized convs).
        relu6: with ``cross_layer_equalization``, what a ReLU6 inside an equalized pair becomes: ``"clamp"`` a
            per-channel clamp (exact), ``"relu"`` a ReLU (as AIMET does), ``"skip"``: the pair is left alone.
        bias_correction: after calibration, correct each quantized layer's output mean to the float network's
            on the calibration images (:func:`~dms_lightning.quant.equalization.correct_bias`).
        adaround: after calibration (and before bias correction), learn the rounding of every quantized layer's
            weights so that its output matches the float network's (:func:`~dms_lightning.quant.adaround.adaround`,
            ``adaround_iterations`` Adam steps per layer).
        adaround_iterations: Adam steps per layer for ``adaround``.

    Returns:
        The fake-quantized network (it shares ``model``'s parameters; eval mode; ranges frozen). Export it
        with the INT8 QDQ exporter, or evaluate it in PyTorch as the INT8 simulation. What equalization and
        bias correction and AdaRound did is in its ``meta["equalization"]`` / ``meta["bias_correction"]`` /
        ``meta["adaround"]``.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=5).eval()
        >>> int8 = post_training_quantize(net, [torch.randn(4, 3, 64, 64)], calibration=CalibrationConfig("mse"))
        >>> int8(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 5])
    """
    if is_quantized(model):
        raise ValueError(f"{type(model).__name__} is already fake-quantized; pass its float network "
                         "(dms_lightning.quant.float_model(model))")
    check_adaround_arguments(adaround, adaround_iterations)
    batches = calibration_inputs(calibration_data, calibration_batches)
    if reestimate_batchnorm is not None:
        reestimate_batchnorm(model, batches)
    equalized = equalize_cross_layer(model, relu6=relu6) if cross_layer_equalization else None
    prepared = prepare_qat(model, config)
    calibrate(prepared, batches, calibration)
    if equalized is not None:
        prepared.meta["equalization"] = equalized
    if adaround:
        prepared.meta["adaround"] = learn_rounding(prepared, batches, iterations=adaround_iterations)
    if bias_correction:
        prepared.meta["bias_correction"] = correct_bias(prepared, batches)
    return prepared.eval()
