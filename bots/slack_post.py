"""Delivery to Slack with slack_sdk's AsyncWebClient (its base_url is SKILL_SLACK_API_BASE).

Progress edits the status message the bot posted (chat.update), within a per-workspace budget shared by every
delivery replica (bots/slack_budget.py): chat.update is Tier 3 (about 50 a minute per workspace), so a status edit
is skipped once PROGRESS_EDITS_PER_MIN edits went to that workspace in the last minute; the rest of the minute is
kept for final results, which are never skipped.

A result is a new message that mentions the requester (an edit notifies nobody): the images are uploaded with
files_upload_v2 into the channel and thread of the request, with that message as their comment, FIRST; then the
status message is edited to "✅ ... · done: see below", with the result's buttons (the result's file ids, or its
message's ts, are kept in Redis for Delete). So a status never says done while the images are missing: an upload Slack refuses (`not_in_channel`: the bot was removed) turns the
status into "❌ I could not post the images here: invite me with /invite @skillgen" (a new message when the edit is
refused too, as chat:write.public still lets it post in a public channel). A result without images is the same
with chat.postMessage. The one step that cannot be repeated harmlessly (the post) is remembered per request, so
a retry of the result after a 429 or a 5xx on the edit does not post it twice.
Status edits carry the Cancel button; every final edit drops it. A cancelled request is an edit of the status
message to "🛑 cancelled" and nothing else (no new message, so nobody is pinged).
Failed results are an edit plus a short new message that mentions the requester ("🔔 @them Your picture could not
be done (above)."); blocked results delete the status message and go to the person alone (chat.postEphemeral).
Every text is clipped to Slack's limits (render.SLACK_SECTION_MAX in a section, render.SLACK_TEXT_MAX in a
message), and in the requester's language, which the bot keeps by request id (bots/locales).
"""

from __future__ import annotations

import json
from collections import OrderedDict

import aiohttp
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.web.async_client import AsyncWebClient

from bots import image_actions, locales, render
from bots.errors import RetryAfter, Transient, Undeliverable
from bots.slack_budget import PROGRESS_EDITS_PER_MIN, EditBudget
from schemas.messages import EventKind, JobEvent, Origin, Platform
from skillgen.runtime.redis import Store

GONE = ("message_not_found", "cant_update_message", "cant_delete_message")
NOT_MEMBER = ("not_in_channel", "channel_not_found")
RESULT_TTL_S = 7 * 86400  # how long a result's Delete button can find the result's files
POSTED_REMEMBERED = 10_000  # request ids whose result message is up, so a retried result does not post it again


CANNOT_POST = {error: locales.t(f"slack_{error}") for error in ("not_in_channel", "channel_not_found", "is_archived")}


def cannot_post(error: str, lang: str = "en") -> str:
    """What the person is told, in their language, when Slack answers `error` to a post in their channel (or
    `not_in_dm`: a DM the bot is not in); the bots say it (bots/slack_bot.py, bots/training_slack.py)."""
    known = error in CANNOT_POST or error == "not_in_dm"
    return locales.t(f"slack_{error}" if known else "slack_cannot_post", lang, error=error)


def result_key(request_id: str) -> str:
    """Where delivery keeps a posted result's place (channel, file ids or message ts) in Redis."""
    return f"slack:result:{request_id}"


class SlackPoster:
    platform = Platform.slack

    def __init__(self, client: AsyncWebClient, progress_edits_per_min: int = PROGRESS_EDITS_PER_MIN,
                 store: Store | None = None):
        self.client = client
        self.store = store
        self.budget = EditBudget(store, progress_edits_per_min)
        self._posted: OrderedDict[str, None] = OrderedDict()

    def message_key(self, event: JobEvent) -> str | None:
        o = event.origin
        return f"slack:{o.channel_id}/{o.status_message_id}" if o.status_message_id else None

    async def status(self, event: JobEvent) -> None:
        if not event.origin.status_message_id or not await self.budget.spend(event.origin.team_id, progress=True):
            return  # nothing to edit, or the workspace's edit budget is spent: the next status or the result shows
        lang = await self._lang(event)
        text = render.status(event, lang)
        blocks = render.slack_blocks(text, event.request_id, render.status_buttons(event), lang=lang)  # Cancel
        await self._edit_or_post(event.origin, text, blocks, post_if_gone=False, counted=True)

    async def _lang(self, event: JobEvent) -> str:
        """The requester's language (the bot keeps it by request id; English when none was kept)."""
        return await locales.recall(self.store, event.request_id)

    async def final(self, event: JobEvent, images: list[tuple[str, bytes]]) -> None:
        o, lang = event.origin, await self._lang(event)
        if event.kind == EventKind.blocked:
            if o.status_message_id:
                await self._call("chat_delete", ignore=GONE, channel=o.channel_id, ts=o.status_message_id)
            await self._call("chat_postEphemeral", channel=o.channel_id, user=o.user_id, thread_ts=o.thread_id,
                             text=render.blocked(event, lang))
            return
        if event.kind == EventKind.cancelled:  # an edit, no buttons, and no new message: nobody is pinged
            if o.status_message_id:
                text = render.cancelled(event, lang)
                await self._edit_or_post(o, text, render.slack_blocks(text), post_if_gone=False)
            return
        if event.kind == EventKind.failed:
            text = render.failed(event, lang)
            await self._edit_or_post(o, text, render.slack_blocks(text))
            if o.status_message_id:  # the edit notifies nobody
                await self._post_once(event, "chat_postMessage", channel=o.channel_id, thread_ts=o.thread_id,
                                      text=render.discord_ping(event, lang))
            return
        result = render.done(event, lang)
        if images:
            posted = await self._post_once(
                event, "files_upload_v2", ignore=NOT_MEMBER, channel=o.channel_id, thread_ts=o.thread_id,
                initial_comment=result,
                file_uploads=[{"content": data, "filename": name, "title": name} for name, data in images],
            )
        else:
            posted = await self._post_once(event, "chat_postMessage", ignore=NOT_MEMBER, channel=o.channel_id,
                                           thread_ts=o.thread_id, text=result, blocks=render.slack_blocks(result))
        if posted is None:  # Slack refused the result: the bot is no longer in the channel
            text = render.slack_cannot_upload(event, lang)
            await self._edit_or_post(o, text, render.slack_blocks(text))
            return
        await self._remember_result(event, posted)
        if o.status_message_id:
            text = render.slack_result_posted(event, lang)
            buttons_for = event.request_id if event.job == "generate" else None
            blocks = render.slack_blocks(text, buttons_for, seed=render.result_seed(event), lang=lang)
            await self._edit_or_post(o, text, blocks + image_actions.slack_blocks(event, lang), post_if_gone=False)

    async def _remember_result(self, event: JobEvent, posted) -> None:
        """Where the result went (its files, or its message's ts), for the Delete button (bots/slack_bot.py)."""
        if self.store is None or posted is True or event.job != "generate":
            return  # True: posted by an earlier try, which remembered it
        files = [f["id"] for f in posted.get("files") or [] if f.get("id")]
        where = {"channel": event.origin.channel_id, "files": files, "ts": None if files else posted.get("ts")}
        await self.store.put(result_key(event.request_id), json.dumps(where), RESULT_TTL_S)

    async def _post_once(self, event: JobEvent, method: str, **kwargs):
        """A post that must not be repeated: skipped (answering True) when this request's went out already."""
        key = f"{event.request_id}:{method}"
        if key in self._posted:
            return True
        answer = await self._call(method, **kwargs)
        if answer is not None:
            self._posted[key] = None
            while len(self._posted) > POSTED_REMEMBERED:
                self._posted.popitem(last=False)
        return answer

    async def _edit_or_post(self, o: Origin, text: str, blocks: list[dict], post_if_gone: bool = True,
                            counted: bool = False) -> None:
        """Edit the status message (a chat.update, counted in the workspace's budget unless `counted` already),
        or post `text` as a new message when there is none or it is gone (`post_if_gone`)."""
        if o.status_message_id:
            if not counted:
                await self.budget.spend(o.team_id, progress=False)
            answer = await self._call("chat_update", ignore=GONE + NOT_MEMBER, channel=o.channel_id,
                                      ts=o.status_message_id, text=text, blocks=blocks)
            if answer is not None or not post_if_gone:
                return
        await self._call("chat_postMessage", channel=o.channel_id, thread_ts=o.thread_id, text=text, blocks=blocks)

    async def _call(self, method: str, ignore: tuple[str, ...] = (), **kwargs):
        """The Web API call, its failures sorted into RetryAfter, Transient and Undeliverable; None when Slack
        answered one of the `ignore` errors."""
        for name in ("text", "initial_comment"):
            if isinstance(kwargs.get(name), str):
                kwargs[name] = render.clip(kwargs[name], render.SLACK_TEXT_MAX)
        try:
            return await getattr(self.client, method)(**kwargs)
        except SlackApiError as exc:
            status = exc.response.status_code
            error = exc.response.get("error") if isinstance(exc.response.data, dict) else None
            if status == 429:
                after = exc.response.headers.get("Retry-After") or exc.response.headers.get("retry-after") or 1
                raise RetryAfter(f"Slack 429 on {method}", float(after)) from exc
            if status >= 500:
                raise Transient(f"Slack {status} on {method}") from exc
            if error in ignore:
                return None
            raise Undeliverable(f"Slack {method}: {error or status}", status) from exc
        except SlackRequestError as exc:  # files_upload_v2's upload step answered other than 200
            raise Transient(f"Slack {method}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Transient(f"Slack unreachable on {method}: {exc!r}") from exc
