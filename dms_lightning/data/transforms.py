"""Pre-processing and augmentations for near-infrared cabin cameras.

NIR frames are single-channel and their appearance changes with the active illuminator, exposure and
distance, not with colour, so the train augmentations are geometric (small crops, shifts, rotations,
mirror: the DMS classes are left/right symmetric), photometric in gain/contrast/gamma only, plus defocus
blur and sensor noise. Evaluation is only a conversion to float and normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2 as T


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """uint8 ``C×H×W`` → normalised float32."""
    return T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))])


def pixel_values(mean: Sequence[float], std: Sequence[float], bit_depth: int = 8) -> torch.Tensor:
    """Every value :func:`eval_transform` can give a pixel of a ``bit_depth`` frame (all channels, sorted).

    The network input is this discrete set, not a continuum: quantizers of the input use it to keep every
    pixel off a rounding tie (:attr:`dms_lightning.quant.fake_quant.FakeQuantizer.exact_values`).
    """
    levels = torch.arange(2 ** bit_depth, dtype=torch.float32) / (2 ** bit_depth - 1)  # float32, as ToDtype does
    values = torch.cat([(levels - m) / s for m, s in zip(mean, std)])
    return torch.unique(values)


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Augmentations suited to IR driver-facing cameras, then :func:`eval_transform`."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.RandomAffine(degrees=8, translate=(0.05, 0.05))], p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.3, contrast=0.3)], p=0.6),
        T.RandomApply([T.GaussianBlur(kernel_size=3, sigma=(0.1, 1.0))], p=0.2),
        T.ToDtype(torch.float32, scale=True),
        T.RandomApply([T.GaussianNoise(sigma=0.02, clip=True)], p=0.3),
        T.Normalize(list(mean), list(std)),
    ])


def denormalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo :func:`eval_transform` (to float in [0, 1]) for display."""
    mean_t = torch.as_tensor(mean, dtype=batch.dtype, device=batch.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=batch.dtype, device=batch.device).view(-1, 1, 1)
    return (batch * std_t + mean_t).clamp(0, 1)
