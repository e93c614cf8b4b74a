"""`skillgen bot slack`: the /skill slash command and the result buttons, with slack-bolt's AsyncApp.

Socket Mode (SKILL_SLACK_MODE=socket, the default: no public URL needed, SKILL_SLACK_APP_TOKEN) or HTTP mode
(SKILL_SLACK_MODE=http on SKILL_SLACK_PORT, SKILL_SLACK_SIGNING_SECRET). In HTTP mode Bolt checks every
request's signature and timestamp and answers 401 to a bad one before any listener runs.

A command is acked within Slack's 3 seconds, with the refusal (what to change) or an ephemeral "queued".
Before "queued" the bot makes sure it can post the result (`can_post`): in a public channel it is not in, it joins
(conversations.join, scope channels:join); in a private channel or a DM it is not in, the ack says how to invite it
(`/invite @skillgen`) and nothing is published. That check has MEMBERSHIP_CHECK_S (1.5 s) of the 3: past it the
command is acked "queued" anyway, and the status post that follows reports a channel it cannot post in.
Then a status message goes to the channel, and the request is published carrying that message's ts: delivery
keeps it current with chat.update and posts the result next to it. Slash commands never come from a thread; to
work in a thread, a person mentions the bot there ("@skillgen a drummer's paradiddle --ar 16:9", the
`app_mention` event, scope app_mentions:read): the same grammar, the status and result in that thread (a
mention in the channel starts a thread on it). Slack retries a command it thinks timed out (X-Slack-Retry-Num); the
command's trigger_id is claimed first, so a retry never becomes a second job.

The result carries Re-roll, Variations and Remix, and Upscale and Vary of each image (U1-U4, V1-V4: a new
img2img request of whoever clicked, as a Re-roll is). Remix, for anyone in the channel, opens a modal (views.open)
with the prompt to edit; its submission (`view_submission`) is a new request of whoever sent it, with the
original's seed and options, in the result's channel and thread, and a refusal is shown on the prompt field.

Delete, for the person who asked alone, removes the result's images (files.delete) or message and the status
message with the buttons; anyone else is told privately "Only the person who asked can delete this."

The status message carries a Cancel button (delivery keeps it on queued and progress edits, and drops it with the
result). A click is acked at once; only the person who asked may cancel (bots/intake.py checks against the request
remembered in Redis): a GenerateCancel is published and they are told "Cancelling…" privately, anyone else "Only the
person who asked can cancel this.", privately too. Parameters, for anyone, answers privately with the `/skill ...`
line that asks for the result again (grammar.command_line, the result's seed in the button's value).

Slack's payloads carry no locale: the person's language comes from users.info after the ack (bots/slack_locale.py)
and is kept for delivery by request id (bots/locales); what is said before an ack is in the language already known.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

from aiohttp import web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bots import extensions, grammar, image_actions, locales, metrics, render
from bots.errors import BotError, Refusal
from bots.intake import Intake
from bots.settings import SlackSettings
from bots.slack_locale import SlackLocales
from bots.slack_post import CANNOT_POST, GONE, cannot_post, result_key
from bots.slack_remix import REMIX_INPUT, REMIX_VIEW, remix_view
from schemas.messages import GenerateRequest, Origin, Platform
from skillgen.runtime.logs import job
from skillgen.runtime.observability import metrics_server, stop_on_signals

log = logging.getLogger("skillgen.slack")

CLAIM_TTL_S = 3600  # Slack retries within minutes; an hour is plenty
MEMBERSHIP_CHECK_S = 1.5  # of the 3 s Slack gives the ack
MEMBER_CACHE_S = 300.0  # a channel the bot is known to be in is not asked about again for this long
LEADING_MENTION = re.compile(r"^\s*(<@[A-Z0-9]+(\|[^>]*)?>\s*)+")
INVITE, NOT_IN_DM = CANNOT_POST["not_in_channel"], locales.t("slack_not_in_dm")


class SlackFrontEnd:
    """The listeners; `register(app)` wires them into a Bolt app."""

    def __init__(self, settings: SlackSettings, intake: Intake):
        self.settings = settings
        self.intake = intake
        self._member_of: dict[str, float] = {}  # channel id -> when the bot was last known to be in it
        self.locales = SlackLocales(intake.store)

    def register(self, app: AsyncApp) -> None:
        app.command(self.settings.slack_command)(self.on_command)
        app.event("app_mention")(self.on_mention)
        for action in render.REPEATS:
            app.action(render.SLACK_ACTION_IDS[action])(self.on_button)
        app.action(image_actions.SLACK_ACTION_ID)(self.on_button)  # U1-U4, V1-V4
        app.action(render.SLACK_ACTION_IDS[render.REMIX])(self.on_remix)
        app.view(REMIX_VIEW)(self.on_remix_submit)
        app.action(render.SLACK_ACTION_IDS[render.DELETE])(self.on_delete)
        app.action(render.SLACK_ACTION_IDS[render.CANCEL])(self.on_cancel)
        app.action(render.SLACK_ACTION_IDS[render.PARAMS])(self.on_params)

    async def on_command(self, ack, command: dict, client: AsyncWebClient, respond) -> None:
        # Every invocation has its own trigger_id, and a retry repeats it.
        claim = f"slack:cmd:{command['team_id']}:{command['trigger_id']}"
        if not await self.intake.store.add(claim, "", CLAIM_TTL_S):
            # A retry of a command we already took: the first delivery of it owns the job.
            metrics.COMMANDS.labels("slack", "retry").inc()
            await ack(text=(await self.intake.store.get(claim)) or "Already received.", response_type="ephemeral")
            return
        origin = Origin(
            platform=Platform.slack,
            team_id=command["team_id"],
            channel_id=command["channel_id"],
            user_id=command["user_id"],
        )
        lang = self.locales.known(origin)  # users.info is asked after the ack (start_job)
        try:
            req = await self.intake.admit(grammar.split(command.get("text") or "", command=False), origin)
        except Refusal as exc:
            metrics.COMMANDS.labels("slack", "refused").inc()
            await self._ack(ack, claim, render.defuse(exc.say(lang), Platform.slack))  # it may quote what was typed
            return
        if req is None:
            metrics.COMMANDS.labels("slack", "help").inc()
            # `<prompt>` in it is text: `<` is a control character in mrkdwn
            await self._ack(ack, claim, render.slack_text(self.help(lang)))
            return
        try:
            cannot = await asyncio.wait_for(self.can_post(client, origin.channel_id, lang), MEMBERSHIP_CHECK_S)
        except TimeoutError:  # the ack cannot wait: start_job reports a channel it cannot post in
            log.warning("membership check of %s took over %.1f s", origin.channel_id, MEMBERSHIP_CHECK_S)
            cannot = None
        if cannot:
            metrics.COMMANDS.labels("slack", "not_member").inc()
            await self._ack(ack, claim, cannot)
            return
        await self._ack(ack, claim, render.queued(req, self.intake.estimate(req.request_id), lang))
        await self.start_job(client, respond, req)

    async def can_post(self, client: AsyncWebClient, channel_id: str, lang: str = "en") -> str | None:
        """None when the bot is (or has just become) a member of the channel, so that the status, the result and
        its images can all be posted; else what the person should do, in `lang`."""
        if time.monotonic() - self._member_of.get(channel_id, -MEMBER_CACHE_S) < MEMBER_CACHE_S:
            return None
        try:
            channel = (await client.conversations_info(channel=channel_id))["channel"]
            if not channel.get("is_member") and not channel.get("is_im"):
                if channel.get("is_private") or channel.get("is_mpim"):
                    return cannot_post("not_in_channel", lang)
                await client.conversations_join(channel=channel_id)  # a public channel: scope channels:join
        except SlackApiError as exc:
            error = exc.response.get("error", "")
            log.info("cannot make sure I can post in %s: %s", channel_id, error)
            if error in ("channel_not_found", "not_in_channel", "missing_scope",
                         "method_not_supported_for_channel_type"):
                # a private channel or DM it is not in, or may not join by itself (nobody can /invite into a DM)
                return cannot_post("not_in_dm" if channel_id.startswith("D") else "not_in_channel", lang)
            return cannot_post(error, lang)
        self._member_of[channel_id] = time.monotonic()
        return None

    async def on_mention(self, event: dict, body: dict, client: AsyncWebClient) -> None:
        """"@skillgen <prompt> --options" in a channel or a thread: the /skill grammar, answered in the thread."""
        team_id = event.get("team") or body.get("team_id")
        if event.get("thread_ts"):
            from bots.training_slack_threads import (
                thread_key,  # a training thread's words are the training's
            )

            if await self.intake.store.get(thread_key(team_id, event["channel"], event["thread_ts"])) is not None:
                return
        claim = f"slack:mention:{team_id}:{event['channel']}:{event['ts']}"
        if not await self.intake.store.add(claim, "", CLAIM_TTL_S):  # Slack's retry of an event we took
            metrics.COMMANDS.labels("slack", "retry").inc()
            return
        origin = Origin(platform=Platform.slack, team_id=team_id, channel_id=event["channel"], user_id=event["user"],
                        thread_id=event.get("thread_ts") or event["ts"])

        async def tell(text: str, **_) -> None:  # only the person sees it, in the thread
            await client.chat_postEphemeral(channel=origin.channel_id, user=origin.user_id,
                                            thread_ts=origin.thread_id, text=text)

        text = LEADING_MENTION.sub("", event.get("text") or "")
        try:
            req = await self.intake.admit(grammar.split(text, command=False), origin)
        except Refusal as exc:
            metrics.COMMANDS.labels("slack", "refused").inc()
            await tell(render.defuse(exc.say(await self.locales.lang(client, origin)), Platform.slack))
            return
        if req is None:
            metrics.COMMANDS.labels("slack", "help").inc()
            await tell(render.slack_text(self.help(await self.locales.lang(client, origin))))
            return
        await self.start_job(client, tell, req)

    def help(self, lang: str) -> str:
        """`/skill help` in `lang`, naming the command as this app does (SKILL_SLACK_COMMAND)."""
        return grammar.help_text(Platform.slack, lang, self.settings.slack_command)

    async def _ack(self, ack, claim: str, text: str) -> None:
        await ack(text=text, response_type="ephemeral")
        await self.intake.store.put(claim, text, CLAIM_TTL_S)  # what a retry of this command is answered

    @staticmethod
    def clicker(body: dict) -> Origin:
        """The origin of whoever clicked a button, where they clicked it."""
        container = body.get("container") or {}
        return Origin(
            platform=Platform.slack,
            team_id=(body.get("team") or {}).get("id") or body["user"]["team_id"],
            channel_id=(body.get("channel") or {}).get("id") or container["channel_id"],
            user_id=body["user"]["id"],
            thread_id=container.get("thread_ts") or (body.get("message") or {}).get("thread_ts"),
        )

    async def refuse(self, respond, client: AsyncWebClient, who: Origin, exc: Refusal, outcome: str = "refused"):
        """A refusal after the acknowledgement, told privately to whoever clicked, in their language."""
        metrics.COMMANDS.labels("slack", outcome).inc()
        text = exc.say(await self.locales.lang(client, who))
        await respond(text=render.defuse(text, Platform.slack), response_type="ephemeral", replace_original=False)

    async def on_cancel(self, ack, body: dict, action: dict, client: AsyncWebClient, respond) -> None:
        """Cancel, for the request's owner only; everyone is answered privately."""
        await ack()
        clicker = self.clicker(body)
        try:
            msg = await self.intake.cancel(action["value"], clicker)
        except Refusal as exc:
            await self.refuse(respond, client, clicker, exc, "cancel_refused")
            return
        lang = await self.locales.lang(client, clicker)
        try:
            await self.intake.publish_cancel(msg)
        except Exception:
            log.exception("publish of a cancel failed", extra=job(msg.request_id))
            metrics.COMMANDS.labels("slack", "queue_down").inc()
            await respond(text=render.queue_down("The cancel", lang), response_type="ephemeral",
                          replace_original=False)
            return
        metrics.COMMANDS.labels("slack", "cancel").inc()
        await respond(text=locales.t("cancelling", lang), response_type="ephemeral", replace_original=False)

    async def on_params(self, ack, body: dict, action: dict, client: AsyncWebClient, respond) -> None:
        """Parameters, for anyone in the channel: the `/skill ...` line that asks for the result again (the
        remembered request, with the seed the result was drawn with when it named none, the deployment's defaults
        left out), shown only to whoever clicked."""
        await ack()
        request_id, seed = render.parse_slack_value(action["value"])
        clicker = self.clicker(body)
        try:
            self.intake.check_team(clicker)
            req = await self.intake.remembered(request_id)
        except Refusal as exc:
            await self.refuse(respond, client, clicker, exc)
            return
        line = grammar.command_line(req, seed, self.intake.settings.defaults)
        line = self.settings.slack_command + line.removeprefix("/skill")  # the command as this app names it
        text = render.slack_text(render.parameters(line, await self.locales.lang(client, clicker)))
        metrics.COMMANDS.labels("slack", "params").inc()
        await respond(text=text, response_type="ephemeral", replace_original=False)

    async def on_remix(self, ack, body: dict, action: dict, client: AsyncWebClient, respond) -> None:
        """Remix, by anyone in the channel: a modal (views.open, within the trigger's 3 seconds) with the prompt to
        edit. Where the result is, and which request and seed, travel in the view's private_metadata."""
        await ack()
        request_id, seed = render.parse_slack_value(action["value"])
        clicker = self.clicker(body)
        held = asyncio.ensure_future(self.locales.held(clicker))  # no users.info: the trigger lives 3 seconds
        try:
            self.intake.check_team(clicker)
            old = await self.intake.remembered(request_id)
        except Refusal as exc:
            held.cancel()
            await self.refuse(respond, client, clicker, exc)
            return
        where = {"request_id": request_id, "seed": seed, "channel": clicker.channel_id, "thread": clicker.thread_id}
        lang = await held
        try:
            await client.views_open(trigger_id=body["trigger_id"], view=remix_view(old.prompt, json.dumps(where), lang))
        except SlackApiError as exc:
            log.warning("cannot open the remix modal: %s", exc.response.get("error", ""))
            await respond(text=locales.t("remix_too_slow", lang), response_type="ephemeral", replace_original=False)

    async def on_remix_submit(self, ack, body: dict, view: dict, client: AsyncWebClient) -> None:
        """The edited prompt: a new request of whoever submitted it, with the original's seed and options, in the
        result's channel (and thread). A refusal is shown on the prompt field, and the modal stays open."""
        where = json.loads(view.get("private_metadata") or "{}")
        text = view["state"]["values"][REMIX_INPUT][REMIX_INPUT].get("value") or ""
        origin = Origin(platform=Platform.slack, team_id=(body.get("team") or {}).get("id") or body["user"]["team_id"],
                        channel_id=where["channel"], user_id=body["user"]["id"], thread_id=where.get("thread"))
        try:
            req = await self.intake.remix(where["request_id"], text, origin, where.get("seed"))
        except Refusal as exc:  # said in the ack: in the language already known
            metrics.COMMANDS.labels("slack", "refused").inc()
            await ack(response_action="errors", errors={REMIX_INPUT: render.clip(exc.say(self.locales.known(origin)),
                                                                                 2000)})
            return
        await ack()

        async def tell(text: str, **_) -> None:  # only the person sees it, where the result is
            await client.chat_postEphemeral(channel=origin.channel_id, user=origin.user_id,
                                            thread_ts=origin.thread_id, text=text)

        await self.start_job(client, tell, req)

    async def on_delete(self, ack, body: dict, action: dict, client: AsyncWebClient, respond) -> None:
        """Delete, for the request's owner only: the result's images (files.delete: the bot uploaded them) or its
        message, then the status message the button is on. Anyone else is told privately."""
        await ack()
        request_id = action["value"]
        clicker = self.clicker(body)
        try:
            await self.intake.owned(request_id, clicker, "delete")
        except Refusal as exc:
            await self.refuse(respond, client, clicker, exc, "delete_refused")
            return
        where = json.loads(await self.intake.store.get(result_key(request_id)) or "{}")
        try:
            for file_id in where.get("files") or []:
                await _unless(("file_not_found", "file_deleted"), client.files_delete(file=file_id))
            if where.get("ts"):
                await _unless(GONE, client.chat_delete(channel=where["channel"], ts=where["ts"]))
            await _unless(GONE, client.chat_delete(channel=clicker.channel_id, ts=body["container"]["message_ts"]))
        except SlackApiError as exc:
            error = exc.response.get("error", "")
            log.warning("cannot delete a result: %s", error, extra=job(request_id))
            await respond(text=locales.t("cannot_delete", await self.locales.lang(client, clicker), error=error),
                          response_type="ephemeral", replace_original=False)
            return
        metrics.COMMANDS.labels("slack", "delete").inc()

    async def on_button(self, ack, body: dict, action: dict, client: AsyncWebClient, respond) -> None:
        await ack()
        clicker = self.clicker(body)
        try:
            if picked := image_actions.SLACK_ACTION_ID.match(action["action_id"]):  # Upscale or Vary of one image
                request_id, index = render.parse_slack_value(action["value"])
                req = await self.intake.from_image(request_id, picked.group(1), index or 0, clicker)
            else:
                name = next(a for a, action_id in render.SLACK_ACTION_IDS.items() if action_id == action["action_id"])
                req = await self.intake.repeat(action["value"], name, clicker)
        except Refusal as exc:
            await self.refuse(respond, client, clicker, exc)
            return
        await self.start_job(client, respond, req)

    async def start_job(self, client: AsyncWebClient, respond, req: GenerateRequest) -> None:
        """Post the status message, then publish with its ts, so delivery edits the message the person sees. The
        person's language is asked here, after the acknowledgement, and kept for delivery before the publish."""
        origin = req.origin
        lang = await self.locales.lang(client, origin)
        text = render.queued(req, self.intake.estimate(req.request_id), lang)
        blocks = render.slack_blocks(text, req.request_id, render.STATUS_ACTIONS, lang=lang)
        try:
            posted = await client.chat_postMessage(
                channel=origin.channel_id, thread_ts=origin.thread_id, text=text, blocks=blocks
            )
        except SlackApiError as exc:
            error = exc.response.get("error", "")
            log.warning("cannot post the status message: %s", error, extra=job(req.request_id))
            await respond(text=cannot_post(error, lang), response_type="ephemeral")
            return
        req = req.model_copy(update={"origin": origin.model_copy(update={"status_message_id": posted["ts"]})})
        try:
            await locales.remember(self.intake.store, req.request_id, lang, self.intake.settings.remember_s)
            await self.intake.publish(req)
        except Exception:
            log.exception("publish failed", extra=job(req.request_id))
            metrics.COMMANDS.labels("slack", "queue_down").inc()
            await client.chat_update(channel=origin.channel_id, ts=posted["ts"], text=render.queue_down(lang=lang),
                                     blocks=[])
            return
        metrics.COMMANDS.labels("slack", "queued").inc()


async def _unless(errors: tuple[str, ...], call) -> None:
    """Await a Web API call; an error in `errors` (already gone) counts as done."""
    try:
        await call
    except SlackApiError as exc:
        if exc.response.get("error") not in errors:
            raise


def check(settings: SlackSettings) -> None:
    """Refuse to start without what the chosen mode needs, before connecting to anything."""
    if settings.slack_bot_token is None:
        raise BotError("set SKILL_SLACK_BOT_TOKEN to the bot token, xoxb-... (docs/chat-apps.md)")
    if settings.slack_mode == "http" and settings.slack_signing_secret is None:
        raise BotError("HTTP mode checks every request's signature: set SKILL_SLACK_SIGNING_SECRET")
    if settings.slack_mode == "socket" and settings.slack_app_token is None:
        raise BotError("Socket Mode needs SKILL_SLACK_APP_TOKEN, an app-level token xapp-... (docs/chat-apps.md)")
    settings.check_chat()


def build_app(settings: SlackSettings, intake: Intake) -> AsyncApp:
    check(settings)
    client = AsyncWebClient(token=settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_base)
    secret = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else ""
    # process_before_response=False: Bolt answers Slack as soon as ack() is called and the listener goes on.
    app = AsyncApp(client=client, signing_secret=secret, process_before_response=False)
    SlackFrontEnd(settings, intake).register(app)
    extensions.setup_slack(app, intake, settings.bot_extensions)
    return app


async def serve(settings: SlackSettings, stop: asyncio.Event | None = None, ready=None) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT); `ready()` is called once Slack can reach the bot."""
    check(settings)
    stop = stop or asyncio.Event()
    stop_on_signals(stop.set)
    async with Intake.open(settings) as intake:
        app = build_app(settings, intake)
        if settings.slack_mode == "socket":
            handler = AsyncSocketModeHandler(app, settings.slack_app_token.get_secret_value())
            await handler.connect_async()
            try:
                def connected() -> tuple[bool, str]:
                    session = handler.client.current_session
                    ok = session is not None and not session.closed
                    return ok, "Socket Mode connected" if ok else "Socket Mode disconnected"

                async with metrics_server(settings.metrics_port, health=connected):
                    if ready:
                        ready()
                    await stop.wait()
            finally:
                await handler.close_async()
        else:
            runner = web.AppRunner(app.web_app(path=settings.slack_path), access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, "0.0.0.0", settings.slack_port).start()
                log.info("listening for Slack on :%d%s", settings.slack_port, settings.slack_path)
                async with metrics_server(settings.metrics_port):
                    if ready:
                        ready()
                    await stop.wait()
            finally:
                await runner.cleanup()


def add_arguments(parser) -> None:
    parser.description = (
        "Slack bot: the /skill slash command, in Socket Mode (SKILL_SLACK_APP_TOKEN) or HTTP mode "
        "(SKILL_SLACK_MODE=http, SKILL_SLACK_SIGNING_SECRET, SKILL_SLACK_PORT); see docs/chat-apps.md."
    )


def run(args) -> int:
    asyncio.run(serve(SlackSettings()))
    return 0
