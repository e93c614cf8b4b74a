"""`skillgen bot discord`: the /skill slash command over the Discord gateway (discord.py).

Discord wants an answer to an interaction within 3 seconds. A refusal (a bad option, a blocked prompt, a rate
limit) is answered at once, ephemeral, saying what to change. Anything else is deferred ("thinking..."),
edited to "queued" (with the group's estimate of its position and ETA when there is one) and a Cancel button, and
published; delivery (bots/delivery.py) then edits that same response through the interaction webhook as events
arrive (after the token's 15 minutes, with the bot token: the original response's id is kept in Redis with the
token) and attaches the images, with Re-roll, Variations, Remix, Parameters and Delete buttons whose clicks come
back here (and Upscale and Vary of each image, U1-U4 and V1-V4: a new img2img request of whoever clicked; Remix
opens a modal with the prompt to edit; its submission is a new request of whoever sent it, with the same seed and
options; Delete, for the person who asked alone, deletes the result's message; Parameters, by anyone, answers
only them with the `/skill ...` line that asks for the same picture again). A Cancel click is answered privately
at once: "Cancelling…" to the person who asked (and a GenerateCancel published), "Only the person who asked can
cancel this." to anyone else. What runs before the acknowledgement waits on Redis 1.5 s at
most (bots/intake.py). Every option's length limit is declared, so Discord's client refuses a longer value as it
is typed. Commands and options are registered with Chinese names and descriptions too (bots/locales/commands.py),
which Discord shows to people whose client is in Chinese. The bot needs no privileged intents: interactions arrive
on the gateway regardless.
"""

from __future__ import annotations

import asyncio
import logging

import discord
import discord.http
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from bots import extensions, grammar, locales, metrics, render
from bots.credentials import Interactions
from bots.errors import BotError, Refusal
from bots.intake import Intake
from bots.locales.commands import CommandTranslator, shown_as
from bots.settings import DiscordSettings
from schemas.messages import (
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    GenerateRequest,
    Origin,
    Platform,
)
from skillgen.runtime.logs import job
from skillgen.runtime.observability import metrics_server, stop_on_signals

log = logging.getLogger("skillgen.discord")

# Option limits Discord's client enforces as the person types (a longer value cannot be sent at all):
# the prompt and `no` as the request allows; an adapter reference is a name (64) and @v plus a version.
MAX_ADAPTER_REF_CHARS = 80



def configure_endpoints(settings: DiscordSettings) -> None:
    """Point discord.py at settings' REST base and gateway. discord.py has no per-client setting for these;
    its own API-version switch sets the same class attribute, so one process talks to one Discord."""
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


def lang_of(interaction: discord.Interaction) -> str:
    """The language the person uses Discord in (the interaction's `locale`): what they are answered in, and what
    delivery writes their request's status and result in (bots/locales)."""
    return locales.from_discord(interaction.locale)


def origin_of(interaction: discord.Interaction) -> Origin:
    channel = interaction.channel
    in_thread = isinstance(channel, discord.Thread)
    return Origin(
        platform=Platform.discord,
        team_id=str(interaction.guild_id or f"dm-{interaction.user.id}"),
        channel_id=str(interaction.channel_id),
        user_id=str(interaction.user.id),
        thread_id=str(interaction.channel_id) if in_thread else None,
        created_at=interaction.created_at,
    )


async def remember_token(intake: Intake, interaction: discord.Interaction, request_id: str,
                         original: discord.Message | None = None) -> None:
    """Keep the interaction token where delivery finds it (Redis, by request id; never Kafka), and the id of the
    original response, which delivery edits with the bot token once the token is dead. Called before the request
    is published, so delivery's first edit can use them."""
    # The token's 15 minutes run from the interaction's creation, which its snowflake id records.
    interactions = Interactions(intake.store)
    await interactions.remember(request_id, str(interaction.application_id), interaction.token,
                                interaction.created_at)
    if original is not None:
        await interactions.remember_original(request_id, str(original.id))



async def refuse(interaction: discord.Interaction, exc: Refusal, what: str = "refused") -> None:
    """A refusal, told privately to the person who clicked or typed, in their language."""
    metrics.COMMANDS.labels("discord", what).inc()
    await interaction.response.send_message(exc.say(lang_of(interaction)), ephemeral=True)

class SkillBot(discord.Client):
    """The Discord front-end. `intake` publishes; `tree` holds /skill and any extension's commands."""

    def __init__(self, settings: DiscordSettings, intake: Intake, **options):
        app_id = int(settings.discord_application_id) if settings.discord_application_id else None
        # Guilds (not privileged) keeps channels and threads resolvable; nothing else is needed for commands.
        super().__init__(intents=discord.Intents(guilds=True), application_id=app_id, **options)
        self.settings = settings
        self.intake = intake
        self.tree = app_commands.CommandTree(self)
        self.tree.add_command(_skill_command(self))
        extensions.setup_discord(self, settings.bot_extensions)

    async def setup_hook(self) -> None:
        # The commands' names and descriptions in Chinese (bots/locales/commands.py), registered with them.
        await self.tree.set_translator(CommandTranslator())
        if not self.settings.discord_sync_commands:
            return
        guild = discord.Object(id=int(self.settings.discord_guild_id)) if self.settings.discord_guild_id else None
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        synced = await self.tree.sync(guild=guild)
        log.info("registered %s %s", ", ".join("/" + c.name for c in synced), f"in guild {guild.id}" if guild else "globally")

    async def on_skill(self, interaction: discord.Interaction, prompt: str, options: dict[str, object]) -> None:
        origin = origin_of(interaction)
        try:
            # A server's administrators get no exemption: limits follow SKILL_ADMINS alone (bots/ratelimit.py).
            req = await self.intake.admit(grammar.from_options(prompt, options), origin)
        except Refusal as exc:
            await refuse(interaction, exc)
            return
        if req is None:
            metrics.COMMANDS.labels("discord", "help").inc()
            lang = lang_of(interaction)  # the command named as their client shows it (/技能图 in Chinese)
            await interaction.response.send_message(grammar.help_text(Platform.discord, lang, shown_as("skill", lang)),
                                                    ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        await self.start_job(interaction, req)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Re-roll, Variations, Upscale, Vary, Remix, Parameters, Delete and Cancel clicks, and Remix's modal; app
        commands are the tree's."""
        kinds = (discord.InteractionType.component, discord.InteractionType.modal_submit)
        if interaction.type not in kinds or not interaction.data:
            return
        button = render.parse_custom_id(str(interaction.data.get("custom_id", "")))
        if button is None:
            return  # another feature's component
        if interaction.type is discord.InteractionType.modal_submit:
            if button.action == render.REMIX:
                await self.on_remix_submit(interaction, button)
            return
        if button.action == render.CANCEL:
            await self.on_cancel(interaction, button.request_id)
            return
        if button.action == render.REMIX:
            await self.on_remix(interaction, button)
            return
        if button.action == render.DELETE:
            await self.on_delete(interaction, button.request_id)
            return
        if button.action == render.PARAMS:
            await self.on_params(interaction, button)
            return
        origin = origin_of(interaction)
        try:
            if button.action in render.IMAGE_ACTIONS:  # Upscale or Vary of one image
                req = await self.intake.from_image(button.request_id, button.action, button.index, origin)
            else:
                req = await self.intake.repeat(button.request_id, button.action, origin)
        except Refusal as exc:
            await refuse(interaction, exc)
            return
        await interaction.response.defer(thinking=True)
        await self.start_job(interaction, req)

    async def on_delete(self, interaction: discord.Interaction, request_id: str) -> None:
        """Delete, for the request's owner only: the result's message goes (the click's own token deletes the
        message its button is on, so no permission is needed, whatever the age of the result); anyone else is
        told privately that only the person who asked can."""
        try:
            await self.intake.owned(request_id, origin_of(interaction), "delete")
        except Refusal as exc:
            await refuse(interaction, exc, "delete_refused")
            return
        await interaction.response.defer()  # type 6: the message the button is on becomes @original
        try:
            await interaction.delete_original_response()
        except discord.HTTPException as exc:
            try:  # a result posted with the bot token (after 15 minutes, no response to edit): the bot's own message
                if interaction.message is None:
                    raise
                await interaction.message.delete()
            except discord.HTTPException:
                log.warning("cannot delete a result: %s", exc, extra=job(request_id))
                await interaction.followup.send(locales.t("cannot_delete", lang_of(interaction),
                                                          error=exc.text or exc.status), ephemeral=True)
                return
        metrics.COMMANDS.labels("discord", "delete").inc()

    async def on_remix(self, interaction: discord.Interaction, button: render.Button) -> None:
        """Remix, by anyone in the channel: a modal (response type 9) with the prompt to edit. Its custom id is the
        button's, so the submission names the request and the seed again; nothing is kept in between."""
        try:
            self.intake.check_team(origin_of(interaction))
            old = await self.intake.remembered(button.request_id)
        except Refusal as exc:
            await refuse(interaction, exc)
            return
        await interaction.response.send_modal(remix_modal(interaction.data["custom_id"], old.prompt,
                                                          lang_of(interaction)))

    async def on_params(self, interaction: discord.Interaction, button: render.Button) -> None:
        """Parameters, by anyone who can see the result: the remembered request as the `/skill ...` line that asks
        for it again (options at this deployment's defaults left out; the result's seed, from the button, when the
        request named none), told privately in the clicker's language. Nothing is published, nothing counted
        against a limit; the read of Redis is time-boxed (intake.PRE_ACK_S), so the answer is within 3 s."""
        lang = lang_of(interaction)
        try:
            self.intake.check_team(origin_of(interaction))
            req = await self.intake.remembered(button.request_id)
        except Refusal as exc:
            await refuse(interaction, exc, "params_refused")
            return
        line = grammar.command_line(req, button.seed, self.settings.defaults)
        metrics.COMMANDS.labels("discord", "params").inc()
        await interaction.response.send_message(render.parameters(line, lang), ephemeral=True)

    async def on_remix_submit(self, interaction: discord.Interaction, button: render.Button) -> None:
        """The edited prompt: a new request of whoever submitted it, with the original's seed and options."""
        text = modal_value(interaction.data, REMIX_INPUT) or ""
        try:
            req = await self.intake.remix(button.request_id, text, origin_of(interaction), button.seed)
        except Refusal as exc:
            await refuse(interaction, exc)
            return
        await interaction.response.defer(thinking=True)
        await self.start_job(interaction, req)

    async def on_cancel(self, interaction: discord.Interaction, request_id: str) -> None:
        """Cancel, for the request's owner only; answered privately within Discord's 3 seconds, published after."""
        try:
            msg = await self.intake.cancel(request_id, origin_of(interaction))
        except Refusal as exc:
            await refuse(interaction, exc, "cancel_refused")
            return
        await interaction.response.send_message(locales.t("cancelling", lang_of(interaction)), ephemeral=True)
        try:
            await self.intake.publish_cancel(msg)
        except Exception:
            log.exception("publish of a cancel failed", extra=job(request_id))
            metrics.COMMANDS.labels("discord", "queue_down").inc()
            await interaction.edit_original_response(content=render.queue_down("The cancel", lang_of(interaction)))
            return
        metrics.COMMANDS.labels("discord", "cancel").inc()

    async def start_job(self, interaction: discord.Interaction, req: GenerateRequest) -> None:
        # "queued" is written before publishing so it can never land after delivery's first edit.
        # Only the author may be pinged: a prompt that quotes <@someone> must not reach them.
        only_author = discord.AllowedMentions(everyone=False, roles=False, users=[interaction.user])
        lang = lang_of(interaction)
        text = render.queued(req, self.intake.estimate(req.request_id), lang)
        original = await interaction.edit_original_response(content=text, allowed_mentions=only_author,
                                                            view=status_view(req.request_id, lang))
        try:
            await remember_token(self.intake, interaction, req.request_id, original)
            await locales.remember(self.intake.store, req.request_id, lang, self.settings.remember_s)
            await self.intake.publish(req)
        except Exception:
            log.exception("publish failed", extra=job(req.request_id))
            metrics.COMMANDS.labels("discord", "queue_down").inc()
            await interaction.edit_original_response(content=render.queue_down(lang=lang), view=None)
            return
        metrics.COMMANDS.labels("discord", "queued").inc()


def status_view(request_id: str, lang: str = "en") -> discord.ui.View:
    """The Cancel button of a status, as delivery keeps it (render.discord_buttons with STATUS_ACTIONS), labelled
    in the requester's language. Stopped: its clicks reach on_interaction like every other button's, never
    discord.py's view store."""
    view = discord.ui.View(timeout=None)
    for action in render.STATUS_ACTIONS:
        view.add_item(discord.ui.Button(style=discord.ButtonStyle.danger, label=render.label(action, lang),
                                        custom_id=render.custom_id(action, request_id)))
    view.stop()
    return view


REMIX_INPUT = "prompt"  # the modal's one text input


def remix_modal(custom_id: str, prompt: str, lang: str = "en") -> discord.ui.Modal:
    """Remix's modal: the prompt, prefilled, to edit, its texts in `lang` (the clicker's: the modal is theirs
    alone). Stopped, as status_view is: the submission reaches on_interaction (even after a restart), never
    discord.py's modal store."""
    modal = discord.ui.Modal(title=locales.t("remix_title", lang), custom_id=custom_id, timeout=None)
    modal.add_item(discord.ui.TextInput(
        label=locales.t("remix_label", lang), custom_id=REMIX_INPUT, style=discord.TextStyle.paragraph,
        default=prompt, min_length=1, max_length=MAX_PROMPT_CHARS, placeholder=locales.t("remix_placeholder", lang)))
    modal.stop()
    return modal


def modal_value(data: dict, input_id: str) -> str | None:
    """A text input's value in a modal submission (action rows of inputs, or labels around them)."""
    for row in data.get("components") or []:
        for item in row.get("components") or ([row["component"]] if row.get("component") else []):
            if item.get("custom_id") == input_id:
                return item.get("value")
    return None


def _skill_command(bot: SkillBot) -> app_commands.Command:
    @app_commands.command(name="skill", description="Draw a skill image (write help for how)")
    @app_commands.describe(
        prompt="what to draw; may also carry options, e.g. a cellist's bow hold --ar 16:9",
        no="things to keep out of the picture",
        ar="aspect ratio, e.g. 16:9 (or use size)",
        size="exact size WxH, multiples of 8 from 64 to 1024, e.g. 512x768",
        steps=f"denoising steps, 1-{MAX_STEPS}",
        seed="a seed for a repeatable image",
        n=f"how many images, 1-{MAX_IMAGES}",
        adapter="one of your team's LoRA adapters: name or name@v2",
        relax="relax mode: no hurry, drawn when the GPUs have room (spares your team's fast share)",
        turbo="turbo: a quick draft in a few steps (4, at most 8 with steps); not with adapter",
    )
    async def skill(
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
        no: app_commands.Range[str, 1, MAX_PROMPT_CHARS] | None = None,
        ar: app_commands.Range[str, 1, 16] | None = None,
        size: app_commands.Range[str, 1, 16] | None = None,
        steps: app_commands.Range[int, 1, MAX_STEPS] | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        n: app_commands.Range[int, 1, MAX_IMAGES] | None = None,
        adapter: app_commands.Range[str, 1, MAX_ADAPTER_REF_CHARS] | None = None,
        relax: bool | None = None,
        turbo: bool | None = None,
    ) -> None:
        options = {"no": no, "ar": ar, "size": size, "steps": steps, "seed": seed, "n": n, "adapter": adapter,
                   "relax": relax, "turbo": turbo}
        await bot.on_skill(interaction, prompt, options)

    return skill


async def serve(settings: DiscordSettings, stop: asyncio.Event | None = None) -> None:
    """Run the bot until `stop` is set (or SIGTERM/SIGINT)."""
    if settings.discord_token is None:
        raise BotError("set SKILL_DISCORD_TOKEN to the bot token (docs/chat-apps.md says where to find it)")
    settings.check_chat()
    configure_endpoints(settings)
    stop = stop or asyncio.Event()
    stop_on_signals(stop.set)
    async with Intake.open(settings) as intake:
        bot = SkillBot(settings, intake)
        def health() -> tuple[bool, str]:
            ok = bot.is_ready() and not bot.is_closed()
            return ok, "connected to the gateway" if ok else "not connected to the gateway"

        async with metrics_server(settings.metrics_port, health=health), bot:
            runner = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            await bot.close()
            await runner  # raises what ended it, if not the stop


def add_arguments(parser) -> None:
    parser.description = (
        "Discord bot: the /skill slash command over the gateway. Needs SKILL_DISCORD_TOKEN (and "
        "SKILL_DISCORD_GUILD_ID to register commands in one server instantly); see docs/chat-apps.md."
    )


def run(args) -> int:
    asyncio.run(serve(DiscordSettings()))
    return 0
