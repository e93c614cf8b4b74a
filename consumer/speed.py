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

import asyncio
import json
import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from consumer.post import PostQueue
from skillgen.runtime.groupview import BASE_STEPS, units
from skillgen.safety.postprocess import png_bytes, screen

log = logging.getLogger("skillgen.consumer")

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


def native_px(model: str, vae_scale_factor: int) -> int:
    """The side, in pixels, of the images the model was trained at (its UNet's sample size), where the consumer's
    warm-up times its first batches; 512 when the model is not a local diffusers directory that says."""
    try:
        config = json.loads((Path(model) / "unet" / "config.json").read_text())
        size = int(config["sample_size"]) * vae_scale_factor
    except (OSError, ValueError, KeyError, TypeError):
        return 512
    return size if 8 <= size <= 4096 else 512


async def warm_up(engine, speed: Speed, model: str, max_batch: int, max_pixels: int, executor,
                  post: PostQueue | None = None, image_policy=None) -> float:
    """Before a consumer takes requests, on its inference thread (`executor`), at the model's own size with the
    request defaults (20 steps, guidance on): a lone image and a full batch (the runtime's first calls, not
    timed), then a full batch timed while the first one's images are checked and encoded on the post-processing
    thread (`post`, with `image_policy`), as a served batch overlaps its predecessor's post-processing, then a lone
    image timed alone. So the first deep queue is timed neither by a lone image (about 2x too slow per unit) nor
    by a batch that had the CPU to itself. Returns the full batch's work units."""
    from skillgen.inference.engine import (  # torch: only once the loop runs
        BatchSpec,
        Sample,
    )

    px = native_px(model, getattr(engine.backend, "vae_scale_factor", 8))
    while px * px > max_pixels and px > 8:
        px //= 2
    spec = BatchSpec(px, px)
    per_image = units(1, px, px, spec.steps, spec.guidance)

    def timed(n: int) -> tuple[float, list]:
        t0 = time.perf_counter()
        images = engine.generate(spec, [Sample("warm-up", seed=i) for i in range(n)])
        return time.perf_counter() - t0, images

    def check_and_encode(image) -> None:  # what post-processing does to one served image, but storing it
        if screen([image], image_policy) is None:
            png_bytes(image)

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(executor, timed, 1)
    _, images = await loop.run_in_executor(executor, timed, max_batch)
    beside = [post.submit(check_and_encode, image) for image in images] if post is not None and image_policy else []
    for n in (max_batch, 1):
        seconds, _ = await loop.run_in_executor(executor, timed, n)
        for fut in beside:
            await asyncio.wrap_future(fut)
        beside = []
        speed.observe(n * per_image, spec.steps, seconds)
        log.info("warm-up: a batch of %d %dx%d images in %.2fs", n, px, px, seconds)
    return max_batch * per_image
