"""Swap the compression target of a LightningModule for its fake-quantized twin (and back)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from dms_lightning.quant.equalization import EqualizationResult, replace_relu6
from dms_lightning.quant.prepare import (
    QuantizationConfig,
    float_model,
    graph_input_quantizers,
    is_quantized,
    prepare_qat,
    quantizable_layers,
    trace_for_quantization,
)
from dms_lightning.utils.checkpoint import QUANTIZER_WRAPPING, ArchitectureChange
from dms_lightning.utils.compression import compression_target, feature_layers


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


def check_target_quantizable(pl_module: nn.Module, config: QuantizationConfig, owner: str) -> None:
    """Raise (naming ``owner``) when ``config`` selects no layer of the target or ``torch.fx`` cannot trace it.

    Called in ``setup``: quantizer wrapping happens at QAT's ``start_epoch`` or when ``fit`` ends (PTQ), so a
    network that cannot be wrapped must fail before training, not after it.
    """
    if target_is_quantized(pl_module):
        return
    if not target_quantizable_layers(pl_module, config):
        raise MisconfigurationException(
            f"{owner} found no quantizable layer (Conv2d / Linear) in {type(compression_target(pl_module)).__name__} "
            f"with include={list(config.include)}, exclude={list(config.exclude)}, "
            f"quantize_depthwise={config.quantize_depthwise}, quantize_linear={config.quantize_linear}")
    for parent, name in _slots(pl_module, config):
        try:
            trace_for_quantization(getattr(parent, name))
        except ValueError as err:
            raise MisconfigurationException(f"{owner} cannot quantize {type(pl_module).__name__}.{name}: {err}") \
                from err


def target_is_quantized(pl_module: nn.Module) -> bool:
    return is_quantized(compression_target(pl_module))


def quantize_target(pl_module: nn.Module, config: QuantizationConfig) -> list[str]:
    """Replace the compression target by its fake-quantized twin in place; returns the replaced attributes."""
    replaced = []
    slots = _slots(pl_module, config)
    observed = feature_layers(pl_module)
    # Feature-layer names are relative to the compression target; a plain module's slots are its children.
    per_child = compression_target(pl_module) is pl_module
    for parent, name in slots:
        child = getattr(parent, name)
        if is_quantized(child):
            continue
        inside = [path[len(name) + 1:] for path in observed if path.startswith(name + ".")] if per_child else observed
        setattr(parent, name, prepare_qat(child, config, observed_modules=inside))
        replaced.append(name)
    if not replaced and not target_is_quantized(pl_module):
        raise ValueError(f"{type(pl_module).__name__} has no quantizable layer (Conv2d / Linear) in its compression "
                         f"target under the quantization config {config.to_dict()}")
    return replaced


def datamodule_input_values(trainer: Trainer) -> torch.Tensor | None:
    """The discrete values the run's network input takes (``datamodule.input_values()``), when the datamodule says."""
    method = getattr(getattr(trainer, "datamodule", None), "input_values", None)
    return method() if callable(method) else None


def set_input_values(pl_module: nn.Module, values: torch.Tensor | None) -> int:
    """Give the quantizers of the target's inputs the values their input takes, so no value sits on a rounding tie.

    Returns the number of quantizers set; ranges already calibrated are recomputed.
    """
    if values is None:
        return 0
    quantizers = [q for parent, name in _slots(pl_module, None) for q in graph_input_quantizers(getattr(parent, name))]
    for quantizer in quantizers:
        quantizer.exact_values = values
        if bool(quantizer.initialized):
            quantizer.update_qparams()
    return len(quantizers)


def dequantize_target(pl_module: nn.Module) -> None:
    """Put the float network back (it shares the parameters, so the current weights are kept)."""
    for parent, name in _slots(pl_module, None):
        child = getattr(parent, name)
        original = float_model(child)
        if original is None:
            raise ValueError(f"{name} is quantized but its float network is unknown; rebuild the module instead")
        setattr(parent, name, original)


class QuantizerWrapping(ArchitectureChange):
    """The compression target replaced by its fake-quantized twin (re-applied after channel removal).

    The record says whether quantization was active when the checkpoint was saved and with which
    :class:`~dms_lightning.quant.QuantizationConfig`. A checkpoint from before QAT started (e.g. the one
    ``test(ckpt_path="best")`` chose) puts an already quantized module back to float.
    """

    record_key = "quantization"
    order = QUANTIZER_WRAPPING

    @classmethod
    def record(cls, pl_module: nn.Module, config: QuantizationConfig,
               equalization: EqualizationResult | None = None) -> dict:
        record = {"active": target_is_quantized(pl_module), "config": config.to_dict()}
        if equalization is not None and equalization.relu6_replaced:  # by cross-layer equalization, before PTQ
            record.update(relu6_replaced=list(equalization.relu6_replaced), relu6_mode=equalization.relu6_mode,
                          relu6_channels=list(equalization.relu6_channels))
        return record

    @classmethod
    def restore(cls, pl_module: nn.Module, record: Mapping) -> None:
        if record.get("active") and not target_is_quantized(pl_module):
            replace_relu6(compression_target(pl_module), record.get("relu6_replaced", ()),
                          record.get("relu6_mode", "relu"), record.get("relu6_channels"))
            quantize_target(pl_module, QuantizationConfig.from_dict(record["config"]))
        elif not record.get("active") and target_is_quantized(pl_module):
            dequantize_target(pl_module)
