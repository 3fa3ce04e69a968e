"""Keeping a running Trainer consistent after the network's parameters were replaced mid-``fit``.

Physical channel removal swaps every pruned layer's tensors for smaller ones. Three things in the
Trainer still point at the old tensors and are rebuilt here:

* the DDP wrapper (its gradient buckets are registered on the old parameters),
* the optimizers (their parameter lists and state),
* the LR schedulers, which are re-created and then moved to where the old ones were, so the learning
  rate continues on its curve instead of restarting warm-up.
"""

from __future__ import annotations

import copy
import logging
import warnings

import lightning.pytorch as pl
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


def rebuild_optimizers(trainer: pl.Trainer) -> None:
    """Call ``configure_optimizers`` again and continue every LR schedule where it was.

    The optimizers' state (momentum, Adam moments) belonged to the removed tensors and starts afresh;
    learning rates and scheduler positions carry over. A step-based scheduler whose state cannot be
    transferred is fast-forwarded to ``trainer.global_step`` (epoch-based: ``trainer.current_epoch``).
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
