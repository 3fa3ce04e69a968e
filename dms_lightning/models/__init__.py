"""Models: torchvision backbones for 1- or 3-channel input, and the DMSClassifier LightningModule."""

from dms_lightning.models.backbones import SUPPORTED_BACKBONES, build_backbone
from dms_lightning.models.classifier import ClassificationModule, DMSClassifier

__all__ = ["SUPPORTED_BACKBONES", "build_backbone", "ClassificationModule", "DMSClassifier"]
