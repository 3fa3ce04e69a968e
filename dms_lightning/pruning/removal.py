"""Physical channel removal: turn zeroed channels into a smaller, faster network.

Masks alone make neither a smaller file nor a faster model (a zero filter costs as much as any other).
:func:`remove_pruned_channels` rebuilds every coupled layer without the pruned channels, using
Torch-Pruning's dependency graph so residual adds, concatenations, depthwise / grouped convolutions and
squeeze-excitation gates stay consistent.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

from dms_lightning.pruning.graph import (
    PRUNABLE_TYPES,
    ChannelGroup,
    build_dependency_graph,
    group_refusal,
    modules_under,
    output_layers,
    prunable_groups,
    resolve_module_names,
)
from dms_lightning.pruning.monitoring import count_module_macs, layer_output_positions

log = logging.getLogger(__name__)

@dataclass
class RemovalReport:
    """What :func:`remove_pruned_channels` changed."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    removed_channels: dict[str, int] = field(default_factory=dict)  # group (root layer) name -> channels removed

    @property
    def param_ratio(self) -> float:
        return self.params_after / max(1, self.params_before)

    @property
    def mac_ratio(self) -> float:
        return self.macs_after / max(1, self.macs_before)


# ------------------------------------------------------------------------------------ finding zero channels
def _zero_rows(tensor: Tensor | None, dim: int = 0) -> Tensor | None:
    if tensor is None:
        return None
    return tensor.detach().movedim(dim, 0).reshape(tensor.shape[dim], -1).abs().sum(dim=1) == 0


def _output_is_zero(dep, idxs: list[int]) -> Tensor | None:
    """Per index: does this out-channel-side tensor slice vanish? ``None`` for input-side / parameter-free nodes."""
    module, handler = dep.target.module, dep.handler
    if isinstance(module, nn.Parameter):
        return _zero_rows(module, dep.target.pruning_dim % module.dim())[idxs]
    if handler in (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels):
        dim = 1 if getattr(module, "transposed", False) else 0
        zero = _zero_rows(module.weight, dim)
        if module.bias is not None:
            zero = zero & (module.bias.detach() == 0)
        return zero[idxs]
    if handler in (tp.prune_batchnorm_out_channels, tp.prune_groupnorm_out_channels,
                   tp.prune_instancenorm_out_channels, tp.prune_layernorm_out_channels):
        weight = getattr(module, "weight", None)
        if weight is None:  # a norm without affine parameters re-creates non-zero outputs
            return torch.zeros(len(idxs), dtype=torch.bool)
        zero = _zero_rows(weight, weight.dim() - 1)
        bias = getattr(module, "bias", None)
        if bias is not None:
            zero = zero & _zero_rows(bias, bias.dim() - 1)
        return zero[idxs]
    return None


def zero_channels(group: ChannelGroup) -> list[int]:
    """Channels of ``group`` whose every output-side tensor slice (filters, biases, norm γ/β) is zero.

    Such a channel computes a constant zero, so removing it leaves the network's function unchanged.
    """
    removable = torch.ones(group.channels, dtype=torch.bool)
    for item in group.group:
        dep, idxs = item.dep, list(item.idxs)
        zero = _output_is_zero(dep, idxs)
        if zero is None:
            continue
        pairs = [(root, flag) for root, flag in zip(item.root_idxs, zero.cpu().tolist()) if root is not None]
        for root, flag in pairs:
            removable[root] &= bool(flag)
    channels = removable.nonzero().flatten().tolist()
    return group.expand(group.positions_of(channels))


# --------------------------------------------------------------------------------------------- removal
def _emptied_layer(graph: tp.DependencyGraph, group: tp.Group) -> tuple[str, int] | None:
    """``(name, channels)`` of a layer that pruning ``group`` would leave with no channel, or ``None``.

    The root keeps a channel by construction, but a coupled tensor can be narrower than the root: the 1-channel
    part of an unequal split, a concatenation's smaller input. An empty layer cuts the network in two.
    """
    for dep, idxs in group:
        module = dep.target.module
        if graph.is_out_channel_pruning_fn(dep.handler):
            channels = graph.get_out_channels(module)
        elif graph.is_in_channel_pruning_fn(dep.handler):
            channels = graph.get_in_channels(module)
        else:
            continue
        if channels is not None and len(set(idxs)) >= channels:
            return graph._module2name.get(module, type(module).__name__), channels
    return None


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_named_groups(model: nn.Module, graph: tp.DependencyGraph, plan: dict, ignored_layers: Sequence[str]) -> None:
    """Refuse explicit channels of a group :func:`prunable_groups` would leave alone, naming the layer and why.

    The same rules as the automatic path: channel removal there skips such a group with a warning; channels a
    caller names in it would cut the network's outputs, touch a layer it asked to keep, or break a split, a
    channel multiplier or a tied channel pattern in the smaller network.
    """
    outputs = set(map(id, output_layers(graph)))
    ignored = set(map(id, modules_under(model, resolve_module_names(model, list(ignored_layers), "ignored_layers"))))
    for name, (root, idxs, channels) in plan.items():
        if not idxs:
            continue
        if id(root) in outputs:
            raise ValueError(f"pruned_channels[{name!r}]: the outputs of {name!r} are the network's outputs "
                             "(its logits); they keep every channel")
        bad = [i for i in idxs if not 0 <= i < (channels or 0)]
        if bad:
            raise ValueError(f"pruned_channels[{name!r}]: channel indices {bad[:8]} are outside "
                             f"0..{(channels or 0) - 1}")
        group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, list(idxs))
        # As Torch-Pruning reads ignored_layers: their output channels stay (their inputs follow their producers).
        touched = sorted({graph._module2name.get(dep.target.module, "?") for dep, _ in group
                          if id(dep.target.module) in ignored and graph.is_out_channel_pruning_fn(dep.handler)})
        if touched:
            raise ValueError(f"pruned_channels[{name!r}]: removing these channels removes output channels of "
                             f"{touched}, which ignored_layers keeps")
        reason, _ = group_refusal(graph, group, channels)
        if reason is not None:
            raise ValueError(f"pruned_channels[{name!r}]: its channel group {reason}; its channels cannot be "
                             "removed (automatic removal leaves this group unpruned)")


def remove_pruned_channels(
    model: nn.Module,
    example_input: Tensor,
    *,
    pruned_channels: Mapping[str, Sequence[int]] | None = None,
    ignored_layers: Sequence[str] = (),
) -> RemovalReport:
    """Physically remove pruned channels from ``model`` (in place) and report the change.

    Without ``pruned_channels``, a channel is removed when every output-side slice of its dependency
    group is zero — exactly what :class:`~dms_lightning.callbacks.IterativePruning`'s channel masks leave
    — so the smaller network computes the same outputs. With ``pruned_channels`` (group root layer
    name → channel indices, as IterativePruning records them) those channels are removed as given.
    Layers whose outputs are the network's outputs (the classifier) keep every channel; each group keeps
    at least one channel.

    Args:
        model: the network (any ``nn.Module`` Torch-Pruning can trace).
        example_input: one input batch for tracing (e.g. ``torch.zeros(1, 1, 96, 96)``).
        pruned_channels: optional explicit channels to remove per group root layer.
        ignored_layers: module names (or shell-style patterns) whose channels must not change.

    Returns:
        A :class:`RemovalReport` with parameters and MACs before and after.

    Raises:
        UntraceableModelError: if the model cannot be traced.
        ValueError: for unknown layer names, and for ``pruned_channels`` the automatic path would not remove:
            the classifier's logits, output channels of ``ignored_layers``, indices out of range, a group through
            an unequal split, a depthwise conv with a channel multiplier or an unalignable channel pattern.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=5)
        >>> with torch.no_grad():
        ...     net.layer1[0].conv1.weight[:32] = 0; net.layer1[0].bn1.weight[:32] = 0
        ...     net.layer1[0].bn1.bias[:32] = 0
        >>> report = remove_pruned_channels(net, torch.zeros(1, 3, 64, 64))
        >>> net.layer1[0].conv1.out_channels, report.params_after < report.params_before
        (32, True)
    """
    positions = layer_output_positions(model, example_input)
    params_before = _params(model)
    macs_before, _ = count_module_macs(model, example_input, positions)
    graph = build_dependency_graph(model, example_input)
    if pruned_channels is None:
        ignored = modules_under(model, resolve_module_names(model, list(ignored_layers), "ignored_layers"))
        groups = prunable_groups(graph, ignored)
        plan = {g.name: (g.root, zero_channels(g), g.channels) for g in groups}
    else:
        # The caller already chose within prunable groups: only the roots are needed, which spares
        # Torch-Pruning a full group enumeration (slow on concatenation-heavy networks like DenseNet).
        modules = dict(model.named_modules())
        unknown = sorted(n for n in pruned_channels if not isinstance(modules.get(n), PRUNABLE_TYPES))
        if unknown:
            raise ValueError(f"pruned_channels names {unknown}, which are not Conv/Linear layers of "
                             f"{type(model).__name__}")
        plan = {name: (modules[name], sorted(int(i) for i in idxs), graph.get_out_channels(modules[name]))
                for name, idxs in pruned_channels.items()}
        _check_named_groups(model, graph, plan, ignored_layers)
    removed: dict[str, int] = {}
    with torch.no_grad():
        for name, (root, idxs, channels) in plan.items():
            if len(idxs) >= channels:  # a layer with no channel left would cut the network in two
                idxs = idxs[1:]
            if not idxs:
                continue
            handler = graph.get_pruner_of_module(root).prune_out_channels
            pruning_group = graph.get_pruning_group(root, handler, list(idxs))
            emptied = _emptied_layer(graph, pruning_group)
            if emptied is not None:
                warnings.warn(f"channel group {name!r}: removing {len(idxs)} channels would leave {emptied[0]!r} "
                              f"({emptied[1]} channels) with none; its channels stay in the network (zeroed)",
                              stacklevel=2)
                continue
            pruning_group.prune()
            removed[name] = len(idxs)
    for param in model.parameters():
        param.grad = None  # Torch-Pruning slices stale gradients along; nobody needs them
    macs_after, _ = count_module_macs(model, example_input, positions)
    report = RemovalReport(params_before, _params(model), macs_before, macs_after, removed)
    log.info("removed %d channels in %d groups: %d -> %d parameters, %.1f -> %.1f MMACs",
             sum(removed.values()), len(removed), params_before, report.params_after, macs_before / 1e6,
             macs_after / 1e6)
    return report
