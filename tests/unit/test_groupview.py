"""The group view's arithmetic: work units, the fair-share (GPS) estimate of position and ETA, and hostile values."""

from __future__ import annotations

import pytest

from skillgen.runtime.groupview import ConsumerView, GroupView, Queued, estimate, units

pytestmark = pytest.mark.unit


def q(requests: int, u: float) -> Queued:
    return Queued(requests=requests, units=u)


def test_units_weigh_pixels_steps_images_and_guidance():
    assert units(1, 512, 512, 20, 7.5) == 1.0
    assert units(4, 1024, 1024, 20, 7.5) == 16.0
    assert units(1, 512, 512, 10, 7.5) == 0.5
    assert units(1, 512, 512, 20, 1.0) == 0.5  # no guidance: one UNet pass per step, not two


def test_a_new_team_waits_only_for_its_share_of_a_flood():
    est = estimate({"fast/flood": q(500, 500.0)}, "fast", "quiet", 1.0, s_per_unit=2.0)
    assert est.units_ahead == 2.0  # its own unit and one of the flood's (equal weights)
    assert est.position == 1
    assert est.eta_s == 4.0


def test_the_flooding_team_waits_for_its_own_backlog():
    est = estimate({"fast/flood": q(500, 500.0), "fast/quiet": q(1, 1.0)}, "fast", "flood", 1.0, s_per_unit=1.0)
    assert est.units_ahead == 502.0 and est.position == 501


def test_weights_and_lanes():
    queued = {"fast/a": q(10, 10.0), "fast/b": q(10, 10.0), "relax/c": q(100, 100.0)}
    heavy = estimate(queued, "fast", "new", 1.0, team_weights={"new": 2.0})
    light = estimate(queued, "fast", "new", 1.0)
    assert heavy.units_ahead < light.units_ahead
    # fast work ahead is 3 units (1 own + 1 + 1); relax gets a quarter of that alongside
    assert light.units_ahead == pytest.approx(3.0 + 0.75)
    relax = estimate(queued, "relax", "c", 1.0, already_queued=True)
    assert relax.units_ahead == pytest.approx(100.0 + 20.0)  # behind all of fast's 20 units, at its lane's share


def test_each_batch_the_work_ahead_is_served_in_adds_the_fixed_cost_per_batch():
    flood = {"fast/flood": q(40, 40.0)}
    # 10 units ahead (own share of the flood included: 5 + 5): 2.5 batches of 4 units -> 3 batches
    est = estimate(flood, "fast", "quiet", 5.0, s_per_unit=0.1, s_per_batch=0.5, units_per_batch=4.0,
                   running_s=2.0)
    assert est.units_ahead == 10.0
    assert est.eta_s == pytest.approx(2.0 + 10 * 0.1 + 3 * 0.5)
    # exactly two full batches' worth is two batches, not three
    assert estimate({}, "fast", "t", 8.0, s_per_unit=0.1, s_per_batch=0.5, units_per_batch=4.0).eta_s == 1.8
    # without a batch size the fixed cost is not counted (the proportional model of before)
    assert estimate(flood, "fast", "quiet", 5.0, s_per_unit=0.1, s_per_batch=0.5).eta_s == 1.0


def test_no_eta_before_anything_was_timed():
    assert estimate({}, "fast", "t", 1.0).eta_s is None


def test_the_group_adds_consumers_speeds_and_counts_lag():
    views = GroupView(consumers=[
        ConsumerView(consumer="a", at=0, s_per_unit=2.0, queued={"fast/t": q(10, 10.0)}, lag=5),
        ConsumerView(consumer="b", at=0, s_per_unit=2.0, queued={"fast/t": q(10, 10.0)}),
    ])
    assert views.units_per_s == 1.0
    assert views.queued["fast/t"].requests == 20
    assert views.backlog_units == 25.0  # the lag at the queued average (1 unit per record)
    assert views.backlog_s == 25.0
    est = views.estimate("fast", "new", 1.0)
    assert est.position == 1 + 5 and est.units_ahead == 7.0


@pytest.mark.security
def test_hostile_view_values_are_refused():
    with pytest.raises(ValueError):
        ConsumerView.model_validate_json('{"consumer": "x", "at": 0, "s_per_unit": -1}')
    with pytest.raises(ValueError):
        ConsumerView.model_validate_json('{"consumer": "x", "at": 0, "queued": {"fast/t": {"requests": -5, "units": 1}}}')
