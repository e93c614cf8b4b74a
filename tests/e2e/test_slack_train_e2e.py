"""`/skill-train` from Slack end to end: the real Bolt app with the trainer's extension -> a thread with images
shared into it -> `go` -> real broker -> the trainer service (tiny model, a few steps), which fetches the files
from the fake Slack's private file host with the bot token -> delivery edits the status message with progress
and uploads the sample grid into the thread."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from schemas.messages import FineTuneRequest
from tests.fakes.slack import CHANNEL_ID, TEAM_ID, USER_ID, FakeSlack
from tests.fakes.world import World
from tests.harness import FAST_GROUP
from tests.integration.test_slack_train import running_bot
from trainer.ingest import IngestLimits
from trainer.registry import Registry
from trainer.settings import LoraRecipe, TrainerSettings
from trainer.worker import TrainerWorker

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def red_circle_png(i: int) -> bytes:
    image = Image.new("RGB", (64, 64), (15, 15, 15))
    ImageDraw.Draw(image).ellipse((6 + 2 * i, 6, 58, 58 - 2 * i), fill=(220, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # On a shared 2-core machine two torch threads run far slower once another process takes a core.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


@asynccontextmanager
async def trainer_running(model: Path, tmp_path: Path, fake: FakeSlack) -> AsyncIterator[TrainerWorker]:
    limits = IngestLimits(allowed_hosts=(fake.file_host,), slack_file_hosts=(fake.file_host,), require_https=False,
                          allow_private_addresses=True)
    settings = TrainerSettings(
        _env_file=None, model=str(model), device="cpu", adapter_url=(tmp_path / "adapters").as_uri(),
        work_dir=tmp_path / "work", slack_bot_token=fake.bot_token, progress_interval_s=0, sample_images=2,
        sample_steps=2, ingest=limits, lora=LoraRecipe(lr=1e-2, batch_size=1), fetch_max_wait_ms=20,
        kafka_session_timeout_ms=FAST_GROUP["session_timeout_ms"],
        kafka_heartbeat_interval_ms=FAST_GROUP["heartbeat_interval_ms"],
        kafka_rebalance_timeout_ms=FAST_GROUP["rebalance_timeout_ms"],
    )
    worker = TrainerWorker(settings)
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(ready.set))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()
    assert ready.is_set(), "the trainer did not get ready in 60 s"
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


async def test_slack_thread_to_adapter_with_progress_and_the_sample_grid_in_the_thread(
    skill_env, fake_slack, monkeypatch, tmp_path, tiny_model
):
    async with running_bot(skill_env, fake_slack, monkeypatch, tmp_path) as bot, \
            trainer_running(tiny_model, tmp_path, fake_slack), \
            World(skill_env, slack=fake_slack).running(edit_interval_s=0):
        status = await bot.start_thread("circles --trigger zq --steps 10 --caption a red circle")
        await bot.share(status.ts, [(f"{i}.png", red_circle_png(i)) for i in range(3)], text="go")
        [req] = await bot.requests.wait(1)
        await fake_slack.wait_for(lambda c: c.path == "files.completeUploadExternal", timeout_s=120)

    assert isinstance(req, FineTuneRequest) and req.origin.status_message_id == status.ts
    fetched = fake_slack.matching(lambda c: c.path.startswith("files-pri/"))
    assert len(fetched) == 3 and {c.status for c in fetched} == {200}
    assert {c.headers.get("Authorization") for c in fetched} == {f"Bearer {fake_slack.bot_token}"}

    message = fake_slack.messages[status.ts]
    queued = message.edits.index(f"⏳ <@{USER_ID}> training `circles` queued: 3 images")
    steps = [i for i, text in enumerate(message.edits) if "step" in text and "/10" in text]
    assert steps and queued < steps[0] < steps[-1] < len(message.edits) - 1, message.edits
    assert message.text.startswith(f"✅ <@{USER_ID}>") and "circles" in message.text, message.text
    [grid] = fake_slack.pngs(CHANNEL_ID, status.ts)
    assert grid.is_png and fake_slack.pngs(CHANNEL_ID) == []

    meta = Registry((tmp_path / "adapters").as_uri()).meta(TEAM_ID, "circles", 1)
    assert (meta.training.steps, meta.training.images, meta.training.trigger) == (10, 3, "zq")
    assert meta.training.trained_by.platform == "slack" and meta.training.trained_by.user_id == USER_ID
