"""Pruned shapes in checkpoints: a checkpoint of a smaller network reloads into a fresh original one.

After channel removal the checkpoint's tensors no longer fit the architecture that ``__init__`` builds.
:func:`architecture_record` describes the smaller shapes as plain data, stored under
``checkpoint["dms_lightning"]["pruning"]``; :func:`restore_pruned_architecture` (registered with
:func:`dms_lightning.utils.checkpoint.register_architecture_restorer`, order 10) resizes a fresh network
to them before Lightning loads the weights — for ``Trainer.fit(ckpt_path=...)`` and for
``load_from_checkpoint`` alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from dms_lightning.utils.checkpoint import compression_target

CHECKPOINT_KEY = "pruning"
_RESTORED_FLAG = f"_dms_restored_{CHECKPOINT_KEY}"

# Module attributes that carry a channel count; everything else about a pruned layer is in its tensors.
_SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                     "normalized_shape", "num_channels", "num_groups", "num_parameters", "embedding_dim")


def float_network(module: nn.Module) -> nn.Module:
    """The float network a fake-quantized ``module`` was prepared from (it shares the parameters), else ``module``.

    Quantization-aware training swaps the network for a wrapped twin with other module names; pruning
    records and masks always speak in the float network's names, which a fresh model also has.
    """
    from dms_lightning.quant.prepare import float_model

    return float_model(module) or module


def named_float_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` in float-network names, looking through fake-quantized sub-networks."""
    model = float_network(model)
    yield prefix, model
    for name, child in model.named_children():
        yield from named_float_modules(child, f"{prefix}.{name}" if prefix else name)


def named_float_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by float-network name, each tensor once."""
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in named_float_modules(model):
        for key, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                found[f"{module_name}.{key}" if module_name else key] = param
    return found


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


def restore_pruned_architecture(module: nn.Module, state: Mapping) -> None:
    """Restorer for ``checkpoint["dms_lightning"]["pruning"]``: resize the compression target to the record."""
    apply_architecture_record(compression_target(module), state["architecture"])
    setattr(module, _RESTORED_FLAG, True)


class _RestoringOnLoadCheckpoint:
    """An instance's ``on_load_checkpoint``: restore the pruned shapes, then run the class's own hook.

    A small object rather than a bound function, so the module still pickles and deep-copies.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, checkpoint: dict) -> None:
        module = self.module
        if CHECKPOINT_KEY in checkpoint.get("dms_lightning", {}) and not getattr(module, _RESTORED_FLAG, False):
            restore_pruned_architecture(module, checkpoint["dms_lightning"][CHECKPOINT_KEY])
        type(module).on_load_checkpoint(module, checkpoint)


def install_checkpoint_restore(pl_module: nn.Module) -> None:
    """Make ``Trainer.fit(ckpt_path=...)`` resize ``pl_module`` before loading, whatever its class does.

    Lightning calls ``on_load_checkpoint`` before loading the weights. Our modules call
    :func:`~dms_lightning.utils.checkpoint.restore_architecture` there; a plain user module does not, so
    its instance gets a hook that restores the pruned shapes first and then runs the class's own
    ``on_load_checkpoint``. (For ``load_from_checkpoint`` of a plain module, call
    ``restore_architecture(self, checkpoint)`` in its ``on_load_checkpoint``.)
    """
    setattr(pl_module, _RESTORED_FLAG, False)  # one restore per run, even when the module is reused
    pl_module.on_load_checkpoint = _RestoringOnLoadCheckpoint(pl_module)
