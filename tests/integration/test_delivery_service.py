"""The chat services as processes: they import without torch, start from `skillgen bot ...` with settings
alone, refuse to start without their tokens, serve /healthz, and stop cleanly on SIGTERM."""

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from schemas.messages import EventKind
from skillgen.tools.embedded import free_port
from tests.fakes.slack import CHANNEL_ID, FakeSlack
from tests.fakes.world import World, event

NO_TORCH = (
    "import bots.discord_bot, bots.slack_bot, bots.delivery; import sys; "
    "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'a bot process imported torch'"
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILL_")}
    return {**env, "SKILL_KAFKA_BOOTSTRAP": "127.0.0.1:1", **extra}


@pytest.mark.unit
def test_bot_processes_import_without_torch():
    out = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("command", "env", "says"),
    [
        ("delivery", {}, "delivery has nowhere to post: set SKILL_DISCORD_TOKEN and/or SKILL_SLACK_BOT_TOKEN"),
        ("discord", {}, "set SKILL_DISCORD_TOKEN to the bot token"),
        ("slack", {}, "set SKILL_SLACK_BOT_TOKEN to the bot token"),
        ("slack", {"SKILL_SLACK_BOT_TOKEN": "xoxb-1"}, "Socket Mode needs SKILL_SLACK_APP_TOKEN"),
        ("slack", {"SKILL_SLACK_BOT_TOKEN": "xoxb-1", "SKILL_SLACK_MODE": "http"}, "set SKILL_SLACK_SIGNING_SECRET"),
    ],
)
def test_a_missing_token_is_one_clear_line(command, env, says):
    out = subprocess.run([sys.executable, "-m", "skillgen.cli", "bot", command], capture_output=True, text=True,
                         timeout=60, env=clean_env(**env))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert says in out.stderr and len(out.stderr.strip().splitlines()) == 1


async def test_skillgen_bot_delivery_posts_serves_healthz_and_stops_on_sigterm(skill_env):
    fake = await FakeSlack().start()
    world = World(skill_env, slack=fake)
    port = free_port()
    env = skill_env.environ() | {"SKILL_SLACK_BOT_TOKEN": fake.bot_token, "SKILL_SLACK_API_BASE": fake.api_base,
                                 "SKILL_METRICS_PORT": str(port),
                                 "SKILL_DELIVERY_STATE_DIR": str(skill_env.blob_dir.parent / "delivery-state")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "skillgen.cli", "bot", "delivery", env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("delivery never became healthy")
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert "skill_delivery_posts_total" in await resp.text()
        await world.send(event(world.slack_origin(), EventKind.succeeded, "r" * 32, blobs=[world.image()]))
        await fake.wait_for(lambda c: c.path == "files.completeUploadExternal", timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await fake.stop()
    assert len(fake.pngs(CHANNEL_ID)) == 1
