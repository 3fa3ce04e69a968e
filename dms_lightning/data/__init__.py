"""Data: the procedural synthetic DMS set, image-folder and CSV sources, and DMSDataModule."""

from dms_lightning.data.datamodule import DMSDataModule
from dms_lightning.data.synthetic import SYNTHETIC_CLASSES

__all__ = ["DMSDataModule", "SYNTHETIC_CLASSES"]
