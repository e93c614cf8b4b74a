"""The local front-end: `/skill ...` lines on stdin, PNGs in ./out/. Same grammar and events as the chat bots."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bots.events import EventFollower
from bots.grammar import HELP, CommandError, parse
from bots.render import LANE_NOTES
from bots.settings import BotSettings
from schemas.codec import encode
from schemas.messages import EventKind, GenerateRequest, JobEvent, Origin, Platform
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.kafka import make_producer
from skillgen.safety.prompt import PromptPolicy

log = logging.getLogger("skillgen.console")


@dataclass
class Result:
    request: GenerateRequest
    final: JobEvent
    paths: list[Path] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)


class ConsoleBot:
    def __init__(self, settings: BotSettings, out_dir: Path = Path("out"), user: str = "local"):
        self.settings = settings
        self.out_dir = out_dir
        self.origin = Origin(platform=Platform.console, team_id="local", channel_id="console", user_id=user)
        self.blobs = BlobStore(settings.blob_url)
        self.follower = EventFollower(settings)
        self.policy = PromptPolicy.from_settings()  # the consumer's own, run early; the consumer stays authoritative

    async def __aenter__(self) -> "ConsoleBot":
        self.producer = make_producer(self.settings)
        await self.producer.start()
        try:
            await self.follower.start()
        except BaseException:
            await self.producer.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.follower.stop()
        await self.producer.stop()

    async def submit(self, line: str) -> GenerateRequest | None:
        """Publish the request a line asks for; None for help. Raises CommandError for bad input."""
        req = parse(line, self.origin, self.settings.defaults)
        if req is None:
            return None
        decision = self.policy.check(req.prompt, req.negative_prompt)
        if not decision.allowed:
            raise CommandError(decision.reason)
        self.follower.watch(req.request_id)
        value, headers = encode(req)
        # Keyed by content so identical requests meet on one partition (and one consumer) to be coalesced.
        from bots.keys import partition_key

        await self.producer.send_and_wait(self.settings.topics.generate, value, key=partition_key(req), headers=headers)
        return req

    async def wait(self, req: GenerateRequest, timeout_s: float = 300, on_event=None) -> Result:
        q = self.follower.watch(req.request_id)
        t0 = time.perf_counter()
        marks: dict[str, float] = {}
        async with asyncio.timeout(timeout_s):
            while True:
                event = await q.get()
                marks.setdefault(event.kind.value, time.perf_counter() - t0)
                if on_event:
                    on_event(event)
                if event.kind.terminal:
                    break
        result = Result(req, event, timings_s=marks)
        if event.kind == EventKind.succeeded:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for i, ref in enumerate(event.blobs):
                path = self.out_dir / f"{req.request_id}-{i}.png"
                path.write_bytes(self.blobs.get(ref))
                result.paths.append(path)
        return result


def describe(event: JobEvent) -> str:
    """One line per event: "queued, position 3, about 42s, relax mode", "step 5/20, about 12s", "cancelled"."""
    about = f", about {round(event.eta_s)}s" if event.eta_s is not None else ""
    lane = f", {LANE_NOTES[event.lane]}" if event.lane in LANE_NOTES else ""
    if event.kind == EventKind.progress:
        return f"step {event.step}/{event.total_steps}{about}"
    if event.kind == EventKind.queued and event.queue_position is not None:
        return f"queued, position {event.queue_position}{about}{lane}"
    if event.kind == EventKind.queued:
        return f"queued{about}{lane}"
    return event.kind.value + (f": {event.message}" if event.message else "")


async def repl(settings: BotSettings, out_dir: Path, lines) -> int:
    pending: list[asyncio.Task] = []
    failures = 0
    async with ConsoleBot(settings, out_dir) as bot:
        for line in lines:
            if not line.strip():
                continue
            try:
                req = await bot.submit(line)
            except CommandError as exc:
                print(f"error: {exc}", flush=True)
                failures += 1
                continue
            if req is None:
                print(HELP)
                continue
            print(f"{req.request_id}\tqueued", flush=True)

            def show(ev: JobEvent, rid=req.request_id) -> None:
                print(f"{rid}\t{describe(ev)}", flush=True)

            pending.append(asyncio.create_task(bot.wait(req, on_event=show)))
        for result in await asyncio.gather(*pending):
            for p in result.paths:
                print(f"{result.request.request_id}\t{p}", flush=True)
            failures += result.final.kind != EventKind.succeeded
    return 1 if failures else 0


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out"), help="where PNGs are written (default ./out)")


def run(args) -> int:
    lines = sys.stdin if not sys.stdin.isatty() else iter(lambda: input("skill> "), "quit")
    return asyncio.run(repl(BotSettings(), args.out, lines))
