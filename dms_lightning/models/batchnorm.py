"""BatchNorm re-estimation: recompute running statistics from data, weights untouched.

BatchNorm normalises with batch statistics in training and with its running averages in evaluation. The
running averages are an exponential moving average (``momentum`` 0.1: a time constant of ~10 steps) of
statistics of a network whose weights keep moving, so they lag the weights, and badly so when a run has
few optimizer steps (a few hundred images), after channels are removed, before BatchNorm is folded for
quantization and before calibration. Re-estimating them (AIMET's "BN re-estimation", the "precise BN" of
Wu & Johnson 2021) costs a few forward passes and no training.

:func:`reestimate_batch_norm` is the functional form, usable without a Trainer: every BatchNorm's input
is accumulated over ``num_batches`` batches (sum, sum of squares and count per channel, in float64), the
population mean and variance replace the running statistics. Each BatchNorm normalises its batch with
that batch's own statistics during the pass (training-mode forward, as in training), every other module
stays in eval mode (no dropout, no activation-range observers), nothing gets a gradient. Under
``torch.distributed`` the sums are all-reduced, so every rank gets the statistics of all ranks' data.

:class:`BatchNormReestimation` applies it in a Lightning run where the statistics go stale: at the end of
training, before each validation when an epoch has too few steps for the running averages to settle, and
whenever another callback asks (:func:`reestimate_in_run`: after physical channel removal, before BN is
folded / frozen for QAT, before PTQ calibration). Batches come from the training images *without*
augmentation in a seeded order, so the result is the same run to run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from dms_lightning.utils.checkpoint import checkpoint_records, compression_target
from dms_lightning.utils.compression import as_network_input
from dms_lightning.utils.predictions import batch_images, batch_labels, eval_mode

#: Key of the re-estimation history in ``checkpoint["dms_lightning"]``.
CHECKPOINT_RECORD = "batch_norm_reestimation"

#: A running average with momentum ``m`` has settled after about ``SETTLE_TIME_CONSTANTS / m`` steps
#: (the initial statistics then weigh ``(1 - m) ** (3 / m)`` ≈ e⁻³ ≈ 5 %).
SETTLE_TIME_CONSTANTS = 3.0


@dataclass
class ReestimationResult:
    """What one re-estimation did: how many BatchNorms, batches and samples, and which were skipped."""

    layers: int = 0
    batches: int = 0
    samples: int = 0
    world_size: int = 1
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_norm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(name, module)`` of every BatchNorm of ``model`` that keeps running statistics."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]


def _folded_hosts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that hold a BatchNorm in ``.bn`` and bypass it in eval mode (a conv with BatchNorm folded in).

    Such a host (``quant.modules.QuantConvBn2d``) reads ``bn`` only in training mode while its
    ``bn_frozen`` flag is off; it is switched to training mode (itself, not its children) for the pass.
    """
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "bn", None), _BatchNorm) and isinstance(getattr(m, "bn_frozen", None), torch.Tensor)]


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def _statistics_mode(model: nn.Module, layers: list[tuple[str, _BatchNorm]], hosts: list[nn.Module]) -> Iterator[None]:
    """Eval mode except the BatchNorms (and their folded hosts); momenta 0 so the pass itself changes nothing."""
    modes = {module: module.training for module in model.modules()}
    momenta = {bn: bn.momentum for _, bn in layers}
    try:
        model.eval()
        for _, bn in layers:
            bn.train()
            bn.momentum = 0.0
        for host in hosts:
            host.training = True  # itself only: its quantizers stay in eval mode and observe nothing
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        for bn, momentum in momenta.items():
            bn.momentum = momentum


def reestimate_batch_norm(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = 32,
    *,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    sync_distributed: bool = True,
) -> ReestimationResult:
    """Replace the running mean / variance of every BatchNorm of ``model`` by their values over ``batches``.

    Args:
        model: any network; its weights and its other buffers are not changed, and each module's
            train / eval mode and each BatchNorm's momentum are restored afterwards.
        batches: image batches (tensors, ``(images, labels, ...)`` or dicts with an ``image`` key). Pass
            un-augmented data in a fixed order (or a seeded loader) for a result that does not change run
            to run.
        num_batches: use at most this many batches (``None``: all).
        forward: ``forward(model, images)`` when calling ``model(images)`` is not how it runs.
        sync_distributed: under ``torch.distributed``, all-reduce the sums over ranks (each rank must then
            call this with the same ``num_batches``).

    Returns:
        :class:`ReestimationResult` (BatchNorms updated, batches and samples seen, world size).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> result = reestimate_batch_norm(net, [torch.randn(8, 1, 8, 8) * 3 + 1 for _ in range(4)])
        >>> result.layers, result.batches, result.samples
        (1, 4, 32)
        >>> round(float(net[1].running_var.mean()) / 9, 0) > 0
        True
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches={num_batches!r} must be a positive integer or None (all batches)")
    forward = forward or (lambda net, images: net(images))
    host_pairs = _folded_hosts(model)
    frozen = {id(host.bn): name for name, host in host_pairs if bool(host.bn_frozen)}
    # A frozen folded BatchNorm's statistics are part of the deployed weights now: changing them would
    # change the network QAT fine-tuned, so they are left alone.
    layers = [(name, bn) for name, bn in batch_norm_layers(model) if id(bn) not in frozen]
    hosts = [host for _, host in host_pairs if id(host.bn) not in frozen]
    result = ReestimationResult(layers=len(layers), skipped=sorted(frozen.values()),
                                world_size=_distributed_world() if sync_distributed else 1)
    if not layers:
        return result
    sums: dict[int, list] = {}

    def accumulate(bn: _BatchNorm, inputs: tuple) -> None:
        x = inputs[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        entry = sums.setdefault(id(bn), [0.0, 0.0, 0])
        entry[0] = entry[0] + x.sum(dim=dims)
        entry[1] = entry[1] + (x * x).sum(dim=dims)
        entry[2] += x.numel() // x.shape[1]

    handles = [bn.register_forward_pre_hook(accumulate) for _, bn in layers]
    try:
        with _statistics_mode(model, layers, hosts), torch.inference_mode(False), torch.no_grad():
            for index, batch in enumerate(batches):
                if num_batches is not None and index >= num_batches:
                    break
                images = as_network_input(batch_images(batch), model)
                forward(model, images)
                result.batches += 1
                result.samples += len(images)
    finally:
        for handle in handles:
            handle.remove()
    if result.batches == 0:
        raise ValueError("reestimate_batch_norm: the batches yielded nothing; BatchNorm statistics were not changed")
    for _, bn in layers:
        total, squares, count = sums.get(id(bn), (None, None, 0))
        stacked = torch.zeros(2 * bn.num_features + 1, dtype=torch.float64, device=bn.running_mean.device)
        if count:
            stacked[:bn.num_features], stacked[bn.num_features:-1], stacked[-1] = total, squares, count
        if result.world_size > 1:
            dist.all_reduce(stacked)  # sums of x, x² and counts: the exact pooled statistics over ranks
        count = float(stacked[-1])
        if count < 2:
            continue  # not reached in this network (an unused branch): keep what it had
        mean = stacked[:bn.num_features] / count
        variance = (stacked[bn.num_features:-1] / count - mean * mean).clamp_min(0.0) * (count / (count - 1))
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(variance.to(bn.running_var.dtype))
    return result


# ------------------------------------------------------------------------------------------ in a Lightning run
def _rebuild_loader(loader: DataLoader, seed: int, world_size: int, rank: int) -> DataLoader:
    """The same dataset and collation, shuffled by a seeded generator (per rank its own shard)."""
    dataset: Dataset = loader.dataset
    batch_size = loader.batch_size or 32
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, drop_last=math.ceil(len(dataset) / world_size) > batch_size)
    generator = torch.Generator().manual_seed(seed)
    # Shuffled: a class-sorted folder read in order would feed BatchNorm one class per batch.
    # A last batch of one image cannot be normalised by its own statistics; smaller ones are kept.
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      drop_last=len(dataset) % batch_size == 1)


def statistics_loader(trainer: Trainer, seed: int = 0, local: bool = False) -> DataLoader | None:
    """Training images for BatchNorm statistics: without augmentation when the data module can say so.

    :class:`~dms_lightning.DMSDataModule` serves the training split with its evaluation transform; any other
    data module's ``train_dataloader()`` (or the trainer's) is used as is, iterated under a fixed seed. Under
    DDP each rank gets its own shard, unless ``local`` (one process reading everything).
    """
    datamodule = getattr(trainer, "datamodule", None)
    loader = None
    if datamodule is not None and hasattr(datamodule, "_loader") and hasattr(datamodule, "datasets"):
        loader = datamodule._loader("train")  # DMSDataModule: the training images, evaluation transform
    elif datamodule is not None and hasattr(datamodule, "train_dataloader"):
        loader = datamodule.train_dataloader()
    if loader is None or not isinstance(loader, DataLoader):
        loader = trainer.train_dataloader if isinstance(trainer.train_dataloader, DataLoader) else loader
    if not isinstance(loader, DataLoader):
        return None
    return _rebuild_loader(loader, seed, 1 if local else trainer.world_size, 0 if local else trainer.global_rank)


def _val_accuracy(trainer: Trainer, network: nn.Module, max_batches: int | None, local: bool = False
                  ) -> float | None:
    """Top-1 of ``network`` on the validation split (all ranks' samples), or ``None`` without labels."""
    datamodule = getattr(trainer, "datamodule", None)
    loader = datamodule.val_dataloader() if datamodule is not None and hasattr(datamodule, "val_dataloader") else None
    if loader is None:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    if loader is None or isinstance(loader, (list, tuple)) and not loader:
        return None
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with eval_mode(network), torch.no_grad():
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            labels = batch_labels(batch)
            if labels is None:
                return None
            logits = network(as_network_input(batch_images(batch), network))
            correct[0] += (logits.argmax(dim=1) == labels.to(device)).sum()
            correct[1] += len(labels)
    if not local and trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct)
    return float(correct[0] / correct[1]) if correct[1] > 0 else None


EveryEpoch = Literal["auto", "always", "never"]


class BatchNormReestimation(Callback):
    """Re-estimate BatchNorm running statistics where training leaves them stale.

    With the weights frozen, the network's BatchNorm statistics are recomputed over ``num_batches`` training
    batches (the training images without augmentation, shuffled with ``seed``; see
    :func:`reestimate_batch_norm`):

    * at the end of training (after the last training step, before the last validation and checkpoint, so
      the exported and reported network has them);
    * at the end of every epoch's training steps (before its validation and checkpoint) with
      ``every_epoch="always"``, or with ``"auto"`` when an epoch has fewer optimizer steps than the running
      averages need to settle (``3 / momentum``: 30 at momentum 0.1) — a few hundred images, where eval-mode
      BatchNorm otherwise feeds the head the wrong distribution;
    * whenever another callback asks through :func:`reestimate_in_run` (:class:`IterativePruning` after it
      removes channels, :class:`QuantizationAwareTraining` before it folds and freezes BatchNorm,
      :class:`PostTrainingQuantization` before it calibrates).

    Each event logs ``bn_reestimation/val_acc_before`` and ``.../val_acc_after`` (validation top-1 before and
    after, unless ``log_accuracy=False``), prints one line, and is kept in :attr:`history`, which is saved
    with the callback state and under ``checkpoint["dms_lightning"]["batch_norm_reestimation"]``. Works in a
    plain user LightningModule (the compression target, else the whole module) and under DDP (statistics
    reduced over ranks).

    Args:
        num_batches: training batches per re-estimation (``None``: the whole training split).
        every_epoch: ``"auto"`` (only when epochs are too short, see above), ``"always"`` or ``"never"``.
        at_train_end: re-estimate once training ends.
        seed: order of the batches (and of any augmentation a foreign data module applies).
        log_accuracy: measure validation top-1 before and after each re-estimation.
        accuracy_batches: at most this many validation batches for that (``None``: all).

    Example:
        >>> from dms_lightning.callbacks import BatchNormReestimation
        >>> trainer = Trainer(callbacks=[BatchNormReestimation(num_batches=16)])  # doctest: +SKIP
    """

    def __init__(self, num_batches: int | None = 32, every_epoch: EveryEpoch = "auto", at_train_end: bool = True,
                 seed: int = 0, log_accuracy: bool = True, accuracy_batches: int | None = None) -> None:
        super().__init__()
        for name, value in (("num_batches", num_batches), ("accuracy_batches", accuracy_batches)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"BatchNormReestimation.{name}={value!r} must be a positive integer or None (all)")
        if every_epoch not in ("auto", "always", "never"):
            raise ValueError(f"BatchNormReestimation.every_epoch={every_epoch!r} must be 'auto', 'always' or 'never'")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"BatchNormReestimation.seed={seed!r} must be an integer")
        for name, value in (("at_train_end", at_train_end), ("log_accuracy", log_accuracy)):
            if not isinstance(value, bool):
                raise ValueError(f"BatchNormReestimation.{name}={value!r} must be true or false")
        self.num_batches, self.every_epoch, self.at_train_end = num_batches, every_epoch, at_train_end
        self.seed, self.log_accuracy, self.accuracy_batches = seed, log_accuracy, accuracy_batches
        self.history: list[dict[str, Any]] = []
        self._per_epoch = every_epoch == "always"
        self._last_step: int | None = None

    # ---------------------------------------------------------------- policy
    @staticmethod
    def settle_steps(model: nn.Module) -> int | None:
        """Optimizer steps the slowest BatchNorm running average needs to settle (``None``: no BatchNorm)."""
        momenta = [bn.momentum for _, bn in batch_norm_layers(model)]
        if not momenta:
            return None
        if any(m is None for m in momenta):
            return None  # cumulative averages: every step counts equally, they do not lag by a time constant
        return math.ceil(SETTLE_TIME_CONSTANTS / max(min(momenta), 1e-6))

    @staticmethod
    def short_epoch(trainer: Trainer, model: nn.Module) -> tuple[int, int] | None:
        """``(optimizer steps per epoch, steps to settle)`` when an epoch of ``trainer`` is too short for the
        running averages of ``model``'s BatchNorms to settle (:meth:`settle_steps`), else ``None``."""
        steps = trainer.num_training_batches
        settle = BatchNormReestimation.settle_steps(model)
        if settle is None or not isinstance(steps, int) or math.isinf(steps):
            return None
        steps_per_epoch = steps // max(1, trainer.accumulate_grad_batches)
        return (steps_per_epoch, settle) if steps_per_epoch < settle else None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not in on_fit_start: the training dataloader (and its length) is set up just before.
        if self.every_epoch != "auto":
            return
        short = self.short_epoch(trainer, compression_target(pl_module))
        self._per_epoch = short is not None
        if short is not None:
            rank_zero_info(f"[BatchNormReestimation] {short[0]} optimizer steps per epoch, fewer than the "
                           f"{short[1]} BatchNorm's running averages need to settle: re-estimating them after every "
                           "epoch's training steps, before validation")

    # ---------------------------------------------------------------- events
    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_last_batch:
            return
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs - 1
        last_step = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        if self._per_epoch:
            self.reestimate(trainer, pl_module, "epoch end")
        elif self.at_train_end and (last_epoch or last_step):
            self.reestimate(trainer, pl_module, "train end")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Early stopping or a time limit ended training before the last epoch's last batch.
        if self.at_train_end and self._last_step != trainer.global_step:
            self.reestimate(trainer, pl_module, "train end")

    def reestimate(self, trainer: Trainer, pl_module: LightningModule, reason: str,
                   network: nn.Module | None = None, local: bool = False) -> ReestimationResult | None:
        """Re-estimate ``network`` (default: the compression target) now; log and record it.

        Nothing is done when no optimizer step was taken since the last re-estimation (the statistics are
        fresh: channel removal and quantizer insertion keep the kept channels' values). ``local``: called on
        one rank only (rank-zero export code), so nothing is reduced over ranks.
        """
        network = compression_target(pl_module) if network is None else network
        if not batch_norm_layers(network) or self._last_step == trainer.global_step:
            return None
        loader = statistics_loader(trainer, self.seed, local)
        if loader is None:
            rank_zero_warn("BatchNormReestimation: no training dataloader to draw batches from; statistics unchanged")
            return None
        before = _val_accuracy(trainer, network, self.accuracy_batches, local) if self.log_accuracy else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # a foreign data module's augmentation draws the same numbers each run
            result = reestimate_batch_norm(network, loader, self.num_batches, sync_distributed=not local)
        after = _val_accuracy(trainer, network, self.accuracy_batches, local) if self.log_accuracy else None
        self._last_step = trainer.global_step
        event = {"reason": reason, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                 **result.to_dict(), "val_acc_before": before, "val_acc_after": after}
        self.history.append(event)
        metrics = {k: v for k, v in (("bn_reestimation/val_acc_before", before),
                                     ("bn_reestimation/val_acc_after", after)) if v is not None}
        if metrics and trainer.is_global_zero and not local:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        change = "" if before is None or after is None else f"; val top-1 {100 * before:.2f} % -> {100 * after:.2f} %"
        rank_zero_info(f"[BatchNormReestimation] {reason} (epoch {trainer.current_epoch}): {result.layers} BatchNorms "
                       f"over {result.samples} training images{change}")
        return result

    # ---------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint_records(checkpoint)[CHECKPOINT_RECORD] = {"num_batches": self.num_batches, "seed": self.seed,
                                                             "history": list(self.history)}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "per_epoch": self._per_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._per_epoch = bool(state_dict.get("per_epoch", self._per_epoch))


def find_reestimation(trainer: Trainer) -> BatchNormReestimation | None:
    """The run's :class:`BatchNormReestimation` callback, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, BatchNormReestimation)), None)


def reestimate_in_run(trainer: Trainer, pl_module: LightningModule, reason: str,
                      network: nn.Module | None = None, local: bool = False) -> ReestimationResult | None:
    """For other callbacks: re-estimate now if the run has a :class:`BatchNormReestimation` (else do nothing).

    Called after physical channel removal, before QAT folds / freezes BatchNorm and before PTQ calibration;
    ``local=True`` from code that runs on rank zero only.
    """
    callback = find_reestimation(trainer)
    return None if callback is None else callback.reestimate(trainer, pl_module, reason, network, local)
