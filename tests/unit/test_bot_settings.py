"""A bot facing Discord or Slack refuses to start without SKILL_SIGNING_KEY and SKILL_ALLOWED_TEAMS, naming what
to set; with both it starts."""

import pytest

from bots.errors import BotError
from bots.settings import BotSettings, DiscordSettings, SlackSettings

pytestmark = pytest.mark.unit

KEY = "k" * 32


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in ("SKILL_SIGNING_KEY", "SKILL_ALLOWED_TEAMS"):
        monkeypatch.delenv(name, raising=False)


def settings(cls=BotSettings, **fields) -> BotSettings:
    return cls(_env_file=None, **fields)


@pytest.mark.security
@pytest.mark.parametrize("cls", [BotSettings, DiscordSettings, SlackSettings])
def test_without_a_signing_key_the_bots_refuse_to_start(cls):
    with pytest.raises(BotError, match="set SKILL_SIGNING_KEY"):
        settings(cls, allowed_teams=["discord:1"]).check_chat()


@pytest.mark.security
@pytest.mark.parametrize("cls", [BotSettings, DiscordSettings, SlackSettings])
def test_without_allowed_teams_the_bots_refuse_to_start(cls):
    with pytest.raises(BotError, match="set SKILL_ALLOWED_TEAMS"):
        settings(cls, signing_key=KEY).check_chat()


@pytest.mark.security
def test_an_empty_variable_is_no_list(monkeypatch):
    monkeypatch.setenv("SKILL_SIGNING_KEY", KEY)
    monkeypatch.setenv("SKILL_ALLOWED_TEAMS", " , ")
    with pytest.raises(BotError, match="set SKILL_ALLOWED_TEAMS"):
        settings().check_chat()


def test_with_both_they_start_and_only_the_listed_teams_are_let_in(monkeypatch):
    monkeypatch.setenv("SKILL_SIGNING_KEY", KEY)
    monkeypatch.setenv("SKILL_ALLOWED_TEAMS", "discord:123456789012345678, slack:T0123ABCD")
    s = settings()
    s.check_chat()
    assert s.team_allowed("discord", "123456789012345678") and s.team_allowed("slack", "T0123ABCD")
    assert not s.team_allowed("discord", "999") and not s.team_allowed("slack", "T0OTHER")
    star = settings(signing_key=KEY, allowed_teams=["*"])
    star.check_chat()
    assert star.team_allowed("slack", "T0OTHER")
