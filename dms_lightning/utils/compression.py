"""What a LightningModule tells the compression callbacks, and how they find their way through each other's work.

* :func:`compression_target` — the network pruning, quantization and export act on.
* :func:`fixed_width_layers` — layers of that network whose output channels must keep their count (a
  distillation adapter or another consumer outside the network reads them).
* :func:`feature_layers` — layers whose outputs the module reads with forward hooks (feature distillation).
* :func:`float_network` — the float network behind a fake-quantized twin: quantization-aware training
  replaces the network by a rewritten graph that shares its parameters; pruning keeps speaking in the
  float network's module names, which a freshly built model also has.
* :func:`named_float_modules` / :func:`named_float_parameters` — ``named_modules`` / ``named_parameters`` in
  those names, also where only part of a module was replaced (a plain LightningModule whose children QAT wrapped):
  masks, sparsity and MACs stay keyed by ``net.3.weight`` while the twin holds it as ``net.3.conv.weight``.
* :func:`float_view` — such a module running its float networks for a while (tracing, forward hooks on the float
  layers), e.g. when pruning prepares on a run resumed from a checkpoint taken during quantization-aware training.

These are plain attributes, not imports: pruning and quantization never import each other, and a user's
own module opts in by defining ``compression_target`` / ``fixed_width_layers`` / ``feature_layers``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn

#: Attribute of a fake-quantized twin holding (a reference to) the float network it was prepared from.
FLOAT_NETWORK_ATTR = "_dms_float_module"


class FloatNetworkRef:
    """Holds the float network without registering it as a submodule (its parameters are the twin's)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


def compression_target(pl_module: nn.Module) -> nn.Module:
    """The network that pruning, quantization and export act on.

    Our modules expose it as ``pl_module.model`` (for :class:`DistillationModule`: the student); a user
    LightningModule can define a ``compression_target`` attribute or property, else the whole module is used.
    """
    target = getattr(pl_module, "compression_target", None)
    if isinstance(target, nn.Module):
        return target
    return pl_module


def fixed_width_layers(pl_module: nn.Module) -> list[str]:
    """Module names (in the compression target) whose output channel count must not change.

    A LightningModule declares them with a ``fixed_width_layers`` attribute or property (a list of names);
    :class:`~dms_lightning.DistillationModule` lists the student layers its FitNets adapters read.
    Channel pruning leaves their output channels alone.
    """
    names = getattr(pl_module, "fixed_width_layers", None) or []
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{type(pl_module).__name__}.fixed_width_layers={names!r} must be a list of module names")
    return list(names)


def feature_layers(pl_module: nn.Module) -> list[str]:
    """Module names (in the compression target) whose outputs the LightningModule reads with forward hooks.

    Declared with a ``feature_layers`` attribute or property; :class:`~dms_lightning.DistillationModule`
    lists the student layers of its feature hints and attention-transfer pairs. Quantization-aware training
    keeps these outputs observable after it rewrites the network into a flat graph.
    """
    names = getattr(pl_module, "feature_layers", None) or []
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{type(pl_module).__name__}.feature_layers={names!r} must be a list of module names")
    return list(names)


def wrapped_float_network(module: nn.Module) -> nn.Module | None:
    """The float network ``module`` was prepared from (sharing its parameters), or ``None`` if it is not a twin."""
    ref = getattr(module, FLOAT_NETWORK_ATTR, None)
    return ref.module if isinstance(ref, FloatNetworkRef) else None


def float_network(module: nn.Module) -> nn.Module:
    """The float network behind a fake-quantized ``module``, else ``module`` itself."""
    return wrapped_float_network(module) or module


def named_float_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` in float-network names, looking through fake-quantized sub-networks (each module once)."""
    seen: set[int] = set()

    def walk(module: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
        module = float_network(module)
        if id(module) in seen:
            return
        seen.add(id(module))
        yield name, module
        for child_name, child in module.named_children():
            yield from walk(child, f"{name}.{child_name}" if name else child_name)

    yield from walk(model, prefix)


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


@contextmanager
def float_view(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with every fake-quantized twin inside it swapped back for its float network, until the block ends.

    The twins share the float networks' parameters and BatchNorm statistics, so nothing is copied; what changes is
    which modules a forward pass calls. The twin's layers call the float layers' kernels, not the layers themselves:
    forward hooks and tracers see the float network only through this view.
    """
    module = float_network(module)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            original = wrapped_float_network(child)
            if original is not None:
                swapped.append((parent, name, child))
                setattr(parent, name, original)
    try:
        yield module
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def is_wrapped(module: nn.Module) -> bool:
    """Whether ``module`` or one of its sub-modules is a fake-quantized twin of a float network."""
    return any(wrapped_float_network(m) is not None for m in module.modules())


def example_from_batch(batch: object) -> Tensor | None:
    """One input of a training batch: the batch itself if it is a tensor, else its first tensor.

    ``(images, labels)`` gives ``images[:1]``; a dict gives its first tensor value (e.g. ``batch["image"]``).
    """
    if isinstance(batch, Tensor):
        return batch[:1]
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = example_from_batch(item)
            if found is not None:
                return found
    return None


def as_network_input(example: Tensor, network: nn.Module) -> Tensor:
    """``example`` on the device, and in the floating dtype, of ``network``'s parameters.

    Example inputs (``example_input_array``, a data module's images, ``torch.zeros``) are float32, while
    ``Trainer(precision="64-true" / "bf16-true")`` converts the network itself: feeding them as they are fails
    with "Input type (float) and bias type (double) should be the same".
    """
    parameter = next((p for p in network.parameters() if p.is_floating_point()), None)
    if parameter is None:
        return example
    dtype = parameter.dtype if example.is_floating_point() else example.dtype
    return example.to(device=parameter.device, dtype=dtype)
