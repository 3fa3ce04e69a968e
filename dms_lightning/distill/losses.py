"""Distillation losses: logit KD (Hinton et al. 2015), FitNets hints (Romero et al. 2015), attention transfer,
and the input mixing of function matching (Beyer et al. 2022).

All three are plain functions / small modules that work on tensors, so they can be reused outside
:class:`~dms_lightning.distill.module.DistillationModule`. They compute in float32 whatever the input
dtype, because a KL divergence of bf16 softmaxes at temperature 4 loses most of its signal to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over the batch.

    The T² factor keeps the gradient magnitude of the soft targets independent of the temperature
    (Hinton et al. 2015, section 2), so ``alpha`` means the same thing at any ``temperature``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(kd_loss(logits, logits, temperature=4.0))
        0.0
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


MIXING_MODES = ("none", "mixup", "cutmix")


class MixedBatch(NamedTuple):
    """A batch whose image ``i`` was mixed with image ``partner[i]``; ``share`` of every image is its own."""

    images: torch.Tensor
    partner: torch.Tensor
    share: float

    def dominant_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The label of the image with the larger share (what a mixed image "is", for a training accuracy)."""
        return labels if self.share >= 0.5 else labels[self.partner]


def mix_batch(images: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> MixedBatch:
    """Mix every image of a batch with another one of the same batch, as function matching does.

    ``mixup`` blends whole images, ``share · x + (1 − share) · x[partner]`` (Zhang et al. 2018); ``cutmix`` pastes
    a rectangle of the partner covering ``1 − share`` of the image (Yun et al. 2019). ``share`` is drawn from
    U(0, 1) per batch, the aggressive setting of Beyer et al. 2022 ("Knowledge distillation: A good teacher is
    patient and consistent"): the teacher labels images *between* the training images, which a student can
    learn from nowhere else when there are only a few hundred of them.

    Example:
        >>> batch = mix_batch(torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)]), "mixup")
        >>> bool(torch.allclose(batch.images[0], torch.full((1, 4, 4), 1 - batch.share)))
        True
    """
    if mode not in MIXING_MODES[1:]:
        raise ValueError(f"mixing={mode!r} must be one of {MIXING_MODES[1:]}")
    partner = torch.randperm(images.shape[0], generator=generator).to(images.device)
    share = float(torch.rand((), generator=generator))
    other = images[partner]
    if mode == "mixup":
        return MixedBatch(share * images + (1.0 - share) * other, partner, share)
    height, width = images.shape[-2:]
    cut_h, cut_w = int(height * (1.0 - share) ** 0.5), int(width * (1.0 - share) ** 0.5)
    top = int(torch.randint(0, height - cut_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - cut_w + 1, (), generator=generator))
    mixed = images.clone()
    mixed[..., top:top + cut_h, left:left + cut_w] = other[..., top:top + cut_h, left:left + cut_w]
    return MixedBatch(mixed, partner, 1.0 - cut_h * cut_w / (height * width))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 4.0, alpha: float = 0.7,
                      label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                      mixed: MixedBatch | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kd)`` with ``loss = (1 − alpha)·CE(student, labels) + alpha·kd_loss(student, teacher, T)``.

    ``class_weights`` (one per class) weigh the cross-entropy term against class imbalance; the teacher's
    soft targets already carry every class. For a ``mixed`` batch the cross-entropy is that of mixup, each
    image's label weighed by its share (the teacher term needs nothing: it saw the same mixed images).
    """
    logits = student_logits.float()
    ce = F.cross_entropy(logits, labels, weight=class_weights, label_smoothing=label_smoothing)
    if mixed is not None:
        ce = mixed.share * ce + (1.0 - mixed.share) * F.cross_entropy(
            logits, labels[mixed.partner], weight=class_weights, label_smoothing=label_smoothing)
    kd = kd_loss(student_logits, teacher_logits, temperature)
    return (1.0 - alpha) * ce + alpha * kd, ce, kd


def _match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger feature map to the smaller one's size (strides of two networks rarely agree)."""
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    if tuple(student.shape[-2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if tuple(teacher.shape[-2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


class HintAdapter(nn.Module):
    """FitNets regressor: a learned 1×1 conv (+ BatchNorm) mapping student channels to teacher channels.

    The adapter is trained with the student and thrown away afterwards: it lives beside the student,
    never inside it, so export, pruning and quantization do not see it.

    Example:
        >>> adapter = HintAdapter(student_channels=48, teacher_channels=256)
        >>> loss = adapter.loss(torch.randn(2, 48, 6, 6), torch.randn(2, 256, 6, 6))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.project = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(teacher_channels)

    def forward(self, student_features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.project(student_features))

    def loss(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """Mean squared error between the adapted student features and the teacher's."""
        if student_features.shape[1] != self.student_channels:
            raise RuntimeError(f"the hinted student layer now has {student_features.shape[1]} channels but its adapter "
                               f"was built for {self.student_channels} (was the layer pruned?): hint a layer whose "
                               "output channels pruning keeps, e.g. a block output on a residual path")
        student_features, teacher_features = _match_spatial(self(student_features), teacher_features)
        return F.mse_loss(student_features.float(), teacher_features.detach().float())


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention of ``N × C × H × W`` features: mean over channels of squares, L2-normalised per sample."""
    return F.normalize(features.float().pow(2).mean(dim=1).flatten(1), dim=1)


def teacher_attention_at(teacher_features: torch.Tensor, student_size: tuple[int, int]) -> torch.Tensor:
    """The teacher's normalised attention maps (``N × h × w``) at the size the student's are compared at.

    ``student_size`` is the student layer's ``(H, W)``; the larger of the two maps is average-pooled to the
    smaller one's size, as in :func:`attention_transfer_loss`.
    """
    size = (min(student_size[0], teacher_features.shape[-2]), min(student_size[1], teacher_features.shape[-1]))
    if tuple(teacher_features.shape[-2:]) != size:
        teacher_features = F.adaptive_avg_pool2d(teacher_features, size)
    return attention_map(teacher_features.detach()).view(len(teacher_features), *size)


def attention_transfer_loss_to(student_features: torch.Tensor, teacher_attention: torch.Tensor) -> torch.Tensor:
    """Attention transfer against given teacher maps (:func:`teacher_attention_at`, e.g. cached ones)."""
    size = tuple(teacher_attention.shape[-2:])
    if tuple(student_features.shape[-2:]) != size:
        student_features = F.adaptive_avg_pool2d(student_features, size)
    return (attention_map(student_features) - teacher_attention.flatten(1)).pow(2).mean()


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017): mean squared difference of normalised attention maps.

    Channel counts may differ; spatial sizes are matched by average pooling.

    Example:
        >>> x = torch.randn(2, 16, 8, 8)
        >>> float(attention_transfer_loss(x, x))
        0.0
    """
    teacher = teacher_attention_at(teacher_features, tuple(student_features.shape[-2:]))
    return attention_transfer_loss_to(student_features, teacher)
