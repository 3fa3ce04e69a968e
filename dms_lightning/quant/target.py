"""Swap the compression target of a LightningModule for its fake-quantized twin (and back)."""

from __future__ import annotations

from torch import nn

from dms_lightning.quant.prepare import QuantizationConfig, float_model, is_quantized, prepare_qat, quantizable_layers
from dms_lightning.utils.checkpoint import compression_target


def _slots(pl_module: nn.Module, config: QuantizationConfig | None) -> list[tuple[nn.Module, str]]:
    """``(parent, attribute)`` pairs holding the network(s) to quantize.

    The compression target (``pl_module.model`` for our modules) is one slot. A plain LightningModule
    without ``compression_target`` is its own target and cannot replace itself, so each child holding
    quantizable (or already quantized) layers is a slot.
    """
    target = compression_target(pl_module)
    if target is not pl_module:
        for parent in pl_module.modules():
            for name, child in parent.named_children():
                if child is target:
                    return [(parent, name)]
        raise ValueError(f"{type(pl_module).__name__}.compression_target is not a submodule of the LightningModule; "
                         "return a module stored as an attribute (e.g. self.model)")
    return [(pl_module, name) for name, child in pl_module.named_children()
            if is_quantized(child) or (config is not None and quantizable_layers(child, config))]


def target_quantizable_layers(pl_module: nn.Module, config: QuantizationConfig) -> list[str]:
    """Names of the layers QAT would quantize in ``pl_module``'s compression target."""
    return [f"{name}.{layer}" for parent, name in _slots(pl_module, config)
            for layer in quantizable_layers(getattr(parent, name), config)]


def target_is_quantized(pl_module: nn.Module) -> bool:
    return is_quantized(compression_target(pl_module))


def quantize_target(pl_module: nn.Module, config: QuantizationConfig) -> list[str]:
    """Replace the compression target by its fake-quantized twin in place; returns the replaced attributes."""
    replaced = []
    for parent, name in _slots(pl_module, config):
        child = getattr(parent, name)
        if is_quantized(child):
            continue
        setattr(parent, name, prepare_qat(child, config))
        replaced.append(name)
    if not replaced and not target_is_quantized(pl_module):
        raise ValueError(f"{type(pl_module).__name__} has no quantizable layer (Conv2d / Linear) in its compression "
                         f"target under the quantization config {config.to_dict()}")
    return replaced


def dequantize_target(pl_module: nn.Module) -> None:
    """Put the float network back (it shares the parameters, so the current weights are kept)."""
    for parent, name in _slots(pl_module, None):
        child = getattr(parent, name)
        original = float_model(child)
        if original is None:
            raise ValueError(f"{name} is quantized but its float network is unknown; rebuild the module instead")
        setattr(parent, name, original)
