"""Delivery's markers without Redis (bots/markers.py): one final post per request whatever kind comes second,
claims kept over a re-queue, and the journal of done markers in memory and in its file."""

import json
import time

import pytest

from bots.markers import Busy, Claim, Journal, Markers, Posted
from schemas.messages import EventKind
from skillgen.runtime.redis import Store

pytestmark = pytest.mark.unit

OK, FAIL, BLOCK = EventKind.succeeded, EventKind.failed, EventKind.blocked


def markers(state_dir=None, lease_s: float = 30) -> Markers:
    return Markers(Store(None, prefix="t:"), lease_s=lease_s, done_ttl_s=3600, state_dir=state_dir)


async def test_the_first_terminal_event_wins_and_every_later_one_of_any_kind_is_posted_already():
    m = markers()
    claim = await m.take("r1", OK)
    assert isinstance(claim, Claim) and claim.token.startswith("claim:succeeded:")
    busy = await m.take("r1", FAIL)
    assert isinstance(busy, Busy) and 29 < busy.left_s <= 30
    assert await m.finished("r1")  # being posted: status edits stop
    await m.done(claim)
    for kind in (OK, FAIL, BLOCK):
        assert await m.take("r1", kind) == Posted("succeeded")
    assert await m.finished("r1") and not await m.finished("r2")


async def test_a_released_claim_lets_the_next_event_post():
    m = markers()
    claim = await m.take("r1", FAIL)
    await m.release(claim)
    assert isinstance(await m.take("r1", BLOCK), Claim)


async def test_a_claim_held_over_a_requeue_is_adopted_by_its_own_event_only():
    m = markers(lease_s=1)
    claim = await m.take("r1", OK)
    assert await m.hold(claim, 60)
    assert isinstance(await m.take("r1", FAIL, claim.token.replace("succeeded", "failed")), Busy)
    assert isinstance(await m.take("r1", OK), Busy)  # the same kind without the token: another copy of the event
    again = await m.take("r1", OK, claim.token)
    assert again == claim


async def test_done_markers_survive_a_restart_through_the_state_dir(tmp_path):
    first = markers(tmp_path)
    await first.done(await first.take("r1", FAIL))
    restarted = markers(tmp_path)
    assert await restarted.take("r1", OK) == Posted("failed")
    other_prefix = Markers(Store(None, prefix="other:"), lease_s=30, done_ttl_s=3600, state_dir=tmp_path)
    assert isinstance(await other_prefix.take("r1", OK), Claim)  # another deployment's journal


def test_the_journal_reads_back_what_is_live_and_skips_what_it_cannot_read(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    now = time.time()
    journal.add("a", "succeeded", now + 100)
    journal.add("gone", "failed", now - 1)
    journal.add("a", "succeeded", now + 200)  # written twice: the last line counts
    with path.open("a") as f:
        f.write('{"r": "b", "k": "blocked", "x": %f}\n' % (now + 100))
        f.write('{"r": "c", "k": "queued", "x": 1e20}\n')  # not a terminal kind
        f.write('{"r": "d", "k": "failed", "x": "nan"}\n')
        f.write('{"r": "torn", "k": "fail')  # a line cut short by a crash
    again = Journal(path)
    assert (again.get("a"), again.get("b"), again.get("gone"), again.get("c"), again.get("d")) == \
        ("succeeded", "blocked", None, None, None)
    assert again.unsynced_count == 2  # written back to Redis after a restart, whatever it had
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["r"] for line in lines] == ["a", "b"]  # compacted on load


def test_the_journal_keeps_every_marker_redis_lacks_and_evicts_the_oldest_it_has(tmp_path):
    journal = Journal(tmp_path / "j.jsonl", max_entries=3)
    later = time.time() + 100
    for name in "abcde":
        journal.add(name, "succeeded", later)
    assert len(journal) == 5 and journal.unsynced_count == 5  # none is in Redis yet
    journal.synced(["a", "b", "c"])
    assert len(journal) == 3 and journal.get("a") is None and journal.get("d") == "succeeded"
    assert [r for r, _, _ in journal.unsynced(10)] == ["d", "e"]
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) <= 5


def test_without_a_usable_directory_the_journal_keeps_to_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    journal = Journal(blocker / "j.jsonl")  # its directory is a file
    journal.add("a", "failed", time.time() + 100)
    assert journal.get("a") == "failed"


def test_without_redis_nothing_waits_to_be_written_back():
    m = markers()
    assert m.journal.track_unsynced is False
