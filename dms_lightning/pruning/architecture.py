"""Pruned shapes in checkpoints: a checkpoint of a smaller network reloads into a fresh original one.

After channel removal the checkpoint's tensors no longer fit the architecture that ``__init__`` builds.
:func:`architecture_record` describes the smaller shapes as plain data, stored under
``checkpoint["dms_lightning"]["pruning"]``; :class:`ChannelRemoval` (the first change
:func:`dms_lightning.utils.checkpoint.restore_architecture` re-applies, before quantizer wrapping) resizes a
fresh network to them before Lightning loads the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dms_lightning.utils.checkpoint import CHANNEL_REMOVAL, ArchitectureChange
from dms_lightning.utils.compression import compression_target, named_float_modules

# Module attributes that carry a channel count; everything else about a pruned layer is in its tensors.
_SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                     "normalized_shape", "num_channels", "num_groups", "num_parameters", "embedding_dim")


def architecture_record(model: nn.Module) -> dict:
    """The shapes of ``model``: channel attributes and tensor shapes of every module that has tensors.

    Plain Python data (ints, lists), so it goes into a checkpoint as is.
    """
    modules = {}
    for name, module in named_float_modules(model):
        tensors = {key: list(t.shape) for key, t in [*module._parameters.items(), *module._buffers.items()]
                   if t is not None}
        if not tensors:
            continue
        attrs = {}
        for attr in _SHAPE_ATTRIBUTES:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                attrs[attr] = value
            elif isinstance(value, tuple) and all(isinstance(v, int) for v in value):
                attrs[attr] = list(value)
        modules[name] = {"attrs": attrs, "tensors": tensors}
    return {"version": 1, "modules": modules}


@torch.no_grad()
def apply_architecture_record(model: nn.Module, record: Mapping) -> int:
    """Resize ``model``'s layers to the shapes in ``record`` (values are left to ``load_state_dict``).

    Returns the number of tensors resized; 0 when ``model`` already has the recorded shapes.

    Raises:
        ValueError: if the record names a module ``model`` does not have (another architecture).
    """
    changed = 0
    own = dict(named_float_modules(model))
    for name, entry in record["modules"].items():
        module = own.get(name)
        if module is None:
            raise ValueError(f"the pruned-architecture record names module {name!r}, which "
                             f"{type(model).__name__} does not have: the checkpoint is of another network")
        for attr, value in entry["attrs"].items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for key, shape in entry["tensors"].items():
            current = module._parameters.get(key) if key in module._parameters else module._buffers.get(key)
            if current is None or list(current.shape) == list(shape):
                continue
            fresh = torch.zeros(shape, dtype=current.dtype, device=current.device)
            if key in module._parameters:
                module._parameters[key] = nn.Parameter(fresh, requires_grad=current.requires_grad)
            else:
                module._buffers[key] = fresh
            changed += 1
    return changed


class ChannelRemoval(ArchitectureChange):
    """Physically removed channels: the record holds every layer's shapes, the fresh network is resized to them.

    Recorded by :class:`~dms_lightning.callbacks.IterativePruning` (``method="channel"``) in every checkpoint,
    before and after removal, in float-network names (also once quantization-aware training wrapped the
    network), so a pre-removal checkpoint also reloads into an already pruned module.
    """

    record_key = "pruning"
    order = CHANNEL_REMOVAL

    @classmethod
    def record(cls, pl_module: nn.Module) -> dict:
        return {"architecture": architecture_record(compression_target(pl_module))}

    @classmethod
    def restore(cls, pl_module: nn.Module, record: Mapping) -> None:
        apply_architecture_record(compression_target(pl_module), record["architecture"])
