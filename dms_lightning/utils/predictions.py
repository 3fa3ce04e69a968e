"""Logits of a PyTorch model over inputs or a dataloader, and the two figures compared everywhere.

The torch half of every comparison (quantization's own accuracy report, export parity checks): it lives
here, below ``quant`` and ``export``, so both use the same loop. ONNX Runtime's half is
:mod:`dms_lightning.export.runtimes`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from dms_lightning.utils.compression import as_network_input


def split_dataloaders(trainer, split: str):
    """The ``split`` (``"train"``, ``"val"``, ``"test"``) dataloader(s) of a run, or ``None``: the Trainer's own
    validation loaders first, then the data module's ``<split>_dataloader()``, then the Trainer's train loader."""
    loaders = trainer.val_dataloaders if split == "val" else None
    if loaders is None:
        datamodule = getattr(trainer, "datamodule", None)
        method = getattr(datamodule, f"{split}_dataloader", None)
        if method is not None:
            loaders = method()
    if loaders is None and split == "train":
        loaders = trainer.train_dataloader
    return loaders


#: Keys of a dict batch that hold the images / the class labels, tried in this order.
IMAGE_KEYS = ("image", "images", "input", "inputs", "pixel_values", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def batch_images(batch) -> torch.Tensor:
    """The image tensor of a batch: a tensor or numpy array, ``(images, labels, ...)`` or a dict with a key of
    :data:`IMAGE_KEYS` (a numpy array comes back as a tensor sharing its memory)."""
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    elif isinstance(batch, dict):
        batch = next((batch[key] for key in IMAGE_KEYS if isinstance(batch.get(key), (torch.Tensor, np.ndarray))),
                     batch)
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch)
    if isinstance(batch, torch.Tensor):
        return batch
    raise TypeError(f"cannot find the images in a batch of type {type(batch).__name__}"
                    f"{' with keys ' + str(list(batch)) if isinstance(batch, dict) else ''}: expected a tensor, "
                    f"(images, labels, ...) or a dict with one of the keys {list(IMAGE_KEYS)}")


@contextlib.contextmanager
def eval_mode(network: nn.Module):
    """``network`` in eval mode inside the block; afterwards every sub-module is back in its own mode (a frozen
    sub-network stays in eval mode, which ``network.train(was_training)`` would undo)."""
    modes = {module: module.training for module in network.modules()}
    network.eval()
    try:
        yield network
    finally:
        for module, training in modes.items():
            module.training = training


def batch_labels(batch) -> torch.Tensor | None:
    """The class labels of a batch: the second item of ``(images, labels, ...)`` or a dict's key of
    :data:`LABEL_KEYS`; ``None`` when the batch has none (images only, or ``(images, file names)``, or one-hot
    targets: only one integer class index per image counts as labels)."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        value = batch[1]
    elif isinstance(batch, dict):
        value = next((batch[key] for key in LABEL_KEYS if batch.get(key) is not None), None)
    else:
        return None
    try:
        labels = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return None
    return labels


def require_labels(batch, owner: str) -> torch.Tensor:
    """:func:`batch_labels`, or an error naming ``owner`` (which measures accuracy and needs them)."""
    labels = batch_labels(batch)
    if labels is None:
        raise ValueError(f"{owner} needs labelled batches: (images, labels, ...) or a dict with one of the keys "
                         f"{list(LABEL_KEYS)}; got {type(batch).__name__}"
                         f"{' with keys ' + str(list(batch)) if isinstance(batch, dict) else ''}")
    return labels


def torch_outputs(model: nn.Module, inputs: torch.Tensor | np.ndarray) -> np.ndarray:
    """Logits of ``model`` in eval mode for CPU-side ``inputs`` (on the model's device; its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch = as_network_input(torch.as_tensor(np.asarray(inputs), dtype=torch.float32), model)
            return model(batch).float().cpu().numpy()
    finally:
        model.train(was_training)


def torch_logits(model: nn.Module, batches: Iterable, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of ``model`` in eval mode over ``(images, labels, ...)`` batches (first ``limit``)."""
    logits, labels = [], []
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            break
        logits.append(torch_outputs(model, batch_images(batch).cpu()))
        labels.append(require_labels(batch, "torch_logits").cpu().numpy())
    return np.concatenate(logits), np.concatenate(labels)


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of samples on which two sets of logits predict the same class (1.0 for no samples)."""
    if not len(reference):
        return 1.0
    return float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())
