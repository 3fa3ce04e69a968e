"""Weight-side PTQ for depthwise-heavy networks: cross-layer equalization and bias correction.

Both follow Nagel et al., 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction"
(ICCV), and run on our own fake-quant core, so the result exports through the same QDQ / TFLite / encodings
code as every other INT8 model.

* :func:`equalize_cross_layer` (on the *float* network, before it is prepared): for each pair
  ``conv₁ → [BatchNorm] → [ReLU] → conv₂`` whose middle tensor nothing else reads, output channel ``i`` of
  conv₁ is divided by ``sᵢ`` and input channel ``i`` of conv₂ multiplied by it, with
  ``sᵢ = √(r₁ᵢ / r₂ᵢ)`` (``r`` the channel's largest absolute *BatchNorm-folded* weight). The two ranges
  become equal, ``√(r₁ᵢ r₂ᵢ)``, so a per-tensor weight grid no longer wastes its levels on one outlier
  channel; chains (MobileNet's expand → depthwise → project) are iterated to convergence. The network's
  function is unchanged (ReLU is positively homogeneous). A ReLU6 between the two does not commute with a
  per-channel scale: by default (``relu6="clamp"``) it becomes a :class:`~dms_lightning.quant.modules.ChannelClamp`
  at ``6 / sᵢ`` per channel, which keeps the function exact; ``relu6="relu"`` replaces it by a ReLU as the paper
  and AIMET do (the function then changes wherever an activation exceeded 6); ``relu6="skip"`` leaves the pair.
* :func:`correct_bias` (on the calibrated fake-quant network): quantizing a layer's weights shifts the mean
  of its output, ``E[W̃x] − E[Wx] = (W̃ − W)·E[x]``, and a ReLU after it turns that shift into a bias of the
  next layer's input. Each quantized layer's deployed bias gains a ``bias_offset`` buffer that makes the
  per-channel mean of its output in the INT8 simulation equal the float network's on the calibration
  images, layer after layer (the paper's empirical variant: it also absorbs the mean errors of the
  activation grids and of the ReLUs that rectify the quantization noise). The float network is not touched: its parameters are shared with the twin, and
  its FP32 export must stay what was trained.

AdaRound (Nagel et al., 2020), learned rounding of the weights, is :mod:`dms_lightning.quant.adaround`.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from dms_lightning.quant.fake_quant import FakeQuantizer
from dms_lightning.quant.modules import QUANTIZED_LAYERS, ChannelClamp, fold_batch_norm, set_bias_offset
from dms_lightning.quant.prepare import is_quantized

#: Activations that commute with a positive per-channel scale: ``f(x / s) = f(x) / s`` for ``s > 0``.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, operator.pos)
#: What :func:`equalize_cross_layer` does with a ReLU6 between two convs of a pair.
RELU6_MODES = ("clamp", "relu", "skip")


@dataclass
class EqualizationResult:
    """What :func:`equalize_cross_layer` did.

    Attributes:
        pairs: ``(conv₁, conv₂)`` layer names equalized.
        relu6_replaced: ReLU6 modules replaced (inside an equalized pair), by what ``relu6_mode`` says.
        relu6_mode: ``"clamp"`` (a :class:`~dms_lightning.quant.modules.ChannelClamp`, exact) or ``"relu"``.
        relu6_channels: the channel count of each replaced ReLU6 (a checkpoint reload rebuilds the clamps).
        skipped: ``{"conv₁ -> conv₂": reason}`` of the candidate pairs left alone.
        range_ratio_before, range_ratio_after: the mean over pairs of ``max / min`` of conv₁'s per-channel
            weight ranges (BatchNorm folded): what a per-tensor weight grid pays for.
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    relu6_replaced: list[str] = field(default_factory=list)
    relu6_mode: str = "clamp"
    relu6_channels: list[int] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    range_ratio_before: float = 1.0
    range_ratio_after: float = 1.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["pairs"] = [list(pair) for pair in self.pairs]
        return out


@dataclass
class _Pair:
    first: str
    first_bn: str | None
    second: str
    second_bn: str | None
    relu6: str | None


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _find_pairs(model: nn.Module, relu6: str, skipped: dict[str, str]) -> list[_Pair]:
    graph = fx.Tracer().trace(model)
    modules = _modules(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], nn.Conv2d):
            continue
        first, bn, relu6_name, current = str(node.target), None, None, _single_user(node)
        while current is not None:
            module = modules.get(str(current.target)) if current.op == "call_module" else None
            if isinstance(module, nn.BatchNorm2d) and bn is None and relu6_name is None and module.track_running_stats:
                bn = str(current.target)
            elif isinstance(module, nn.ReLU6) and relu6_name is None:
                relu6_name = str(current.target)
            elif not (isinstance(module, _HOMOGENEOUS_MODULES) or
                      current.op == "call_function" and current.target in _HOMOGENEOUS_FUNCTIONS):
                break
            current = _single_user(current)
        if current is None or current.op != "call_module" or not isinstance(modules[str(current.target)], nn.Conv2d):
            continue
        second = str(current.target)
        label, conv2 = f"{first} -> {second}", modules[second]
        if conv2.groups != 1 and not (conv2.groups == conv2.in_channels == conv2.out_channels):
            skipped[label] = f"{second} is a grouped conv (groups={conv2.groups}) that is not depthwise"
        elif any(calls.get(name, 0) != 1 for name in (first, bn, second, relu6_name) if name is not None):
            skipped[label] = "a layer of the pair is called more than once in forward (a shared module)"
        elif relu6_name is not None and relu6 == "skip":
            skipped[label] = f"{relu6_name} is a ReLU6, which a per-channel scale does not commute with " \
                             "(relu6='clamp' makes it a per-channel clamp, relu6='relu' a ReLU as AIMET does)"
        else:
            after = _single_user(current)
            second_bn = str(after.target) if after is not None and after.op == "call_module" and isinstance(
                modules.get(str(after.target)), nn.BatchNorm2d) else None
            pairs.append(_Pair(first, bn, second, second_bn, relu6_name))
    return pairs


def _folded_weight(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    return conv.weight if bn is None else fold_batch_norm(conv.weight, conv.bias, bn)[0]


def _output_ranges(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    return _folded_weight(conv, bn).abs().flatten(1).amax(dim=1)


def _input_ranges(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    weight = _folded_weight(conv, bn).abs()
    if conv.groups != 1:  # depthwise: input channel i is output channel i
        return weight.flatten(1).amax(dim=1)
    return weight.transpose(0, 1).flatten(1).amax(dim=1)


def _ratio(ranges: torch.Tensor) -> float:
    alive = ranges[ranges > 0]
    return float(alive.max() / alive.min()) if alive.numel() else 1.0


def replace_relu6(network: nn.Module, names, mode: str = "relu", channels=None) -> None:
    """Replace the ReLU6 modules ``names`` of ``network`` as cross-layer equalization did (a checkpoint reload).

    ``mode="relu"``: by ReLUs. ``mode="clamp"``: by :class:`~dms_lightning.quant.modules.ChannelClamp` modules of
    ``channels[i]`` channels, bounds at 6 until the checkpoint's state dict loads the equalized ones.
    """
    if mode not in ("clamp", "relu"):
        raise ValueError(f"mode={mode!r} must be 'clamp' or 'relu'")
    names = list(names)
    channels = list(channels or [])
    if mode == "clamp" and len(channels) != len(names):
        raise ValueError(f"{len(names)} ReLU6 to replace by clamps but {len(channels)} channel counts")
    for i, name in enumerate(names):
        module = network.get_submodule(name)
        wanted = nn.ReLU if mode == "relu" else ChannelClamp
        if isinstance(module, nn.ReLU6):
            parent, _, attribute = name.rpartition(".")
            setattr(network.get_submodule(parent) if parent else network, attribute,
                    nn.ReLU(inplace=module.inplace) if mode == "relu" else ChannelClamp(torch.full((channels[i],), 6.0)))
        elif not isinstance(module, wanted):
            raise ValueError(f"{name} is a {type(module).__name__}, not the ReLU6 the checkpoint's cross-layer "
                             "equalization replaced; the checkpoint belongs to another architecture")


@torch.no_grad()
def equalize_cross_layer(model: nn.Module, *, relu6: str = "clamp", iterations: int = 20,
                         tolerance: float = 1e-4) -> EqualizationResult:
    """Equalize the per-channel weight ranges of consecutive convs of a float ``model``, in place.

    Args:
        model: a float, ``torch.fx``-traceable network (BatchNorms still separate layers; not yet prepared).
        relu6: what a ReLU6 between two convs of a pair becomes: ``"clamp"`` (default) a per-channel clamp at
            ``6 / sᵢ`` (:class:`~dms_lightning.quant.modules.ChannelClamp`; the function is unchanged, the
            runtime runs one ``Min`` per replaced ReLU6); ``"relu"`` a ReLU (as AIMET does; the output changes
            wherever an activation exceeded 6); ``"skip"`` leaves those pairs alone.
        iterations: passes over all pairs (chains of pairs converge in a few).
        tolerance: stop when no scale moved by more than this (relative).

    Returns:
        The pairs equalized, the ReLU6 replaced, the pairs skipped and why, and the mean per-tensor range ratio
        before / after.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.mobilenet_v2(num_classes=5).eval()
        >>> result = equalize_cross_layer(net)
        >>> len(result.pairs), len(result.relu6_replaced), result.range_ratio_after < result.range_ratio_before
        (36, 34, True)
    """
    if is_quantized(model):
        raise ValueError(f"{type(model).__name__} is already fake-quantized: equalize the float network before "
                         "prepare_qat / post_training_quantize")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations={iterations!r} must be a positive integer")
    if relu6 not in RELU6_MODES:
        raise ValueError(f"relu6={relu6!r} must be one of {list(RELU6_MODES)}")
    result = EqualizationResult(relu6_mode="relu" if relu6 == "relu" else "clamp")
    try:
        pairs = _find_pairs(model, relu6, result.skipped)
    except Exception as err:  # noqa: BLE001 - fx raises many types for data-dependent control flow
        raise ValueError(f"{type(model).__name__} cannot be traced by torch.fx for cross-layer equalization ({err})") \
            from err
    modules = _modules(model)

    def layers(pair: _Pair) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, nn.Conv2d, nn.BatchNorm2d | None]:
        return (modules[pair.first], modules[pair.first_bn] if pair.first_bn else None, modules[pair.second],
                modules[pair.second_bn] if pair.second_bn else None)

    before = [_ratio(_output_ranges(*layers(pair)[:2])) for pair in pairs]
    # What each pair's middle tensor was divided by, channel by channel (a ReLU6 there clamps at 6 / divisor).
    divisors = [torch.ones_like(_output_ranges(*layers(pair)[:2])) for pair in pairs]
    for _ in range(iterations):
        moved = 0.0
        for pair, divisor in zip(pairs, divisors):
            conv1, bn1, conv2, bn2 = layers(pair)
            r1, r2 = _output_ranges(conv1, bn1), _input_ranges(conv2, bn2)
            scale = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
            moved = max(moved, float((scale - 1).abs().max()))
            _scale_output(conv1, bn1, 1.0 / scale)
            _scale_input(conv2, scale)
            divisor.mul_(scale)
        if moved < tolerance:
            break
    result.pairs = [(pair.first, pair.second) for pair in pairs]
    replaced = [(pair.relu6, divisor) for pair, divisor in zip(pairs, divisors) if pair.relu6 is not None]
    result.relu6_replaced = [name for name, _ in replaced]
    result.relu6_channels = [int(divisor.numel()) for _, divisor in replaced]
    replace_relu6(model, result.relu6_replaced, result.relu6_mode, result.relu6_channels)
    if result.relu6_mode == "clamp":
        for name, divisor in replaced:
            model.get_submodule(name).upper.copy_((6.0 / divisor).reshape(-1, 1, 1))
    after = [_ratio(_output_ranges(*layers(pair)[:2])) for pair in pairs]
    if pairs:
        result.range_ratio_before = sum(before) / len(before)
        result.range_ratio_after = sum(after) / len(after)
    return result


def _scale_output(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, factor: torch.Tensor) -> None:
    if bn is not None:  # the folded weight and bias are linear in gamma and beta
        if bn.weight is None:
            raise ValueError("cross-layer equalization needs an affine BatchNorm after the first conv of a pair")
        bn.weight.mul_(factor)
        bn.bias.mul_(factor)
        return
    conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    if conv.bias is not None:
        conv.bias.mul_(factor)


def _scale_input(conv: nn.Conv2d, factor: torch.Tensor) -> None:
    if conv.groups != 1:
        conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
    else:
        conv.weight.mul_(factor.reshape(1, -1, 1, 1))


# ------------------------------------------------------------------------------------------- bias correction
@dataclass
class BiasCorrectionResult:
    """What :func:`correct_bias` did: layers corrected and the mean |output-mean shift| before / after (per layer)."""

    layers: list[str] = field(default_factory=list)
    shift_before: dict[str, float] = field(default_factory=dict)
    shift_after: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mean_shift_before(self) -> float:
        return sum(self.shift_before.values()) / max(len(self.shift_before), 1)

    @property
    def mean_shift_after(self) -> float:
        return sum(self.shift_after.values()) / max(len(self.shift_after), 1)


@contextlib.contextmanager
def float_simulation(model: nn.Module) -> Iterator[None]:
    """Inside: ``model`` computes its float network (every quantizer bypassed, no AdaRound / bias offsets)."""
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    states = [q.bypass for q in quantizers]
    offsets = [layer.apply_offsets for layer in layers]
    try:
        for quantizer in quantizers:
            quantizer.bypass = True
        for layer in layers:
            layer.apply_offsets = False
        yield
    finally:
        for quantizer, state in zip(quantizers, states, strict=True):
            quantizer.bypass = state
        for layer, state in zip(layers, offsets, strict=True):
            layer.apply_offsets = state


def _output_means(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor) -> dict[str, torch.Tensor]:
    means: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, _inputs, output):
            means[name] = _channel_means(output)
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return means


@torch.no_grad()
def correct_bias(model: nn.Module, batches: Sequence[torch.Tensor], *, max_images: int | None = 512
                 ) -> BiasCorrectionResult:
    """Empirical bias correction of a calibrated fake-quant ``model``, in place.

    Each quantized layer's deployed bias gains the offset that makes the per-channel mean of its output in the
    INT8 simulation equal the float network's over the calibration images, layer after layer in graph order
    (a corrected layer changes what the next one receives, so each is corrected given the corrections before
    it). The images go through as one batch: one float forward records the reference means, one simulated
    forward corrects each layer as it is reached (its hook returns the corrected output, so downstream layers
    see it). Memory is that of one forward at ``max_images`` images (the first ones of ``batches``; ``None``:
    all). The float network (whose parameters the twin shares) is not changed.

    Returns:
        The layers corrected, and per layer the mean absolute difference between the per-channel means of its
        output in the INT8 simulation and in the float network, before and after (about 0 by construction).
    """
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images={max_images!r} must be a positive integer or None (all calibration images)")
    if not batches:
        raise ValueError("correct_bias() needs at least one batch")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layer: prepare and calibrate it first")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    images = torch.cat([b.to(device) for b in batches])[:max_images]
    was_training = model.training
    model.eval()
    result = BiasCorrectionResult(layers=list(layers))
    try:
        with float_simulation(model):
            reference = _output_means(model, layers, images)
        result.shift_before = _shifts(_output_means(model, layers, images), reference)

        def correct(name: str):
            def hook(layer, _inputs, output):
                shift = _channel_means(output) - reference[name]
                current = getattr(layer, "bias_offset", None)
                offset = -shift if current is None else current.double() - shift
                set_bias_offset(layer, offset.to(torch.float32))
                return output - shift.to(output.dtype).reshape(1, -1, *([1] * (output.dim() - 2)))
            return hook

        handles = [layer.register_forward_hook(correct(name)) for name, layer in layers.items()]
        try:
            model(images)
        finally:
            for handle in handles:
                handle.remove()
        result.shift_after = _shifts(_output_means(model, layers, images), reference)
    finally:
        model.train(was_training)
    return result


def _channel_means(output: torch.Tensor) -> torch.Tensor:
    dims = [d for d in range(output.dim()) if d != 1] if output.dim() > 2 else [0]
    return output.detach().double().mean(dim=dims)


def _shifts(simulated: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float((simulated[name] - reference[name]).abs().mean()) for name in reference}
