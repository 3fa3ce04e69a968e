"""QuantizationAwareTraining: fake-quantize the network from ``start_epoch`` and export INT8 QDQ at fit end."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from dms_lightning.models.batchnorm import reestimate_in_run
from dms_lightning.quant.fake_quant import sync_activation_ranges
from dms_lightning.quant.prepare import set_quantizers_state
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
from dms_lightning.utils.run_length import run_length
from dms_lightning.utils.validation import check_choice, check_fraction, check_int, check_names


def _optional_epoch(name: str, value: int | None, start_epoch: int) -> None:
    check_int(name, value, minimum=start_epoch, optional=True,
              hint=f"(start_epoch={start_epoch}; None never freezes)")


class QuantizationAwareTraining(Callback):
    """Quantization-aware training for NPUs, exported as an INT8 QDQ ONNX model plus AIMET encodings.

    From ``start_epoch`` the network (``pl_module.compression_target``, else the module's children) is
    replaced by its fake-quantized twin (:func:`dms_lightning.quant.prepare_qat`): BatchNorm folded into the
    convs, int8 per-channel symmetric weights, uint8 per-tensor activations on the tensors an integer
    runtime keeps in int8. Parameters keep their identity, so the optimizer and DDP carry on, and a
    pruning callback that physically removes channels earlier in the same run is picked up as is.
    Activation ranges are moving averages updated only in training steps (never in validation / test),
    averaged over DDP ranks each step, frozen at ``freeze_observers_epoch``; BatchNorm switches to its
    running statistics at ``freeze_bn_epoch``. A ``start_epoch`` the run never reaches (``max_epochs``, or the
    epochs ``max_steps`` allows) is refused before training; a fit stopped early before it warns that no INT8
    network exists. Checkpoints record the quantized architecture, so
    ``trainer.test(ckpt_path="best")``, ``fit(ckpt_path=...)`` and ``load_from_checkpoint`` rebuild it.

    It writes no file itself: at the end of ``fit`` (with ``export=True``) it hands the fake-quantized network
    down to :class:`~dms_lightning.callbacks.ONNXExport` (placed after it), which writes
    ``<dirpath>/<filename>.onnx`` (INT8 QDQ: ONNX Runtime runs it as QLinearConv / QLinearAdd / QGemm) and
    ``<filename>.encodings.json`` (SNPE / QNN ``--quantization_overrides``), checks that the QDQ graph agrees
    with the fake-quant model on ``parity_split`` (at least ``min_agreement`` top-1, else ``ParityError`` and
    nothing written), and lists the variant for the report.

    Args:
        start_epoch: first epoch trained with fake quantization (after pruning's ``end_epoch``).
        freeze_observers_epoch: from this epoch on, activation ranges stay fixed (``None``: never).
        freeze_bn_epoch: from this epoch on, folded BatchNorms use running statistics (``None``: never).
        weight_bits: 8 (default, or the target's), 7 or 4 (narrow weights are stored in int8 QDQ containers with their own range; 7 is
            ONNX Runtime's ``reduce_range`` for x86 CPUs without VNNI, where 8-bit weights can saturate).
        per_channel_weights: one scale per output channel (``False``: one per tensor; default ``True``, or the
            target's).
        activation_bits: 8 (default), or 16 (W8A16 everywhere: what Hexagon HTP runs at 16 bits).
        symmetric_activations: int8 with zero point 0 instead of uint8 affine (default: ``False``, or the
            target's).
        quantize_depthwise: also quantize depthwise convs (some CPUs run them faster in float).
        quantize_linear: also quantize ``Linear`` layers.
        exclude: ``fnmatch`` patterns of layer names (within the network) kept in float.
        include: if given, only layers matching these patterns are quantized (e.g. the heavy 1x1 convs
            and the head of MobileNetV3 on CPUs where its depthwise / hardswish layers run faster in float).
        export: hand the network down at fit end for an INT8 ONNX model and encodings (needs ONNXExport
            after this callback; without one a warning says nothing will be written).
        dirpath: output folder (default ``<trainer.log_dir>/quantization``).
        filename: file stem of the ONNX model and encodings, and the report's variant name.
        parity_split: ``"test"`` or ``"val"`` split of ``trainer.datamodule`` used for the agreement check.
        parity_batches: number of batches of that split to compare (``None``: all).
        min_agreement: minimum top-1 agreement of the QDQ graph with the fake-quant PyTorch model.
        opset: ONNX opset of the export (raised to 21 for 16-bit activations).
        precision: per-layer precision overrides, ``{layer-name pattern: "w8a16" | "w8a8" | "float" | ...}``
            (the last matching pattern wins), e.g. the ``precision`` a
            :func:`~dms_lightning.quant.mixed_precision.select_mixed_precision` run chose as QAT's start.
        placement: ``"fused"`` (the tensors ONNX Runtime / the Qualcomm SDK keep in int8) or ``"every_tensor"``
            (every tensor between two ops, as full-integer TFLite runs them: the INT8 ``.tflite`` then carries a
            learned scale everywhere; see :class:`~dms_lightning.quant.QuantizationConfig`). Default ``"fused"``,
            or the target's.
        target: the device the INT8 model is for, ``"htp"`` | ``"cpu_x86"`` | ``"cpu_arm"`` (or one registered
            with :func:`~dms_lightning.quant.targets.register_target`): its profile picks placement, activation
            signedness and weight grid where those arguments are left ``None``, refuses precisions it has no
            kernels for, warns about layers whose channel count it pads, and its reasons go into the log and
            the report (:mod:`dms_lightning.quant.targets`). ``None``: the defaults above.
        min_integer_reduction: spatial convs without groups whose dot products are shorter than this
            (``in_channels x kernel area``: 9 for a grayscale 3x3 stem) stay in float; default 0 (none), or the
            target's (``cpu_x86``: 32, where such an integer conv is slower than the float one).

    Example:
        >>> from dms_lightning.callbacks import QuantizationAwareTraining
        >>> qat = QuantizationAwareTraining(start_epoch=3, freeze_bn_epoch=5, freeze_observers_epoch=6)
        >>> trainer = Trainer(max_epochs=8, callbacks=[qat, ONNXExport(export_fp32=False)])  # doctest: +SKIP
    """

    #: Hands its fake-quantized network down to export (``int8_networks``) instead of writing files.
    hands_down_int8: ClassVar[bool] = True

    def __init__(
        self,
        start_epoch: int = 0,
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        weight_bits: int | None = None,
        per_channel_weights: bool | None = None,
        activation_bits: int | None = None,
        symmetric_activations: bool | None = None,
        quantize_depthwise: bool = True,
        quantize_linear: bool = True,
        exclude: list[str] | None = None,
        include: list[str] | None = None,
        export: bool = True,
        dirpath: str | None = None,
        filename: str = "qat_int8",
        parity_split: Literal["test", "val"] = "test",
        parity_batches: int | None = None,
        min_agreement: float = 0.99,
        opset: int = 18,
        precision: dict[str, str] | None = None,
        placement: str | None = None,
        target: str | None = None,
        min_integer_reduction: int | None = None,
    ) -> None:
        super().__init__()
        check_int("start_epoch", start_epoch, minimum=0)
        _optional_epoch("freeze_observers_epoch", freeze_observers_epoch, start_epoch)
        _optional_epoch("freeze_bn_epoch", freeze_bn_epoch, start_epoch)
        exclude = check_names("exclude", list(exclude or []))
        include = check_names("include", list(include or []))
        check_choice("parity_split", parity_split, ("test", "val"))
        check_int("parity_batches", parity_batches, minimum=1, optional=True, hint="(None: all)")
        check_fraction("min_agreement", min_agreement)
        if not filename or "/" in filename:
            raise ValueError(f"filename={filename!r} must be a non-empty file stem without '/'")
        if opset < 13:
            raise ValueError(f"opset={opset!r} must be >= 13 (per-channel QuantizeLinear)")
        self.config, self.target = resolve_target_config(
            target, weight_bits=weight_bits, activation_bits=activation_bits,
            symmetric_activations=symmetric_activations, placement=placement,
            min_integer_reduction=min_integer_reduction, per_channel_weights=per_channel_weights,
            quantize_depthwise=quantize_depthwise, quantize_linear=quantize_linear, exclude=tuple(exclude),
            include=tuple(include), precision=dict(precision or {}))
        self.start_epoch = start_epoch
        self.freeze_observers_epoch, self.freeze_bn_epoch = freeze_observers_epoch, freeze_bn_epoch
        self.export, self.dirpath, self.filename, self.opset = export, dirpath, filename, opset
        self.parity_split, self.parity_batches, self.min_agreement = parity_split, parity_batches, min_agreement
        self.parity = ParityRule(split=parity_split, batches=parity_batches, min_top1_agreement=min_agreement,
                                 owner="QuantizationAwareTraining")
        self.quantized_since: int | None = None
        self.int8_networks: list[QuantizedNetwork] = []

    #: The architecture change this callback makes, re-applied from checkpoints (after channel removal).
    architecture_change = QuantizerWrapping

    def architecture_changes_until(self, trainer: Trainer) -> tuple[int, str] | None:
        """The epoch at whose start this callback changes the architecture (wraps the network), and that field."""
        return self.start_epoch, f"start_epoch={self.start_epoch}"

    # ---------------------------------------------------------------- phase
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Any ckpt_path= load of this run rebuilds the recorded architecture before the weights load.
        install_architecture_restore(pl_module)
        if stage != "fit":
            return
        self._check_earlier_changes_end_before_start(trainer)
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.start_epoch >= max_epochs \
                and not target_is_quantized(pl_module):
            raise MisconfigurationException(
                f"QuantizationAwareTraining(start_epoch={self.start_epoch}) would never start: trainer.max_epochs="
                f"{max_epochs}; use start_epoch <= {max_epochs - 1} or train longer")
        check_target_quantizable(pl_module, self.config, "QuantizationAwareTraining")
        announce_target(self.target, "QuantizationAwareTraining")
        if self.export:
            warn_without_int8_writer(trainer, self)

    def _check_earlier_changes_end_before_start(self, trainer: Trainer) -> None:
        # Quantizers are sized for the network they wrap: every architecture change ordered before quantizer
        # wrapping (channel removal) must be done when QAT starts, or the run would crash mid-way.
        for callback in trainer.callbacks:
            change = getattr(callback, "architecture_change", None)
            if callback is self or change is None or change.order >= self.architecture_change.order:
                continue
            until = callback.architecture_changes_until(trainer)
            if until is not None and until[0] >= self.start_epoch:
                epoch, field = until
                raise MisconfigurationException(
                    f"QuantizationAwareTraining(start_epoch={self.start_epoch}) would start before "
                    f"{type(callback).__name__}({field}) has finished changing the network (in epoch "
                    f"{epoch}): quantizers would be sized for channels that are removed later. Use "
                    f"QuantizationAwareTraining(start_epoch>={epoch + 1}) or end {type(callback).__name__} earlier")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # setup knew only max_epochs; with the training data loaded, a max_steps run's last epoch is known too, and
        # so is the epoch in which a step-scheduled channel removal happens.
        self._check_earlier_changes_end_before_start(trainer)
        length = run_length(trainer)
        if length.last_epoch is None or target_is_quantized(pl_module):
            return
        if self.start_epoch > length.last_epoch:
            raise MisconfigurationException(
                f"QuantizationAwareTraining(start_epoch={self.start_epoch}) would never start: the run ends at epoch "
                f"{length.last_epoch} ({length.limited_by}); use start_epoch <= {length.last_epoch} or train longer")
        for field, epoch in (("freeze_bn_epoch", self.freeze_bn_epoch),
                             ("freeze_observers_epoch", self.freeze_observers_epoch)):
            if epoch is not None and epoch > length.last_epoch:
                rank_zero_warn(f"QuantizationAwareTraining({field}={epoch}) is after the run's last epoch "
                               f"{length.last_epoch} ({length.limited_by}): it will not take effect")

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch < self.start_epoch and not target_is_quantized(pl_module):
            return
        if not target_is_quantized(pl_module):
            # The fold reads the running statistics: re-estimated ones, not the moving average's lag.
            reestimate_in_run(trainer, pl_module, "before QAT folds BatchNorm")
            # Done here, not in setup: pruning may have replaced the layers since (it ends before start_epoch).
            quantize_target(pl_module, self.config)
            rank_zero_info(f"[QuantizationAwareTraining] epoch {epoch}: fake quantization on "
                           f"({self.config.weight.bits}-bit weights, {self.config.activation.bits}-bit activations)")
        if self.quantized_since is None:
            self.quantized_since = epoch
        # Every epoch: a resumed run rebuilt the quantizers from the checkpoint.
        set_input_values(pl_module, datamodule_input_values(trainer))
        observers = self.freeze_observers_epoch is None or epoch < self.freeze_observers_epoch
        bn_frozen = self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch
        if bn_frozen and epoch == self.freeze_bn_epoch:
            # From here the frozen statistics are part of the deployed weights: make them the network's own.
            reestimate_in_run(trainer, pl_module, "before QAT freezes BatchNorm")
        set_quantizers_state(compression_target(pl_module), observers=observers, bn_frozen=bn_frozen)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.world_size > 1 and target_is_quantized(pl_module):
            sync_activation_ranges(compression_target(pl_module))

    # ---------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        record_architecture_change(checkpoint, QuantizerWrapping, QuantizerWrapping.record(pl_module, self.config))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start_epoch": self.start_epoch, "quantized_since": self.quantized_since,
                "config": self.config.to_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The phase itself is a function of the epoch; the architecture came back in setup.
        self.quantized_since = state_dict.get("quantized_since")

    # ---------------------------------------------------------------- hand-down to export
    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # quant/ writes no file: the network flows down to ONNXExport, which runs after this hook.
        self.int8_networks = []
        if not target_is_quantized(pl_module):
            # Early stopping, max_time or an interrupt ended fit before start_epoch: no INT8 network exists.
            rank_zero_warn(f"QuantizationAwareTraining(start_epoch={self.start_epoch}): fit ended at epoch "
                           f"{trainer.current_epoch} before quantization-aware training started; the network is "
                           "still float" + (" and no INT8 model is handed down for export" if self.export else ""))
            return
        padded = warn_padded_channels(self.target, compression_target(pl_module), "QuantizationAwareTraining")
        if self.export:
            self.int8_networks = [QuantizedNetwork(
                name=self.filename, network=compression_target(pl_module), producer=type(self).__name__,
                dirpath=self.dirpath, parity=self.parity, opset=self.opset,
                info={"config": self.config.to_dict(), "start_epoch": self.start_epoch, **target_info(self.target, padded)})]
