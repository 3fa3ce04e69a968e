"""Optimizer and scheduler factories that a checkpoint can carry as plain data.

A module's hyperparameters go into every Lightning checkpoint, and checkpoints are read with
``torch.load(weights_only=True)`` (here and in Lightning's ``load_from_checkpoint``), which unpickles tensors
and plain containers only. ``optimizer=functools.partial(torch.optim.SGD, lr=0.05)``, the usual way to
hand a module an optimizer from Python, would pickle as a call of ``functools.partial`` and make the
module's own checkpoints unreadable to ``load_from_checkpoint``, to ``ONNXExport(checkpoint="best")`` and to
``DistillationModule(teacher_checkpoint=...)``. So a factory is stored as LightningCLI writes it,
``{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}``, and that form is accepted back.

A class_path read back is resolved only to a subclass of the expected base (a torch optimizer or
learning-rate scheduler): a checkpoint cannot name an arbitrary callable to be run at ``configure_optimizers``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping

import torch

__all__ = ["OPTIMIZER_BASES", "SCHEDULER_BASES", "factory_config", "resolve_factory"]

OPTIMIZER_BASES: tuple[type, ...] = (torch.optim.Optimizer,)
SCHEDULER_BASES: tuple[type, ...] = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

_PLAIN_SCALARS = (bool, int, float, str, type(None))


def _plain(value: object) -> bool:
    if isinstance(value, _PLAIN_SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _class_path(cls: type) -> str | None:
    """``module.QualName`` of a class that can be imported back under that name, else ``None``."""
    module, name = getattr(cls, "__module__", None), getattr(cls, "__qualname__", "")
    if not module or "<" in name:
        return None
    try:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}.{name}" if found is cls else None


def factory_config(factory: object) -> dict | None:
    """``{"class_path", "init_args"}`` for a class or a ``functools.partial`` of a class with plain keyword
    arguments; a mapping that already has a ``class_path`` is returned as is; ``None`` for anything else
    (a lambda, a function, positional arguments, a keyword argument that is not plain data)."""
    if isinstance(factory, Mapping):
        return dict(factory) if "class_path" in factory else None
    init_args: dict = {}
    while isinstance(factory, functools.partial):
        if factory.args:
            return None
        init_args = {**factory.keywords, **init_args}
        factory = factory.func
    if not isinstance(factory, type) or not _plain(init_args):
        return None
    path = _class_path(factory)
    return None if path is None else {"class_path": path, "init_args": init_args}


def resolve_factory(factory: object, field: str, bases: tuple[type, ...]) -> Callable | None:
    """A callable factory from what a module was given: ``None``, a callable, or a ``{class_path, init_args}``
    mapping (the form :func:`factory_config` stores), whose class must subclass one of ``bases``.

    Raises:
        ValueError: a mapping without a resolvable class_path, a class outside ``bases``, or a value that is
            neither (the message names ``field``).
    """
    if factory is None or (callable(factory) and not isinstance(factory, Mapping)):
        return factory
    if not isinstance(factory, Mapping) or not isinstance(factory.get("class_path"), str):
        raise ValueError(f"{field}={factory!r} must be a callable (e.g. functools.partial(torch.optim.SGD, lr=0.05)) "
                         "or {'class_path': ..., 'init_args': {...}}")
    path = factory["class_path"]
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError, ValueError):
        cls = None
    names = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
    if not isinstance(cls, type) or not issubclass(cls, bases):
        raise ValueError(f"{field}.class_path={path!r} is not an importable subclass of {names}")
    init_args = factory.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ValueError(f"{field}.init_args={init_args!r} must be a mapping of keyword arguments")
    return functools.partial(cls, **init_args)
