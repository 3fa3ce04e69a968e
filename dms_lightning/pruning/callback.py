"""IterativePruning: prune a network on a schedule during ``fit`` and, for channels, make it smaller for real."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from dms_lightning.models.batchnorm import reestimate_in_run
from dms_lightning.pruning.architecture import ChannelRemoval
from dms_lightning.pruning.functional import default_ignored_layers
from dms_lightning.pruning.graph import PRUNABLE_TYPES, modules_under, resolve_module_names
from dms_lightning.pruning.masks import Masks, apply_masks
from dms_lightning.pruning.methods import ChannelPruning, PruningMethod, SemiStructuredPruning, UnstructuredPruning
from dms_lightning.pruning.monitoring import layer_output_positions, layer_sparsity_figure, sparsity_report
from dms_lightning.pruning.removal import remove_pruned_channels
from dms_lightning.pruning.schedules import SCHEDULES, SparsitySchedule
from dms_lightning.pruning.trainer_surgery import (
    carry_optimizer_states,
    optimizer_states,
    rebuild_optimizers,
    rewrap_distributed,
)
from dms_lightning.utils.checkpoint import install_architecture_restore, record_architecture_change
from dms_lightning.utils.compression import (
    as_network_input,
    compression_target,
    example_from_batch,
    fixed_width_layers,
    float_network,
    float_view,
    is_wrapped,
    named_float_parameters,
)
from dms_lightning.utils.run_length import run_length
from dms_lightning.utils.tensorboard import log_figure
from dms_lightning.utils.validation import (
    check_choice,
    check_fraction,
    check_int,
    check_names,
    check_number,
    check_shape,
)

Method = Literal["unstructured", "channel", "n_m"]
_METHODS: dict[str, type[PruningMethod]] = {m.name: m for m in (UnstructuredPruning, ChannelPruning,
                                                                 SemiStructuredPruning)}
METHODS: tuple[str, ...] = ("unstructured", "channel", "n_m")


def _span(points: Sequence[int]) -> str:
    """``[2, 3]``, or ``6, 7, ..., 20`` for a long list of pruning points."""
    return str(list(points)) if len(points) <= 4 else f"{points[0]}, {points[1]}, ..., {points[-1]}"


def _network(pl_module: pl.LightningModule) -> nn.Module:
    """The network being pruned, named as its float version even while QAT has it wrapped."""
    return float_network(compression_target(pl_module))


class IterativePruning(Callback):
    """Prune the network during training on a sparsity schedule; channel pruning ends physically smaller.

    Three methods:

    * ``"unstructured"`` — individual weights by L1 magnitude, ``scope="global"`` (default) or per layer.
      Smaller after compression, not faster on dense hardware.
    * ``"channel"`` — whole channels of every group of coupled layers (Torch-Pruning's DepGraph handles
      residual adds, concatenations, depthwise / grouped convs, squeeze-excitation), ranked by
      ``importance`` (``"l1"``, ``"l2"``, ``"bn_gamma"``, ``"taylor"``). At the last pruning point (or at
      the end of ``fit`` if the schedule is cut short) the masked channels are **removed**: the layers
      are rebuilt smaller, the optimizers and LR schedulers are rebuilt for them (learning rate and
      schedule position carry over, so do the kept channels' optimizer moments) and training continues.
    * ``"n_m"`` — semi-structured N:M sparsity (``pattern="2:4"``: at most 2 non-zeros in every 4
      consecutive input channels), the pattern sparse tensor cores and several NPUs execute faster.

    Masks grow at each pruning point of the schedule (``"agp"`` by default: Zhu & Gupta's cubic
    schedule; also ``"linear"``, ``"constant"``, ``"one_shot"`` or any callable ``progress -> sparsity``)
    from ``start_epoch`` to ``end_epoch`` every ``frequency`` epochs (or ``start_step`` / ``end_step`` in
    optimizer steps), and pruned weights are set back to zero after every optimizer step. The first
    convolution and the classifier are left alone by default. Sparsity per layer and overall (each
    tensor counted once), parameters and MACs are logged after every pruning point under ``pruning/``,
    with a per-layer sparsity bar chart in TensorBoard. The schedule position and masks are saved in
    checkpoints; a checkpoint taken after removal reloads into the smaller network: with
    ``Trainer.fit/test(ckpt_path=...)`` the callback rebuilds it in ``setup`` (any LightningModule), with
    ``load_from_checkpoint`` the module's ``on_load_checkpoint`` calls
    :func:`~dms_lightning.utils.checkpoint.restore_architecture` (ours do).

    Checked before training: ``end_epoch`` (``end_step``) within the run, in ``setup`` against ``max_epochs``
    (``max_steps``) and in ``on_train_start`` against the run the Trainer really makes (the epochs of a
    ``max_steps`` run, the optimizer steps left by ``accumulate_grad_batches`` / ``limit_train_batches``); a fit
    that early stopping or a time limit ends before the schedule says so in a warning; and, next to
    :class:`~dms_lightning.callbacks.QuantizationAwareTraining`, that the channels are removed before
    quantization starts. Pruning that only masks (``"unstructured"``, ``"n_m"``, ``remove_channels=False``) may
    go on while QAT trains (sparse QAT): the masks act on the float weights inside the quantized layers, and the
    logged sparsity and MACs, checkpoints and INT8 export carry them. Layers the module lists in ``fixed_width_layers``
    (a :class:`~dms_lightning.DistillationModule`: the student layers of its FitNets hints) keep their width.

    Acts on ``pl_module.compression_target`` (our modules: the classifier network, a distillation
    student) or the whole module. Under DDP every rank applies the masks chosen on rank 0.

    Args:
        method: ``"unstructured"``, ``"channel"`` or ``"n_m"``.
        target_sparsity: final fraction of weights (unstructured) or channels (channel) pruned, in
            ``[0, 1)``; default 0.5. Fixed to ``1 - N/M`` for ``"n_m"``.
        schedule: ``"agp"`` (alias ``"cubic"``), ``"linear"``, ``"constant"``, ``"one_shot"`` or a callable.
        start_epoch: first pruning epoch (default 0).
        end_epoch: last pruning epoch; default: the last epoch of ``max_epochs`` (``start_epoch`` for
            ``one_shot``).
        start_step: first pruning optimizer step, instead of epochs.
        end_step: last pruning optimizer step.
        frequency: epochs (or steps) between pruning points.
        initial_sparsity: sparsity at the first point of ``linear`` / ``agp``.
        importance: channel ranking criterion; unstructured and N:M rank by magnitude (``"l1"``).
        scope: ``"layer"`` (each layer pruned to the target) or ``"global"`` (ranked across layers);
            default ``"global"`` for unstructured, ``"layer"`` for channel.
        pattern: the N:M pattern for ``method="n_m"``.
        ignored_layers: module names (or shell patterns, e.g. ``"features.*.block.2"``) of the pruned
            network to leave alone.
        keep_first_conv: leave the first convolution (it sees the raw image) alone.
        keep_classifier: leave the classifier alone (channel pruning never changes the logits anyway).
        min_channels: channels each group keeps at least.
        round_to: keep a multiple of this many channels per group (8 or 32 for NPUs) where possible.
        remove_channels: physically remove the pruned channels at the end of the schedule.
        example_input_shape: input shape for tracing, e.g. ``(1, 1, 96, 96)``; default: the module's
            ``example_input_array``, the data module's ``example_input()``, else the first training batch.
        plot_layer_sparsity: log the per-layer sparsity bar chart at every pruning point.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> pruning = IterativePruning("channel", target_sparsity=0.3, start_epoch=1, end_epoch=3, round_to=8)
        >>> trainer = Trainer(max_epochs=5, callbacks=[pruning])  # doctest: +SKIP
    """

    def __init__(
        self,
        method: Method = "channel",
        target_sparsity: float | None = None,
        schedule: str | Callable[[float], float] = "agp",
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        frequency: int = 1,
        initial_sparsity: float = 0.0,
        importance: str = "l1",
        scope: Literal["layer", "global"] | None = None,
        pattern: str | Sequence[int] = "2:4",
        ignored_layers: Sequence[str] = (),
        keep_first_conv: bool = True,
        keep_classifier: bool = True,
        min_channels: int = 8,
        round_to: int = 1,
        remove_channels: bool = True,
        example_input_shape: Sequence[int] | None = None,
        plot_layer_sparsity: bool = True,
    ) -> None:
        super().__init__()
        check_choice("method", method, METHODS)
        strategy = _METHODS[method]
        if importance not in strategy.importance_choices:
            raise ValueError(f"importance={importance!r} is not available for method={method!r}; "
                             f"valid: {list(strategy.importance_choices)}")
        scope = check_choice("scope", scope or strategy.default_scope, ("layer", "global"))
        self.method = method
        self._method: PruningMethod = strategy.build(scope=scope, importance=importance, min_channels=min_channels,
                                                     round_to=round_to, remove_channels=remove_channels,
                                                     pattern=pattern)
        implied = self._method.implied_sparsity
        if implied is not None:
            if target_sparsity is not None and not math.isclose(target_sparsity, implied):
                raise ValueError(f"target_sparsity={target_sparsity!r} does not apply to method={method!r}: pattern "
                                 f"{pattern} fixes it at {implied:g}; leave target_sparsity unset")
            target_sparsity = implied
        elif target_sparsity is None:
            target_sparsity = 0.5
        target_sparsity = check_fraction("target_sparsity", target_sparsity, high_inclusive=False,
                                         hint="(1 would remove everything)")
        if not (callable(schedule) or schedule in SCHEDULES):
            raise ValueError(f"schedule={schedule!r} must be one of {list(SCHEDULES)} or a callable "
                             "progress -> sparsity")
        for name, value in (("start_epoch", start_epoch), ("end_epoch", end_epoch), ("start_step", start_step),
                            ("end_step", end_step)):
            check_int(name, value, minimum=0, optional=True)
        uses_steps = start_step is not None or end_step is not None
        if uses_steps and (start_epoch is not None or end_epoch is not None):
            raise ValueError(f"give the schedule in epochs (start_epoch={start_epoch}, end_epoch={end_epoch}) or "
                             f"in steps (start_step={start_step}, end_step={end_step}), not both")
        start = (start_step if uses_steps else start_epoch) or 0
        end = end_step if uses_steps else end_epoch
        unit = "step" if uses_steps else "epoch"
        if end is not None and start > end:
            raise ValueError(f"start_{unit}={start} is after end_{unit}={end}: pruning must start before it ends")
        check_int("frequency", frequency, minimum=1, hint=f"({unit}s between pruning points)")
        check_number("initial_sparsity", initial_sparsity, 0.0, target_sparsity)
        ignored_layers = check_names("ignored_layers", ignored_layers) if ignored_layers else []
        check_int("min_channels", min_channels, minimum=1)
        check_int("round_to", round_to, minimum=1)
        example_input_shape = check_shape("example_input_shape", example_input_shape)

        self.target_sparsity = float(target_sparsity)
        self.schedule = schedule
        self.unit = unit
        self.start, self.end = start, end
        self.frequency = frequency
        self.initial_sparsity = float(initial_sparsity)
        self.importance, self.scope = importance, scope
        self.ignored_layers = list(ignored_layers)
        self.keep_first_conv, self.keep_classifier = keep_first_conv, keep_classifier
        self.min_channels, self.round_to = min_channels, round_to
        self.remove_channels = remove_channels
        self.example_input_shape = example_input_shape
        self.plot_layer_sparsity = plot_layer_sparsity

        # Resumable state (the method keeps its own part: chosen channels, or masks).
        self.next_point = 0
        self.masks: Masks = {}
        self.history: list[dict[str, float]] = []

        # Built per run.
        self._schedule: SparsitySchedule | None = None
        self._example_input: Tensor | None = None
        self._ignored_names: list[str] = []
        self._pruned_tensors: list[str] = []
        self._positions: dict[str, int] | None = None
        self._parameters: dict[str, Tensor] = {}
        self._prepared = False

    #: The architecture change this callback makes (channel removal), re-applied from checkpoints first.
    architecture_change = ChannelRemoval

    @property
    def removed(self) -> bool:
        """Whether the pruned channels were physically removed."""
        return self._method.is_removed

    @property
    def pruned_channels(self) -> dict[str, list[int]]:
        """Channel pruning: the pruned channel indices per group (root layer name); empty for other methods."""
        return getattr(self._method, "pruned_channels", {})

    @property
    def nonzeros_per_group(self) -> int | None:
        """N of an N:M pattern (``None`` for other methods)."""
        return getattr(self._method, "nonzeros_per_group", None)

    @property
    def group_size(self) -> int | None:
        """M of an N:M pattern (``None`` for other methods)."""
        return getattr(self._method, "group_size", None)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method)

    def architecture_changes_until(self, trainer: pl.Trainer) -> tuple[int, str] | None:
        """The epoch at whose start the channels are removed, and the field that sets it (``None``: no removal).

        Step schedules return ``None`` until the training data is loaded (``on_train_start``), when the epoch of
        ``end_step`` is known; their removal also refuses a network that quantization-aware training already wrapped.
        """
        if not self._method.removes_channels or self._method.is_removed:
            return None
        end = self._resolve_end(trainer)
        if self.unit == "step":
            epoch = run_length(trainer).epoch_of_step(end)
            return None if epoch is None else (epoch, f"end_step={end}")
        return end, f"end_epoch={self.end}" if self.end is not None else f"end_epoch=None, i.e. the last epoch {end}"

    # ----------------------------------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Any ckpt_path= load of this run rebuilds the recorded architecture before the weights load.
        install_architecture_restore(pl_module)
        if stage != "fit":
            return
        self._check_launcher(trainer)
        self._schedule = self._resolve_schedule(trainer)
        target = _network(pl_module)
        self._ignored_names = resolve_module_names(target, self.ignored_layers, "IterativePruning.ignored_layers")
        # Layers whose width others read (e.g. FitNets adapters of a DistillationModule) keep it.
        self._ignored_names += resolve_module_names(target, fixed_width_layers(pl_module),
                                                    f"{type(pl_module).__name__}.fixed_width_layers")
        if not any(isinstance(m, PRUNABLE_TYPES) for m in target.modules()):
            raise ValueError(f"IterativePruning found no Conv/Linear layer in {type(target).__name__} to prune")

    def _check_launcher(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

        if self._method.removes_channels and isinstance(getattr(trainer.strategy, "launcher", None),
                                                        _MultiProcessingLauncher):
            # These launchers copy the final weights back into the main process's module, which still has
            # the original shapes: Lightning's load_state_dict there would fail after a whole run.
            raise MisconfigurationException(
                "IterativePruning(method='channel', remove_channels=True) cannot run under a spawn/fork launcher "
                "(strategy='ddp_spawn', 'ddp_fork', 'ddp_notebook'): Lightning copies the final weights into the "
                "main process's full-size module. Use strategy='ddp' (run the training as a script), or "
                "remove_channels=False and remove_pruned_channels() after fit")

    def _limit(self, trainer: pl.Trainer) -> int | None:
        limit = trainer.max_epochs if self.unit == "epoch" else trainer.max_steps
        return limit if limit is not None and limit > 0 else None

    def _resolve_end(self, trainer: pl.Trainer) -> int:
        if self.end is not None:
            return self.end
        limit = self._limit(trainer)
        if self.schedule == "one_shot":
            return self.start
        if self.unit == "epoch" and limit is not None:
            return max(self.start, limit - 1)
        raise ValueError(f"IterativePruning(schedule={self.schedule!r}) needs end_{self.unit}"
                         + (": the trainer has no max_epochs to end the schedule at" if self.unit == "epoch"
                            else " (step schedules have no default end)"))

    def _resolve_schedule(self, trainer: pl.Trainer) -> SparsitySchedule:
        end = self._resolve_end(trainer)
        limit = self._limit(trainer)
        if limit is not None and end >= limit and self.next_point < len(self._points(end)):
            field = f"end_{self.unit}={self.end}" if self.end is not None else f"start_{self.unit}={self.start}"
            removal = " and the channels would only be removed when fit ends" if self._method.removes_channels else ""
            raise MisconfigurationException(
                f"IterativePruning({field}) reaches beyond the run: trainer.max_{self.unit}s={limit} "
                f"({self.unit}s 0-{limit - 1}), so the schedule would never reach its target{removal}. Use "
                f"end_{self.unit} <= {limit - 1} or max_{self.unit}s >= {end + 1}")
        return SparsitySchedule(self.schedule, self.target_sparsity, self.start, end, self.frequency,
                                self.initial_sparsity)

    def _points(self, end: int) -> tuple[int, ...]:
        return SparsitySchedule(self.schedule, self.target_sparsity, self.start, end, self.frequency,
                                self.initial_sparsity).points

    def _find_example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        if self.example_input_shape is not None:
            return torch.zeros(self.example_input_shape)
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, Tensor):
            return example[:1]
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "example_input", None)):
            return datamodule.example_input(1)
        return None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Everything that can fail on the user's network (tracing, layer selection) fails here, before training,
        # when an example input is known; otherwise at the first training batch, which is one.
        self._prepared = False
        example = self._find_example_input(trainer, pl_module)
        if example is not None:
            self._prepare(pl_module, example)

    def _prepare(self, pl_module: pl.LightningModule, example: Tensor) -> None:
        # A run resumed from a checkpoint taken during QAT has the network wrapped already: trace the float one.
        with float_view(_network(pl_module)) as target:
            self._example_input = as_network_input(example.detach()[:1], target)
            ignored = self._ignored_names + default_ignored_layers(
                target, self._example_input, self.keep_first_conv, self.keep_classifier)
            self._positions = layer_output_positions(target, self._example_input)
            ignored_modules = modules_under(target, ignored)
            ignored_ids = {id(m) for m in ignored_modules}
            weights = {f"{name}.weight" if name else "weight": module.weight for name, module in target.named_modules()
                       if isinstance(module, PRUNABLE_TYPES) and id(module) not in ignored_ids
                       and isinstance(getattr(module, "weight", None), nn.Parameter)}
            self._pruned_tensors = self._method.pruned_tensors(weights)
            self._method.prepare(target, self._example_input, ignored_modules)
        self._prepared = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_schedule_within_run(trainer)
        # Every strategy has restored the checkpoint by now (some only after on_fit_start): rebuild the
        # masks from the restored state and hold on to the (possibly resized) parameters.
        if self._prepared:
            self._attach(pl_module)

    def _check_schedule_within_run(self, trainer: pl.Trainer) -> None:
        # setup compared the schedule with the limit of its own unit; only now, with the training data loaded, are
        # the epochs of a max_steps run (and the steps of a max_epochs run) known.
        length = run_length(trainer)
        last = length.last(self.unit)
        if self._schedule is None or last is None:
            return
        points = self._schedule.points
        unreached = [index for index in range(self.next_point, len(points)) if points[index] > last]
        if not unreached:
            return
        reached = self._schedule.sparsity_at_point(unreached[0] - 1) if unreached[0] > 0 else 0.0
        removal = " and the channels would only be removed when fit ends" if self._method.removes_channels else ""
        raise MisconfigurationException(
            f"IterativePruning(start_{self.unit}={self._schedule.start}, end_{self.unit}={self._schedule.end}) reaches "
            f"beyond the run: it ends at {self.unit} {last} ({length.limited_by}), so pruning at {self.unit}s "
            f"{_span([points[index] for index in unreached])} would never happen and the sparsity would stop at "
            f"{reached:.3f} instead of target_sparsity={self.target_sparsity}{removal}. Use end_{self.unit} <= {last} "
            "or train longer")

    def _attach(self, pl_module: pl.LightningModule) -> None:
        target = _network(pl_module)
        self._parameters = named_float_parameters(target)
        self.masks = self._method.masks_for_training(target, self._parameters, self.masks)
        if self.masks:
            apply_masks(self._parameters, self.masks)

    # ----------------------------------------------------------------------------------------- schedule
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch" and self._prepared:
            self._advance(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._prepared:
            example = example_from_batch(batch)
            if example is None:
                raise ValueError("IterativePruning needs an example input to trace the network and found no tensor "
                                 f"in the training batch ({type(batch).__name__}): set `example_input_array` on the "
                                 "LightningModule or pass example_input_shape=(1, C, H, W)")
            self._prepare(pl_module, example)
            self._attach(pl_module)
        self._advance(trainer, pl_module, trainer.current_epoch if self.unit == "epoch" else trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The optimizer step just moved pruned weights off zero: put them back.
        if self.masks:
            apply_masks(self._parameters, self.masks)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._method.accumulate_gradients(self._parameters)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Early stopping, max_time or an interrupt can end fit before the schedule does: say so, for every method.
        if self._schedule is None or self.next_point >= len(self._schedule.points) or self.removed:
            return
        reached = self.history[-1]["target"] if self.history else 0.0
        position = trainer.current_epoch if self.unit == "epoch" else trainer.global_step
        message = (f"IterativePruning: fit ended before the last pruning point ({self.unit} {position}; the next point "
                   f"was {self.unit} {self._schedule.points[self.next_point]}, end_{self.unit}={self._schedule.end}): "
                   f"sparsity {reached:.2f} of the target {self.target_sparsity}")
        if self._method.removes_channels and self.pruned_channels:
            rank_zero_warn(f"{message}; removing the channels pruned so far")
            self._remove(trainer, pl_module, rebuild=False)
        else:
            rank_zero_warn(message)

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, position: int) -> None:
        points = self._schedule.points
        due = None
        while self.next_point < len(points) and points[self.next_point] <= position:
            due = self.next_point
            self.next_point += 1
        if due is None or self.removed:
            return
        self._prune(trainer, pl_module, due)
        if due == len(points) - 1 and self._method.removes_channels:
            self._remove(trainer, pl_module, rebuild=True)

    # ----------------------------------------------------------------------------------------- pruning
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: int) -> None:
        # N:M applies its whole pattern at every point, whatever the schedule says: that is the sparsity asked for.
        implied = self._method.implied_sparsity
        sparsity = implied if implied is not None else self._schedule.sparsity_at_point(point)
        weights = {name: self._parameters[name] for name in self._pruned_tensors}
        self.masks = self._method.choose(trainer, _network(pl_module), weights, sparsity, previous=self.masks)
        apply_masks(self._parameters, self.masks)
        self._report(trainer, pl_module, point, sparsity)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: int, sparsity: float) -> None:
        target = _network(pl_module)
        report = sparsity_report(target, self._pruned_tensors, self._example_input, self._positions)
        extra = self._method.log_entry()
        entry = {"point": float(self._schedule.points[point]) if self._schedule else -1.0, "target": sparsity,
                 "sparsity": report.sparsity, "params": float(report.nonzero_params),
                 "macs": float(report.nonzero_macs), **extra}
        self.history.append(entry)
        metrics = {**report.metrics(), "pruning/target_sparsity": sparsity,
                   **{f"pruning/{key}": value for key, value in extra.items()}}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self.plot_layer_sparsity:
            title = f"{self.method} pruning, {self.unit} {int(entry['point'])}: {report.sparsity:.1%} of pruned layers"
            log_figure(trainer, "pruning/layer_sparsity", layer_sparsity_figure(report.layer_sparsity, title))
        rank_zero_info(f"IterativePruning: {self.unit} {int(entry['point'])}: target {sparsity:.3f}, reached "
                       f"{report.sparsity:.3f} of pruned weights, {report.nonzero_params:,} non-zero parameters, "
                       f"{report.nonzero_macs / 1e6:.1f} MMACs")

    # ----------------------------------------------------------------------------------------- removal
    def _remove(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rebuild: bool) -> None:
        if is_wrapped(pl_module):
            field = f"end_{self.unit}={self._schedule.end if self._schedule else self.end}"
            raise MisconfigurationException(
                f"IterativePruning({field}) would remove channels from a network that quantization-aware training "
                "has already wrapped (its quantizers are sized for the current channels): end the pruning schedule "
                "before QuantizationAwareTraining's start_epoch")
        target = _network(pl_module)
        states = optimizer_states(trainer, self._parameters) if rebuild else {}
        masks = {name: mask.cpu() for name, mask in self.masks.items()}
        report = remove_pruned_channels(target, self._example_input, pruned_channels=self.pruned_channels,
                                        ignored_layers=[])
        self._method.removed()
        self.masks = {}
        self._pruned_tensors = []
        self._parameters = named_float_parameters(target)
        if rebuild:
            rewrap_distributed(trainer)
            rebuild_optimizers(trainer)
            carry_optimizer_states(trainer, states, masks, self._parameters)
        # The smaller network's BatchNorm statistics, re-estimated (when the run has a BatchNormReestimation).
        reestimate_in_run(trainer, pl_module, "after channel removal")
        rank_zero_info(f"IterativePruning: removed {sum(report.removed_channels.values())} channels: parameters "
                       f"{report.params_before:,} -> {report.params_after:,}, MACs {report.macs_before / 1e6:.1f} -> "
                       f"{report.macs_after / 1e6:.1f} M")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"pruning/params": float(report.params_after),
                                    "pruning/macs": float(report.macs_after)}, step=trainer.global_step)

    # ----------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "next_point": self.next_point, "removed": self.removed,
                **self._method.state_dict(self.masks), "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("method", self.method) != self.method:
            raise ValueError(f"the checkpoint's IterativePruning state is for method={state_dict['method']!r}, "
                             f"this callback has method={self.method!r}")
        self.next_point = int(state_dict["next_point"])
        self.masks = self._method.load_state_dict(state_dict)
        if state_dict.get("removed"):
            self._method.removed()
        self.history = list(state_dict.get("history", []))

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._method.records_architecture:
            record_architecture_change(checkpoint, ChannelRemoval, ChannelRemoval.record(pl_module))
