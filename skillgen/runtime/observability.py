"""`/metrics` (Prometheus text format) and `/healthz` over HTTP, for every long-running service.

    async with metrics_server(settings.metrics_port, registry, health=worker.health):
        ...

Port 0 serves nothing. The server runs on the service's own event loop, so a loop that stops turning also
stops answering /healthz, which is what a liveness probe should see. `health` returns (ok, detail):
200 with the detail when ok, 503 otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
)

log = logging.getLogger("skillgen.observability")

HealthFn = Callable[[], tuple[bool, str]]


def _always_ok() -> tuple[bool, str]:
    return True, "ok"


def make_app(registry: CollectorRegistry = REGISTRY, health: HealthFn = _always_ok) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        ok, detail = health()
        return web.Response(text=detail + "\n", status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


@asynccontextmanager
async def metrics_server(
    port: int, registry: CollectorRegistry = REGISTRY, health: HealthFn = _always_ok, host: str = "0.0.0.0"
) -> AsyncIterator[str | None]:
    """Serve /metrics and /healthz on `port` while the block runs; yields the base URL (None when port is 0)."""
    if not port:
        yield None
        return
    runner = web.AppRunner(make_app(registry, health), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", host, port)
        yield f"http://127.0.0.1:{port}" if host == "0.0.0.0" else f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def stop_on_signals(stop) -> None:
    """Call `stop()` on SIGTERM/SIGINT: services drain their work instead of dying mid-job.
    Outside the main thread (tests running a service in-process) signals stay with the caller."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
