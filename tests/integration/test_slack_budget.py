"""Slack's chat.update budget per workspace is one window for every delivery replica (bots/slack_budget.py), kept
in the real Redis: two posters (two replicas) together make at most PROGRESS_EDITS_PER_MIN progress edits a
minute to one workspace, a final result is never refused, and another workspace has its own window."""

import pytest
from slack_sdk.web.async_client import AsyncWebClient

from bots.slack_post import SlackPoster
from schemas.messages import EventKind
from skillgen.runtime.redis import Store
from tests.fakes import slack as fs
from tests.fakes.world import event

pytestmark = pytest.mark.integration


def updates(world) -> int:
    return len(world.slack.matching(lambda c: c.path == "chat.update" and c.status == 200))


async def test_two_delivery_replicas_share_one_workspaces_edit_budget(world):
    stores = [Store.from_settings(world.settings()) for _ in range(2)]
    replicas = [SlackPoster(AsyncWebClient(token=fs.BOT_TOKEN, base_url=world.slack.api_base), 5, store)
                for store in stores]
    try:
        origins = [world.slack_origin() for _ in range(4)]
        for step in range(1, 7):  # 24 progress events, alternating replicas: 5 edits go out, the rest are skipped
            for n, o in enumerate(origins):
                await replicas[n % 2].status(event(o, EventKind.progress, f"r{n}", step=step, total_steps=6))
        assert updates(world) == 5
        # A final result is counted, never refused, on either replica.
        await replicas[1]._edit_or_post(origins[0], "✅ done", [])
        assert updates(world) == 6
        # Another workspace has a window of its own.
        other = world.slack_origin().model_copy(update={"team_id": "T0OTHER"})
        await replicas[0].status(event(other, EventKind.progress, "r9", step=1, total_steps=6))
        assert updates(world) == 7
    finally:
        for store in stores:
            await store.close()


async def test_without_redis_each_replica_keeps_its_own_window(world):
    replicas = [SlackPoster(AsyncWebClient(token=fs.BOT_TOKEN, base_url=world.slack.api_base), 3, Store(None))
                for _ in range(2)]
    o = world.slack_origin()
    for step in range(1, 9):
        await replicas[step % 2].status(event(o, EventKind.progress, "r1", step=step, total_steps=8))
    assert updates(world) == 6  # 3 each: what a replica cannot know about the other, it cannot count
