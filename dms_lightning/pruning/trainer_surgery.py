"""Keeping a running Trainer consistent after the network's parameters were replaced mid-``fit``.

Physical channel removal swaps every pruned layer's tensors for smaller ones. Three things in the
Trainer still point at the old tensors and are rebuilt here:

* the DDP wrapper (its gradient buckets are registered on the old parameters),
* the optimizers (their parameter lists and state): each kept weight keeps its optimizer state (Adam
  moments, momentum), sliced like the weight itself, so training continues rather than restarts,
* the LR schedulers, which are re-created and then moved to where the old ones were, so the learning
  rate continues on its curve instead of restarting warm-up.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


def rewrap_distributed(trainer: pl.Trainer) -> None:
    """Re-create the DDP wrapper around the (changed) LightningModule."""
    strategy = trainer.strategy
    wrapped = strategy.model
    if isinstance(wrapped, DistributedDataParallel) and hasattr(strategy, "_setup_model"):
        strategy.model = strategy._setup_model(wrapped.module)
        if hasattr(strategy, "_register_ddp_hooks"):
            strategy._register_ddp_hooks()


def kept_indices(mask: Tensor) -> list[Tensor | None]:
    """Per dimension of a channel mask, the indices that survive removal (``None``: all of them)."""
    kept: list[Tensor | None] = []
    for dim in range(mask.dim()):
        alive = mask.movedim(dim, 0).reshape(mask.shape[dim], -1).any(dim=1)
        kept.append(None if bool(alive.all()) else alive.nonzero().flatten())
    return kept


def _slice(tensor: Tensor, kept: list[Tensor | None]) -> Tensor:
    for dim, index in enumerate(kept):
        if index is not None:
            tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor


def optimizer_states(trainer: pl.Trainer, parameters: Mapping[str, Tensor]) -> dict[str, dict]:
    """The optimizer state of every named parameter (before the parameters are replaced)."""
    by_id = {id(p): name for name, p in parameters.items()}
    states: dict[str, dict] = {}
    for optimizer in trainer.strategy.optimizers:
        for param, state in optimizer.state.items():
            if id(param) in by_id and state:
                states[by_id[id(param)]] = {"shape": tuple(param.shape), "state": state}
    return states


def carry_optimizer_states(trainer: pl.Trainer, states: Mapping[str, dict], masks: Mapping[str, Tensor],
                           parameters: Mapping[str, Tensor]) -> int:
    """Give each new parameter its old optimizer state, sliced along the channels that were kept.

    Returns how many parameters got their state back; a parameter whose slice does not fit keeps a fresh one.
    """
    carried = 0
    owner = {id(p): opt for opt in trainer.strategy.optimizers for g in opt.param_groups for p in g["params"]}
    for name, param in parameters.items():
        old, optimizer = states.get(name), owner.get(id(param))
        if old is None or optimizer is None:
            continue
        kept = kept_indices(masks[name]) if name in masks else [None] * param.dim()
        new_state = {}
        for key, value in old["state"].items():
            if isinstance(value, Tensor) and tuple(value.shape) == old["shape"]:
                value = _slice(value, kept)
                if value.shape != param.shape:
                    break
            new_state[key] = value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)
        else:
            optimizer.state[param] = new_state
            carried += 1
    return carried


def rebuild_optimizers(trainer: pl.Trainer) -> None:
    """Call ``configure_optimizers`` again and continue every LR schedule where it was.

    Learning rates and scheduler positions carry over. A step-based scheduler whose state cannot be
    transferred is fast-forwarded to ``trainer.global_step`` (epoch-based: ``trainer.current_epoch``).
    Optimizer state is restored separately (:func:`carry_optimizer_states`).
    """
    strategy = trainer.strategy
    old_lrs = [[group["lr"] for group in opt.param_groups] for opt in strategy.optimizers]
    old_schedulers = [(config.scheduler, config.interval) for config in strategy.lr_scheduler_configs]
    strategy.setup_optimizers(trainer)
    for config, (old, interval) in zip(strategy.lr_scheduler_configs, old_schedulers):
        try:
            config.scheduler.load_state_dict(copy.deepcopy(old.state_dict()))
        except Exception as err:  # noqa: BLE001 - any scheduler type; fall back to replaying its steps
            log.info("scheduler state not transferable (%s); fast-forwarding it", err)
            steps = trainer.global_step if interval == "step" else trainer.current_epoch
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(steps):
                    config.scheduler.step()
    for optimizer, lrs in zip(strategy.optimizers, old_lrs):
        if len(lrs) == len(optimizer.param_groups):
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
