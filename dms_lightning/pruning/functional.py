"""One-shot channel pruning without a Trainer: score, choose, mask and remove in one call."""

from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401 - the docstring example runs in this namespace
from torch import Tensor, nn

from dms_lightning.pruning.graph import (
    build_dependency_graph,
    execution_order,
    modules_under,
    prunable_groups,
    resolve_module_names,
)
from dms_lightning.pruning.importance import CRITERIA, channel_scores
from dms_lightning.pruning.masks import apply_masks, channel_masks
from dms_lightning.pruning.removal import RemovalReport, remove_pruned_channels
from dms_lightning.pruning.selection import select_channels
from dms_lightning.utils.compression import named_float_parameters
from dms_lightning.utils.validation import check_choice, check_fraction


def default_ignored_layers(model: nn.Module, example_input: Tensor, keep_first_conv: bool = True,
                           keep_classifier: bool = True) -> list[str]:
    """The first convolution (it sees the raw image) and the last layer run (the classifier)."""
    order = execution_order(model, example_input)
    ignored = []
    if order and keep_first_conv:
        ignored.append(order[0])
    if order and keep_classifier:
        ignored.append(order[-1])
    return ignored


def prune_channels(
    model: nn.Module,
    example_input: Tensor,
    sparsity: float,
    *,
    importance: str = "l1",
    scope: str = "layer",
    ignored_layers: Sequence[str] | None = None,
    min_channels: int = 1,
    round_to: int = 1,
    remove: bool = True,
) -> tuple[dict[str, list[int]], RemovalReport | None]:
    """Prune ``sparsity`` of the channels of ``model`` in one shot (in place).

    Channels are ranked by ``importance`` inside each dependency group (``scope="layer"``) or across the
    network (``"global"``), masked to zero, and — with ``remove=True`` — physically removed.

    Args:
        model: the network.
        example_input: an input batch for tracing.
        sparsity: fraction of channels to prune, in ``[0, 1)``.
        importance: ``"l1"``, ``"l2"``, ``"bn_gamma"`` or ``"taylor"`` (needs gradients in ``.grad``).
        scope: ``"layer"`` or ``"global"``.
        ignored_layers: module names to leave alone; default: the first conv and the classifier.
        min_channels: channels every group keeps at least.
        round_to: keep a multiple of this many channels per group (e.g. 8 for NPUs).
        remove: remove the masked channels physically.

    Returns:
        The pruned channel indices per group, and the removal report (``None`` when ``remove=False``).

    Example:
        >>> import torchvision
        >>> net = torchvision.models.mobilenet_v3_small(num_classes=5)
        >>> _, report = prune_channels(net, torch.zeros(1, 3, 64, 64), 0.5)
        >>> report.params_after < 0.6 * report.params_before
        True
    """
    check_fraction("sparsity", sparsity, high_inclusive=False)
    check_choice("importance", importance, CRITERIA)
    if ignored_layers is None:
        ignored_layers = default_ignored_layers(model, example_input)
    ignored_names = resolve_module_names(model, list(ignored_layers), "ignored_layers")
    graph = build_dependency_graph(model, example_input)
    groups = prunable_groups(graph, modules_under(model, ignored_names))
    chosen = select_channels(groups, channel_scores(groups, importance), sparsity, scope, min_channels, round_to)
    masks, _ = channel_masks(model, groups, chosen)
    apply_masks(named_float_parameters(model), masks)
    report = None
    if remove:
        report = remove_pruned_channels(model, example_input, pruned_channels=chosen, ignored_layers=ignored_names)
    return chosen, report
