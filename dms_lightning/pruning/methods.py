"""The pruning methods of IterativePruning, one small strategy object each (chosen once, in ``__init__``).

A method decides which tensors it prunes, how a pruning point turns a sparsity into masks, which part of
its state goes into checkpoints, and whether it changes the architecture at the end of the schedule:

* :class:`UnstructuredPruning` — individual weights by L1 magnitude, per layer or global;
* :class:`SemiStructuredPruning` — N:M: at most ``nonzeros_per_group`` non-zeros in every
  ``group_size`` consecutive input channels;
* :class:`ChannelPruning` — whole channels of dependency groups, ranked by an importance criterion, and
  optionally removed physically at the end of the schedule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dms_lightning.pruning.graph import ChannelGroup, build_dependency_graph, prunable_groups
from dms_lightning.pruning.importance import CRITERIA, channel_scores
from dms_lightning.pruning.masks import Masks, channel_masks, magnitude_masks, n_m_masks, n_m_supported
from dms_lightning.pruning.selection import select_channels


def parse_pattern(pattern: str | Sequence[int]) -> tuple[int, int]:
    """``"2:4"`` (or ``(2, 4)``) as ``(nonzeros_per_group, group_size)``."""
    try:
        nonzeros, size = (int(v) for v in (pattern.split(":") if isinstance(pattern, str) else pattern))
    except (TypeError, ValueError):
        raise ValueError(f"pattern={pattern!r} must be 'N:M' such as '2:4' (or a pair (N, M))") from None
    if not 1 <= nonzeros < size:
        raise ValueError(f"pattern={pattern!r}: N={nonzeros} must be at least 1 and smaller than M={size} (e.g. '2:4')"
                         + ("; N > M would keep more weights than a group has" if nonzeros > size else ""))
    return nonzeros, size


def _broadcast_masks(trainer: Any, masks: Masks) -> Masks:
    # Rank 0 decides, every rank applies: identical masks even if magnitudes differ in the last bit.
    return trainer.strategy.broadcast({name: mask.cpu() for name, mask in masks.items()}, src=0)


class PruningMethod:
    """What one method does at each step of :class:`~dms_lightning.callbacks.IterativePruning`."""

    name: ClassVar[str]
    #: Importance criteria the method ranks by.
    importance_choices: ClassVar[tuple[str, ...]] = ("l1",)
    #: ``scope`` when the user gives none.
    default_scope: ClassVar[str] = "layer"
    #: Whether the method needs an example input before its first pruning point (to trace the network).
    needs_graph: ClassVar[bool] = False
    #: Whether the method physically changes the network at the end of its schedule.
    removes_channels: bool = False
    #: Whether it already did (the channels are gone; nothing is masked any more).
    is_removed: bool = False
    #: Whether checkpoints record the network's shapes (:class:`~dms_lightning.pruning.ChannelRemoval`).
    records_architecture: ClassVar[bool] = False
    #: The sparsity the method itself fixes (N:M), or ``None`` when ``target_sparsity`` chooses it.
    implied_sparsity: float | None = None

    def __init__(self, scope: str) -> None:
        self.scope = scope

    @classmethod
    def build(cls, *, scope: str, importance: str, min_channels: int, round_to: int, remove_channels: bool,
              pattern: str | Sequence[int]) -> PruningMethod:
        """The method from IterativePruning's arguments (each method takes the ones it uses)."""
        return cls(scope)

    def pruned_tensors(self, weights: Mapping[str, Tensor]) -> list[str]:
        """The weight tensors (by name) this method prunes, out of the eligible ``weights``."""
        return list(weights)

    def prepare(self, network: nn.Module, example_input: Tensor, ignored: Sequence[nn.Module]) -> None:
        """Per-run set-up on the network about to be trained (before any checkpoint state is applied)."""

    def masks_for_training(self, network: nn.Module, parameters: Mapping[str, Tensor], masks: Masks) -> Masks:
        """The masks to keep applying from the start of training, given the (restored) callback state."""
        unknown = sorted(set(masks) - set(parameters))
        if unknown:
            raise ValueError(f"the checkpoint's IterativePruning masks name parameters {unknown[:5]} that "
                             f"{type(network).__name__} does not have: was it saved from another network?")
        return masks

    def choose(self, trainer: Any, network: nn.Module, weights: Mapping[str, Tensor], sparsity: float,
               previous: Masks) -> Masks:
        """The masks of one pruning point at ``sparsity``; masks only grow (``previous`` stays pruned)."""
        raise NotImplementedError

    def accumulate_gradients(self, parameters: Mapping[str, Tensor]) -> None:
        """Called before every optimizer step (criteria that rank on gradients keep a running sum)."""

    def removed(self) -> None:
        """The network was made physically smaller: drop everything that referred to the old layers."""

    def log_entry(self) -> dict[str, float]:
        """Extra numbers of a pruning point for the history and the loggers."""
        return {}

    def state_dict(self, masks: Masks) -> dict[str, Any]:
        return {"pruned_channels": {}, "masks": {name: mask.detach().cpu() for name, mask in masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> Masks:
        """Take the method's part of a checkpoint; returns the masks to restore."""
        return dict(state.get("masks", {}))


class UnstructuredPruning(PruningMethod):
    """Individual weights by L1 magnitude (``scope="global"``: ranked across all pruned layers)."""

    name = "unstructured"
    default_scope = "global"

    def choose(self, trainer, network, weights, sparsity, previous):
        return _broadcast_masks(trainer, magnitude_masks(weights, sparsity, self.scope, previous=previous))


class SemiStructuredPruning(PruningMethod):
    """N:M sparsity: keep the ``nonzeros_per_group`` largest weights of every ``group_size`` input channels."""

    name = "n_m"

    def __init__(self, scope: str, nonzeros_per_group: int, group_size: int) -> None:
        super().__init__(scope)
        self.nonzeros_per_group, self.group_size = nonzeros_per_group, group_size
        self.implied_sparsity = 1.0 - nonzeros_per_group / group_size

    @classmethod
    def build(cls, *, scope, importance, min_channels, round_to, remove_channels, pattern):
        return cls(scope, *parse_pattern(pattern))

    def pruned_tensors(self, weights):
        return [name for name, weight in weights.items() if n_m_supported(weight, self.group_size)]

    def choose(self, trainer, network, weights, sparsity, previous):
        return _broadcast_masks(trainer, n_m_masks(weights, self.nonzeros_per_group, self.group_size,
                                                   previous=previous))


class ChannelPruning(PruningMethod):
    """Whole channels of every group of coupled layers; removed physically at the end when ``remove_channels``."""

    name = "channel"
    importance_choices = CRITERIA
    needs_graph = True
    records_architecture = True  # always, also before removal: such a checkpoint reloads into a pruned module

    def __init__(self, scope: str, importance: str, min_channels: int, round_to: int, remove_channels: bool) -> None:
        super().__init__(scope)
        self.importance, self.min_channels, self.round_to = importance, min_channels, round_to
        self.removes_channels = remove_channels
        self.pruned_channels: dict[str, list[int]] = {}  # resumable: group (root layer) name -> channel indices
        self.is_removed = False
        self.groups: list[ChannelGroup] = []
        self._graph = None
        self._parameters: Mapping[str, Tensor] = {}
        self._gradient_sums: dict[str, Tensor] = {}
        self._gradient_steps = 0

    @classmethod
    def build(cls, *, scope, importance, min_channels, round_to, remove_channels, pattern):
        return cls(scope, importance, min_channels, round_to, remove_channels)

    def pruned_tensors(self, weights):
        return [] if self.is_removed else list(weights)

    def prepare(self, network, example_input, ignored):
        if self.is_removed:
            return
        self._graph = build_dependency_graph(network, example_input)
        self.groups = prunable_groups(self._graph, ignored)
        if not self.groups:
            raise ValueError(f"IterativePruning found no prunable channel group in {type(network).__name__}; "
                             "check ignored_layers")
        channel_scores(self.groups, self.importance)  # a group Torch-Pruning cannot score fails now, not mid-run

    def masks_for_training(self, network, parameters, masks):
        self._parameters = parameters
        if self.is_removed:
            self.removed()
            return {}
        unknown = sorted(set(self.pruned_channels) - {g.name for g in self.groups})
        if unknown:
            raise ValueError(f"the checkpoint's IterativePruning state prunes channel groups {unknown[:5]} that "
                             f"are not prunable here: another network, or other ignored_layers?")
        return channel_masks(network, self.groups, self.pruned_channels)[0]

    def choose(self, trainer, network, weights, sparsity, previous):
        chosen = select_channels(self.groups, self._scores(), sparsity, self.scope, self.min_channels, self.round_to,
                                 previous=self.pruned_channels)
        # Rank 0 decides, every rank applies: identical masks even if scores differ in the last bit.
        self.pruned_channels = trainer.strategy.broadcast(chosen, src=0)
        masks, unsupported = channel_masks(network, self.groups, self.pruned_channels)
        if unsupported:
            rank_zero_warn(f"IterativePruning: layer types {sorted(unsupported)} cannot be masked; their channels "
                           "are still removed at the end")
        return masks

    def accumulate_gradients(self, parameters):
        # Taylor scores need gradients, but Lightning clears them before every validation run: keep a
        # running sum over the steps since the last pruning point (Molchanov et al. also average batches).
        if self.importance != "taylor" or self.is_removed or not self.groups:
            return
        with torch.no_grad():
            for name, param in parameters.items():
                if param.grad is not None:
                    if name in self._gradient_sums:
                        self._gradient_sums[name].add_(param.grad)
                    else:
                        self._gradient_sums[name] = param.grad.detach().clone()
        self._gradient_steps += 1

    def _scores(self) -> dict[str, Tensor]:
        if self.importance != "taylor" or not self._gradient_steps:
            return channel_scores(self.groups, self.importance)  # Taylor without gradients falls back to L1
        saved = {name: param.grad for name, param in self._parameters.items()}
        try:
            for name, param in self._parameters.items():
                total = self._gradient_sums.get(name)
                param.grad = total / self._gradient_steps if total is not None else None
            return channel_scores(self.groups, self.importance)
        finally:
            for name, param in self._parameters.items():
                param.grad = saved[name]
            self._gradient_sums, self._gradient_steps = {}, 0

    def removed(self) -> None:
        self.is_removed = True
        self._graph, self.groups, self._parameters = None, [], {}
        self._gradient_sums, self._gradient_steps = {}, 0

    def log_entry(self):
        channels = sum(g.channels for g in self.groups)
        return {"channel_sparsity": sum(len(v) for v in self.pruned_channels.values()) / max(1, channels)}

    def state_dict(self, masks):
        return {"pruned_channels": {k: list(v) for k, v in self.pruned_channels.items()}, "masks": {}}

    def load_state_dict(self, state):
        self.pruned_channels = {k: list(v) for k, v in state.get("pruned_channels", {}).items()}
        return {}
