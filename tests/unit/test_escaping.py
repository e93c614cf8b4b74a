"""What a sender controls is shown, never obeyed: bots/render.py's escaping for Slack mrkdwn and Discord markdown.
A prompt cannot mention, broadcast or link in the channel it is shown in, and a plain one reads as typed."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bots import render
from schemas.messages import EventKind, GenerateRequest, JobEvent, Origin, Platform

pytestmark = pytest.mark.unit

SLACK = Origin(platform=Platform.slack, team_id="T1", channel_id="C1", user_id="U1")
DISCORD = Origin(platform=Platform.discord, team_id="222", channel_id="333", user_id="555")
ZWSP = "\u200b"
PLAIN = "a drummer's paradiddle"


def unescaped(discord: str) -> str:
    """What Discord parses for markup: each backslash-escaped character blanked out."""
    return re.sub(r"\\.", "\x00", discord.replace("\\\\", "\x00\x00"), flags=re.DOTALL)


def read_as_typed(discord: str) -> str:
    """What a person reads: escapes and zero-width spaces are invisible."""
    return re.sub(r"\\(.)", r"\1", discord.replace(ZWSP, ""), flags=re.DOTALL)


def masked_link(text: str) -> bool:
    return re.search(r"\[[^\]]*\]\(", unescaped(text)) is not None


def live_tokens(discord: str) -> list[str]:
    """`<` starting a mention, channel, role, time, command, emoji or link token, and live @everyone/@here."""
    return re.findall(r"<[@#!/:a-z]|@everyone|@here", discord)


# ---------------------------------------------------------------------------------------------------- Slack


@pytest.mark.security
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("<!here>", "&lt;!here&gt;"),
        ("<!channel> now", "&lt;!channel&gt; now"),
        ("ask <@U123>", "ask &lt;@U123&gt;"),
        ("<https://evil|x>", "&lt;https://evil|x&gt;"),
        ("salt & pepper", "salt &amp; pepper"),
        ("&lt;!here&gt;", "&amp;lt;!here&amp;gt;"),  # typed entities stay text: they are not decoded into tokens
    ],
)
def test_slack_control_characters_become_entities(text, shown):
    assert render.safe(text, Platform.slack) == shown
    assert "<" not in render.safe(text, Platform.slack)


@pytest.mark.security
def test_a_slack_prompt_cannot_break_out_of_its_italics_into_a_broadcast_or_link():
    req = GenerateRequest(origin=SLACK, prompt="_x_ <!here> see <https://evil.example|docs> *y*")
    text = render.queued(req)
    assert text.startswith("⏳ <@U1> queued: _") and text.count("<") == 1  # the requester's own mention only
    assert "&lt;!here&gt;" in text and "&lt;https://evil.example|docs&gt;" in text
    # Slack itself turns nothing in the block into a link or mention (our <@U1> still works: manual syntax).
    assert render.slack_blocks(text)[0]["text"] == {"type": "mrkdwn", "text": text, "verbatim": True}


@pytest.mark.security
def test_slack_messages_from_the_consumer_keep_their_format_and_lose_their_broadcasts():
    said = render.defuse("Training of `team-style` was cancelled by <@U0AB12> at step 3. <!here> <https://e|x>",
                         Platform.slack)
    assert said == ("Training of `team-style` was cancelled by <@U0AB12> at step 3. &lt;!here&gt; "
                    "&lt;https://e|x&gt;")
    event = JobEvent(request_id="r" * 32, kind=EventKind.failed, origin=SLACK, prompt=PLAIN,
                     message="no adapter <!channel>")
    assert render.failed(event) == f"❌ <@U1> could not draw _{PLAIN}_: no adapter &lt;!channel&gt;"


# -------------------------------------------------------------------------------------------------- Discord


@pytest.mark.security
@pytest.mark.parametrize(
    "text",
    ["[click](https://evil)", "[[a](https://x)](https://y)", "see [docs](<https://evil>) now", "[a]\n(https://x)"],
)
def test_discord_masked_links_never_render(text):
    shown = render.safe(text, Platform.discord)
    assert not masked_link(shown) and "://" not in shown  # and no bare URL to autolink or unfurl either
    assert read_as_typed(shown) == text


@pytest.mark.security
@pytest.mark.parametrize(
    "text", ["@everyone look", "hi @here", "<@123>", "<@123456789012345678>", "<@&987>", "<#123>", "<t:0:R>",
             "</skill:123>", "<:pog:123>", "<https://evil.example>"],
)
def test_discord_mentions_and_tokens_are_broken(text):
    shown = render.safe(text, Platform.discord)
    assert live_tokens(shown) == [] and read_as_typed(shown) == text


@pytest.mark.security
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("**bold**", r"\*\*bold\*\*"),
        ("a ` b", r"a \` b"),
        ("||spoiler||", r"\|\|spoiler\|\|"),
        ("~~gone~~ __under__", r"\~\~gone\~\~ \_\_under\_\_"),
        ("back\\slash", "back\\\\slash"),
        ("# big\n- item\n> quote\n-# small", "\\# big\n\\- item\n\\> quote\n\\-# small"),
        ("close-up > wide shot #1", "close-up > wide shot #1"),  # only at a line's start do these act
    ],
)
def test_discord_markdown_is_escaped(text, shown):
    assert render.safe(text, Platform.discord) == shown


@pytest.mark.security
def test_a_discord_prompt_cannot_break_out_of_its_italics():
    req = GenerateRequest(origin=DISCORD, prompt="x* @everyone [click](https://evil) *y")
    text = render.queued(req)
    assert text.startswith("⏳ <@555> queued: *x\\*") and text.endswith("\\*y*")
    assert not masked_link(text) and live_tokens(text.removeprefix("⏳ <@555>")) == []


@pytest.mark.security
def test_discord_messages_from_the_trainer_keep_their_format_and_the_cancellers_mention():
    said = render.defuse("Training of `team-style` was cancelled by <@123456789012345678> at step 3. @here "
                         "[docs](https://evil) <#1>", Platform.discord)
    assert said.startswith("Training of `team-style` was cancelled by <@123456789012345678> at step 3.")
    assert not masked_link(said) and live_tokens(said.replace("<@123456789012345678>", "")) == []


# ---------------------------------------------------------------------------------------------------- both


@pytest.mark.parametrize("platform", [Platform.slack, Platform.discord])
def test_a_plain_prompt_reads_as_typed(platform):
    assert render.safe(PLAIN, platform) == PLAIN
    origin = SLACK if platform == Platform.slack else DISCORD
    wrap = "_" if platform == Platform.slack else "*"
    assert render.queued(GenerateRequest(origin=origin, prompt=PLAIN)).endswith(f"queued: {wrap}{PLAIN}{wrap}")


@pytest.mark.parametrize(("platform", "char"), [(Platform.slack, "&"), (Platform.discord, "*")])
def test_an_escaped_prompt_stays_within_one_message(platform, char):
    quoted = render.quote(char * 500, platform)  # each character escaped widens it
    assert len(quoted) <= render.QUOTE_MAX_CHARS + 2
    if platform == Platform.slack:
        assert quoted.endswith("&amp;…_")  # cut between escapes, never inside one
    else:
        assert len(quoted) == 2 + 2 * 500


ATTACKS = ["<!here>", "<!channel>", "<@U1>", "<@123>", "<#1>", "<t:0:R>", "</a:1>", "<https://e|x>", "[x](https://e)",
           "[", "](", "@everyone", "@here", "\\", "`", "*", "_", "~", "|", ">", "#", "-", "\n", "&", "&lt;", "://"]
texts = st.lists(st.one_of(st.sampled_from(ATTACKS), st.text(st.characters(blacklist_characters=ZWSP), max_size=8)),
                 max_size=12).map("".join)


@pytest.mark.security
@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_no_escaped_text_can_link_mention_or_broadcast(text):
    slack = render.safe(text, Platform.slack)
    assert "<" not in slack and ">" not in slack
    assert slack.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == text
    discord = render.safe(text, Platform.discord)
    assert not masked_link(discord) and live_tokens(discord) == [] and "://" not in discord
    assert not re.search(r"[\[\]()*_~`|]", unescaped(discord))  # every markdown character escaped
    assert read_as_typed(discord) == text
