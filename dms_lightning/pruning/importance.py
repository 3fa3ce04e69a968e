"""How important each channel is: the criteria that rank channels for structured pruning.

* ``l1`` / ``l2`` — the norm of every tensor slice of the channel's group (conv filters, BN, next
  layer's input columns), averaged over the group (Li et al. 2017, extended to DepGraph groups).
* ``bn_gamma`` — |γ| of the group's BatchNorm layers (network slimming, Liu et al. 2017); groups
  without BatchNorm (a Linear head, VGG, ConvNeXt) fall back to ``l1``.
* ``taylor`` — first-order Taylor estimate |w · ∂L/∂w| of the loss change when the channel is removed
  (Molchanov et al. 2019), from the gradients found in ``.grad`` (IterativePruning puts there the
  average over the steps since the previous pruning point); ``l1`` where none exist.

Scores are normalised by their mean within each group, so ``scope="global"`` compares layers fairly.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import Tensor

from dms_lightning.pruning.graph import ChannelGroup, UntraceableModelError

CRITERIA: tuple[str, ...] = ("l1", "l2", "bn_gamma", "taylor")


def _scorer(criterion: str) -> tp.importance.Importance:
    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="mean")
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")
    if criterion == "bn_gamma":
        return tp.importance.BNScaleImportance(group_reduction="mean", normalizer="mean")
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean")
    raise ValueError(f"importance={criterion!r} must be one of {list(CRITERIA)}")


def _has_gradients(group: ChannelGroup) -> bool:
    for dep, _ in group.group:
        weight = getattr(dep.target.module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.requires_grad and weight.grad is None:
            return False
    return True


@torch.no_grad()
def channel_scores(groups: list[ChannelGroup], criterion: str) -> dict[str, Tensor]:
    """One score per channel *position* of every group (grouped convolutions: averaged over groups).

    Raises:
        UntraceableModelError: Torch-Pruning cannot score a group (a layer layout its criteria do not know),
            naming the group.
    """
    scorer, fallback = _scorer(criterion), _scorer("l1")
    scores: dict[str, Tensor] = {}
    for group in groups:
        use = scorer if criterion != "taylor" or _has_gradients(group) else fallback
        try:
            score = use(group.group)
            if score is None:  # no tensor of the criterion's kind in this group (e.g. no BatchNorm)
                score = fallback(group.group)
        except Exception as err:  # noqa: BLE001 - Torch-Pruning's criteria fail in many ways on unknown layouts
            raise UntraceableModelError(
                f"cannot score channel group {group.name!r} by importance={criterion!r} ({type(err).__name__}: "
                f"{err}): Torch-Pruning does not know how its layers share channels. Add {group.name!r} to "
                "ignored_layers, or use method='unstructured' or 'n_m' for this model") from err
        if score is None:
            score = torch.zeros(group.channels)
        # A fully pruned group normalises to 0/0: its channels are all equally unimportant.
        score = torch.nan_to_num(score.detach().float().cpu(), nan=0.0, posinf=0.0)
        scores[group.name] = score.view(group.channel_groups, -1).mean(dim=0)
    return scores
