"""How long a batch takes: the cost model behind every ETA (consumer/gpu.py) and the speed the group view shows.

A batch of `steps` denoising steps and `units` work units (skillgen/runtime/groupview.py `units`, which already
count steps) is modelled as taking `c + a * steps / 20 + b * units` seconds: a cost per batch (`c`: the call, text
encoding, the decoder's set-up), a cost per step whatever the batch holds (`a`, per 20 steps: launching the
networks, the scheduler, Python) and a cost per unit of work (`b`). A batch of 8 thumbnails here takes about 3x a
lone one, not 8x, so seconds per unit measured on small batches over-estimate a deep queue (served in full
batches) about 2x, and full batches' under-estimate a lone request; and a lone 8-step image takes about 0.6x a
20-step one, neither 0.4x nor 1x. Fitted over batches of every size, the model predicts one size and step count
from the others.

Batches are kept by class (a quarter octave of width, units per 20 steps, and a half octave of steps) with the
last few of each, so a long flood of full batches does not forget what a lone image costs; a class not seen in
the last `forget_after` batches is dropped (the machine's speed may have changed since). With classes of two step
counts or more, the three costs are a least-squares fit over the classes' medians (`fit_all`); otherwise, or when
a cost comes out negative, the per-batch cost is taken as part of the per-step one, and the line per 20 steps is
Theil-Sen over the medians (`fit`: the median of the slopes between every two classes, then the median
intercept), so one batch slowed by a noisy neighbour moves it little. With one class only the model is
proportional: what is known is seconds per unit at that size.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from schemas.messages import steps_run
from skillgen.runtime.groupview import BASE_STEPS

PER_CLASS = 5  # batches remembered per width class
FORGET_AFTER = 200  # batches after which a width class not seen again is dropped


@dataclass(frozen=True)
class Fit:
    a: float  # seconds per batch of BASE_STEPS steps, whatever it holds (a cost per step)
    b: float  # seconds per work unit
    c: float = 0.0  # seconds per batch, whatever its steps (text encoding, decoding set-up, the call itself)

    def batch_s(self, units: float, steps: float) -> float:
        return self.c + self.a * steps / BASE_STEPS + self.b * units

    def s_per_unit(self, units_per_batch: float, steps: float) -> float:
        """Seconds per unit when the work is served in batches of `units_per_batch` units and `steps` steps."""
        return self.b + self.batch_s(0.0, steps) / max(units_per_batch, 1e-12)


@dataclass
class _Class:
    seen: int  # batch count when last observed
    batches: deque = field(default_factory=lambda: deque(maxlen=PER_CLASS))  # (units, steps, seconds)

    def median(self) -> tuple[float, float, float]:
        return tuple(statistics.median(b[i] for b in self.batches) for i in range(3))  # type: ignore[return-value]


class Speed:
    def __init__(self, forget_after: int = FORGET_AFTER):
        self.forget_after = forget_after
        self._classes: dict[tuple[int, int], _Class] = {}
        self._count = 0
        self.fit: Fit | None = None  # None before the first batch is timed

    def observe(self, units: float, steps: float, seconds: float) -> None:
        """A batch of `units` work units and `steps` denoising steps took `seconds` on the GPU."""
        if not all(x > 0 and math.isfinite(x) for x in (units, steps, seconds)):
            raise ValueError(f"a batch's units, steps and seconds must be positive and finite, got {units}, "
                             f"{steps}, {seconds}")
        self._count += 1
        width = units / (steps / BASE_STEPS)
        key = (round(4 * math.log2(width)), round(2 * math.log2(steps)))
        cls = self._classes.setdefault(key, _Class(self._count))
        cls.seen = self._count
        cls.batches.append((units, steps, seconds))
        for k in [k for k, c in self._classes.items() if self._count - c.seen > self.forget_after]:
            del self._classes[k]
        medians = [c.median() for c in self._classes.values()]
        self.fit = fit_all(medians) or fit([(u / (st / BASE_STEPS), t / (st / BASE_STEPS)) for u, st, t in medians])

    def batch_s(self, units: float, steps: float) -> float | None:
        return None if self.fit is None else self.fit.batch_s(units, steps)


def fit_all(points: list[tuple[float, float, float]]) -> Fit | None:
    """`c + a * steps / 20 + b * units` through (units, steps, seconds) points by least squares, once batches of
    two step counts or more are known (else a per-batch cost cannot be told from a per-step one); None when that
    is not so, or a term comes out negative (noise: then `fit` over seconds per step)."""
    if len(points) < 3 or len({round(2 * math.log2(st)) for _, st, _ in points}) < 2:
        return None
    import numpy as np

    rows = np.array([[1.0, st / BASE_STEPS, u] for u, st, _ in points])
    (c, a, b), *_ = np.linalg.lstsq(rows, np.array([t for _, _, t in points]), rcond=None)
    if min(c, a) < 0 or b <= 0:
        return None
    return Fit(float(a), float(b), float(c))


def fit(points: list[tuple[float, float]]) -> Fit | None:
    """`a + b * width` through (width, seconds per 20 steps) points: Theil-Sen, kept to a >= 0 and b > 0 (a fixed
    cost that came out negative is noise: then the line through the origin and the points' median is used)."""
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


class Pace:
    """Seconds per work unit the consumer delivers at (flights leaving post-processing) over its last `window`
    flights, all while work waited: the GPU, post-processing and the event loop's share of the CPU together, which
    no model of one stage sees. None until half a window has been seen since the queue was last empty."""

    def __init__(self, window: int = 48, clock=time.monotonic):
        self._done: deque[tuple[float, float]] = deque(maxlen=window)  # (when, units)
        self._clock = clock

    def done(self, units: float, backlogged: bool) -> None:
        if not backlogged:  # nothing waited: the pace says nothing about a queue
            self._done.clear()
        self._done.append((self._clock(), units))

    def s_per_unit(self) -> float | None:
        if len(self._done) < (self._done.maxlen or 2) // 2:
            return None
        units = sum(u for _, u in list(self._done)[1:])
        return (self._done[-1][0] - self._done[0][0]) / units if units > 0 else None


def batch_steps(key) -> int:
    """The denoising steps a batch of `key` (consumer/keys.py BatchKey) runs (img2img: steps x strength)."""
    return max(1, steps_run(key.steps, key.strength))


class Slowdown:
    """How much slower (or faster) than the cost model the GPU runs right now: the median, over the last `keep`
    finished batches and the running one, of their seconds over what the model predicts for them. On a CPU the
    consumer's own work (reading a burst of requests, events, post-processing) takes cores the warm-up had to
    itself: a fresh consumer's first batches under a burst ran about 1.3x the warm-up's prediction here, before the
    model had seen any of them. The finished batches are judged against the model of now, not of when they ran:
    once the model has taken them in, their ratios are back near 1 and nothing is counted twice. The running
    batch's ratio (`live_ratio`) says so within a step."""

    def __init__(self, keep: int = 3, bounds: tuple[float, float] = (1 / 3, 3.0)):
        self._batches: deque[tuple[float, float, float]] = deque(maxlen=keep)  # (units, steps, seconds)
        self.bounds = bounds
        # What this host's last run saw in service (SpeedMemory): it fills the places of batches not yet timed, so
        # it speaks for a restarted consumer's first burst and is gone after `keep` batches.
        self.prior: float | None = None

    def observe(self, units: float, steps: float, seconds: float) -> None:
        if units > 0 and steps > 0 and seconds > 0:
            self._batches.append((units, steps, seconds))

    def factor(self, fit: Fit | None, live: float | None = None) -> float:
        ratios = [] if fit is None else [t / p for u, st, t in self._batches if (p := fit.batch_s(u, st)) > 0]
        if live is not None:
            ratios.append(live)
        if self.prior is not None:
            ratios += [self.prior] * (self._batches.maxlen - len(self._batches))  # type: ignore[operator]
        if not ratios:
            return 1.0
        lo, hi = self.bounds
        return min(hi, max(lo, statistics.median(ratios)))


def live_ratio(elapsed_s: float, predicted_s: float | None, step: int, steps: int) -> float | None:
    """The running batch's seconds so far over the model's prediction for the `step` of `steps` steps done; None
    before its first step (text encoding and the first step's launch would read as a slowdown)."""
    if not predicted_s or predicted_s <= 0 or steps <= 0 or step < 1:
        return None
    return elapsed_s / (predicted_s * min(step, steps) / steps)


class ServiceRatio:
    """How much slower than its warm-up's model this consumer runs in service: the median, over its last `keep`
    timed batches, of their seconds over what the model fitted at the warm-up (`reference`, kept as it was)
    predicted. On a CPU the warm-up had the cores to itself; in service the consumer's own intake, events and
    post-processing share them (about 1.3-1.5x on this 2-core machine); on a GPU it stays near 1."""

    def __init__(self, reference: Fit, keep: int = 50, least: int = 8):
        self.reference, self.least = reference, least
        self._ratios: deque[float] = deque(maxlen=keep)
        self.seen = 0  # batches observed

    def observe(self, units: float, steps: float, seconds: float) -> None:
        predicted = self.reference.batch_s(units, steps)
        if predicted > 0 and seconds > 0:
            self._ratios.append(seconds / predicted)
            self.seen += 1

    def value(self) -> float | None:
        return statistics.median(self._ratios) if len(self._ratios) >= self.least else None


class SpeedMemory:
    """ServiceRatio across restarts, per host: a small JSON file (`path`) of key -> ratio, where a key names what
    the ratio is true of (model, backend, device, precision, batch size). A restarted consumer, whose first work is
    often the backlog that grew while it was down, takes it as the Slowdown's prior instead of assuming the warm-up's
    quiet speed. The file is this process's own state: one that cannot be read or parsed is ignored (and rewritten),
    entries older than `max_age_s` or outside (1/3, 3) are ignored, writes are atomic (a temporary file renamed)."""

    def __init__(self, path, max_age_s: float = 7 * 86400, clock=time.time):
        self.path, self.max_age_s, self._clock = Path(path), max_age_s, clock

    def _read(self) -> dict:
        import json

        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def load(self, key: str) -> float | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict):
            return None
        ratio, at = entry.get("ratio"), entry.get("at")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (ratio, at)):
            return None
        if self._clock() - at > self.max_age_s or not 1 / 3 < ratio < 3:
            return None
        return float(ratio)

    def save(self, key: str, ratio: float) -> None:
        import json
        import os
        import tempfile

        data = self._read()
        data[key] = {"ratio": round(ratio, 4), "at": round(self._clock(), 1)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".speed-")
        except OSError:  # state, not a duty: a read-only disk costs a cold start's ETAs, nothing else
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
