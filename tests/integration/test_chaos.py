"""The chaos suite's short form (bench/chaos.py, `skillgen chaos`): a few cheap scenarios with few requests, each
with real service processes (`skillgen consumer`, `skillgen bot delivery`) against its own Tansu broker, its own
redis-server and the fake Discord server. Every request is answered once: none lost, none posted twice, poison
records in the DLQ and, where they carry a request id, answered with a failed post.

The whole suite (nine scenarios, 40 requests each) runs with `make chaos` and writes bench/results/chaos.json."""

from __future__ import annotations

import pytest

from bench import chaos

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

SHORT = ("baseline", "consumer-kill-after-terminal", "poison", "redis-stop")
REQUESTS = 8


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, chaos.Row]:
    """Each scenario's row; the services' logs stay in the module's temporary directory."""
    measured, _ = chaos.run_suite(list(SHORT), requests=REQUESTS, deadline_s=45, settle_s=3,
                                  workdir=tmp_path_factory.mktemp("chaos"), echo=lambda _line: None)
    return {row.scenario: row for row in measured}


@pytest.mark.timeout(400)  # the first test also waits for the whole short suite (about 80 s on 2 cores)
@pytest.mark.parametrize("scenario", SHORT)
def test_every_request_is_answered_once(rows: dict[str, chaos.Row], scenario: str):
    row = rows[scenario]
    assert row.error is None, row.notes
    assert row.sent >= REQUESTS
    assert (row.lost, row.duplicate_posts) == (0, 0), f"{row.lost} lost, {row.duplicate_posts} posted twice: {row.notes}"


def test_poison_records_go_to_the_dlq_and_those_with_a_request_id_get_a_failed_post(rows: dict[str, chaos.Row]):
    row = rows["poison"]
    assert row.error is None, row.notes
    d = row.details
    assert d["poison_in_dlq"] == d["poison_records"] and d["good_in_dlq"] == 0, row.notes
    assert d["bad_field_failed_posts"] == d["bad_field_records"] == row.failed_posts, row.notes
