"""The process's random number generators, kept in a checkpoint so that a resumed ``fit`` draws what the
uninterrupted run would have drawn.

Lightning restores weights, optimizers, schedulers, loops and callbacks from a checkpoint, but not the global
generators: a run resumed at epoch ``k`` would shuffle its training set, draw dropout masks, augment and mix images
as the uninterrupted run did at epoch 0, and end elsewhere. :class:`~dms_lightning.ClassificationModule` (and
:class:`~dms_lightning.DMSDataModule`, for a module of the user's own) therefore record :func:`rng_states` when a
checkpoint is written and :func:`restore_rng_states` when ``fit`` resumes from it (never when a model is only loaded
for evaluation or export).

The states are plain tensors and numbers, so ``torch.load(weights_only=True)`` reads them. A DDP checkpoint is
written by rank 0; every rank resumes with its states, as every rank starts from the same ``seed_everything``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

#: Where the states live in a checkpoint, under ``checkpoint["dms_lightning"]``.
RNG_RECORD = "rng_states"


def rng_states() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global generator, torch's CPU generator and, once CUDA is in use,
    every CUDA device's generator."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the generators to ``states`` (from :func:`rng_states`); a generator the mapping lacks is left alone."""
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        saved = states["numpy"]
        np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                             saved["has_gauss"], saved["cached_gaussian"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def resuming_fit(trainer: Any) -> bool:
    """Whether ``trainer`` (or ``None``) is restoring a checkpoint to go on fitting."""
    from lightning.pytorch.trainer.states import TrainerFn

    return trainer is not None and trainer.state.fn == TrainerFn.FITTING
