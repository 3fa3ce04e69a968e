"""Quantized compute layers: Conv2d (with BatchNorm folded in), Linear.

Each wraps the *original* layer objects, so parameters keep their identity: the optimizer, DDP's gradient
buckets and any reference a user holds stay valid when QAT starts mid-run, and the float network can be
recovered unchanged (:func:`dms_lightning.quant.prepare.float_model`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dms_lightning.quant.fake_quant import FakeQuantizer
from dms_lightning.quant.spec import QuantSpec


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``conv → bn`` as one conv, using the BatchNorm running statistics.

    ``w' = w · γ/σ`` and ``b' = β + (b − μ) · γ/σ`` with ``σ = sqrt(running_var + eps)``; differentiable in
    ``w``, ``b``, ``γ`` and ``β`` (so a frozen-BN QAT still trains the affine parameters).
    """
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    conv_bias = bias if bias is not None else torch.zeros_like(std)
    folded_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    return folded_weight, beta + (conv_bias - bn.running_mean) * factor


class _BiasOffsetMixin(nn.Module):
    """Optional offsets of the deployed weight and bias, set by the weight-side PTQ algorithms.

    ``bias_offset`` (per output channel, bias correction) is added to the deployed bias; ``weight_offset`` (the
    weight's shape, AdaRound) to the deployed (BatchNorm-folded) weight, moving each value onto the grid point
    its learned rounding chose. Both are registered only by :func:`set_bias_offset` / :func:`set_weight_offset`,
    so a network without them has the state dict it always had; a checkpoint that carries one registers it on
    load into a freshly prepared twin. ``apply_offsets = False`` (set by the float simulation) leaves both out:
    they belong to the INT8 model, not to the float network it is measured against.
    """

    apply_offsets: bool = True

    def _offset_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        offset = getattr(self, "bias_offset", None)
        if offset is None or not self.apply_offsets:
            return bias
        return offset if bias is None else bias + offset

    def _offset_weight(self, weight: torch.Tensor) -> torch.Tensor:
        offset = getattr(self, "weight_offset", None)
        return weight if offset is None or not self.apply_offsets else weight + offset

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's signature
        for name in ("bias_offset", "weight_offset"):
            key = prefix + name
            if key in state_dict and name not in self._buffers:
                self.register_buffer(name, torch.zeros_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _set_offset(layer: nn.Module, name: str, offset: torch.Tensor) -> None:
    if name in layer._buffers:
        layer.get_buffer(name).copy_(offset)
    else:
        layer.register_buffer(name, offset.clone())


def set_bias_offset(layer: nn.Module, offset: torch.Tensor) -> None:
    """Set (registering it the first time) the offset a quantized layer adds to its deployed bias."""
    if not isinstance(layer, _BiasOffsetMixin):
        raise TypeError(f"{type(layer).__name__} is not a quantized conv / linear layer")
    weight, _ = layer.deploy_weight_and_bias()
    offset = offset.detach().to(device=weight.device, dtype=weight.dtype).reshape(-1)
    if offset.numel() != weight.shape[0]:
        raise ValueError(f"bias offset has {offset.numel()} values; the layer has {weight.shape[0]} output channels")
    _set_offset(layer, "bias_offset", offset)


def set_weight_offset(layer: nn.Module, offset: torch.Tensor) -> None:
    """Set (registering it the first time) the offset a quantized layer adds to its deployed weight."""
    if not isinstance(layer, _BiasOffsetMixin):
        raise TypeError(f"{type(layer).__name__} is not a quantized conv / linear layer")
    weight, _ = layer.deploy_weight_and_bias()
    offset = offset.detach().to(device=weight.device, dtype=weight.dtype)
    if offset.shape != weight.shape:
        raise ValueError(f"weight offset has shape {tuple(offset.shape)}; the layer's weight {tuple(weight.shape)}")
    _set_offset(layer, "weight_offset", offset)


class QuantConv2d(_BiasOffsetMixin):
    """``Conv2d`` with fake-quantized weights (per output channel by default)."""

    def __init__(self, conv: nn.Conv2d, weight_spec: QuantSpec) -> None:
        super().__init__()
        self.conv = conv
        self.weight_quantizer = FakeQuantizer(weight_spec, conv.out_channels, is_weight=True)

    def deploy_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._offset_weight(self.conv.weight), self._offset_bias(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.deploy_weight_and_bias()
        return self.conv._conv_forward(x, self.weight_quantizer(weight), bias)


class QuantConvBn2d(_BiasOffsetMixin):
    """``Conv2d → BatchNorm2d`` simulated as the single folded conv an integer runtime executes.

    While BatchNorm is live (training, before ``freeze_bn``) the folded weight is quantized with the
    running statistics and the conv output is rescaled so BatchNorm still normalises with *batch*
    statistics and keeps updating its running ones (Jacob et al. 2018, "Quantization and Training of
    Neural Networks for Efficient Integer-Arithmetic-Only Inference", section 3.2). Once frozen, and in
    eval mode, the forward is exactly ``conv(x, Q(w'), b')``: what is exported and deployed.
    """

    bn_frozen: torch.Tensor

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight_spec: QuantSpec) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn
        self.weight_quantizer = FakeQuantizer(weight_spec, conv.out_channels, is_weight=True)
        self.register_buffer("bn_frozen", torch.tensor(False))

    def deploy_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = fold_batch_norm(self.conv.weight, self.conv.bias, self.bn)
        return self._offset_weight(weight), self._offset_bias(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or bool(self.bn_frozen):
            weight, bias = self.deploy_weight_and_bias()
            return self.conv._conv_forward(x, self.weight_quantizer(weight), bias)
        std = torch.sqrt(self.bn.running_var + self.bn.eps)
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(std)
        factor = gamma / std
        # A zero gamma (e.g. a channel switched off by sparsity) must not divide by zero below.
        safe = torch.where(factor.abs() > 1e-12, factor, torch.ones_like(factor))
        folded = self._offset_weight(self.conv.weight * factor.reshape(-1, 1, 1, 1))
        y = self.conv._conv_forward(x, self.weight_quantizer(folded), None) / safe.reshape(1, -1, 1, 1)
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(1, -1, 1, 1)
        y = self.bn(y)
        offset = getattr(self, "bias_offset", None)
        return y if offset is None else y + offset.reshape(1, -1, 1, 1)


class QuantLinear(_BiasOffsetMixin):
    """``Linear`` with fake-quantized weights (per output feature by default)."""

    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec) -> None:
        super().__init__()
        self.linear = linear
        self.weight_quantizer = FakeQuantizer(weight_spec, linear.out_features, is_weight=True)

    def deploy_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._offset_weight(self.linear.weight), self._offset_bias(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.deploy_weight_and_bias()
        return F.linear(x, self.weight_quantizer(weight), bias)


QUANTIZED_LAYERS = (QuantConv2d, QuantConvBn2d, QuantLinear)


class ChannelClamp(nn.Module):
    """``min(max(x, 0), upper[c])``: a ReLU6 whose channels cross-layer equalization rescaled.

    Equalization divides channel ``c`` of a ReLU6's input by ``s[c]``; since ``relu6(x) / s = min(max(x / s, 0),
    6 / s)``, the ReLU6 becomes this clamp with ``upper = 6 / s`` and the network computes exactly what it did.
    It exports as ``Relu`` + ``Min`` with a ``[C, 1, 1]`` constant (TFLite ``RELU`` + ``MINIMUM``, QNN
    ``ElementWiseMinimum``), and quantization treats it like the ReLU6 it replaces: fused into the layer before
    it, one quantizer after it.

    Example:
        >>> clamp = ChannelClamp(torch.tensor([6.0, 3.0]))
        >>> clamp(torch.tensor([[[[-1.0]], [[5.0]]]])).flatten().tolist()
        [0.0, 3.0]
    """

    def __init__(self, upper: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("upper", upper.detach().reshape(-1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.minimum(F.relu(x), self.upper)

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}"


def set_batch_norm_frozen(model: nn.Module, frozen: bool) -> None:
    """Switch every folded BatchNorm of ``model`` to running statistics (``True``) or batch statistics."""
    for module in model.modules():
        if isinstance(module, QuantConvBn2d):
            module.bn_frozen.fill_(frozen)
