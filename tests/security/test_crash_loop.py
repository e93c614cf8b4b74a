"""Issue 13, item 6: a record that kills its process is redelivered to the next owner, which it kills too. The
attempt count in Redis (skillgen/runtime/attempts.py) outlives each process: after SKILL_RECORD_MAX_ATTEMPTS
deaths the record goes to the DLQ and its requester gets a failed event, and the records around it are answered.
Real `skillgen consumer` processes, a real broker and redis-server; the process death is a SIGKILL injected by
tests/fakes/die_on_prompt.py."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from schemas.codec import header
from schemas.messages import EventKind
from tests.integration.test_consumer import (  # noqa: F401 - fixture
    Kafka,
    consumer_settings,
    request,
    tiny_model,
)
from tests.integration.test_consumer_kill import consumer_process, wait_exit

pytestmark = [pytest.mark.security, pytest.mark.slow]

DEADLY = "deadly-4f1c"


async def test_a_record_that_kills_every_consumer_is_set_aside_after_the_limit_and_its_requester_told(
    skill_env, tiny_model, tmp_path  # noqa: F811 - the fixture imported above
):
    settings = consumer_settings(tiny_model)
    async with Kafka(settings) as kafka:
        before = await kafka.publish(request("a climber's crimp grip"), partition=0)
        poison = await kafka.publish(request(f"a juggler's cascade {DEADLY}"), partition=0)
        after = await kafka.publish(request("a cellist's bow hold"), partition=0)

        def doomed(n: int):
            process = consumer_process(skill_env, tiny_model, tmp_path / f"consumer-{n}.log",
                                       SKILL_RECORD_MAX_ATTEMPTS="2")
            process.argv = [sys.executable, "-m", "tests.fakes.die_on_prompt", DEADLY, "consumer"]
            process.env = {**process.env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
            return process

        for n in (1, 2):  # each one takes the record up and dies with it
            process = doomed(n)
            process.start()
            assert await wait_exit(process, 120) == -signal.SIGKILL, process.log_tail()
            assert f"(attempt {n})" in process.log_tail()

        third = doomed(3)
        third.start()
        try:
            await kafka.wait_for(lambda k: k.all_final([before.request_id, poison.request_id, after.request_id]),
                                 timeout_s=120)
        finally:
            third.stop(timeout_s=30)
        assert third.proc.returncode == 0, third.log_tail()  # it survived: the record never reached its handler
        assert "TEST HOOK" not in third.log_tail()
        dead = await kafka.read_topic(kafka.topics.dlq(kafka.topics.generate), 1)

    failed = kafka.final(poison.request_id)
    assert failed.kind == EventKind.failed and "set aside" in failed.message
    assert [header(d.headers, "error")[:26] for d in dead] == ["set aside after 2 attempts"], [
        (d.offset, d.headers) for d in dead]
    for req in (before, after):
        assert kafka.final(req.request_id).kind == EventKind.succeeded
