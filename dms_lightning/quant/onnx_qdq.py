"""Export a fake-quantized network as a deployable INT8 QDQ ONNX model.

The TorchScript exporter turns each ``fake_quantize`` into ``QuantizeLinear → DequantizeLinear`` but keeps
weights as float initializers feeding a ``QuantizeLinear``. :func:`fold_weight_quantize` stores them as
int8 initializers feeding ``DequantizeLinear`` directly — the layout ONNX Runtime's quantizer writes, that
its QDQ fusions (``QLinearConv``, ``QGemm`` ...) and SNPE's converter expect, and 4× smaller on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from dms_lightning.export import export_onnx
from dms_lightning.quant.fake_quant import FakeQuantizer
from dms_lightning.quant.modules import QUANTIZED_LAYERS
from dms_lightning.utils.io import atomic_path

#: ONNX metadata key holding ``{initializer name: bits}`` for weights quantized below 8 bits.
NARROW_WEIGHTS_KEY = "dms_lightning.narrow_weight_bits"


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _bypass_constant_identities(model: onnx.ModelProto) -> None:
    constants = _constants(model)
    graph_outputs = {o.name for o in model.graph.output}
    for node in list(model.graph.node):
        if node.op_type == "Identity" and node.input[0] in constants and node.output[0] not in graph_outputs:
            for other in model.graph.node:
                for i, name in enumerate(other.input):
                    if name == node.output[0]:
                        other.input[i] = node.input[0]
            model.graph.node.remove(node)


def materialize_constant_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each ``Identity`` of an initializer by a copy of that initializer under the Identity's output name.

    The TorchScript exporter deduplicates equal initializers (e.g. BatchNorm-folded conv biases) behind
    ``Identity`` nodes. ONNX Runtime's quantizer then sees a conv bias that is not an initializer,
    quantizes it like an activation (uint8) and the conv can no longer fuse into ``QLinearConv``.
    """
    constants = {init.name: init for init in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    for node in list(model.graph.node):
        if node.op_type == "Identity" and node.input[0] in constants and node.output[0] not in graph_outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(constants[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
            model.graph.node.remove(node)
    _remove_unused_initializers(model)
    return model


def _remove_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for init in list(model.graph.initializer):
        if init.name not in used:
            model.graph.initializer.remove(init)
    for node in list(model.graph.node):
        if node.op_type == "Constant" and node.output[0] not in used:
            model.graph.node.remove(node)


def module_path(node_name: str) -> str:
    """The torch module path of a TorchScript-exported node name.

    ``/features/features.1/block/block.1/fc1/Conv`` → ``features.1.block.1.fc1``: each scope component
    is an attribute name, Sequential children appear as ``parent.index``.
    """
    path: list[str] = []
    for component in node_name.strip("/").split("/")[:-1]:
        if path and component.startswith(path[-1] + "."):
            path[-1] = component
        else:
            path.append(component)
    return ".".join(path)


def _weight_name(model: onnx.ModelProto, quantized_output: str, fallback: str, taken: set[str]) -> str:
    """``<module path>.weight`` for the layer consuming ``quantized_output`` through its DequantizeLinear."""
    dequantized = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0] == quantized_output]
    layers = [n for n in model.graph.node for d in dequantized if d in n.input and n.op_type != "DequantizeLinear"]
    path = module_path(layers[0].name) if len(layers) == 1 and layers[0].name.startswith("/") else ""
    name = f"{path}.weight" if path else fallback
    return fallback if name in taken else name


def fold_weight_quantize(model: onnx.ModelProto, weight_names: dict[bytes, str] | None = None
                         ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Replace ``float initializer → QuantizeLinear`` by the integer initializer it computes.

    The integer weight is named ``<torch module path>.weight_quantized`` (the exporter's folded constants
    have names like ``onnx::QuantizeLinear_88``), so encodings read ``layer1.0.conv1.weight``. The path comes
    from ``weight_names`` (float32 scale bytes → module path) when given, else from the node's scope.

    Returns the model (changed in place) and ``{integer initializer: quantized DequantizeLinear count}``.
    """
    _bypass_constant_identities(model)
    constants = _constants(model)
    folded: dict[str, int] = {}
    for node in list(model.graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in constants:
            continue
        if len(node.input) < 3 or node.input[1] not in constants or node.input[2] not in constants:
            continue
        weight, scale, zero_point = constants[node.input[0]], constants[node.input[1]], constants[node.input[2]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.size > 1:
            shape = [1] * weight.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        taken = {init.name for init in model.graph.initializer} - {node.input[0]}
        known = (weight_names or {}).get(scale.astype(np.float32).tobytes())
        base = f"{known}.weight" if known and f"{known}.weight" not in taken else \
            _weight_name(model, node.output[0], node.input[0], taken)
        info = np.iinfo(zero_point.dtype)
        # np.rint rounds half to even, like QuantizeLinear and torch.fake_quantize_*.
        values = np.clip(np.rint(weight / scale) + zero_point.astype(np.int64), info.min, info.max)
        name = f"{base}_quantized"
        model.graph.initializer.append(numpy_helper.from_array(values.astype(zero_point.dtype), name))
        for other in model.graph.node:
            for i, consumed in enumerate(other.input):
                if consumed == node.output[0]:
                    other.input[i] = name
        model.graph.node.remove(node)
        folded[name] = folded.get(name, 0) + 1
    _remove_unused_initializers(model)
    return model, folded


def _narrow_weight_bits(model: nn.Module, proto: onnx.ModelProto) -> dict[str, int]:
    """``{int8 weight initializer: bits}`` for weights fake-quantized below 8 bits (for the encodings)."""
    narrow = [q for q in model.modules() if isinstance(q, FakeQuantizer) and q.is_weight and q.spec.bits < 8]
    if not narrow:
        return {}
    bits = narrow[0].spec.bits
    # All weight quantizers share one spec, so every integer weight initializer of the graph has that width.
    return {init.name: bits for init in proto.graph.initializer
            if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(init.dims) > 1}


def export_qdq_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path,
                    metadata: dict[str, str] | None = None, opset: int = 18) -> Path:
    """Export a prepared (fake-quantized) model to ``path`` as an INT8 QDQ ONNX model, atomically.

    Example:
        >>> import torchvision, tempfile, os
        >>> from dms_lightning.quant.prepare import prepare_qat
        >>> qat = prepare_qat(torchvision.models.resnet18(num_classes=5))
        >>> _ = qat.train()(torch.randn(4, 3, 64, 64))
        >>> out = export_qdq_onnx(qat, torch.zeros(1, 3, 64, 64), os.path.join(tempfile.mkdtemp(), "q.onnx"))
    """
    path = Path(path)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        # Weight ranges follow the weights in every eager forward; refresh them after the last optimizer step.
        model(example_input.to(next(model.parameters()).device))
    try:
        with atomic_path(path) as tmp:
            float_qdq = tmp.with_name(tmp.name + ".fq.onnx")
            export_onnx(model, example_input, float_qdq, opset=opset, metadata=metadata)
            names = {layer.weight_quantizer.scale.detach().cpu().float().numpy().tobytes(): path
                     for path, layer in model.named_modules() if isinstance(layer, QUANTIZED_LAYERS)}
            proto, _ = fold_weight_quantize(onnx.load(str(float_qdq)), names)
            float_qdq.unlink()
            narrow = _narrow_weight_bits(model, proto)
            if narrow:
                entry = proto.metadata_props.add()
                entry.key, entry.value = NARROW_WEIGHTS_KEY, json.dumps(narrow)
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
    finally:
        model.train(was_training)
    return path
