"""The service skeleton's offsets: per partition the commit point is the first record not yet answered, a left job
holds it, and what is committed only moves forward."""

from __future__ import annotations

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from skillgen.runtime.service import Job, Offsets

pytestmark = pytest.mark.unit

A, B = TopicPartition("skill.events", 0), TopicPartition("skill.events", 1)


def fetched(offsets: Offsets, tp: TopicPartition, *at: int, received: float = 0.0) -> list[Job]:
    jobs = []
    for offset in at:
        record = ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, b"key", b"value", None, 3, 5, [])
        jobs.append(Job(record, tp, received))
        offsets.add(jobs[-1])
    return jobs


def test_the_commit_point_is_the_first_unfinished_record():
    offsets = Offsets()
    j5, j6, j7 = fetched(offsets, A, 5, 6, 7)
    assert offsets.point(A) == 5 and len(offsets) == 3
    offsets.finish(j6)
    assert offsets.point(A) == 5  # 6 is answered, but 5 is not: a crash must redeliver 5
    offsets.finish(j5)
    assert offsets.point(A) == 7
    offsets.finish(j7)
    assert offsets.point(A) == 8 and len(offsets) == 0  # all answered: the one after the last fetched


def test_partitions_keep_their_own_points():
    offsets = Offsets()
    [a3] = fetched(offsets, A, 3)
    fetched(offsets, B, 40, 41)
    offsets.finish(a3)
    assert offsets.to_commit({A, B}) == {A: 4, B: 40}
    assert offsets.point(TopicPartition("skill.events", 2)) is None  # nothing fetched there: nothing to commit
    assert offsets.to_commit({TopicPartition("skill.events", 2)}) == {}


def test_a_left_job_holds_the_point_but_is_not_worked_on():
    offsets = Offsets()
    j10, j11 = fetched(offsets, A, 10, 11, received=100.0)
    j10.left = True  # KafkaService.leave: a trainer stopped for shutdown
    offsets.finish(j11)
    assert offsets.point(A) == 10 and offsets.to_commit({A}) == {A: 10}  # record 10 comes back to the next owner
    assert len(offsets) == 0  # nothing left to wait for in a drain
    assert offsets.oldest_s(now=130.0) == 0.0


def test_oldest_is_the_age_of_the_oldest_job_in_hand():
    offsets = Offsets()
    fetched(offsets, A, 1, received=100.0)
    fetched(offsets, B, 7, received=110.0)
    assert offsets.oldest_s(now=130.0) == 30.0


def test_what_is_committed_only_moves_forward():
    offsets = Offsets()
    j1, j2 = fetched(offsets, A, 1, 2)
    offsets.finish(j1)
    assert offsets.to_commit({A}) == {A: 2}
    offsets.committed({A: 2})
    assert offsets.to_commit({A}) == {}  # already there: no second commit of the same point
    offsets.finish(j2)
    assert offsets.to_commit({A}) == {A: 3}
    offsets.committed({A: 3})
    [j3] = fetched(offsets, A, 3)
    assert offsets.to_commit({A}) == {}  # 3 is fetched but open: the point stays at 3, already committed
    offsets.finish(j3)
    assert offsets.to_commit({A}) == {A: 4}


def test_a_failed_commit_stays_due():
    offsets = Offsets()
    [j1] = fetched(offsets, A, 1)
    offsets.finish(j1)
    assert offsets.to_commit({A}) == {A: 2}  # the broker refuses it (a rebalance): `committed` is not called
    assert offsets.to_commit({A}) == {A: 2}  # so the next commit carries it


def test_a_revoked_partition_starts_afresh_with_its_next_owner():
    offsets = Offsets()
    j1, j2 = fetched(offsets, A, 1, 2)
    offsets.finish(j1)
    offsets.committed({A: 2})
    assert offsets.drop(A) == [j2]  # the unfinished job, for the service to mark abandoned
    assert offsets.point(A) is None and offsets.to_commit({A}) == {}
    [again] = fetched(offsets, A, 2)  # assigned back: record 2 is read again from the committed offset
    assert offsets.to_commit({A}) == {A: 2}  # point 2 again
    offsets.finish(again)
    assert offsets.to_commit({A}) == {A: 3}


def test_health_fails_when_a_record_in_hand_is_older_than_the_limit():
    import time

    from skillgen.runtime.service import KafkaService
    from skillgen.runtime.settings import CommonSettings

    service = KafkaService(CommonSettings(), name="t", topic="x", group="g", handle=None, max_record_age_s=60)
    service.state = "running"
    fetched(service.offsets, A, 1, received=time.monotonic())  # young: being worked on
    assert service.health()[0]
    [old] = fetched(service.offsets, B, 9, received=time.monotonic() - 61)
    ok, detail = service.health()
    assert not ok and "unanswered for 61s" in detail
    service.offsets.finish(old)
    assert service.health()[0]
    # A revoked job whose handler has not returned is still in hand: it counts too.
    [revoked] = fetched(Offsets(), B, 10, received=time.monotonic() - 61)
    revoked.abandoned = True
    service._handling.add(revoked)
    assert not service.health()[0]
    service._handling.discard(revoked)
    assert service.health()[0]
    # Without a limit (the trainer: a job may train for hours) age alone never fails health.
    service.max_record_age_s = None
    service.offsets.add(old)
    assert service.health()[0]
