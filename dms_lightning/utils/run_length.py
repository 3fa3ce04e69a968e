"""How far a ``fit`` can go: the last epoch and optimizer step its Trainer limits allow.

A schedule in epochs meets a run limited in steps (``max_steps``), and a schedule in steps meets a run limited
in epochs (``max_epochs`` with ``accumulate_grad_batches`` / ``limit_train_batches``): neither limit says alone
whether the schedule is reached. Once the training data is loaded (``on_train_start``) both are known, and a
callback whose schedule lies beyond them refuses the run before its first step instead of silently stopping
short of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning.pytorch import Trainer


@dataclass(frozen=True)
class RunLength:
    """The limits of one ``fit``, in epochs and optimizer steps (``None``: unbounded or not known yet).

    Args:
        steps_per_epoch: optimizer steps per epoch (``ceil(training batches / accumulate_grad_batches)``).
        last_epoch: index of the last epoch the run starts.
        last_step: ``global_step`` at the start of the last training batch.
        limited_by: the Trainer settings that set these limits, for error messages.
    """

    steps_per_epoch: int | None
    last_epoch: int | None
    last_step: int | None
    limited_by: str

    def last(self, unit: str) -> int | None:
        """The last position in ``unit`` (``"epoch"`` or ``"step"``) the run reaches."""
        return self.last_epoch if unit == "epoch" else self.last_step

    def epoch_of_step(self, step: int) -> int | None:
        """The epoch whose training batches start at ``global_step == step`` (``None``: not known yet)."""
        return None if not self.steps_per_epoch else step // self.steps_per_epoch


def run_length(trainer: Trainer) -> RunLength:
    """The limits of ``trainer``'s fit; the per-epoch figures are known once its training data is set up.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> run_length(Trainer(max_epochs=3, logger=False)).last_epoch
        2
    """
    batches = trainer.num_training_batches
    accumulate = max(1, int(trainer.accumulate_grad_batches or 1))
    steps_per_epoch = math.ceil(batches / accumulate) if isinstance(batches, int) and batches > 0 else None
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
    max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
    epoch_limits, step_limits, reasons = [], [], []
    if max_epochs is not None:
        epoch_limits.append(max_epochs)
        reasons.append(f"max_epochs={max_epochs}")
        if steps_per_epoch is not None:
            step_limits.append(max_epochs * steps_per_epoch)
    if max_steps is not None:
        step_limits.append(max_steps)
        reasons.append(f"max_steps={max_steps}")
        if steps_per_epoch is not None:
            epoch_limits.append(math.ceil(max_steps / steps_per_epoch))
    if steps_per_epoch is not None and reasons:
        reasons.append(f"{steps_per_epoch} optimizer steps per epoch: {batches} training batches, "
                       f"accumulate_grad_batches={accumulate}")
    epochs = min(epoch_limits) if epoch_limits else None
    steps = min(step_limits) if step_limits else None
    return RunLength(steps_per_epoch=steps_per_epoch, last_epoch=None if epochs is None else epochs - 1,
                     last_step=None if steps is None else steps - 1, limited_by=", ".join(reasons) or "no limit")
