"""img2img and the 2x upscale through the consumer, on the real broker and Redis: a previous result's blob is
the init image (Vary and Upscale in the chat), a reference the blob store does not hold is refused with a
one-line reason, and the progress events count the steps that actually run."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from consumer.replay import Selection, select
from consumer.replay_work import Report, reprocess
from schemas.messages import BlobRef, EventKind
from skillgen.runtime.blobstore import BlobStore
from tests.integration.test_consumer import (  # noqa: F401 - fixtures
    Kafka,
    RecordingEngine,
    consumer_settings,
    engine,
    image_policy,
    request,
    running,
    tiny_model,
)

pytestmark = pytest.mark.integration


class FlatEngine:
    """Flat pictures of the batch's size; notes each batch's strength and its samples' init image sizes."""

    def __init__(self) -> None:
        self.batches: list[tuple[float | None, list]] = []

    def generate(self, spec, samples, progress=None, cancelled=None):
        self.batches.append((spec.strength, [s.init_image and s.init_image.size for s in samples]))
        return [Image.new("RGB", (spec.width, spec.height), (s.seed % 256, 90, 120)) for s in samples]


def png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def size_of(worker, ref: BlobRef) -> tuple[int, int]:
    return Image.open(io.BytesIO(worker.blobs.get(ref))).size


async def test_a_previous_result_is_varied_and_upscaled_and_bad_references_fail_clearly(
    skill_env, tiny_model, engine, image_policy  # noqa: F811
):
    settings = consumer_settings(tiny_model, max_batch=4, max_wait_ms=300, progress_interval_s=0)
    recording = RecordingEngine(engine)
    async with Kafka(settings) as kafka, running(settings, recording, image_policy=image_policy) as worker:
        first = await kafka.publish(request(steps=2))
        await kafka.wait_for(lambda k: k.all_final([first.request_id]))
        done = kafka.final(first.request_id)
        assert done.kind == EventKind.succeeded
        result = done.blobs[0]
        assert (result.width, result.height) == (64, 64)

        vary = await kafka.publish(request("a violinist's bow hold", steps=4, init_image=result, strength=0.5))
        upscale = await kafka.publish(request(width=128, height=128, steps=4, init_image=result, upscale=2,
                                              strength=0.5))
        missing_sha = hashlib.sha256(b"never stored").hexdigest()
        missing = result.model_copy(update={"url": result.url.replace(result.sha256, missing_sha).replace(
            f"/{result.sha256[:2]}/", f"/{missing_sha[:2]}/"), "sha256": missing_sha})
        lost = await kafka.publish(request("a juggler's cascade", init_image=missing))
        foreign_url = f"file:///elsewhere/{result.sha256[:2]}/{result.sha256}.png"
        foreign = await kafka.publish(request("a juggler's cascade", init_image=result.model_copy(
            update={"url": foreign_url})))
        rids = [vary.request_id, upscale.request_id, lost.request_id, foreign.request_id]
        await kafka.wait_for(lambda k: k.all_final(rids))

        assert kafka.final(vary.request_id).kind == EventKind.succeeded
        assert kafka.final(upscale.request_id).kind == EventKind.succeeded
        assert size_of(worker, kafka.final(vary.request_id).blobs[0]) == (64, 64)
        up = kafka.final(upscale.request_id).blobs[0]
        assert (up.width, up.height) == (128, 128) and size_of(worker, up) == (128, 128)
        assert kafka.final(vary.request_id).blobs[0].sha256 != result.sha256

        for rid, reason in ((lost.request_id, "init_image is no longer in the blob store"),
                            (foreign.request_id, "init_image is not an image of this service's blob store")):
            final = kafka.final(rid)
            assert final.kind == EventKind.failed and final.message.startswith(reason), final.message
            assert "\n" not in final.message and "elsewhere" not in final.message
            assert [e.kind for e in kafka.of(rid)] == [EventKind.failed]  # refused before the GPU queue

        # Strength 0.5 of 4 steps: 2 run, and that is what progress counts.
        totals = {e.total_steps for e in kafka.of(vary.request_id) if e.kind == EventKind.progress}
        assert totals == {2}

        # Identical again: answered from the cache, keyed by the init image's sha256, strength and upscale.
        again = await kafka.publish(request("a violinist's bow hold", steps=4, init_image=result, strength=0.5))
        await kafka.wait_for(lambda k: k.all_final([again.request_id]))
        assert kafka.final(again.request_id).cache_level == "l1"
        assert kafka.final(again.request_id).blobs == kafka.final(vary.request_id).blobs

    # The text-to-image request, then the two img2img ones (different output sizes: two batches).
    assert sorted(n for n, _, _ in recording.batches) == [1, 1, 1]


async def test_reprocess_reruns_img2img_from_the_same_init_image_and_fails_a_lost_one_clearly(
    skill_env, tiny_model, image_policy  # noqa: F811
):
    settings = consumer_settings(tiny_model)
    blobs = BlobStore(settings.blob_url)
    init = blobs.put(png((64, 64)), width=64, height=64)
    lost_sha = hashlib.sha256(b"gone").hexdigest()
    lost = init.model_copy(update={"url": init.url.replace(init.sha256, lost_sha).replace(
        f"/{init.sha256[:2]}/", f"/{lost_sha[:2]}/"), "sha256": lost_sha})
    async with Kafka(settings) as kafka:
        up = await kafka.publish(request(width=128, height=128, steps=4, init_image=init, upscale=2, strength=0.35))
        await kafka.publish(request("a juggler's cascade", steps=4, init_image=lost))
    flat = FlatEngine()
    report = Report("test", "reprocess", "generate")
    await reprocess(settings, await select(settings, Selection()), flat, None, None, False,
                    image_policy=image_policy, report=report)
    assert flat.batches == [(0.35, [(64, 64)])]
    assert {k: report.counts[k] for k in ("succeeded", "failed")} == {"succeeded": 1, "failed": 1}
    assert up.init_image == init
