"""`skillgen bench fairness`'s arithmetic and report, without a broker or a consumer: percentiles, censored
latencies, the weighted share error, the ETA error, the cancel histogram read from /metrics text, and the table."""

import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import fairness as bench  # noqa: E402

METRICS = """\
# HELP skill_cancel_late_steps Denoising steps a cancelled sample ran after its cancel arrived
# TYPE skill_cancel_late_steps histogram
skill_cancel_late_steps_bucket{le="0.0"} 1.0
skill_cancel_late_steps_bucket{le="1.0"} 3.0
skill_cancel_late_steps_bucket{le="2.0"} 4.0
skill_cancel_late_steps_bucket{le="+Inf"} 4.0
skill_cancel_late_steps_count 4.0
skill_cancel_late_steps_sum 4.0
skill_cancel_late_steps_created 1.7e9
skill_batch_size_count 9.0
"""


def test_percentile_is_nearest_rank_and_empty_is_none() -> None:
    assert bench.percentile([4, 1, 3, 2], 0.5) == 2
    assert bench.percentile(range(1, 11), 0.9) == 9
    assert bench.percentile([7.0], 0.9) == 7.0
    assert bench.percentile([1.0, math.inf, 2.0], 0.9) == math.inf
    assert bench.percentile([], 0.5) is None


def test_a_cut_short_wait_at_or_below_the_median_makes_it_a_lower_bound() -> None:
    assert bench.censored_p50([(1.0, False), (2.0, False), (9.0, True)]) == (2.0, False)
    assert bench.censored_p50([(1.0, False), (2.0, True), (3.0, True)]) == (2.0, True)
    assert bench.censored_p50([]) == (None, False)


def test_share_error_is_the_largest_relative_error_against_the_weights() -> None:
    weights = {"a": 2.0, "b": 1.0}
    assert bench.share_error({"a": 200, "b": 100}, weights) == pytest.approx(0.0)
    # 1:1 instead of 2:1: a gets 1/2 of 2/3 (25 % short), b gets 1/2 of 1/3 (50 % over)
    assert bench.share_error({"a": 50, "b": 50}, weights) == pytest.approx(0.5)
    assert bench.share_error({"a": 70}, weights) == pytest.approx(1.0)  # b starved
    assert bench.share_error({}, weights) is None


def test_eta_error_is_relative_and_a_missing_eta_is_infinite() -> None:
    assert bench.eta_error(12.0, 10.0) == pytest.approx(0.2)
    assert bench.eta_error(8.0, 10.0) == pytest.approx(0.2)
    assert bench.eta_error(None, 10.0) == math.inf


def test_the_cancel_histogram_is_read_from_metrics_text() -> None:
    hist = bench.parse_histogram(METRICS, bench.LATE_STEPS)
    assert hist["count"] == 4 and hist["sum"] == 4
    assert hist["buckets"] == [(0.0, 1.0), (1.0, 3.0), (2.0, 4.0), (math.inf, 4.0)]
    assert bench.histogram_max(hist) == 2.0  # the smallest bound that holds every observation
    assert bench.parse_histogram(METRICS, "skill_not_there") is None
    assert bench.histogram_max({"buckets": [(1.0, 0.0), (math.inf, 0.0)], "count": 0.0, "sum": 0.0}) is None


def test_goals_are_met_only_when_measured_and_within_bounds() -> None:
    result = {"quiet_team_p50_ratio": 1.4, "share_error": 0.2, "eta_p90_error": None, "cancel_steps": 1.0}
    assert bench.met(result) == {"quiet_team_p50_ratio": True, "share_error": False, "eta_p90_error": False,
                                 "cancel_steps": True}


def test_the_table_shows_every_goal_the_fifo_row_and_each_scenario() -> None:
    result = {"quiet_team_p50_ratio": 1.25, "fifo_quiet_team_p50_ratio": 40.0,
              "fifo_quiet_team_p50_ratio_is_lower_bound": True, "share_error": 0.05, "eta_p90_error": None,
              "cancel_steps": math.inf,
              "scenarios": {"flood": {"summary": "quiet p50 0.4 s"}, "eta": {"error": "ScenarioError: boom"}}}
    result["met"] = bench.met(result)
    lines = bench.format_table(result).splitlines()
    assert lines[0].split() == ["figure", "measured", "goal", "met"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:7]}
    assert rows["quiet_team_p50_ratio"] == ["1.25", "<=", "1.5", "yes"]
    assert rows["eta_p90_error"] == ["-", "<=", "0.25", "no"]
    assert rows["cancel_steps"] == ["inf", "<=", "1", "no"]
    assert rows["fifo_quiet_team_p50_ratio"][:3] == ["40.00", "(lower", "bound)"]
    assert lines[-2:] == ["flood: quiet p50 0.4 s", "eta: ScenarioError: boom"]


def test_fair_and_fifo_floods_interleave_round_after_round_and_report_the_median() -> None:
    order = bench.run_order(["weights", "flood_fifo", "flood", "cancel"], flood_rounds=2)
    assert order == [("flood", "flood"), ("flood_fifo", "flood_fifo"), ("flood.2", "flood"),
                     ("flood_fifo.2", "flood_fifo"), ("weights", "weights"), ("cancel", "cancel")]
    blocks = {"flood": {"ratio": 3.0}, "flood_fifo": {"ratio": 30.0, "quiet_p50_is_lower_bound": True},
              "flood.2": {"ratio": 5.0}, "flood_fifo.2": {"error": "ScenarioError: x"}, "weights": {}}
    assert bench.median_ratio(blocks, "flood") == (4.0, False, [3.0, 5.0])
    assert bench.median_ratio(blocks, "flood_fifo") == (30.0, True, [30.0, None])
    assert bench.median_ratio(blocks, "eta") == (None, False, [])


def test_runs_encode_the_served_order() -> None:
    assert bench.runs(["a", "a", "b", "a"]) == [["a", 2], ["b", 1], ["a", 1]]
    assert bench.runs([]) == []


def test_the_ratio_floor_is_half_a_full_batch_to_wait_and_a_full_one_to_ride() -> None:
    # unloaded 0.4 s of which 0.2 s riding alone; full batches of 1.2 s: 1.8 + 0.2 = 2.0 s under a flood
    assert bench.ratio_floor(1.2, 0.2, 0.4) == 5.0
    assert bench.ratio_floor(None, 0.2, 0.4) is None
    assert bench.ratio_floor(1.2, 0.2, None) is None


def test_phases_split_each_answered_requests_latency_by_its_events_stamps() -> None:
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from schemas.messages import EventKind

    def stamped(at: float):
        return SimpleNamespace(created_at=datetime.fromtimestamp(at, timezone.utc))

    session = SimpleNamespace(
        sent_wall={"a": 100.0, "b": 200.0, "c": 300.0}, wall_offset=1000.0,
        first={("a", EventKind.queued): (0, stamped(100.01)), ("a", EventKind.started): (0, stamped(100.06)),
               ("b", EventKind.queued): (0, stamped(200.03)), ("b", EventKind.started): (0, stamped(200.1)),
               ("c", EventKind.queued): (0, stamped(300.0))},  # c never started: left out
        terminal={"a": (-899.7, stamped(100.26)), "b": (-799.5, stamped(200.45))})
    phases = bench.Session.phases(session, ["a", "b", "c"])
    assert list(phases) == list(bench.PHASES)
    # nearest-rank p50 of two values is the smaller one
    assert phases == {"admitted": 0.01, "to_start": 0.05, "run_and_post": 0.2, "delivered": 0.04}
