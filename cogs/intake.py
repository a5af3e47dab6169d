"""Job intake: every way a job starts (the command, the context menu's modal, Re-roll, Try again,
Edit) ends here. It applies the policy of the place (a server's, or the operator's for personal
use), acknowledges within Discord's 3 seconds, records the job and hands it to the runner."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord

from services.fal_queue import FalAccountLocked
from services.flux_kontext import KontextEdit
from services.job import (
    NOTE_FROM_DEFAULTS,
    NOTE_PRIVATE_FIRST,
    NOTE_PRIVATE_REPLY,
    NOTE_RECIPE,
    NOTE_SAFETY_LIMITED_TO,
    Job,
    JobPlace,
    JobRequest,
    RecipeNote,
)
from services.policy import (
    GuildPolicy,
    JobAsk,
    OperatorLimits,
    Refused,
    Requester,
    Usage,
    access_refusal,
    resolve,
    showing_refusal,
)
from services.redact import describe_error

from .errors import NotServedHere, PersonalUseOff, PolicyRefusal, place_of

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)

# Discord drops an interaction not acknowledged within 3 seconds of its creation (10062). The
# intake acknowledges once its checks and the job's row are done, or at this point in any case,
# leaving Discord's round trip the rest.
ACKNOWLEDGE_BY = 2.0


def is_nsfw_channel(channel: Any) -> bool:
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def requester_of(interaction: discord.Interaction[KontextBot]) -> Requester:
    return requester_in(interaction.user, interaction.channel, interaction.channel_id or 0)


def requester_in(member: discord.abc.User, channel: Any, channel_id: int) -> Requester:
    """The member as the policy sees them in `channel`: their roles there, the channel (a
    thread's parent too), whether it is age-restricted."""
    return Requester(
        user_id=member.id,
        role_ids=frozenset(role.id for role in getattr(member, "roles", ())),
        channel_id=channel_id,
        parent_channel_id=channel.parent_id if isinstance(channel, discord.Thread) else None,
        channel_nsfw=is_nsfw_channel(channel),
    )


@dataclass(frozen=True)
class Governing:
    """The limits that govern a member where they are, and their usage against them now."""

    policy: GuildPolicy
    usage: Usage
    operator: OperatorLimits
    personal: bool  # the operator's policy for personal use, not a server's


class Acknowledgement:
    """The "thinking…" reply a job's interaction is answered with: sent when the intake is ready
    (`sent`), or ACKNOWLEDGE_BY seconds after the interaction whatever the intake still waits
    for (a slow disk, the database's write lock, Discord slow to return a message read before
    it), so that the member never sees "The application did not respond". As private as the
    member wants their replies (`privacy`); sent before their settings were read, it is private,
    and the job then is too. Sent early and the job refused after all, it is withdrawn, so the
    refusal reaches the member alone (see `placeholder_withdrawn_on_failure`)."""

    def __init__(self, interaction: discord.Interaction[KontextBot]) -> None:
        self._interaction = interaction
        self._private: bool | None = None
        self._sending: asyncio.Task[discord.InteractionCallbackResponse[KontextBot] | None] | None = None
        delay = interaction.created_at.timestamp() + ACKNOWLEDGE_BY - time.time()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._send)

    def privacy(self, wanted: bool) -> bool:
        """Whether the reply is private: as the member wants, unless it was sent before that
        was known."""
        if self._private is None:
            self._private = wanted
        return self._private

    def _send(self) -> asyncio.Task[discord.InteractionCallbackResponse[KontextBot] | None]:
        if self._sending is None:
            private = self.privacy(True)
            self._sending = asyncio.create_task(self._interaction.response.defer(thinking=True, ephemeral=private))
        return self._sending

    async def sent(self) -> discord.InteractionCallbackResponse[KontextBot] | None:
        """Acknowledge now, unless that was done already: Discord's answer."""
        self._timer.cancel()
        return await self._send()

    async def withdraw(self) -> None:
        """The job is refused: an early "thinking…" is deleted, and none is sent any more."""
        self._timer.cancel()
        if self._sending is None:
            return
        # Whatever went wrong with it, the refusal is what the member must hear.
        with contextlib.suppress(Exception):
            await self._sending
            await self._interaction.delete_original_response()


class JobIntake:
    def __init__(self, bot: KontextBot) -> None:
        self._bot = bot

    async def governing(self, interaction: discord.Interaction[KontextBot], now: float) -> Governing:
        """The policy of the place (the server's; where no server governs, the operator's for
        personal use) and the member's usage, as the store counts it: what `start` decides on
        and `/kontext-me` shows."""
        bot = self._bot
        operator = OperatorLimits(bot.settings.monthly_budget_usd)
        all_servers = operator.monthly_usd_budget is not None
        if place_of(interaction).personal:
            usage = await bot.store.personal_usage(interaction.user.id, now, all_servers=all_servers)
            return Governing(bot.settings.personal.as_policy(), usage, operator, personal=True)
        assert interaction.guild_id is not None
        policy = await bot.store.policy(interaction.guild_id)
        usage = await bot.store.usage(interaction.guild_id, interaction.user.id, now, all_servers=all_servers)
        return Governing(policy, usage, operator, personal=False)

    def _place(self, interaction: discord.Interaction[KontextBot]) -> JobPlace:
        """Where the member is, if the operator lets the bot work there."""
        place = place_of(interaction)
        settings = self._bot.settings
        if place.personal and not settings.personal.allowed:
            raise PersonalUseOff()
        if not place.personal and not settings.serves_guild(interaction.guild_id):
            raise NotServedHere()
        return place

    def _scopes(self, interaction: discord.Interaction[KontextBot], place: JobPlace) -> list[str]:
        """The limits a new job is checked against, which the store holds from the check to the
        job's row, in every process: the place's (one server's, or one member's personal use), and
        the operator's budget, which every server shares."""
        scope = f"member:{interaction.user.id}" if place.personal else f"server:{interaction.guild_id or 0}"
        return [scope, "budget"] if self._bot.settings.monthly_budget_usd is not None else [scope]

    async def check_access(self, interaction: discord.Interaction[KontextBot]) -> None:
        """Refuse, as a job would be refused, a member who may not use the bot here at all (the
        operator's servers and personal use, the server's channels and role): asked before a
        prompt form is shown, so nobody writes a prompt that could never be sent. Limits that
        clear with time (jobs running, cooldown, daily and monthly) are the job's to check."""
        place = self._place(interaction)
        policy = await self._policy(None if place.personal else interaction.guild_id)
        refused = access_refusal(policy, requester_of(interaction))
        if refused is not None:
            raise PolicyRefusal(refused, policy, personal=place.personal)

    async def _policy(self, guild_id: int | None) -> GuildPolicy:
        """A server's policy, or with None the operator's for personal use."""
        if guild_id is None:
            return self._bot.settings.personal.as_policy()
        return await self._bot.store.policy(guild_id)

    async def check_showing(self, interaction: discord.Interaction[KontextBot], safety_tolerance: int | None) -> None:
        """Refuse, as a job would be refused, a member who may not show here a result made at
        `safety_tolerance`: where they may not use the bot (the operator's servers and personal
        use, the server's channels and role), or where a job may not use that tolerance (see
        `showing_refusal`)."""
        place = self._place(interaction)
        guild_id = None if place.personal else interaction.guild_id
        await self.check_showing_in(guild_id, requester_of(interaction), safety_tolerance)

    async def check_showing_in(self, guild_id: int | None, requester: Requester, safety_tolerance: int | None) -> None:
        """`check_showing` for `requester` in a server's channel (None: personal use), wherever
        the member asks from: Share from the DM a late result came in posts in the job's channel."""
        policy = await self._policy(guild_id)
        refused = showing_refusal(policy, requester, safety_tolerance)
        if refused is not None:
            raise PolicyRefusal(refused, policy, personal=guild_id is None)

    async def start(
        self,
        interaction: discord.Interaction[KontextBot],
        edit: KontextEdit,
        *,
        parent_job_id: int | None = None,
        fill_defaults: bool = False,
        member_prompt: str | None = None,
        recipe: RecipeNote | None = None,
    ) -> None:
        """Apply the policy that governs where the member is (the server's; where no server
        governs, the operator's for personal use) to `edit` (its safety tolerance is what the
        member asked for), acknowledge, record the job and start it. A refusal is private
        (PolicyRefusal) and nothing is spent.

        The member's own settings (/kontext-settings): with `fill_defaults` (a request they just
        typed, not a re-roll of a job as it was) their defaults fill the options they left out,
        and the job notes which; whether the result is theirs alone first applies to every job.
        `recipe`: the server recipe that made the prompt, which members see in place of its text."""
        acknowledgement = Acknowledgement(interaction)
        job: Job | None = None
        try:
            edit, notes = await self._checked(
                interaction, edit, acknowledgement, fill_defaults=fill_defaults, recipe=recipe
            )
            async with self._bot.runner.admission():
                job = await self._recorded(
                    interaction, edit, notes, parent_job_id=parent_job_id, member_prompt=member_prompt
                )
                await self._acknowledge_and_start(interaction, job, acknowledgement)
        except BaseException:
            if job is None:  # refused, or the bot is stopping: no job, no reply
                await acknowledgement.withdraw()
            raise

    async def _checked(
        self,
        interaction: discord.Interaction[KontextBot],
        edit: KontextEdit,
        acknowledgement: Acknowledgement,
        *,
        fill_defaults: bool,
        recipe: RecipeNote | None,
    ) -> tuple[KontextEdit, dict[str, Any]]:
        """`edit` with the member's defaults, and the job's notes so far; refused (an error the
        member is told of) if it cannot be sent as it is."""
        bot = self._bot
        defaults = await bot.store.member_defaults(interaction.user.id)
        notes: dict[str, Any] = {}
        if recipe is not None:
            notes[NOTE_RECIPE] = recipe
        if fill_defaults:
            options, filled = defaults.apply(edit.options)
            edit = dataclasses.replace(edit, options=options)
            if filled:
                notes[NOTE_FROM_DEFAULTS] = list(filled)
        if acknowledgement.privacy(defaults.private_first):
            notes[NOTE_PRIVATE_FIRST] = True
        edit.options.check()
        await bot.runner.check_inputs_last(edit)
        if bot.runner.account.refuses():
            raise FalAccountLocked("refused up front", detail=bot.runner.account.locked_reason)
        return edit, notes

    async def _recorded(
        self,
        interaction: discord.Interaction[KontextBot],
        edit: KontextEdit,
        notes: dict[str, Any],
        *,
        parent_job_id: int | None,
        member_prompt: str | None,
    ) -> Job:
        """The job, recorded under the limits of the place it may run in (PolicyRefusal if it
        may not)."""
        bot = self._bot
        place = self._place(interaction)
        async with bot.store.admitting(self._scopes(interaction, place)):
            requester = requester_of(interaction)
            now = time.time()
            governing = await self.governing(interaction, now)
            policy = governing.policy
            ask = JobAsk(edit.options.safety_tolerance, edit.options.image_count)
            decision = resolve(
                policy,
                requester,
                governing.usage,
                ask,
                now=now,
                price_per_image=bot.settings.price_per_image_usd,
                operator=governing.operator,
            )
            if isinstance(decision, Refused):
                raise PolicyRefusal(decision, policy, personal=place.personal)
            if decision.limited_to is not None:
                notes[NOTE_SAFETY_LIMITED_TO] = decision.limited_to
            return await bot.runner.accept(
                JobRequest(
                    guild_id=interaction.guild_id,
                    channel_id=interaction.channel_id or 0,
                    user_id=interaction.user.id,
                    application_id=interaction.application_id,
                    interaction_token=interaction.token,
                    interaction_created_at=interaction.created_at.timestamp(),
                    message_id=None,
                    channel_nsfw=requester.channel_nsfw,
                    upload_limit=interaction.filesize_limit,
                    edit=edit.with_options(safety_tolerance=decision.safety_tolerance),
                    notes=notes,
                    parent_job_id=parent_job_id,
                    place=place,
                    locale=interaction.locale.value,
                    guild_locale=interaction.guild_locale.value if interaction.guild_locale is not None else None,
                    parent_channel_id=requester.parent_channel_id,
                    private_thread=isinstance(interaction.channel, discord.Thread) and interaction.channel.is_private(),
                    member_prompt=member_prompt,
                )
            )

    async def _acknowledge_and_start(
        self, interaction: discord.Interaction[KontextBot], job: Job, acknowledgement: Acknowledgement
    ) -> None:
        """Acknowledged once the job is recorded (unless that was done already), outside the
        limits' lock: a burst in one server must not queue up behind Discord's round trips (each
        interaction has its own 3 seconds). Not acknowledged, the job is closed unsent."""
        try:
            callback = await acknowledgement.sent()
            message_id = callback.message_id if callback is not None else None
            if message_id is None:
                message_id = (await interaction.original_response()).id
        except Exception as exc:  # Discord's refusal, or no answer at all (aiohttp's errors)
            await self._bot.runner.abandon(job, f"could not acknowledge the interaction: {describe_error(exc)}")
            raise
        if callback is not None and callback.is_ephemeral() and not job.private_first:
            # A server that keeps the replies of apps it has not added private (its "Use External
            # Apps" permission is off): Discord made the reply ephemeral; the card says so.
            job.note(NOTE_PRIVATE_REPLY, True)
        await self._bot.runner.start(job, message_id=message_id)
