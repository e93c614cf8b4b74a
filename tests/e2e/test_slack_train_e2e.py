"""`/skill-train` from Slack end to end: the real Bolt app with the trainer's extension -> a thread with images
shared into it -> `go`: the bot fetches the files from the fake Slack's private file host with its own token into
the blob store -> real broker (the request carries blob references, no Slack URL) -> the trainer service (tiny
model, a few steps, no Slack token), which reads the blobs back -> delivery edits the status message with
progress and uploads the sample grid into the thread."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from schemas.limits import IngestLimits
from schemas.messages import FineTuneRequest
from skillgen.adapters.registry import Registry
from skillgen.runtime.blobstore import BlobStore
from tests.fakes.slack import CHANNEL_ID, TEAM_ID, USER_ID, FakeSlack
from tests.fakes.world import World
from tests.harness import serving
from tests.integration.test_slack_train import running_bot
from tests.integration.test_trainer_e2e import red_circle_png, trainer_settings
from trainer.worker import TrainerWorker

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


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


def trainer_running(model: Path, tmp_path: Path):
    """The trainer with the default download policy and no Slack token (it has no field for one): everything it
    trains on comes from the blob store."""
    settings = trainer_settings(model, tmp_path, IngestLimits())
    assert "slack_bot_token" not in type(settings).model_fields
    return serving(TrainerWorker(settings))


async def test_slack_thread_to_adapter_with_progress_and_the_sample_grid_in_the_thread(
    skill_env, fake_slack, monkeypatch, tmp_path, tiny_model
):
    async with running_bot(skill_env, fake_slack, monkeypatch, tmp_path) as bot, \
            trainer_running(tiny_model, tmp_path), \
            World(skill_env, slack=fake_slack).running(edit_interval_s=0):
        status = await bot.start_thread("circles --trigger zq --steps 10 --caption a red circle")
        await bot.share(status.ts, [(f"{i}.png", red_circle_png(i)) for i in range(3)], text="go")
        [req] = await bot.requests.wait(1)
        await fake_slack.wait_for(lambda c: c.path == "files.completeUploadExternal", timeout_s=120)

    assert isinstance(req, FineTuneRequest) and req.origin.status_message_id == status.ts
    assert req.image_urls == [] and "files-pri" not in req.model_dump_json() and len(req.images) == 3
    store = BlobStore(skill_env.vars["SKILL_BLOB_URL"])
    assert [store.get(ref) for ref in req.images] == [red_circle_png(i) for i in range(3)]
    fetched = fake_slack.matching(lambda c: c.path.startswith("files-pri/"))  # by the bot, before publishing
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
