"""``python -m dms_lightning fit|validate|test|predict --config ...``: the LightningCLI of dms_lightning."""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from dms_lightning.data.datamodule import DMSDataModule
from dms_lightning.models.classifier import ClassificationModule
from dms_lightning.predict import PredictionWriter


class DMSLightningCLI(LightningCLI):
    """LightningCLI with the data module's classes, channels and image size linked into the model.

    ``data.num_classes``, ``data.class_names``, ``data.channels``, ``data.image_size`` and
    ``data.class_weights`` (``data.balance: loss_weights``) are known only
    once the data module has looked at its source, so they are linked on instantiation: point
    ``data.data_dir`` at a new folder of classes and the model follows with no other change. A
    ``checkpoint`` section configures the ModelCheckpoint (best ``val/acc`` and ``last``); TensorBoard is
    the default logger under ``runs/``; ``predict`` writes ``predictions.csv`` to the log directory.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", ClassificationModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", DMSDataModule)
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        defaults = {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "runs", "name": "dms"}},
                    "callbacks": [LearningRateMonitor(logging_interval="epoch")],
                    "log_every_n_steps": 10}
        kwargs["trainer_defaults"] = {**defaults, **kwargs.get("trainer_defaults", {})}
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-epoch{epoch:02d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        for source, target in (("num_classes", "num_classes"), ("class_names", "class_names"),
                               ("channels", "in_channels"), ("image_size", "image_size"),
                               ("class_weights", "class_weights")):
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    @override
    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "predict" and not any(isinstance(c, PredictionWriter) for c in trainer.callbacks):
            trainer.callbacks.append(PredictionWriter())
        return trainer


def main(args=None) -> DMSLightningCLI:
    return DMSLightningCLI(args=args)


__all__ = ["DMSLightningCLI", "main", "TensorBoardLogger"]
