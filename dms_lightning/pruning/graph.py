"""The dependency graph of a network: which tensors must lose the same channels together.

Built on Torch-Pruning's ``DependencyGraph`` (DepGraph, Fang et al. 2023): tracing one forward pass
groups coupled tensors — a conv's out-channels, the BatchNorm after it, the next conv's in-channels,
both sides of a residual add, the slices of a concatenation, depthwise and grouped convolutions,
squeeze-excitation gates, the classifier's in-features. Each :class:`ChannelGroup` here is one such
group with a stable name (its root layer), the number of channel positions that can be removed, and
the channel-grouping factor of grouped convolutions (those must lose the same positions in every group).
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from dms_lightning.utils.compression import named_float_modules

PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


class UntraceableModelError(ValueError):
    """The network's forward pass cannot be traced into a channel dependency graph."""


class _ChannelShuffle(torch.autograd.Function):
    """ShuffleNet's channel shuffle as a single autograd node (no view/transpose nodes to trace through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: int) -> torch.Tensor:  # noqa: D102
        ctx.groups = groups
        b, c, h, w = x.shape
        return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        b, c, h, w = grad.shape
        return grad.view(b, c // ctx.groups, ctx.groups, h, w).transpose(1, 2).reshape(b, c, h, w), None


class _ShuffleBarrier(nn.Module):
    """Stands in for one block's channel shuffle while tracing: its in- and out-channels are not coupled."""

    def forward(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        return _ChannelShuffle.apply(x, groups)


class _BarrierPruner(tp.pruner.function.BasePruningFunc):
    # Distinct in/out functions: Torch-Pruning then sees no coupling through the barrier. Groups that
    # reach a barrier are dropped by prunable_groups, so these no-ops never run on a real channel.
    def prune_out_channels(self, layer, idxs):
        return layer

    def prune_in_channels(self, layer, idxs):
        return layer

    def get_out_channels(self, layer):
        return None

    def get_in_channels(self, layer):
        return None


@contextlib.contextmanager
def _shuffle_barriers(model: nn.Module) -> Iterator[dict]:
    """Trace ShuffleNet V2 blocks with their channel shuffle as a barrier.

    Torch-Pruning cannot map channel indices through the view/transpose of a channel shuffle (it
    crashes). With the shuffle traced as a barrier module, channels that cross it keep their width and
    the branch-internal channels of every block (most of the network's MACs) can still be pruned.
    """
    from torchvision.models import shufflenetv2

    blocks = [m for m in model.modules() if isinstance(m, shufflenetv2.InvertedResidual)]
    if not blocks:
        yield {}
        return
    current: list[nn.Module] = []

    def enter(block, _args) -> None:
        current.append(block)

    def leave(_block, _args, _output) -> None:
        current.pop()

    hooks = []
    for block in blocks:
        block.add_module("_dms_shuffle_barrier", _ShuffleBarrier())
        hooks.append(block.register_forward_pre_hook(enter))
        hooks.append(block.register_forward_hook(leave))
    original = shufflenetv2.channel_shuffle
    shufflenetv2.channel_shuffle = lambda x, groups: current[-1]._dms_shuffle_barrier(x, groups)
    try:
        yield {_ShuffleBarrier: _BarrierPruner()}
    finally:
        shufflenetv2.channel_shuffle = original
        for hook in hooks:
            hook.remove()
        for block in blocks:
            del block._dms_shuffle_barrier


def _is_barrier(node) -> bool:
    return isinstance(node.module, _ShuffleBarrier)


@contextlib.contextmanager
def _tracing_mode(model: nn.Module) -> Iterator[None]:
    # Eval mode: the example forward pass must not update BatchNorm running statistics.
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        model.train(was_training)


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` on ``example_input`` into a Torch-Pruning dependency graph.

    Raises:
        UntraceableModelError: when the forward pass cannot be traced (data-dependent control flow
            on channel counts, reshapes that mix channels with space, e.g. ShuffleNet's channel shuffle).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example_input = example_input.detach().to(device)
    with _tracing_mode(model), _shuffle_barriers(model) as barrier_pruners:
        try:
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False,
                                                         customized_pruners=barrier_pruners)
        except Exception as err:  # noqa: BLE001 - tracing fails in many ways, all mean the same to the user
            raise UntraceableModelError(
                f"cannot trace {type(model).__name__} into a channel dependency graph for structured pruning "
                f"({type(err).__name__}: {err}). Channel pruning needs a forward pass whose channel flow "
                "Torch-Pruning understands (convs, norms, adds, concatenations, flatten); use "
                "method='unstructured' or 'n_m' for this model, or list the offending blocks in ignored_layers"
            ) from err


def execution_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the Conv/Linear layers of ``model`` in the order the forward pass runs them."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, _i, _o, name=name: order.append(name))
               for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input.detach().to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


def resolve_module_names(model: nn.Module, patterns: Sequence[str], field: str) -> list[str]:
    """Module names of ``model`` (its float network's, also while QAT wraps it) matched by ``patterns``.

    Patterns are exact names or shell-style wildcards.

    Raises:
        ValueError: naming the pattern that matches nothing, with a few valid names.
    """
    names = [name for name, _ in named_float_modules(model) if name]
    resolved: list[str] = []
    for pattern in patterns:
        matched = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            close = [n for n in names if pattern.split(".")[0] in n][:8] or names[:8]
            raise ValueError(f"{field}: {pattern!r} names no module of {type(model).__name__}; "
                             f"module names look like {close}")
        resolved.extend(matched)
    return list(dict.fromkeys(resolved))


def modules_under(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The named modules and all their sub-modules."""
    found: list[nn.Module] = []
    for name in names:
        found.extend(model.get_submodule(name).modules())
    return found


@dataclass
class ChannelGroup:
    """One set of coupled channels, named by its root layer (the Conv/Linear whose outputs they are).

    ``positions`` channel positions can be removed; with ``channel_groups > 1`` (grouped convolutions)
    each position stands for one channel in every one of the ``channel_groups`` groups.
    """

    name: str
    root: nn.Module
    group: tp.Group
    channels: int
    channel_groups: int = 1

    @property
    def handler(self):
        """The Torch-Pruning function removing the root layer's out-channels."""
        return self.group[0].dep.handler

    @property
    def positions(self) -> int:
        return self.channels // self.channel_groups

    def expand(self, positions: Iterable[int]) -> list[int]:
        """Channel indices of ``positions`` in every channel group."""
        size = self.positions
        return sorted(p + g * size for g in range(self.channel_groups) for p in positions)

    def items_for(self, channels: Iterable[int]) -> list[tuple[object, list[int]]]:
        """``(dependency, indices)`` of every coupled tensor for a subset of the root's channels.

        Filtering the full group by root index equals asking Torch-Pruning for a new group with these
        channels (its index mappings act channel by channel), without re-running its index mapping.
        """
        wanted = set(channels)
        items = []
        for item in self.group:
            idxs = [i for i, root in zip(item.idxs, item.root_idxs) if root in wanted]
            if idxs:
                items.append((item.dep, idxs))
        return items

    def positions_of(self, channels: Iterable[int]) -> list[int]:
        """Channel positions whose every copy is in ``channels``."""
        channels = set(channels)
        size = self.positions
        return [p for p in range(size) if all(p + g * size in channels for g in range(self.channel_groups))]


def _channel_groups(group: tp.Group) -> int:
    factors = [1]
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.out_channels:
            factors.append(module.groups)
        elif isinstance(module, nn.GroupNorm) and module.num_groups > 1:
            factors.append(module.num_groups)
    return max(factors)


def _root_closure(graph: tp.DependencyGraph, group: tp.Group, channels: list[int]) -> set[int]:
    # The root channels Torch-Pruning removes along with ``channels``: more than asked when they are tied.
    root = group[0].dep.target.module
    return set(graph.get_pruning_group(root, group[0].dep.handler, channels)[0].idxs)


def _tied_channels(graph: tp.DependencyGraph, group: tp.Group, channels: int) -> int | None:
    """How many of the root's channels are tied into one (1: none), or ``None`` for a pattern we cannot keep.

    A concatenation of a tensor with a depthwise (or elementwise) function of itself — GhostNet's ghost module,
    ``cat([x, dw(x)])`` — feeds one source channel to two positions of the root: removing either removes both.
    Torch-Pruning's group lists each tensor once, so the tie shows only in what a removal takes along (its
    closure). Ties of the grouped-convolution layout (position ``p`` with ``p + g·size``) are pruned like
    grouped channels; the closure of each half of every bit of the position index must then be exactly the
    expansion of that half, which pins every position's closure in ``2·log2(size)`` probes.
    """
    nodes = {dep.target for dep, _ in group} | {dep.source for dep, _ in group}
    joins = [node for node in nodes if isinstance(node.module, tp.ops._ConcatOp)
             and sum(source in nodes for source in node.inputs) > 1]
    if not joins:  # no tensor of the group reaches a concatenation twice: nothing can tie
        return 1
    first = sorted(_root_closure(graph, group, [0]))
    tied = len(first)
    if tied == 1 and _root_closure(graph, group, list(range(channels))[1:]) == set(range(1, channels)):
        # Position 0 is free; a tie elsewhere shows in some half of some bit of the index.
        tied = 1 if all(_root_closure(graph, group, half) == set(half) for half in _bit_halves(channels)) else 0
        return tied or None
    size = channels // tied
    if channels % tied or first != [g * size for g in range(tied)]:
        return None
    for half in _bit_halves(size):
        expanded = {p + g * size for p in half for g in range(tied)}
        if _root_closure(graph, group, half) != expanded:
            return None
    return tied


def _bit_halves(count: int) -> list[list[int]]:
    halves = []
    for bit in range(max(1, (count - 1).bit_length())):
        for side in (0, 1):
            half = [i for i in range(count) if (i >> bit) & 1 == side]
            if half:
                halves.append(half)
    return halves


def _unequal_split(group: tp.Group) -> list[int] | None:
    """Sizes of a split into unequal parts that the group's channels pass through, or ``None``.

    ``qkv.split([1, embed_dim, embed_dim])`` (timm's MobileViT-v2 attention) takes its sizes from numbers
    stored on the module: a pruned forward would still ask for the old sizes, and the 1-channel part could be
    emptied. ``chunk(2)`` (ShuffleNet) cuts equal halves of whatever it is given and stays prunable.
    """
    for dep, _ in group:
        for node in (dep.source, dep.target):
            sizes = getattr(node.module, "split_sizes", None)
            if isinstance(node.module, tp.ops._SplitOp) and sizes and len(set(sizes)) > 1:
                return list(sizes)
    return None


def _depthwise_multiplier_input(graph: tp.DependencyGraph, group: tp.Group) -> str | None:
    """Name of a conv whose input channels the group prunes although each feeds several filters, or ``None``.

    A depthwise conv with a channel multiplier (``groups == in_channels < out_channels``, FastViT's final conv)
    ties input channel ``i`` to output channels ``i·k … i·k + k - 1``. Torch-Pruning removes its input channels
    as if it were a plain conv: the L1 / L2 scores index past its weight (an IndexError at the first pruning
    point) and the pruned layer would keep its groups.
    """
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and graph.is_in_channel_pruning_fn(dep.handler) and \
                1 < module.groups == module.in_channels < module.out_channels:
            return graph._module2name.get(module, type(module).__name__)
    return None


def output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """Conv/Linear layers whose outputs reach a network output through parameter-free ops only.

    Their out-channels are the logits the user asked for, so they are never pruned.
    """
    found = []
    for module, node in graph.module2node.items():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if not node.outputs:  # the forward pass returns this layer's output directly
            found.append(module)
            continue
        stack, seen = list(node.outputs), set()
        while stack:
            current = stack.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            if isinstance(current.module, PRUNABLE_TYPES):
                continue  # another layer consumes these channels first
            if current.type == tp.ops.OPTYPE.OUTPUT or not current.outputs:
                found.append(module)
                break
            stack.extend(current.outputs)
    return found


_CROSSES_SHUFFLE = "crosses a channel shuffle"
_TOO_FEW = "has fewer than two channels"
_INDIVISIBLE = "has a channel count its channel groups do not divide"
# Refusals prunable_groups passes over without a warning: nothing a user would expect pruned.
_SILENT_REFUSALS = (_CROSSES_SHUFFLE, _TOO_FEW, _INDIVISIBLE)


def group_refusal(graph: tp.DependencyGraph, group: tp.Group, channels: int | None) -> tuple[str | None, int]:
    """Why the channels of ``group`` cannot be removed (``None`` when they can), and their channel factor.

    The one set of rules for every group, whether :func:`prunable_groups` enumerates it or a caller names its
    root (``remove_pruned_channels(pruned_channels=...)``). The factor is how many channels each removable
    position stands for (grouped convolutions, tied channels).
    """
    if any(_is_barrier(dep.target) or _is_barrier(dep.source) for dep, _ in group):
        return _CROSSES_SHUFFLE, 1
    if channels is None or channels < 2:
        return _TOO_FEW, 1
    sizes = _unequal_split(group)
    if sizes is not None:
        return f"passes through a split into unequal parts {sizes}, whose sizes the forward code fixes", 1
    multiplier = _depthwise_multiplier_input(graph, group)
    if multiplier is not None:
        return (f"feeds the depthwise conv {multiplier!r}, whose every input channel feeds several filters (a "
                "channel multiplier), which channel removal cannot keep aligned"), 1
    factor = _channel_groups(group)
    tied = _tied_channels(graph, group, channels)
    if tied is None or (tied > 1 and factor not in (1, tied)):
        return "couples its channels in a pattern channel removal cannot keep aligned", 1
    factor = max(factor, tied)
    if channels % factor:
        return _INDIVISIBLE, factor
    return None, factor


def prunable_groups(graph: tp.DependencyGraph, ignored: Sequence[nn.Module] = ()) -> list[ChannelGroup]:
    """Every group of coupled channels rooted at a Conv/Linear, except groups touching ``ignored``.

    Groups whose channels are the network's outputs (the classifier's logits) are never returned.
    """
    names = graph._module2name
    groups = []
    ignored = list(ignored) + output_layers(graph)
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(PRUNABLE_TYPES)):
        root = group[0].dep.target.module
        channels = graph.get_out_channels(root)
        reason, factor = group_refusal(graph, group, channels)
        if reason is not None:
            if reason not in _SILENT_REFUSALS:
                warnings.warn(f"channel group {names[root]!r} {reason}; its channels are left unpruned", stacklevel=2)
            continue
        groups.append(ChannelGroup(names[root], root, group, channels, factor))
    return groups
