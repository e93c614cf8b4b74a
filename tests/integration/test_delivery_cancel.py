"""Delivery of a cancelled request against fake Discord and Slack, a real broker and Redis: statuses carry the
Cancel button and the expected time; `cancelled` is a final like the others (one per request, through the
markers), shown as a short line that pings nobody, and whichever final comes second is dropped."""

import asyncio
import uuid

from schemas.messages import EventKind
from tests.fakes import discord as fd
from tests.fakes import slack as fs
from tests.fakes.world import World, event

Q, P, OK, CANCELLED = EventKind.queued, EventKind.progress, EventKind.succeeded, EventKind.cancelled


def rid() -> str:
    return uuid.uuid4().hex


async def handled(delivery, count: int, timeout_s: float = 20) -> None:
    async def enough() -> None:
        while delivery.handled < count:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(enough(), timeout_s)


def webhook_edits(world: World, token: str):
    return world.discord.matching(lambda c: c.method == "PATCH" and c.path.endswith(f"/{token}/messages/@original"))


async def test_discord_a_cancel_after_the_status_edits_it_pings_nobody_and_the_late_result_is_dropped(world):
    it = world.discord.deferred()
    o, r = world.discord_origin(it), rid()
    async with world.running(edit_interval_s=0) as delivery:
        await world.send(event(o, Q, r, queue_position=2, eta_s=90, lane="relax"))
        await handled(delivery, 1)
        [status] = webhook_edits(world, it.token)
        assert status.body["components"][0]["components"][0]["custom_id"] == f"skill:cancel:{r}"
        assert ", ready <t:" in status.body["content"] and " · relax mode: " in status.body["content"]
        await world.send(event(o, CANCELLED, r), event(o, OK, r, blobs=[world.image()]),
                         event(o, P, r, step=5, total_steps=20))
        await handled(delivery, 4)
    _, cancelled = webhook_edits(world, it.token)  # the late result and progress edited nothing
    assert cancelled.body["content"] == "🛑 cancelled: *a drummer's paradiddle*" and not cancelled.files
    assert cancelled.body["components"] == [] and cancelled.body["allowed_mentions"] == {"parse": [], "users": []}
    assert it.original.content == "🛑 cancelled: *a drummer's paradiddle*" and it.original.components == []
    assert world.discord.channel(fd.CHANNEL_ID) == [it.original]  # no ping, no result
    assert world.discord.matching(lambda c: c.method == "POST") == []


async def test_discord_a_cancel_after_the_result_changes_nothing(world):
    it = world.discord.deferred()
    o, r = world.discord_origin(it), rid()
    async with world.running(edit_interval_s=0) as delivery:
        await world.send(event(o, OK, r, blobs=[world.image()]), event(o, CANCELLED, r))
        await handled(delivery, 2)
    [result] = webhook_edits(world, it.token)
    assert result.files and it.original.content.startswith(f"✅ <@{fd.USER_ID}>")
    assert [b["label"] for b in it.original.components[0]["components"]] == ["Re-roll", "Variations", "Remix", "Parameters", "Delete"]


async def test_slack_a_cancel_after_the_status_edits_it_posts_nothing_and_the_late_result_is_dropped(world):
    o, r = world.slack_origin(), rid()
    status_msg = world.slack.messages[o.status_message_id]
    async with world.running(edit_interval_s=0) as delivery:
        await world.send(event(o, P, r, step=5, total_steps=20, eta_s=30))
        await handled(delivery, 1)
        assert ", ready by <!date^" in status_msg.text and " UTC>: _a drummer's paradiddle_" in status_msg.text
        [_, actions] = status_msg.blocks
        assert [(e["action_id"], e["value"]) for e in actions["elements"]] == [("skill_cancel", r)]
        await world.send(event(o, CANCELLED, r), event(o, OK, r, blobs=[world.image()]))
        await handled(delivery, 3)
    assert status_msg.text == "🛑 cancelled: _a drummer's paradiddle_" and len(status_msg.blocks) == 1
    assert world.slack.visible(fs.CHANNEL_ID) == [status_msg] and world.slack.files == []
    assert [c.path for c in world.slack.calls] == ["chat.update", "chat.update"]  # nothing posted, nobody told


async def test_slack_a_cancel_after_the_result_changes_nothing(world):
    o, r = world.slack_origin(), rid()
    async with world.running(edit_interval_s=0) as delivery:
        await world.send(event(o, OK, r, blobs=[world.image()]), event(o, CANCELLED, r))
        await handled(delivery, 2)
    status_msg = world.slack.messages[o.status_message_id]
    assert status_msg.text.startswith(f"✅ <@{fs.USER_ID}>") and status_msg.text.endswith("done: see below")
    assert len(world.slack.pngs(fs.CHANNEL_ID)) == 1
