"""What both fakes share: recorded calls, injected faults, and waiting for a recorded call."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web


@dataclass
class Upload:
    filename: str
    data: bytes

    @property
    def is_png(self) -> bool:
        return self.data.startswith(b"\x89PNG\r\n\x1a\n")


@dataclass
class Call:
    method: str
    path: str
    at: float  # time.monotonic() when it arrived
    status: int  # what the fake answered
    headers: dict[str, str]
    body: dict  # JSON body, form fields, or a multipart's payload_json
    files: list[Upload] = field(default_factory=list)


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    headers: dict[str, str]
    body: dict
    times: int
    when: Callable[[dict, list[Upload]], bool] | None = None


class Recorder:
    """Calls and faults; a subclass serves them."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self._changed = asyncio.Condition()

    def fail(self, method: str, path_regex: str, status: int, *, times: int = 1,
             headers: dict[str, str] | None = None, body: dict | None = None,
             when: Callable[[dict, list[Upload]], bool] | None = None) -> None:
        """Answer the next `times` calls whose path matches `path_regex` (and whose body and files satisfy
        `when`) with `status` instead of serving them."""
        self.faults.append(Fault(method.upper(), re.compile(path_regex), status, headers or {}, body or {}, times,
                                 when))

    def fault_for(self, method: str, path: str, body: dict | None = None,
                  files: list[Upload] | None = None) -> Fault | None:
        for fault in self.faults:
            if fault.when is not None and not fault.when(body or {}, files or []):
                continue
            if fault.times > 0 and fault.method == method and fault.path.search(path):
                fault.times -= 1
                return fault
        return None

    async def record(self, call: Call) -> None:
        async with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[Call], bool], timeout_s: float = 20, count: int = 1) -> list[Call]:
        """The first `count` recorded calls that match, waiting up to `timeout_s` for them."""
        async def enough() -> list[Call]:
            async with self._changed:
                while True:
                    found = [c for c in self.calls if predicate(c)]
                    if len(found) >= count:
                        return found[:count]
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(enough(), timeout_s)
        except TimeoutError:
            seen = "\n".join(f"  {c.status} {c.method} {c.path} {c.body}" for c in self.calls) or "  (none)"
            raise AssertionError(f"no {count} matching call(s) within {timeout_s}s; calls so far:\n{seen}") from None

    def matching(self, predicate: Callable[[Call], bool]) -> list[Call]:
        return [c for c in self.calls if predicate(c)]


async def read_body(request: web.Request) -> tuple[dict, list[Upload]]:
    """JSON, form or multipart (Discord's payload_json + files[n], Slack's form fields) as one dict and files."""
    ctype = request.content_type
    if ctype.startswith("multipart/"):
        body: dict = {}
        files: list[Upload] = []
        reader = await request.multipart()
        async for part in reader:
            data = await part.read()
            if part.filename:
                files.append(Upload(part.filename, bytes(data)))
            elif part.name == "payload_json":
                body.update(json.loads(data))
            else:
                body[part.name] = data.decode()
        return body, files
    raw = await request.read()
    if not raw:
        return {}, []
    if ctype == "application/json":
        data = json.loads(raw)
        return (data if isinstance(data, dict) else {"_list": data}), []
    if ctype == "application/x-www-form-urlencoded":
        form = await request.post()
        return {k: v for k, v in form.items()}, []
    return {"_raw": raw}, []


def now() -> float:
    return time.monotonic()


class Server:
    """An aiohttp app on a free loopback port."""

    def __init__(self, app: web.Application):
        self.app = app
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class FakePlatform(Recorder):
    """A fake chat platform: its routes on a `Server`, and the WebSockets it holds open (gateway, Socket Mode)."""

    def __init__(self, routes: list[web.AbstractRouteDef]) -> None:
        super().__init__()
        self._sockets: list[web.WebSocketResponse] = []
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(routes)
        self.server = Server(app)

    async def start(self) -> Self:
        await self.server.start()
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        await self.server.stop()
