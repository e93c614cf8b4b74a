"""How long a batch takes: the cost model behind every ETA (consumer/gpu.py) and the speed the group view shows.

A batch of `steps` denoising steps and `units` work units (skillgen/runtime/groupview.py `units`, which already
count steps) is modelled as taking `a * steps / 20 + b * units` seconds: a cost per step whatever the batch holds
(`a`, per 20 steps: launching the networks, the scheduler, Python) and a cost per unit of work (`b`). A batch of 8
thumbnails here takes about 3x a lone one, not 8x, so seconds per unit measured on small batches over-estimate a
deep queue (served in full batches) about 2x, and full batches' under-estimate a lone request; and a lone image of
8 steps takes about 0.4x one of 20 steps, so the fixed part is per step, not per batch. Fitted over batches of
every size, the model predicts one size and step count from the others.

Per step, the model is a line: seconds / (steps / 20) = a + b * width, where width = units / (steps / 20) is what
one step holds (images x pixels x guidance). Batches are kept by width class (a quarter octave: a class holds
batches within about 19 % of each other's width) with the last few of each, so a long flood of full batches does
not forget what a lone image costs; a class not seen in the last `forget_after` batches is dropped (the machine's
speed may have changed since). The fit is Theil-Sen over the classes' medians (the median of the slopes between
every two classes, then the median intercept): one batch slowed by a noisy neighbour moves it little. With one
class only the model is proportional (`a` = 0): what is known is seconds per unit at that width.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from skillgen.runtime.groupview import BASE_STEPS

PER_CLASS = 5  # batches remembered per width class
FORGET_AFTER = 200  # batches after which a width class not seen again is dropped


@dataclass(frozen=True)
class Fit:
    a: float  # seconds per batch of BASE_STEPS steps, whatever it holds
    b: float  # seconds per work unit

    def batch_s(self, units: float, steps: float) -> float:
        return self.a * steps / BASE_STEPS + self.b * units

    def s_per_unit(self, units_per_batch: float, steps: float) -> float:
        """Seconds per unit when the work is served in batches of `units_per_batch` units and `steps` steps."""
        return self.b + self.a * steps / BASE_STEPS / max(units_per_batch, 1e-12)


@dataclass
class _Class:
    seen: int  # batch count when last observed
    batches: deque = field(default_factory=lambda: deque(maxlen=PER_CLASS))  # (width, seconds per BASE_STEPS)

    def median(self) -> tuple[float, float]:
        return (statistics.median(w for w, _ in self.batches), statistics.median(s for _, s in self.batches))


class Speed:
    def __init__(self, forget_after: int = FORGET_AFTER):
        self.forget_after = forget_after
        self._classes: dict[int, _Class] = {}
        self._count = 0
        self.fit: Fit | None = None  # None before the first batch is timed

    def observe(self, units: float, steps: float, seconds: float) -> None:
        """A batch of `units` work units and `steps` denoising steps took `seconds` on the GPU."""
        if not all(x > 0 and math.isfinite(x) for x in (units, steps, seconds)):
            raise ValueError(f"a batch's units, steps and seconds must be positive and finite, got {units}, "
                             f"{steps}, {seconds}")
        self._count += 1
        per = steps / BASE_STEPS
        width = units / per
        cls = self._classes.setdefault(round(4 * math.log2(width)), _Class(self._count))
        cls.seen = self._count
        cls.batches.append((width, seconds / per))
        for k in [k for k, c in self._classes.items() if self._count - c.seen > self.forget_after]:
            del self._classes[k]
        self.fit = fit([c.median() for c in self._classes.values()])

    def batch_s(self, units: float, steps: float) -> float | None:
        return None if self.fit is None else self.fit.batch_s(units, steps)


def fit(points: list[tuple[float, float]]) -> Fit | None:
    """`a + b * width` through (width, seconds) points: Theil-Sen, kept to a >= 0 and b > 0 (a fixed cost that
    came out negative is noise: then the line through the origin and the points' median is used)."""
    if not points:
        return None
    slopes = [(s2 - s1) / (u2 - u1) for i, (u1, s1) in enumerate(points) for u2, s2 in points[i + 1:] if u2 != u1]
    if slopes:
        b = statistics.median(slopes)
        if b > 0:
            a = statistics.median(s - b * u for u, s in points)
            if a >= 0:
                return Fit(a, b)
    return Fit(0.0, statistics.median(s / u for u, s in points))


def steps_run(key) -> int:
    """The denoising steps a batch of `key` (consumer/keys.py BatchKey) runs: img2img runs steps x strength."""
    return key.steps if key.strength is None else max(1, int(key.steps * key.strength))
