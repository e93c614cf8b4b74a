"""`skillgen demo`: the whole path on one machine, no tokens and no external services.

Embedded broker -> console front-end -> skill.generate -> consumer (embedded model) -> skill.events -> PNG.
Everything it starts, it stops: the broker is a child process killed on the way out, the rest is in-process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from bots.console import ConsoleBot, describe
from bots.settings import BotSettings
from consumer.settings import ConsumerSettings
from consumer.worker import Worker, load_engine_from
from schemas.messages import EventKind
from skillgen.runtime.kafka import ensure_topics
from skillgen.runtime.settings import RANDOM_TINY_DIR, default_model
from skillgen.tools.embedded import EmbeddedBroker

log = logging.getLogger("skillgen.tools.demo")

DEMO_PROMPT = "/skill a person playing guitar"


def add_arguments(parser) -> None:
    parser.add_argument("--prompt", default=DEMO_PROMPT, help=f"the command to send (default: {DEMO_PROMPT!r})")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where the PNG is written (default ./out)")
    parser.add_argument("--timeout", type=float, default=170, help="seconds to wait for the image (default 170)")


def run(args) -> int:
    return asyncio.run(demo(args.prompt, args.out, args.timeout))


async def demo(prompt: str, out: Path, timeout_s: float) -> int:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model = default_model()
    if model == str(RANDOM_TINY_DIR) and not (RANDOM_TINY_DIR / "model_index.json").exists():
        from skillgen.tools.tiny import build_tiny

        log.info("no embedded model found: building a tiny random one in %s", RANDOM_TINY_DIR)
        await asyncio.to_thread(build_tiny, RANDOM_TINY_DIR)
        timings["build model"] = time.perf_counter() - t
    with EmbeddedBroker() as bootstrap:
        timings["start broker"] = time.perf_counter() - t - sum(timings.values())
        common = {"kafka_bootstrap": bootstrap, "kafka_idempotence": False, "blob_url": f"file://{out.resolve()}/blobs"}
        # Tansu makes a new group's first join wait half the session timeout: a short one starts the demo sooner.
        csettings = ConsumerSettings(
            model=model,
            kafka_session_timeout_ms=2000,
            kafka_heartbeat_interval_ms=200,
            kafka_rebalance_timeout_ms=2000,
            **common,
        )
        await ensure_topics(csettings, partitions=2)
        mark = time.perf_counter()
        engine = await asyncio.to_thread(load_engine_from, csettings)
        timings["load model"] = time.perf_counter() - mark
        worker = Worker(csettings, engine)
        ready = asyncio.Event()
        consumer_task = asyncio.create_task(worker.run(ready.set))
        await asyncio.wait({consumer_task, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if consumer_task.done():
            consumer_task.result()  # raises what stopped it
        # The embedded model draws 64x64 icons; guidance 2.5 is where it follows colour and background words best
        # (models/skill-icons/TRAINING.md).
        bsettings = BotSettings(default_width=64, default_height=64, default_steps=20, default_guidance=2.5, **common)
        try:
            async with ConsoleBot(bsettings, out) as bot:
                print(f"> {prompt}", flush=True)
                req = await bot.submit(prompt)
                result = await bot.wait(req, timeout_s, on_event=lambda ev: print(f"  {describe(ev)}", flush=True))
        finally:
            worker.stop()
            await consumer_task
    for stage in ("queued", "started", "succeeded", "failed", "blocked"):
        if stage in result.timings_s:
            timings[f"publish -> {stage}"] = result.timings_s[stage]
    print("\nstage timings:")
    for stage, secs in timings.items():
        print(f"  {stage:<24} {secs * 1000:9.0f} ms")
    if result.final.kind != EventKind.succeeded:
        print(f"\nno image: {describe(result.final)}")
        return 1
    for p in result.paths:
        print(f"\nimage written to {p}")
    return 0
