"""Delivery to Slack with slack_sdk's AsyncWebClient (its base_url is SKILL_SLACK_API_BASE).

Status and results edit the status message the bot posted (chat.update); images are uploaded with
files_upload_v2 into the same channel and thread, after the status says done, so the one step that cannot be
repeated harmlessly comes last. Blocked results delete the status message and go to the person alone
(chat.postEphemeral).
"""

from __future__ import annotations

import asyncio

import aiohttp
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.web.async_client import AsyncWebClient

from bots import render
from bots.errors import RetryAfter, Transient, Undeliverable
from schemas.messages import EventKind, JobEvent, Origin, Platform

GONE = ("message_not_found", "cant_update_message", "cant_delete_message")


class SlackPoster:
    platform = Platform.slack

    def __init__(self, client: AsyncWebClient):
        self.client = client

    def message_key(self, event: JobEvent) -> str | None:
        o = event.origin
        return f"slack:{o.channel_id}/{o.status_message_id}" if o.status_message_id else None

    async def status(self, event: JobEvent) -> None:
        if not event.origin.status_message_id:
            return
        text = render.status(event)
        await self._edit_or_post(event.origin, text, render.slack_blocks(text), post_if_gone=False)

    async def final(self, event: JobEvent, images: list[tuple[str, bytes]]) -> None:
        o = event.origin
        if event.kind == EventKind.blocked:
            if o.status_message_id:
                await self._call("chat_delete", ignore=GONE, channel=o.channel_id, ts=o.status_message_id)
            await self._call("chat_postEphemeral", channel=o.channel_id, user=o.user_id, thread_ts=o.thread_id,
                             text=render.blocked(event))
            return
        if event.kind == EventKind.failed:
            text = render.failed(event)
            await self._edit_or_post(o, text, render.slack_blocks(text))
            return
        text = render.done(event)
        await self._edit_or_post(o, text, render.slack_blocks(text, event.request_id if event.job == "generate" else None))
        if images:
            await self._call(
                "files_upload_v2",
                channel=o.channel_id,
                thread_ts=o.thread_id,
                file_uploads=[{"content": data, "filename": name, "title": name} for name, data in images],
            )

    async def _edit_or_post(self, o: Origin, text: str, blocks: list[dict], post_if_gone: bool = True) -> None:
        if o.status_message_id:
            answer = await self._call("chat_update", ignore=GONE, channel=o.channel_id, ts=o.status_message_id,
                                      text=text, blocks=blocks)
            if answer is not None or not post_if_gone:
                return
        await self._call("chat_postMessage", channel=o.channel_id, thread_ts=o.thread_id, text=text, blocks=blocks)

    async def _call(self, method: str, ignore: tuple[str, ...] = (), **kwargs):
        """The Web API call, its failures sorted into RetryAfter, Transient and Undeliverable; None when Slack
        answered one of the `ignore` errors."""
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
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Transient(f"Slack unreachable on {method}: {exc!r}") from exc
