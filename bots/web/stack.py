"""`skillgen web --embedded`: the embedded broker and one consumer as child processes of the page's process.

The page's process stays a bot process (no torch: docs/architecture.md's floors), so what needs more runs beside
it, in its process group: a Ctrl-C in the terminal reaches all three, and each child also gets SIGTERM when the
page's process dies (Linux's parent-death signal), so nothing outlives it.

- the broker: skillgen/tools/embedded.py's EmbeddedBroker (Tansu, in memory), run by a small Python child because
  a bot may not import the tools floor; it stops Tansu when told to, or when the page's process goes away.
- the consumer: `skillgen consumer` on SKILL_MODEL (default: the shipped embedded model), with short group
  timeouts for Tansu (as `skillgen demo` uses) and /healthz on a free loopback port, which says when it is ready.
- with SKILL_WEB_TRAINING, a trainer (`skillgen trainer`) on the same model and adapter registry.

Without SKILL_SIGNING_KEY a key is made for the run, so requests and cancels are sealed as the chat bots seal them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

from skillgen.runtime.settings import RANDOM_TINY_DIR, default_model

# The broker's child: EmbeddedBroker until SIGTERM/SIGINT or until its stdin (the page's end) closes.
_BROKER = """\
import signal, sys
from skillgen.tools.embedded import EmbeddedBroker
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
broker = EmbeddedBroker(int(sys.argv[1]))
try:
    broker.start()
    print("ready", flush=True)
    sys.stdin.read()
except KeyboardInterrupt:
    pass
finally:
    broker.stop()
"""
# Tansu makes a new group's first join wait half the session timeout: short ones start the consumer sooner.
_FAST_GROUP = {"SKILL_KAFKA_SESSION_TIMEOUT_MS": "2000", "SKILL_KAFKA_HEARTBEAT_INTERVAL_MS": "200",
               "SKILL_KAFKA_REBALANCE_TIMEOUT_MS": "2000"}
# The embedded model draws 64x64 icons and follows colour and background words best at guidance 2.5
# (models/skill-icons/TRAINING.md); a deployment's own SKILL_DEFAULT_* still win.
_EMBEDDED_DEFAULTS = {"SKILL_DEFAULT_WIDTH": "64", "SKILL_DEFAULT_HEIGHT": "64", "SKILL_DEFAULT_GUIDANCE": "2.5"}

# LoRA on the embedded model (README, "Fine-tuning"): a higher learning rate, samples at its guidance.
_EMBEDDED_TRAINING = {"SKILL_LORA__LR": "5e-3", "SKILL_SAMPLE_GUIDANCE": "2.5"}


class StackError(RuntimeError):
    """The embedded broker or consumer did not start; the message says which and why."""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux only; elsewhere Ctrl-C still reaches all)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class EmbeddedStack:
    """`async with EmbeddedStack() as env:` the broker and a ready consumer; `env` is the SKILL_* the page uses."""

    def __init__(self, model: str | None = None, adapter_url: str | None = None, trainer: bool = False,
                 ready_timeout_s: float = 600, log=print):
        self.model = model or os.environ.get("SKILL_MODEL") or default_model()
        self.adapter_url = adapter_url
        self.trainer = trainer
        self.ready_timeout_s = ready_timeout_s
        self.log = log
        self.children: list[subprocess.Popen] = []

    def _spawn(self, argv: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent, **kw)
        self.children.append(proc)
        return proc

    async def __aenter__(self) -> dict[str, str]:
        try:
            return await self._start()
        except BaseException:
            self.stop()
            raise

    async def __aexit__(self, *exc) -> None:
        self.stop()

    async def _start(self) -> dict[str, str]:
        port = free_port()
        env = {
            "SKILL_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
            "SKILL_KAFKA_IDEMPOTENCE": "false",  # Tansu's memory storage refuses idempotent producers
            "SKILL_MODEL": self.model,
            "SKILL_SIGNING_KEY": os.environ.get("SKILL_SIGNING_KEY") or secrets.token_hex(32),
        }
        if self.adapter_url:  # one registry for the page's Adapters tab, the consumer and the trainer
            env["SKILL_ADAPTER_URL"] = self.adapter_url
        if self.model == default_model():
            env |= {k: v for k, v in _EMBEDDED_DEFAULTS.items() if not os.environ.get(k)}
        base = {**os.environ, **env}
        if self.model == str(RANDOM_TINY_DIR) and not (RANDOM_TINY_DIR / "model_index.json").exists():
            self.log(f"no embedded model found: building a tiny random one in {RANDOM_TINY_DIR}")
            await self._wait(self._spawn([sys.executable, "-m", "skillgen.cli", "model", "tiny", "--out",
                                          str(RANDOM_TINY_DIR)], base), "building the tiny model")
        broker = self._spawn([sys.executable, "-c", _BROKER, str(port)], base, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
        line = await asyncio.to_thread(broker.stdout.readline)
        if line.strip() != b"ready":
            raise StackError(f"the embedded broker did not start (exit {broker.poll()}): run `make install`")
        self.log(f"embedded broker on {env['SKILL_KAFKA_BOOTSTRAP']}")

        from skillgen.runtime.kafka import ensure_topics
        from skillgen.runtime.settings import CommonSettings

        os.environ.update(env)  # the page's own settings read the same
        await ensure_topics(CommonSettings(), partitions=2)
        health = free_port()
        consumer = self._spawn([sys.executable, "-m", "skillgen.cli", "consumer"],
                               {**base, **_FAST_GROUP, "SKILL_METRICS_PORT": str(health)})
        self.log(f"starting the consumer on {self.model} (loading the model takes a while)")
        if self.trainer:
            trainer_env = {**base, **_FAST_GROUP}
            if self.model == default_model():
                trainer_env |= {k: v for k, v in _EMBEDDED_TRAINING.items() if not os.environ.get(k)}
            self._spawn([sys.executable, "-m", "skillgen.cli", "trainer"], trainer_env)
            self.log("starting a trainer (SKILL_WEB_TRAINING)")
        await self._ready(consumer, health)
        self.log("consumer ready")
        return env

    async def _wait(self, proc: subprocess.Popen, what: str) -> None:
        code = await asyncio.to_thread(proc.wait)
        if code != 0:
            raise StackError(f"{what} failed (exit {code})")

    async def _ready(self, consumer: subprocess.Popen, port: int) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if consumer.poll() is not None:
                raise StackError(f"the consumer exited with {consumer.returncode} before it was ready (its log is "
                                 "above)")
            if await asyncio.to_thread(_healthy, f"http://127.0.0.1:{port}/healthz"):
                return
            await asyncio.sleep(0.5)
        raise StackError(f"the consumer was not ready within {self.ready_timeout_s:.0f}s")

    def stop(self) -> None:
        """SIGTERM to every child, the consumer first (it drains), then wait; SIGKILL what is left after 20 s."""
        for proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in reversed(self.children):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.children.clear()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False

