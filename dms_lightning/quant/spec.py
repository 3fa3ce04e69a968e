"""QuantSpec: how one kind of tensor (weights or activations) is mapped onto integers."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

#: Bit widths we can simulate and export: 8 everywhere; 4 and 7 for weights (stored in int8 QDQ containers).
#: 7-bit weights are ONNX Runtime's ``reduce_range`` for x86 CPUs without VNNI, whose u8 × s8 integer
#: kernels sum pairs of products in int16 and saturate with full 8-bit weights.
#: 16-bit activations are what Hexagon HTP runs beside 8-bit weights (W8A16): in QDQ they are uint16 / int16
#: Q/DQ pairs (opset 21), in the encodings ``bitwidth: 16``.
WEIGHT_BITS = (4, 7, 8)
ACTIVATION_BITS = (8, 16)

#: Names of a layer's precision in :attr:`QuantizationConfig.precision`: ``w<weight bits>a<activation bits>``
#: or ``float`` (the layer is not quantized).
FLOAT = "float"


@dataclass(frozen=True)
class QuantSpec:
    """The integer grid of a quantized tensor.

    Args:
        bits: bit width (weights: 4, 7 or 8; activations: 8 or 16).
        symmetric: zero point fixed at 0 (signed grid ``[-(2^(b-1)-1), 2^(b-1)-1]``); otherwise an
            unsigned affine grid ``[0, 2^b - 1]`` with a learned zero point.
        per_channel: one scale per output channel (weights only; axis 0 of conv / linear weights).

    Example:
        >>> QuantSpec(bits=8, symmetric=True, per_channel=True).quant_range
        (-128, 127)
        >>> QuantSpec(bits=8, symmetric=False, per_channel=False).quant_range
        (0, 255)
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = True

    @property
    def signed(self) -> bool:
        """Symmetric grids are signed (int8 zero point 0), affine grids unsigned (uint8), like ONNX QDQ."""
        return self.symmetric

    @property
    def quant_range(self) -> tuple[int, int]:
        """``(quant_min, quant_max)`` of the storage type, as ``QuantizeLinear`` clamps."""
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    @property
    def symmetric_limit(self) -> int:
        """Largest magnitude used by a symmetric grid (127 for int8: -128 is left unused, as ORT and SNPE do)."""
        return 2 ** (self.bits - 1) - 1

    def to_dict(self) -> dict:
        return asdict(self)


def weight_spec(bits: int, symmetric: bool, per_channel: bool, field: str = "weight_bits") -> QuantSpec:
    """A validated weight spec; raises ``ValueError`` naming ``field`` for an unsupported bit width."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise ValueError(f"{field}={bits!r} is not supported: weights can be quantized to {list(WEIGHT_BITS)} bits")
    return QuantSpec(bits, symmetric, per_channel)


def activation_spec(bits: int, symmetric: bool, field: str = "activation_bits") -> QuantSpec:
    """A validated per-tensor activation spec; raises ``ValueError`` naming ``field`` for an unsupported width."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in ACTIVATION_BITS:
        raise ValueError(f"{field}={bits!r} is not supported: activations can be quantized to "
                         f"{list(ACTIVATION_BITS)} bits (unsigned affine or signed symmetric)")
    return QuantSpec(bits, symmetric, per_channel=False)


def parse_precision(value: str, field: str = "precision") -> tuple[int, int] | None:
    """``"w8a16"`` → ``(8, 16)``; ``"float"`` → ``None``; anything else a ``ValueError`` naming ``field``.

    Example:
        >>> parse_precision("w8a16"), parse_precision("float")
        ((8, 16), None)
    """
    if value == FLOAT:
        return None
    match = re.fullmatch(r"w(\d+)a(\d+)", value) if isinstance(value, str) else None
    valid = [FLOAT] + [f"w{w}a{a}" for w in WEIGHT_BITS for a in ACTIVATION_BITS]
    if match is None or int(match[1]) not in WEIGHT_BITS or int(match[2]) not in ACTIVATION_BITS:
        raise ValueError(f"{field}={value!r} is not a precision: use one of {valid}")
    return int(match[1]), int(match[2])
