"""PostTrainingQuantization: calibrate the trained network's fake-quant twin at the end of ``fit``.

The network is quantized in PyTorch, by the same machinery as QAT (:func:`~dms_lightning.quant.prepare_qat`
through :func:`~dms_lightning.quant.target.quantize_target`), then calibrated on real batches
(:mod:`dms_lightning.quant.calibration`). The run ends with a fake-quantized network with frozen ranges:
exactly what QAT leaves behind, so the INT8 QDQ export, the encodings and the SNPE/QNN bundle are the
same for both. For quantizing an ONNX file with ONNX Runtime instead, see
:func:`dms_lightning.export.ort_quantize.quantize_onnx`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from dms_lightning.models.batchnorm import reestimate_in_run
from dms_lightning.quant.adaround import AdaRoundResult, adaround, check_adaround_arguments
from dms_lightning.quant.calibration import calibrate, calibration_inputs, check_calibration_batches
from dms_lightning.quant.equalization import (
    RELU6_MODES,
    BiasCorrectionResult,
    EqualizationResult,
    correct_bias,
    equalize_cross_layer,
)
from dms_lightning.quant.mixed_precision import (
    MixedPrecisionResult,
    check_selection_arguments,
    select_mixed_precision,
)
from dms_lightning.quant.observers import CALIBRATION_METHODS, CalibrationConfig
from dms_lightning.quant.targets import (
    announce_target,
    resolve_target_config,
    target_info,
    warn_padded_channels,
)
from dms_lightning.quant.target import (
    QuantizerWrapping,
    check_target_quantizable,
    datamodule_input_values,
    quantize_target,
    set_input_values,
    target_is_quantized,
)
from dms_lightning.utils.artifacts import ParityRule, QuantizedNetwork, warn_without_int8_writer
from dms_lightning.utils.checkpoint import install_architecture_restore, record_architecture_change
from dms_lightning.utils.compression import compression_target
from dms_lightning.utils.predictions import accuracy, top1_agreement, torch_logits

CalibrationMethod = Literal["minmax", "percentile", "entropy", "mse"]
CALIBRATION_SPLITS = ("train", "val")

# Arguments of the former ONNX Runtime-based callback that named ONNX nodes, and what replaces them.
_ONNX_ONLY_ARGUMENTS = {
    "exclude_op_types": "quantize_linear=False (for Gemm / MatMul) or exclude=[layer-name patterns]",
    "exclude_nodes": "exclude=[layer-name patterns such as 'fc' or 'layer4.*']",
    "include_nodes": "include=[layer-name patterns such as 'classifier.*']",
}


_MOVED = {name: "dms_lightning.export.ort_quantize" for name in ("quantize_onnx", "BatchCalibrationReader",
                                                                   "excluded_nodes")}
_MOVED["check_calibration_batches"] = "dms_lightning.quant.calibration"


def __getattr__(name: str):
    if name in _MOVED:
        # ImportError rather than AttributeError, so `from dms_lightning.quant.ptq import ...` shows where it went.
        raise ImportError(f"dms_lightning.quant.ptq.{name} moved: from {_MOVED[name]} import {name} "
                          "(the quant package is torch-only and writes no ONNX file)")
    raise AttributeError(f"module 'dms_lightning.quant.ptq' has no attribute {name!r}")


def _patterns(field: str, value: list[str] | None) -> tuple[str, ...]:
    value = list(value or [])
    if not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{field}={value!r} must be a list of non-empty layer-name patterns")
    return tuple(value)


class PostTrainingQuantization(Callback):
    """Post-training INT8 quantization in PyTorch at the end of ``fit``, calibrated on real batches.

    At ``on_fit_end`` the network (``pl_module.compression_target``, else the module's children) is
    replaced by its fake-quantized twin — BatchNorm folded into the convs, int8 per-channel symmetric
    weights, uint8 per-tensor activations, the placement QAT uses — and calibrated: ``calibration_batches``
    un-augmented batches of ``calibration_split`` run through the float network in eval mode (weights
    unchanged), each activation range is set by ``calibration_method``, then observers and BatchNorm are
    frozen. The module is left fake-quantized, so the callbacks after this one export and measure the
    INT8 model (``trainer.test()`` after ``fit`` tests it too). **List it before** ``ONNXExport``,
    ``SNPEExport`` and ``CompressionReport``: Lightning runs ``on_fit_end`` in callback order. One per
    Trainer (a second is refused in ``setup``: the first leaves the network quantized); compare calibration
    settings with :func:`~dms_lightning.quant.post_training_quantize`, which returns a twin each time.

    Calibration runs on every rank (same batches, same ranges). Like QAT it writes no file itself: with
    ``export=True`` it hands the fake-quant network down to :class:`~dms_lightning.callbacks.ONNXExport`
    (placed after it), which writes the INT8 QDQ ONNX model and its encodings on rank 0
    (``<dirpath>/<filename>.onnx`` and ``.encodings.json``), checks them against the fake-quant model on the
    test split (``min_agreement``, else ``ParityError``) and lists the report variant. The float and INT8
    accuracies of the PyTorch models on the test split are in :attr:`result`.

    Args:
        calibration_batches: batches of ``calibration_split`` used for calibration.
        calibration_split: ``"train"`` (without augmentation) or ``"val"``.
        calibration_method: ``"minmax"``, ``"percentile"``, ``"entropy"`` (KL) or ``"mse"``
            (:mod:`dms_lightning.quant.observers`).
        percentile: the percentile of ``|x|`` kept by ``"percentile"`` calibration.
        mode: ``"static"`` (the only mode; for ONNX Runtime's dynamic quantization use
            :func:`dms_lightning.export.ort_quantize.quantize_onnx`).
        weight_bits: 8 (default, or the target's), 7 or 4.
        per_channel: one weight scale per output channel (default ``True``, or the target's).
        symmetric_activations: int8 activations with zero point 0 instead of uint8 affine (default ``False``, or
            the target's).
        reduce_range: 7-bit weights (x86 CPUs without VNNI can saturate int16 sums with full 8 bits);
            the same as ``weight_bits=7``.
        quantize_depthwise: also quantize depthwise convs.
        quantize_linear: also quantize ``Linear`` layers.
        exclude: ``fnmatch`` patterns of layer names (within the network) kept in float.
        include: if given, only layers matching these patterns are quantized.
        export: hand the network down at fit end for an INT8 ONNX model and encodings (needs ONNXExport after
            this callback; without one a warning says nothing will be written).
        dirpath: output folder (default ``<trainer.log_dir>/quantization``).
        filename: file stem of the INT8 model.
        evaluate_batches: test batches for the accuracy and parity figures (``None``: all).
        min_agreement: minimum top-1 agreement of the QDQ graph with the fake-quant model on the test split.
        exclude_op_types, exclude_nodes, include_nodes: arguments of the former ONNX Runtime-based
            callback (they named ONNX nodes); a non-empty value is an error naming its replacement.
        precision: per-layer precision overrides, ``{layer-name pattern: "w8a16" | "w8a8" | "float" | ...}``
            (the last matching pattern wins; see :class:`~dms_lightning.quant.QuantizationConfig`).
        placement: ``"fused"`` or ``"every_tensor"`` (every tensor between two ops quantized, as full-integer
            TFLite runs them; see :class:`~dms_lightning.quant.QuantizationConfig`); default ``"fused"``, or the
            target's.
        max_accuracy_drop_pt: automatic mixed precision: promote the fewest, most sensitive layers to
            ``promote_to`` until the validation top-1 of the INT8 simulation is within this many points of the
            float network (:func:`~dms_lightning.quant.mixed_precision.select_mixed_precision`); the chosen
            layers are in :attr:`mixed_precision` and ``result["mixed_precision"]``. ``None``: uniform.
        promote_to: ``"w8a16"`` (16-bit activations around a promoted layer, what HTP runs) or ``"float"``.
        max_promoted: most layers promoted, a fraction of the quantized layers or a count.
        cross_layer_equalization: before quantizing, equalize the per-channel weight ranges of consecutive convs
            (Nagel et al., 2019; :func:`~dms_lightning.quant.equalization.equalize_cross_layer`). The float network
            is changed in place, function-preserving unless ``relu6="relu"`` replaced a ReLU6; the FP32
            accuracies before and after are in ``result["equalization"]``. Pays off with per-tensor weights.
        relu6: with ``cross_layer_equalization``, what a ReLU6 between two equalized convs becomes:
            ``"clamp"`` (default) a per-channel clamp at ``6 / s`` (exact; one ``Min`` op in the exported graph),
            ``"relu"`` a ReLU (as AIMET does; no extra op, the output changes where an activation exceeded 6),
            ``"skip"``: those pairs are left alone. Recorded in the checkpoint.
        bias_correction: after calibration, give each quantized layer's deployed bias the offset that makes its
            per-channel output mean in the INT8 simulation equal the float network's on the calibration batches
            (:func:`~dms_lightning.quant.equalization.correct_bias`); the float network is not changed.
        adaround: after calibration and before bias correction, learn whether each weight rounds down or up so
            that every quantized layer's output in the INT8 simulation matches the float network's on the
            calibration batches (Nagel et al., 2020; :func:`~dms_lightning.quant.adaround.adaround`). The learned
            grid points are stored in the checkpoint beside the weights; the float network is not changed.
            Costs ``adaround_iterations`` Adam steps of each layer (minutes on a CPU).
        adaround_iterations: Adam steps per layer for ``adaround`` (the paper and AIMET: 10 000).
        target: the device, ``"htp"`` | ``"cpu_x86"`` | ``"cpu_arm"`` (:mod:`dms_lightning.quant.targets`): its
            profile picks placement, activation signedness and weight grid where those arguments are ``None``,
            refuses precisions it has no kernels for (``promote_to="w8a16"`` on a CPU), and its reasons go into
            the log and the report.
        min_integer_reduction: spatial convs without groups whose dot products are shorter than this
            (``in_channels x kernel area``: 9 for a grayscale 3x3 stem) stay in float; default 0 (none), or the
            target's (``cpu_x86``: 32, where such an integer conv is slower than the float one).

    Example:
        >>> from dms_lightning.callbacks import PostTrainingQuantization
        >>> ptq = PostTrainingQuantization(calibration_batches=8, calibration_method="percentile")
        >>> trainer = Trainer(callbacks=[ptq, ONNXExport(checkpoint="last")])  # doctest: +SKIP
    """

    #: Hands its fake-quantized network down to export (``int8_networks``) instead of writing files.
    hands_down_int8: ClassVar[bool] = True

    def __init__(
        self,
        calibration_batches: int = 16,
        calibration_split: Literal["train", "val"] = "val",
        calibration_method: CalibrationMethod = "minmax",
        percentile: float = 99.999,
        mode: Literal["static"] = "static",
        weight_bits: int | None = None,
        per_channel: bool | None = None,
        symmetric_activations: bool | None = None,
        reduce_range: bool = False,
        quantize_depthwise: bool = True,
        quantize_linear: bool = True,
        exclude: list[str] | None = None,
        include: list[str] | None = None,
        export: bool = True,
        dirpath: str | None = None,
        filename: str = "ptq_int8",
        evaluate_batches: int | None = None,
        min_agreement: float = 0.99,
        exclude_op_types: list[str] | None = None,
        exclude_nodes: list[str] | None = None,
        include_nodes: list[str] | None = None,
        precision: dict[str, str] | None = None,
        placement: str | None = None,
        max_accuracy_drop_pt: float | None = None,
        promote_to: Literal["w8a16", "float"] = "w8a16",
        max_promoted: float | int = 0.2,
        cross_layer_equalization: bool = False,
        relu6: Literal["clamp", "relu", "skip"] = "clamp",
        bias_correction: bool = False,
        adaround: bool = False,
        adaround_iterations: int = 1000,
        target: str | None = None,
        min_integer_reduction: int | None = None,
    ) -> None:
        super().__init__()
        if mode == "dynamic":
            raise ValueError("mode='dynamic' is not a torch-side quantization: PostTrainingQuantization calibrates "
                             "static activation ranges; for ONNX Runtime's dynamic quantization of an FP32 ONNX file "
                             "use dms_lightning.export.ort_quantize.quantize_onnx(..., mode='dynamic')")
        if mode != "static":
            raise ValueError(f"mode={mode!r} must be 'static'")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) \
                or calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches!r} must be a positive integer")
        if calibration_split not in CALIBRATION_SPLITS:
            raise ValueError(f"calibration_split={calibration_split!r} must be one of {list(CALIBRATION_SPLITS)}")
        if calibration_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration_method={calibration_method!r} must be one of {list(CALIBRATION_METHODS)}")
        self.calibration = CalibrationConfig(calibration_method, percentile)
        if reduce_range and weight_bits not in (None, 7, 8):
            raise ValueError(f"reduce_range=True means 7-bit weights; it contradicts weight_bits={weight_bits!r}")
        for field, value in (("exclude_op_types", exclude_op_types), ("exclude_nodes", exclude_nodes),
                             ("include_nodes", include_nodes)):
            if value:
                raise ValueError(f"{field}={value!r} named ONNX nodes of the former ONNX Runtime-based "
                                 f"PostTrainingQuantization; the network is now quantized in PyTorch: use "
                                 f"{_ONNX_ONLY_ARGUMENTS[field]}")
        if not filename or "/" in filename:
            raise ValueError(f"filename={filename!r} must be a non-empty file stem without '/'")
        if evaluate_batches is not None and (isinstance(evaluate_batches, bool)
                                             or not isinstance(evaluate_batches, int) or evaluate_batches < 1):
            raise ValueError(f"evaluate_batches={evaluate_batches!r} must be a positive integer or None (all)")
        if not 0.0 <= min_agreement <= 1.0:
            raise ValueError(f"min_agreement={min_agreement!r} must be in [0, 1]")
        self.config, self.target = resolve_target_config(
            target, weight_bits=7 if reduce_range else weight_bits, activation_bits=None,
            symmetric_activations=symmetric_activations, placement=placement,
            min_integer_reduction=min_integer_reduction, per_channel_weights=per_channel,
            quantize_depthwise=quantize_depthwise, quantize_linear=quantize_linear,
            exclude=_patterns("exclude", exclude), include=_patterns("include", include),
            precision=dict(precision or {}))
        check_selection_arguments(0.0 if max_accuracy_drop_pt is None else max_accuracy_drop_pt, promote_to)
        if self.target is not None and max_accuracy_drop_pt is not None and promote_to == "w8a16" \
                and 16 not in self.target.activation_bits:
            raise ValueError(f"promote_to='w8a16' is not run by target={self.target.name!r} ({self.target.device}, "
                             f"activations {list(self.target.activation_bits)} bits): use promote_to='float'")
        if isinstance(max_promoted, bool) or not isinstance(max_promoted, (int, float)) or max_promoted < 0 or (
                isinstance(max_promoted, float) and max_promoted > 1):
            raise ValueError(f"max_promoted={max_promoted!r} must be a fraction in [0, 1] or a layer count >= 0")
        self.max_accuracy_drop_pt, self.promote_to, self.max_promoted = max_accuracy_drop_pt, promote_to, max_promoted
        self.mixed_precision: MixedPrecisionResult | None = None
        for field, value in (("cross_layer_equalization", cross_layer_equalization),
                             ("bias_correction", bias_correction)):
            if not isinstance(value, bool):
                raise ValueError(f"{field}={value!r} must be true or false")
        if relu6 not in RELU6_MODES:
            raise ValueError(f"relu6={relu6!r} must be one of {list(RELU6_MODES)}")
        self.cross_layer_equalization, self.relu6 = cross_layer_equalization, relu6
        self.bias_correction = bias_correction
        check_adaround_arguments(adaround, adaround_iterations)
        self.adaround, self.adaround_iterations = adaround, adaround_iterations
        self.adarounded: AdaRoundResult | None = None
        self.equalization: EqualizationResult | None = None
        self.bias_corrected: BiasCorrectionResult | None = None
        self._equalization_accuracy: dict[str, float] = {}
        self.calibration_batches, self.calibration_split = calibration_batches, calibration_split
        self.export, self.dirpath, self.filename = export, dirpath, filename
        self.evaluate_batches, self.min_agreement = evaluate_batches, min_agreement
        self.parity = ParityRule(split="test", batches=evaluate_batches, min_top1_agreement=min_agreement,
                                 owner="PostTrainingQuantization")
        self.ranges: dict[str, tuple[float, float]] = {}
        self.result: dict[str, Any] = {}
        self.int8_networks: list[QuantizedNetwork] = []

    # ---------------------------------------------------------------- checks before training
    def _calibration_loader(self, trainer: Trainer):
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise MisconfigurationException("PostTrainingQuantization needs a datamodule to draw calibration batches "
                                            "from; call trainer.fit(model, datamodule=...) or use "
                                            "dms_lightning.quant.post_training_quantize()")
        if hasattr(datamodule, "calibration_dataloader"):
            return datamodule.calibration_dataloader(self.calibration_split)
        if self.calibration_split == "train":
            rank_zero_warn("PostTrainingQuantization: the datamodule has no calibration_dataloader(split); "
                           "calibrating on train_dataloader(), which may be augmented and shuffled")
            return datamodule.train_dataloader()
        return datamodule.val_dataloader()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Any ckpt_path= load of this run rebuilds the recorded architecture before the weights load.
        install_architecture_restore(pl_module)
        if stage != "fit":
            return
        from dms_lightning.quant.qat import QuantizationAwareTraining

        if any(isinstance(callback, QuantizationAwareTraining) for callback in trainer.callbacks):
            raise MisconfigurationException(
                "PostTrainingQuantization and QuantizationAwareTraining in one run would quantize the same network "
                "twice; keep one of them (QAT already produces the INT8 model)")
        self._check_single_ptq(trainer)
        check_target_quantizable(pl_module, self.config, "PostTrainingQuantization")
        announce_target(self.target, "PostTrainingQuantization")
        if self.export:
            warn_without_int8_writer(trainer, self)

    @staticmethod
    def _check_single_ptq(trainer: Trainer) -> None:
        # Each one swaps the network for its quantized twin in place at fit end: a second one would find it quantized
        # already and skip, its file never written. Two calibrations of one network are two post_training_quantize
        # calls (each returns its own twin and leaves the float network alone).
        listed = [callback for callback in trainer.callbacks if isinstance(callback, PostTrainingQuantization)]
        if len(listed) > 1:
            names = ", ".join(f"filename={callback.filename!r}" for callback in listed)
            raise MisconfigurationException(
                f"PostTrainingQuantization is listed {len(listed)} times in the Trainer's callbacks ({names}): each "
                "quantizes the network in place when fit ends, so the second would find it already quantized and "
                "write nothing. Keep one PostTrainingQuantization per run; to compare settings, call "
                "dms_lightning.quant.post_training_quantize(network, calibration_data, config, ...) on the trained "
                "network once per setting (it returns a quantized twin and leaves the network float)")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Fail before training, not after it: a calibration request the data cannot satisfy is a config error.
        try:
            check_calibration_batches(self._calibration_loader(trainer), self.calibration_batches)
        except ValueError as err:
            raise MisconfigurationException(f"PostTrainingQuantization: {err} ({self.calibration_split} split)") \
                from err

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The same record QAT writes: checkpoints of the fit are float, one saved after PTQ is quantized; a
        # later ckpt_path= load (e.g. test(ckpt_path="best") after PTQ) then gets the architecture it was saved with.
        record_architecture_change(checkpoint, QuantizerWrapping,
                                   QuantizerWrapping.record(pl_module, self.config, equalization=self.equalization))

    # ---------------------------------------------------------------- calibration
    def reestimate_batchnorm(self, network: nn.Module, batches: Sequence[torch.Tensor]) -> None:
        """Runs on the float network with the calibration batches, before it is quantized and calibrated.

        The place for BatchNorm re-estimation (the same signature as ``post_training_quantize``'s
        ``reestimate_batchnorm`` hook); by default the statistics stay as trained.
        """

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if target_is_quantized(pl_module):
            rank_zero_warn("PostTrainingQuantization: the network is already fake-quantized (a QAT or PTQ "
                           "checkpoint); its quantization ranges are kept, not calibrated again")
            return
        batches = calibration_inputs(self._calibration_loader(trainer), self.calibration_batches)
        # Ranges follow the BatchNorm statistics: fresh ones when the run has a BatchNormReestimation.
        reestimate_in_run(trainer, pl_module, "before PTQ calibration")
        self.reestimate_batchnorm(compression_target(pl_module), batches)
        test_loader = _split_loader(trainer, "test")
        if self.cross_layer_equalization:
            self._equalize(pl_module, test_loader)
        reference = self._predictions(pl_module, test_loader)
        if self.max_accuracy_drop_pt is not None:
            self._select_precision(trainer, pl_module, batches)
        quantize_target(pl_module, self.config)
        set_input_values(pl_module, datamodule_input_values(trainer))
        target = compression_target(pl_module)
        self.ranges = calibrate(target, batches, self.calibration)
        if self.adaround:
            self.adarounded = adaround(target, batches, iterations=self.adaround_iterations)
            rank_zero_info(f"[PostTrainingQuantization] AdaRound of {len(self.adarounded.layers)} layers "
                           f"({self.adaround_iterations} steps each): layer output error x"
                           f"{self.adarounded.error_ratio:.2f} of round-to-nearest's, "
                           f"{self.adarounded.flipped_fraction:.1%} of the weights rounded the other way")
        if self.bias_correction:
            self.bias_corrected = correct_bias(target, batches)
            rank_zero_info(f"[PostTrainingQuantization] bias correction of {len(self.bias_corrected.layers)} layers: "
                           f"mean |output-mean shift| {self.bias_corrected.mean_shift_before:.3g} -> "
                           f"{self.bias_corrected.mean_shift_after:.3g}")
        self.result = {"calibration_method": self.calibration.method, "calibration_batches": len(batches),
                       "calibration_split": self.calibration_split, "config": self.config.to_dict(),
                       "activation_quantizers": len(self.ranges)}
        if self.equalization is not None:
            self.result["equalization"] = self.equalization.to_dict() | self._equalization_accuracy
        if self.bias_corrected is not None:
            self.result["bias_correction"] = {"layers": len(self.bias_corrected.layers),
                                              "mean_shift_before": self.bias_corrected.mean_shift_before,
                                              "mean_shift_after": self.bias_corrected.mean_shift_after}
        if self.adarounded is not None:
            self.result["adaround"] = {"layers": len(self.adarounded.layers), "iterations": self.adaround_iterations,
                                       "error_ratio": self.adarounded.error_ratio,
                                       "flipped": self.adarounded.flipped_fraction}
        if self.mixed_precision is not None:
            self.result["mixed_precision"] = self.mixed_precision.to_dict()
        if reference is not None:
            quantized = self._predictions(pl_module, test_loader)
            self.result.update({"fp32_accuracy": accuracy(*reference), "int8_accuracy": accuracy(*quantized),
                                "agreement_with_fp32": top1_agreement(reference[0], quantized[0])})
            rank_zero_info(f"[PostTrainingQuantization] {self.calibration.method} calibration on {len(batches)} "
                           f"{self.calibration_split} batches: test accuracy FP32 {self.result['fp32_accuracy']:.4f}"
                           f" -> INT8 (fake-quant) {self.result['int8_accuracy']:.4f}")
        padded = warn_padded_channels(self.target, target, "PostTrainingQuantization")
        self.result.update(target_info(self.target, padded))
        if self.export:
            # quant/ writes no file: the network flows down to ONNXExport, which runs after this hook.
            self.int8_networks = [QuantizedNetwork(
                name=self.filename, network=target, producer=type(self).__name__, dirpath=self.dirpath,
                parity=self.parity, info={k: v for k, v in self.result.items() if k != "config"})]

    def _equalize(self, pl_module: LightningModule, test_loader) -> None:
        before = self._predictions(pl_module, test_loader)
        self.equalization = equalize_cross_layer(compression_target(pl_module), relu6=self.relu6)
        after = self._predictions(pl_module, test_loader)
        self._equalization_accuracy = {} if before is None else {
            "fp32_accuracy_before": accuracy(*before), "fp32_accuracy_after": accuracy(*after)}
        result = self.equalization
        message = (f"[PostTrainingQuantization] cross-layer equalization of {len(result.pairs)} conv pairs "
                   f"({len(result.skipped)} skipped, {len(result.relu6_replaced)} ReLU6 made "
                   f"{'per-channel clamps' if result.relu6_mode == 'clamp' else 'ReLU'}): mean "
                   f"per-channel weight-range ratio {result.range_ratio_before:.1f} -> {result.range_ratio_after:.1f}")
        if before is not None:
            message += (f"; FP32 test accuracy {self._equalization_accuracy['fp32_accuracy_before']:.4f} -> "
                        f"{self._equalization_accuracy['fp32_accuracy_after']:.4f}")
        rank_zero_info(message)

    def _select_precision(self, trainer: Trainer, pl_module: LightningModule, batches: list[torch.Tensor]) -> None:
        """Automatic mixed precision on the validation split; the chosen overrides join :attr:`config`."""
        val_loader = _split_loader(trainer, "val")
        if val_loader is None or (hasattr(val_loader, "__len__") and len(val_loader) == 0):
            raise MisconfigurationException("PostTrainingQuantization(max_accuracy_drop_pt=...) selects the "
                                            "precision on the validation split, and the run has none")
        result = select_mixed_precision(compression_target(pl_module), batches, val_loader,
                                        max_accuracy_drop_pt=self.max_accuracy_drop_pt, config=self.config,
                                        calibration=self.calibration, promote_to=self.promote_to,
                                        max_promoted=self.max_promoted)
        result.model = None  # the network is quantized again below, in place
        self.mixed_precision = result
        self.config = replace(self.config, precision=tuple(self.config.precision) + tuple(result.precision.items()))
        message = (f"[PostTrainingQuantization] mixed precision: {len(result.promoted)} of {result.quantized_layers} "
                   f"layers at {result.promote_to} ({', '.join(result.promoted) or 'none'}); validation top-1 float "
                   f"{result.float_accuracy:.4f}, uniform {result.uniform_accuracy:.4f}, mixed {result.accuracy:.4f}")
        if result.met:
            rank_zero_info(message)
        else:
            rank_zero_warn(f"{message}: the {self.max_accuracy_drop_pt} pt budget is not met with at most "
                           f"{self.max_promoted} layers promoted (raise max_promoted or use promote_to='float')")

    def _predictions(self, pl_module: LightningModule, loader) -> tuple[np.ndarray, np.ndarray] | None:
        if loader is None or (hasattr(loader, "__len__") and len(loader) == 0):
            return None
        return torch_logits(compression_target(pl_module), loader, self.evaluate_batches)


def _split_loader(trainer: Trainer, split: str):
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return None
    return datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
