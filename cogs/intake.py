"""Job intake: every way a job starts (the command, the context menu's modal, Re-roll, Try again,
Edit) ends here. It applies the policy of the place (a server's, or the operator's for personal
use), acknowledges within Discord's 3 seconds, records the job and hands it to the runner."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import discord

from services.fal_queue import FalAccountLocked
from services.flux_kontext import KontextEdit
from services.job import NOTE_PRIVATE_REPLY, NOTE_SAFETY_LIMITED_TO, JobPlace, JobRequest
from services.policy import JobAsk, OperatorLimits, Refused, Requester, access_refusal, resolve

from .errors import NotServedHere, PersonalUseOff, PolicyRefusal, place_of

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)


def is_nsfw_channel(channel: Any) -> bool:
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def requester_of(interaction: discord.Interaction[KontextBot]) -> Requester:
    channel = interaction.channel
    member = interaction.user
    return Requester(
        user_id=member.id,
        role_ids=frozenset(role.id for role in getattr(member, "roles", ())),
        channel_id=interaction.channel_id or 0,
        parent_channel_id=channel.parent_id if isinstance(channel, discord.Thread) else None,
        channel_nsfw=is_nsfw_channel(channel),
    )


class JobIntake:
    def __init__(self, bot: KontextBot) -> None:
        self._bot = bot
        # Checking the limits and recording the new job happen under a lock per policy scope (a
        # server, or one member's personal use), so two requests at the same instant cannot
        # both take the last free place.
        self._locks: defaultdict[tuple[str, int], asyncio.Lock] = defaultdict(asyncio.Lock)

    def _place(self, interaction: discord.Interaction[KontextBot]) -> JobPlace:
        """Where the member is, if the operator lets the bot work there."""
        place = place_of(interaction)
        settings = self._bot.settings
        if place.personal and not settings.personal.allowed:
            raise PersonalUseOff()
        if not place.personal and not settings.serves_guild(interaction.guild_id):
            raise NotServedHere()
        return place

    async def check_access(self, interaction: discord.Interaction[KontextBot]) -> None:
        """Refuse, as a job would be refused, a member who may not use the bot where they are
        (the operator's servers and personal use, the server's channels and role). All that
        showing an old result again needs: it spends nothing, so no limit of use applies."""
        place = self._place(interaction)
        if place.personal:
            policy = self._bot.settings.personal.as_policy()
        else:
            assert interaction.guild_id is not None
            policy = await self._bot.store.policy(interaction.guild_id)
        refused = access_refusal(policy, requester_of(interaction))
        if refused is not None:
            raise PolicyRefusal(refused, policy, personal=place.personal)

    async def start(
        self,
        interaction: discord.Interaction[KontextBot],
        edit: KontextEdit,
        *,
        parent_job_id: int | None = None,
        member_prompt: str | None = None,
    ) -> None:
        """Apply the policy that governs where the member is (the server's; where no server
        governs, the operator's for personal use) to `edit` (its safety tolerance is what the
        member asked for), acknowledge, record the job and start it. A refusal is private
        (PolicyRefusal) and nothing is spent."""
        bot = self._bot
        edit.options.check()
        if bot.runner.account.refuses():
            raise FalAccountLocked("refused up front", detail=bot.runner.account.locked_reason)
        place = self._place(interaction)
        personal = bot.settings.personal
        scope = ("member", interaction.user.id) if place.personal else ("server", interaction.guild_id or 0)
        async with self._locks[scope]:
            requester = requester_of(interaction)
            now = time.time()
            operator = OperatorLimits(bot.settings.monthly_budget_usd)
            all_servers = operator.monthly_usd_budget is not None
            if place.personal:
                policy = personal.as_policy()
                usage = await bot.store.personal_usage(interaction.user.id, now, all_servers=all_servers)
            else:
                assert interaction.guild_id is not None
                policy = await bot.store.policy(interaction.guild_id)
                usage = await bot.store.usage(interaction.guild_id, interaction.user.id, now, all_servers=all_servers)
            ask = JobAsk(edit.options.safety_tolerance, edit.options.image_count)
            decision = resolve(
                policy,
                requester,
                usage,
                ask,
                now=now,
                price_per_image=bot.settings.price_per_image_usd,
                operator=operator,
            )
            if isinstance(decision, Refused):
                raise PolicyRefusal(decision, policy, personal=place.personal)
            notes = {NOTE_SAFETY_LIMITED_TO: decision.limited_to} if decision.limited_to is not None else {}
            job = await bot.runner.accept(
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
                    member_prompt=member_prompt,
                )
            )
        # Acknowledge outside the lock: a burst in one server must not queue up behind Discord's
        # round trips (each interaction has its own 3 seconds).
        try:
            callback = await interaction.response.defer(thinking=True)
            message_id = callback.message_id if callback is not None else None
            if message_id is None:
                message_id = (await interaction.original_response()).id
        except discord.HTTPException as exc:
            await bot.runner.abandon(job, f"could not acknowledge the interaction: {exc}")
            raise
        if callback is not None and callback.is_ephemeral():
            # A server that keeps the replies of apps it has not added private (its "Use External
            # Apps" permission is off): Discord made the reply ephemeral; the card says so.
            job.notes = {**job.notes, NOTE_PRIVATE_REPLY: True}
        bot.runner.start(job, message_id=message_id)
