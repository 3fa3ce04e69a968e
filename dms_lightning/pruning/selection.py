"""Which channels to prune: ranking scores under the user's constraints.

Given a score per channel position, a sparsity and a scope, choose the positions to prune so that

* each group keeps at least ``min_channels`` channels (and always one),
* each group keeps a multiple of ``round_to`` channels when it can (rounded up, so no group loses more
  than the target), because NPUs and vector units run aligned channel counts fastest (a 61-channel conv
  is no faster than a 64-channel one),
* grouped convolutions lose the same positions in every group,
* channels pruned earlier stay pruned (the masks only grow along the schedule).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from dms_lightning.pruning.graph import ChannelGroup


def _step(group: ChannelGroup, round_to: int) -> int:
    # Kept channels = kept positions × channel groups; align that product to round_to.
    return round_to // math.gcd(round_to, group.channel_groups)


def _min_keep(group: ChannelGroup, min_channels: int, step: int) -> int:
    keep = max(1, math.ceil(min_channels / group.channel_groups))
    keep = math.ceil(keep / step) * step
    return min(keep, group.positions)


def _aligned(keep: float, group: ChannelGroup, step: int, min_keep: int, already_pruned: int) -> int:
    positions = group.positions
    # Round the kept count *up*: no layer loses more than the target asks for (an NPU pads a 44-channel
    # layer to 48 anyway, so keeping 48 costs nothing there, while cutting to 40 would cost accuracy).
    rounded = max(step, math.ceil(keep / step - 1e-9) * step)
    rounded = min(max(rounded, min_keep), positions)
    # Monotone masks win over alignment: never revive a pruned channel.
    return min(rounded, positions - already_pruned)


def _lowest(scores: Tensor, count: int, forced: list[int]) -> list[int]:
    if count <= 0:
        return []
    ranked = scores.clone()
    if forced:
        ranked[torch.tensor(forced)] = -math.inf
    return sorted(torch.topk(ranked, count, largest=False).indices.tolist())


def select_channels(groups: list[ChannelGroup], scores: Mapping[str, Tensor], sparsity: float,
                    scope: str = "layer", min_channels: int = 1, round_to: int = 1,
                    previous: Mapping[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Channel indices to prune in each group (keyed by group name).

    ``scope="layer"`` prunes ``sparsity`` of every group; ``"global"`` prunes ``sparsity`` of all channel
    positions together, ranked by the (group-normalised) scores, so unimportant layers lose more.

    Example (a toy group with 8 channels)::

        select_channels([group], {"conv": torch.arange(8.0)}, 0.5)  # -> {"conv": [0, 1, 2, 3]}
    """
    previous = previous or {}
    positions_before = {g.name: g.positions_of(previous.get(g.name, [])) for g in groups}
    keep: dict[str, int] = {}
    if scope == "global":
        keep = _global_keep(groups, scores, sparsity, min_channels, round_to, positions_before)
    else:
        for group in groups:
            step = _step(group, round_to)
            keep[group.name] = _aligned(group.positions * (1.0 - sparsity), group, step,
                                        _min_keep(group, min_channels, step), len(positions_before[group.name]))
    chosen: dict[str, list[int]] = {}
    for group in groups:
        count = group.positions - keep[group.name]
        positions = _lowest(scores[group.name], count, positions_before[group.name])
        if positions:
            chosen[group.name] = group.expand(positions)
    return chosen


def _global_keep(groups, scores, sparsity, min_channels, round_to, positions_before) -> dict[str, int]:
    total = sum(g.positions for g in groups)
    budget = int(round(sparsity * total))
    entries = []
    for group in groups:
        ranked = scores[group.name].clone()
        if positions_before[group.name]:
            ranked[torch.tensor(positions_before[group.name])] = -math.inf
        entries.extend((float(value), group.name) for value in ranked.tolist())
    entries.sort(key=lambda e: e[0])
    steps = {g.name: _step(g, round_to) for g in groups}
    floors = {g.name: _min_keep(g, min_channels, steps[g.name]) for g in groups}
    keep = {g.name: g.positions for g in groups}
    for _, name in entries:
        if budget <= 0:
            break
        if keep[name] > floors[name]:
            keep[name] -= 1
            budget -= 1
    by_name = {g.name: g for g in groups}
    return {name: _aligned(k, by_name[name], steps[name], floors[name], len(positions_before[name]))
            for name, k in keep.items()}
