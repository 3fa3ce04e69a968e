"""dms_lightning: train, distil, prune, quantize and export driver-monitoring classifiers with Lightning.

Public names: :class:`DMSDataModule`, :class:`DMSClassifier`, :class:`DistillationModule`; the callbacks
live in :mod:`dms_lightning.callbacks`.
"""

from dms_lightning.data.datamodule import DMSDataModule
from dms_lightning.models.classifier import DMSClassifier

__all__ = ["DMSDataModule", "DMSClassifier"]
__version__ = "0.1.0"

try:  # distillation is an optional stage of the package while it is being built
    from dms_lightning.distill.module import DistillationModule  # noqa: F401

    __all__.append("DistillationModule")
except ImportError:  # pragma: no cover
    pass
