"""The safety gate: a compressed variant may not lose recall on a safety-critical class, whatever its top-1.

A driver-monitoring model that keeps 98 % top-1 but misses 5 pt more ``eyes_closed`` frames is a
regression; an average hides it when the class is a small share of the test set. :func:`check_safety`
compares each variant's recall on every ``safety_classes`` entry with the baseline's and lists each drop
of more than ``max_recall_drop_pt`` points.

Example:
    >>> from dms_lightning.report.safety import SafetyPolicy, check_safety
    >>> policy = SafetyPolicy(["eyes_closed", "phone"], max_recall_drop_pt=2.0)
    >>> violations = check_safety(report, policy)  # doctest: +SKIP
    >>> [(v.variant, v.class_name, round(v.drop_pt, 1)) for v in violations]  # doctest: +SKIP
    [('student_int8', 'eyes_closed', 4.0)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from dms_lightning.report.measure import Report

#: What a run does when a variant breaks the safety gate.
SAFETY_ACTIONS: tuple[str, ...] = ("warn", "fail")

#: The driver-monitoring classes whose misses matter most (Euro NCAP drowsiness and distraction).
DMS_SAFETY_CLASSES: tuple[str, ...] = ("eyes_closed", "phone", "looking_away")


class SafetyGateError(RuntimeError):
    """A variant's recall on a safety class dropped more than allowed against the baseline."""


@dataclass(frozen=True)
class SafetyPolicy:
    """Which classes are safety-critical and how much recall a variant may lose on each.

    Args:
        safety_classes: class names (as in the data module / the model metadata).
        max_recall_drop_pt: largest allowed recall drop against the baseline, in percentage points.
        on_violation: ``"fail"`` (the run raises :class:`SafetyGateError` once the report is written) or
            ``"warn"``.
    """

    safety_classes: Sequence[str]
    max_recall_drop_pt: float = 2.0
    on_violation: Literal["warn", "fail"] = "fail"

    def __post_init__(self) -> None:
        classes = self.safety_classes
        if isinstance(classes, str) or not all(isinstance(c, str) and c for c in classes):
            raise ValueError(f"safety_classes={classes!r} must be a list of class names, e.g. {list(DMS_SAFETY_CLASSES)}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"safety_classes={list(classes)!r} names a class twice")
        drop = self.max_recall_drop_pt
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not math.isfinite(drop) or drop < 0:
            raise ValueError(f"max_recall_drop_pt={drop!r} must be a number >= 0 (percentage points)")
        if self.on_violation not in SAFETY_ACTIONS:
            raise ValueError(f"on_safety_violation={self.on_violation!r} must be one of {list(SAFETY_ACTIONS)}")
        object.__setattr__(self, "safety_classes", tuple(classes))

    def check_names(self, class_names: Sequence[str], where: str = "the data") -> None:
        """Raise when a safety class is not one of ``class_names`` (a typo would silently disable the gate)."""
        unknown = [c for c in self.safety_classes if c not in class_names]
        if unknown:
            raise ValueError(f"safety_classes {unknown} are not classes of {where}; its classes: {list(class_names)}. "
                             "Name the classes whose recall must hold among those (the configs name the DMS set's: "
                             "on your own data override CompressionReport's safety_classes), or give [] to turn the "
                             "safety gate off")


@dataclass(frozen=True)
class SafetyViolation:
    """One variant losing more than the allowed recall on one safety class."""

    variant: str
    class_name: str
    recall: float
    baseline_recall: float
    drop_pt: float
    accuracy_delta_pt: float | None

    def message(self, limit: float) -> str:
        top1 = "" if self.accuracy_delta_pt is None else f" (top-1 {self.accuracy_delta_pt:+.2f} pt)"
        return (f"{self.variant}: recall of safety class {self.class_name!r} {100 * self.recall:.2f} % vs "
                f"{100 * self.baseline_recall:.2f} % for the baseline, -{self.drop_pt:.2f} pt > {limit:g} pt allowed"
                f"{top1}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_safety(report: Report, policy: SafetyPolicy) -> list[SafetyViolation]:
    """Every (variant, safety class) whose recall dropped more than ``policy.max_recall_drop_pt`` vs the baseline."""
    base = report.row(report.baseline)
    violations = []
    for row in report.rows:
        if row.name == report.baseline:
            continue
        for name in policy.safety_classes:
            recall = row.per_class.get(name, {}).get("recall")
            reference = base.per_class.get(name, {}).get("recall")
            if recall is None or reference is None:
                continue
            drop = 100.0 * (reference - recall)
            if drop > policy.max_recall_drop_pt + 1e-9:
                violations.append(SafetyViolation(row.name, name, recall, reference, drop, row.accuracy_delta_pt))
    return violations


def worst_safety_recall(row, safety_classes: Sequence[str]) -> tuple[str, float] | None:
    """``(class, recall)`` of the lowest recall among ``safety_classes`` in a report row (``None``: none measured)."""
    values = [(name, row.per_class.get(name, {}).get("recall")) for name in safety_classes]
    values = [(name, recall) for name, recall in values if recall is not None]
    return min(values, key=lambda item: item[1]) if values else None
