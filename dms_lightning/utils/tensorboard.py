"""Finding the TensorBoard writer of a run, whatever loggers the user configured."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def tensorboard_writers(trainer: Trainer) -> list:
    """The ``SummaryWriter`` of every TensorBoard logger of ``trainer`` (empty if none, or not rank zero)."""
    if trainer.global_rank != 0:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_figure(trainer: Trainer, tag: str, figure, step: int | None = None) -> None:
    """Log a matplotlib figure as an image to every TensorBoard logger, then close it."""
    import matplotlib.pyplot as plt

    step = trainer.global_step if step is None else step
    for writer in tensorboard_writers(trainer):
        writer.add_figure(tag, figure, global_step=step, close=False)
    plt.close(figure)


def log_text(trainer: Trainer, tag: str, text: str, step: int | None = None) -> None:
    step = trainer.global_step if step is None else step
    for writer in tensorboard_writers(trainer):
        writer.add_text(tag, text, global_step=step)
