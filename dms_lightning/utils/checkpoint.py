"""Checkpoints of models whose architecture changed during ``fit`` (pruned channels, fake-quant wrappers).

A checkpoint of a physically pruned or quantization-wrapped network cannot be loaded into the freshly
built original architecture. Each compression stage therefore records what it did under
``checkpoint["dms_lightning"][key]`` and registers a *restorer* that re-applies it to a fresh model
before the weights are loaded. Our LightningModules call :func:`restore_architecture` from
``on_load_checkpoint`` (which Lightning runs before ``load_state_dict`` both for ``ckpt_path=`` and for
``load_from_checkpoint``); a user module can do the same in one line.
"""

from __future__ import annotations

from collections.abc import Callable

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
