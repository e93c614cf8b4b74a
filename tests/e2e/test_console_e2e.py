"""The backbone, end to end: a /skill line at the console travels the real broker, the real consumer and the
events topic, and a PNG of the requested size lands on disk."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from bots.console import ConsoleBot
from bots.settings import BotSettings
from consumer.settings import ConsumerSettings
from consumer.worker import Worker, load_engine_from
from schemas.messages import EventKind

pytestmark = pytest.mark.e2e


async def test_console_request_becomes_a_png_of_the_requested_size(skill_env, tiny_model, tmp_path):
    csettings = ConsumerSettings(model=str(tiny_model), device="cpu", progress_interval_s=0)
    engine = await asyncio.to_thread(load_engine_from, csettings)
    worker = Worker(csettings, engine)
    task = asyncio.create_task(worker.run())
    try:
        async with ConsoleBot(BotSettings(default_steps=4), tmp_path / "out") as bot:
            req = await bot.submit("/skill a person playing guitar --size 64x96 --steps 3")
            seen = []
            result = await bot.wait(req, timeout_s=120, on_event=lambda ev: seen.append(ev.kind))
    finally:
        worker.stop()
        await task
    assert result.final.kind == EventKind.succeeded, result.final.message
    assert EventKind.started in seen and EventKind.progress in seen
    assert [p.parent for p in result.paths] == [tmp_path / "out"]
    with Image.open(result.paths[0]) as img:
        assert img.format == "PNG" and img.size == (64, 96)
    # the event carried a reference, and the store holds exactly those bytes
    assert result.final.blobs[0].bytes == result.paths[0].stat().st_size


def test_console_tells_the_sender_what_is_wrong(skill_env):
    lines = "\n".join(
        [
            "/skill a cat --size 1001x64",
            "/skill   --steps 3",
            "/skill a cat --bogus 1",
            "/skill a cat --n 9",
            "/skill help",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-m", "skillgen.cli", "bot", "console"],
        input=lines, capture_output=True, text=True, timeout=60, env=skill_env.environ(),
    )
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stdout.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: --size/--ar width: must be a multiple of 8 between 64 and 1024 pixels, got 1001",
        "error: the prompt: prompt is empty: describe the skill to draw, e.g. 'a drummer's paradiddle, top view'",
        "error: unknown option --bogus; options are --no, --ar, --size, --steps, --seed, --n, --adapter, --scheduler, --relax, --turbo",
        "error: --n: Input should be less than or equal to 4",
    ]
    assert "/skill <prompt>" in out.stdout  # the help text
    assert out.returncode == 1


def _tansu_pids(marked: str | None = None) -> set[int]:
    """Running Tansu brokers; with `marked`, only those whose environment carries that marker (the ones a run we
    started left behind, never another test's or another engineer's)."""
    out = subprocess.run(["pgrep", "-f", "tansu broker"], capture_output=True, text=True)
    pids = {int(p) for p in out.stdout.split()}
    if marked is None:
        return pids

    def carries(pid: int) -> bool:
        try:
            return f"SKILLGEN_TEST_MARK={marked}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            return False

    return {p for p in pids if carries(p)}


@pytest.mark.slow
def test_demo_writes_a_png_and_leaves_nothing_running(tmp_path):
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILL_")} | {"SKILLGEN_TEST_MARK": mark}
    out = subprocess.run(
        [sys.executable, "-m", "skillgen.cli", "demo", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=240, env=env, cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stdout + out.stderr
    written = [line.split("image written to ", 1)[1] for line in out.stdout.splitlines() if "image written to" in line]
    assert len(written) == 1 and Path(written[0]).exists()
    assert "stage timings:" in out.stdout
    assert _tansu_pids(marked=mark) == set()  # the demo's broker went with it


@pytest.mark.parametrize(
    "prompt, color, light",
    [
        ("a red football skill icon on a light background", "red", True),
        ("a blue guitar skill icon on a dark background", "blue", False),
        ("a green laptop skill icon on a dark background", "green", False),
    ],
)
async def test_the_embedded_model_draws_what_the_console_asked_for(skill_env, tmp_path, prompt, color, light):
    """Through the whole system with the shipped model: the picture, not just a PNG, is checked."""
    from bench.quality import background_is_light, dominant_color
    from skillgen.runtime.settings import EMBEDDED_MODEL_DIR

    csettings = ConsumerSettings(model=str(EMBEDDED_MODEL_DIR), device="cpu")
    engine = await asyncio.to_thread(load_engine_from, csettings)
    worker = Worker(csettings, engine)
    task = asyncio.create_task(worker.run())
    try:
        bot_settings = BotSettings(default_width=64, default_height=64, default_steps=20, default_guidance=2.5)
        async with ConsoleBot(bot_settings, tmp_path / "out") as bot:
            req = await bot.submit(f"/skill {prompt} --seed 3")
            result = await bot.wait(req, timeout_s=120)
    finally:
        worker.stop()
        await task
    assert result.final.kind == EventKind.succeeded, result.final.message
    with Image.open(result.paths[0]) as img:
        assert dominant_color(img.convert("RGB")) == color
        assert background_is_light(img.convert("RGB")) is light
