"""What a person sees of the queue: position, the expected time as each platform's own timestamp, the lane, the
Cancel button on a status and its absence on a result, the cancelled line, the --relax option, and the busy
refusal at intake."""

from datetime import datetime, timezone

import pytest

from bots import grammar, render
from bots.console import describe
from bots.errors import Refusal
from bots.intake import Intake, team_of
from bots.settings import BotSettings
from schemas.messages import EventKind, GenerateRequest, JobEvent, Origin, Platform
from skillgen.runtime.groupview import ConsumerView, Estimate, GroupView, Queued

pytestmark = pytest.mark.unit

SLACK = Origin(platform=Platform.slack, team_id="T1", channel_id="C1", user_id="U1")
DISCORD = Origin(platform=Platform.discord, team_id="222", channel_id="333", user_id="555")
CONSOLE = Origin(platform=Platform.console, team_id="local", channel_id="console", user_id="me")
AT = datetime(2026, 12, 6, 14, 0, 0, tzinfo=timezone.utc)
UNIX = int(AT.timestamp())


def queued(origin: Origin, **fields) -> JobEvent:
    return JobEvent(request_id="r1", kind=EventKind.queued, origin=origin, prompt="a cellist's vibrato",
                    created_at=AT, **fields)


def test_discord_shows_the_expected_time_as_a_relative_timestamp():
    text = render.status(queued(DISCORD, queue_position=3, eta_s=180))
    assert text == f"⏳ <@555> queued, position 3, ready <t:{UNIX + 180}:R>: *a cellist's vibrato*"


def test_slack_shows_the_readers_clock_time_with_a_utc_fallback():
    text = render.status(queued(SLACK, queue_position=3, eta_s=180.4))
    assert text == f"⏳ <@U1> queued, position 3, ready by <!date^{UNIX + 180}^{{time}}|14:03 UTC>: _a cellist's vibrato_"


def test_progress_carries_the_eta_too():
    event = JobEvent(request_id="r1", kind=EventKind.progress, origin=DISCORD, prompt="a skater", step=6,
                     total_steps=20, eta_s=30, created_at=AT)
    assert render.status(event) == f"🎨 <@555> ▰▰▰▱▱▱▱▱▱▱ step 6/20, ready <t:{UNIX + 30}:R>: *a skater*"


def test_without_an_eta_nothing_is_promised():
    assert render.status(queued(DISCORD, queue_position=0)) == "⏳ <@555> queued, position 0: *a cellist's vibrato*"
    assert "ready" not in render.status(queued(SLACK))


@pytest.mark.parametrize(("lane", "note"), [("fast", ""), ("relax", " · relax mode"), ("replay", " · re-run lane")])
def test_the_lane_is_shown_unless_it_is_the_fast_one(lane, note):
    assert render.status(queued(SLACK, lane=lane)) == f"⏳ <@U1> queued{note}: _a cellist's vibrato_"


def test_the_acknowledgment_carries_the_estimate_and_the_lane():
    req = GenerateRequest(origin=DISCORD, prompt="a juggler", lane="relax", created_at=AT)
    estimate = Estimate(position=12, units_ahead=14.0, eta_s=240)
    assert render.queued(req, estimate) == (f"⏳ <@555> queued, position ~12, ready <t:{UNIX + 240}:R> · relax mode: "
                                            "*a juggler*")
    untimed = Estimate(position=12, units_ahead=14.0, eta_s=None)
    assert render.queued(req, untimed) == render.queued(req) == "⏳ <@555> queued · relax mode: *a juggler*"


def test_the_console_says_position_and_seconds():
    assert describe(queued(CONSOLE, queue_position=4, eta_s=41.6)) == "queued, position 4, about 42s"
    assert describe(queued(CONSOLE, queue_position=4, lane="relax")) == "queued, position 4, relax mode"
    cancelled = JobEvent(request_id="r1", kind=EventKind.cancelled, origin=CONSOLE)
    assert describe(cancelled) == "cancelled"


def test_a_status_has_a_cancel_button_and_a_result_has_reroll_and_variations():
    [row] = render.discord_buttons("r1", render.status_buttons(queued(DISCORD)))
    [cancel] = row["components"]
    assert (cancel["label"], cancel["custom_id"], cancel["style"]) == ("Cancel", "skill:cancel:r1", 4)
    assert render.parse_custom_id(cancel["custom_id"]) == render.Button(render.CANCEL, "r1")
    result = render.discord_buttons("r1", seed=42)[0]["components"]
    assert [b["label"] for b in result] == ["Re-roll", "Variations", "Remix", "Parameters", "Delete"]
    assert [b["custom_id"] for b in result] == ["skill:reroll:r1", "skill:vary:r1", "skill:remix:r1:42", "skill:params:r1:42", "skill:delete:r1"]
    assert render.parse_custom_id("skill:remix:r1:42") == render.Button(render.REMIX, "r1", seed=42)
    [_, actions] = render.slack_blocks("⏳", "r1", render.STATUS_ACTIONS)
    assert [(e["action_id"], e["value"]) for e in actions["elements"]] == [("skill_cancel", "r1")]
    training = JobEvent(request_id="r1", kind=EventKind.progress, origin=SLACK, job="finetune", adapter="x")
    assert render.status_buttons(training) == ()  # a training is stopped with /skill-train cancel
    assert len(render.slack_blocks("⏳", "r1", render.status_buttons(training))) == 1


def test_the_cancelled_line_names_nobody():
    event = JobEvent(request_id="r1", kind=EventKind.cancelled, origin=DISCORD, prompt="a <@&1> juggler")
    text = render.cancelled(event)
    assert text.startswith("🛑 cancelled: *a <\u200b@&1> juggler*") and "<@555>" not in text


@pytest.mark.parametrize("text", ["a cellist --relax", "a cellist --relax --n 2", "a cellist --n 2 --relax"])
def test_relax_is_a_flag_that_picks_the_relax_lane(text):
    req = grammar.parse(text, SLACK)
    assert req.lane == "relax" and req.prompt == "a cellist"
    assert grammar.parse("a cellist", SLACK).lane == "fast"


def test_relax_takes_no_value_and_discords_boolean_means_the_same():
    with pytest.raises(grammar.CommandError, match="--relax takes no value; put it after the prompt"):
        grammar.parse("--relax a cellist", SLACK)
    assert grammar.to_request(grammar.from_options("a cellist", {"relax": True}), DISCORD).lane == "relax"
    assert grammar.to_request(grammar.from_options("a cellist", {"relax": False}), DISCORD).lane == "fast"
    assert "--relax" in grammar.help_text(Platform.slack)


def view(queued_units: float, s_per_unit: float | None = 2.0) -> GroupView:
    return GroupView(consumers=[ConsumerView(consumer="c1", at=0, s_per_unit=s_per_unit,
                                             queued={"fast/T9": Queued(requests=10, units=queued_units)})])


def intake(max_backlog_s: int = 1800) -> Intake:
    return Intake(BotSettings(max_backlog_s=max_backlog_s), producer=None, store=None, limiter=object())


def test_over_the_bound_a_request_is_refused_with_how_long_to_wait():
    with pytest.raises(Refusal) as refused:
        intake().check_backlog(view(queued_units=1000))  # 2000 s queued, 200 s over the bound
    assert str(refused.value) == "busy: about 33 min of work is queued; try again in about 4 min"
    with pytest.raises(Refusal, match="try again in about 1 min$"):
        intake().check_backlog(view(queued_units=901))


@pytest.mark.parametrize("case", ["under the bound", "no view", "never timed", "bound off"])
def test_otherwise_nothing_is_refused(case):
    bound, v = {"under the bound": (1800, view(899)), "no view": (1800, None),
                "never timed": (1800, view(10_000, s_per_unit=None)), "bound off": (0, view(10_000))}[case]
    intake(bound).check_backlog(v)


def test_teams_are_named_as_the_consumer_names_them_and_a_teams_own_backlog_counts_ahead():
    assert team_of(SLACK) == "T1" and team_of(DISCORD) == "222"
    mine = GroupView(consumers=[ConsumerView(consumer="c1", at=0, s_per_unit=1.0,
                                             queued={"fast/T1": Queued(requests=5, units=5.0)})])
    assert mine.estimate("fast", team_of(SLACK), 1.0).position == 5
