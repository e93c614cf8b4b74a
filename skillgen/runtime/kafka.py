"""Kafka clients configured the one way every service uses them.

Producers use acks=all and are idempotent where the broker supports it (a retried send is never written twice;
see CommonSettings.kafka_idempotence); consumers never auto-commit:
a service commits an offset only after the job's terminal event is produced.
Every client, the admin client included, gets its TLS and SASL options from the SKILL_KAFKA_* settings
through `client_options`, which refuses a combination that cannot work before anything connects.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from schemas.topics import DLQ_SUFFIX
from skillgen.runtime.settings import CommonSettings

log = logging.getLogger(__name__)

_TLS = ("SSL", "SASL_SSL")


def client_options(settings: CommonSettings) -> dict:
    """The aiokafka keyword arguments for security (protocol, SASL, TLS) that every client gets with
    bootstrap_servers. Raises ValueError, naming the SKILL_ variable, for a combination that cannot work."""
    protocol = settings.kafka_security_protocol
    options: dict = {"security_protocol": protocol}
    files = {
        "SKILL_KAFKA_CA_FILE": settings.kafka_ca_file,
        "SKILL_KAFKA_CERT_FILE": settings.kafka_cert_file,
        "SKILL_KAFKA_KEY_FILE": settings.kafka_key_file,
    }
    given = [name for name, path in files.items() if path is not None]
    if given and protocol not in _TLS:
        raise ValueError(
            f"{', '.join(given)} set but SKILL_KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS: "
            "set it to SSL or SASL_SSL, or unset the file settings"
        )
    if (settings.kafka_cert_file is None) != (settings.kafka_key_file is None):
        missing = "SKILL_KAFKA_KEY_FILE" if settings.kafka_key_file is None else "SKILL_KAFKA_CERT_FILE"
        raise ValueError(f"{missing} is not set: a client certificate needs its key (SKILL_KAFKA_CERT_FILE "
                         "and SKILL_KAFKA_KEY_FILE go together, for mutual TLS)")
    for name, path in files.items():
        if path is not None and not path.is_file():
            raise ValueError(f"{name}={path}: no such file")
    if protocol.startswith("SASL_"):
        password = settings.kafka_password.get_secret_value() if settings.kafka_password else ""
        missing = [n for n, v in (("SKILL_KAFKA_USERNAME", settings.kafka_username),
                                  ("SKILL_KAFKA_PASSWORD", password)) if not v]
        if missing:
            raise ValueError(f"SKILL_KAFKA_SECURITY_PROTOCOL={protocol} needs {' and '.join(missing)}")
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_username,
            sasl_plain_password=password,
        )
    if protocol in _TLS:
        try:  # no CA file: the system's trusted CAs verify the brokers
            options["ssl_context"] = create_ssl_context(
                cafile=settings.kafka_ca_file,
                certfile=settings.kafka_cert_file,
                keyfile=settings.kafka_key_file,
                password=_encrypted_key,  # asked only for an encrypted key; else OpenSSL would prompt on the tty
            )
        except ssl.SSLError as exc:
            raise ValueError(f"{' / '.join(given) or 'the system CA store'}: cannot load as PEM ({exc})") from exc
    return options


def _encrypted_key() -> str:
    raise ValueError("SKILL_KAFKA_KEY_FILE is encrypted: give the client key unencrypted (kept as a secret)")


def make_producer(settings: CommonSettings, **kw) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        **client_options(settings),
        enable_idempotence=settings.kafka_idempotence,
        acks="all",
        linger_ms=kw.pop("linger_ms", 2),
        **kw,
    )


def make_consumer(settings: CommonSettings, *topics: str, group: str | None, **kw) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka_bootstrap,
        **client_options(settings),
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
    min_insync_replicas: int | None = None,
) -> list[str]:
    """Create the request, event and dead-letter topics that do not exist yet; return the names created.

    Retention is per topic when given (DLQs usually keep records longer, for replay after a fix).
    min.insync.replicas defaults to min(2, replication): with acks=all a write then survives a broker loss."""
    configs = topic_configs(
        settings.topics.all(), replication, min_insync_replicas, retention_hours, dlq_retention_hours
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **client_options(settings))
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
                        topic_configs=configs[t],
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


def topic_configs(
    topics: Iterable[str],
    replication: int,
    min_insync_replicas: int | None = None,
    retention_hours: float | None = None,
    dlq_retention_hours: float | None = None,
) -> dict[str, dict[str, str]]:
    """Each topic's config at creation: min.insync.replicas (default min(2, replication)) and its retention.
    Raises ValueError for a min.insync.replicas the replication factor cannot satisfy."""
    insync = min(2, replication) if min_insync_replicas is None else min_insync_replicas
    if not 1 <= insync <= replication:
        raise ValueError(
            f"--min-insync-replicas {insync} must be between 1 and the replication factor ({replication}): "
            "with more, every acks=all write would fail"
        )
    return {
        t: {
            "min.insync.replicas": str(insync),
            **_retention(dlq_retention_hours if t.endswith(DLQ_SUFFIX) else retention_hours),
        }
        for t in topics
    }


async def partitions_of(settings: CommonSettings, topic: str) -> list[int]:
    """The topic's partition ids, asked of the broker (a consumer without a subscription knows none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **client_options(settings))
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
    parser.add_argument(
        "--min-insync-replicas",
        type=int,
        metavar="N",
        help="replicas that must have a write before acks=all succeeds (default: min(2, replication)); "
        "at most the replication factor",
    )


def run(args) -> int:
    settings = CommonSettings()
    created = asyncio.run(
        ensure_topics(
            settings,
            args.partitions,
            args.replication,
            retention_hours=args.retention_hours,
            dlq_retention_hours=args.dlq_retention_hours,
            min_insync_replicas=args.min_insync_replicas,
        )
    )
    for t in settings.topics.all():
        print(f"{t}\t{'created' if t in created else 'exists'}")
    return 0
