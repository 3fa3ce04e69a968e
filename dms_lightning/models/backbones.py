"""Torchvision backbones for DMS classification: any input channels, any classes, local weights only.

:func:`build_backbone` returns a plain ``nn.Module`` mapping ``N × C × H × W`` images to logits. It is
an ordinary torchvision model with two surgical changes: the first convolution is rebuilt for
``in_channels`` (with pretrained 3-channel weights summed over RGB, the usual way to start a grayscale
NIR model from ImageNet weights) and the classifier is replaced for ``num_classes``, optionally by the
classic DMS head (features → Linear 128 → ReLU → Dropout → Linear). Nothing is ever downloaded:
``weights`` is a path to a local ``state_dict`` / checkpoint file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import nn

from dms_lightning.utils.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

#: Backbones that are tested and documented; any other torchvision classification model name also works.
SUPPORTED_BACKBONES: tuple[str, ...] = (
    "mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2", "resnet18", "resnet34", "resnet50",
    "efficientnet_b0", "shufflenet_v2_x1_0", "shufflenet_v2_x0_5", "regnet_x_400mf", "regnet_y_400mf",
    "mnasnet0_5", "resnext50_32x4d",
)

Head = Literal["torchvision", "dms"]
Activation = Literal["default", "relu"]

#: The activations ``activation="relu"`` replaces (MobileNetV3's hard-swish, EfficientNet's SiLU / swish).
SMOOTH_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.Hardswish, nn.SiLU)


class DMSHead(nn.Sequential):
    """The classic DMS classifier head on pooled features: Linear → ReLU → Dropout → Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, dropout: float = 0.2) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def available_backbones() -> list[str]:
    """Every torchvision classification model name."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _classifier_slot(model: nn.Module) -> tuple[str, nn.Linear]:
    """The attribute holding the final classifier, and its last Linear layer."""
    for attr in ("fc", "classifier", "head", "heads"):
        module = getattr(model, attr, None)
        if module is None:
            continue
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)] if not isinstance(module, nn.Linear) \
            else [module]
        if linears:
            return attr, linears[-1]
    raise ValueError(f"cannot find the classifier of {type(model).__name__}: it has no fc/classifier Linear layer; "
                     f"use one of {list(SUPPORTED_BACKBONES)}")


def _replace_head(model: nn.Module, name: str, num_classes: int, head: Head, hidden: int, dropout: float) -> None:
    attr, last = _classifier_slot(model)
    module = getattr(model, attr)
    if head == "torchvision":
        new_last = nn.Linear(last.in_features, num_classes)
        if module is last:
            setattr(model, attr, new_last)
        else:
            parent_name, _, child = [n for n, m in module.named_modules() if m is last][0].rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, new_last)
        return
    # DMS head: replace the whole torchvision classifier, keeping what precedes the first Linear
    # (ConvNeXt's LayerNorm + Flatten), so pooled features go straight into our head.
    if isinstance(module, nn.Sequential):
        prefix = []
        for child in module:
            if isinstance(child, nn.Linear):
                break
            if not isinstance(child, nn.Dropout):
                prefix.append(child)
        first = next(m for m in module if isinstance(m, nn.Linear))
        setattr(model, attr, nn.Sequential(*prefix, DMSHead(first.in_features, num_classes, hidden, dropout)))
    else:
        setattr(model, attr, DMSHead(last.in_features, num_classes, hidden, dropout))


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to in_channels={in_channels}")
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        # Summing RGB filters keeps the response to a gray image equal to the RGB model's response.
        summed = conv.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(summed.repeat(1, in_channels, 1, 1) / in_channels if in_channels != 1 else summed)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.pt`` file or a Lightning ``.ckpt`` (``model.``/``student.`` prefixes dropped)."""
    obj = load_checkpoint(path, "weights", hint="Pretrained weights are read from a local file only (nothing is "
                          "downloaded): save e.g. torchvision's ImageNet state_dict there first.")
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"weights={str(path)!r} holds a {type(obj).__name__}, not a state_dict")
    for prefix in ("model.", "student.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def build_backbone(
    name: str = "mobilenet_v3_small",
    num_classes: int = 5,
    in_channels: int = 1,
    head: Head = "dms",
    head_hidden: int = 128,
    dropout: float = 0.2,
    weights: str | None = None,
    bn_momentum: float | None = None,
    zero_init_residual: bool | None = None,
    activation: Activation = "default",
) -> nn.Module:
    """A torchvision classifier for ``in_channels``-channel images and ``num_classes`` classes.

    Args:
        name: a torchvision model name, e.g. ``"mobilenet_v3_small"`` or ``"resnet18"``.
        num_classes: number of output logits.
        in_channels: 1 for grayscale / NIR cameras, 3 for RGB.
        head: ``"dms"`` for Linear(head_hidden) → ReLU → Dropout → Linear, ``"torchvision"`` for the
            model's own classifier with its last layer resized.
        weights: optional local file with weights for the torchvision architecture (ImageNet 3-channel
            weights are fine: the first conv is adapted after loading and the classifier is skipped).
        bn_momentum: if given, the momentum of every BatchNorm's running statistics. torchvision's
            MobileNet/EfficientNet/MnasNet use 0.01 (tuned for 600-epoch ImageNet runs): in a run of a few
            hundred steps the running statistics lag the weights and evaluation collapses to chance;
            0.1 (PyTorch's default, and ResNet's) suits short runs.
        zero_init_residual: start residual blocks as the identity (:func:`zero_init_residual_branches`):
            ``True`` every additive residual block, ``False`` none (torchvision's initialisation), ``None``
            (default) the inverted residuals of MobileNet / EfficientNet / MnasNet only.
        activation: ``"default"`` keeps the architecture's activations; ``"relu"`` replaces every hard-swish
            and SiLU by ReLU (:func:`use_relu`), as the edge variants MobileNetV3-minimalistic and
            EfficientNet-Lite do. The squeeze-excitation gates keep their hard-sigmoid.

    Example:
        >>> model = build_backbone("resnet18", num_classes=5, in_channels=1)
        >>> model(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 5])
    """
    valid = available_backbones()
    if name not in valid:
        raise ValueError(f"backbone={name!r} is not a torchvision classification model; tested choices: "
                         f"{list(SUPPORTED_BACKBONES)} (all valid names: torchvision.models.list_models())")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels={in_channels!r} must be 1 or 3")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be at least 2")
    if head not in ("dms", "torchvision"):
        raise ValueError(f"head={head!r} must be 'dms' or 'torchvision'")
    if activation not in ("default", "relu"):
        raise ValueError(f"activation={activation!r} must be 'default' (the architecture's own) or 'relu' "
                         "(hard-swish and SiLU replaced by ReLU)")
    if bn_momentum is not None and not 0.0 < bn_momentum <= 1.0:
        raise ValueError(f"bn_momentum={bn_momentum!r} must be in (0, 1], or None to keep torchvision's value")
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if activation == "relu" and not use_relu(model):
        raise ValueError(f"activation='relu': backbone={name!r} has no hard-swish or SiLU to replace; "
                         "use activation='default'")
    if zero_init_residual is None or zero_init_residual:
        zero_init_residual_branches(model, inverted_only=zero_init_residual is None)
    if weights is not None:
        _load_matching(model, load_state_dict_file(weights), weights)
    _adapt_first_conv(model, in_channels)
    _replace_head(model, name, num_classes, head, head_hidden, dropout)
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    return model


def use_relu(model: nn.Module) -> int:
    """Replace every hard-swish and SiLU of ``model`` by ReLU, in place; returns how many were replaced.

    MobileNetV3's hard-swish ``x · relu6(x + 3) / 6`` has no integer kernel in ONNX Runtime (nor on many
    NPUs): in an INT8 graph each one runs in float between a dequantize and a quantize, and on a small
    MobileNetV3 at low resolution those round trips make the INT8 model slower than the FP32 one, whose
    convolutions fuse the activation. With ReLU the activation folds into the integer convolution's output
    range. Measured on MobileNetV3-small, 96 px, ONNX Runtime, 1 thread (AVX-512 VNNI CPU): INT8 1.02x the FP32
    latency with hard-swish, 0.81x with ReLU (the cpu_x86 target, ``benchmarks/results/cpu_targets.md``). Google's
    MobileNetV3-minimalistic and EfficientNet-Lite make the same change for edge accelerators.
    """
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SMOOTH_ACTIVATIONS):
                setattr(module, name, nn.ReLU(inplace=True))
                count += 1
    return count


def _residual_branch_norm(block: nn.Module, inverted_only: bool) -> nn.BatchNorm2d | None:
    """The BatchNorm that closes the residual branch of a torchvision block, ``None`` for any other module."""
    from torchvision.models import efficientnet, mnasnet, mobilenetv2, mobilenetv3, resnet

    if isinstance(block, resnet.BasicBlock) and not inverted_only:
        return block.bn2
    if isinstance(block, resnet.Bottleneck) and not inverted_only:
        return block.bn3
    if isinstance(block, (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual, efficientnet.MBConv,
                          efficientnet.FusedMBConv, mnasnet._InvertedResidual)):
        if not getattr(block, "use_res_connect", getattr(block, "apply_residual", False)):
            return None
        branch = getattr(block, "block", None) or getattr(block, "conv", None) or block.layers
        norms = [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)]
        return norms[-1] if norms else None
    return None


def zero_init_residual_branches(model: nn.Module, inverted_only: bool = False) -> int:
    """Zero the scale of the last BatchNorm of every residual branch, so each block starts as the identity.

    Goyal et al. (2017), "Accurate, Large Minibatch SGD", section 5.1 (torchvision's ResNet option
    ``zero_init_residual``), here for MobileNet / EfficientNet / MnasNet inverted residuals too. A network
    built this way starts as a shallow one and deepens as the branches learn; on few optimizer steps it
    trains markedly faster. Measured on 150 synthetic DMS images (64 px, 15 epochs), the distilled
    MobileNetV3-small student: 41.8 % → 50.5 % top-1 (3 seeds); the ResNet-18 teacher lost (71.4 % → 63.4 %,
    one seed), hence ``inverted_only``: MobileNet / EfficientNet / MnasNet inverted residuals only, the
    default of :func:`build_backbone`. Returns the number of blocks changed (0 for architectures without
    additive residuals, e.g. ShuffleNet).
    """
    count = 0
    for module in model.modules():
        norm = _residual_branch_norm(module, inverted_only)
        if norm is not None and norm.weight is not None:
            with torch.no_grad():
                norm.weight.zero_()
            count += 1
    return count


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor whose name and shape match; a mismatching classifier is expected and skipped."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # 1-channel weights for a 3-channel first conv: expand so adaptation back to 1 channel is exact.
    for k, v in state.items():
        if k in own and k not in usable and v.ndim == 4 and own[k].ndim == 4 and v.shape[1] == 1 \
                and own[k].shape[1] == 3 and v.shape[0] == own[k].shape[0]:
            usable[k] = v.repeat(1, 3, 1, 1) / 3
    if not usable:
        raise ValueError(f"weights={source!r} share no tensor with {type(model).__name__}: is it for another "
                         "architecture?")
    model.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    log.info("loaded %d tensors from %s; kept initial values for %d (e.g. %s)", len(usable), source,
             len(skipped), skipped[:3])
