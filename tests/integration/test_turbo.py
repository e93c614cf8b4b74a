"""Turbo through the consumer, on the real broker and Redis with the torch engine on the tiny model: a `--turbo`
request is drawn with the fast LoRA (SKILL_FAST_LORA) in a few LCM steps, in a batch of its own; a consumer
without a fast LoRA refuses it with one clear line, and one whose fast LoRA is not a safetensors file does not
start."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from bench.pipeline import psnr_db, write_random_lora
from bots import grammar
from consumer.replay import Selection, select
from consumer.replay_work import ADAPTER, Report, reprocess
from consumer.routing import NO_TURBO
from consumer.worker import Worker
from schemas.messages import EventKind, GenerateRequest
from skillgen.inference.engine import BatchSpec, Sample
from tests.integration.test_consumer import (  # noqa: F401 - fixtures
    ORIGIN,
    Kafka,
    consumer_settings,
    engine,
    image_policy,
    request,
    running,
    tiny_model,
)

pytestmark = pytest.mark.integration


class SpyBackend:
    """The real backend, noting each adapter the GPU loop loads."""

    def __init__(self, backend) -> None:
        self.real = backend
        self.loaded: list[tuple[str, str]] = []

    def load_adapter(self, key: str, path: str) -> None:
        self.loaded.append((key, path))
        self.real.load_adapter(key, path)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


class SpyEngine:
    """The real engine, noting each batch's spec and prompts."""

    def __init__(self, real) -> None:
        self.engine = real
        self.backend = SpyBackend(real.backend)
        self.batches: list[tuple[BatchSpec, list[str]]] = []

    def generate(self, spec, samples, progress=None, cancelled=None):
        self.batches.append((spec, [s.prompt for s in samples]))
        return self.engine.generate(spec, samples, progress, cancelled=cancelled)


async def test_a_turbo_request_is_drawn_with_the_fast_lora_and_refused_where_none_is_set(
    skill_env, tiny_model, engine, image_policy, tmp_path  # noqa: F811
):
    lora = write_random_lora(tiny_model, tmp_path / "lcm")
    settings = consumer_settings(tiny_model, max_batch=4, max_wait_ms=300, fast_lora=lora)
    spy = SpyEngine(engine)
    # What a person types: the grammar sets turbo's 4 steps, guidance 1 and the LCM scheduler.
    typed = grammar.parse("/skill a rower's catch --turbo", ORIGIN, grammar.Defaults(width=64, height=64, steps=2))
    async with Kafka(settings) as kafka:
        async with running(settings, spy, image_policy=image_policy) as worker:
            turbo = await kafka.publish(typed)
            plain = await kafka.publish(request("a rower's catch"))
            await kafka.wait_for(lambda k: k.all_final([turbo.request_id, plain.request_id]), timeout_s=120)
            done = kafka.final(turbo.request_id)
            assert done.kind == EventKind.succeeded, done.message
            [ref] = done.blobs
            drawn = Image.open(io.BytesIO(worker.blobs.get(ref))).convert("RGB")
        assert kafka.final(plain.request_id).kind == EventKind.succeeded

        key = f"turbo-v1-{hashlib.sha256(lora.read_bytes()).hexdigest()[:12]}"
        assert spy.backend.loaded == [(key, str(lora))]
        shapes = {(spec.adapter, spec.scheduler, spec.steps, spec.guidance) for spec, _ in spy.batches}
        assert shapes == {(key, "lcm", 4, 1.0), (None, "dpmpp", 2, 7.5)}  # two batches: turbo has its own key
        assert drawn.size == (64, 64)
        # The same seed and steps without the LoRA is another picture: the fast LoRA really drew this one.
        [bare] = engine.generate(BatchSpec(64, 64, 4, 1.0, "lcm"), [Sample("a rower's catch", seed=ref.seed)])
        assert psnr_db(bare, drawn) < 40

        without = consumer_settings(tiny_model, max_wait_ms=50, fast_lora=None)
        async with running(without, spy, image_policy=image_policy):
            refused = await kafka.publish(GenerateRequest(origin=ORIGIN, prompt="a rower's finish", width=64,
                                                          height=64, turbo=True))
            await kafka.wait_for(lambda k: k.all_final([refused.request_id]))
    failed = kafka.final(refused.request_id)
    assert failed.kind == EventKind.failed and failed.message == NO_TURBO
    assert "SKILL_FAST_LORA" in failed.message and len(spy.batches) == 2  # nothing drawn for it


async def test_the_warm_up_loads_the_fast_lora_before_the_first_request(
    skill_env, tiny_model, engine, image_policy, tmp_path  # noqa: F811
):
    """On ONNX an LCM-LoRA is a merged export (minutes for SD 1.5): the warm-up builds it, never a first turbo
    request on the inference thread."""
    lora = write_random_lora(tiny_model, tmp_path / "lcm")
    settings = consumer_settings(tiny_model, max_batch=4, fast_lora=lora)
    spy = SpyEngine(engine)
    async with Kafka(settings):
        async with running(settings, spy, image_policy=image_policy, warm_up=True):
            key = f"turbo-v1-{hashlib.sha256(lora.read_bytes()).hexdigest()[:12]}"
            assert spy.backend.loaded[:1] == [(key, str(lora))]
            assert spy.batches and all(spec.adapter is None for spec, _ in spy.batches)  # the warm-up's own


async def test_a_consumer_with_a_fast_lora_that_is_not_safetensors_does_not_start(
    skill_env, tiny_model, engine, image_policy, tmp_path  # noqa: F811
):
    pickled = tmp_path / "lcm.safetensors"
    pickled.write_bytes(b"\x80\x04\x95" + bytes(64))  # a pickle under a safetensors name
    worker = Worker(consumer_settings(tiny_model, fast_lora=pickled), engine, image_policy=image_policy)
    with pytest.raises(ValueError, match=r"SKILL_FAST_LORA=.*lcm\.safetensors: not a safetensors file"):
        await worker.run()


async def test_reprocess_sets_a_turbo_request_aside_like_one_naming_an_adapter(
    skill_env, tiny_model, engine, image_policy  # noqa: F811
):
    """Replay draws without the consumer's adapters: a turbo request is left for --republish, not drawn bare."""
    settings = consumer_settings(tiny_model)
    async with Kafka(settings) as kafka:
        turbo = await kafka.publish(GenerateRequest(origin=ORIGIN, prompt="a rower's catch", width=64, height=64,
                                                    turbo=True))
        plain = await kafka.publish(request("a rower's finish"))
    spy = SpyEngine(engine)
    report = Report("test", "reprocess", "generate")
    await reprocess(settings, await select(settings, Selection()), spy, None, None, False,
                    image_policy=image_policy, report=report)
    assert [prompts for _, prompts in spy.batches] == [[plain.prompt]]
    assert {r["request_id"]: r["outcome"] for r in report.records}[turbo.request_id] == ADAPTER
    assert report.counts["skipped_other"] == 1 and report.counts["succeeded"] == 1
