"""Delivery against fake Discord and Slack servers, a real broker and Redis: each result is posted once, to
the right place, through rate limits, server errors, dead webhooks, expired tokens, restarts and bad events."""

import asyncio
import uuid

import pytest
from aiokafka.errors import CommitFailedError

from bots import locales
from bots.markers import Claim, Markers
from schemas.codec import header
from schemas.messages import EventKind, JobEvent
from skillgen.runtime.redis import Store
from tests.fakes import discord as fd
from tests.fakes import slack as fs
from tests.fakes.discord import FakeDiscord
from tests.fakes.records import TopicReader
from tests.fakes.world import World, event
from tests.harness import SIGNING_KEY

Q, S, P, OK, FAIL, BLOCK = (EventKind.queued, EventKind.started, EventKind.progress, EventKind.succeeded,
                            EventKind.failed, EventKind.blocked)


def rid() -> str:
    return uuid.uuid4().hex


def original_edits(fake: FakeDiscord, token: str, *, with_files: bool | None = None):
    def match(c) -> bool:
        return (c.method == "PATCH" and c.path.endswith(f"/{token}/messages/@original") and c.status == 200
                and (with_files is None or bool(c.files) == with_files))
    return match


async def test_discord_status_then_images_on_the_original_response_exactly_once(world):
    it = world.discord.deferred()
    o, r = world.discord_origin(it), rid()
    images = [world.image(1), world.image(2)]
    async with world.running(edit_interval_s=10):  # wide, so a slow machine still sees one burst
        await world.send(event(o, Q, r, queue_position=3), event(o, S, r),
                         *[event(o, P, r, step=i, total_steps=20) for i in range(1, 6)],
                         event(o, OK, r, blobs=images))
        [final] = await world.discord.wait_for(original_edits(world.discord, it.token, with_files=True))
        await world.send(event(o, OK, r, blobs=images), event(o, P, r, step=19, total_steps=20))  # a redelivery
        await asyncio.sleep(1.5)
    assert [f.filename for f in final.files] == [f"skill-{r[:8]}-1.png", f"skill-{r[:8]}-2.png"]
    assert all(f.is_png for f in final.files)
    reroll, _, remix, params, _ = final.body["components"][0]["components"]
    assert reroll["custom_id"] == f"skill:reroll:{r}" and remix["custom_id"] == f"skill:remix:{r}:1"  # image 1's seed
    assert (params["label"], params["custom_id"]) == ("Parameters", f"skill:params:{r}:1")
    assert final.body["allowed_mentions"] == {"parse": [], "users": [fd.USER_ID]}
    assert len(world.discord.matching(original_edits(world.discord, it.token, with_files=True))) == 1
    # The burst of seven status events made one edit (throttled); the late progress made none.
    assert len(world.discord.matching(original_edits(world.discord, it.token, with_files=False))) == 1
    assert it.original.content.startswith(f"✅ <@{fd.USER_ID}> *a drummer's paradiddle* (seed 1, 2)")
    # The result is the original response, edited; the one other message is the follow-up that pings.
    shown, ping = world.discord.channel(fd.CHANNEL_ID)
    assert shown is it.original and ping.via == "followup" and ping.content.startswith(f"🔔 <@{fd.USER_ID}>")


async def test_a_429_retry_after_2_leads_to_one_post_at_least_2_seconds_later(world):
    it = world.discord.deferred()
    world.discord.fail("PATCH", r"/messages/@original$", 429, headers={"Retry-After": "2"},
                       body={"message": "You are being rate limited.", "retry_after": 2.0, "global": False})
    async with world.running():
        await world.send(event(world.discord_origin(it), OK, rid(), blobs=[world.image()]))
        [limited] = await world.discord.wait_for(lambda c: c.status == 429)
        [posted] = await world.discord.wait_for(original_edits(world.discord, it.token, with_files=True))
    assert posted.at - limited.at >= 2
    assert len(world.discord.matching(lambda c: c.method == "PATCH")) == 2


async def test_a_very_long_retry_after_requeues_the_event_instead_of_dropping_it(world):
    it = world.discord.deferred()
    world.discord.fail("PATCH", r"/messages/@original$", 429, headers={"Retry-After": "3"},
                       body={"message": "You are being rate limited.", "retry_after": 3.0, "global": True})
    async with world.running(max_retry_after_s=1):
        await world.send(event(world.discord_origin(it), OK, rid(), blobs=[world.image()]))
        [limited] = await world.discord.wait_for(lambda c: c.status == 429)
        [posted] = await world.discord.wait_for(original_edits(world.discord, it.token, with_files=True))
    assert posted.at - limited.at >= 3
    async with TopicReader(world.env.vars["SKILL_KAFKA_BOOTSTRAP"], world.env.topics.events, JobEvent) as reader:
        await reader.settle(0.5)
    # Produced again once with its due time and claim, counted as one re-queue; read back before its time, it
    # waited in memory (parked) rather than going round the topic again.
    requeued = reader.headers[1:]
    assert requeued and all(header(h, "delivery-requeues") == "1" for h in requeued)
    due = {float(header(h, "deliver-after")) for h in requeued}
    assert len(due) == 1 and len(requeued) == 1
    assert header(requeued[0], "delivery-claim").startswith("claim:succeeded:")


async def test_server_errors_are_retried_with_backoff(world):
    it = world.discord.deferred()
    world.discord.fail("PATCH", r"/messages/@original$", 502, times=2)
    async with world.running(backoff_s=0.3):
        await world.send(event(world.discord_origin(it), OK, rid(), blobs=[world.image()]))
        await world.discord.wait_for(original_edits(world.discord, it.token, with_files=True))
    first, second, third = world.discord.matching(lambda c: c.method == "PATCH")
    assert (first.status, second.status, third.status) == (502, 502, 200)
    assert second.at - first.at >= 0.3 and third.at - second.at >= 0.6


async def test_a_webhook_that_answered_404_is_not_used_again_and_the_result_goes_to_the_channel(world):
    it = world.discord.deferred(channel_id=fd.THREAD_ID)
    world.discord.dead_tokens.add(it.token)
    o, r = world.discord_origin(it), rid()
    async with world.running(edit_interval_s=0):
        await world.send(event(o, S, r))
        await world.discord.wait_for(lambda c: c.status == 404)
        await world.send(event(o, P, r, step=5, total_steps=20), event(o, OK, r, blobs=[world.image()]))
        [post] = await world.discord.wait_for(lambda c: c.path == f"/channels/{fd.THREAD_ID}/messages")
    assert post.headers["Authorization"] == f"Bot {world.discord.bot_token}" and post.files[0].is_png
    assert len(world.discord.matching(lambda c: "/webhooks/" in c.path)) == 1
    [msg] = world.discord.channel(fd.THREAD_ID)[1:]  # after the dead "thinking..." response
    assert msg.via == "bot" and msg.pngs


async def test_after_15_minutes_results_go_to_the_channel_with_the_bot_token(world):
    it = world.discord.deferred()
    async with world.running():
        await world.send(event(world.discord_origin(it, age_s=16 * 60), OK, rid(), blobs=[world.image()]))
        await world.discord.wait_for(lambda c: c.path == f"/channels/{fd.CHANNEL_ID}/messages")
    assert world.discord.matching(lambda c: "/webhooks/" in c.path) == []


async def test_a_training_outliving_the_token_keeps_one_channel_message_current(world):
    it = world.discord.deferred()
    o, r = world.discord_origin(it, age_s=20 * 60), rid()
    grid = world.image()
    async with world.running(edit_interval_s=0):
        await world.send(event(o, P, r, job="finetune", adapter="circles", prompt=None, step=100, total_steps=500),
                         event(o, P, r, job="finetune", adapter="circles", prompt=None, step=200, total_steps=500))
        await world.discord.wait_for(lambda c: c.method == "PATCH" and c.path.startswith("/channels/"))
        await world.send(event(o, OK, r, job="finetune", adapter="circles@v1", prompt=None, blobs=[grid],
                               message="Adapter `circles@v1` is ready"))
        await world.discord.wait_for(lambda c: c.method == "PATCH" and c.files and c.path.startswith("/channels/"))
    msg, ping = [m for m in world.discord.channel(fd.CHANNEL_ID) if m.via == "bot"]
    assert ping.reference == msg.id and ping.content.startswith(f"🔔 <@{fd.USER_ID}> Your training is ready")
    assert msg.edits == 2 and msg.content.startswith(f"✅ <@{fd.USER_ID}> Adapter `circles@v1` is ready")
    assert len(msg.pngs) == 1
    assert world.discord.matching(lambda c: "/webhooks/" in c.path) == []  # the token is past its 15 minutes


async def test_blocked_results_reach_only_the_person_and_nothing_stays_in_the_channel(world):
    fresh, old = world.discord.deferred(), world.discord.deferred()
    async with world.running():
        await world.send(event(world.discord_origin(fresh), BLOCK, rid()),
                         event(world.discord_origin(old, age_s=20 * 60), BLOCK, rid()))
        [followup] = await world.discord.wait_for(lambda c: c.path == f"/webhooks/{fd.APPLICATION_ID}/{fresh.token}")
        [dm] = await world.discord.wait_for(lambda c: c.path == f"/channels/dm-{fd.USER_ID}/messages")
    assert followup.body["flags"] == 64 and "graphic violence" in followup.body["content"]
    assert "graphic violence" in dm.body["content"]
    assert fresh.original.deleted
    assert not any("violence" in m.content or m.files for m in world.discord.channel(fd.CHANNEL_ID))


async def test_failed_results_say_why(world):
    it = world.discord.deferred()
    async with world.running():
        await world.send(event(world.discord_origin(it), FAIL, rid()))
        await world.discord.wait_for(original_edits(world.discord, it.token))
    assert "could not draw *a drummer's paradiddle*: the adapter team-style@v9 does not exist" in it.original.content


async def test_slack_status_updates_then_the_image_in_the_thread_once(world):
    o, r = world.slack_origin(thread_ts="1700000000.000300"), rid()
    async with world.running(edit_interval_s=10):
        await world.send(event(o, Q, r, queue_position=2), event(o, P, r, step=5, total_steps=20),
                         event(o, OK, r, blobs=[world.image(3)]))
        await world.slack.wait_for(lambda c: c.path == "files.completeUploadExternal")
        await world.send(event(o, OK, r, blobs=[world.image(3)]))  # a redelivery
        await asyncio.sleep(1.5)
    [shared] = world.slack.pngs(fs.CHANNEL_ID, "1700000000.000300")
    assert shared.filename == f"skill-{r[:8]}-1.png"
    status = world.slack.messages[o.status_message_id]
    assert status.edits[0] == f"⏳ <@{fs.USER_ID}> queued, position 2: _a drummer's paradiddle_"
    assert status.text.startswith("✅") and [b["type"] for b in status.blocks] == ["section", "actions", "actions"]
    # Re-roll, Variations, then Remix and Parameters with the seed the result was drawn with (the request may have
    # named none), and Delete
    assert [e["value"] for e in status.blocks[1]["elements"]] == [r, r, f"{r}:3", f"{r}:3", r]
    # and Vary of its one image (a 16 px image is too small to upscale)
    assert [(e["action_id"], e["value"]) for e in status.blocks[2]["elements"]] == [("skill_v1", f"{r}:1")]
    assert len(status.edits) == 2  # queued (the progress was throttled), then done


async def test_slack_429_on_upload_waits_and_posts_once(world):
    o = world.slack_origin()
    world.slack.fail("POST", r"^files\.getUploadURLExternal$", 429, headers={"Retry-After": "2"},
                     body={"ok": False, "error": "ratelimited"})
    async with world.running():
        await world.send(event(o, OK, rid(), blobs=[world.image()]))
        [limited] = await world.slack.wait_for(lambda c: c.status == 429)
        [done] = await world.slack.wait_for(lambda c: c.path == "files.completeUploadExternal")
    assert done.at - limited.at >= 2 and len(world.slack.pngs(fs.CHANNEL_ID)) == 1


async def test_slack_blocked_and_failed(world):
    blocked, failed = world.slack_origin(), world.slack_origin()
    async with world.running():
        await world.send(event(blocked, BLOCK, rid()), event(failed, FAIL, rid()))
        await world.slack.wait_for(lambda c: c.path == "chat.postEphemeral")
        await world.slack.wait_for(lambda c: c.path == "chat.update")
    assert world.slack.messages[blocked.status_message_id].deleted
    [note] = world.slack.ephemerals
    assert note.user == fs.USER_ID and "graphic violence" in note.text
    assert "does not exist" in world.slack.messages[failed.status_message_id].text
    assert world.slack.files == []


async def test_a_lease_left_by_a_crash_runs_out_and_the_post_still_happens(world, redis_server):
    it, done_it = world.discord.deferred(), world.discord.deferred()
    r, done_r = rid(), rid()
    store = Store.from_settings(world.settings())
    markers = Markers(store, lease_s=1.5, done_ttl_s=60)
    assert isinstance(await markers.take(r, OK), Claim)  # taken, then the process died before posting
    await markers.done(await markers.take(done_r, OK))  # posted and marked, then died before committing
    async with world.running(lease_s=1.5):
        await world.send(event(world.discord_origin(done_it), OK, done_r, blobs=[world.image()]),
                         event(world.discord_origin(it), OK, r, blobs=[world.image()]))
        await world.discord.wait_for(original_edits(world.discord, it.token, with_files=True))
        await asyncio.sleep(0.5)
    assert world.discord.matching(original_edits(world.discord, done_it.token)) == []
    await store.close()


async def test_one_bad_event_never_stops_the_service(world):
    it = world.discord.deferred()
    o = world.discord_origin(it)
    missing = world.image(9).model_copy(update={"url": world.image(9).url.replace(".png", "-gone.png")})
    async with world.running():
        await world.send_raw(b"\xff not json")
        await world.send(event(o, OK, rid(), blobs=[missing]))
        await world.send(event(o.model_copy(update={"channel_id": "404404"}), FAIL, rid()))
        world.discord.fail("POST", r"^/channels/404404/messages$", 404, body={"message": "Unknown Channel",
                                                                               "code": 10003})
        good = world.discord.deferred()
        await world.send(event(world.discord_origin(good), OK, rid(), blobs=[world.image()]))
        await world.discord.wait_for(original_edits(world.discord, good.token, with_files=True))
    async with TopicReader(world.env.vars["SKILL_KAFKA_BOOTSTRAP"], world.env.topics.dlq(world.env.topics.events),
                           JobEvent) as dlq:
        records = []  # read raw: one of them is not JSON at all
        for _ in range(20):
            records += [r for rs in (await dlq.consumer.getmany(timeout_ms=250)).values() for r in rs]
            if len(records) >= 3:
                break
    errors = sorted(header(r.headers, "error").split(":")[0] for r in records)
    assert errors == ["BlobError", "CodecError", "NotFound"]


async def test_a_commit_refused_in_a_rebalance_neither_stops_delivery_nor_loses_its_events(world):
    first, second = world.discord.deferred(), world.discord.deferred()
    refused: list[dict] = []
    async with world.running() as delivery:
        consumer = delivery.service.consumer
        commit = consumer.commit

        async def refused_once(offsets=None):
            if not refused:
                refused.append(dict(offsets))
                raise CommitFailedError()  # what aiokafka raises once the group has moved on to a new generation
            await commit(offsets)

        consumer.commit = refused_once
        await world.send(event(world.discord_origin(first), OK, rid(), blobs=[world.image(1)]))
        await world.discord.wait_for(original_edits(world.discord, first.token, with_files=True))
        async with asyncio.timeout(10):
            while not refused:
                await asyncio.sleep(0.05)
        await world.send(event(world.discord_origin(second), OK, rid(), blobs=[world.image(2)]))
        await world.discord.wait_for(original_edits(world.discord, second.token, with_files=True))
        # The refused points are committed after all (retried, or carried by a later commit): a restart would
        # not read the first event again.
        async with asyncio.timeout(10):
            while [tp for tp, at in refused[0].items() if (await commit_point(consumer, tp)) < at]:
                await asyncio.sleep(0.1)
        assert delivery.service.state == "running" and delivery.service.commit_failures == 1
    for it in (first, second):
        assert len(world.discord.matching(original_edits(world.discord, it.token, with_files=True))) == 1


async def commit_point(consumer, tp) -> int:
    return await consumer.committed(tp) or 0


async def test_deliveries_joining_and_leaving_the_group_post_every_result_once(world):
    """Real rebalances: a second delivery joins (every partition is revoked, then split) and leaves again."""
    posted: list = []

    async def results(n: int) -> None:
        interactions = [world.discord.deferred() for _ in range(n)]
        await world.send(*[event(world.discord_origin(it), OK, rid(), blobs=[world.image(i)])
                           for i, it in enumerate(interactions)])
        for it in interactions:
            await world.discord.wait_for(original_edits(world.discord, it.token, with_files=True), timeout_s=30)
        posted.extend(interactions)

    async def split(one, two) -> None:
        async with asyncio.timeout(20):
            while not (two.service.consumer.assignment() and len(one.service.consumer.assignment()) < 4):
                await asyncio.sleep(0.1)

    async with world.running() as one:
        await results(4)
        async with world.running() as two:
            await split(one, two)
            await results(8)
        await results(4)
        assert one.service.state == "running"
    assert one.handled + two.handled >= 16
    for it in posted:
        assert len(world.discord.matching(original_edits(world.discord, it.token, with_files=True))) == 1


async def test_fine_tune_events_use_the_trainers_words_and_post_no_weights(world):
    o, r = world.slack_origin(), rid()
    weights = world.blobs.put(b"\x00" * 64, content_type="application/octet-stream")
    async with world.running():
        await world.send(event(o, P, r, job="finetune", adapter="team-style", prompt=None, step=40, total_steps=200,
                               loss=0.1234),
                         event(o, OK, r, job="finetune", adapter="team-style", prompt=None, blobs=[weights],
                               message="Adapter `team-style` v1 is ready: use it with --adapter team-style"))
        await world.slack.wait_for(lambda c: c.path == "chat.update", count=2)
        await asyncio.sleep(0.5)
    first, last = world.slack.messages[o.status_message_id].edits
    assert f"🧪 <@{fs.USER_ID}> ▰▰▱▱▱▱▱▱▱▱ Training `team-style`: step 40/200 · loss 0.1234" in first
    assert "Adapter `team-style` v1 is ready" in last
    assert world.slack.files == [] and world.slack.matching(lambda c: c.path.startswith("files.")) == []


@pytest.mark.unit
def test_status_edits_are_at_most_one_per_2_seconds_per_message(tmp_path, monkeypatch):
    from bots import delivery as module
    from bots.delivery import Delivery
    from bots.settings import DeliverySettings
    from skillgen.runtime.blobstore import BlobStore

    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    d = Delivery(DeliverySettings(signing_key=SIGNING_KEY, delivery_state_dir=tmp_path), {}, Store(None),
                 BlobStore(tmp_path.as_uri()))
    assert d._edit_allowed("a") and d._edit_allowed("b")
    clock[0] += 1.9
    assert not d._edit_allowed("a")
    clock[0] += 0.2
    assert d._edit_allowed("a") and not d._edit_allowed("a")


@pytest.mark.security
async def test_a_consumers_message_quoting_sender_text_is_shown_without_links_or_broadcasts(world):
    it, slack = world.discord.deferred(), world.slack_origin()
    quoting = "no adapter named [docs](https://evil.example) <!channel> @everyone <#1>"
    async with world.running():
        await world.send(event(world.discord_origin(it), FAIL, rid(), message=quoting),
                         event(slack, FAIL, rid(), message=quoting))
        await world.discord.wait_for(original_edits(world.discord, it.token))
        await world.slack.wait_for(lambda c: c.path == "chat.update")
    shown = it.original.content
    assert shown.startswith(f"❌ <@{fd.USER_ID}> could not draw *a drummer's paradiddle*: no adapter named [docs]")
    assert "](" not in shown and "://" not in shown and "@everyone" not in shown and "<#" not in shown
    assert world.slack.messages[slack.status_message_id].text == (
        f"❌ <@{fs.USER_ID}> could not draw _a drummer's paradiddle_: no adapter named [docs](https://evil.example) "
        "&lt;!channel&gt; @everyone &lt;#1&gt;")


@pytest.mark.unit
def test_re_queue_headers_that_are_not_numbers_or_too_far_ahead_count_as_absent():
    from bots.delivery import due_time, passes_of

    now = 1_700_000_000.0
    assert due_time(None, now) is None and due_time("1700000005.5", now) == 1_700_000_005.5
    assert due_time("12", now) == 12.0  # long past: due now
    for raw in ("nan", "inf", "-inf", "NaN", "abc", "", "1e999", str(now + 2 * 86400)):
        assert due_time(raw, now) is None, raw
    assert passes_of(None) == 0 and passes_of("3") == 3
    for raw in ("nan", "1.5", "-1", "abc", "99999999999"):
        assert passes_of(raw) is None, raw


@pytest.mark.unit
async def test_every_pass_is_counted_and_past_max_requeues_the_event_goes_to_the_dlq(tmp_path):
    from aiokafka import ConsumerRecord

    from bots.delivery import Delivery
    from bots.settings import DeliverySettings
    from skillgen.runtime.blobstore import BlobStore

    d = Delivery(DeliverySettings(signing_key=SIGNING_KEY, delivery_state_dir=tmp_path, max_requeues=2), {},
                 Store(None), BlobStore(tmp_path.as_uri()))
    emitted, dead = [], []

    async def emit(topic, value, *, key, headers, job=None):
        emitted.append(dict(headers))

    async def dead_letter(record, error):
        dead.append(str(error))

    d.service.emit, d.service.dead_letter = emit, dead_letter

    def record(*headers):
        return ConsumerRecord("t", 0, 7, 0, 0, b"k", b"{}", None, 0, 0, list(headers))

    assert await d.requeue(record(("delivery-requeues", b"nan"), ("deliver-after", b"nan")), 1234.5)
    assert await d.requeue(record(("delivery-requeues", b"1"), ("delivery-claim", b"c")), 1234.5, "claim:x")
    assert emitted == [{"deliver-after": b"1234.500", "delivery-requeues": b"1"},
                       {"deliver-after": b"1234.500", "delivery-requeues": b"2", "delivery-claim": b"claim:x"}]
    assert not await d.requeue(record(("delivery-requeues", b"2")), 1234.5)
    assert len(emitted) == 2 and dead == ["still undelivered after 2 re-queues (SKILL_MAX_REQUEUES)"]


@pytest.mark.unit
async def test_a_pass_waits_in_line_only_as_long_as_max_retry_after_s_allows(tmp_path, monkeypatch):
    from bots import delivery as module
    from bots.delivery import Delivery, Waits
    from bots.errors import RetryAfter, Transient
    from bots.markers import Claim
    from bots.settings import DeliverySettings
    from schemas.messages import Origin, Platform
    from skillgen.runtime.blobstore import BlobStore

    slept: list[float] = []

    async def sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(module.asyncio, "sleep", sleep)
    d = Delivery(DeliverySettings(signing_key=SIGNING_KEY, delivery_state_dir=tmp_path, backoff_s=0.5), {},
                 Store(None), BlobStore(tmp_path.as_uri()))

    class Failing:
        platform = Platform.slack

        def __init__(self, error):
            self.error, self.calls = error, 0

        async def final(self, event, images):
            self.calls += 1
            raise self.error

    origin = Origin(platform=Platform.slack, team_id="T1", channel_id="C1", user_id="U1")
    e = event(origin, FAIL, rid())
    claim = await d.markers.take(e.request_id, FAIL)
    assert isinstance(claim, Claim)
    for error, calls, waits in ((Transient("502"), 3, [0.5, 1.0]),  # the next, 2 s, would pass the 2 s bound
                                (RetryAfter("429", 2.0), 2, [2.0]),  # a 429 of 2 s is waited out once
                                (RetryAfter("429", 20.0), 1, [])):  # a long one at once goes back to the topic
        poster, slept[:] = Failing(error), []
        with pytest.raises(type(error)):
            await d._final(poster, e, claim, Waits(2.0))
        assert (poster.calls, slept) == (calls, waits), error


# -- Discord as it really behaves (issue 16): dead tokens, permissions, pings, rate-limit headers, lengths -------
def sample(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def remember_original(world: World, request_id: str, message_id: str) -> None:
    """What the bot keeps when it writes "queued" into the original response."""
    from bots.credentials import Interactions

    store = Store.from_settings(world.settings())
    try:
        await Interactions(store).remember_original(request_id, message_id)
    finally:
        await store.close()


async def dead_letters(world: World) -> list:
    async with TopicReader(world.env.vars["SKILL_KAFKA_BOOTSTRAP"], world.env.topics.dlq(world.env.topics.events),
                           JobEvent) as dlq:
        records = []
        for _ in range(4):
            records += [r for rs in (await dlq.consumer.getmany(timeout_ms=250)).values() for r in rs]
    return records


async def test_a_401_invalid_webhook_token_edits_the_same_message_with_the_bot_token_and_pings(world):
    it = world.discord.deferred()
    o, r = world.discord_origin(it), rid()  # young by delivery's reckoning; the fake's clock says 16 minutes
    await remember_original(world, r, it.original.id)
    world.discord.advance(16 * 60)
    async with world.running():
        await world.send(event(o, OK, r, blobs=[world.image()]))
        [ping] = await world.discord.wait_for(
            lambda c: c.method == "POST" and c.path == f"/channels/{fd.CHANNEL_ID}/messages")
    [refused] = world.discord.matching(lambda c: "/webhooks/" in c.path)
    assert (refused.method, refused.status) == ("PATCH", 401)
    [edit] = world.discord.matching(lambda c: c.path == f"/channels/{fd.CHANNEL_ID}/messages/{it.original.id}")
    assert edit.status == 200 and edit.headers["Authorization"] == f"Bot {world.discord.bot_token}"
    shown, reply = world.discord.channel(fd.CHANNEL_ID)
    assert shown is it.original and len(shown.pngs) == 1 and shown.content.startswith(f"✅ <@{fd.USER_ID}>")
    assert shown.components[0]["components"][0]["label"] == "Re-roll"
    # The ping: a reply to the result that mentions the requester, and may ping nobody else.
    assert reply.reference == it.original.id and f"<@{fd.USER_ID}>" in reply.content and not reply.pngs
    assert ping.body["allowed_mentions"] == {"parse": [], "users": [fd.USER_ID]}
    assert await dead_letters(world) == []


async def test_a_channel_the_bot_may_not_post_in_gets_nothing_and_the_requester_a_dm_saying_what_to_grant(world):
    it = world.discord.deferred()
    world.discord.forbid(fd.CHANNEL_ID, 50013)
    async with world.running():
        await world.send(event(world.discord_origin(it, age_s=16 * 60), OK, rid(), blobs=[world.image()]))
        [dm] = await world.discord.wait_for(lambda c: c.path == f"/channels/dm-{fd.USER_ID}/messages")
    assert dm.status == 200 and dm.files[0].is_png
    assert "Send Messages" in dm.body["content"] and "Attach Files" in dm.body["content"]
    assert dm.body["content"].startswith(f"⚠️ I could not post your result in <#{fd.CHANNEL_ID}>")
    [refused] = world.discord.matching(lambda c: c.path == f"/channels/{fd.CHANNEL_ID}/messages")
    assert refused.status == 403 and world.discord.channel(fd.CHANNEL_ID) == [it.original]
    assert await dead_letters(world) == []


async def test_a_chinese_request_gets_chinese_buttons_and_notices_on_discord_and_slack(world):
    """Delivery reads the request's language where the bot kept it (bots/locales, Redis by request id): its status
    and result buttons (a message has one set of labels: the requester's) and the missing-permission notice."""
    status, result, forbidden = world.discord.deferred(), world.discord.deferred(), world.discord.deferred()
    s, r, f, slack = rid(), rid(), rid(), rid()
    store = Store.from_settings(world.settings())
    try:
        for request_id in (s, r, f, slack):
            await locales.remember(store, request_id, "zh", 600)
    finally:
        await store.close()
    o = world.slack_origin()
    async with world.running():
        await world.send(event(world.discord_origin(status), EventKind.queued, s, queue_position=2),
                         event(world.discord_origin(result), OK, r, blobs=[world.image()]),
                         event(o, EventKind.progress, slack, step=1, total_steps=20))
        for it in (result, status):
            await world.discord.wait_for(lambda c, it=it: c.method == "PATCH"
                                         and c.path.endswith(f"/{it.token}/messages/@original"))
        await world.slack.wait_for(lambda c: c.path == "chat.update")
        await world.send(event(o, OK, slack, blobs=[world.image()]))
        await world.slack.wait_for(lambda c: c.path == "chat.update", count=2)
        world.discord.forbid(fd.CHANNEL_ID, 50001)
        await world.send(event(world.discord_origin(forbidden, age_s=16 * 60), OK, f, blobs=[world.image()]))
        [dm] = await world.discord.wait_for(lambda c: c.path == f"/channels/dm-{fd.USER_ID}/messages")
    assert [[b["label"] for b in row["components"]] for row in status.original.components] == [["取消"]]
    assert [[b["label"] for b in row["components"]] for row in result.original.components] == [
        ["重新生成", "变体", "改写重绘", "参数", "删除"], ["变化"]]
    status_msg = world.slack.messages[o.status_message_id]
    assert [[e["text"]["text"] for e in b["elements"]] for b in status_msg.blocks if b["type"] == "actions"] == [
        ["重新生成", "变体", "改写重绘", "参数", "删除"], ["变化"]]
    [progress] = [c for c in world.slack.matching(lambda c: c.path == "chat.update") if "第 1/20 步" in str(c.body)]
    assert "取消" in str(progress.body["blocks"])
    assert dm.body["content"].startswith(f"⚠️ 我无法在 <#{fd.CHANNEL_ID}> 发布你的结果：机器人看不到这个频道。")


async def test_closed_dms_are_dropped_with_a_metric_and_never_dead_lettered(world):
    done, blocked = world.discord.deferred(), world.discord.deferred()
    world.discord.forbid(fd.CHANNEL_ID, 50001)
    world.discord.close_dms(fd.USER_ID)
    before = sample("skill_delivery_dropped_total", platform="discord", reason="dms_closed")
    async with world.running():
        await world.send(event(world.discord_origin(done, age_s=16 * 60), OK, rid(), blobs=[world.image()]),
                         event(world.discord_origin(blocked, age_s=17 * 60), BLOCK, rid()))
        dms = await world.discord.wait_for(lambda c: c.path == f"/channels/dm-{fd.USER_ID}/messages", count=2)
        await asyncio.sleep(0.5)
    assert [c.status for c in dms] == [403, 403]
    assert sample("skill_delivery_dropped_total", platform="discord", reason="dms_closed") - before == 2
    assert await dead_letters(world) == []


async def test_a_bucket_with_no_remaining_calls_is_waited_out_before_its_next_call(world):
    it = world.discord.deferred()
    o, r = world.discord_origin(it), rid()
    world.discord.exhaust(r"/messages/@original$", reset_after_s=1.0)  # the first edit leaves Remaining 0
    async with world.running(edit_interval_s=0):
        await world.send(event(o, S, r), event(o, OK, r, blobs=[world.image()]))
        [final] = await world.discord.wait_for(original_edits(world.discord, it.token, with_files=True))
    [status] = world.discord.matching(original_edits(world.discord, it.token, with_files=False))
    assert status.headers is not None and final.at - status.at >= 1.0
    assert world.discord.matching(lambda c: c.status == 429) == []  # waited, never limited


async def test_a_global_429_holds_every_call_until_it_passes(world):
    it = world.discord.deferred()
    world.discord.global_limit(1.0)
    async with world.running():
        await world.send(event(world.discord_origin(it), OK, rid(), blobs=[world.image()]))
        [final] = await world.discord.wait_for(original_edits(world.discord, it.token, with_files=True))
    [limited] = world.discord.matching(lambda c: c.status == 429)
    assert final.at - limited.at >= 1.0


async def test_discord_content_over_2000_characters_is_clipped(world):
    import aiohttp

    from bots.discord_post import DiscordPoster

    it = world.discord.deferred()
    store = Store.from_settings(world.settings())
    try:
        async with aiohttp.ClientSession() as session:
            poster = DiscordPoster(session, world.discord.api_base, world.discord.bot_token, store)
            await poster._call("PATCH", f"/webhooks/{fd.APPLICATION_ID}/{it.token}/messages/@original",
                               {"content": "x" * 2500})
    finally:
        await store.close()
    assert len(it.original.content) == 2000 and it.original.content.endswith("x…")


# -- Slack as it really behaves (issue 16) ---------------------------------------------------------------------


async def test_slack_the_result_is_a_new_message_that_pings_uploaded_before_the_status_says_done(world):
    o, r = world.slack_origin(), rid()
    async with world.running():
        await world.send(event(o, OK, r, blobs=[world.image(3)]))
        await world.slack.wait_for(lambda c: c.path == "chat.update")
    [png] = world.slack.pngs(fs.CHANNEL_ID)
    assert png.initial_comment.startswith(f"✅ <@{fs.USER_ID}> _a drummer's paradiddle_ (seed 3)")  # it notifies
    status = world.slack.messages[o.status_message_id]
    assert status.text.startswith("✅") and status.text.endswith("· done: see below")
    order = [c.path for c in world.slack.calls if c.path in ("files.completeUploadExternal", "chat.update")]
    assert order == ["files.completeUploadExternal", "chat.update"]


async def test_slack_a_failure_is_an_edit_plus_a_mention_and_a_block_stays_private(world):
    failed, blocked = world.slack_origin(), world.slack_origin()
    async with world.running():
        await world.send(event(failed, FAIL, rid()), event(blocked, BLOCK, rid()))
        [ping] = await world.slack.wait_for(lambda c: c.path == "chat.postMessage")
        await world.slack.wait_for(lambda c: c.path == "chat.postEphemeral")
    assert ping.body["text"] == f"🔔 <@{fs.USER_ID}> Your picture could not be done (above)."
    assert world.slack.messages[failed.status_message_id].text.startswith(f"❌ <@{fs.USER_ID}> could not draw")
    assert world.slack.messages[blocked.status_message_id].deleted
    assert [m.ts for m in world.slack.visible(fs.CHANNEL_ID) if "graphic" in m.text] == []


@pytest.mark.parametrize("how", ["the upload is refused", "the bot was removed"])
async def test_slack_an_upload_refused_with_not_in_channel_leaves_no_done_without_images(world, how):
    o = world.slack_origin()
    if how == "the upload is refused":
        world.slack.fail("POST", r"^files\.completeUploadExternal$", 200, body={"ok": False, "error": "not_in_channel"})
    else:  # chat.update is refused too; chat:write.public still lets it post in a public channel
        world.slack.channels[fs.CHANNEL_ID].members.discard(fs.BOT_USER_ID)
    async with world.running():
        await world.send(event(o, OK, rid(), blobs=[world.image()]))
        await world.slack.wait_for(lambda c: c.path in ("chat.update", "chat.postMessage") and c.status == 200
                                   and c.body.get("text", "").startswith("❌"))
    assert world.slack.files == []
    shown = [m.text for m in world.slack.visible(fs.CHANNEL_ID)]
    assert not [t for t in shown if t.startswith("✅")], shown
    assert [t for t in shown if "I could not post the images here: invite me with `/invite @skillgen`" in t], shown


async def test_slack_eight_concurrent_jobs_stay_within_the_workspaces_chat_update_budget(world):
    jobs = [(world.slack_origin(), rid()) for _ in range(8)]
    async with world.running(edit_interval_s=0):
        await world.send(*[event(o, P, r, step=i, total_steps=10) for i in range(1, 11) for o, r in jobs])
        await world.send(*[event(o, OK, r, blobs=[world.image(n)]) for n, (o, r) in enumerate(jobs)])
        await world.slack.wait_for(lambda c: c.path == "chat.update" and c.body.get("text", "").endswith("see below"),
                                   count=8, timeout_s=60)
    updates = world.slack.matching(lambda c: c.path == "chat.update")
    assert 8 < len(updates) <= 50  # chat.update is Tier 3: about 50 a minute per workspace; 88 events came
    assert len(world.slack.pngs(fs.CHANNEL_ID)) == 8  # no final result was skipped
    assert all(world.slack.messages[o.status_message_id].text.endswith("done: see below") for o, _ in jobs)


async def test_slack_a_5000_character_text_is_clipped_to_slacks_limits(world):
    from slack_sdk.web.async_client import AsyncWebClient

    from bots import render
    from bots.slack_post import SlackPoster

    o = world.slack_origin()
    poster = SlackPoster(AsyncWebClient(token=fs.BOT_TOKEN, base_url=world.slack.api_base))
    long = "✅ " + "y" * 5000
    await poster._edit_or_post(o, long, render.slack_blocks(long))  # the fake refuses a section over 3000
    section = world.slack.messages[o.status_message_id].blocks[0]["text"]["text"]
    assert len(section) == 3000 and section.endswith("…") and section.startswith("✅ yyy")
    huge = "z" * 50000
    await poster._edit_or_post(o, huge, render.slack_blocks(huge))  # and a message's text over 40000
    msg = world.slack.messages[o.status_message_id]
    assert len(msg.text) == 40000 and msg.text.endswith("…") and len(msg.edits) == 2


async def test_the_fake_discord_refuses_what_discord_refuses(world):
    import aiohttp

    fake, bot = world.discord, {"Authorization": f"Bot {world.discord.bot_token}"}
    late = fake.deferred()
    late.callbacks.clear()
    fake.advance(3.5)
    async with aiohttp.ClientSession() as session:
        async def call(method: str, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
            async with session.request(method, fake.api_base + path, json=body, headers=headers or {}) as resp:
                return resp.status, await resp.json()

        assert await call("POST", f"/interactions/{late.id}/{late.token}/callback", {"type": 5}) == (
            404, {"message": "Unknown interaction", "code": 10062})
        channel = f"/channels/{fd.CHANNEL_ID}/messages"
        status, said = await call("POST", channel, {"content": "x" * 2001}, bot)
        assert (status, said["code"]) == (400, 50035) and "content" in said["errors"]
        status, said = await call("POST", channel, {"content": "hi", "components": [{"type": 1}] * 6}, bot)
        assert (status, said["code"]) == (400, 50035)
        fake.advance(15 * 60)
        status, said = await call("PATCH", f"/webhooks/{fd.APPLICATION_ID}/{late.token}/messages/@original",
                                  {"content": "late"})
        assert (status, said["code"]) == (401, 50027)
        status, said = await call("PATCH", f"{channel}/{late.original.id}", {"content": "edited"}, bot)
        assert status == 200 and late.original.content == "edited"  # a bot may edit its interaction response


async def test_slack_a_5xx_on_the_edit_after_the_upload_does_not_post_the_result_twice(world):
    o = world.slack_origin()
    world.slack.fail("POST", r"^chat\.update$", 500)
    async with world.running():
        await world.send(event(o, OK, rid(), blobs=[world.image()]))
        await world.slack.wait_for(lambda c: c.path == "chat.update" and c.status == 200, timeout_s=30)
    assert len(world.slack.pngs(fs.CHANNEL_ID)) == 1  # the retry skipped the upload that had gone through
    assert world.slack.messages[o.status_message_id].text.endswith("done: see below")
