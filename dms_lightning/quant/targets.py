"""Target profiles: what the device that runs the INT8 model decides about quantizing it.

A profile fixes the choices a deployment engineer would otherwise have to know per device: which tensors
carry a quantizer (placement), the signedness of activations, the weight grid, the precisions the device
has kernels for, and the channel count it tiles by, each with the reason. ``QuantizationAwareTraining`` and
``PostTrainingQuantization`` take ``target: htp | cpu_x86 | cpu_arm``; the profile's choices become their
defaults (an argument given explicitly still wins, unless the device cannot run it), the reasons go into the
run's log, the variant's info and the compression report. New devices: :func:`register_target`.

Example:
    >>> profile = target_profile("cpu_x86")
    >>> profile.placement, profile.symmetric_activations, profile.activation_bits
    ('every_tensor', False, (8,))
    >>> config = profile.config(weight_bits=8)
    >>> config.activation.quant_range
    (0, 255)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from torch import nn

from dms_lightning.quant.modules import QUANTIZED_LAYERS
from dms_lightning.quant.prepare import PLACEMENTS, QuantizationConfig
from dms_lightning.quant.spec import activation_spec, parse_precision, weight_spec


@dataclass(frozen=True)
class TargetProfile:
    """How one kind of device runs an INT8 network.

    Args:
        name: the ``target`` value.
        device: what it is, in words.
        placement: ``"fused"`` or ``"every_tensor"`` (:class:`~dms_lightning.quant.QuantizationConfig`).
        symmetric_activations: signed int8 activations with zero point 0 (else uint8 affine).
        weight_bits: default weight bit width.
        per_channel_weights: one weight scale per output channel.
        activation_bits: activation bit widths the device has integer kernels for.
        weight_bits_supported: weight bit widths it runs.
        channel_alignment: channel count the device tiles tensors by (other counts are padded).
        min_integer_reduction: spatial convs without groups whose dot products are shorter than this
            (``in_channels x kernel height x kernel width``) stay in float
            (:class:`~dms_lightning.quant.QuantizationConfig`); 0: every conv is quantized.
        reasons: ``{choice: why}``, written into the log and the report.
    """

    name: str
    device: str
    placement: str
    symmetric_activations: bool
    weight_bits: int
    per_channel_weights: bool
    activation_bits: tuple[int, ...]
    weight_bits_supported: tuple[int, ...]
    channel_alignment: int
    min_integer_reduction: int = 0
    reasons: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"{self.name}: placement={self.placement!r} must be one of {list(PLACEMENTS)}")
        if self.weight_bits not in self.weight_bits_supported:
            raise ValueError(f"{self.name}: weight_bits={self.weight_bits} is not in weight_bits_supported="
                             f"{list(self.weight_bits_supported)}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["reasons"] = dict(self.reasons)
        return out

    def config(self, *, weight_bits: int | None = None, activation_bits: int | None = None,
               symmetric_activations: bool | None = None, placement: str | None = None,
               per_channel_weights: bool | None = None, min_integer_reduction: int | None = None,
               **rest) -> QuantizationConfig:
        """The :class:`~dms_lightning.quant.QuantizationConfig` for this device; ``None`` takes the profile's choice.

        ``rest`` (``quantize_depthwise``, ``exclude``, ``include``, ``precision``, ...) passes through. Raises
        ``ValueError`` naming the field when the device cannot run the request (16-bit activations on a CPU).
        """
        weight_bits = self.weight_bits if weight_bits is None else weight_bits
        activation_bits = min(self.activation_bits) if activation_bits is None else activation_bits
        config = QuantizationConfig(
            weight=weight_spec(weight_bits, symmetric=True, per_channel=self.per_channel_weights
                               if per_channel_weights is None else per_channel_weights),
            activation=activation_spec(activation_bits, self.symmetric_activations if symmetric_activations is None
                                       else symmetric_activations),
            placement=self.placement if placement is None else placement,
            min_integer_reduction=(self.min_integer_reduction if min_integer_reduction is None
                                   else min_integer_reduction),
            **rest)
        self.check(config)
        return config

    def check(self, config: QuantizationConfig) -> None:
        """Raise ``ValueError`` (naming the field, the value and what the device has) for what it cannot run."""
        if config.weight.bits not in self.weight_bits_supported:
            raise ValueError(f"weight_bits={config.weight.bits} is not run by target={self.name!r} ({self.device}): "
                             f"use one of {list(self.weight_bits_supported)}")
        if config.activation.bits not in self.activation_bits:
            raise ValueError(f"activation_bits={config.activation.bits} is not run by target={self.name!r} "
                             f"({self.device}): use one of {list(self.activation_bits)}"
                             + (f" ({self.reasons['activation_bits']})" if "activation_bits" in self.reasons else ""))
        for pattern, precision in config.precision:
            bits = parse_precision(precision, f"precision[{pattern!r}]")
            if bits is not None and (bits[0] not in self.weight_bits_supported or bits[1] not in self.activation_bits):
                raise ValueError(f"precision[{pattern!r}]={precision!r} is not run by target={self.name!r} "
                                 f"({self.device}): weights {list(self.weight_bits_supported)} bits, activations "
                                 f"{list(self.activation_bits)} bits, or 'float'")

    def misaligned_layers(self, network: nn.Module) -> dict[str, int]:
        """``{layer: output channels}`` of the conv / linear layers whose channel count the device pads."""
        align = self.channel_alignment
        out = {}
        for name, module in network.named_modules():
            channels = module.out_channels if isinstance(module, nn.Conv2d) else (
                module.out_features if isinstance(module, nn.Linear) else None)
            if channels is not None and align > 1 and channels % align and channels > align:
                wrapper, _, child = name.rpartition(".")  # a quantized layer wraps its conv / linear
                quantized = wrapper and isinstance(network.get_submodule(wrapper), QUANTIZED_LAYERS)
                out[wrapper if quantized and child in ("conv", "linear") else name] = channels
        return out

    def summary(self) -> str:
        """One paragraph: the choices and their reasons."""
        choices = (f"target {self.name} ({self.device}): placement {self.placement}, "
                   f"{'int8 symmetric' if self.symmetric_activations else 'uint8 affine'} activations "
                   f"({'/'.join(map(str, self.activation_bits))} bits), int{self.weight_bits} "
                   f"{'per-channel' if self.per_channel_weights else 'per-tensor'} weights, channels in multiples "
                   f"of {self.channel_alignment}")
        if self.min_integer_reduction:
            choices += f", convs reducing over < {self.min_integer_reduction} values in float"
        return choices + "".join(f"; {key}: {why}" for key, why in self.reasons.items())


_TARGETS: dict[str, TargetProfile] = {}


def register_target(profile: TargetProfile) -> TargetProfile:
    """Make ``profile`` available as ``target=profile.name`` (replacing one of that name)."""
    if not isinstance(profile, TargetProfile):
        raise TypeError(f"register_target() takes a TargetProfile, got {type(profile).__name__}")
    _TARGETS[profile.name] = profile
    return profile


def target_names() -> list[str]:
    return sorted(_TARGETS)


def target_profile(name: str, field: str = "target") -> TargetProfile:
    """The registered profile called ``name``; ``ValueError`` naming ``field`` and the valid names otherwise."""
    if name not in _TARGETS:
        raise ValueError(f"{field}={name!r} is not a known target: use one of {target_names()} "
                         "(or register one with dms_lightning.quant.targets.register_target)")
    return _TARGETS[name]


register_target(TargetProfile(
    name="htp", device="Qualcomm Hexagon NPU (HTP), through SNPE / QNN", placement="every_tensor",
    symmetric_activations=False, weight_bits=8, per_channel_weights=True, activation_bits=(8, 16),
    weight_bits_supported=(4, 8), channel_alignment=32,
    reasons={
        "placement": "the NPU runs the whole graph in integer arithmetic: every tensor between two ops needs a "
                     "scale, and one QAT did not train is a range the converter guesses",
        "activations": "QNN's default activation encoding is unsigned affine 8-bit; a post-ReLU tensor keeps all "
                       "256 levels",
        "weights": "signed symmetric per-channel (axis 0) weight encodings, what the converter writes by default",
        "activation_bits": "HTP has 16-bit activation kernels beside 8-bit weights (W8A16), for the layers "
                           "mixed precision promotes",
        "channel_alignment": "HTP tiles 8-bit tensors by 32 channels (its crouton layout): other channel counts "
                             "are padded, so prune to multiples of 32 (round_to) for the latency to follow",
    }))
register_target(TargetProfile(
    name="cpu_x86", device="x86-64 CPU, ONNX Runtime (MLAS)", placement="every_tensor",
    symmetric_activations=False, weight_bits=8, per_channel_weights=True, activation_bits=(8,),
    weight_bits_supported=(7, 8), channel_alignment=8, min_integer_reduction=32,
    reasons={
        "placement": "every tensor between two ops: ONNX Runtime then also runs the squeeze-excitation multiply, "
                     "the global pooling and the residual adds as integer ops (QLinearMul, "
                     "QLinearGlobalAveragePool, QLinearAdd) instead of dequantizing around them; on MobileNetV3-small "
                     "that is faster than quantizing only the conv inputs and outputs "
                     "(benchmarks/results/cpu_targets.md)",
        "activations": "MLAS's integer GEMM multiplies uint8 activations by int8 weights (vpmaddubsw / VNNI "
                       "vpdpbusd); int8 activations take a slower path (2.1-2.4x slower than uint8 on AVX-512 VNNI "
                       "CPUs, about 4x on AVX2 without VNNI: benchmarks/results/cpu_targets.md)",
        "weights": "int8 per-channel; on a CPU without VNNI, weight_bits=7 (ONNX Runtime's reduce_range) keeps "
                   "u8 x s8 pair sums from saturating int16",
        "activation_bits": "no 16-bit integer kernels: 16-bit Q/DQ pairs would run in float",
        "channel_alignment": "float and integer convs block channels by 8 (AVX2) or 16 (AVX-512)",
        "min_integer_reduction": "a 3x3 image stem (1 or 3 input channels: dot products of 9 or 27 values) stays "
                                 "in float: QLinearConv's GEMM is too shallow there and ran a grayscale stem at 96 px "
                                 "about 2x slower than the float conv, the largest single cost of MobileNetV3-small's "
                                 "INT8 graph (INT8 1.17x -> 1.01x FP32); a 3x3 conv over 8 channels (72) and "
                                 "ResNet-18's 7x7 grayscale stem (49) are faster in integer (ResNet-18 INT8 0.22x FP32, "
                                 "0.31x with that stem in float): benchmarks/results/cpu_targets.md",
        "latency": "a small MobileNet at low resolution can run slower in INT8 than in FP32 on such a CPU (Q/DQ "
                   "around float ops, NHWC transposes); the report measures both. MobileNetV3's hard-swish has no "
                   "integer kernel: a backbone built with activation='relu' runs it inside the integer convs "
                   "(MobileNetV3-small INT8 1.02x -> 0.81x FP32 latency, benchmarks/results/cpu_targets.md)",
    }))
register_target(TargetProfile(
    name="cpu_arm", device="Arm CPU (NEON / dot-product), ONNX Runtime or XNNPACK", placement="every_tensor",
    symmetric_activations=True, weight_bits=8, per_channel_weights=True, activation_bits=(8,),
    weight_bits_supported=(8,), channel_alignment=8,
    reasons={
        "placement": "every tensor between two ops, for the same integer ops as on x86 and for XNNPACK's "
                     "full-integer graphs (not measured here: no Arm machine)",
        "activations": "signed int8 activations with int8 weights (S8S8), ONNX Runtime's recommended first "
                       "choice for QDQ models on Arm (sdot works on int8 x int8)",
        "weights": "int8 per-channel symmetric",
        "activation_bits": "no 16-bit integer kernels",
        "channel_alignment": "NEON registers hold 16 int8 / 4 float lanes; 8-channel blocks suit both",
    }))


def resolve_target_config(target: str | None, *, weight_bits: int | None, activation_bits: int | None,
                          symmetric_activations: bool | None, placement: str | None,
                          min_integer_reduction: int | None = None,
                          **rest) -> tuple[QuantizationConfig, TargetProfile | None]:
    """The callbacks' config: the profile's choices where an argument is ``None`` (no target: the old defaults)."""
    if target is None:
        config = QuantizationConfig(
            min_integer_reduction=0 if min_integer_reduction is None else min_integer_reduction,
            weight=weight_spec(8 if weight_bits is None else weight_bits, symmetric=True,
                               per_channel=rest.pop("per_channel_weights", None) is not False),
            activation=activation_spec(8 if activation_bits is None else activation_bits,
                                       bool(symmetric_activations)),
            placement="fused" if placement is None else placement, **rest)
        return config, None
    profile = target_profile(target)
    return profile.config(weight_bits=weight_bits, activation_bits=activation_bits,
                          symmetric_activations=symmetric_activations, placement=placement,
                          min_integer_reduction=min_integer_reduction, **rest), profile


def target_info(profile: TargetProfile | None, padded: Mapping[str, int] | None = None) -> dict:
    """What a quantization callback puts into its variant's info (and so the report) about its target."""
    if profile is None:
        return {}
    summary = profile.summary()
    if padded:
        summary += (f"; {len(padded)} layers have a channel count the device pads (not a multiple of "
                    f"{profile.channel_alignment})")
    return {"target": profile.to_dict(), "target_summary": summary, "padded_layers": dict(padded or {})}


def announce_target(profile: TargetProfile | None, owner: str) -> None:
    """Log the profile's choices and their reasons (at setup)."""
    if profile is not None:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"[{owner}] {profile.summary()}")


def warn_padded_channels(profile: TargetProfile | None, network: nn.Module, owner: str) -> dict[str, int]:
    """Warn about the layers of the deployed ``network`` whose channel count the device pads; returns them."""
    padded = {} if profile is None else profile.misaligned_layers(network)
    if padded:
        from lightning.pytorch.utilities import rank_zero_warn

        listed = ", ".join(f"{name} ({channels})" for name, channels in list(padded.items())[:6])
        rank_zero_warn(f"{owner}(target={profile.name!r}): {len(padded)} layers have a channel count that is not a "
                       f"multiple of {profile.channel_alignment}, which {profile.device} pads: {listed}"
                       + (", ..." if len(padded) > 6 else "") + f" (prune with round_to={profile.channel_alignment})")
    return padded


__all__ = ["TargetProfile", "register_target", "target_profile", "target_names", "resolve_target_config", "target_info", "announce_target",
           "warn_padded_channels"]
