"""The one home of QuantizeLinear/DequantizeLinear (QDQ) graphs: write them from a fake-quant network, detect
them, strip them into a float graph + encodings, fix the batch.

Writing. The TorchScript exporter turns each ``torch.fake_quantize_*`` into ``QuantizeLinear →
DequantizeLinear`` but keeps weights as float initializers feeding a ``QuantizeLinear``.
:func:`export_qdq_onnx` stores them as integer initializers feeding ``DequantizeLinear`` directly (the layout
ONNX Runtime's quantizer writes, that its QDQ fusions ``QLinearConv`` / ``QGemm`` and SNPE's converter
expect, 4x smaller), named after the torch layer that owns them. The layer is found by *name*: a weight's
``QuantizeLinear`` reads its scale from the layer's ``weight_quantizer.scale`` buffer, exported as its own
initializer under that name (equal values are not merged), so two layers whose scales happen to be equal stay
two layers.

Reading. SNPE and QNN take a quantized network as two files: a float ONNX graph and an AIMET-style encodings
JSON keyed by the tensor names *of that float graph* (``--quantization_overrides``). :func:`strip_qdq`
produces exactly that pair from a QDQ model (ours, or ONNX Runtime's PTQ output): every Q→DQ pair is removed
and its scale / zero-point becomes the encoding of the tensor it quantized; weights are replaced by their
dequantized values, which lie on the quantization grid, so the SDK's re-quantization with
``--override_params`` reproduces the trained integers exactly.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.overrides import TorchFunctionMode

from dms_lightning.export.onnx_export import DEFAULT_OPSET, export_onnx
from dms_lightning.export.runtimes import ort_session
from dms_lightning.quant.fake_quant import FakeQuantizer
from dms_lightning.quant.modules import QUANTIZED_LAYERS
from dms_lightning.utils.io import atomic_path

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

#: Layout of the in-memory encodings document (``StrippedQDQ.encodings``): AIMET's format 0.6.1, sections keyed by
#: tensor name. :func:`~dms_lightning.export.encodings.write_encodings` writes it in the format version asked for.
DOCUMENT_VERSION = "0.6.1"

#: Metadata key of a QDQ model with ``{integer weight initializer: bits}`` for weights below 8 bits (their
#: container is int8, or int4 for 4 bits and fewer; the encodings carry the real width).
NARROW_WEIGHTS_KEY = "dms_lightning.narrow_weight_bits"

# Core torch fake-quant ops, the ones that export to QuantizeLinear/DequantizeLinear.
_FAKE_QUANT_FUNCTIONS = tuple(getattr(torch, name) for name in (
    "fake_quantize_per_tensor_affine",
    "fake_quantize_per_channel_affine",
    "_fake_quantize_learnable_per_tensor_affine",
    "_fake_quantize_learnable_per_channel_affine",
) if hasattr(torch, name))

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


class _FakeQuantBypass(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FAKE_QUANT_FUNCTIONS:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_quant_disabled() -> Iterator[None]:
    """Make torch's fake-quant ops the identity inside the block: the float twin of a fake-quant network.

    A ``TorchFunctionMode``, so it holds only for code run inside the block on this thread (eager forwards and
    the exporter's trace alike) and changes no attribute of ``torch``; it covers our ``FakeQuantizer`` modules
    and a user's own calls to ``torch.fake_quantize_*``. A module that quantizes with other primitives is not
    affected; callers check the exported graph with :func:`has_qdq`.
    """
    with _FakeQuantBypass():
        yield


def export_qdq_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, *,
                    metadata: dict[str, str] | None = None, opset: int = DEFAULT_OPSET,
                    exporter: str = "torchscript", dynamic_batch: bool = True, int4_weights: bool = True) -> Path:
    """Export a fake-quantized ``model`` to ``path`` as an INT8 QDQ ONNX model, atomically.

    Weights become integer initializers ``<torch layer path>.weight_quantized`` feeding DequantizeLinear; weights
    fake-quantized below 8 bits are listed under :data:`NARROW_WEIGHTS_KEY` in the metadata. Weights of 4 bits
    or fewer are stored as real ``int4`` / ``uint4`` (two per byte, opset 21: :func:`pack_int4_weights`) unless
    ``int4_weights=False``, which keeps them in int8 containers for runtimes without 4-bit DequantizeLinear. With
    ``dynamic_batch=False`` the batch is fixed to 1 and every shape inferred (what SNPE / QNN converters need).

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
            try:
                export_onnx(model, example_input, float_qdq, opset=opset, metadata=metadata, exporter=exporter,
                            distinct_initializers=True)
                proto, folded = fold_weight_quantize(onnx.load(str(float_qdq)), weight_layers(model))
            finally:
                float_qdq.unlink(missing_ok=True)
            proto = widen_activation_qdq(proto, wide_activations(model))
            narrow = {name: bits for name, bits in folded.items() if bits < 8}
            if int4_weights:
                proto = pack_int4_weights(proto, narrow)
            if narrow:
                entry = proto.metadata_props.add()
                entry.key, entry.value = NARROW_WEIGHTS_KEY, json.dumps(narrow)
            if not dynamic_batch:
                proto = make_static_batch(proto)
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
    finally:
        model.train(was_training)
    return path


def weight_layers(model: nn.Module) -> dict[str, tuple[str, int]]:
    """``{name of a weight quantizer's scale buffer: (torch layer path, weight bits)}`` of a fake-quant model.

    The exporter names a buffer initializer by its module path, so this is how a weight ``QuantizeLinear`` is
    traced back to the layer it belongs to.
    """
    layers = {}
    for layer_path, layer in model.named_modules():
        if isinstance(layer, QUANTIZED_LAYERS):
            quantizer = layer.weight_quantizer
            prefix = f"{layer_path}." if layer_path else ""
            layers[f"{prefix}weight_quantizer.scale"] = (layer_path, quantizer.spec.bits)
    for quantizer_path, quantizer in model.named_modules():
        if isinstance(quantizer, FakeQuantizer) and quantizer.is_weight and f"{quantizer_path}.scale" not in layers:
            layer_path = quantizer_path.rpartition(".")[0]
            layers[f"{quantizer_path}.scale"] = (layer_path, quantizer.spec.bits)
    return layers


#: The first standard opset whose QuantizeLinear / DequantizeLinear take uint16 / int16 (16-bit activations)
#: and int4 / uint4 (4-bit weights).
WIDE_QDQ_OPSET = 21


def wide_activations(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """``{name of a 16-bit activation quantizer's scale buffer: (zero point, signed)}`` of a fake-quant model."""
    return {f"{path}.scale": (int(quantizer.zero_point), quantizer.spec.signed)
            for path, quantizer in model.named_modules()
            if isinstance(quantizer, FakeQuantizer) and not quantizer.is_weight and quantizer.spec.bits > 8}


def widen_activation_qdq(model: onnx.ModelProto, wide: dict[str, tuple[int, bool]]) -> onnx.ModelProto:
    """Give the Q/DQ pairs of 16-bit activation quantizers their uint16 / int16 zero point (opset 21).

    The exporter traced them as 8-bit pairs with the right scale (:class:`FakeQuantizer` does so while tracing);
    the pair is found by its scale initializer, named after the quantizer's ``scale`` buffer. Opsets 19–21
    only widen the types of the ops the exporter writes, so the model's default-domain opset is raised to 21.
    """
    if not wide:
        return model
    taken = {init.name for init in model.graph.initializer}
    zero_points: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 2 or node.input[1] not in wide:
            continue
        scale = node.input[1]
        if scale not in zero_points:
            value, signed = wide[scale]
            name = _unique(scale.removesuffix(".scale") + ".zero_point", taken)
            taken.add(name)
            model.graph.initializer.append(numpy_helper.from_array(
                np.array(value, dtype=np.int16 if signed else np.uint16), name))
            zero_points[scale] = name
        if len(node.input) < 3:
            node.input.append(zero_points[scale])
        else:
            node.input[2] = zero_points[scale]
    missing = sorted(set(wide) - set(zero_points))
    if missing:
        raise ValueError(f"16-bit activation quantizers {missing} have no QuantizeLinear reading their scale in the "
                         "exported graph: their 16-bit grid cannot be written")
    _raise_opset(model, WIDE_QDQ_OPSET)
    _prune(model.graph)
    return model


def _raise_opset(model: onnx.ModelProto, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < version:
            opset.version = version
    model.ir_version = max(model.ir_version, 10)  # IR 10 is the first that allows opset 21


def _int4_tensor(values: np.ndarray, name: str, signed: bool) -> onnx.TensorProto:
    """``values`` as an ``INT4`` / ``UINT4`` initializer, packed two per byte (low nibble first)."""
    flat = values.astype(np.int64).reshape(-1)
    low, high = (-8, 7) if signed else (0, 15)
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(f"{name}: values {int(flat.min())}..{int(flat.max())} do not fit a "
                         f"{'signed' if signed else 'unsigned'} 4-bit integer")
    nibbles = (np.append(flat, 0) if flat.size % 2 else flat) & 0x0F
    tensor = onnx.TensorProto()
    tensor.name, tensor.data_type = name, onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    tensor.dims.extend(values.shape)
    tensor.raw_data = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    return tensor


def pack_int4_weights(model: onnx.ModelProto, narrow: dict[str, int]) -> onnx.ModelProto:
    """Store the integer weights of ``narrow`` (``{initializer: bits}``) with 4 bits or fewer as ``int4``.

    Each such initializer and the zero point of every DequantizeLinear reading it become ``INT4`` (``UINT4``
    for unsigned containers), so the file holds half a byte per weight; the default-domain opset is raised
    to 21, the first whose DequantizeLinear takes 4-bit inputs. The values, and so the model's outputs, do
    not change. ``model`` is changed in place and returned.
    """
    packed = {name for name, bits in narrow.items() if bits <= 4}
    if not packed:
        return model
    initializers = {init.name: init for init in model.graph.initializer}
    readers = [node for node in model.graph.node if node.op_type == "DequantizeLinear" and node.input[0] in packed]
    taken = set(initializers)
    for node in readers:
        if len(node.input) < 3 or node.input[2] not in initializers:
            raise ValueError(f"DequantizeLinear {node.name!r} of the 4-bit weight {node.input[0]!r} has no zero-point "
                             "initializer: cannot store it as int4")
        zero = numpy_helper.to_array(initializers[node.input[2]])
        name = _unique(f"{node.input[0]}.zero_point_int4", taken)
        taken.add(name)
        model.graph.initializer.append(_int4_tensor(zero, name, signed=zero.dtype.kind == "i"))
        node.input[2] = name
    for name in packed & set(initializers):
        values = numpy_helper.to_array(initializers[name])
        initializers[name].CopyFrom(_int4_tensor(values, name, signed=values.dtype.kind == "i"))
    _raise_opset(model, WIDE_QDQ_OPSET)
    _prune(model.graph)
    return model


def fold_weight_quantize(model: onnx.ModelProto, layers: dict[str, tuple[str, int]] | None = None
                         ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Replace ``float initializer → QuantizeLinear`` by the integer initializer it computes.

    The integer weight is named ``<torch layer path>.weight_quantized`` (the exporter's folded constants have
    names like ``onnx::QuantizeLinear_88``), so encodings read ``layer1.0.conv1.weight``. The layer comes from
    ``layers`` (:func:`weight_layers`: the scale buffer's name → layer path and bits); a weight whose scale
    is not a known buffer (a user's own ``fake_quantize`` call) is named after the node's scope, or keeps the
    exporter's name.

    Returns the model (changed in place) and ``{integer initializer: bits}``.
    """
    layers = layers or {}
    _constant_identities(model, materialize=False)
    constants = _constant_values(model.graph)
    folded: dict[str, int] = {}
    taken = {init.name for init in model.graph.initializer}
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
        layer_path, bits = layers.get(node.input[1], (None, 8))
        base = f"{layer_path}.weight" if layer_path else _scope_weight_name(model, node) or node.input[0]
        name = _unique(f"{base}_quantized", taken)
        taken.add(name)
        info = np.iinfo(zero_point.dtype)
        # np.rint rounds half to even, like QuantizeLinear and torch.fake_quantize_*.
        values = np.clip(np.rint(weight / scale) + zero_point.astype(np.int64), info.min, info.max)
        model.graph.initializer.append(numpy_helper.from_array(values.astype(zero_point.dtype), name))
        for other in model.graph.node:
            for i, consumed in enumerate(other.input):
                if consumed == node.output[0]:
                    other.input[i] = name
        model.graph.node.remove(node)
        folded[name] = bits
    _prune(model.graph)
    return model, folded


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    index = 1
    while f"{name}_{index}" in taken:
        index += 1
    return f"{name}_{index}"


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


def _scope_weight_name(model: onnx.ModelProto, quantize: onnx.NodeProto) -> str | None:
    """``<module path>.weight`` of the one layer reading ``quantize`` through its DequantizeLinear, if any."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0] == quantize.output[0]}
    layers = [n for n in model.graph.node if n.op_type != "DequantizeLinear" and dequantized & set(n.input)]
    path = module_path(layers[0].name) if len(layers) == 1 and layers[0].name.startswith("/") else ""
    return f"{path}.weight" if path else None


def materialize_constant_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each ``Identity`` of an initializer by a copy of that initializer under the Identity's output name.

    The TorchScript exporter deduplicates equal initializers (e.g. BatchNorm-folded conv biases) behind
    ``Identity`` nodes. ONNX Runtime's quantizer then sees a conv bias that is not an initializer,
    quantizes it like an activation (uint8) and the conv can no longer fuse into ``QLinearConv``.
    """
    _constant_identities(model, materialize=True)
    _prune(model.graph)
    return model


def _constant_identities(model: onnx.ModelProto, materialize: bool) -> None:
    """Remove ``Identity`` nodes of initializers: readers read the initializer (or, ``materialize``, a copy)."""
    initializers = {init.name: init for init in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    for node in list(model.graph.node):
        if node.op_type != "Identity" or node.input[0] not in initializers or node.output[0] in graph_outputs:
            continue
        if materialize:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            for other in model.graph.node:
                for i, name in enumerate(other.input):
                    if name == node.output[0]:
                        other.input[i] = node.input[0]
        model.graph.node.remove(node)


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
        """The AIMET / SNPE ``--quantization_overrides`` JSON document (the one format every producer writes)."""
        return {"version": DOCUMENT_VERSION, "activation_encodings": self.activation_encodings,
                "param_encodings": self.param_encodings}


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
    stored = {init.name: init for init in model.graph.initializer}
    # Initializers are read as stored (ONNX Runtime cannot hand back an int4 tensor); the rest is computed.
    values = {name: numpy_helper.to_array(stored[name]) for name in names if name in stored}
    names = [name for name in names if name not in stored]
    if not names:
        return values
    constants = _constant_tensors(model.graph)
    nodes = [node for node in model.graph.node
             if node.op_type == "Constant" or (node.input and all(not n or n in constants for n in node.input))]
    sub = helper.make_graph(nodes, "constants", [], [helper.make_empty_tensor_value_info(n) for n in names],
                            initializer=list(model.graph.initializer))
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    # Unoptimised: the values must be those the graph computes, not ones rewritten by fusions.
    session = ort_session(sub_model, optimize=False)
    outputs = session.run(None, {})
    return {**values, **dict(zip(names, (np.asarray(v) for v in outputs)))}


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of the initializers and ``Constant`` nodes of ``graph``."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _lookup(values: dict[str, np.ndarray], graph: onnx.GraphProto, name: str) -> np.ndarray:
    if name in values:
        return values[name]
    constants = _constant_values(graph)
    if name not in constants:
        raise ValueError(f"quantization parameter {name!r} is not a constant of the graph")
    return constants[name]


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
