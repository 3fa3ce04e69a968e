"""Sparsity schedules and channel selection: the numbers the callback acts on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dms_lightning.pruning import SparsitySchedule
from dms_lightning.pruning.graph import build_dependency_graph, prunable_groups
from dms_lightning.pruning.masks import magnitude_masks, n_m_masks
from dms_lightning.pruning.selection import select_channels


def test_agp_follows_zhu_and_gupta_cubic_formula():
    schedule = SparsitySchedule("agp", target=0.8, start=2, end=10, frequency=2, initial_sparsity=0.1)
    assert schedule.points == (2, 4, 6, 8, 10)
    for index, epoch in enumerate(schedule.points):
        progress = (epoch - 2) / 8
        expected = 0.8 + (0.1 - 0.8) * (1 - progress) ** 3
        assert schedule.sparsity_at_point(index) == pytest.approx(expected)


def test_linear_constant_and_one_shot_schedules():
    linear = SparsitySchedule("linear", target=0.6, start=0, end=3)
    assert [linear.sparsity_at_point(i) for i in range(4)] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    constant = SparsitySchedule("constant", target=0.6, start=1, end=5, frequency=3)
    assert constant.points == (1, 4, 5) and {constant.sparsity_at_point(i) for i in range(3)} == {0.6}
    assert SparsitySchedule("one_shot", target=0.6, start=4, end=9).points == (4,)


def test_callable_schedule_returning_invalid_sparsity_names_the_value():
    schedule = SparsitySchedule(lambda progress: 1.2 * progress, target=0.5, start=0, end=2)
    assert schedule.sparsity_at_point(1) == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"returned 1\.2 at progress 1\.000"):
        schedule.sparsity_at_point(2)


def test_masks_only_grow_along_the_schedule():
    weights = {"w": torch.randn(64, 32)}
    first = magnitude_masks(weights, 0.3)
    weights["w"] = weights["w"] * first["w"] + 0.01 * torch.randn(64, 32)  # pruned weights drifted a little
    second = magnitude_masks(weights, 0.5, previous=first)
    assert not (second["w"] & ~first["w"]).any()
    assert float((~second["w"]).float().mean()) == pytest.approx(0.5, abs=1 / 2048)


def test_n_m_groups_run_along_input_channels():
    weight = torch.randn(8, 16, 3, 3)
    mask = n_m_masks({"conv.weight": weight}, 1, 4)["conv.weight"]
    per_group = mask.movedim(1, -1).reshape(8, 3, 3, 4, 4).sum(-1)
    assert torch.equal(per_group, torch.ones_like(per_group))


def _grouped_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 3))


def test_selection_rounds_kept_channels_and_respects_minimum_and_conv_groups():
    net = _grouped_net()
    graph = build_dependency_graph(net, torch.zeros(1, 3, 8, 8))
    groups = {g.name: g for g in prunable_groups(graph)}
    scores = {name: torch.rand(g.positions) for name, g in groups.items()}
    chosen = select_channels(list(groups.values()), scores, 0.3, round_to=8, min_channels=16)
    kept = {name: g.channels - len(chosen.get(name, [])) for name, g in groups.items()}
    assert kept["0"] == 48 and kept["3"] == 48  # 64 * 0.7 = 44.8 -> up to a multiple of 8
    assert kept["6"] == 24  # 24 * 0.7 = 16.8 -> up to 24: never more pruning than the target asks
    chosen = select_channels(list(groups.values()), scores, 0.6, round_to=8, min_channels=16)
    assert groups["6"].channels - len(chosen["6"]) == 16  # 24 * 0.4 = 9.6 -> 16, the minimum
    # The grouped conv (4 groups of 16) loses the same positions in every group.
    positions = {i % 16 for i in chosen["3"]}
    assert len(chosen["3"]) == 4 * len(positions)
