"""Kafka security settings become aiokafka options on every client, and a combination that cannot work is
refused with the SKILL_ variable to fix; topics are created with min.insync.replicas. No broker is started."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.topics import Topics
from skillgen.runtime.kafka import (
    client_options,
    ensure_topics,
    make_consumer,
    make_producer,
    topic_configs,
)
from skillgen.runtime.settings import CommonSettings

pytestmark = [pytest.mark.unit, pytest.mark.security]


@pytest.fixture(autouse=True)
def _no_kafka_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test passes counts: no SKILL_KAFKA_* from the shell that runs the tests."""
    import os

    for name in os.environ:
        if name.startswith("SKILL_KAFKA_"):
            monkeypatch.delenv(name)


def settings(**kw) -> CommonSettings:
    return CommonSettings(_env_file=None, kafka_bootstrap="127.0.0.1:1", **kw)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA certificate and a client certificate with its key (self-signed: load_cert_chain needs a match only)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    files = {"ca": tmp_path / "ca.pem", "ca_key": tmp_path / "ca.key",
             "cert": tmp_path / "client.pem", "key": tmp_path / "client.key"}
    for cert, key, cn in (("ca", "ca_key", "skillgen-test-ca"), ("cert", "key", "skillgen-test-client")):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(files[key]), "-out", str(files[cert]), "-days", "1", "-subj", f"/CN={cn}")
    return files


def _common_names(context: ssl.SSLContext) -> set[str]:
    return {value for cert in context.get_ca_certs() for rdn in cert["subject"] for key, value in rdn
            if key == "commonName"}


# -- the options per protocol --------------------------------------------------------------------------------


def test_plaintext_gives_the_protocol_only():
    assert client_options(settings()) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_gives_the_mechanism_and_credentials(mechanism: str):
    options = client_options(settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism=mechanism,
                                      kafka_username="skill", kafka_password="s3cret"))
    assert options == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "skill",
        "sasl_plain_password": "s3cret",
    }


def test_sasl_ssl_with_scram_sha_512_loads_the_ca(pki):
    options = client_options(settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                                      kafka_username="skill", kafka_password="s3cret", kafka_ca_file=pki["ca"]))
    context = options.pop("ssl_context")
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "skill",
        "sasl_plain_password": "s3cret",
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert _common_names(context) == {"skillgen-test-ca"}


def test_ssl_with_a_client_certificate(pki):
    options = client_options(settings(kafka_security_protocol="SSL", kafka_ca_file=pki["ca"],
                                      kafka_cert_file=pki["cert"], kafka_key_file=pki["key"]))
    assert set(options) == {"security_protocol", "ssl_context"}
    assert options["security_protocol"] == "SSL"
    assert _common_names(options["ssl_context"]) == {"skillgen-test-ca"}


def test_ssl_without_a_ca_file_trusts_the_system_store():
    options = client_options(settings(kafka_security_protocol="SSL"))
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_the_environment_is_read(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SKILL_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("SKILL_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("SKILL_KAFKA_USERNAME", "skill")
    monkeypatch.setenv("SKILL_KAFKA_PASSWORD", "from-env")
    options = client_options(CommonSettings(_env_file=None))
    assert options["sasl_mechanism"] == "SCRAM-SHA-256" and options["sasl_plain_password"] == "from-env"


# -- what cannot work is refused, naming the variable ---------------------------------------------------------


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize(
    "credentials, variable",
    [
        ({}, "SKILL_KAFKA_USERNAME and SKILL_KAFKA_PASSWORD"),
        ({"kafka_username": "skill"}, "SKILL_KAFKA_PASSWORD"),
        ({"kafka_password": "s3cret"}, "SKILL_KAFKA_USERNAME"),
        ({"kafka_username": "skill", "kafka_password": ""}, "SKILL_KAFKA_PASSWORD"),
    ],
)
def test_sasl_without_credentials_is_refused(protocol: str, credentials: dict, variable: str):
    with pytest.raises(ValueError, match=variable):
        client_options(settings(kafka_security_protocol=protocol, **credentials))


def test_a_certificate_without_its_key_is_refused(pki):
    with pytest.raises(ValueError, match="SKILL_KAFKA_KEY_FILE"):
        client_options(settings(kafka_security_protocol="SSL", kafka_cert_file=pki["cert"]))


def test_a_key_without_its_certificate_is_refused(pki):
    with pytest.raises(ValueError, match="SKILL_KAFKA_CERT_FILE"):
        client_options(settings(kafka_security_protocol="SSL", kafka_key_file=pki["key"]))


@pytest.mark.parametrize("field, variable", [("kafka_ca_file", "SKILL_KAFKA_CA_FILE"),
                                             ("kafka_cert_file", "SKILL_KAFKA_CERT_FILE"),
                                             ("kafka_key_file", "SKILL_KAFKA_KEY_FILE")])
def test_a_missing_file_is_refused(pki, tmp_path: Path, field: str, variable: str):
    files = {"kafka_ca_file": pki["ca"], "kafka_cert_file": pki["cert"], "kafka_key_file": pki["key"]}
    files[field] = tmp_path / "nowhere.pem"
    with pytest.raises(ValueError, match=f"{variable}=.*nowhere.pem: no such file"):
        client_options(settings(kafka_security_protocol="SSL", **files))


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_tls_files_without_tls_are_refused(pki, protocol: str):
    with pytest.raises(ValueError, match="SKILL_KAFKA_CA_FILE set but SKILL_KAFKA_SECURITY_PROTOCOL"):
        client_options(settings(kafka_security_protocol=protocol, kafka_username="skill", kafka_password="s3cret",
                                kafka_ca_file=pki["ca"]))


def test_a_file_that_is_not_pem_is_refused(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="SKILL_KAFKA_CA_FILE"):
        client_options(settings(kafka_security_protocol="SSL", kafka_ca_file=ca))


def test_a_key_that_does_not_match_the_certificate_is_refused(pki):
    with pytest.raises(ValueError, match="SKILL_KAFKA_CERT_FILE / SKILL_KAFKA_KEY_FILE"):
        client_options(settings(kafka_security_protocol="SSL", kafka_cert_file=pki["cert"],
                                kafka_key_file=pki["ca_key"]))


def test_an_encrypted_key_is_refused_not_prompted_for(tmp_path: Path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-passout", "pass:secret",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=encrypted")
    with pytest.raises(ValueError, match="SKILL_KAFKA_KEY_FILE is encrypted"):
        client_options(settings(kafka_security_protocol="SSL", kafka_cert_file=cert, kafka_key_file=key))


# -- real clients accept the options (aiokafka checks them in the constructor; nothing connects) --------------


async def test_make_producer_and_consumer_accept_sasl_ssl(pki):
    s = settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512", kafka_username="skill",
                 kafka_password="s3cret", kafka_ca_file=pki["ca"], kafka_cert_file=pki["cert"],
                 kafka_key_file=pki["key"])
    producer = make_producer(s)
    consumer = make_consumer(s, "some-topic", group="some-group")
    try:
        assert isinstance(producer, AIOKafkaProducer) and isinstance(consumer, AIOKafkaConsumer)
        for client in (producer.client, consumer._client):
            assert client._security_protocol == "SASL_SSL"
            assert client._sasl_mechanism == "SCRAM-SHA-512"
            assert isinstance(client._ssl_context, ssl.SSLContext)
    finally:
        await producer.stop()
        await consumer.stop()


async def test_make_producer_refuses_a_misconfiguration_before_connecting():
    with pytest.raises(ValueError, match="SKILL_KAFKA_PASSWORD"):
        make_producer(settings(kafka_security_protocol="SASL_SSL", kafka_username="skill"))


# -- topics: min.insync.replicas -----------------------------------------------------------------------------


def test_topic_configs_default_min_insync_is_two_at_most():
    topics = Topics("").all()
    assert {c["min.insync.replicas"] for c in topic_configs(topics, replication=3).values()} == {"2"}
    assert {c["min.insync.replicas"] for c in topic_configs(topics, replication=1).values()} == {"1"}


def test_topic_configs_keep_retention_beside_min_insync():
    t = Topics("")
    configs = topic_configs(t.all(), replication=3, min_insync_replicas=3, retention_hours=1, dlq_retention_hours=2)
    assert configs[t.generate] == {"min.insync.replicas": "3", "retention.ms": "3600000"}
    assert configs[t.dlq(t.generate)] == {"min.insync.replicas": "3", "retention.ms": "7200000"}
    assert set(configs) == set(t.all())


@pytest.mark.parametrize("replication, insync", [(1, 2), (3, 4), (3, 0)])
def test_topic_configs_refuse_an_impossible_min_insync(replication: int, insync: int):
    with pytest.raises(ValueError, match="--min-insync-replicas"):
        topic_configs(["a"], replication=replication, min_insync_replicas=insync)


async def test_ensure_topics_refuses_before_connecting():
    # the bootstrap is a closed port: reaching it would fail differently (and only after timeout_s)
    with pytest.raises(ValueError, match="--min-insync-replicas 2"):
        await ensure_topics(settings(), replication=1, min_insync_replicas=2, timeout_s=0.1)
