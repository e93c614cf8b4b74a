"""What the bots and delivery say in a channel, for Discord and Slack alike, and the buttons: Re-roll, Variations,
Remix and Delete on a result, Cancel on a status that is not final (and U1-U4, V1-V4 on one image of a result:
bots/image_actions.py lays them out).

A button names its action and the request it acts on (`skill:reroll:<request id>`, `skill:cancel:<request id>`;
Remix also the seed of the result it sits on, `skill:remix:<request id>:<seed>`; Upscale and Vary the image's
place in the result, from 1, `skill:u:<request id>:2`); the bot that receives the click looks the request up
(bots/intake.py).

When a result is expected (an event's `eta_s`, an estimate at intake) it is shown as the platform's own timestamp,
so every reader sees it in their time zone: Discord `<t:UNIX:R>` ("in 3 minutes"), Slack
`<!date^UNIX^{time}|HH:MM UTC>` (their clock time; the fallback text in UTC).

Whatever a sender controls (a prompt, a file's or an adapter's name, a caption) enters a message only through
`safe(text, platform)`, one escaping per platform (`slack_text`, `discord_text`): it can then neither mention,
broadcast, link nor break out of the formatting around it, and still reads as typed. Our own sentences that may
quote sender text (the consumer's and the trainer's messages, refusals) go through `defuse(text, platform)`: their
formatting stays, links and broadcasts do not.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from bots.locales import t
from schemas.messages import EventKind, GenerateRequest, JobEvent, Platform
from skillgen.runtime.groupview import Estimate

_QUEUE_DOWN_KEYS = {"Your request": "queue_down_request", "The cancel": "queue_down_cancel"}


def queue_down(what: str = "Your request", lang: str = "en") -> str:
    """The one refusal for a request Kafka could not take, worded alike on every front-end (in the catalogues for
    a request and a cancel; other things, e.g. a training, in English)."""
    if what in _QUEUE_DOWN_KEYS:
        return t(_QUEUE_DOWN_KEYS[what], lang)
    return f"❌ {what} could not be queued (the queue is unreachable). Try again in a minute."


QUEUE_DOWN = queue_down()

REROLL = "reroll"
VARIATIONS = "vary"
REMIX = "remix"
DELETE = "delete"
CANCEL = "cancel"
PARAMS = "params"  # the request as a `/skill ...` line to copy, shown only to whoever clicks
SEEDED = (REMIX, PARAMS)  # buttons whose id carries the seed the result was drawn with, when known
UPSCALE = "u"  # 2x one image of a result
VARY = "v"  # a variation of one image of a result (Variations draws four from new seeds)
IMAGE_ACTIONS = (UPSCALE, VARY)
REPEATS = (REROLL, VARIATIONS)  # the same request again, new seeds: no questions asked
ACTIONS = (*REPEATS, REMIX, PARAMS, DELETE)  # on a result (Discord: five a row at most)
STATUS_ACTIONS = (CANCEL,)  # on a status that is not final (queued, drawing)
_ALL = ACTIONS + STATUS_ACTIONS + IMAGE_ACTIONS
_CUSTOM_ID = re.compile(rf"^skill:({'|'.join(_ALL)}):([A-Za-z0-9_-]{{1,64}})(?::([0-9]{{1,10}}))?$")
# Slack action ids must be unique within a message; the value carries the request id (and Remix's the seed).
SLACK_ACTION_IDS = {REROLL: "skill_reroll", VARIATIONS: "skill_vary", REMIX: "skill_remix", PARAMS: "skill_params",
                    DELETE: "skill_delete", CANCEL: "skill_cancel"}
# Discord button styles: primary (blurple), secondary (grey), danger (red).
_DISCORD_STYLES = {REROLL: 1, VARIATIONS: 2, REMIX: 2, PARAMS: 2, DELETE: 4, CANCEL: 4}


class Button(NamedTuple):
    """What a click names: the action, the request it acts on, and (Remix) the seed the result was drawn with or
    (Upscale, Vary) the image's place in the result, from 1."""

    action: str
    request_id: str
    seed: int | None = None
    index: int | None = None


def label(action: str, lang: str = "en") -> str:
    """A button's label in `lang` (the catalogues' `button_<action>`: "Re-roll", "重新生成", ...).

    A button is seen by everyone in the channel, but one message has one set of labels: they are in the language
    of the person who asked (delivery reads it by request id, bots/locales), whose request it is, as the status
    and result lines around them are. Whoever clicks is answered in their own language."""
    return t(f"button_{action}", lang)


def custom_id(action: str, request_id: str, seed: int | None = None, index: int | None = None) -> str:
    """`skill:<action>:<request id>`, and `:<seed>` for Remix and Parameters when the result's seed is known (a request that named
    no seed got one from the consumer, and only its result says which), `:<index>` for Upscale and Vary."""
    extra = seed if action in SEEDED else index if action in IMAGE_ACTIONS else None
    return f"skill:{action}:{request_id}" + (f":{extra}" if extra is not None else "")


def parse_custom_id(value: str) -> Button | None:
    m = _CUSTOM_ID.match(value)
    if m is None:
        return None
    extra = int(m.group(3)) if m.group(3) else None
    if m.group(1) in IMAGE_ACTIONS:
        return Button(m.group(1), m.group(2), index=extra) if extra else None  # which image it is, or nothing
    return Button(m.group(1), m.group(2), extra)


def slack_value(action: str, request_id: str, seed: int | None = None, index: int | None = None) -> str:
    """A Slack button's value: the request id, and `:<seed>` for Remix and Parameters, `:<index>` for Upscale and Vary (as in
    custom_id)."""
    return custom_id(action, request_id, seed, index).split(":", 2)[2]


def parse_slack_value(value: str) -> tuple[str, int | None]:
    request_id, _, seed = value.partition(":")
    return request_id, int(seed) if seed.isdigit() else None


def result_seed(event: JobEvent) -> int | None:
    """The seed of a result's first image: what Remix draws its new prompt with."""
    return next((b.seed for b in event.blobs if b.seed is not None), None)


# -------------------------------------------------------------------------------------- text a sender controls

ZWSP = "\u200b"  # a zero-width space: invisible, and it breaks the token it is put into
QUOTE_MAX_CHARS = 1000  # a quoted prompt, escaped (Discord allows 2000 characters a message, a Slack section 3000)
MESSAGE_MAX_CHARS = 900  # a consumer's or trainer's message, defused


def slack_text(text: str) -> str:
    """Sender text for Slack mrkdwn. `&`, `<` and `>` are Slack's control characters and entities its only escape:
    with them escaped no `<!here>`, `<!channel>`, `<@U…>`, `<#C…>`, `<!subteam^…>` or `<url|text>` can form, and what
    is left of mrkdwn (`*`, `_`, `~`, backticks) can change how the text looks, nothing more. (slack_blocks also
    marks its text verbatim, so Slack does not turn a bare URL or channel name in it into a link either.)"""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# Every markdown character is escaped wherever it stands; `>`, `#` and `-` only at the start of a line, the only
# place they act (quote, heading, list, -# subtext). This is by hand: discord.utils.escape_markdown escapes only the
# first `[` of a masked link (so `[[a](https://x)](https://y)` keeps a live inner link) and leaves URLs unescaped.
_DISCORD_MARKDOWN = re.compile(r"[\\*_~`|\[\]()]|^[ \t]*[>#-]", re.MULTILINE)


def _discord_tokens(text: str) -> str:
    """Break every `<...>` token and every autolink of `text`, and its @everyone/@here."""
    # discord.py is installed wherever Discord text is written; imported here so Slack-only processes skip it.
    from discord.utils import escape_mentions

    # escape_mentions covers @everyone, @here and @<id> (a zero-width space after the @). By hand, because it does
    # not: a zero-width space after every `<`, which breaks <@id> with a short id, <@&role>, <#channel>, <t:0:R>,
    # </command:id>, <:emoji:id> and <https://...>; and one inside `://`, so a URL neither links nor unfurls.
    return escape_mentions(text.replace("<", "<" + ZWSP)).replace("://", ":" + ZWSP + "//")


def discord_text(text: str) -> str:
    """Sender text for Discord markdown: every markdown character escaped (a masked link `[text](url)` cannot form),
    every mention, channel, timestamp and command token broken, @everyone and @here defused. A backslash escape is
    invisible in Discord, so `a drummer's paradiddle (live)` reads as typed."""
    escaped = _DISCORD_MARKDOWN.sub(lambda m: m.group()[:-1] + "\\" + m.group()[-1], text)
    return _discord_tokens(escaped)


def safe(text: str, platform: Platform) -> str:
    """Text a sender controls, escaped for the platform it is shown on (the console shows it as typed)."""
    if platform == Platform.slack:
        return slack_text(text)
    if platform == Platform.discord:
        return discord_text(text)
    return text


_SLACK_USER = re.compile(r"&lt;@([UWB][A-Z0-9]{1,20})&gt;")
_DISCORD_USER = re.compile(r"(<@!?[0-9]{1,20}>)")


def defuse(text: str, platform: Platform) -> str:
    """One of our own sentences that may quote sender text (the consumer's or trainer's message, a refusal): its
    formatting stays (code spans, bold), but no link, broadcast or channel, role, time or command token survives.
    A well-formed user mention stays: it is how the trainer names who cancelled a training (on Discord delivery's
    allowed_mentions still lets it ping nobody but the requester)."""
    if platform == Platform.slack:
        return _SLACK_USER.sub(r"<@\1>", slack_text(text))
    if platform == Platform.discord:
        parts = _DISCORD_USER.split(text)  # odd indexes are user mentions, kept as they are
        return "".join(p if i % 2 else _discord_tokens(p).replace("](", "]" + ZWSP + "(") for i, p in enumerate(parts))
    return text


def _bounded(text: str, escape, max_chars: int) -> str:
    """escape(text), cut (before escaping, so no escape is split) to at most max_chars characters."""
    out = escape(text)
    while len(out) > max_chars:
        text = text[: min(len(text) - 1, len(text) * (max_chars - 1) // len(out))]  # in proportion: escapes widen
        out = escape(text) + "…"
    return out


def quote(prompt: str, platform: Platform) -> str:
    """A prompt in a message: escaped, in italics."""
    text = _bounded(prompt, lambda t: safe(t, platform), QUOTE_MAX_CHARS)
    if platform == Platform.slack:
        # mrkdwn has no escape for `_`: one inside would end the italics early, so it shows as a space.
        return f"_{text.replace('_', ' ')}_"
    return f"*{text}*"


def said(message: str | None, platform: Platform) -> str:
    """A consumer's or trainer's message, defused and bounded."""
    return _bounded(message or "", lambda t: defuse(t, platform), MESSAGE_MAX_CHARS)


def mention(user_id: str) -> str:
    """The same syntax on both platforms; posts allow only this user to be pinged."""
    return f"<@{user_id}>"


LANE_NOTES = {"relax": "relax mode", "replay": "re-run lane"}  # the fast lane, the default, goes unsaid


def lane_note(lane: str | None, lang: str = "en") -> str:
    return t(f"lane_{lane}", lang) if lane in LANE_NOTES else ""


def timestamp(at: datetime, platform: Platform) -> str:
    """A moment as the platform shows it to each reader: Discord relative ("in 3 minutes"), Slack the reader's
    clock time (the fallback, for clients that cannot, in UTC), the console in seconds from now."""
    unix = int(at.timestamp())
    if platform == Platform.discord:
        return f"<t:{unix}:R>"
    if platform == Platform.slack:
        return f"<!date^{unix}^{{time}}|{at.astimezone(timezone.utc):%H:%M} UTC>"
    return f"in about {max(0, round(at.timestamp() - datetime.now(timezone.utc).timestamp()))}s"


def ready(created_at: datetime, eta_s: float | None, platform: Platform, lang: str = "en") -> str:
    """", ready <timestamp>" for a result expected `eta_s` seconds after `created_at`; "" when nobody knows."""
    if eta_s is None:
        return ""
    key = "ready_by" if platform == Platform.slack else "ready"  # "ready by 14:03", "ready in 3 minutes"
    return t(key, lang, when=timestamp(created_at + timedelta(seconds=eta_s), platform))


def queued(req: GenerateRequest, estimate: Estimate | None = None, lang: str = "en") -> str:
    """The acknowledgment: queued, with the group's estimate at intake when there is one."""
    p = req.origin.platform
    n = t("n_images", lang, n=req.num_images) if req.num_images > 1 else ""
    where = ""
    if estimate is not None and estimate.eta_s is not None:
        where = t("position_estimate", lang, position=estimate.position) + ready(req.created_at, estimate.eta_s, p,
                                                                                 lang)
    return t("queued", lang, who=mention(req.origin.user_id), n=n, where=where, lane=lane_note(req.lane, lang),
             what=quote(req.prompt, p))


def status(event: JobEvent, lang: str = "en") -> str:
    """One line for a status that is not final: queue position, started, or a progress bar."""
    who = mention(event.origin.user_id)
    progress = event.kind == EventKind.progress and event.step is not None and event.total_steps
    if event.job == "finetune":
        from bots.train_commands import (
            progress_text,  # the trainer's own words for its jobs (no torch)
        )

        bar = f"{_bar(event.step, event.total_steps)} " if progress else ""
        return f"🧪 {who} {bar}{said(progress_text(event), event.origin.platform)}"
    p = event.origin.platform
    what = quote(event.prompt, p) if event.prompt else t("your_request", lang)
    when = ready(event.created_at, event.eta_s, p, lang)
    if event.kind == EventKind.queued:
        where = t("position", lang, position=event.queue_position) if event.queue_position is not None else ""
        return t("queued", lang, who=who, n="", where=where + when, lane=lane_note(event.lane, lang), what=what)
    if progress:
        return t("progress", lang, who=who, bar=_bar(event.step, event.total_steps), step=event.step,
                 total=event.total_steps, ready=when, what=what)
    return t("drawing", lang, who=who, ready=when, what=what)


def _bar(step: int, total: int) -> str:
    filled = round(10 * step / total)
    return "▰" * filled + "▱" * (10 - filled)


def rerun(event: JobEvent, lang: str = "en") -> str:
    """What a re-run (`skillgen replay`) adds to its result: that it is one, and the operator's reason, escaped as
    sender text is. A re-run is the operator's post, so it names (and pings) no one."""
    if event.replay_of is None:
        return ""
    p = event.origin.platform
    why = f": {_bounded(event.replay_reason, lambda t: safe(t, p), 300)}" if event.replay_reason else ""
    return t("rerun", lang, why=why)


def _who(event: JobEvent) -> str:
    return "" if event.replay_of is not None else f"{mention(event.origin.user_id)} "


def done(event: JobEvent, lang: str = "en") -> str:
    p = event.origin.platform
    what = quote(event.prompt, p) if event.prompt else t("your_request", lang)
    seeds = [b.seed for b in event.blobs if b.seed is not None]
    seed_note = t("seeds", lang, seeds=", ".join(map(str, seeds))) if seeds else ""
    cached = t("from_cache", lang) if event.cache_level else ""
    if event.job == "finetune":
        return f"✅ {mention(event.origin.user_id)} {said(event.message or f'adapter {event.adapter} is ready', p)}"
    return t("done", lang, who=_who(event), what=what, seeds=seed_note, cached=cached, rerun=rerun(event, lang))


def failed(event: JobEvent, lang: str = "en") -> str:
    if event.job == "finetune":  # the trainer's message is a whole sentence: "Training of `x` failed: ..."
        return f"❌ {mention(event.origin.user_id)} {said(event.message, event.origin.platform)}"
    p = event.origin.platform
    what = quote(event.prompt, p) if event.prompt else t("your_request", lang)
    return t("failed", lang, who=_who(event), what=what, message=said(event.message, p), rerun=rerun(event, lang))


def blocked(event: JobEvent, lang: str = "en") -> str:
    """Shown only to the person who asked; never names the prompt in a channel."""
    return t("blocked", lang, message=said(event.message, event.origin.platform), rerun=rerun(event, lang))


def cancelled(event: JobEvent, lang: str = "en") -> str:
    """A cancelled request's status: short, naming (and so pinging) nobody."""
    p = event.origin.platform
    what = quote(event.prompt, p) if event.prompt else t("the_request", lang)
    why = f" · {said(event.message, p)}" if event.message else ""
    return t("cancelled", lang, what=what, why=why)


def parameters(line: str, lang: str = "en") -> str:
    """What the Parameters button shows (to whoever clicked): the request's `/skill ...` line
    (grammar.command_line) in a code block, which both platforms render verbatim with a copy affordance; a ``` in
    the prompt would end the block early, so it is broken with a zero-width space."""
    return t("parameters", lang, line="```\n" + line.replace("```", "`\u200b``") + "\n```")


def slack_result_posted(event: JobEvent, lang: str = "en") -> str:
    """The status message once the result is posted as a new message below it (that one pings the person)."""
    return t("done_see_below", lang, done=done(event, lang))


def slack_cannot_upload(event: JobEvent, lang: str = "en") -> str:
    return t("cannot_upload", lang, who=mention(event.origin.user_id))


DISCORD_MAX_CHARS = 2000  # a Discord message's content


def discord_clip(text: str) -> str:
    """Discord refuses content over 2000 characters (400 50035): longer text is cut, with an ellipsis."""
    return text if len(text) <= DISCORD_MAX_CHARS else text[: DISCORD_MAX_CHARS - 1] + "…"


def discord_ping(event: JobEvent, lang: str = "en") -> str:
    """The follow-up that notifies the requester of a result shown by an edit (edits never notify)."""
    what = "ready" if event.kind == EventKind.succeeded else "failed"
    job = "training" if event.job == "finetune" else "picture"
    return t(f"ping_{job}_{what}", lang, who=mention(event.origin.user_id))


def discord_missing_permission(channel_id: str, access: bool, lang: str = "en") -> str:
    """Told privately, in the requester's language, when the bot may not post in the channel a request came from
    (403 50001 / 50013)."""
    lacking = t("cannot_see" if access else "not_allowed_in", lang)
    return t("missing_permission", lang, channel=f"<#{channel_id}>", lacking=lacking)


def discord_buttons(request_id: str, actions: tuple[str, ...] = ACTIONS, seed: int | None = None,
                    lang: str = "en") -> list[dict]:
    """One action row: a result's Re-roll, Variations, Remix and Parameters (their custom ids carrying `seed`) and
    Delete, or (STATUS_ACTIONS) a status's Cancel; labelled in `lang`, the requester's (`label`)."""
    return [
        {
            "type": 1,
            "components": [
                {"type": 2, "style": _DISCORD_STYLES[a], "label": label(a, lang),
                 "custom_id": custom_id(a, request_id, seed)}
                for a in actions
            ],
        }
    ]


def status_buttons(event: JobEvent) -> tuple[str, ...]:
    """The buttons a status that is not final carries: Cancel on an image request (a training has its command)."""
    return STATUS_ACTIONS if event.job == "generate" else ()


SLACK_SECTION_MAX = 3000  # a section block's text (Slack refuses the message with invalid_blocks past it)
SLACK_TEXT_MAX = 40000  # a message's top-level text (Slack truncates past it)


def clip(text: str, max_chars: int) -> str:
    """`text` cut to max_chars characters, the cut shown with an ellipsis (an escape cut in two shows as text)."""
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def slack_blocks(text: str, request_id: str | None = None, actions: tuple[str, ...] = ACTIONS,
                 seed: int | None = None, lang: str = "en") -> list[dict]:
    """A section with `text`, and with `request_id` an actions block: a result's Re-roll, Variations, Remix and
    Parameters (their values carrying `seed`) and Delete, or (STATUS_ACTIONS) a status's Cancel; labelled in
    `lang`, the requester's (`label`)."""
    # verbatim: Slack links nothing by itself (a bare URL or channel name); our own <@user> mentions still work.
    text = clip(text, SLACK_SECTION_MAX)
    blocks: list[dict] = [{"type": "section", "text": {"type": "mrkdwn", "text": text, "verbatim": True}}]
    if request_id and actions:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "action_id": SLACK_ACTION_IDS[a],
                        "text": {"type": "plain_text", "text": label(a, lang)},
                        "value": slack_value(a, request_id, seed),
                        **({"style": "primary"} if a == REROLL else {"style": "danger"} if a in (CANCEL, DELETE) else {}),
                    }
                    for a in actions
                ],
            }
        )
    return blocks
