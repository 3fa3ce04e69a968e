"""Knowledge distillation: a frozen DMSClassifier teacher trains a small student.

:class:`DistillationModule` (logit KD, FitNets hints, attention transfer) and the losses it is built from.
"""

from dms_lightning.distill.features import FeaturePair, capture_outputs
from dms_lightning.distill.losses import (
    HintAdapter,
    attention_map,
    attention_transfer_loss,
    distillation_loss,
    kd_loss,
)
from dms_lightning.distill.module import DistillationModule
from dms_lightning.distill.teacher import FrozenTeacher, load_teacher

__all__ = [
    "DistillationModule",
    "FeaturePair",
    "FrozenTeacher",
    "HintAdapter",
    "attention_map",
    "attention_transfer_loss",
    "capture_outputs",
    "distillation_loss",
    "kd_loss",
    "load_teacher",
]
