"""The full-integer INT8 LiteRT / TFLite model of a fake-quantized network, with the scales QAT / PTQ chose.

Re-calibrating in the converter would give the ``.tflite`` file other scales than the INT8 QDQ ONNX and the
Qualcomm bundle's encodings, so three files would describe three integer models. Instead the fake-quant
network is rewritten into its *integer form*: every :class:`~dms_lightning.quant.fake_quant.FakeQuantizer`
becomes an explicit ``quantize → dequantize`` pair (``torch.ops.quantized_decomposed``, what a converted
PT2E graph holds) with the quantizer's own scale and zero point, every quantized conv / linear a
``dequantize(int8 weight)`` feeding the float op, with its BatchNorm folded exactly as QAT simulated it.
``litert-torch``'s static Q/DQ conversion then lowers each ``dequantize → op → quantize`` to the
integer TFLite kernel, carrying those scales.

Two kinds of tensor cannot carry a scale of ours, and each is listed (node, reason, range) in the export
log and the manifest:

* tensors our placement keeps in float because the Qualcomm targets fuse or run them in float (a conv
  output feeding hardswish, the squeeze-excitation path, a hardswish output read by a pooling op): a
  full-integer TFLite model needs every tensor in int8, so they get a min/max range over
  ``calibration`` images (run through the fake-quant network, so upstream quantization is included);
* the middle of ``hardsigmoid``, which TFLite has no kernel for. Where its input and output carry our
  grids it is written as ``MUL(1/6)`` onto the input's grid divided by 6 (the same integers: exact) and
  ``ADD(1/2)`` onto the output's grid, so the integer model rounds once, where the fake-quant network
  does. Otherwise it is ``ADD(+3, relu6)`` and ``MUL(1/6)``, and the ``[0, 6]`` middle gets that range
  (a second rounding the fake-quant network does not simulate).

TFLite's int8 kernels are signed: an unsigned (uint8) grid ``(scale, zero point z)`` is written as the
int8 grid ``(scale, z - 128)``, which holds the same real values, so scales compare one to one with the
encodings (:func:`compare_with_encodings`). Weights stay symmetric int8 with zero point 0, per channel.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from dms_lightning.quant.fake_quant import FakeQuantizer
from dms_lightning.quant.modules import QUANTIZED_LAYERS, QuantLinear
from dms_lightning.quant.observers import CalibrationConfig
from dms_lightning.quant.prepare import ObservedOutput, fused_output, range_preserving_input
from dms_lightning.quant.spec import QuantSpec

#: Input / output types of the INT8 file: float32 (a QUANTIZE / DEQUANTIZE op at each end), or integer.
IO_TYPES = ("float", "int8", "uint8")
_CALIBRATED = "calibrated at export"
_FIXED = "fixed range"
_EXACT = "exact from the input grid"
_UINT8 = QuantSpec(8, symmetric=False, per_channel=False)
_PASS_THROUGH_MODULES = (ObservedOutput, nn.Identity, nn.Dropout)
_SHAPE_METHODS = ("size", "dim", "numel")


def _quantized_decomposed():
    """``torch.ops.quantized_decomposed`` (registered by litert-torch's import of its lowerings)."""
    import litert_torch  # noqa: F401 - registers the ops and their lowerings

    return torch.ops.quantized_decomposed


class IntegerQDQ(nn.Module):
    """``quantize → dequantize`` on a fixed signed int8 grid: one int8 tensor of the TFLite model."""

    def __init__(self, scale: float, zero_point: int, quant_min: int = -128, quant_max: int = 127) -> None:
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)

    @classmethod
    def from_quantizer(cls, quantizer: FakeQuantizer, owner: str = "activation") -> IntegerQDQ:
        spec = quantizer.spec
        if spec.bits != 8:
            raise ValueError(f"the INT8 TFLite export takes 8-bit activations; {owner} is {spec.bits}-bit "
                             "(a w8a16 layer): export the W8A16 model as QDQ ONNX / the Qualcomm bundle, or "
                             "quantize that layer at 8 bits")
        quant_min, quant_max = spec.quant_range
        zero_point = int(quantizer.zero_point)
        if not spec.signed:  # uint8 (scale, z) holds the same values as int8 (scale, z - 128)
            quant_min, quant_max, zero_point = quant_min - 128, quant_max - 128, zero_point - 128
        return cls(float(quantizer.scale), zero_point, quant_min, quant_max)

    @classmethod
    def from_range(cls, low: float, high: float) -> IntegerQDQ:
        quantizer = FakeQuantizer(_UINT8)
        quantizer.set_range(low, high)
        return cls.from_quantizer(quantizer)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _quantized_decomposed()
        q = ops.quantize_per_tensor.default(x, self.scale, self.zero_point, self.quant_min, self.quant_max,
                                            torch.int8)
        return ops.dequantize_per_tensor.default(q, self.scale, self.zero_point, self.quant_min, self.quant_max,
                                                 torch.int8)


class IntegerLayer(nn.Module):
    """A quantized conv / linear as TFLite runs it: ``op(x, dequantize(int8 W), bias)``, BatchNorm folded."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        super().__init__()
        quantizer = layer.weight_quantizer
        spec = quantizer.spec
        if not spec.symmetric:
            raise ValueError(f"the INT8 TFLite export needs symmetric weights (TFLite's int8 kernels fix the "
                             f"weight zero point at 0); {name} has affine {spec.bits}-bit weights: quantize with "
                             "weight_symmetric=True")
        with torch.no_grad():
            weight, bias = layer.deploy_weight_and_bias()
            self.register_buffer("weight", weight.detach().clone())
            self.register_buffer("bias", None if bias is None else bias.detach().clone())
            scale = quantizer.scale.detach().double().reshape(-1)
            if scale.numel() == 1:
                scale = scale.expand(weight.shape[0]).clone()
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros(weight.shape[0], dtype=torch.int64))
        self.limit = spec.symmetric_limit  # TFLite's symmetric weight grid [-limit, limit]
        self.linear = isinstance(layer, QuantLinear)
        self.conv = None if self.linear else copy.deepcopy(layer.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _quantized_decomposed()
        args = (self.weight_scale, self.weight_zero_point, 0, -self.limit, self.limit, torch.int8)
        weight = ops.dequantize_per_channel.default(ops.quantize_per_channel.default(self.weight, *args), *args)
        if self.linear:
            return F.linear(x, weight, self.bias)
        return self.conv._conv_forward(x, weight, self.bias)


class _Constant(nn.Module):
    """A scalar constant as a symmetric int8 tensor (an operand of an integer ADD / MUL)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.qdq = IntegerQDQ(abs(value) / 127, 0, -127, 127)
        self.value = float(value)

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        return self.qdq(torch.full((1,), self.value, dtype=like.dtype, device=like.device))


class IntegerHardsigmoid(nn.Module):
    """``relu6(x + 3) * (1/6)`` with its ``[0, 6]`` middle tensor on the exact 6/255 grid.

    TFLite has no hardsigmoid kernel: the converter lowers it to ``ADD`` (fused relu6) and ``MUL``, and
    without a scale on the middle tensor both stay float.
    """

    def __init__(self) -> None:
        super().__init__()
        self.middle = IntegerQDQ.from_range(0.0, 6.0)
        self.three, self.sixth = _Constant(3.0), _Constant(1.0 / 6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.middle(F.relu6(x + self.three(x))) * self.sixth(x)


class ExactHardsigmoid(nn.Module):
    """``hardsigmoid(x) = x/6 + 1/2`` clipped to ``[0, 1]``, as TFLite integer ops with one rounding.

    ``MUL(x, 1/6)`` lands on ``x``'s grid with its scale divided by 6, which holds exactly ``x/6`` (the
    same integers); ``ADD(·, 1/2)`` then rounds onto the output's grid, whose saturation is the clip.
    Used only where that grid lies inside ``[0, 1]`` (:meth:`fits`), so no explicit clip is needed.
    """

    def __init__(self, input_grid: IntegerQDQ) -> None:
        super().__init__()
        self.sixth_of_input = IntegerQDQ(input_grid.scale / 6.0, input_grid.zero_point, input_grid.quant_min,
                                         input_grid.quant_max)
        self.sixth, self.one_half = _Constant(1.0 / 6.0), _Constant(0.5)

    @staticmethod
    def fits(output_grid: IntegerQDQ) -> bool:
        """Whether ``output_grid``'s saturation is hardsigmoid's clip: its lowest value 0, its highest ≤ 1."""
        low = output_grid.scale * (output_grid.quant_min - output_grid.zero_point)
        high = output_grid.scale * (output_grid.quant_max - output_grid.zero_point)
        return low == 0.0 and high <= 1.0 + output_grid.scale / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sixth_of_input(x * self.sixth(x)) + self.one_half(x)


class _RangeRecorder(nn.Module):
    """Feeds the tensors passing through to a range estimator of :mod:`dms_lightning.quant.observers`."""

    def __init__(self, estimator) -> None:
        super().__init__()
        self.estimator, self.tensor = estimator, False

    def forward(self, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            self.tensor = True
            self.estimator.observe(x)
        return x


@dataclass
class IntegerForm:
    """The integer-form network and which of its tensors do not carry a scale of the QAT / PTQ network."""

    network: nn.Module
    carried: int = 0
    exceptions: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"carried_activation_scales": self.carried, "exceptions": self.exceptions}

    def summary(self) -> dict:
        """The tensors without a scale of ours, by how they got one (for the file's metadata)."""
        out: dict = {"carried": self.carried}
        for entry in self.exceptions:
            out.setdefault(entry["source"], []).append(entry["tensor"])
        return out


def _graph_modules(model: nn.Module) -> list[fx.GraphModule]:
    return [m for m in model.modules() if isinstance(m, fx.GraphModule)
            and any(isinstance(c, QUANTIZED_LAYERS) for c in m.modules())]


def _set(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, attr = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _is_qdq(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), IntegerQDQ)


def _hardsigmoid_exception(name: str) -> dict:
    grid = IntegerQDQ.from_range(0.0, 6.0)
    return {"tensor": f"{name} (middle)", "source": _FIXED, "range": [0.0, 6.0], "scale": grid.scale,
            "zero_point": grid.zero_point,
            "reason": "TFLite lowers hardsigmoid to ADD(+3, relu6) and MUL(1/6); the middle tensor takes its "
                      "exact [0, 6] grid"}


def _exact_hardsigmoid_exception(name: str, module: ExactHardsigmoid) -> dict:
    grid = module.sixth_of_input
    return {"tensor": f"{name} (x/6)", "source": _EXACT, "range": None, "scale": grid.scale,
            "zero_point": grid.zero_point,
            "reason": "TFLite has no hardsigmoid kernel: MUL(1/6) onto the input's grid divided by 6 (the same "
                      "integers, no rounding), then ADD(1/2) onto the output's grid"}


def _hardsigmoid(gm: fx.GraphModule, node: fx.Node, label: str) -> tuple[nn.Module, dict]:
    """The integer module for hardsigmoid ``node`` and its exceptions entry: exact where the grids allow."""
    source = node.args[0]
    users = list(node.users)
    if isinstance(source, fx.Node) and _is_qdq(source, gm) and len(users) == 1 and users[0].op == "call_module":
        after = gm.get_submodule(str(users[0].target))
        if isinstance(after, FakeQuantizer) and after.spec.bits == 8 and \
                ExactHardsigmoid.fits(IntegerQDQ.from_quantizer(after)):
            module = ExactHardsigmoid(gm.get_submodule(str(source.target)))
            return module, _exact_hardsigmoid_exception(label, module)
    return IntegerHardsigmoid(), _hardsigmoid_exception(label)


def _rewrite(gm: fx.GraphModule, form: IntegerForm, calibration: CalibrationConfig) -> list[tuple[str, str]]:
    """Swap quantizers and layers for their integer modules; returns ``(recorder, node)`` for unscaled tensors."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            if node.op == "call_function" and node.target is F.hardsigmoid:
                name = f"tflite_hardsigmoid_{node.name}"
                module, exception = _hardsigmoid(gm, node, node.name)
                gm.add_module(name, module)
                node.op, node.target, node.kwargs = "call_module", name, {}
                node.args = node.args[:1]
                form.exceptions.append(exception)
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _PASS_THROUGH_MODULES):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif isinstance(module, FakeQuantizer):
            _set(gm, str(node.target), IntegerQDQ.from_quantizer(module, str(node.target)))
            form.carried += 1
        elif isinstance(module, QUANTIZED_LAYERS):
            _set(gm, str(node.target), IntegerLayer(module, str(node.target)))
        elif isinstance(module, nn.Hardsigmoid):
            replacement, exception = _hardsigmoid(gm, node, str(node.target))
            _set(gm, str(node.target), replacement)
            form.exceptions.append(exception)
    graph.lint()
    gm.recompile()
    modules = dict(gm.named_modules())
    recorders, copies = [], 0
    for node in list(graph.nodes):
        if node.op not in ("placeholder", "call_module", "call_function", "call_method") or _is_qdq(node, gm):
            continue
        if node.op == "call_method" and node.target in _SHAPE_METHODS or node.op == "call_function" and \
                node.target is getattr:
            continue
        if not node.users or any(_is_qdq(user, gm) for user in node.users) or fused_output(node, modules) is not node:
            continue  # (a layer followed by its ReLU / ReLU6: TFLite fuses the two, only the ReLU's output is int8)
        source = range_preserving_input(node, modules)
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1] if node.op == "placeholder" else node
        if source is not None and _is_qdq(source, gm):
            # max-pool / reshape of an int8 tensor: the same grid on both sides, as TFLite requires
            name, module = f"tflite_same_{node.name}", copy.deepcopy(gm.get_submodule(str(source.target)))
            copies += 1
        else:
            name, module = f"tflite_range_{node.name}", _RangeRecorder(calibration.estimator())
            recorders.append((name, node.name))
        gm.add_module(name, module)
        with graph.inserting_after(anchor):
            inserted = graph.call_module(name, (node,))
        node.replace_all_uses_with(inserted, delete_user_cb=lambda user, i=inserted: user is not i)
    form.carried += copies
    graph.lint()
    gm.recompile()
    return recorders


def integer_network(model: nn.Module, calibration: Sequence[torch.Tensor] | torch.Tensor,
                    method: CalibrationConfig | str = "minmax") -> IntegerForm:
    """The integer form of a fake-quantized ``model`` (a copy; ``model`` is not changed).

    Every activation quantizer keeps its scale and zero point; tensors the TFLite model needs in int8 but
    ``model`` keeps in float get a range from ``calibration`` (batches or one ``N × C × H × W`` tensor) by
    ``method`` (a :class:`~dms_lightning.quant.observers.CalibrationConfig` or its method name) and are listed
    in :attr:`IntegerForm.exceptions` with the reason.

    Raises:
        ValueError: ``model`` holds no fake-quantized layer, 16-bit activations, or affine weights.
    """
    network = copy.deepcopy(model).cpu().float().eval()
    graphs = _graph_modules(network)
    if not graphs:
        raise ValueError(f"{type(model).__name__} is not fake-quantized: the INT8 TFLite export takes the "
                         "network after QuantizationAwareTraining or PostTrainingQuantization")
    config = method if isinstance(method, CalibrationConfig) else CalibrationConfig(method)
    form = IntegerForm(network)
    recorders = [(gm, entry) for gm in graphs for entry in _rewrite(gm, form, config)]
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if recorders and not batches:
        raise ValueError("integer_network needs calibration images for the tensors the fake-quant network keeps "
                         "in float")
    estimators = [gm.get_submodule(name).estimator for gm, (name, _) in recorders]
    with torch.no_grad():
        for index in range(max((e.passes for e in estimators), default=1)):
            for estimator in estimators:
                estimator.start_pass(index)
            for batch in batches:
                network(batch.float())
    for gm, (name, node) in recorders:
        recorder = gm.get_submodule(name)
        if not recorder.tensor:  # not a float tensor (a shape, an index): nothing to quantize
            _set(gm, name, nn.Identity())
            continue
        low, high = recorder.estimator.range(_UINT8)
        grid = IntegerQDQ.from_range(low, high)
        _set(gm, name, grid)
        form.exceptions.append({"tensor": node, "source": _CALIBRATED,
                                "range": [round(low, 6), round(high, 6)], "scale": grid.scale,
                                "zero_point": grid.zero_point,
                                "reason": "kept in float by the QAT / PTQ placement (fused or float on the "
                                          f"Qualcomm targets); full-integer TFLite needs it in int8: {config.method} "
                                          f"range over {sum(len(b) for b in batches)} calibration images"})
    for gm in graphs:
        gm.recompile()
    return form


def static_quant_config():
    """litert-torch's switch for lowering Q/DQ pairs to integer kernels (``qdq_conversion_mode="STATIC"``).

    The converter takes it from a static PT2E quantizer configuration; nothing is re-quantized or
    re-calibrated: the graph already holds every scale.
    """
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    return QuantConfig(pt2e_quantizer=PT2EQuantizer().set_global(get_symmetric_quantization_config(
        is_per_channel=True, is_dynamic=False)))


# --- the file's input and output types -------------------------------------------------------------------------

def unpack_tflite(buffer: bytes):
    """The flatbuffer as an editable ``ModelT``, with every constant's bytes inside its buffer.

    Large files keep constants *after* the flatbuffer (``Buffer.offset`` / ``size``; ai-edge-quantizer writes
    them so); packing the object again would drop those bytes, so they are moved into ``Buffer.data`` first.
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(buffer, 0)
    for entry in model.buffers or []:
        if getattr(entry, "offset", 0) > 1 and getattr(entry, "size", 0):
            entry.data = np.frombuffer(buffer[entry.offset:entry.offset + entry.size], dtype=np.uint8)
            entry.offset, entry.size = 0, 0
    return model


def set_io_type(buffer: bytes, io: str) -> bytes:
    """``buffer`` (an int8-I/O .tflite) with ``io`` input and output: ``float`` / ``uint8`` add a QUANTIZE
    (or DEQUANTIZE) op at each end, ``int8`` leaves it as the converter wrote it."""
    if io not in IO_TYPES:
        raise ValueError(f"io={io!r} must be one of {IO_TYPES}")
    if io == "int8":
        return buffer
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = unpack_tflite(buffer)
    graph = model.subgraphs[0]
    wanted = schema.TensorType.FLOAT32 if io == "float" else schema.TensorType.UINT8

    def opcode(code: int) -> int:
        for index, entry in enumerate(model.operatorCodes):
            if max(entry.builtinCode, entry.deprecatedBuiltinCode) == code:
                return index
        entry = schema.OperatorCodeT()
        entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, code, 1
        model.operatorCodes.append(entry)
        return len(model.operatorCodes) - 1

    def twin(index: int, suffix: str) -> int:
        inner = graph.tensors[index]
        if inner.type != schema.TensorType.INT8:
            raise ValueError(f"the converted model's I/O tensor {inner.name!r} is not int8; cannot set io={io!r}")
        outer = schema.TensorT()
        outer.shape, outer.shapeSignature, outer.type = inner.shape, inner.shapeSignature, wanted
        outer.name = (inner.name.decode() if isinstance(inner.name, bytes) else inner.name) + suffix
        outer.buffer = _empty_buffer(model, schema)
        if io == "uint8":
            params = schema.QuantizationParametersT()
            params.scale = list(inner.quantization.scale)
            params.zeroPoint = [int(z) + 128 for z in inner.quantization.zeroPoint]
            outer.quantization = params
        graph.tensors.append(outer)
        return len(graph.tensors) - 1

    def operator(code: int, inputs: list[int], outputs: list[int]) -> schema.OperatorT:
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = opcode(code), inputs, outputs
        return op

    quantize, dequantize = schema.BuiltinOperator.QUANTIZE, schema.BuiltinOperator.DEQUANTIZE
    graph.inputs, graph.outputs = [int(i) for i in graph.inputs], [int(i) for i in graph.outputs]
    graph.operators, graph.tensors = list(graph.operators), list(graph.tensors)
    model.operatorCodes, model.buffers = list(model.operatorCodes), list(model.buffers)
    renamed = {}
    for position, index in enumerate(list(graph.inputs)):
        outer = twin(index, f"_{io}")
        graph.operators.insert(0, operator(quantize, [outer], [index]))
        graph.inputs[position] = renamed[index] = outer
    for position, index in enumerate(list(graph.outputs)):
        outer = twin(index, f"_{io}")
        graph.operators.append(operator(dequantize if io == "float" else quantize, [index], [outer]))
        graph.outputs[position] = renamed[index] = outer
    for signature in model.signatureDefs or []:
        for entry in list(signature.inputs or []) + list(signature.outputs or []):
            entry.tensorIndex = renamed.get(entry.tensorIndex, entry.tensorIndex)
    builder = flatbuffers.Builder(len(buffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _empty_buffer(model, schema) -> int:
    for index, entry in enumerate(model.buffers):
        if entry.data is None or len(entry.data) == 0:
            return index
    model.buffers.append(schema.BufferT())
    return len(model.buffers) - 1


# --- what the file holds ---------------------------------------------------------------------------------------

def tflite_tensors(path) -> list[dict]:
    """Every tensor of the .tflite file: name, dtype, constant or not, per-tensor / per-channel scales."""
    from ai_edge_litert import schema_py_generated as schema

    buffer = open(path, "rb").read()
    model = unpack_tflite(buffer)
    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    out = []
    for tensor in model.subgraphs[0].tensors:
        data = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
        quantization = tensor.quantization
        scales = np.asarray(quantization.scale if quantization is not None and quantization.scale is not None
                            else [], dtype=np.float64)
        zeros = np.asarray(quantization.zeroPoint if quantization is not None and quantization.zeroPoint is not None
                           else [], dtype=np.int64)
        out.append({"name": tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name,
                    "dtype": names.get(tensor.type, str(tensor.type)).lower(),
                    "constant": data is not None and len(data) > 0, "scales": scales, "zero_points": zeros})
    return out


def _operators(path) -> list[tuple[str, list[dict], list[dict]]]:
    """``(op name, input tensors, output tensors)`` of every operator of the .tflite file (absent optional inputs
    left out), read with LiteRT's reference kernels only: a file the default delegate (XNNPACK) cannot take is
    still read."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    boundary = {d["index"] for d in interpreter.get_input_details() + interpreter.get_output_details()}
    for tensor in tensors.values():
        tensor["boundary"] = tensor["index"] in boundary
    return [(op["op_name"], [tensors[i] for i in op["inputs"] if i >= 0], [tensors[i] for i in op["outputs"] if i >= 0])
            for op in interpreter._get_ops_details()]  # the interpreter's public op listing


def float_operators(path) -> list[str]:
    """Operators of the .tflite file that read or write a float32 tensor, the I/O converters excepted."""
    found = []
    for name, inputs, outputs in _operators(path):
        if name in ("QUANTIZE", "DEQUANTIZE") and any(t["boundary"] for t in inputs + outputs):
            continue
        if any(t["dtype"] == np.float32 for t in inputs + outputs):
            found.append(name)
    return found


#: XNNPACK creates an integer convolution or fully-connected operator only when every output channel's
#: requantization scale (input scale x weight scale / output scale) is below this.
XNNPACK_MAX_REQUANTIZATION = 256.0
_REQUANTIZING_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def xnnpack_refusals(path) -> list[str]:
    """The integer convolutions / fully-connected layers of a .tflite file that XNNPACK, LiteRT's default CPU
    delegate, refuses, as ``"<output tensor> (<op>, requantization scale <r>)"``; empty for a float file. Named here
    so that no process has to load the file with that delegate to find out (LiteRT 2.3 crashes on it)."""
    refused = []
    for name, inputs, outputs in _operators(path):
        if name not in _REQUANTIZING_OPS or len(inputs) < 2 or not outputs:
            continue
        data, weight, out = inputs[0], inputs[1], outputs[0]
        if out["dtype"] not in (np.int8, np.uint8):
            continue
        s_in, s_w, s_out = (np.asarray(t["quantization_parameters"]["scales"], dtype=np.float64)
                            for t in (data, weight, out))
        if not (s_in.size and s_w.size and s_out.size) or s_out[0] <= 0:
            continue
        ratio = float((s_in[0] * s_w / s_out[0]).max())
        if ratio >= XNNPACK_MAX_REQUANTIZATION:
            refused.append(f"{out['name']} ({name}, requantization scale {ratio:.4g})")
    return refused


def compare_with_encodings(path, encodings: dict, exceptions: Sequence[dict] = (), rtol: float = 1e-6) -> dict:
    """Match the .tflite file's int8 scales with ``encodings`` (any version :func:`read_encodings` reads).

    Each 8-bit activation encoding must be some int8 activation tensor's ``(scale, zero point)`` (an
    unsigned encoding's zero point shifted by -128), each weight encoding some int8 constant's per-channel
    scales, within ``rtol``. An int8 activation of the file that matches no encoding is *explained* when
    its grid is one of ``exceptions`` (:attr:`IntegerForm.exceptions`). Returns the counts, the encodings
    the file lacks and the file's unexplained tensors.
    """
    from dms_lightning.export.encodings import read_encodings

    document = read_encodings(encodings)
    tensors = [t for t in tflite_tensors(path) if t["dtype"] == "int8" and t["scales"].size]
    activations = [t for t in tensors if not t["constant"]]
    weights = [t for t in tensors if t["constant"]]

    def close(a: np.ndarray, b: np.ndarray) -> bool:
        return a.shape == b.shape and bool(np.all(np.abs(a - b) <= rtol * np.abs(b)))

    matched_tensors: set[int] = set()
    missing_activations, missing_weights = [], []
    for name, entries in document["activation_encodings"].items():
        entry = entries[0]
        if int(entry["bitwidth"]) != 8:
            missing_activations.append(name)
            continue
        scale = np.asarray([float(entry["scale"])])
        zero = -int(entry["offset"]) - (0 if str(entry["is_symmetric"]) == "True" else 128)
        hits = [i for i, t in enumerate(activations) if close(t["scales"], scale) and int(t["zero_points"][0]) == zero]
        if hits:
            matched_tensors.update(hits)
        else:
            missing_activations.append(name)
    for name, entries in document["param_encodings"].items():
        scale = np.asarray([float(e["scale"]) for e in entries])
        if not any(close(t["scales"] if t["scales"].size > 1 else np.repeat(t["scales"], scale.size), scale)
                   for t in weights):
            missing_weights.append(name)
    unmatched = [t for i, t in enumerate(activations) if i not in matched_tensors]
    unexplained = [t["name"] for t in unmatched if not any(
        close(t["scales"], np.asarray([float(e["scale"])])) and int(t["zero_points"][0]) == int(e["zero_point"])
        for e in exceptions)]
    return {"activation_encodings": len(document["activation_encodings"]),
            "weight_encodings": len(document["param_encodings"]),
            "activation_encodings_missing": missing_activations, "weight_encodings_missing": missing_weights,
            "tflite_activations": len(activations), "tflite_activations_not_in_encodings": len(unmatched),
            "tflite_activations_unexplained": unexplained}
