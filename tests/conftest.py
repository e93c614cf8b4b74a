"""Fixtures for tests against real services. Services start lazily: a test that asks for none of these
fixtures (every unit test) starts nothing.

Session-wide: `kafka_broker` (Tansu, in-memory storage) and `redis_server`, each started once, on a free
loopback port, and stopped at the end of the session (Ctrl-C included). Per test: `namespace` (topic and Redis
key prefixes of its own), `skill_env` (SKILL_* variables, six topics created) and `redis_factory` (dedicated
redis-servers to stop and restart). Tests that use a service fixture get the `integration` marker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.harness import (
    SIGNING_KEY,
    Broker,
    HarnessError,
    Namespace,
    RedisServer,
    SkillEnv,
    create_topics,
    run_sync,
    start_broker,
)

SERVICE_FIXTURES = {"kafka_broker", "redis_server", "redis_factory", "skill_env"}


# tryfirst: the marker must be on the item before `-m` deselects by markers
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the services' logs (and Redis's working directory) live; pytest keeps the last few runs."""
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def kafka_broker(services_dir: Path) -> Iterator[Broker]:
    """A Tansu broker with in-memory storage; `kafka_broker.bootstrap` is "127.0.0.1:PORT".

    How this broker differs from Apache Kafka (tests/integration/test_harness.py pins each point):
    - Topics are auto-created, with 4 partitions, by any metadata request that names an unknown topic: a
      producer's first send, a consumer's subscribe, even AIOKafkaAdminClient.describe_topics. A typo in a topic
      name therefore never fails. `AIOKafkaAdminClient.create_topics` works and answers error code 36
      (TopicAlreadyExists) per topic instead of raising: use `tests.harness.create_topics`, which checks the
      codes, to get a chosen partition count before anything touches the topic.
    - Idempotent and transactional producers fail to start (InitProducerId answers UnknownError): aiokafka
      only speaks InitProducerId v0 and Tansu's memory storage rejects it. Set SKILL_KAFKA_IDEMPOTENCE=false
      (skill_env does).
    - A new consumer group's first join takes about session_timeout_ms / 2 (5 s by default), and a group
      whose members all left re-forms after about 2 x session_timeout_ms: pass `tests.harness.FAST_GROUP`
      to consumers to join in about 1 s (re-form in 4 s).
    - offsets_for_times looks up the time the broker appended a record, not the record's own timestamp, and
      answers OffsetAndTimestamp(offset=0, timestamp=-1) where Kafka answers None (no record at or after that
      time): check `found is None or found.timestamp < 0`.
    """
    try:
        broker = start_broker(services_dir)
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield broker
    broker.process.stop()


@pytest.fixture(scope="session")
def redis_server(services_dir: Path) -> Iterator[RedisServer]:
    """A redis-server of this session (never the machine's own on 6379); `redis_server.url`. Tests share it:
    keep to your `namespace.redis_prefix`, and do not stop it (use `redis_factory` for that)."""
    server = RedisServer(services_dir / "redis")
    server.workdir.mkdir()
    try:
        server.start()
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """`server = redis_factory()` starts a dedicated redis-server; `server.stop()`, `server.start()` (same
    port, empty) and `server.restart()` simulate an outage. All are stopped when the test ends."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        workdir = tmp_path / f"redis-{len(servers)}"
        workdir.mkdir()
        server = RedisServer(workdir)
        servers.append(server)
        try:
            server.start()
        except HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def namespace() -> Namespace:
    """Unique prefixes for this test: `namespace.topic_prefix` ("t1a2b3c4d."), `namespace.redis_prefix`
    ("t1a2b3c4d:"), `namespace.topics` (schemas.topics.Topics; `.group(name)` prefixes consumer groups too)."""
    return Namespace.new()


@pytest.fixture
def skill_env(
    kafka_broker: Broker, redis_server: RedisServer, namespace: Namespace, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[SkillEnv]:
    """SKILL_* settings for this test, already set in os.environ (so settings classes built in the test and
    subprocesses started with the default environment see them) and in `skill_env.vars`. The six topics of
    `skill_env.topics` exist with 4 partitions each. Redis keys under the test's prefix are deleted afterwards.
    """
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    env = SkillEnv(
        vars={
            "SKILL_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "SKILL_KAFKA_IDEMPOTENCE": "false",
            "SKILL_TOPIC_PREFIX": namespace.topic_prefix,
            "SKILL_REDIS_URL": redis_server.url,
            "SKILL_REDIS_PREFIX": namespace.redis_prefix,
            "SKILL_BLOB_URL": blob_dir.as_uri(),
            "SKILL_SPEED_MEMORY": str(tmp_path / "speed.json"),  # never the user's own (consumer/speed.py)
            "SKILL_SIGNING_KEY": SIGNING_KEY,
            "SKILL_ALLOWED_TEAMS": "*",
        },
        namespace=namespace,
        blob_dir=blob_dir,
    )
    run_sync(create_topics(kafka_broker.bootstrap, env.topics.all()))
    for name, value in env.vars.items():
        monkeypatch.setenv(name, value)
    yield env
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = list(client.scan_iter(match=f"{namespace.redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module (`pytest.mark.usefixtures("one_torch_thread")`): on a shared 2-core machine
    two torch threads run ~100x slower once another process takes a core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion in diffusers format (real CLIP tokenizer, SD geometry), built once."""
    from skillgen.tools.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
async def world(skill_env: SkillEnv):
    """A delivery's surroundings: fake Discord and Slack servers and the test's broker, Redis and blob store
    (tests/fakes/world.py)."""
    from tests.fakes.discord import FakeDiscord
    from tests.fakes.slack import FakeSlack
    from tests.fakes.world import World

    discord, slack = await FakeDiscord().start(), await FakeSlack().start()
    yield World(skill_env, discord, slack)
    await discord.stop()
    await slack.stop()
