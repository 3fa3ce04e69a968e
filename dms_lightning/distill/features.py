"""Intermediate feature maps by module path: the pairs that hints and attention transfer compare.

A :class:`FeaturePair` names a student layer and a teacher layer by their ``named_modules()`` path
(``features.8``, ``layer3``). :func:`capture_outputs` records those layers' outputs during one forward
pass with hooks that are removed again afterwards, so the student never carries a hook into
validation, export, pruning or quantization.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dms_lightning.utils.validation import check_number


@dataclass(frozen=True)
class FeaturePair:
    """A student layer, the teacher layer it learns from, and the weight of that loss term."""

    student: str
    teacher: str
    weight: float


def parse_feature_pairs(field: str, pairs: Sequence[Mapping | Sequence] | None,
                        default_weight: float) -> list[FeaturePair]:
    """Turn ``[{student: features.8, teacher: layer3, weight: 1.0}, ...]`` (or ``[path, path, weight]`` lists)
    into :class:`FeaturePair` objects, with errors that name ``field``."""
    if isinstance(pairs, (Mapping, str)):
        # Iterating a lone pair would report its keys (or characters) as malformed pairs.
        raise ValueError(f"{field}={pairs!r} must be a list of pairs, e.g. [{{'student': 'features.8', "
                         "'teacher': 'layer3'}]: wrap a single pair in a list")
    parsed = []
    for index, pair in enumerate(pairs or []):
        where = f"{field}[{index}]={pair!r}"
        if isinstance(pair, Mapping):
            unknown = set(pair) - {"student", "teacher", "weight"}
            if unknown or "student" not in pair or "teacher" not in pair:
                raise ValueError(f"{where} must have keys 'student', 'teacher' and optionally 'weight' "
                                 f"(got {sorted(pair)})")
            student, teacher, weight = pair["student"], pair["teacher"], pair.get("weight", default_weight)
        elif isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) in (2, 3):
            student, teacher = pair[0], pair[1]
            weight = pair[2] if len(pair) == 3 else default_weight
        else:
            raise ValueError(f"{where} must be {{student: <path>, teacher: <path>, weight: <float>}} "
                             "or [student_path, teacher_path, weight]")
        if not isinstance(student, str) or not isinstance(teacher, str):
            raise ValueError(f"{where}: 'student' and 'teacher' must be module paths (strings)")
        check_number(f"{where}: weight", weight, 0.0)
        parsed.append(FeaturePair(student, teacher, float(weight)))
    return parsed


def check_module_path(network: nn.Module, path: str, field: str) -> None:
    """Raise a ValueError listing valid paths if ``network`` has no sub-module called ``path``."""
    names = [name for name, _ in network.named_modules() if name]
    if path in names:
        return
    blocks = [name for name in names if name.count(".") <= 1]
    close = difflib.get_close_matches(path, names, n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(f"{field}={path!r} is not a module of the {type(network).__name__}.{hint} Valid paths include "
                     f"(blocks up to depth 2; any deeper named_modules() path also works): {blocks}")


@contextlib.contextmanager
def capture_outputs(network: nn.Module, paths: Sequence[str],
                    calls: dict[str, int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``network``'s sub-modules ``paths`` during the forward passes inside the block
    (a module that runs several times keeps its last output; ``calls``, if given, counts the runs per path).

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=5)
        >>> with capture_outputs(net, ["layer3"]) as features:
        ...     _ = net(torch.zeros(1, 3, 64, 64))
        >>> tuple(features["layer3"].shape)
        (1, 256, 4, 4)
    """
    features: dict[str, torch.Tensor] = {}
    handles = []

    def recorder(path: str):
        def hook(module: nn.Module, inputs, output) -> None:
            features[path] = output
            if calls is not None:
                calls[path] = calls.get(path, 0) + 1
        return hook

    try:
        for path in dict.fromkeys(paths):
            handles.append(network.get_submodule(path).register_forward_hook(recorder(path)))
        yield features
    finally:
        for handle in handles:
            handle.remove()


def network_device(network: nn.Module) -> torch.device:
    """The device of ``network``'s first parameter or buffer (CPU for a network with neither)."""
    tensor = next(network.parameters(), None)
    tensor = tensor if tensor is not None else next(network.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def feature_shapes(network: nn.Module, paths: Sequence[str], example_input: torch.Tensor,
                   owner: str = "") -> dict[str, torch.Size]:
    """Output shapes of ``paths`` for ``example_input`` (moved to the network's device), without touching
    BatchNorm statistics.

    A module that runs more than once in one forward pass (a shared block, torchvision ResNet's ReLU used twice
    per block) is warned about, naming ``owner`` and the path: only its last output is captured and compared.
    """
    if not paths:
        return {}
    calls: dict[str, int] = {}
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad(), capture_outputs(network, paths, calls) as features:
            network(example_input.to(network_device(network)))
    finally:
        network.train(was_training)
    for path, count in calls.items():
        if count > 1:
            warnings.warn(f"{owner}{path!r} runs {count} times in one forward pass (a module used more than once): "
                          "only its last output is compared; name a module that runs once, such as its parent block",
                          stacklevel=3)
    return {path: features[path].shape for path in paths if isinstance(features.get(path), torch.Tensor)}
