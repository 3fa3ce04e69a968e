"""When to prune and how much: sparsity schedules over epochs or optimizer steps.

A schedule lists the *pruning points* (the epochs or steps at which masks are recomputed) between
``start`` and ``end`` every ``frequency``, and the sparsity each point asks for:

* ``one_shot`` — a single point at ``start`` with the full target.
* ``constant`` — the full target at every point (masks re-checked each time).
* ``linear`` — from ``initial_sparsity`` to the target in equal steps.
* ``agp`` (alias ``cubic``) — the automated gradual pruning schedule of Zhu & Gupta 2017,
  ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (n Δt))^3``: prune fast while the network still has redundant
  weights, slowly as it approaches the target.
* any callable ``f(progress) -> sparsity`` with ``progress`` in ``[0, 1]`` across the points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

ScheduleName = Literal["one_shot", "constant", "linear", "agp", "cubic"]
SCHEDULES: tuple[str, ...] = ("one_shot", "constant", "linear", "agp", "cubic")


def agp_sparsity(progress: float, target: float, initial: float = 0.0, exponent: float = 3.0) -> float:
    """Zhu & Gupta's polynomial schedule at ``progress`` in ``[0, 1]`` (cubic for ``exponent=3``)."""
    progress = min(1.0, max(0.0, progress))
    return target + (initial - target) * (1.0 - progress) ** exponent


@dataclass(frozen=True)
class SparsitySchedule:
    """The pruning points of one run and the sparsity at each.

    Args:
        schedule: a name from :data:`SCHEDULES` or a callable ``progress -> sparsity``.
        target: the final sparsity in ``[0, 1)``.
        start: first pruning point (an epoch or a global step, whatever the caller counts in).
        end: last pruning point (``>= start``); ignored by ``one_shot``.
        frequency: distance between pruning points (``>= 1``).
        initial_sparsity: sparsity at the first point of ``linear`` / ``agp``.

    Example:
        >>> s = SparsitySchedule("agp", target=0.5, start=0, end=4, frequency=1)
        >>> s.points
        (0, 1, 2, 3, 4)
        >>> [round(s.sparsity_at_point(i), 3) for i in range(5)]
        [0.0, 0.289, 0.438, 0.492, 0.5]
    """

    schedule: str | Callable[[float], float]
    target: float
    start: int
    end: int
    frequency: int = 1
    initial_sparsity: float = 0.0

    @property
    def points(self) -> tuple[int, ...]:
        """The epochs / steps at which masks are recomputed, ``end`` always included."""
        if self.schedule == "one_shot" or self.end == self.start:
            return (self.start,)
        points = list(range(self.start, self.end + 1, self.frequency))
        if points[-1] != self.end:
            points.append(self.end)
        return tuple(points)

    def progress_at_point(self, index: int) -> float:
        points = self.points
        if len(points) == 1:
            return 1.0
        return (points[index] - self.start) / (self.end - self.start)

    def sparsity_at_point(self, index: int) -> float:
        """The sparsity the ``index``-th pruning point asks for."""
        progress = self.progress_at_point(index)
        if callable(self.schedule):
            value = self.schedule(progress)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0 \
                    or math.isnan(value):
                raise ValueError(f"the schedule callable {self.schedule!r} returned {value!r} at progress "
                                 f"{progress:.3f}: it must return a sparsity in [0, 1)")
            return float(value)
        if self.schedule in ("one_shot", "constant"):
            return self.target
        if self.schedule == "linear":
            return self.initial_sparsity + (self.target - self.initial_sparsity) * progress
        return agp_sparsity(progress, self.target, self.initial_sparsity)
