"""QuantizeLinear/DequantizeLinear graphs: detect them, strip them into a float graph + encodings, fix the batch.

SNPE and QNN take a quantized network as two files: a float ONNX graph and an AIMET-style encodings
JSON keyed by the tensor names *of that float graph* (``--quantization_overrides``). :func:`strip_qdq`
produces exactly that pair from a QDQ model (ours from QAT fake-quant, or ONNX Runtime's PTQ output):
every Q→DQ pair is removed and its scale / zero-point becomes the encoding of the tensor it quantized;
weights are replaced by their dequantized values, which lie on the quantization grid, so the SDK's
re-quantization with ``--override_params`` reproduces the trained integers exactly.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

#: Metadata key (written by ``dms_lightning.quant``) with ``{integer weight initializer: bits}`` below 8 bits.
NARROW_WEIGHTS_KEY = "dms_lightning.narrow_weight_bits"

# Core torch fake-quant ops, the ones that export to QuantizeLinear/DequantizeLinear.
_FAKE_QUANT_FUNCTIONS = (
    "fake_quantize_per_tensor_affine",
    "fake_quantize_per_channel_affine",
    "_fake_quantize_learnable_per_tensor_affine",
    "_fake_quantize_learnable_per_channel_affine",
)

_BITWIDTH = {
    onnx.TensorProto.UINT8: (8, False), onnx.TensorProto.INT8: (8, True),
    onnx.TensorProto.UINT16: (16, False), onnx.TensorProto.INT16: (16, True),
    onnx.TensorProto.INT32: (32, True),
}
for _name, _bits, _signed in (("UINT4", 4, False), ("INT4", 4, True)):
    if hasattr(onnx.TensorProto, _name):
        _BITWIDTH[getattr(onnx.TensorProto, _name)] = (_bits, _signed)


def has_qdq(model: onnx.ModelProto) -> bool:
    """True when the graph holds QuantizeLinear or DequantizeLinear nodes (an INT8 QDQ model)."""
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


@contextlib.contextmanager
def fake_quant_disabled() -> Iterator[None]:
    """Make torch's fake-quant ops the identity inside the block: the float twin of a QAT network.

    Used to export and parity-check the FP32 graph of a model that carries fake-quant modules. A
    module that calls another quantization primitive is not affected; callers check the exported
    graph with :func:`has_qdq`.
    """
    originals = {name: getattr(torch, name) for name in _FAKE_QUANT_FUNCTIONS if hasattr(torch, name)}

    def identity(x, *args, **kwargs):
        return x

    try:
        for name in originals:
            setattr(torch, name, identity)
        yield
    finally:
        for name, function in originals.items():
            setattr(torch, name, function)


def make_static_batch(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """A copy of ``model`` whose first input/output dimension is ``batch`` and every shape is re-inferred.

    SNPE / QNN converters (and ``snpe-dlc-quantize``) need static shapes with batch 1.
    """
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for value in list(static.graph.input) + list(static.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    del static.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(static, strict_mode=False)


@dataclass
class StrippedQDQ:
    """The float graph of a QDQ model and the encodings of the tensors its Q/DQ pairs quantized.

    Attributes:
        model: float ONNX graph without QuantizeLinear/DequantizeLinear.
        activation_encodings: ``{tensor name: [encoding]}`` for activations (graph inputs included).
        param_encodings: ``{initializer name: [encoding per channel or one]}`` for weights.
        quantized_tensors: every tensor of ``model`` that the QDQ graph quantized (the coverage target).
    """

    model: onnx.ModelProto
    activation_encodings: dict[str, list[dict]] = field(default_factory=dict)
    param_encodings: dict[str, list[dict]] = field(default_factory=dict)
    quantized_tensors: list[str] = field(default_factory=list)

    @property
    def encodings(self) -> dict:
        """The AIMET / SNPE ``--quantization_overrides`` JSON document."""
        return {"activation_encodings": self.activation_encodings, "param_encodings": self.param_encodings}


def encoding_entries(scale: np.ndarray, zero_point: np.ndarray, elem_type: int,
                     bitwidth: int | None = None) -> list[dict]:
    """AIMET-style encodings (one per channel) for ONNX ``scale`` / ``zero_point`` of ``elem_type``.

    SNPE/QNN write ``real = scale * (q + offset)`` with ``q`` unsigned in ``[0, 2**bitwidth - 1]``, so a
    signed ONNX zero-point ``z`` maps to ``offset = -(z + 2**(bitwidth-1))`` and an unsigned one to ``-z``.
    ``bitwidth`` overrides the container width (4-bit weights stored in int8).
    """
    if elem_type not in _BITWIDTH:
        raise ValueError(f"zero-point type {onnx.TensorProto.DataType.Name(elem_type)} has no SNPE encoding")
    container_bits, signed = _BITWIDTH[elem_type]
    bitwidth = bitwidth or container_bits
    scales = np.atleast_1d(np.asarray(scale, dtype=np.float64))
    points = np.broadcast_to(np.atleast_1d(np.asarray(zero_point, dtype=np.int64)), scales.shape)
    entries = []
    for s, z in zip(scales, points):
        unsigned_zero = int(z) + (2 ** (bitwidth - 1) if signed else 0)
        offset = -unsigned_zero
        entries.append({
            "bitwidth": bitwidth,
            "dtype": "int",
            # Symmetric when the producer chose a signed grid centred on zero; a uint8 grid whose zero
            # point happens to be 128 is still an affine (asymmetric) activation encoding.
            "is_symmetric": str(bool(signed and int(z) == 0)),
            "max": float(s * (2 ** bitwidth - 1 + offset)),
            "min": float(s * offset),
            "offset": offset,
            "scale": float(s),
        })
    return entries


def strip_qdq(model: onnx.ModelProto) -> StrippedQDQ:
    """Remove every Q/DQ pair of ``model``; return the float graph and the encodings keyed by its tensor names.

    * ``x → Q → DQ → consumers`` with ``x`` an activation: consumers read ``x``; ``x`` gets an activation
      encoding (when ``DQ`` feeds a graph output, an Identity keeps the output name).
    * ``w → Q → DQ`` or an integer initializer ``→ DQ`` (weights): replaced by a float initializer holding
      the dequantized values, named like the original weight, with a param encoding. INT32 biases become
      float without an encoding (the SDKs quantize biases themselves, ``--bias_bitwidth 32``).
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    metadata = {prop.key: prop.value for prop in work.metadata_props}
    narrow_bits = json.loads(metadata.get(NARROW_WEIGHTS_KEY, "{}"))
    constants = _constant_tensors(graph)
    producers = {out: node for node in graph.node for out in node.output}
    dq_nodes = [node for node in graph.node if node.op_type == "DequantizeLinear"]
    wanted = set()
    for dq in dq_nodes:
        wanted.update(name for name in dq.input[1:] if name)
        if dq.input[0] in constants or _q_input(producers, dq) in constants:
            wanted.add(dq.output[0])
    values = _evaluate(work, sorted(wanted & constants | {dq.output[0] for dq in dq_nodes if dq.output[0] in wanted}))

    graph_outputs = {value.name for value in graph.output}
    result = StrippedQDQ(work)
    renames: dict[str, str] = {}
    new_nodes = []
    new_initializers: dict[str, np.ndarray] = {}
    pending_params: list[tuple[str, str, list[dict]]] = []  # (placeholder, preferred name, encodings)
    activation_pairs: list[tuple[str, list[dict]]] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":  # a QuantizeLinear left without readers is pruned below
            new_nodes.append(node)
            continue
        scale = _lookup(values, graph, node.input[1])
        zero_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        zero = _lookup(values, graph, zero_name) if zero_name else np.zeros((), np.uint8)
        elem_type = _elem_type(zero)
        source = _q_input(producers, node)
        is_weight = node.input[0] in constants or (source is not None and source in constants)
        if is_weight:
            placeholder = node.output[0]
            new_initializers[placeholder] = values[placeholder].astype(np.float32)
            if elem_type == onnx.TensorProto.INT32:
                continue  # a bias: float, no encoding
            preferred = source if source is not None else node.input[0].removesuffix("_quantized")
            bits = narrow_bits.get(node.input[0]) or narrow_bits.get(source or "")
            pending_params.append((placeholder, preferred, encoding_entries(scale, zero, elem_type, bits)))
            continue
        if source is None:
            raise ValueError(f"DequantizeLinear {node.name!r} reads {node.input[0]!r}, which is neither a "
                             "QuantizeLinear output nor a constant: not a QDQ graph this tool understands")
        activation_pairs.append((source, encoding_entries(scale, zero, elem_type)))
        if node.output[0] in graph_outputs:
            new_nodes.append(helper.make_node("Identity", [source], [node.output[0]], name=f"{node.name}_float"))
        else:
            renames[node.output[0]] = source

    def resolve(name: str) -> str:
        while name in renames:
            name = renames[name]
        return name

    for node in new_nodes:
        for i, name in enumerate(node.input):
            node.input[i] = resolve(name)
    # A tensor quantized twice in a row (Q→DQ→Q→DQ, e.g. around an eval-mode Dropout) keeps the outer grid.
    for source, entries in activation_pairs:
        result.activation_encodings[resolve(source)] = entries
    del graph.node[:]
    graph.node.extend(new_nodes)
    for name, array in new_initializers.items():
        graph.initializer.append(numpy_helper.from_array(array, name))
    _prune(graph)
    _keep_orphans_check(graph)

    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    existing = {init.name for init in graph.initializer} | {out for node in graph.node for out in node.output}
    for placeholder, preferred, entries in pending_params:
        name = placeholder
        if preferred and preferred != placeholder and preferred not in used and preferred not in existing:
            _rename_initializer(graph, placeholder, preferred)
            name = preferred
            used.add(name)
            existing.add(name)
        result.param_encodings[name] = entries
    result.quantized_tensors = list(result.activation_encodings) + list(result.param_encodings)
    live = {value.name for value in graph.value_info} & existing
    kept = [value for value in graph.value_info if value.name in live]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    onnx.checker.check_model(work)
    return result


def _q_input(producers: dict, dq: onnx.NodeProto) -> str | None:
    producer = producers.get(dq.input[0])
    return producer.input[0] if producer is not None and producer.op_type == "QuantizeLinear" else None


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors computable without any graph input: initializers, Constant outputs and what only they feed."""
    constant = {init.name for init in graph.initializer}
    constant -= {value.name for value in graph.input}
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(not n or n in constant for n in node.input)):
            constant.update(node.output)
    return constant


def _evaluate(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Values of constant tensors ``names``, computed by ONNX Runtime on the constant subgraph alone."""
    if not names:
        return {}
    import onnxruntime as ort

    constants = _constant_tensors(model.graph)
    nodes = [node for node in model.graph.node
             if node.op_type == "Constant" or (node.input and all(not n or n in constants for n in node.input))]
    sub = helper.make_graph(nodes, "constants", [], [helper.make_empty_tensor_value_info(n) for n in names],
                            initializer=list(model.graph.initializer))
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    options = ort.SessionOptions()
    # Unoptimised: the values must be those the graph computes, not ones rewritten by fusions.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(sub_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {})
    return dict(zip(names, (np.asarray(v) for v in outputs)))


def _lookup(values: dict[str, np.ndarray], graph: onnx.GraphProto, name: str) -> np.ndarray:
    return values[name] if name in values else _value_of(graph, name)


def _value_of(graph: onnx.GraphProto, name: str) -> np.ndarray:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise ValueError(f"quantization parameter {name!r} is not a constant of the graph")


def _elem_type(array: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers nothing reads (the scale arithmetic of removed Q/DQ pairs)."""
    needed = {value.name for value in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(n for n in node.input if n)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _keep_orphans_check(graph: onnx.GraphProto) -> None:
    leftovers = [node.name or node.op_type for node in graph.node if node.op_type in QDQ_OPS]
    if leftovers:
        raise ValueError(f"Q/DQ nodes {leftovers} remain after stripping: a QuantizeLinear whose output is read "
                         "by something other than a DequantizeLinear is not supported")


def _rename_initializer(graph: onnx.GraphProto, old: str, new: str) -> None:
    for init in graph.initializer:
        if init.name == old:
            init.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
