"""The shape every exporter callback shares: check its folder before training, write once when ``fit`` ends."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from dms_lightning.utils.io import ensure_writable_dir


class FitEndExporter(Callback):
    """Base of the export callbacks: ``setup`` fails before training when ``dirpath`` cannot be written, and
    ``on_fit_end`` calls :meth:`export` on rank zero only.

    Subclasses set ``self.dirpath`` (``None``: a default folder chosen at export time) and implement
    ``export(trainer, pl_module)``. ``dirpath_is_artifact`` says whether ``dirpath`` names the artifact
    folder itself (then its parent must be writable, the folder appears only once complete) or a folder
    written into.
    """

    dirpath_is_artifact: ClassVar[bool] = False
    #: Whether the exporter traces the run's network (then its output must be the class logits, checked when fit
    #: starts) rather than reading files another exporter wrote.
    traces_network: ClassVar[bool] = True
    dirpath: str | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Fail before training, not after it, when the directory cannot be written.
        if stage == "fit" and trainer.is_global_zero and self.dirpath is not None:
            folder = Path(self.dirpath).parent if self.dirpath_is_artifact else self.dirpath
            ensure_writable_dir(folder, f"{type(self).__name__}.dirpath")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.traces_network:
            from dms_lightning.export.source import check_logits_output

            check_logits_output(type(self).__name__, trainer, pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(trainer, pl_module)

    def export(self, trainer: Trainer, pl_module: LightningModule):  # pragma: no cover - abstract
        raise NotImplementedError
