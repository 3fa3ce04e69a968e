"""Checkpoints of models whose architecture changed during ``fit`` (pruned channels, fake-quant wrappers).

A checkpoint of a physically pruned or quantization-wrapped network cannot be loaded into the freshly
built original architecture. Each compression stage therefore records what it did under
``checkpoint["dms_lightning"][key]`` and registers a *restorer* that re-applies it to a fresh model
before the weights are loaded. Our LightningModules call :func:`restore_architecture` from
``on_load_checkpoint`` (which Lightning runs before ``load_state_dict`` both for ``ckpt_path=`` and for
``load_from_checkpoint``); a user module can do the same in one line.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_KEY = "dms_lightning"

# (order, key, restorer). Lower order runs first: channel removal must precede quantizer wrapping.
_RESTORERS: list[tuple[int, str, Callable[[nn.Module, dict], None]]] = []


def register_architecture_restorer(key: str, restorer: Callable[[nn.Module, dict], None], order: int) -> None:
    """Register ``restorer(lightning_module, state)`` for ``checkpoint["dms_lightning"][key]``."""
    _RESTORERS[:] = [r for r in _RESTORERS if r[1] != key]
    _RESTORERS.append((order, key, restorer))
    _RESTORERS.sort(key=lambda r: r[0])


def restore_architecture(module: nn.Module, checkpoint: dict) -> None:
    """Re-apply every recorded architecture change of ``checkpoint`` to ``module`` (a LightningModule).

    Example (in a user's LightningModule)::

        def on_load_checkpoint(self, checkpoint):
            restore_architecture(self, checkpoint)
    """
    # Importing the stages registers their restorers.
    import dms_lightning.pruning  # noqa: F401
    import dms_lightning.quant  # noqa: F401

    records = checkpoint.get(CHECKPOINT_KEY, {})
    for _, key, restorer in _RESTORERS:
        if key in records and not getattr(module, f"_dms_restored_{key}", False):
            restorer(module, records[key])


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely: corrupted, truncated, or carrying Python objects."""


def load_checkpoint(path: str | Path, field: str = "checkpoint", hint: str = "") -> object:
    """Read a checkpoint or ``state_dict`` file with ``weights_only=True``: the one loader of the package.

    ``torch.load(weights_only=True)`` unpickles only tensors and plain containers, so a file carrying a
    pickle payload (a class whose ``__reduce__`` runs code) is refused instead of executed. Lightning
    checkpoints of our modules and of plain user modules need nothing more.

    Raises:
        FileNotFoundError: ``path`` is not a file (the message names ``field`` and adds ``hint``).
        CheckpointError: the file is truncated / not a torch file, or holds objects other than tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r} does not exist{'. ' + hint if hint else ''}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{field}={str(path)!r} holds Python objects other than tensors and plain containers; it was not "
            f"loaded, because unpickling them can run arbitrary code. Re-save it as a state_dict. ({err})") from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{field}={str(path)!r} is not a readable torch checkpoint (truncated or "
                              f"corrupted?): {err}") from err


def checkpoint_records(checkpoint: dict) -> dict:
    """The mutable ``checkpoint["dms_lightning"]`` dict, created if missing."""
    return checkpoint.setdefault(CHECKPOINT_KEY, {})


def compression_target(pl_module: nn.Module) -> nn.Module:
    """The network that pruning, quantization and export act on.

    Our modules expose it as ``pl_module.model`` (for :class:`DistillationModule`: the student); a user
    LightningModule can define a ``compression_target`` attribute or property, else the whole module is used.
    """
    target = getattr(pl_module, "compression_target", None)
    if isinstance(target, nn.Module):
        return target
    return pl_module
