"""Checkpoints of networks whose architecture changed during ``fit``: recorded, then re-applied explicitly.

A checkpoint of a physically pruned or fake-quantized network cannot be loaded into the freshly built
original architecture. Each callback that changes the architecture therefore

1. records what it did in ``on_save_checkpoint`` with :func:`record_architecture_change`, under
   ``checkpoint["dms_lightning"][change.record_key]``, naming the :class:`ArchitectureChange` subclass that
   re-applies it;
2. calls :func:`install_architecture_restore` from its ``setup``. For ``fit`` / ``validate`` / ``test`` /
   ``predict`` with ``ckpt_path=``, Lightning runs the *module's* ``on_load_checkpoint`` before it loads the
   weights, but callbacks' ``on_load_checkpoint`` only *after* (``trainer/connectors/checkpoint_connector.py``:
   ``restore_model`` before ``restore_callbacks``), and the checkpoint path is not known to callbacks before
   then. So the module instance gets an ``on_load_checkpoint`` that first calls :func:`restore_architecture`,
   then the class's own hook: any LightningModule, ours or a user's, is rebuilt before its weights load.

:func:`restore_architecture` re-applies the records in one stated order, lowest
:attr:`ArchitectureChange.order` first: :data:`CHANNEL_REMOVAL` (the float network is resized), then
:data:`QUANTIZER_WRAPPING` (the resized network is wrapped). Every change is idempotent: applied to a
module that already has the recorded architecture it does nothing, so running it twice is harmless.

Without a Trainer, ``load_from_checkpoint`` calls only the module's ``on_load_checkpoint``; our modules
call :func:`restore_architecture` there, and a user module does so in one line::

    def on_load_checkpoint(self, checkpoint):
        restore_architecture(self, checkpoint)

This module imports no compression stage: a record names the class that re-applies it
(``"restored_by": "dms_lightning.pruning.architecture.ChannelRemoval"``), resolved only inside
``dms_lightning`` and only to an :class:`ArchitectureChange` subclass.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dms_lightning.utils.compression import compression_target  # noqa: F401 - also importable from here

CHECKPOINT_KEY = "dms_lightning"

#: Order of :class:`ArchitectureChange` re-application: channels are removed from the float network first,
#: then the (smaller) network is wrapped with quantizers, as during ``fit``.
CHANNEL_REMOVAL = 10
QUANTIZER_WRAPPING = 20


class ArchitectureChange:
    """One kind of architecture change a callback makes during ``fit``, and how to re-apply it to a fresh module.

    Subclasses set :attr:`record_key` (where the record lives in ``checkpoint["dms_lightning"]``) and
    :attr:`order` (:data:`CHANNEL_REMOVAL`, :data:`QUANTIZER_WRAPPING`), and implement :meth:`restore`. A
    callback that makes the change names it in its ``architecture_change`` class attribute.
    """

    record_key: ClassVar[str]
    order: ClassVar[int]

    @classmethod
    def restore(cls, pl_module: nn.Module, record: Mapping[str, Any]) -> None:
        """Give ``pl_module`` the recorded architecture (nothing to do if it already has it)."""
        raise NotImplementedError


def record_architecture_change(checkpoint: dict, change: type[ArchitectureChange], record: Mapping[str, Any]) -> None:
    """Store ``record`` for ``change`` in ``checkpoint`` (from a callback's ``on_save_checkpoint``)."""
    checkpoint_records(checkpoint)[change.record_key] = {
        **record, "restored_by": f"{change.__module__}.{change.__qualname__}"}


def _change_class(name: Any, key: str) -> type[ArchitectureChange]:
    module_name, _, attr = str(name).rpartition(".")
    if not module_name.startswith("dms_lightning."):
        raise CheckpointError(f"checkpoint record {key!r} names restored_by={name!r}, which is not a dms_lightning "
                              "architecture change; it was not imported")
    try:
        change = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"checkpoint record {key!r} names restored_by={name!r}, which this version of "
                              f"dms_lightning does not have ({err})") from err
    if not (isinstance(change, type) and issubclass(change, ArchitectureChange)):
        raise CheckpointError(f"checkpoint record {key!r}: restored_by={name!r} is not an ArchitectureChange")
    return change


def restore_architecture(pl_module: nn.Module, checkpoint: Mapping[str, Any]) -> list[str]:
    """Re-apply every recorded architecture change of ``checkpoint`` to ``pl_module``, in the stated order.

    Returns the record keys applied (in order). Records without ``restored_by`` are left alone.

    Example (in a user's LightningModule, for ``load_from_checkpoint``)::

        def on_load_checkpoint(self, checkpoint):
            restore_architecture(self, checkpoint)
    """
    records = checkpoint.get(CHECKPOINT_KEY) or {}
    changes = sorted(((_change_class(record["restored_by"], key), key, record) for key, record in records.items()
                      if isinstance(record, Mapping) and "restored_by" in record), key=lambda c: c[0].order)
    for change, _, record in changes:
        change.restore(pl_module, record)
    return [key for _, key, _ in changes]


class RestoreArchitectureFirst:
    """A module's ``on_load_checkpoint``: re-apply the recorded architecture, then run the class's own hook.

    Installed on the module instance by :func:`install_architecture_restore`. A small object rather than a
    bound function, so the module still pickles and deep-copies.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, checkpoint: dict) -> None:
        restore_architecture(self.module, checkpoint)
        type(self.module).on_load_checkpoint(self.module, checkpoint)


def install_architecture_restore(pl_module: nn.Module) -> None:
    """Make every ``ckpt_path=`` load of this run rebuild the recorded architecture before the weights load.

    Called from the ``setup`` of every callback that changes the architecture. Lightning calls the module's
    ``on_load_checkpoint`` before loading its weights but callbacks' hooks only after, so the module
    instance gets an ``on_load_checkpoint`` that calls :func:`restore_architecture` first, then the class's
    own hook (which, in our modules, calls it again and finds nothing left to do). Installing twice is a no-op.
    """
    if not isinstance(pl_module.__dict__.get("on_load_checkpoint"), RestoreArchitectureFirst):
        pl_module.on_load_checkpoint = RestoreArchitectureFirst(pl_module)


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
        fix = "Re-save it as a state_dict."
        if "functools.partial" in str(err):
            fix = ("It is probably a Lightning checkpoint whose hyper_parameters hold an optimizer or scheduler given "
                   "as functools.partial (this package's modules now record those as {class_path, init_args}). If "
                   "you trust the file: ckpt = torch.load(path, weights_only=False); delete "
                   "ckpt['hyper_parameters']['optimizer'] (and 'lr_scheduler'); torch.save(ckpt, path).")
        raise CheckpointError(
            f"{field}={str(path)!r} holds Python objects other than tensors and plain containers; it was not "
            f"loaded, because unpickling them can run arbitrary code. {fix} ({err})") from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{field}={str(path)!r} is not a readable torch checkpoint (truncated or "
                              f"corrupted?): {err}") from err


def checkpoint_records(checkpoint: dict) -> dict:
    """The mutable ``checkpoint["dms_lightning"]`` dict, created if missing."""
    return checkpoint.setdefault(CHECKPOINT_KEY, {})
