"""Kafka clients configured the one way every service uses them.

Producers use acks=all and are idempotent where the broker supports it (a retried send is never written twice;
see CommonSettings.kafka_idempotence); consumers never auto-commit:
a service commits an offset only after the job's terminal event is produced.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from schemas.topics import DLQ_SUFFIX
from skillgen.runtime.settings import CommonSettings

log = logging.getLogger(__name__)


def make_producer(settings: CommonSettings, **kw) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_idempotence=settings.kafka_idempotence,
        acks="all",
        linger_ms=kw.pop("linger_ms", 2),
        **kw,
    )


def make_consumer(settings: CommonSettings, *topics: str, group: str | None, **kw) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset=kw.pop("auto_offset_reset", "earliest"),
        **kw,
    )


async def ensure_topics(
    settings: CommonSettings,
    partitions: int = 4,
    replication: int = 1,
    timeout_s: float = 30,
    retention_hours: float | None = None,
    dlq_retention_hours: float | None = None,
) -> list[str]:
    """Create the request, event and dead-letter topics that do not exist yet; return the names created.

    Retention is per topic when given (DLQs usually keep records longer, for replay after a fix)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in settings.topics.all() if t not in existing]
        if wanted:
            response = await admin.create_topics(
                [
                    NewTopic(
                        t,
                        num_partitions=partitions,
                        replication_factor=replication,
                        topic_configs=_retention(dlq_retention_hours if t.endswith(DLQ_SUFFIX) else retention_hours),
                    )
                    for t in wanted
                ]
            )
            # Errors come back per topic rather than raised; "already exists" means another replica won the race.
            errors = [(t, code) for t, code, *_ in response.topic_errors if code not in (0, TopicAlreadyExistsError.errno)]
            if errors:
                raise KafkaError(f"could not create topics: {errors}")
        return wanted
    finally:
        await admin.close()


DLQ_HEADERS = ("error", "source-topic", "source-partition", "source-offset")


async def dead_letter(producer: AIOKafkaProducer, record, error: BaseException | str) -> str:
    """Copy `record` to its topic's `.dlq` twin, untouched, with the error and its origin in the headers.
    Returns the one-line reason. Headers from an earlier trip to a DLQ are replaced, not repeated."""
    reason = (error if isinstance(error, str) else f"{type(error).__name__}: {error}")[:1000]
    headers = [(k, v) for k, v in record.headers or () if k not in DLQ_HEADERS]
    headers += [
        ("error", reason.encode()),
        ("source-topic", record.topic.encode()),
        ("source-partition", str(record.partition).encode()),
        ("source-offset", str(record.offset).encode()),
    ]
    await producer.send_and_wait(record.topic + DLQ_SUFFIX, record.value, key=record.key, headers=headers)
    return reason


def _retention(hours: float | None) -> dict[str, str]:
    return {} if hours is None else {"retention.ms": str(int(hours * 3600 * 1000))}


async def partitions_of(settings: CommonSettings, topic: str) -> list[int]:
    """The topic's partition ids, asked of the broker (a consumer without a subscription knows none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for t in described:
        if t["topic"] == topic and t["error_code"] == 0:
            return sorted(p["partition"] for p in t["partitions"])
    return []


def add_arguments(parser) -> None:
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic (default 4): bounds consumer parallelism")
    parser.add_argument("--replication", type=int, default=1, help="replication factor (default 1)")
    parser.add_argument("--retention-hours", type=float, help="retention of request/event topics (default: the broker's)")
    parser.add_argument("--dlq-retention-hours", type=float, help="retention of the .dlq topics (default: the broker's)")


def run(args) -> int:
    settings = CommonSettings()
    created = asyncio.run(
        ensure_topics(
            settings,
            args.partitions,
            args.replication,
            retention_hours=args.retention_hours,
            dlq_retention_hours=args.dlq_retention_hours,
        )
    )
    for t in settings.topics.all():
        print(f"{t}\t{'created' if t in created else 'exists'}")
    return 0
