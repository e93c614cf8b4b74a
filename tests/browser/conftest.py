"""A real `skillgen web` in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

`embedded_page` runs `skillgen web --embedded` once per module (broker, consumer on the shipped model, a trainer and
the page, in one process group) with progress events on every step and training from the page on; `web_server(**env)` runs a plain `skillgen web` against
whatever the SKILL_* variables name. Each test gets a fresh browser page, so a new person (session) each time.
Without a Chromium binary the tests skip, saying how to install one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from skillgen.tools.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"


def chromium() -> str:
    found = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if not found:
        pytest.skip("no Chromium binary (/usr/bin/chromium): `apt-get install -y chromium chromium-driver` "
                    "(.ci/run installs them when missing)")
    return found


class WebServer:
    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "skillgen.cli", "web", *argv, "--port", str(self.port)],
                                     env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"skillgen web exited with {self.proc.returncode}:\n{self.log()}", pytrace=False)
            try:
                with urllib.request.urlopen(self.url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"skillgen web did not serve {self.url} within {timeout_s:.0f}s:\n{self.log()}", pytrace=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: the page stops its children itself
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILL_")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def embedded_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    chromium()
    work = tmp_path_factory.mktemp("web-embedded")
    env = _env(SKILL_PROGRESS_INTERVAL_S="0", SKILL_DEFAULT_STEPS="12", SKILL_BLOB_URL=(work / "blobs").as_uri(),
               SKILL_ADAPTER_URL=(work / "adapters").as_uri(), SKILL_WEB_TRAINING="true")
    server = WebServer(["--embedded"], env, work / "web.log")
    try:
        server.wait_ready(timeout_s=240)
        yield server
    finally:
        server.stop()


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[Callable[..., WebServer]]:
    """`web_server(SKILL_...=...)`: a plain `skillgen web` with these settings (and the test's own, if any)."""
    chromium()
    servers: list[WebServer] = []

    def start(**env: str) -> WebServer:
        server = WebServer([], {**os.environ, **env}, tmp_path / f"web-{len(servers)}.log")
        servers.append(server)
        server.wait_ready(timeout_s=60)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra has it)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    opened = context.new_page()
    yield opened
    context.close()
