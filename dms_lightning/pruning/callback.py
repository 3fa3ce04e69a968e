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

from dms_lightning.pruning.architecture import (
    CHECKPOINT_KEY,
    architecture_record,
    float_network,
    install_checkpoint_restore,
    named_float_parameters,
)
from dms_lightning.models.batchnorm import reestimate_in_run
from dms_lightning.pruning.functional import default_ignored_layers
from dms_lightning.pruning.graph import (
    PRUNABLE_TYPES,
    ChannelGroup,
    build_dependency_graph,
    modules_under,
    prunable_groups,
    resolve_module_names,
)
from dms_lightning.pruning.importance import CRITERIA, channel_scores
from dms_lightning.pruning.masks import (
    Masks,
    apply_masks,
    channel_masks,
    magnitude_masks,
    n_m_masks,
    n_m_supported,
)
from dms_lightning.pruning.monitoring import layer_output_positions, layer_sparsity_figure, sparsity_report
from dms_lightning.pruning.removal import remove_pruned_channels
from dms_lightning.pruning.schedules import SCHEDULES, SparsitySchedule
from dms_lightning.pruning.selection import select_channels
from dms_lightning.pruning.trainer_surgery import (
    carry_optimizer_states,
    optimizer_states,
    rebuild_optimizers,
    rewrap_distributed,
)
from dms_lightning.utils.checkpoint import checkpoint_records, compression_target
from dms_lightning.utils.tensorboard import log_figure

Method = Literal["unstructured", "channel", "n_m"]
METHODS: tuple[str, ...] = ("unstructured", "channel", "n_m")


def _parse_pattern(pattern: str | Sequence[int]) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in (pattern.split(":") if isinstance(pattern, str) else pattern))
    except (TypeError, ValueError):
        raise ValueError(f"pattern={pattern!r} must be 'N:M' such as '2:4' (or a pair (N, M))") from None
    if not 1 <= n < m:
        raise ValueError(f"pattern={pattern!r}: N={n} must be at least 1 and smaller than M={m} (e.g. '2:4')"
                         + ("; N > M would keep more weights than a group has" if n > m else ""))
    return n, m


def _network(pl_module: pl.LightningModule) -> nn.Module:
    """The network being pruned, named as its float version even while QAT has it wrapped."""
    return float_network(compression_target(pl_module))


def _check_epoch_or_step(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name}={value!r} must be a non-negative integer")


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
    checkpoints; a checkpoint taken after removal reloads into the smaller network through both
    ``Trainer.fit(ckpt_path=...)`` and ``load_from_checkpoint``.

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
            ``example_input_array`` or the data module's ``example_input()``.
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
        if method not in METHODS:
            raise ValueError(f"method={method!r} must be one of {list(METHODS)}")
        self.n, self.m = _parse_pattern(pattern) if method == "n_m" else (0, 0)
        if method == "n_m":
            implied = 1.0 - self.n / self.m
            if target_sparsity is not None and not math.isclose(target_sparsity, implied):
                raise ValueError(f"target_sparsity={target_sparsity!r} does not apply to method='n_m': pattern "
                                 f"{self.n}:{self.m} fixes it at {implied:g}; leave target_sparsity unset")
            target_sparsity = implied
        elif target_sparsity is None:
            target_sparsity = 0.5
        if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float)) \
                or not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity={target_sparsity!r} must be in [0, 1) (1 would remove everything)")
        if not (callable(schedule) or schedule in SCHEDULES):
            raise ValueError(f"schedule={schedule!r} must be one of {list(SCHEDULES)} or a callable "
                             "progress -> sparsity")
        for name, value in (("start_epoch", start_epoch), ("end_epoch", end_epoch), ("start_step", start_step),
                            ("end_step", end_step)):
            _check_epoch_or_step(name, value)
        uses_steps = start_step is not None or end_step is not None
        if uses_steps and (start_epoch is not None or end_epoch is not None):
            raise ValueError(f"give the schedule in epochs (start_epoch={start_epoch}, end_epoch={end_epoch}) or "
                             f"in steps (start_step={start_step}, end_step={end_step}), not both")
        start = (start_step if uses_steps else start_epoch) or 0
        end = end_step if uses_steps else end_epoch
        unit = "step" if uses_steps else "epoch"
        if end is not None and start > end:
            raise ValueError(f"start_{unit}={start} is after end_{unit}={end}: pruning must start before it ends")
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"frequency={frequency!r} must be an integer >= 1 ({unit}s between pruning points)")
        if not 0.0 <= initial_sparsity <= target_sparsity:
            raise ValueError(f"initial_sparsity={initial_sparsity!r} must be in [0, target_sparsity="
                             f"{target_sparsity}]")
        valid_importance = CRITERIA if method == "channel" else ("l1",)
        if importance not in valid_importance:
            raise ValueError(f"importance={importance!r} is not available for method={method!r}; "
                             f"valid: {list(valid_importance)}")
        scope = scope or ("global" if method == "unstructured" else "layer")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope={scope!r} must be 'layer' or 'global'")
        if isinstance(ignored_layers, str) or not all(isinstance(n, str) for n in ignored_layers):
            raise ValueError(f"ignored_layers={ignored_layers!r} must be a list of module names")
        for name, value in (("min_channels", min_channels), ("round_to", round_to)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if example_input_shape is not None and (
                not all(isinstance(d, int) and d > 0 for d in example_input_shape) or len(example_input_shape) < 2):
            raise ValueError(f"example_input_shape={example_input_shape!r} must be a shape such as (1, 1, 96, 96)")

        self.method = method
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
        self.example_input_shape = tuple(example_input_shape) if example_input_shape is not None else None
        self.plot_layer_sparsity = plot_layer_sparsity

        # Resumable state.
        self.next_point = 0
        self.removed = False
        self.masks: Masks = {}
        self.pruned_channels: dict[str, list[int]] = {}
        self.history: list[dict[str, float]] = []

        # Built per run.
        self._schedule: SparsitySchedule | None = None
        self._example_input: Tensor | None = None
        self._ignored_names: list[str] = []
        self._pruned_tensors: list[str] = []
        self._groups: list[ChannelGroup] = []
        self._graph = None
        self._positions: dict[str, int] | None = None
        self._parameters: dict[str, Tensor] = {}
        self._gradient_sums: dict[str, Tensor] = {}
        self._gradient_steps = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method)

    # ----------------------------------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        install_checkpoint_restore(pl_module)
        if stage != "fit":
            return
        self._check_launcher(trainer)
        self._schedule = self._resolve_schedule(trainer)
        target = _network(pl_module)
        self._ignored_names = resolve_module_names(target, self.ignored_layers, "IterativePruning.ignored_layers")
        # FitNets adapters read the hinted student layers' channels: those keep their width.
        hinted = [pair.student for pair in getattr(pl_module, "hint_pairs", ()) if hasattr(pair, "student")]
        self._ignored_names += resolve_module_names(target, hinted, "model.feature_hints")
        if not any(isinstance(m, PRUNABLE_TYPES) for m in target.modules()):
            raise ValueError(f"IterativePruning found no Conv/Linear layer in {type(target).__name__} to prune")

    def _check_launcher(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

        if self.method == "channel" and self.remove_channels and isinstance(
                getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            # These launchers copy the final weights back into the main process's module, which still has
            # the original shapes: Lightning's load_state_dict there would fail after a whole run.
            raise MisconfigurationException(
                "IterativePruning(method='channel', remove_channels=True) cannot run under a spawn/fork launcher "
                "(strategy='ddp_spawn', 'ddp_fork', 'ddp_notebook'): Lightning copies the final weights into the "
                "main process's full-size module. Use strategy='ddp' (run the training as a script), or "
                "remove_channels=False and remove_pruned_channels() after fit")

    def _resolve_schedule(self, trainer: pl.Trainer) -> SparsitySchedule:
        end = self.end
        if end is None:
            if self.schedule == "one_shot":
                end = self.start
            elif self.unit == "epoch" and trainer.max_epochs is not None and trainer.max_epochs > 0:
                end = max(self.start, trainer.max_epochs - 1)
            else:
                raise ValueError(f"IterativePruning(schedule={self.schedule!r}) needs end_{self.unit}"
                                 + (": the trainer has no max_epochs to end the schedule at" if self.unit == "epoch"
                                    else " (step schedules have no default end)"))
        if self.start > end:
            raise ValueError(f"start_{self.unit}={self.start} is after end_{self.unit}={end}")
        limit = trainer.max_epochs if self.unit == "epoch" else trainer.max_steps
        if limit is not None and limit > 0 and self.start >= limit:
            rank_zero_warn(f"IterativePruning: start_{self.unit}={self.start} is beyond the run's max_{self.unit}s="
                           f"{limit}: nothing will be pruned in this run")
        return SparsitySchedule(self.schedule, self.target_sparsity, self.start, end, self.frequency,
                                self.initial_sparsity)

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
        # Everything that can fail on the user's network (tracing, layer selection) fails here, before training.
        target = _network(pl_module)
        self._example_input = self._find_example_input(trainer, pl_module)
        if self._example_input is None and self.method == "channel":
            raise ValueError("IterativePruning(method='channel') needs an example input to trace the network: set "
                             "`example_input_array` on the LightningModule or pass example_input_shape=(1, C, H, W)")
        if self._example_input is not None:
            self._example_input = self._example_input.to(next(target.parameters()).device)
            ignored = self._ignored_names + default_ignored_layers(
                target, self._example_input, self.keep_first_conv, self.keep_classifier)
            self._positions = layer_output_positions(target, self._example_input)
        else:
            ignored = self._ignored_names + self._default_ignored_by_order(target)
        ignored_modules = {id(m) for m in modules_under(target, ignored)}
        self._pruned_tensors = [f"{name}.weight" if name else "weight" for name, module in target.named_modules()
                                if isinstance(module, PRUNABLE_TYPES) and id(module) not in ignored_modules
                                and isinstance(getattr(module, "weight", None), nn.Parameter)]
        if self.method == "n_m":
            weights = named_float_parameters(target)
            self._pruned_tensors = [n for n in self._pruned_tensors if n_m_supported(weights[n], self.m)]
        if self.method == "channel" and not self.removed:
            self._graph = build_dependency_graph(target, self._example_input)
            self._groups = prunable_groups(self._graph, [m for m in target.modules() if id(m) in ignored_modules])
            if not self._groups:
                raise ValueError(f"IterativePruning found no prunable channel group in {type(target).__name__} "
                                 f"(ignored: {ignored}); check ignored_layers")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every strategy has restored the checkpoint by now (some only after on_fit_start): rebuild the
        # masks from the restored state and hold on to the (possibly resized) parameters.
        target = _network(pl_module)
        self._parameters = named_float_parameters(target)
        if self.method != "channel":
            unknown = sorted(set(self.masks) - set(self._parameters))
            if unknown:
                raise ValueError(f"the checkpoint's IterativePruning masks name parameters {unknown[:5]} that "
                                 f"{type(target).__name__} does not have: was it saved from another network?")
        elif self.removed:
            self.masks, self._graph, self._groups = {}, None, []
        else:
            unknown = sorted(set(self.pruned_channels) - {g.name for g in self._groups})
            if unknown:
                raise ValueError(f"the checkpoint's IterativePruning state prunes channel groups {unknown[:5]} that "
                                 f"are not prunable here: another network, or other ignored_layers?")
            self.masks, _ = channel_masks(target, self._groups, self.pruned_channels)
        if self.masks:
            apply_masks(self._parameters, self.masks)

    def _default_ignored_by_order(self, target: nn.Module) -> list[str]:
        names = [name for name, m in target.named_modules() if isinstance(m, PRUNABLE_TYPES)]
        ignored = []
        if names and self.keep_first_conv:
            ignored.append(names[0])
        if names and self.keep_classifier:
            ignored.append(names[-1])
        return ignored

    # ----------------------------------------------------------------------------------------- schedule
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch":
            self._advance(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.unit == "step":
            self._advance(trainer, pl_module, trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The optimizer step just moved pruned weights off zero: put them back.
        if self.masks:
            apply_masks(self._parameters, self.masks)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # Taylor scores need gradients, but Lightning clears them before every validation run: keep a
        # running sum over the steps since the last pruning point (Molchanov et al. also average batches).
        if self.importance != "taylor" or self.removed or not self._groups:
            return
        with torch.no_grad():
            for name, param in self._parameters.items():
                if param.grad is not None:
                    if name in self._gradient_sums:
                        self._gradient_sums[name].add_(param.grad)
                    else:
                        self._gradient_sums[name] = param.grad.detach().clone()
        self._gradient_steps += 1

    def _channel_scores(self) -> dict[str, Tensor]:
        if self.importance != "taylor" or not self._gradient_steps:
            return channel_scores(self._groups, self.importance)  # Taylor without gradients falls back to L1
        saved = {name: param.grad for name, param in self._parameters.items()}
        try:
            for name, param in self._parameters.items():
                total = self._gradient_sums.get(name)
                param.grad = total / self._gradient_steps if total is not None else None
            return channel_scores(self._groups, self.importance)
        finally:
            for name, param in self._parameters.items():
                param.grad = saved[name]
            self._gradient_sums, self._gradient_steps = {}, 0

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.method == "channel" and self.remove_channels and not self.removed and self.pruned_channels:
            reached = self.history[-1]["target"] if self.history else 0.0
            rank_zero_warn("IterativePruning: fit ended before the last pruning point; removing the channels pruned "
                           f"so far (sparsity {reached:.2f} of the target {self.target_sparsity})")
            self._remove(trainer, pl_module, rebuild=False)

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, position: int) -> None:
        points = self._schedule.points
        due = None
        while self.next_point < len(points) and points[self.next_point] <= position:
            due = self.next_point
            self.next_point += 1
        if due is None or self.removed:
            return
        self._prune(trainer, pl_module, due)
        if due == len(points) - 1 and self.method == "channel" and self.remove_channels:
            self._remove(trainer, pl_module, rebuild=True)

    # ----------------------------------------------------------------------------------------- pruning
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: int) -> None:
        sparsity = self._schedule.sparsity_at_point(point)
        target = _network(pl_module)
        weights = {name: self._parameters[name] for name in self._pruned_tensors}
        if self.method == "channel":
            scores = self._channel_scores()
            chosen = select_channels(self._groups, scores, sparsity, self.scope, self.min_channels, self.round_to,
                                     previous=self.pruned_channels)
            # Rank 0 decides, every rank applies: identical masks even if scores differ in the last bit.
            self.pruned_channels = trainer.strategy.broadcast(chosen, src=0)
            self.masks, unsupported = channel_masks(target, self._groups, self.pruned_channels)
            if unsupported:
                rank_zero_warn(f"IterativePruning: layer types {sorted(unsupported)} cannot be masked; their channels "
                               "are still removed at the end")
        elif self.method == "unstructured":
            masks = magnitude_masks(weights, sparsity, self.scope, previous=self.masks)
            self.masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.items()}, src=0)
        else:
            masks = n_m_masks(weights, self.n, self.m, previous=self.masks)
            self.masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.items()}, src=0)
        apply_masks(self._parameters, self.masks)
        self._report(trainer, pl_module, point, sparsity)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: int, sparsity: float) -> None:
        target = _network(pl_module)
        report = sparsity_report(target, self._pruned_tensors, self._example_input, self._positions)
        entry = {"point": float(self._schedule.points[point]) if self._schedule else -1.0, "target": sparsity,
                 "sparsity": report.sparsity, "params": float(report.nonzero_params),
                 "macs": float(report.nonzero_macs)}
        if self.method == "channel":
            channels = sum(g.channels for g in self._groups)
            entry["channel_sparsity"] = sum(len(v) for v in self.pruned_channels.values()) / max(1, channels)
        self.history.append(entry)
        metrics = {**report.metrics(), "pruning/target_sparsity": sparsity}
        if "channel_sparsity" in entry:
            metrics["pruning/channel_sparsity"] = entry["channel_sparsity"]
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
        target = _network(pl_module)
        states = optimizer_states(trainer, self._parameters) if rebuild else {}
        masks = {name: mask.cpu() for name, mask in self.masks.items()}
        report = remove_pruned_channels(target, self._example_input, pruned_channels=self.pruned_channels,
                                        ignored_layers=[])
        self.removed = True
        self.masks, self._graph, self._groups = {}, None, []
        self._gradient_sums, self._gradient_steps = {}, 0
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
                "pruned_channels": {k: list(v) for k, v in self.pruned_channels.items()},
                "masks": {k: v.detach().cpu() for k, v in self.masks.items()} if self.method != "channel" else {},
                "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("method", self.method) != self.method:
            raise ValueError(f"the checkpoint's IterativePruning state is for method={state_dict['method']!r}, "
                             f"this callback has method={self.method!r}")
        self.next_point = int(state_dict["next_point"])
        self.removed = bool(state_dict["removed"])
        self.pruned_channels = {k: list(v) for k, v in state_dict.get("pruned_channels", {}).items()}
        self.masks = dict(state_dict.get("masks", {}))
        self.history = list(state_dict.get("history", []))

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.method == "channel":
            # Always recorded: a pre-removal checkpoint then also reloads into an already pruned module.
            checkpoint_records(checkpoint)[CHECKPOINT_KEY] = {"architecture": architecture_record(
                compression_target(pl_module))}  # in float-network names, also once QAT has wrapped it
