"""Pruning: sparsity schedules, importance criteria, masks, physical channel removal, IterativePruning.

Trainer-free API: :func:`remove_pruned_channels` (zeroed channels → a smaller network) and
:func:`prune_channels` (one-shot structured pruning). The callback is
:class:`dms_lightning.callbacks.IterativePruning`.
"""

from dms_lightning.pruning.architecture import ChannelRemoval, apply_architecture_record, architecture_record
from dms_lightning.pruning.functional import prune_channels
from dms_lightning.pruning.graph import UntraceableModelError
from dms_lightning.pruning.monitoring import SparsityReport, count_module_macs, sparsity_report
from dms_lightning.pruning.removal import RemovalReport, remove_pruned_channels
from dms_lightning.pruning.schedules import SCHEDULES, SparsitySchedule, agp_sparsity


def __getattr__(name: str):
    # The callback pulls in Lightning's trainer machinery; import it only when asked for.
    if name == "IterativePruning":
        from dms_lightning.pruning.callback import IterativePruning

        return IterativePruning
    raise AttributeError(f"module 'dms_lightning.pruning' has no attribute {name!r}")


__all__ = [
    "ChannelRemoval",
    "IterativePruning",
    "RemovalReport",
    "SCHEDULES",
    "SparsityReport",
    "SparsitySchedule",
    "UntraceableModelError",
    "agp_sparsity",
    "apply_architecture_record",
    "architecture_record",
    "count_module_macs",
    "prune_channels",
    "remove_pruned_channels",
    "sparsity_report",
]
