"""prepare_qat: rewrite a float network into its fake-quantized twin with torch.fx.

The network is traced once with ``torch.fx`` (the graph only, not torch's deprecated FX quantization) and rewritten:

1. every selected ``Conv2d`` becomes :class:`QuantConvBn2d` when a ``BatchNorm2d`` is its only consumer
   (the BatchNorm is folded into it) or :class:`QuantConv2d`; every selected ``Linear`` a :class:`QuantLinear`;
2. an activation :class:`FakeQuantizer` is placed on exactly the tensors an integer runtime keeps in int8:
   the input of every quantized layer, its output *after* a following ReLU / ReLU6 (ONNX Runtime folds
   those into ``QLinearConv``; SNPE fuses them too), and the output of a residual ``add`` whose inputs
   are all int8 (``QLinearAdd``). Max-pool / flatten / reshape between two int8 tensors reuse the
   quantizer of their input, because runtimes only keep them in int8 when both sides share one scale.

Tensors around other float ops (hardswish, hardsigmoid, the squeeze-excitation multiply) are quantized
only where a quantized layer consumes or produces them; exclude layers to keep whole regions in float.
Graph tracing (rather than wrapping modules) is what makes residual adds, a ReLU module used twice
(torchvision ResNet) and forwards with several inputs or keyword arguments (Lightning #7926, #15862) work.
"""

from __future__ import annotations

import fnmatch
import operator
import os
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from dms_lightning.quant.fake_quant import FakeQuantizer, set_observers_enabled
from dms_lightning.quant.modules import (
    QUANTIZED_LAYERS,
    ChannelClamp,
    QuantConv2d,
    QuantConvBn2d,
    QuantLinear,
    set_batch_norm_frozen,
)
from dms_lightning.quant.spec import QuantSpec, activation_spec, parse_precision, weight_spec
from dms_lightning.utils.compression import FLOAT_NETWORK_ATTR, FloatNetworkRef, wrapped_float_network

# GraphModule.__deepcopy__ and pickling keep only attributes listed here (torch.fx's user-preserved attributes).
_PRESERVED_KEY = "_user_preserved_attributes"
ACTIVATION_QUANTIZERS = "activation_quantizers"

_FUSABLE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, ChannelClamp)
# Elementwise activations that run in float right after a float conv / BatchNorm (ONNX Runtime fuses ReLU, Clip,
# HardSigmoid into its float conv; the others run beside it): no integer op reads the tensor between them.
_FLOAT_FUSED_ACTIVATIONS = _FUSABLE_ACTIVATIONS + (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh,
                                                   nn.LeakyReLU, nn.GELU)
_FUSABLE_FUNCTIONS = (F.relu, torch.relu, F.relu6)
_RANGE_PRESERVING_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_RANGE_PRESERVING_FUNCTIONS = (torch.flatten, F.max_pool2d, torch.reshape)
_RANGE_PRESERVING_METHODS = ("flatten", "reshape", "view", "contiguous")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_SHAPE_METHODS = ("size", "dim", "numel")
#: ``QuantizationConfig.placement`` values.
PLACEMENTS = ("fused", "every_tensor")


@dataclass(frozen=True)
class QuantizationConfig:
    """What is quantized and how.

    Args:
        weight: grid of conv / linear weights (default int8 symmetric per channel).
        activation: grid of activations (default uint8 affine per tensor).
        quantize_depthwise: quantize depthwise convolutions (``groups == in_channels``).
        quantize_linear: quantize ``Linear`` layers.
        exclude: ``fnmatch`` patterns of module names kept in float, e.g. ``"features.*.block.2.*"``.
        include: if given, only layers matching one of these ``fnmatch`` patterns are quantized (then
            ``exclude`` and ``quantize_depthwise`` still apply), e.g. ``["classifier.*"]``.
        precision: per-layer precision overrides, ``{fnmatch pattern: "w8a16" | "w8a8" | "w4a8" | ... |
            "float"}`` (a mapping, or pairs in order); the last matching pattern wins. ``w8a16`` keeps the
            layer's weights at 8 bits and quantizes its input and output activations to 16 bits (what Hexagon
            HTP runs); a tensor shared with a neighbouring 8-bit layer takes the wider grid. ``float`` keeps the
            layer unquantized, like ``exclude``.
        min_integer_reduction: spatial convs (kernel larger than 1x1) without groups whose dot products are
            shorter than this (``in_channels x kernel height x kernel width``) stay in float; 0: every conv is
            quantized. A 3x3 image stem reduces over 9 (grayscale / IR camera) or 27 (RGB) values, too few for
            integer GEMM kernels: ONNX Runtime's ``QLinearConv`` ran such a stem about 2x slower than the float
            conv, while a 3x3 conv over 8 channels (72) and ResNet-18's 7x7 stem (49) were faster in integer
            (``benchmarks/results/cpu_targets.md``). The ``cpu_x86`` target sets 32.
        placement: which activations carry a quantizer. ``"fused"`` (default): the tensors an integer runtime
            that fuses a layer with its ReLU keeps in int8 (see the module docstring; ONNX Runtime, and the
            Qualcomm bundle's encodings, whose SDK quantizes the rest itself). ``"every_tensor"``: also every
            other tensor between two ops (a conv output feeding hardswish, the squeeze-excitation path, each
            residual add), as full-integer TFLite and NPU delegates run them, so QAT trains with, and the
            INT8 ``.tflite`` carries, a learned scale everywhere.

    Example:
        >>> config = QuantizationConfig(precision={"features.0.*": "w8a16", "classifier.*": "float"})
        >>> config.layer_bits("features.0.0"), config.layer_bits("features.1.0"), config.layer_bits("classifier.3")
        ((8, 16), (8, 8), None)
    """

    weight: QuantSpec = QuantSpec(8, symmetric=True, per_channel=True)
    activation: QuantSpec = QuantSpec(8, symmetric=False, per_channel=False)
    quantize_depthwise: bool = True
    quantize_linear: bool = True
    exclude: tuple[str, ...] = field(default_factory=tuple)
    include: tuple[str, ...] = field(default_factory=tuple)
    precision: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    placement: str = "fused"
    min_integer_reduction: int = 0

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r} must be one of {list(PLACEMENTS)}")
        if isinstance(self.min_integer_reduction, bool) or not isinstance(self.min_integer_reduction, int) or \
                self.min_integer_reduction < 0:
            raise ValueError(f"min_integer_reduction={self.min_integer_reduction!r} must be an integer >= 0 (0: every "
                             "conv is quantized)")
        pairs = tuple(self.precision.items()) if isinstance(self.precision, Mapping) else tuple(
            tuple(pair) for pair in self.precision)
        for pair in pairs:
            if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
                raise ValueError(f"precision={self.precision!r} must map layer-name patterns to precisions, "
                                 "e.g. {'features.0.*': 'w8a16'}")
            parse_precision(pair[1], f"precision[{pair[0]!r}]")
        object.__setattr__(self, "precision", pairs)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["exclude"], out["include"] = list(self.exclude), list(self.include)
        out["precision"] = dict(self.precision)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> QuantizationConfig:
        w, a = data["weight"], data["activation"]
        return cls(weight=weight_spec(w["bits"], w["symmetric"], w["per_channel"]),
                   activation=activation_spec(a["bits"], a["symmetric"]),
                   quantize_depthwise=data.get("quantize_depthwise", True),
                   quantize_linear=data.get("quantize_linear", True), exclude=tuple(data.get("exclude", ())),
                   include=tuple(data.get("include", ())), precision=data.get("precision", {}),
                   placement=data.get("placement", "fused"),
                   min_integer_reduction=data.get("min_integer_reduction", 0))

    def layer_bits(self, name: str) -> tuple[int, int] | None:
        """``(weight bits, activation bits)`` of layer ``name`` (its override, else the defaults); ``None``: float."""
        for pattern, precision in reversed(self.precision):
            if fnmatch.fnmatchcase(name, pattern):
                return parse_precision(precision)
        return self.weight.bits, self.activation.bits

    def weight_spec_for(self, name: str) -> QuantSpec:
        bits = self.layer_bits(name)
        return self.weight if bits is None or bits[0] == self.weight.bits else replace(self.weight, bits=bits[0])

    def activation_spec_for(self, name: str) -> QuantSpec:
        bits = self.layer_bits(name)
        return self.activation if bits is None or bits[1] == self.activation.bits else replace(
            self.activation, bits=bits[1])

    def selects(self, name: str, module: nn.Module) -> bool:
        """Whether layer ``name`` is quantized under this config."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude) or self.layer_bits(name) is None:
            return False
        if self.include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.include):
            return False
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            if module.groups == 1 and kernel > 1 and module.in_channels * kernel < self.min_integer_reduction:
                return False
            depthwise = module.groups > 1 and module.groups == module.in_channels
            return self.quantize_depthwise or not depthwise
        return isinstance(module, nn.Linear) and self.quantize_linear


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` already holds fake-quantized layers."""
    return any(isinstance(m, QUANTIZED_LAYERS) for m in model.modules())


def float_model(model: nn.Module) -> nn.Module | None:
    """The float network ``model`` was prepared from (sharing its parameters), or ``None``."""
    return wrapped_float_network(model)


def graph_input_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """The activation quantizers reading a network input directly (one per quantized input of each traced graph)."""
    found: list[FakeQuantizer] = []
    for module in model.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_module" and str(node.target).startswith(f"{ACTIVATION_QUANTIZERS}.") \
                    and node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder":
                quantizer = module.get_submodule(str(node.target))
                if isinstance(quantizer, FakeQuantizer) and all(quantizer is not q for q in found):
                    found.append(quantizer)
    return found


def graph_output_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """The activation quantizers whose output is a network output (a classifier's logits)."""
    found: list[FakeQuantizer] = []
    for module in model.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        outputs = [node for node in module.graph.nodes if node.op == "output"]
        nodes: list[fx.Node] = []
        for output in outputs:
            fx.node.map_arg(output.args, nodes.append)
        for node in nodes:
            if node.op == "call_module" and str(node.target).startswith(f"{ACTIVATION_QUANTIZERS}."):
                quantizer = module.get_submodule(str(node.target))
                if isinstance(quantizer, FakeQuantizer) and all(quantizer is not q for q in found):
                    found.append(quantizer)
    return found


def quantizable_layers(model: nn.Module, config: QuantizationConfig) -> list[str]:
    """Names of the conv / linear layers of ``model`` that ``config`` would quantize."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and config.selects(name, m)]


def prepare_qat(model: nn.Module, config: QuantizationConfig | None = None,
                observed_modules: Sequence[str] = ()) -> fx.GraphModule:
    """The fake-quantized twin of ``model``, sharing its parameters and BatchNorm statistics.

    Args:
        model: a float network (any ``torch.fx``-traceable module; forward may take several inputs and
            keyword arguments).
        config: what to quantize and how; default int8 per-channel weights, uint8 per-tensor activations.
        observed_modules: names of ``model``'s sub-modules whose outputs forward hooks must still see
            (feature distillation reads them). The traced graph calls leaf layers only, so a block such as
            ``features.3`` would never run as a module; at each of these names the twin holds a pass-through
            module called with the block's (fake-quantized) output. The computation is unchanged.

    Raises:
        ValueError: ``model`` has no layer ``config`` quantizes, or it cannot be traced.

    Example:
        >>> import torchvision
        >>> qat = prepare_qat(torchvision.models.resnet18(num_classes=5))
        >>> _ = qat.train()(torch.randn(2, 3, 64, 64))
        >>> qat.eval()(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 5])
    """
    config = config or QuantizationConfig()
    layers = quantizable_layers(model, config)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantizable layer (Conv2d / Linear) under "
                         f"include={list(config.include)}, exclude={list(config.exclude)}, quantize_depthwise={config.quantize_depthwise}, "
                         f"quantize_linear={config.quantize_linear}; nothing to quantize")
    graph = trace_for_quantization(model)
    graph_module = fx.GraphModule(model, graph, class_name=f"Quantized{type(model).__name__}")
    _split_norm_activations(graph_module)
    quantized = _swap_layers(graph_module, config)
    _insert_activation_quantizers(graph_module, quantized, config)
    _observe_outputs(graph_module, observed_modules)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    _order_like(graph_module, model)
    parameter = next(model.parameters(), None)
    if parameter is not None:
        graph_module.to(parameter.device)  # the new quantizer buffers follow the model (a GPU run stays on GPU)
    graph_module.train(model.training)
    ref = FloatNetworkRef(model)
    setattr(graph_module, FLOAT_NETWORK_ATTR, ref)
    graph_module.meta.setdefault(_PRESERVED_KEY, {})[FLOAT_NETWORK_ATTR] = ref
    return graph_module


def trace_for_quantization(model: nn.Module) -> fx.Graph:
    """The ``torch.fx`` graph :func:`prepare_qat` rewrites.

    Raises:
        ValueError: ``model`` cannot be traced (data-dependent control flow); the message names the network, the
            source line where tracing stopped and what to do instead.
    """
    try:
        return _NormLeafTracer().trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many types for data-dependent control flow
        raise ValueError(f"{type(model).__name__} cannot be traced by torch.fx for quantization ({err}"
                         f"{_traced_code_location(err)}); keep data-dependent control flow out of forward, or "
                         "quantize the exported ONNX graph with dms_lightning.export.ort_quantize.quantize_onnx"
                         ) from err


def _traced_code_location(err: BaseException) -> str:
    """``", at <file>:<line>"`` of the innermost frame outside torch where tracing failed (the model's own code)."""
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)
              if f"{os.sep}torch{os.sep}" not in frame.f_code.co_filename]
    if not frames:
        return ""
    frame = frames[-1]
    return f", at {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


class _NormLeafTracer(fx.Tracer):
    """Calls BatchNorm layers as modules, subclasses included, instead of tracing into their forward.

    torch.fx runs a forward's ``if self.training`` once, at trace time. Traced into, a BatchNorm subclass
    (timm's ``BatchNormAct2d`` in MobileNetV3, EfficientNet, ...) leaves ``F.batch_norm(..., training=True)`` in
    the graph: the twin then normalises with batch statistics in eval mode, updates the running statistics in
    every validation and test step, and no conv folds its BatchNorm.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, module_qualified_name)


# timm's norm + activation layers (BatchNormAct2d): batch norm, then ``self.drop``, then ``self.act``.
_NORM_ACT_CHILDREN = ("drop", "act")


def _split_norm_activations(gm: fx.GraphModule) -> None:
    """Call each BatchNorm-plus-activation layer as a plain ``BatchNorm2d`` followed by its ``drop`` and ``act``.

    The plain BatchNorm shares the layer's parameters, buffers and children (same names in the state dict), so
    the conv before it folds it like any other and the activation is placed and quantized like any other.
    BatchNorm subclasses of another shape stay single (float) calls, correct in both modes but not folded.
    """
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        layer = modules.get(node.target) if node.op == "call_module" else None
        if (not isinstance(layer, nn.BatchNorm2d) or type(layer) is nn.BatchNorm2d
                or not set(layer._modules) <= set(_NORM_ACT_CHILDREN) or node.kwargs or len(node.args) != 1):
            continue
        plain = nn.BatchNorm2d.__new__(nn.BatchNorm2d)
        plain.__dict__.update(layer.__dict__)  # the same parameter and buffer dicts: one set of tensors
        # The same children in a dict of its own: the twin drops the children it never calls (identities), and
        # the float network must keep them.
        plain.__dict__["_modules"] = dict(layer._modules)
        _set_submodule(gm, node.target, plain)
        calls = []
        # An identity child (no dropout, ``apply_act=False``) is not called: between a conv and its activation it
        # would hide a ReLU the conv fuses with, and between two quantized tensors it would quantize one twice.
        for child in (c for c in _NORM_ACT_CHILDREN if c in layer._modules
                      and not isinstance(layer._modules[c], nn.Identity)):
            with gm.graph.inserting_after(calls[-1] if calls else node):
                calls.append(gm.graph.call_module(f"{node.target}.{child}", (calls[-1] if calls else node,)))
        if calls:
            node.replace_all_uses_with(calls[-1], delete_user_cb=lambda user, first=calls[0]: user is not first)


def _norm_only(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """``bn`` without the children a split norm + activation layer keeps (its parameters and buffers shared).

    The graph calls those children by their own names (``bn1.act``); held a second time inside the folded conv
    (``conv.bn.act``), ``named_modules()`` would list each under the conv's name only, and a placement that looks
    the graph's ``bn1.act`` up there would miss the ReLU the conv fuses with.
    """
    if not bn._modules:
        return bn
    norm = nn.BatchNorm2d.__new__(nn.BatchNorm2d)
    norm.__dict__.update(bn.__dict__)
    norm.__dict__["_modules"] = {}
    return norm


class ObservedOutput(nn.Module):
    """A block of the float network in its fake-quantized twin: holds the block's layers, passes its output on.

    Called with the block's output so that forward hooks registered on the block's name still fire.
    """

    def forward(self, x):  # noqa: D102 - a pass-through
        return x


def _observe_outputs(gm: fx.GraphModule, names: Sequence[str]) -> None:
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    for name in dict.fromkeys(names):
        if name in called:
            continue  # a leaf layer the graph calls itself: its hooks fire as they are
        inside = [node for node in gm.graph.nodes if name in (node.meta.get("nn_module_stack") or {})]
        if not inside:
            continue  # never called by the traced forward; feature distillation reports it
        output = inside[-1]
        users = list(output.users)
        if len(users) == 1 and users[0].op == "call_module" and str(users[0].target).startswith(ACTIVATION_QUANTIZERS):
            output = users[0]  # what the next block receives is the fake-quantized tensor
        container = ObservedOutput()
        try:
            existing = gm.get_submodule(name)
        except AttributeError:
            existing = None
        if existing is not None:
            container._modules, container._parameters, container._buffers = (
                existing._modules, existing._parameters, existing._buffers)
        _set_submodule(gm, name, container)
        with gm.graph.inserting_after(output):
            observed = gm.graph.call_module(name, (output,))
        output.replace_all_uses_with(observed, delete_user_cb=lambda user, o=observed: user is not o)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _swap_layers(gm: fx.GraphModule, config: QuantizationConfig) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    quantized: list[fx.Node] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        layer = modules[node.target]
        if isinstance(layer, QUANTIZED_LAYERS):
            raise ValueError(f"{node.target} is already quantized: prepare_qat was applied twice")
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or not config.selects(node.target, layer):
            continue
        if isinstance(layer, nn.Linear):
            _set_submodule(gm, node.target, QuantLinear(layer, config.weight_spec_for(node.target)))
        else:
            users = list(node.users)
            bn = modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
            if isinstance(bn, nn.BatchNorm2d) and bn.num_features == layer.out_channels and bn.track_running_stats:
                users[0].replace_all_uses_with(node)
                gm.graph.erase_node(users[0])
                folded = QuantConvBn2d(layer, _norm_only(bn), config.weight_spec_for(node.target))
                _set_submodule(gm, node.target, folded)
            else:
                _set_submodule(gm, node.target, QuantConv2d(layer, config.weight_spec_for(node.target)))
        quantized.append(node)
    return quantized


def _is_module(node: fx.Node, modules: dict[str, nn.Module], types: tuple[type, ...]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), types)


def fused_output(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """``node`` or the ReLU / ReLU6 / ChannelClamp that is its only consumer (fused into the layer's output)."""
    users = list(node.users)
    if len(users) == 1:
        user = users[0]
        if _is_module(user, modules, _FUSABLE_ACTIVATIONS) or (
                user.op == "call_function" and user.target in _FUSABLE_FUNCTIONS) or (
                user.op == "call_method" and user.target in ("relu", "relu_")):
            return user
    return node


def range_preserving_input(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    if _is_module(node, modules, _RANGE_PRESERVING_MODULES) or (
            node.op == "call_function" and node.target in _RANGE_PRESERVING_FUNCTIONS) or (
            node.op == "call_method" and node.target in _RANGE_PRESERVING_METHODS):
        first = node.args[0] if node.args else None
        return first if isinstance(first, fx.Node) else None
    return None


def _may_be_tensor(node: fx.Node) -> bool:
    """False for the graph's shape arithmetic (``x.size(0)``, ``x.shape[1]``): nothing to quantize there."""
    if node.op not in ("placeholder", "call_module", "call_function", "call_method"):
        return False
    if node.op == "call_method" and node.target in _SHAPE_METHODS or node.op == "call_function" and \
            node.target is getattr:
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0] if node.args else None
        return not (isinstance(source, fx.Node) and not _may_be_tensor(source))
    return True


def _insert_activation_quantizers(gm: fx.GraphModule, quantized: list[fx.Node], config: QuantizationConfig) -> None:
    modules = dict(gm.named_modules())
    points: dict[fx.Node, int] = {}  # quantized tensor -> activation bits (the widest any reader or writer asks for)

    def add(point: fx.Node, bits: int) -> None:
        points[point] = max(points.get(point, 0), bits)

    for node in quantized:
        bits = config.activation_spec_for(str(node.target)).bits
        if node.args and isinstance(node.args[0], fx.Node):
            add(node.args[0], bits)
        add(fused_output(node, modules), bits)
    for node in gm.graph.nodes:  # residual adds of int8 tensors run as QLinearAdd
        if node.op == "call_function" and node.target in _ADD_FUNCTIONS or (
                node.op == "call_method" and node.target in ("add", "add_")):
            inputs = [a for a in node.args if isinstance(a, fx.Node)]
            if len(inputs) == 2 and all(a in points for a in inputs):
                add(fused_output(node, modules), max(points[a] for a in inputs))

    if config.placement == "every_tensor":
        inside_float = _inside_float_layers(gm, modules)
        for node in gm.graph.nodes:
            if node in points or not node.users or not _may_be_tensor(node) or \
                    fused_output(node, modules) is not node or node in inside_float:
                continue  # a layer's output its fused ReLU passes on: the ReLU's output carries the quantizer
            add(node, config.activation.bits)

    owner: dict[fx.Node, str] = {}
    group_bits: dict[str, int] = {}
    for node in gm.graph.nodes:  # graph order, so a shared quantizer's source is named first
        if node not in points:
            continue
        source = range_preserving_input(node, modules)
        while source is not None and source not in owner:  # through a chain: timm's identity drop / drop_path
            source = range_preserving_input(source, modules)
        # Same scale on both sides, as int8 max-pool / reshape require; the group takes its widest grid.
        name = owner[source] if source is not None else node.name
        owner[node] = name
        group_bits[name] = max(group_bits.get(name, 0), points[node])
    container = nn.Module()
    gm.add_module(ACTIVATION_QUANTIZERS, container)
    for name, bits in group_bits.items():
        spec = config.activation if bits == config.activation.bits else replace(config.activation, bits=bits)
        container.add_module(name, FakeQuantizer(spec))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in owner.items():
        anchor = placeholders[-1] if node.op == "placeholder" else node
        with gm.graph.inserting_after(anchor):
            quantize = gm.graph.call_module(f"{ACTIVATION_QUANTIZERS}.{name}", (node,))
        node.replace_all_uses_with(quantize, delete_user_cb=lambda user, q=quantize: user is not q)


def _inside_float_layers(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """Tensors ``every_tensor`` leaves in float because no integer op touches them.

    A conv / linear layer kept in float (excluded, or promoted to ``float``) runs with its BatchNorm and
    activation as one float kernel, so the conv output and the BatchNorm output it feeds are internal to it;
    a quantizer there would put a Q/DQ pair between conv and BatchNorm and quantize a tensor that no runtime
    materializes. Likewise a tensor read only by float layers (the image, when the first conv stays in float)
    needs no grid.
    """
    def float_layer(node: fx.Node) -> bool:
        return _is_module(node, modules, (nn.Conv2d, nn.Linear)) and not _is_module(node, modules, QUANTIZED_LAYERS)

    def only_user(node: fx.Node, types: tuple[type, ...]) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 and _is_module(users[0], modules, types) else None

    inside: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if float_layer(node):
            tail = node
            bn = only_user(node, (nn.BatchNorm2d, nn.BatchNorm1d))
            if bn is not None:
                inside.add(tail)
                tail = bn
            if only_user(tail, _FLOAT_FUSED_ACTIVATIONS) is not None:
                inside.add(tail)
        elif node.users and all(float_layer(user) for user in node.users):
            inside.add(node)
    return inside


def _order_like(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` the child order of ``old`` so ``parameters()`` keeps the float model's order.

    An optimizer state saved before QAT started maps onto parameters by position, so a resumed run
    (whose optimizer is built on the prepared model) must see them in the same order.
    """
    for name, child in list(new.named_children()):
        counterpart = getattr(old, name, None)
        if isinstance(child, QUANTIZED_LAYERS) or not isinstance(counterpart, nn.Module):
            continue
        _order_like(child, counterpart)
    old_order = {name: i for i, (name, _) in enumerate(old.named_children())}
    ordered = sorted(new._modules.items(), key=lambda item: old_order.get(item[0], len(old_order)))
    new._modules.clear()
    new._modules.update(ordered)


def set_quantizers_state(model: nn.Module, *, observers: bool | None = None, bn_frozen: bool | None = None) -> None:
    """Freeze / unfreeze activation observers and folded BatchNorms of a prepared model."""
    if observers is not None:
        set_observers_enabled(model, observers)
    if bn_frozen is not None:
        set_batch_norm_frozen(model, bn_frozen)
