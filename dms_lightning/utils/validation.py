"""Argument checks shared by the callbacks: one wording for "field=value must be ...", raised as ValueError.

Each helper returns the value, so ``__init__`` reads as a list of fields::

    self.frequency = check_int("frequency", frequency, minimum=1)
    self.target_sparsity = check_fraction("target_sparsity", target_sparsity, high_inclusive=False)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_finite(value: Any) -> bool:
    """Whether ``value`` is a number (not a bool or string) that is finite and > 0, e.g. a class weight.

    An infinite class weight makes a weighted cross-entropy inf / inf = NaN from the first batch.
    """
    if isinstance(value, (bool, str, bytes)):
        return False
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, *,
              optional: bool = False, hint: str = "") -> int | None:
    """``value`` if it is an integer in ``[minimum, maximum]`` (``None`` too when ``optional``), else ValueError.

    Example:
        >>> check_int("frequency", 0, minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: frequency=0 must be an integer >= 1
    """
    if value is None and optional:
        return None
    if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            valid = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            valid = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
        elif maximum is not None:
            valid = f"an integer <= {maximum}"
        else:
            valid = "an integer"
        raise ValueError(f"{name}={value!r} must be {valid}{' (or None)' if optional else ''}"
                         f"{' ' + hint if hint else ''}")
    return value


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_inclusive: bool = True, high_inclusive: bool = True, hint: str = "") -> float:
    """``float(value)`` if it is a real number in the given interval, else ValueError naming the interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        left = f"[{low:g}" if low is not None and low_inclusive else f"({low:g}" if low is not None else "(-inf"
        right = f"{high:g}]" if high is not None and high_inclusive else f"{high:g})" if high is not None else "inf)"
        raise ValueError(f"{name}={value!r} must be a number in {left}, {right}{' ' + hint if hint else ''}")
    return float(value)


def check_fraction(name: str, value: Any, *, high_inclusive: bool = True, hint: str = "") -> float:
    """A number in ``[0, 1]`` (or ``[0, 1)`` with ``high_inclusive=False``)."""
    try:
        return check_number(name, value, 0.0, 1.0, high_inclusive=high_inclusive)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be in [0, 1{']' if high_inclusive else ')'}"
                         f"{' ' + hint if hint else ''}") from None


def check_choice(name: str, value: Any, choices: Iterable[Any], *, hint: str = "") -> Any:
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {choices}{' ' + hint if hint else ''}")
    return value


def check_names(name: str, value: Any) -> list[str]:
    """A list of strings (module names, patterns): a lone string is refused, it is almost always a typo."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name}={value!r} must be a list of non-empty names, e.g. ['features.0']")
    return list(value)


def check_shape(name: str, value: Any, min_dims: int = 2) -> tuple[int, ...] | None:
    """``None`` or a tensor shape of positive integers with at least ``min_dims`` dimensions."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) < min_dims \
            or not all(_is_int(d) and d > 0 for d in value):
        raise ValueError(f"{name}={value!r} must be a shape such as (1, 1, 96, 96)")
    return tuple(value)
