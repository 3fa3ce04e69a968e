"""Static facts of an ONNX graph: parameter count, multiply-accumulates and numeric precision.

Counted from the file alone, so a report row can be checked against any other tool. Quantized graphs
count like their float originals: an INT8 QDQ convolution has the parameters and MACs of the FP32 one
(the weight is stored in 8 bits, the arithmetic is the same), and the scales and zero points of the
quantizers are bookkeeping, not parameters.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto

log = logging.getLogger(__name__)

# Inputs that carry data (weights, biases, activations) rather than quantization scales / zero points,
# per quantized operator. Any other input of these operators is quantizer bookkeeping.
_QUANT_DATA_INPUTS: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (0,),
    "DequantizeLinear": (0,),
    "DynamicQuantizeLinear": (0,),
    "QLinearConv": (0, 3, 8),
    "QLinearMatMul": (0, 3),
    "QGemm": (0, 3, 6),
    "ConvInteger": (0, 1),
    "MatMulInteger": (0, 1),
    "DynamicQuantizeMatMul": (0, 1, 4),
    "MatMulIntegerToFloat": (0, 1, 6),
    "QLinearAdd": (0, 3),
    "QLinearMul": (0, 3),
    "QLinearConcat": (),
}

# Integer types that only ever hold shapes, axes and indices in our graphs; never learned weights.
_NON_WEIGHT_TYPES = {TensorProto.INT64, TensorProto.BOOL, TensorProto.STRING}

_QUANTIZED_STORAGE = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}


def _is_quant_op(op_type: str) -> bool:
    return op_type in _QUANT_DATA_INPUTS or op_type.startswith("QLinear")


def _numel(dims) -> int:
    return int(np.prod([int(d) for d in dims], dtype=np.int64)) if len(dims) else 1


def weight_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The initializers that hold learned weights: float and quantized (int8 / int32 bias) tensors.

    Leaves out shape constants (int64) and quantizer scales and zero points.
    """
    consumers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            consumers[name].append((node.op_type, position))
    weights = []
    for init in model.graph.initializer:
        if init.data_type in _NON_WEIGHT_TYPES:
            continue
        uses = consumers.get(init.name, [])
        quantizer_only = bool(uses) and all(
            _is_quant_op(op) and position not in _QUANT_DATA_INPUTS.get(op, (0, 3)) for op, position in uses)
        if not quantizer_only:
            weights.append(init)
    return weights


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of weight elements stored in the graph's initializers (see :func:`weight_initializers`).

    A QDQ INT8 export has the parameter count of its FP32 source. BatchNorm folded into convolutions by
    the exporter is no longer there to count: a conv followed by BN has ``out_channels`` bias elements
    instead of the BN's ``2 × channels`` parameters.
    """
    return sum(_numel(init.dims) for init in weight_initializers(model))


def quantized_weight_fraction(model: onnx.ModelProto) -> float:
    """Fraction of the parameters stored in 8 bits or fewer (1.0 for a fully quantized graph, biases aside)."""
    weights = weight_initializers(model)
    total = sum(_numel(init.dims) for init in weights)
    quantized = sum(_numel(init.dims) for init in weights if init.data_type in _QUANTIZED_STORAGE)
    return quantized / total if total else 0.0


def detect_precision(model: onnx.ModelProto) -> str:
    """``"int8"`` for a statically quantized graph, ``"int8_dynamic"``, ``"fp16"`` or ``"fp32"``."""
    ops = {node.op_type for node in model.graph.node}
    if "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops or "MatMulIntegerToFloat" in ops:
        return "int8_dynamic"
    if ops & {"QuantizeLinear", "DequantizeLinear"} or any(op.startswith("QLinear") for op in ops):
        return "int8"
    if any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer):
        return "fp16"
    return "fp32"


def _with_batch(model: onnx.ModelProto, batch_size: int) -> onnx.ModelProto:
    """A copy of ``model`` whose symbolic leading input dimension is fixed to ``batch_size``."""
    fixed = copy.deepcopy(model)
    initializers = {init.name for init in fixed.graph.initializer}
    for graph_input in fixed.graph.input:
        if graph_input.name in initializers:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch_size
    return fixed


def tensor_shapes(model: onnx.ModelProto, batch_size: int = 1) -> dict[str, list[int | None]]:
    """Every tensor's shape after ONNX shape inference with the batch dimension fixed (``None``: unknown)."""
    inferred = onnx.shape_inference.infer_shapes(_with_batch(model, batch_size), data_prop=True)
    shapes: dict[str, list[int | None]] = {}
    graph = inferred.graph
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            continue
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None
                             for d in info.type.tensor_type.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    return shapes


def _known(shape) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _node_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    """Multiply-accumulates of one node, or ``None`` if its shapes are unknown; 0 for other operators."""
    op = node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    output = shapes.get(node.output[0]) if node.output else None
    if op in ("Conv", "FusedConv", "ConvInteger", "QLinearConv"):
        weight = shapes.get(node.input[3 if op == "QLinearConv" else 1])
        if not (_known(weight) and _known(output)):
            return None
        # Each output element is a dot product over (in_channels / groups) × kernel elements.
        return _numel(output) * _numel(weight[1:])
    if op == "ConvTranspose":
        data, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not (_known(data) and _known(weight)):
            return None
        return _numel(data) * _numel(weight[1:])
    if op in ("Gemm", "FusedGemm", "QGemm"):
        a = shapes.get(node.input[0])
        if not (_known(a) and _known(output)) or len(a) != 2:
            return None
        inner = a[0] if attrs.get("transA", 0) else a[1]
        return _numel(output) * inner
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
        a = shapes.get(node.input[0])
        if not (_known(a) and _known(output)) or not a:
            return None
        return _numel(output) * a[-1]
    return 0


def count_onnx_macs(model: onnx.ModelProto, batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass at ``batch_size`` (Conv, ConvTranspose, Gemm, MatMul).

    Quantized operators (QLinearConv, QDQ-wrapped Conv, MatMulInteger ...) count their float-equivalent
    MACs. Element-wise operators, pooling and activations are not counted, as in the usual FLOPs tables.
    Nodes whose shapes cannot be inferred are skipped with a warning naming them.
    """
    shapes = tensor_shapes(model, batch_size)
    total, unknown = 0, []
    for node in model.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            unknown.append(node.name or node.op_type)
        else:
            total += macs
    if unknown:
        log.warning("MACs of %d node(s) are not counted because their shapes are unknown: %s", len(unknown),
                    unknown[:5])
    return total
