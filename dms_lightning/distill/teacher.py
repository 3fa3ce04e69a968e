"""The distillation teacher: loaded from a DMSClassifier checkpoint and frozen for good.

:class:`FrozenTeacher` wraps the teacher network so that it stays in eval mode whatever calls
``.train()`` on its parent (Lightning does at the start of every training epoch), runs without autograd
and holds parameters with ``requires_grad=False``. :func:`load_teacher` reads the checkpoint and says
how to produce one when it is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from typing_extensions import override

from dms_lightning.models.backbones import build_backbone, load_state_dict_file
from dms_lightning.utils.checkpoint import load_checkpoint

TEACHER_COMMAND = "python -m dms_lightning fit --config configs/teacher.yaml"
TEACHER_DEFAULT_CHECKPOINT = "artifacts/teacher/best.ckpt"


class FrozenTeacher(nn.Module):
    """A network that is always in eval mode, never computes gradients and never learns.

    Example:
        >>> import torchvision
        >>> teacher = FrozenTeacher(torchvision.models.resnet18(num_classes=5))
        >>> _ = teacher.train()
        >>> teacher.network.training, any(p.requires_grad for p in teacher.parameters())
        (False, False)
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.requires_grad_(False)
        self.train(False)

    @override
    def train(self, mode: bool = True) -> FrozenTeacher:
        # BatchNorm running statistics and dropout of the teacher must not change while the student trains.
        return super().train(False)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.network(images)


class TeacherSpec:
    """What :func:`load_teacher` found: the network and the classes / channels it was trained for."""

    def __init__(self, network: nn.Module, num_classes: int | None, class_names: list[str] | None,
                 in_channels: int | None, backbone: str | None) -> None:
        self.network, self.num_classes, self.class_names = network, num_classes, class_names
        self.in_channels, self.backbone = in_channels, backbone


def load_teacher(checkpoint: str | Path, backbone: str | None = None, head: str | None = None,
                 head_hidden: int | None = None, num_classes: int | None = None,
                 in_channels: int | None = None) -> TeacherSpec:
    """Load the teacher network from a ``DMSClassifier`` Lightning checkpoint or a plain ``state_dict`` file.

    For a Lightning checkpoint the architecture comes from its hyper-parameters (``backbone``, ``head``
    and ``head_hidden`` override them if given) and pruned / quantized architectures are restored. A
    plain ``state_dict`` needs ``backbone``; ``num_classes`` and ``in_channels`` then default to the
    student's.
    """
    path = Path(checkpoint).expanduser()
    obj = load_checkpoint(path, "model.teacher_checkpoint", hint=(
        f"Train the teacher first with `{TEACHER_COMMAND}` (it writes {TEACHER_DEFAULT_CHECKPOINT}), or point "
        "model.teacher_checkpoint at a checkpoint of your own DMSClassifier, or pass a trained network as "
        "DistillationModule(teacher=...) (to load_from_checkpoint too, for a student distilled from one)."))
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) and "state_dict" in obj else None
    if isinstance(hparams, dict) and ("backbone" in hparams or backbone is not None):
        return _from_lightning_checkpoint(path, hparams, backbone, head, head_hidden)
    if backbone is None and isinstance(obj, dict) and "state_dict" in obj:
        raise ValueError(f"model.teacher_checkpoint={str(checkpoint)!r} is a Lightning checkpoint of another "
                         f"LightningModule, not of a DMSClassifier (hyper-parameters: {_short(hparams or {}) or 'none'}), "
                         "so the teacher network cannot be built from it. Load it with your own class and pass the "
                         "network: DistillationModule(teacher=YourModule.load_from_checkpoint(path), ...)")
    if backbone is None:
        raise ValueError(f"model.teacher_checkpoint={str(checkpoint)!r} holds a plain state_dict without "
                         "hyper-parameters: set model.teacher_backbone (and teacher_head / teacher_head_hidden if "
                         "they differ from 'dms' / 128) so the teacher can be built")
    network = build_backbone(backbone, num_classes or 2, in_channels or 1, head or "dms", head_hidden or 128)
    try:
        network.load_state_dict(load_state_dict_file(path))
    except RuntimeError as err:
        raise ValueError(f"model.teacher_checkpoint={str(checkpoint)!r} does not fit a {backbone!r} teacher with "
                         f"num_classes={num_classes}, in_channels={in_channels}, head={head or 'dms'!r}: {err}") \
            from err
    return TeacherSpec(network, num_classes, None, in_channels, backbone)


def _from_lightning_checkpoint(path: Path, hparams: dict, backbone: str | None, head: str | None,
                               head_hidden: int | None) -> TeacherSpec:
    from dms_lightning.models.classifier import DMSClassifier

    overrides = {"weights": None}
    for name, value in (("backbone", backbone), ("head", head), ("head_hidden", head_hidden)):
        if value is not None:
            overrides[name] = value
    try:
        # load_from_checkpoint (not just the state_dict) so a pruned / quantized teacher is rebuilt first.
        classifier = DMSClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        raise ValueError(f"model.teacher_checkpoint={str(path)!r} is not a loadable DMSClassifier checkpoint "
                         f"(hyper-parameters {_short(hparams)}; overrides {overrides}): {err}") from err
    # Class names are compared only when the teacher recorded real ones (not the class_<i> placeholders).
    names = hparams.get("class_names")
    return TeacherSpec(classifier.model, classifier.num_classes, list(names) if names else None,
                       classifier.in_channels, classifier.hparams.get("backbone"))


def _short(hparams: dict) -> dict:
    keys = ("_class_path", "backbone", "num_classes", "in_channels", "head", "head_hidden")
    return {k: hparams[k] for k in keys if k in hparams}
