"""The consumer's engine: the one its settings name (loaded once, before joining the group), and the warm-up that
times the cost model's first batches on it (consumer/speed.py) before the first request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from consumer.post import PostQueue
from consumer.settings import ConsumerSettings
from consumer.speed import Speed
from skillgen.runtime.groupview import units
from skillgen.safety.postprocess import png_bytes, screen

log = logging.getLogger("skillgen.consumer")


def load_engine_from(settings: ConsumerSettings):
    """The engine these settings name (what replay and the demo load too; consumer.worker re-exports it)."""
    from schemas.messages import MAX_IMAGES
    from skillgen.inference import load_engine

    trt_profile = None
    if settings.backend == "onnx":
        from skillgen.inference.onnx_backend import TrtProfile

        # A batch holds max_batch images, or one request's images when that is more.
        trt_profile = TrtProfile(max_batch=max(settings.max_batch, MAX_IMAGES))
    return load_engine(
        settings.model,
        settings.backend,
        settings.device,
        settings.precision,
        cache_dir=settings.onnx_cache_dir,
        provider=settings.onnx_provider,
        max_cached_adapters=settings.max_cached_adapters,
        max_loaded_adapters=settings.max_loaded_adapters,
        max_pixels=settings.max_pixels,
        trt_profile=trt_profile,
    )


def native_px(model: str, vae_scale_factor: int) -> int:
    """The side, in pixels, of the images the model was trained at (its UNet's sample size), where the consumer's
    warm-up times its first batches; 512 when the model is not a local diffusers directory that says."""
    try:
        config = json.loads((Path(model) / "unet" / "config.json").read_text())
        size = int(config["sample_size"]) * vae_scale_factor
    except (OSError, ValueError, KeyError, TypeError):
        return 512
    return size if 8 <= size <= 4096 else 512


# The warm-up's second step count: the turbo lane's, and far enough from the default 20 for the cost model to tell a
# cost per batch from a cost per step (consumer/speed.py `fit_all`).
FEW_STEPS = 4


async def warm_up(engine, speed: Speed, model: str, max_batch: int, max_pixels: int, executor,
                  post: PostQueue | None = None, image_policy=None) -> float:
    """Before a consumer takes requests, on its inference thread (`executor`), at the model's own size with the
    request defaults (20 steps, guidance on): a lone image and a full batch (the runtime's first calls, not
    timed), then a full batch and a lone image, then both again at FEW_STEPS steps; each full batch is timed while the
    previous full batch's images are checked and encoded on the post-processing thread (`post`, with
    `image_policy`), as a batch in a deep queue overlaps its predecessor's post-processing. So the first deep queue is timed neither by a lone image
    (about 2x too slow per unit) nor by a batch that had the CPU to itself, and a request of another step count is
    predicted with the batch's own fixed cost (text encoding, decoding: a full 8-step batch of the embedded model
    takes 0.44x a 20-step one, not 0.4x). Returns the full 20-step batch's work units."""
    from skillgen.inference.engine import (  # torch: only once the loop runs
        BatchSpec,
        Sample,
    )

    px = native_px(model, getattr(engine.backend, "vae_scale_factor", 8))
    while px * px > max_pixels and px > 8:
        px //= 2
    spec = BatchSpec(px, px)

    def timed(n: int, steps: int = spec.steps) -> tuple[float, list]:
        t0 = time.perf_counter()
        images = engine.generate(BatchSpec(px, px, steps), [Sample("warm-up", seed=i) for i in range(n)])
        return time.perf_counter() - t0, images

    def check_and_encode(image) -> None:  # what post-processing does to one served image, but storing it
        if screen([image], image_policy) is None:
            png_bytes(image)

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(executor, timed, 1)
    _, full = await loop.run_in_executor(executor, timed, max_batch)
    for n, steps in ((max_batch, spec.steps), (1, spec.steps), (max_batch, FEW_STEPS), (1, FEW_STEPS)):
        # As in a deep queue, the previous full batch's images are checked and encoded while a full batch runs.
        busy = n > 1 and post is not None and image_policy is not None
        beside = [post.submit(check_and_encode, im) for im in full] if busy else []
        seconds, images = await loop.run_in_executor(executor, timed, n, steps)
        full = images if n > 1 else full
        for fut in beside:
            await asyncio.wrap_future(fut)
        speed.observe(units(n, px, px, steps, spec.guidance), steps, seconds)
        log.info("warm-up: a batch of %d %dx%d images, %d steps, in %.2fs", n, px, px, steps, seconds)
    return units(max_batch, px, px, spec.steps, spec.guidance)
