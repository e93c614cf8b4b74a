"""Chat to adapter, end to end: `/skill-train` through bots.train_commands, a real broker, the trainer service and
the real consumer, on the tiny model. The chat is faked at the commands layer (what the bots call); images come
from a local HTTP server that only these tests put on the download allowlist.

The `security` tests are attacks on the trainer that must fail before anything is trained: a caption the prompt
policy blocks (the request's, or one in a zip's captions file), a training image the image policy blocks, a
resize bomb, a zip member named to ping a channel, and a team outside SKILL_ALLOWED_TEAMS."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from PIL import Image, ImageDraw

import skillgen.tools.tiny as tiny
from bots.settings import TeamPolicy, TrainCommandSettings
from bots.train_commands import (
    Cancel,
    Member,
    cancel_request,
    check_allowed,
    describe_adapters,
    finetune_key,
    finetune_request,
    parse,
    progress_text,
)
from consumer.settings import ConsumerSettings
from consumer.worker import Worker, registry_resolver
from schemas.codec import decode, encode, header
from schemas.limits import IngestLimits
from schemas.messages import (
    AdapterRef,
    EventKind,
    FineTuneRequest,
    GenerateRequest,
    JobEvent,
    Origin,
)
from skillgen.adapters.recipe import LoraRecipe
from skillgen.adapters.registry import Registry
from skillgen.inference import load_engine
from skillgen.runtime.blobstore import BlobStore
from skillgen.safety import ImagePolicy, PromptPolicy
from tests.fakes.checkers import NUDITY, BlockAt
from tests.fakes.records import Publisher
from tests.harness import FAST_GROUP, serving
from tests.unit.test_ingest_bounds import MENTION, SizesSeen, resize_bomb
from trainer import lora
from trainer.screening import sample_prompt
from trainer.settings import TrainerSettings
from trainer.worker import TEAM_REFUSED, TrainerWorker

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

GUILD = Origin(platform="discord", team_id="111", channel_id="1001", user_id="2001")
OTHER_GUILD = Origin(platform="discord", team_id="222", channel_id="1009", user_id="2009")
TRAINER_ROLE = Member("u1", role_ids=frozenset({"42"}))
PERMISSIONS = {"111": TeamPolicy(discord_role_ids={"42"})}


@pytest.fixture(scope="session")
def tiny_model(request, tmp_path_factory) -> Path:
    version = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)
    path = Path(cache.mkdir(f"skillgen-tiny-{version}")) if cache else tmp_path_factory.mktemp("tiny")
    if not (path / "model_index.json").exists():
        tiny.build_tiny(path)
    return path


def red_circle_png(i: int) -> bytes:
    image = Image.new("RGB", (64, 64), (15, 15, 15))
    ImageDraw.Draw(image).ellipse((6 + 2 * i, 6, 58, 58 - 2 * i), fill=(220, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
async def attachments() -> AsyncIterator[tuple[list[str], IngestLimits]]:
    """Three red circles on a local server, and the download policy that lets the trainer fetch them."""
    app = web.Application()
    for i in range(3):
        body = red_circle_png(i)

        async def serve(request, body=body):
            return web.Response(body=body, content_type="image/png")

        app.router.add_get(f"/{i}.png", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    limits = IngestLimits(allowed_hosts=(f"127.0.0.1:{port}",), require_https=False, allow_private_addresses=True)
    yield [f"http://127.0.0.1:{port}/{i}.png" for i in range(3)], limits
    await runner.cleanup()


class Hosted:
    """A local file server for the attacks: `put(name, bytes)` returns the URL to send; `limits` lets the trainer
    fetch from it."""

    def __init__(self, port: int):
        self.files: dict[str, bytes] = {}
        self.port = port
        self.limits = IngestLimits(allowed_hosts=(f"127.0.0.1:{port}",), require_https=False,
                                   allow_private_addresses=True)

    def put(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture
async def hosted() -> AsyncIterator[Hosted]:
    app = web.Application()
    runner = web.AppRunner(app)

    async def serve(request):
        body = host.files.get(request.match_info["name"])
        return web.Response(body=body, content_type="application/octet-stream") if body else web.HTTPNotFound()

    app.router.add_get("/{name}", serve)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host = Hosted(site._server.sockets[0].getsockname()[1])
    yield host
    await runner.cleanup()


def trainer_settings(model: Path, tmp: Path, limits: IngestLimits, **kw) -> TrainerSettings:
    fast = {
        "fetch_max_wait_ms": 20,
        "kafka_session_timeout_ms": FAST_GROUP["session_timeout_ms"],
        "kafka_heartbeat_interval_ms": FAST_GROUP["heartbeat_interval_ms"],
        "kafka_rebalance_timeout_ms": FAST_GROUP["rebalance_timeout_ms"],
        "lora": LoraRecipe(lr=1e-2, batch_size=1),
    }
    return TrainerSettings(
        _env_file=None, model=str(model), device="cpu", adapter_url=(tmp / "adapters").as_uri(),
        work_dir=tmp / "work", progress_interval_s=0, sample_images=2, sample_steps=2, ingest=limits,
        **{**fast, **kw},
    )


running = serving


class Chat(Publisher):
    """The fake chat: publishes what the bots would and reads every event of the test's topics."""

    def __init__(self, settings):
        super().__init__(settings)
        self.events: list[JobEvent] = []

    async def publish(self, topic: str, msg, key: bytes) -> None:
        value, headers = encode(msg)
        await self.producer.send_and_wait(topic, value, key=key, headers=headers)

    async def until(self, request_id: str, done, timeout_s: float = 150) -> list[JobEvent]:
        """This request's events, read until `done(event)` is true for one of them."""
        async with asyncio.timeout(timeout_s):
            while True:
                mine = [e for e in self.events if e.request_id == request_id]
                if any(done(e) for e in mine):
                    return mine
                for records in (await self.reader.getmany(timeout_ms=200)).values():
                    self.events += [decode(r.value, JobEvent, r.headers) for r in records]

    async def terminal(self, request_id: str) -> list[JobEvent]:
        return await self.until(request_id, lambda e: e.kind.terminal)


def png_pixels(blobs: BlobStore, event: JobEvent) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blobs.get(event.blobs[0]))), dtype=np.int16)


async def test_skill_train_then_generate_with_the_adapter(skill_env, tiny_model, attachments, tmp_path):
    urls, limits = attachments
    settings = trainer_settings(tiny_model, tmp_path, limits)
    registry = Registry(settings.adapter_url)
    blobs = BlobStore(settings.blob_url)

    # The chat side: who may train, then the request the bot publishes.
    cmd = parse("/skill-train circles --trigger zq --steps 10 --caption a red circle")
    check_allowed(PERMISSIONS, GUILD, TRAINER_ROLE)
    commands = TrainCommandSettings(_env_file=None, train_permissions=PERMISSIONS, ingest=limits)
    req = finetune_request(cmd, GUILD, urls, commands)

    async with Chat(settings) as chat, running(TrainerWorker(settings)):
        await chat.publish(skill_env.topics.finetune, req, finetune_key(req))
        events = await chat.terminal(req.request_id)

    kinds = [e.kind for e in events]
    assert kinds[0] == EventKind.started and kinds[-1] == EventKind.succeeded, [progress_text(e) for e in events]
    progress = [e for e in events if e.kind == EventKind.progress]
    assert progress and all(e.total_steps == 10 and e.loss is not None and e.job == "finetune" for e in progress)
    assert [e.step for e in progress] == sorted(e.step for e in progress)
    assert any(e.eta_s is not None for e in progress)
    done = events[-1]
    assert done.adapter == "circles@v1" and "--adapter circles" in done.message
    grid = Image.open(io.BytesIO(blobs.get(done.blobs[0])))
    assert grid.size == (128, 128)  # two sample images, base row over adapter row

    meta = registry.meta("111", "circles", 1)
    assert (meta.training.steps, meta.training.images, meta.training.trigger) == (10, 3, "zq")
    assert meta.training.trained_by.user_id == GUILD.user_id and len(meta.training.loss_curve) == 10
    assert "`circles`: v1" in describe_adapters(registry, "111")
    assert "no adapters yet" in describe_adapters(registry, "222")

    # The same prompt and seed with and without the adapter; and from a team the adapter does not belong to.
    consumer_settings = ConsumerSettings(
        model=str(tiny_model), device="cpu", precision="fp32", fetch_max_wait_ms=20,
        kafka_session_timeout_ms=FAST_GROUP["session_timeout_ms"],
        kafka_heartbeat_interval_ms=FAST_GROUP["heartbeat_interval_ms"],
        kafka_rebalance_timeout_ms=FAST_GROUP["rebalance_timeout_ms"],
    )
    common = {"prompt": "a zq picture, a red circle", "width": 64, "height": 64, "steps": 4, "seed": 5}
    plain = GenerateRequest(origin=GUILD, **common)
    adapted = GenerateRequest(origin=GUILD, adapter=AdapterRef.parse("circles"), **common)
    pinned = GenerateRequest(origin=GUILD, adapter=AdapterRef.parse("circles@v1"), **common)
    foreign = GenerateRequest(origin=OTHER_GUILD, adapter=AdapterRef.parse("circles"), **common)
    engine = await asyncio.to_thread(load_engine, tiny_model, "torch", "cpu", "fp32")
    worker = Worker(consumer_settings, engine, image_policy=ImagePolicy(),
                    resolve_adapter=registry_resolver(settings.adapter_url))
    async with Chat(consumer_settings) as chat, running(worker):
        for r in (plain, adapted, pinned, foreign):
            await chat.publish(skill_env.topics.generate, r, r.request_id.encode())
        answers = {r.request_id: (await chat.terminal(r.request_id))[-1] for r in (plain, adapted, pinned, foreign)}

    assert [answers[r.request_id].kind for r in (plain, adapted, pinned)] == [EventKind.succeeded] * 3
    base_px, adapted_px = png_pixels(blobs, answers[plain.request_id]), png_pixels(blobs, answers[adapted.request_id])
    assert np.abs(adapted_px - base_px).mean() > 1.0
    assert np.array_equal(png_pixels(blobs, answers[pinned.request_id]), adapted_px)
    refused = answers[foreign.request_id]
    assert refused.kind == EventKind.failed and "no adapter named 'circles'" in refused.message


@pytest.mark.parametrize("blocked", ["cell", "sample-prompt"])
async def test_a_blocked_sample_cell_withholds_the_grid_but_not_the_adapter(skill_env, tiny_model, attachments, tmp_path,
                                                                           monkeypatch, blocked):
    urls, limits = attachments
    settings = trainer_settings(tiny_model, tmp_path, limits)
    req = finetune_request(parse("checked --trigger zq --steps 10 --caption a red circle"), GUILD, urls,
                           TrainCommandSettings(_env_file=None, ingest=limits))
    checker = BlockAt(blocked=[3])  # the adapter's second sample (the three training images pass)
    terms = tmp_path / "backgrounds.txt"  # a policy that refuses the sample prompt and nothing the captions say
    terms.write_text("simple background\n")
    prompts = PromptPolicy(extra_terms=[terms]) if blocked == "sample-prompt" else None
    drawn, draw = [], lora.sample_grid
    monkeypatch.setattr(lora, "sample_grid", lambda engine, key, weights, prompt, *a: drawn.append(prompt)
                        or draw(engine, key, weights, prompt, *a))
    async with Chat(settings) as chat, running(TrainerWorker(settings, image_policy=checker, prompt_policy=prompts)):
        await chat.publish(skill_env.topics.finetune, req, finetune_key(req))
        done = (await chat.terminal(req.request_id))[-1]

    assert done.kind == EventKind.succeeded and done.adapter == "checked@v1", done.message
    assert done.blobs == []
    assert "Its sample grid was withheld by the safety checks: " in done.message
    assert "--adapter checked" in done.message
    assert [p for p in skill_env.blob_dir.rglob("*") if p.is_file()] == []
    meta = Registry(settings.adapter_url).meta("111", "checked", 1)
    assert meta.training.sample_grid is None
    if blocked == "cell":
        assert drawn == [sample_prompt("zq")] == ["a zq picture, simple background"]  # never the sender's caption
        assert checker.calls == [3, 4]  # the training images, then the 2x2 grid's cells before any grid is composed
        assert meta.training.sample_grid_withheld == NUDITY and done.message.endswith(
            f"withheld by the safety checks: {NUDITY} Use it with `/skill <prompt with zq> --adapter checked`.")
    else:
        assert drawn == [] and checker.calls == [3]  # nothing drawn, so nothing to check
        assert meta.training.sample_grid_withheld.startswith("the sample prompt was refused: Your prompt was blocked")


async def test_one_job_at_a_time_the_second_waits_for_the_first(skill_env, tiny_model, attachments, tmp_path):
    urls, limits = attachments
    settings = trainer_settings(tiny_model, tmp_path, limits)
    commands = TrainCommandSettings(_env_file=None, ingest=limits)
    reqs = [finetune_request(parse(f"{name} --steps 10"), GUILD, urls, commands) for name in ("one-first", "one-then")]
    trainer = TrainerWorker(settings)
    handle, at_once, most_at_once = trainer.handle, [0], [0]

    async def counted(record, *rest):
        at_once[0] += 1
        most_at_once[0] = max(most_at_once[0], at_once[0])
        try:
            return await handle(record, *rest)
        finally:
            at_once[0] -= 1

    trainer.handle = counted
    async with Chat(settings) as chat, running(trainer):
        for req in reqs:
            await chat.publish(skill_env.topics.finetune, req, finetune_key(req))
        done = [(await chat.terminal(req.request_id))[-1] for req in reqs]
    assert [d.kind for d in done] == [EventKind.succeeded, EventKind.succeeded], [d.message for d in done]
    assert most_at_once[0] == 1 and trainer.finished == 2


async def test_poison_records_go_to_the_dlq_and_refused_inputs_say_why(skill_env, tiny_model, attachments, tmp_path):
    urls, limits = attachments
    settings = trainer_settings(tiny_model, tmp_path, limits)
    discord_url = ["https://cdn.discordapp.com/x.png"]  # fine for the bot, off this trainer's allowlist
    bad_host = finetune_request(parse("style"), GUILD, discord_url, TrainCommandSettings(_env_file=None))
    too_many = finetune_request(parse("style2"), GUILD, urls, TrainCommandSettings(_env_file=None, ingest=limits))
    dlq = AIOKafkaConsumer(bootstrap_servers=skill_env.vars["SKILL_KAFKA_BOOTSTRAP"], enable_auto_commit=False)
    await dlq.start()
    tps = [TopicPartition(skill_env.topics.dlq(skill_env.topics.finetune), p) for p in range(4)]
    dlq.assign(tps)
    await dlq.seek_to_beginning(*tps)
    strict = limits.model_copy(update={"max_images": 2})
    try:
        async with Chat(settings) as chat, running(TrainerWorker(settings.model_copy(update={"ingest": strict}))):
            await chat.producer.send_and_wait(skill_env.topics.finetune, b"{not json", key=b"x")
            for r in (bad_host, too_many):
                await chat.publish(skill_env.topics.finetune, r, finetune_key(r))
            refused_host = (await chat.terminal(bad_host.request_id))[-1]
            refused_count = (await chat.terminal(too_many.request_id))[-1]
            async with asyncio.timeout(30):
                dead = []
                while not dead:
                    dead = [r for part in (await dlq.getmany(timeout_ms=200)).values() for r in part]
    finally:
        await dlq.stop()
    assert refused_host.kind == EventKind.failed and "downloads only come from 127.0.0.1" in refused_host.message
    assert refused_count.kind == EventKind.failed and "3 files sent; at most 2" in refused_count.message
    assert dead[0].value == b"{not json" and "CodecError" in header(list(dead[0].headers), "error")


async def test_cancel_stops_a_running_training(skill_env, tiny_model, attachments, tmp_path):
    urls, limits = attachments
    settings = trainer_settings(tiny_model, tmp_path, limits)
    req = finetune_request(parse("long-one --steps 5000"), GUILD, urls,
                           TrainCommandSettings(_env_file=None, ingest=limits))
    async with Chat(settings) as chat, running(TrainerWorker(settings)) as trainer:
        await chat.publish(skill_env.topics.finetune, req, finetune_key(req))
        await chat.until(req.request_id, lambda e: e.kind == EventKind.progress)
        stop = cancel_request(Cancel("long-one"), GUILD)
        await chat.publish(skill_env.topics.finetune_cancel, stop, b"111/long-one")
        events = await chat.terminal(req.request_id)
        async with asyncio.timeout(10):
            while trainer.finished < 1:  # committed: the record will not come back
                await asyncio.sleep(0.05)
    last = events[-1]
    assert last.kind == EventKind.failed and f"cancelled by <@{GUILD.user_id}> at step" in last.message
    assert max(e.step or 0 for e in events) < 5000
    assert Registry(settings.adapter_url).adapters("111") == {}
    assert not (settings.work_dir / req.request_id).exists()


async def test_a_cancel_sent_while_no_trainer_ran_still_stops_the_queued_job(skill_env, tiny_model, attachments, tmp_path):
    urls, limits = attachments
    settings = trainer_settings(tiny_model, tmp_path, limits)
    commands = TrainCommandSettings(_env_file=None, ingest=limits)
    asked = finetune_request(parse("queued-one --steps 5000"), GUILD, urls, commands)
    async with Chat(settings) as chat:
        await chat.publish(skill_env.topics.finetune_cancel, cancel_request(Cancel("queued-one"), GUILD), b"111/queued-one")
        later = finetune_request(parse("queued-one --steps 10"), GUILD, urls, commands)  # asked after the cancel
        async with running(TrainerWorker(settings)):
            for r in (asked, later):
                await chat.publish(skill_env.topics.finetune, r, finetune_key(r))
            first = (await chat.terminal(asked.request_id))[-1]
            second = (await chat.terminal(later.request_id))[-1]
    assert first.kind == EventKind.failed and "was cancelled before it started" in first.message
    assert second.kind == EventKind.succeeded and second.adapter == "queued-one@v1"


async def test_a_stopped_trainer_leaves_the_job_uncommitted_and_the_next_one_resumes_it(
    skill_env, tiny_model, attachments, tmp_path
):
    urls, limits = attachments
    settings = trainer_settings(tiny_model, tmp_path, limits, lora=LoraRecipe(lr=1e-2, batch_size=1, checkpoint_every=2))
    req = finetune_request(parse("resumed --steps 12"), GUILD, urls, TrainCommandSettings(_env_file=None, ingest=limits))
    async with Chat(settings) as chat:
        async with running(TrainerWorker(settings)) as first:
            await chat.publish(skill_env.topics.finetune, req, finetune_key(req))
            await chat.until(req.request_id, lambda e: e.kind == EventKind.progress and e.step >= 3)
        paused = await chat.until(req.request_id, lambda e: e.message and "paused" in e.message)
        assert first.finished == 0  # nothing committed: the record comes back to the group
        async with running(TrainerWorker(settings)):
            events = await chat.terminal(req.request_id)
    after = events[len(paused):]
    steps_after = [e.step for e in after if e.kind == EventKind.progress]
    assert after[-1].kind == EventKind.succeeded and after[-1].adapter == "resumed@v1"
    assert steps_after[0] > 2, steps_after  # resumed from a checkpoint, not from step 1
    assert Registry(settings.adapter_url).versions("111", "resumed") == [1]


# ------------------------------------------------------------------------------------------------ attacks


def circles_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def raw_request(origin: Origin, name: str, urls: list[str], **kw) -> FineTuneRequest:
    """What a producer that skips the bots' checks could publish."""
    return FineTuneRequest(origin=origin, adapter=name, image_urls=urls, steps=10, **kw)


async def refused(skill_env, settings: TrainerSettings, reqs: list[FineTuneRequest], **worker) -> list[list[JobEvent]]:
    """Each request's events, published to one trainer that answers them all with a failed event."""
    async with Chat(settings) as chat, running(TrainerWorker(settings, **worker)) as trainer:
        for req in reqs:
            await chat.publish(skill_env.topics.finetune, req, finetune_key(req))
        events = [await chat.terminal(req.request_id) for req in reqs]
        async with asyncio.timeout(10):
            while trainer.finished < len(reqs):  # committed: refused records do not come back
                await asyncio.sleep(0.05)
    for req, mine in zip(reqs, events, strict=True):
        assert mine[-1].kind == EventKind.failed, mine[-1].message
        assert not [e for e in mine if e.kind == EventKind.progress]  # nothing was trained
        assert not (settings.work_dir / req.request_id).exists()
    assert Registry(settings.adapter_url).adapters(GUILD.team_id) == {}
    return events


@pytest.mark.security
async def test_a_caption_the_prompt_policy_blocks_fails_the_job_in_the_trainer(skill_env, tiny_model, hosted, tmp_path):
    settings = trainer_settings(tiny_model, tmp_path, hosted.limits)
    circle = hosted.put("circle.png", red_circle_png(0))
    captions = "\n".join(json.dumps({"file_name": n, "text": t}) for n, t in
                         [("a.png", "a zq red circle"), (f"{MENTION}.png", "a n-u-d-e zq figure")])
    archive = hosted.put("set.zip", circles_zip({"a.png": red_circle_png(1), f"{MENTION}.png": red_circle_png(2),
                                                 "captions.jsonl": captions.encode()}))
    checker = BlockAt()
    own, in_zip = await refused(skill_env, settings, [
        raw_request(GUILD, "own-caption", [circle], caption="a nude zq figure"),  # past a bot that would refuse it
        raw_request(GUILD, "zip-caption", [archive], trigger="zq"),
    ], image_policy=checker)
    assert own[-1].message.startswith("Training of `own-caption` failed: the caption is refused: Your prompt was "
                                      "blocked: it asks for sexual content or nudity. (ref "), own[-1].message
    assert in_zip[-1].message.startswith("Training of `zip-caption` failed: the caption of image 2 is refused: ")
    assert MENTION not in in_zip[-1].message and "figure" not in in_zip[-1].message
    assert checker.calls == []  # refused before the image check, let alone training


@pytest.mark.security
async def test_a_training_image_the_image_policy_blocks_fails_the_job_and_nothing_trains(skill_env, tiny_model, hosted,
                                                                                         tmp_path):
    settings = trainer_settings(tiny_model, tmp_path, hosted.limits)
    big = io.BytesIO()
    Image.new("RGB", (3000, 2000), (200, 40, 40)).save(big, format="PNG")
    urls = [hosted.put(f"{MENTION}.png", red_circle_png(0)), hosted.put("b.png", red_circle_png(1)),
            hosted.put("big.png", big.getvalue())]
    checker = SizesSeen(blocked=[1])
    [events] = await refused(skill_env, settings, [raw_request(GUILD, "blocked-image", urls)], image_policy=checker)
    assert events[-1].message == f"Training of `blocked-image` failed: image 2 is refused by the image check: {NUDITY}"
    assert checker.calls == [3]  # every training image in one check; no grid was ever drawn
    assert checker.sizes == [(64, 64), (64, 64), (1024, 683)]  # downscaled at ingest, before anything sees it


@pytest.mark.security
async def test_a_resize_bomb_and_a_mention_named_member_are_refused_by_position(skill_env, tiny_model, hosted, tmp_path):
    settings = trainer_settings(tiny_model, tmp_path, hosted.limits)
    bomb = [hosted.put("circle.png", red_circle_png(0)), hosted.put(f"{MENTION}.png", resize_bomb())]
    mention_zip = [hosted.put("set.zip", circles_zip({f"{MENTION}.png": b"<html>not an image</html>"}))]
    checker = BlockAt()
    t0 = time.monotonic()
    bombed, named = await refused(skill_env, settings, [raw_request(GUILD, "bomb", bomb),
                                                        raw_request(GUILD, "named", mention_zip)], image_policy=checker)
    assert bombed[-1].message == ("Training of `bomb` failed: image 2 is 262144x64 pixels: its long side may be at "
                                  "most 4 times its short side")
    assert named[-1].message == "Training of `named` failed: image 1 is not a PNG, JPEG or WebP image"
    assert checker.calls == [] and time.monotonic() - t0 < 60


@pytest.mark.security
async def test_a_team_outside_the_allowed_teams_is_refused_and_its_cancels_ignored(skill_env, tiny_model, attachments,
                                                                                   tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SKILL_ALLOWED_TEAMS", "discord:222")
    urls, limits = attachments
    settings = trainer_settings(tiny_model, tmp_path, limits)
    assert not settings.team_allowed("discord", GUILD.team_id)
    req = raw_request(GUILD, "outsider", urls)
    caplog.set_level(logging.WARNING, "skillgen.trainer")
    async with Chat(settings) as chat, running(TrainerWorker(settings)) as trainer:
        for cancel in (cancel_request(Cancel("outsider"), GUILD), cancel_request(Cancel("theirs"), OTHER_GUILD)):
            await chat.publish(skill_env.topics.finetune_cancel, cancel, b"one-partition")  # read in this order
        await chat.publish(skill_env.topics.finetune, req, finetune_key(req))
        events = await chat.terminal(req.request_id)
        async with asyncio.timeout(10):
            while trainer.finished < 1 or ("222", "theirs") not in trainer._cancels:
                await asyncio.sleep(0.05)
    assert [e.kind for e in events] == [EventKind.failed]  # not even started
    assert events[0].message == f"Training of `outsider` refused: {TEAM_REFUSED}." == (
        "Training of `outsider` refused: this team may not use skillgen.")
    assert list(trainer._cancels) == [("222", "theirs")]  # the allowed team's cancel counts; the outsider's does not
    assert "ignoring a cancel of outsider from discord:111" in caplog.text
    assert Registry(settings.adapter_url).adapters(GUILD.team_id) == {}
