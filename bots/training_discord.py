"""Discord: `/skill-train`, `/skill-train-cancel` and `/skill-adapters` as app commands on the bot's tree.

A slash command carries one file per attachment option, so `/skill-train` has `images` (one image, or one zip of
many) and `image2` to `image10`. Discord cannot give one command both options and a `cancel` subcommand, so
stopping a training is its own command, `/skill-train-cancel name:`. Adapter names autocomplete from the team's
registry, `/skill`'s `adapter` option included. Everything is checked before anything is
published (name, options, who may train, each file's declared type and size), and a refusal is answered at
once, ephemeral, with what to change. An accepted training is deferred, its files are fetched into the blob store
(Discord's attachment links are signed and expire, so the trainer must not depend on them: the request carries
blob references, as Slack's does), then it is edited to "queued" and published;
delivery then keeps that same response current with the trainer's progress and finally attaches the sample
grid (after the interaction token's 15 minutes it edits the same message with the bot token, bots/discord_post.py).
The downloads (the URL policy, byte caps) run after the defer, as Discord allows 3 seconds before the
acknowledgement; a refusal then removes the "thinking..." response and tells the person in an ephemeral follow-up.
"""

from __future__ import annotations

import asyncio
import logging
import time

import discord
from discord import app_commands

from bots.discord_bot import SkillBot, origin_of, remember_token
from bots.metrics import TRAIN_COMMANDS
from bots.render import queue_down
from bots.settings import TrainCommandSettings
from bots.train_commands import (
    Attached,
    Member,
    TrainCommandError,
    cancel_command,
    cancel_request,
    check_allowed,
    check_files,
    describe_adapters,
    fetch_to_blobs,
    finetune_key,
    finetune_request,
    mention,
    train_command,
)
from schemas.messages import MAX_PROMPT_CHARS
from skillgen.adapters.registry import Registry
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.logs import job

log = logging.getLogger("skillgen.discord.train")

MAX_MESSAGE_CHARS = 2000
MAX_CHOICES = 25  # Discord's limit for autocomplete
AUTOCOMPLETE_CACHE_S = 10.0  # autocomplete asks at every keystroke; the registry is read at most this often


def member_of(interaction: discord.Interaction) -> Member:
    """Role ids come from the guild cache that the guilds intent keeps (roles arrive with GUILD_CREATE). On Discord
    who may train is the team's roles alone (check_allowed): a server administrator needs a listed role too."""
    user = interaction.user
    roles = frozenset(str(role.id) for role in getattr(user, "roles", ()))
    return Member(str(user.id), role_ids=roles)


def attached(attachment: discord.Attachment) -> Attached:
    return Attached(attachment.filename, attachment.content_type, attachment.size)


def clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


class DiscordTraining:
    def __init__(self, bot: SkillBot, settings: TrainCommandSettings):
        self.bot = bot
        self.settings = settings
        self.topics = bot.intake.settings.topics
        self.registry = Registry(settings.adapter_url)
        self.blobs = BlobStore(settings.blob_url)
        self._listings: dict[str, tuple[float, dict]] = {}

    async def on_train(self, interaction: discord.Interaction, name: str, files: list[discord.Attachment],
                       trigger: str | None, steps: int | None, caption: str | None) -> None:
        origin = origin_of(interaction)
        try:
            cmd = train_command(name, trigger, steps, caption)
            check_allowed(self.settings.train_permissions, origin, member_of(interaction))
            check_files([attached(f) for f in files], self.settings.ingest)
        except TrainCommandError as exc:
            TRAIN_COMMANDS.labels("discord", "train", "refused").inc()
            await interaction.response.send_message(f"❌ {exc}", ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        try:
            # Discord's attachment links are signed and expire (and a queue can outlast them): the files go into the
            # blob store now, and the trainer reads them there. After the defer: downloads take longer than the 3
            # seconds Discord allows before the acknowledgement.
            images = await fetch_to_blobs([f.url for f in files], self.settings.ingest, self.blobs)
            req = finetune_request(cmd, origin, [], self.settings, images=images)
        except TrainCommandError as exc:
            TRAIN_COMMANDS.labels("discord", "train", "refused").inc()
            # Refusals stay private: the channel's "thinking..." goes, the reason is an ephemeral follow-up.
            await interaction.delete_original_response()
            await interaction.followup.send(f"❌ {exc}", ephemeral=True)
            return
        only_author = discord.AllowedMentions(everyone=False, roles=False, users=[interaction.user])
        what = "one zip" if len(files) == 1 and attached(files[0]).kind == "zip" else f"{len(files)} images"
        original = await interaction.edit_original_response(
            content=f"⏳ {mention(origin.platform, origin.user_id)} training `{req.adapter}` queued: {what}, "
                    f"{req.steps} steps, trigger word `{req.trigger}`",
            allowed_mentions=only_author,
        )
        try:
            await remember_token(self.bot.intake, interaction, req.request_id, original)
            await self.bot.intake.send(self.topics.finetune, req, key=finetune_key(req))
        except Exception:
            log.exception("publish failed", extra=job(req.request_id))
            TRAIN_COMMANDS.labels("discord", "train", "queue_down").inc()
            await interaction.edit_original_response(content=queue_down("The training"))
            return
        TRAIN_COMMANDS.labels("discord", "train", "queued").inc()
        log.info("training %s queued", req.adapter, extra=job(req.request_id, team=origin.team_id))

    async def on_cancel(self, interaction: discord.Interaction, name: str) -> None:
        origin = origin_of(interaction)
        try:
            cmd = cancel_command(name)
            check_allowed(self.settings.train_permissions, origin, member_of(interaction))
        except TrainCommandError as exc:
            TRAIN_COMMANDS.labels("discord", "cancel", "refused").inc()
            await interaction.response.send_message(f"❌ {exc}", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        msg = cancel_request(cmd, origin)
        try:
            await self.bot.intake.send(self.topics.finetune_cancel, msg, key=f"{origin.team_id}/{cmd.name}".encode())
        except Exception:
            log.exception("publish of a cancel failed")
            TRAIN_COMMANDS.labels("discord", "cancel", "queue_down").inc()
            await interaction.edit_original_response(content=queue_down("The cancel"))
            return
        TRAIN_COMMANDS.labels("discord", "cancel", "sent").inc()
        await interaction.edit_original_response(
            content=f"Asked the trainer to stop `{cmd.name}`. Its message in the channel will say when it stopped "
                    "(a training that already finished keeps its adapter)."
        )

    async def choices(self, interaction: discord.Interaction, current: str, *, versions: bool
                      ) -> list[app_commands.Choice[str]]:
        """Autocomplete: the team's adapters whose name contains what was typed (and, for `/skill`'s adapter
        option, each pinned version), from a listing at most AUTOCOMPLETE_CACHE_S old."""
        team_id = origin_of(interaction).team_id
        cached = self._listings.get(team_id)
        if cached is None or time.monotonic() - cached[0] > AUTOCOMPLETE_CACHE_S:
            cached = (time.monotonic(), await asyncio.to_thread(self.registry.adapters, team_id))
            self._listings[team_id] = cached
        typed = current.strip().lower()
        found = []
        for name, metas in sorted(cached[1].items()):
            if typed.split("@")[0] not in name:
                continue
            found.append(app_commands.Choice(name=f"{name} (latest: v{metas[-1].version})", value=name))
            if versions:
                found += [app_commands.Choice(name=f"{name}@v{m.version}", value=f"{name}@v{m.version}")
                          for m in reversed(metas)]
        return found[:MAX_CHOICES]

    async def on_adapters(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        team_id = origin_of(interaction).team_id
        text = await asyncio.to_thread(describe_adapters, self.registry, team_id)
        TRAIN_COMMANDS.labels("discord", "adapters", "listed").inc()
        await interaction.edit_original_response(content=clip(text))


def register(bot: SkillBot, settings: TrainCommandSettings) -> None:
    training = DiscordTraining(bot, settings)

    @app_commands.command(name="skill-train", description="Teach your team's model a style or thing from images")
    @app_commands.describe(
        name="the adapter's name, e.g. team-style (letters, digits, - and _)",
        images="a training image (PNG, JPEG or WebP), or one zip of many (a captions.jsonl inside captions them)",
        trigger="the word that calls the concept in prompts (default sks)",
        steps=f"training steps (default {settings.default_train_steps})",
        caption="caption for every image; the trigger word is added if missing",
    )
    async def train(
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, 64],
        images: discord.Attachment,
        trigger: app_commands.Range[str, 1, 32] | None = None,
        steps: app_commands.Range[int, 10, 5000] | None = None,
        caption: app_commands.Range[str, 1, MAX_PROMPT_CHARS] | None = None,
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
        image4: discord.Attachment | None = None,
        image5: discord.Attachment | None = None,
        image6: discord.Attachment | None = None,
        image7: discord.Attachment | None = None,
        image8: discord.Attachment | None = None,
        image9: discord.Attachment | None = None,
        image10: discord.Attachment | None = None,
    ) -> None:
        more = (image2, image3, image4, image5, image6, image7, image8, image9, image10)
        files = [images, *(f for f in more if f is not None)]
        await training.on_train(interaction, name, files, trigger, steps, caption)

    @app_commands.command(name="skill-train-cancel", description="Stop your team's training of an adapter")
    @app_commands.describe(name="the adapter whose training to stop")
    async def cancel(interaction: discord.Interaction, name: app_commands.Range[str, 1, 64]) -> None:
        await training.on_cancel(interaction, name)

    @app_commands.command(name="skill-adapters", description="List your team's LoRA adapters and their versions")
    async def adapters(interaction: discord.Interaction) -> None:
        await training.on_adapters(interaction)

    async def names(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return await training.choices(interaction, current, versions=False)

    async def refs(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return await training.choices(interaction, current, versions=True)

    train.autocomplete("name")(names)  # training an existing name again makes its next version
    cancel.autocomplete("name")(names)
    skill = bot.tree.get_command("skill")
    if skill is not None:
        skill.autocomplete("adapter")(refs)
    for command in (train, cancel, adapters):
        bot.tree.add_command(command)
