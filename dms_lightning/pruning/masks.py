"""Mask bookkeeping: which weights are pruned, kept at zero after every optimizer step.

A mask set maps parameter names (of the network being pruned, each tensor once) to boolean *keep* masks
of the parameter's shape. Three ways to compute one:

* :func:`magnitude_masks` — unstructured L1 magnitude, per layer or global.
* :func:`n_m_masks` — semi-structured N:M (at most N non-zeros in every group of M consecutive input channels),
  the pattern sparse tensor cores and several NPUs accelerate.
* :func:`channel_masks` — whole channels of a dependency group: every coupled tensor slice is zeroed
  (conv filters, BatchNorm γ/β, the next layer's input columns, ...), so the masked network computes
  exactly what the network with those channels physically removed computes.

Masks are monotone: a weight pruned at one pruning point stays pruned at the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch_pruning as tp
from torch import Tensor, nn

from dms_lightning.pruning.graph import ChannelGroup
from dms_lightning.utils.compression import named_float_parameters

Masks = dict[str, Tensor]


@torch.no_grad()
def apply_masks(parameters: Mapping[str, Tensor], masks: Masks) -> None:
    """Zero the pruned entries of ``parameters`` in place."""
    for name, mask in masks.items():
        param = parameters[name]
        if mask.device != param.device:
            mask = masks[name] = mask.to(param.device)
        param.mul_(mask)


def _scores(weight: Tensor, previous: Tensor | None) -> Tensor:
    scores = weight.detach().abs().float()
    if previous is not None:
        # Already pruned weights rank below everything: masks only grow.
        scores = scores.masked_fill(~previous.to(scores.device), -1.0)
    return scores


@torch.no_grad()
def magnitude_masks(weights: Mapping[str, Tensor], sparsity: float, scope: str = "global",
                    previous: Masks | None = None) -> Masks:
    """L1-magnitude masks pruning ``sparsity`` of the weights, over all tensors or in each one.

    Exactly ``round(sparsity * numel)`` weights are pruned (globally or per tensor), so the reached
    sparsity equals the target up to one weight.

    Example:
        >>> w = {"fc.weight": torch.arange(1.0, 11.0).reshape(2, 5)}
        >>> magnitude_masks(w, 0.3)["fc.weight"].int().tolist()
        [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    """
    previous = previous or {}
    scores = {name: _scores(w, previous.get(name)) for name, w in weights.items()}
    masks: Masks = {}
    if scope == "layer":
        for name, score in scores.items():
            masks[name] = _keep_largest(score.flatten(), round(sparsity * score.numel())).view_as(score)
        return masks
    flat = torch.cat([s.flatten() for s in scores.values()]) if scores else torch.zeros(0)
    keep = _keep_largest(flat, round(sparsity * flat.numel()))
    offset = 0
    for name, score in scores.items():
        masks[name] = keep[offset:offset + score.numel()].view_as(score)
        offset += score.numel()
    return masks


def _keep_largest(scores: Tensor, prune: int) -> Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    if prune > 0:
        keep[torch.topk(scores, prune, largest=False, sorted=False).indices] = False
    return keep


def _input_channels_last(weight: Tensor) -> Tensor:
    # Conv weights are O × I × kH × kW; N:M groups run along I, so move it last.
    return weight.movedim(1, -1) if weight.dim() > 2 else weight


def n_m_supported(weight: Tensor, group_size: int) -> bool:
    """Whether the input-channel dimension of ``weight`` splits into groups of ``group_size``."""
    return weight.dim() >= 2 and weight.shape[1] % group_size == 0


@torch.no_grad()
def n_m_masks(weights: Mapping[str, Tensor], nonzeros_per_group: int, group_size: int,
              previous: Masks | None = None) -> Masks:
    """Keep the ``nonzeros_per_group`` largest-magnitude weights of every ``group_size`` consecutive input channels.

    Example:
        >>> w = {"fc.weight": torch.tensor([[4.0, -1.0, 3.0, 0.5]])}
        >>> n_m_masks(w, 2, 4)["fc.weight"].int().tolist()
        [[1, 0, 1, 0]]
    """
    previous = previous or {}
    masks: Masks = {}
    for name, weight in weights.items():
        if not n_m_supported(weight, group_size):
            continue
        scores = _input_channels_last(_scores(weight, previous.get(name)))
        blocks = scores.reshape(-1, group_size)
        keep = torch.zeros_like(blocks, dtype=torch.bool)
        keep.scatter_(1, torch.topk(blocks, nonzeros_per_group, dim=1).indices, True)
        keep = keep.view(scores.shape)
        masks[name] = keep.movedim(-1, 1) if weight.dim() > 2 else keep
    return masks


# --------------------------------------------------------------------------------------------- channel masks
# One small handler per Torch-Pruning pruning function: which slices of which tensors belong to the
# channels ``idxs`` of that layer. Each returns (tensor attribute name, index tuple) pairs.
Slices = list[tuple[str, tuple]]


def _along(dim: int, idxs: list[int], *names: str) -> Callable[[nn.Module], Slices]:
    def slices(module: nn.Module) -> Slices:
        index = (slice(None),) * dim + (torch.tensor(idxs),) if dim >= 0 else (..., torch.tensor(idxs))
        return [(name, index) for name in names if getattr(module, name, None) is not None]
    return slices


def _conv_out(module: nn.Module, idxs: list[int]) -> Slices:
    dim = 1 if module.transposed else 0
    return _along(dim, idxs, "weight")(module) + _along(0, idxs, "bias")(module)


def _conv_in(module: nn.Module, idxs: list[int]) -> Slices:
    if module.transposed:
        return _along(0, idxs, "weight")(module)
    if module.groups == 1:
        return _along(1, idxs, "weight")(module)
    # Grouped convolution: input channel c only feeds the output channels of its own group.
    per_group_in = module.in_channels // module.groups
    per_group_out = module.out_channels // module.groups
    slices: Slices = []
    for c in idxs:
        g = c // per_group_in
        slices.append(("weight", (slice(g * per_group_out, (g + 1) * per_group_out), c % per_group_in)))
    return slices


def _affine(module: nn.Module, idxs: list[int]) -> Slices:
    return _along(0, idxs, "weight", "bias")(module)


def _prelu(module: nn.Module, idxs: list[int]) -> Slices:
    return _along(0, idxs, "weight")(module) if module.num_parameters > 1 else []


_CHANNEL_HANDLERS: dict[Callable, Callable[[nn.Module, list[int]], Slices]] = {
    tp.prune_conv_out_channels: _conv_out,
    tp.prune_depthwise_conv_out_channels: _conv_out,  # also its in-channel handler: the same function
    tp.prune_conv_in_channels: _conv_in,
    tp.prune_linear_out_channels: lambda m, idxs: _along(0, idxs, "weight", "bias")(m),
    tp.prune_linear_in_channels: lambda m, idxs: _along(1, idxs, "weight")(m),
    tp.prune_batchnorm_out_channels: _affine,
    tp.prune_groupnorm_out_channels: _affine,
    tp.prune_instancenorm_out_channels: _affine,
    tp.prune_layernorm_out_channels: lambda m, idxs: _along(-1, idxs, "weight", "bias")(m),
    tp.prune_prelu_out_channels: _prelu,
}


def channel_slices(items: Iterable[tuple], param_names: Mapping[int, str]) -> tuple[list[tuple[str, tuple]], set[str]]:
    """``(parameter name, index)`` for every tensor slice of a pruning group, and unsupported layer types.

    ``items`` are the ``(dependency, indices)`` pairs of a Torch-Pruning group holding the channels to
    prune; ``param_names`` maps ``id(param)`` to its name in the network.
    """
    found: list[tuple[str, tuple]] = []
    unsupported: set[str] = set()
    for dep, idxs in items:
        target = dep.target.module
        idxs = list(idxs)
        if not idxs:
            continue
        if isinstance(target, nn.Parameter):
            # An unwrapped parameter (e.g. ConvNeXt's layer scale) pruned along its own dimension.
            index = (slice(None),) * (dep.target.pruning_dim % target.dim()) + (torch.tensor(idxs),)
            if id(target) in param_names:
                found.append((param_names[id(target)], index))
            continue
        handler = _CHANNEL_HANDLERS.get(dep.handler)
        has_params = any(True for _ in target.parameters(recurse=False))
        if handler is None:
            if has_params:
                unsupported.add(type(target).__name__)
            continue
        for attr, index in handler(target, idxs):
            param = getattr(target, attr)
            if id(param) in param_names:
                found.append((param_names[id(param)], index))
    return found, unsupported


@torch.no_grad()
def channel_masks(model: nn.Module, groups: Iterable[ChannelGroup],
                  pruned: Mapping[str, list[int]]) -> tuple[Masks, set[str]]:
    """Keep-masks that zero the channels ``pruned[group name]`` in every tensor of each group.

    Masks are keyed by float-network parameter names (``net.3.weight`` also while quantization-aware training
    holds that weight as ``net.3.conv.weight``), the names :func:`apply_masks` is given. Returns the masks and
    the names of layer types whose slices could not be masked (they are still removed physically at the end).
    """
    parameters = named_float_parameters(model)
    param_names = {id(p): name for name, p in parameters.items()}
    masks: Masks = {}
    unsupported: set[str] = set()
    for channel_group in groups:
        idxs = pruned.get(channel_group.name, [])
        if not idxs:
            continue
        slices, missing = channel_slices(channel_group.items_for(idxs), param_names)
        unsupported |= missing
        for name, index in slices:
            mask = masks.get(name)
            if mask is None:
                mask = masks[name] = torch.ones_like(parameters[name], dtype=torch.bool)
            mask[index] = False
    return masks, unsupported


def merge_masks(*mask_sets: Masks) -> Masks:
    """Element-wise AND of several mask sets."""
    merged: Masks = {}
    for masks in mask_sets:
        for name, mask in masks.items():
            merged[name] = merged[name] & mask if name in merged else mask.clone()
    return merged
