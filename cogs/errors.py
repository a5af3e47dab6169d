"""The one place where errors become what a member reads (always privately)."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from services.fal_queue import FalAccountLocked
from services.flux_kontext import InvalidEdit
from services.i18n import N_, LocalizedError, Texts
from services.input_images import InputExpired
from services.job import JobPlace
from services.policy import POLICY_FIELDS, GuildPolicy, RefusalReason, Refused, Standing
from services.recipes import RecipeRefused
from services.runner import RunnerStopped

from .render import channel_list
from .translation import member_texts

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)

# The permissions the bot asks for, as Discord's own interface names them.
PERMISSION_NAMES = {"manage_guild": N_("Manage Server"), "manage_messages": N_("Manage Messages")}


class UserFacingError(LocalizedError):
    """Raised by commands and buttons with a message meant for the member who used them: an
    English template marked with `N_` and its values, shown in the member's language."""


class NotServedHere(app_commands.CheckFailure):
    """The operator does not let the bot work in this server (ALLOWED_GUILD_IDS)."""


class PersonalUseOff(app_commands.CheckFailure):
    """The operator lets the bot work only in servers that added it (PERSONAL_USE is off)."""


class PolicyRefusal(Exception):
    """The policy (the server's, or the operator's for personal use) does not let this member
    start a job now."""

    def __init__(self, refused: Refused, policy: GuildPolicy, *, personal: bool = False) -> None:
        super().__init__(refused.reason.value)
        self.refused = refused
        self.policy = policy
        self.personal = personal


# The limits moderators may set to 0, which turns /kontext off in the server: a refusal by one
# says so, not that jobs are running or that the day is used up.
PAUSING_LIMITS = {
    RefusalReason.MEMBER_CONCURRENCY: "concurrent_jobs_per_member",
    RefusalReason.GUILD_CONCURRENCY: "concurrent_jobs_per_guild",
    RefusalReason.DAILY_LIMIT: "daily_jobs_per_member",
}


def is_paused(limit: Refused | Standing) -> bool:
    """Whether a refusal (or a member's standing) is by a limit set to 0: waiting does not help."""
    return limit.reason in PAUSING_LIMITS and limit.limit == 0


def timestamp_when_free(moment: float) -> str:
    """When a limit frees up, as a Discord timestamp. Those are whole seconds: rounded up, since a
    moment shown early (a cooldown ends at a job's own instant plus its seconds) has the member
    try at it and be refused again, told a moment that has passed."""
    return f"<t:{math.ceil(moment)}:R>"


def refusal_text(refused: Refused, policy: GuildPolicy, _: Texts, *, personal: bool = False) -> str:
    """Why a member may not start a job now, and when they can try again."""
    when = timestamp_when_free(refused.retry_at) if refused.retry_at else ""
    limit = int(refused.limit) if isinstance(refused.limit, int) else 0
    running = int(refused.used) if refused.used is not None else limit  # for the concurrency refusals
    reason = refused.reason
    if reason is RefusalReason.CHANNEL_NOT_ALLOWED:
        channels = channel_list(policy.allowed_channel_ids, _)
        return _("Kontext isn't enabled in this channel. It works in {channels}.", channels=channels)
    if reason is RefusalReason.MISSING_ROLE:
        return _("You need the <@&{role}> role to use `/kontext` in this server.", role=policy.required_role_id)
    if is_paused(refused):
        setting = _(POLICY_FIELDS[PAUSING_LIMITS[reason]].label)
        return _("`/kontext` is paused in this server: its moderators set “{setting}” to 0.", setting=setting)
    if reason is RefusalReason.MEMBER_CONCURRENCY:
        return _.ngettext(
            "You already have {count} edit running. Wait for it to finish, then try again.",
            "You already have {count} edits running. Wait for one to finish, then try again.",
            running,
        )
    if reason is RefusalReason.GUILD_CONCURRENCY:
        return _.ngettext(
            "This server already has {count} edit running. Please try again in a moment.",
            "This server already has {count} edits running. Please try again in a moment.",
            running,
        )
    if reason is RefusalReason.COOLDOWN:
        return _.ngettext(
            "Slow down: this server allows one edit every {count} second. You can start the next one {when}.",
            "Slow down: this server allows one edit every {count} seconds. You can start the next one {when}.",
            limit,
            when=when,
        )
    if reason is RefusalReason.DAILY_LIMIT:
        if personal:
            return _.ngettext(
                "You've used your {count} edit for today outside servers that added the bot. You can start more {when}.",
                "You've used your {count} edits for today outside servers that added the bot. You can start more {when}.",
                limit,
                when=when,
            )
        return _.ngettext(
            "You've used your {count} edit for today. You can start more {when}.",
            "You've used your {count} edits for today. You can start more {when}.",
            limit,
            when=when,
        )
    if reason is RefusalReason.MONTHLY_IMAGE_BUDGET:
        return _.ngettext(
            "This server's monthly budget of {count} image would be exceeded. It resets {when}.",
            "This server's monthly budget of {count} images would be exceeded. It resets {when}.",
            limit,
            when=when,
        )
    if reason is RefusalReason.OPERATOR_BUDGET:
        # This job's images would pass it, which a smaller job might not: not "used up".
        return _(
            "The bot's monthly budget of {amount} would be exceeded. It resets {when}.",
            amount=_.money(float(refused.limit or 0)),
            when=when,
        )
    if reason is RefusalReason.SAFETY_ABOVE_MAXIMUM:
        return _(
            "This result was made at a higher safety tolerance than this channel allows (at most {maximum}), "
            "so it can't be shown here.",
            maximum=limit,
        )
    return _(
        "This server's monthly budget of {amount} would be exceeded. It resets {when}.",
        amount=_.money(float(refused.limit or 0)),
        when=when,
    )


async def tell(interaction: discord.Interaction, message: str, embed: discord.Embed | None = None) -> None:
    """Send a private message to the member, whether or not the interaction was answered yet."""
    extra: dict[str, Any] = {"embed": embed} if embed is not None else {}
    if interaction.response.is_done():
        await interaction.followup.send(message, ephemeral=True, **extra)
    else:
        await interaction.response.send_message(message, ephemeral=True, **extra)


@contextlib.asynccontextmanager
async def placeholder_withdrawn_on_failure(interaction: discord.Interaction) -> AsyncIterator[None]:
    """Around the work after a public "thinking…" answer: if it fails, the placeholder is
    deleted first, so `tell` reaches the member alone (the first followup after a deferral would
    replace the placeholder and stay as public as it)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(discord.HTTPException):
            await interaction.delete_original_response()
        raise


def words_back(typed: str, _: Texts) -> discord.Embed:
    """A member's words as they typed them, in a code block to copy (a fence inside is broken
    with a zero-width space after every second backtick of a longer run, so no run of three,
    which would close the block, is left)."""
    fenced = re.sub("``(?=`)", "``\u200b", typed)
    return discord.Embed(title=_("What you wrote"), description=f"```\n{fenced}\n```")


def describe(error: Exception, _: Texts) -> str | None:
    """The member-facing text for an error, or None for a bug (logged, then a generic text)."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    if isinstance(error, (UserFacingError, RecipeRefused)):
        return _.error(error)
    if isinstance(error, InputExpired):
        return _("{detail} Please attach the image again.", detail=_.error(error))
    if isinstance(error, NotServedHere):
        return _("The Kontext bot is not enabled for this server.")
    if isinstance(error, PersonalUseOff):
        return _("The Kontext bot works only in servers that added it.")
    if isinstance(error, PolicyRefusal):
        return refusal_text(error.refused, error.policy, _, personal=error.personal)
    if isinstance(error, InvalidEdit):
        return _("That can't be sent to FLUX.1 Kontext: {reason}.", reason=_.error(error))
    if isinstance(error, RunnerStopped):
        return _("The bot is restarting. Please try again in a minute.")
    if isinstance(error, FalAccountLocked):
        return _(
            "The bot's fal.ai account can't take edits right now (it is out of credit or locked). "
            "The bot's operator has been told; please try again later. Nothing was charged."
        )
    if isinstance(error, app_commands.MissingPermissions):
        names = (_(PERMISSION_NAMES.get(p, p.replace("_", " ").title())) for p in error.missing_permissions)
        return _("You need the {permissions} permission for this.", permissions=", ".join(names))
    if isinstance(error, app_commands.NoPrivateMessage):
        return _("This only works in a server.")
    if isinstance(error, app_commands.CommandOnCooldown):
        return _("Slow down: try again in {seconds} s.", seconds=_.number(error.retry_after))
    if isinstance(error, app_commands.CheckFailure):
        return _("You can't use this here.")
    if isinstance(error, app_commands.TransformerError):
        return _("That value doesn't fit: {value}.", value=repr(error.value))
    return None


async def report(interaction: discord.Interaction, error: Exception, *, typed: str | None = None) -> None:
    """Tell the member what went wrong. `typed`: what they wrote in a form, given back with it
    (Discord cannot answer a form with a form, so a refused one would lose their words)."""
    _ = member_texts(interaction)
    message = describe(error, _)
    if message is None:
        command = interaction.command.qualified_name if interaction.command else "a component"
        log.error("unexpected error in %s", command, exc_info=error)
        message = _("Something went wrong on the bot's side. It has been logged; please try again.")
    try:
        await tell(interaction, message, words_back(typed, _) if typed else None)
    except discord.HTTPException:
        log.warning("could not tell the member about an error", exc_info=True)


def place_of(interaction: discord.Interaction) -> JobPlace:
    """Whose policy governs an interaction, and where the bot may post: a server that installed
    the bot (its id in `authorizing_integration_owners["0"]`), the member's DM with the bot, or
    anywhere else only the member's own install of the app reaches (a group DM, a server without
    the bot)."""
    if interaction.guild_id is not None and interaction.is_guild_integration():
        return JobPlace.SERVER
    if interaction.guild_id is None and interaction.context.dm_channel:
        return JobPlace.BOT_DM
    return JobPlace.EXTERNAL


class KontextTree(app_commands.CommandTree["KontextBot"]):
    """The command tree whose error handler is `report`: one place for every command's errors."""

    async def interaction_check(self, interaction: discord.Interaction[KontextBot]) -> bool:
        """The operator's say on where the bot works: the servers of ALLOWED_GUILD_IDS, and
        outside servers that added it only with PERSONAL_USE."""
        settings = interaction.client.settings
        refusal: app_commands.CheckFailure | None = None
        if place_of(interaction).personal:
            if not settings.personal.allowed:
                refusal = PersonalUseOff()
        elif not settings.serves_guild(interaction.guild_id):
            refusal = NotServedHere()
        if refusal is None:
            return True
        if interaction.type is discord.InteractionType.autocomplete:
            return False  # nothing to suggest; an autocomplete cannot be answered with a message
        raise refusal

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await report(interaction, error)
