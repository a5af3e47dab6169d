"""Shows jobs in Discord: throttled progress edits, then the final delivery.

The runner reports changes; this listener decides what reaches Discord. Progress edits are
best-effort and only sent when the rendered message differs from the one shown; delivery is
awaited and raises, so the runner retries it until it is shown (or raises Undeliverable when
Discord says it never will be).

What a result looks like: one components-v2 card (cogs.views.result_card) with every image in
a media gallery, or, with RESULT_CARDS=0 or more images than a gallery holds, the classic message
(content, embed, attachments, split across follow-ups to fit the upload limit).

Where it goes: the interaction's reply while its 15-minute token lives; after that, where the
bot may post with its own token (a server that added it, with the permissions to post images in
that channel and read its history, the member's DM with it), a channel message that replies to
it, and anywhere else (a group DM, a server without the bot: only the interaction can show
anything there) a DM to the member, who was told so on the reply before the token ran out. A
reply that is gone (a moderator deleted it, or its channel) is not posted again: the job is
withdrawn and the member told privately where that can still be seen. The bot learns that by
reading the reply (it gets no message events: it asks only for the guilds intent), so it
posts in the channel only where it may read the channel's history.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import discord

from services.i18n import N_, texts
from services.job import (
    INTERACTION_TOKEN_LIFETIME,
    NOTE_LATE_BY_DM,
    NOTE_REPLY_EXPIRING,
    NOTE_WITHDRAWN,
    REPLY_EXPIRING_BY_DM,
    REPLY_EXPIRING_IN_CHANNEL,
    Job,
    JobPlace,
    JobState,
    ResultImage,
)
from services.metrics import Metrics
from services.redact import describe_error
from services.runner import DeliveryProgress, Undeliverable

from .modlog import post_to_log_channel
from .render import STARTS_A_JOB, Rendered, attachment_name, job_log_line, pack_files, posted_names, render
from .translation import server_texts
from .views import (
    MAX_GALLERY_ITEMS,
    cached_channel,
    image_attachments,
    job_view,
    may_post_images,
    may_send,
    own_permissions,
    result_card,
)

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)

# The reply, as the interaction whose token the job holds names it: its own response, whether it
# made it (the command, Re-roll) or was pressed on it (see Job.reply_through), where Discord
# documents editing by id only for the messages a token sent. discord.py types a message id as an
# int; its webhook routes take this name as Discord's do.
REPLY: Any = "@original"
# Discord takes an interaction's acknowledgement within this many seconds of the interaction
# (discord-platform.md), or never: after it, a reply the bot asked for exists or never will.
ACKNOWLEDGEMENT_WINDOW = 3.0
# Discord answers 401 with this code once an interaction token is older than 15 minutes.
INVALID_WEBHOOK_TOKEN = 50027
# The message is gone (deleted).
UNKNOWN_MESSAGE = 10008
# The channel or thread is gone (deleted), and every message in it.
UNKNOWN_CHANNEL = 10003
# What withdraws a job whose reply is gone, by the Discord error that says so.
REPLY_GONE = {UNKNOWN_MESSAGE: "its reply was deleted", UNKNOWN_CHANNEL: "its channel was deleted"}
# An interaction of an app the server has not added takes at most 5 follow-ups
# (receiving-and-responding.mdx, Create Followup Message): the classic fallback of a 4-image
# result needs 3 at most, but whatever Discord refuses moves on like an expired token.
MAX_FOLLOWUPS_REACHED = 40094
# The thread was archived (a member closed their forum post): Discord refuses every edit of a
# message there, but a new message unarchives it (channel.mdx, Thread), as the bot's own post does.
ARCHIVED_THREAD = 50083
# Errors after which the interaction can show no more: the bot posts the rest itself.
INTERACTION_EXHAUSTED = frozenset({INVALID_WEBHOOK_TOKEN, UNKNOWN_MESSAGE, MAX_FOLLOWUPS_REACHED, ARCHIVED_THREAD})
# Progress edits Discord will refuse every time from then on, by the error that says so: the
# ticker stops (a 401 counts towards Discord's limit on invalid requests, rate-limits.mdx).
EDITS_OVER = {
    INVALID_WEBHOOK_TOKEN: "Discord ended its reply's token",
    ARCHIVED_THREAD: "its thread was archived",
}
# 413: a file over what Discord takes there, whatever limit the interaction announced.
REQUEST_ENTITY_TOO_LARGE = 40005
# A reply says this long before its token ends where the result will come (the token's last
# 30 s are kept for the final upload).
REPLY_NOTICE_BEFORE = 120
IMAGE_LINK = N_("image {number}")
# Images over the upload limit where they are posted are linked instead, with this line.
TOO_LARGE_FOR_SERVER = N_("📦 Too large for this server's upload limit: {links}")
TOO_LARGE_FOR_DM = N_("📦 Too large to send in a DM: {links}")
# The first line of what comes by DM after the reply's 15 minutes: a result, or other news of it.
LATE_DM_READY = N_("📬 Your edit from {reply} is ready: the reply there could only be updated for 15 minutes.")
LATE_DM_NEWS = N_("📬 An update on your edit from {reply}: the reply there could only be updated for 15 minutes.")
# What the reply says in place of its progress when Discord refuses what was to replace it.
NOT_SHOWN = N_("❌ Discord refused to show how this edit ended (error {code}).")
# All replies together get at most this many progress edits per second.
MAX_PROGRESS_EDITS_PER_SECOND = 20
# How long the final state waits for a progress edit under way to land.
EDIT_LANDING_WAIT = 10.0


class ProgressTicker:
    """Keeps one reply showing its job's newest state: at most one edit per `pace()` seconds,
    only when the rendering changed, with the buttons sent only when they changed. Rendering
    happens when an edit is due, so states that come and go in between cost nothing. It never
    stops on an error: a lost edit is shown by the next one."""

    def __init__(
        self,
        job: Job,
        webhook: discord.Webhook,
        pace: Callable[[], float],
        on_reply_gone: Callable[[str], None],
        metrics: Metrics,
        held: Callable[[], bool],
        posts_late_in_channel: Callable[[], bool],
    ) -> None:
        self._job = job
        # The reply says in time where the result will come after its token: in the channel, or
        # by DM where the bot cannot post it there (known only then: see _late_in_channel).
        self._notice_at: float | None = job.interaction_created_at + INTERACTION_TOKEN_LIFETIME - REPLY_NOTICE_BEFORE
        self._posts_late_in_channel = posts_late_in_channel
        self._webhook = webhook
        self._pace = pace
        self._on_reply_gone = on_reply_gone
        self._metrics = metrics
        # Whether this process still drives the job (it may have lost it to another while paused).
        self._held = held
        self._shown: Rendered | None = None
        self._changed = asyncio.Event()
        self._editing = False
        self._closing = False
        self._task = asyncio.create_task(self._run(), name=f"progress-{job.id}")

    def poke(self) -> None:
        """The job changed; show it when the next edit is due."""
        self._changed.set()

    async def _run(self) -> None:
        # The deferred "thinking…" stands for the first interval, so a job that is submitted
        # within it goes straight to its queue position.
        await asyncio.sleep(self._pace())
        while True:
            await self._next_change()
            self._changed.clear()
            if self._job.state.is_final or not self._held():
                return  # the final state is deliver()'s to show, with its files
            try:
                rendered = render(self._job)
                if self._shown is not None and rendered.key() == self._shown.key():
                    continue
                self._editing = True
                try:
                    await self._edit(rendered)
                finally:
                    self._editing = False
                self._shown = rendered
                self._metrics.progress_edit()
            except discord.HTTPException as exc:
                if exc.code in REPLY_GONE:
                    self._on_reply_gone(REPLY_GONE[exc.code])
                    return
                if exc.code in EDITS_OVER:
                    # The result comes as the bot's own post (see INTERACTION_EXHAUSTED).
                    log.info("job %d: %s; its progress is no longer shown", self._job.id, EDITS_OVER[exc.code])
                    return
                self._metrics.discord_error(discord_error_kind(exc))
                log.warning("job %d: progress edit failed: %s", self._job.id, describe_error(exc))
            except Exception as exc:
                self._metrics.discord_error(discord_error_kind(exc))
                log.warning("job %d: progress edit failed: %s", self._job.id, describe_error(exc))
            if self._closing:
                return
            await asyncio.sleep(self._pace())

    async def _next_change(self) -> None:
        """Until the job changes, or the reply's token is about to end (then it says so)."""
        if self._notice_at is None:
            await self._changed.wait()
            return
        try:
            async with asyncio.timeout(max(0.0, self._notice_at - time.time())):
                await self._changed.wait()
        except TimeoutError:
            self._notice_at = None
            late = REPLY_EXPIRING_IN_CHANNEL if self._posts_late_in_channel() else REPLY_EXPIRING_BY_DM
            self._job.note(NOTE_REPLY_EXPIRING, late)

    async def _edit(self, rendered: Rendered) -> None:
        # Only what changed is sent: Discord keeps the fields an edit leaves out.
        changes: dict[str, Any] = {"content": rendered.content}
        shown = self._shown
        if shown is None or rendered.embed.to_dict() != shown.embed.to_dict():
            changes["embed"] = rendered.embed
        if shown is None or rendered.buttons != shown.buttons:
            changes["view"] = job_view(self._job, rendered.buttons)
        await self._webhook.edit_message(REPLY, **changes)

    def stop(self) -> None:
        self._task.cancel()

    async def close(self) -> None:
        """Stop editing, an edit under way let land first (for up to `EDIT_LANDING_WAIT`): a
        request cancelled once sent may still be carried out by Discord, after what replaces it,
        putting old progress back over a result (or refused on the card)."""
        self._closing = True
        if self._editing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), EDIT_LANDING_WAIT)
        self.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class DiscordPresenter:
    """The runner's listener (see `services.runner.JobListener`)."""

    def __init__(self, bot: KontextBot, edit_interval: float, metrics: Metrics) -> None:
        self._bot = bot
        self._edit_interval = edit_interval
        self._metrics = metrics
        self._tickers: dict[int, ProgressTicker] = {}
        # Withdrawals and the moderators' log lines: started here, not waited for.
        self._background: set[asyncio.Task[None]] = set()

    def job_changed(self, job: Job) -> None:
        if job.state.is_final or not job.token_valid() or NOTE_WITHDRAWN in job.notes:
            return  # the final state is shown by deliver(); an expired token cannot edit
        ticker = self._tickers.get(job.id)
        if ticker is None:
            ticker = self._tickers[job.id] = ProgressTicker(
                job,
                self._webhook(job),
                self._progress_pace,
                lambda reason: self.withdraw(job, reason),
                self._metrics,
                held=lambda: self._bot.store.holds(job),
                posts_late_in_channel=lambda: self._late_in_channel(job),
            )
        ticker.poke()

    def job_dropped(self, job: Job) -> None:
        ticker = self._tickers.pop(job.id, None)
        if ticker is not None:
            ticker.stop()

    async def abandoned(self, job: Job) -> int | None:
        """The reply of a job closed unsent at the start (see `JobListener.abandoned`) shows its
        failure, with Try again, in place of "thinking…". Sent once Discord has taken or dropped
        the acknowledgement the stopped process had sent, so as not to miss a reply still on its
        way; a reply that does not exist (the acknowledgement never reached Discord) is left be."""
        if not job.token_valid():
            return None
        await asyncio.sleep(max(0.0, job.interaction_created_at + ACKNOWLEDGEMENT_WINDOW - time.time()))
        rendered = render(job)
        try:
            # The job never learnt its reply's id: the interaction's own name for it.
            reply = await self._webhook(job).edit_message(
                REPLY, content=rendered.content, embed=rendered.embed, view=job_view(job, rendered.buttons)
            )
        except Exception as exc:  # no reply to edit (Unknown Message), or Discord not answering
            log.info("job %d: its reply could not say the job did not start: %s", job.id, describe_error(exc))
            return None
        log.info("job %d: its reply says the job did not start", job.id)
        return int(reply.id)

    def _progress_pace(self) -> float:
        """Seconds between two progress edits of one reply: EDIT_INTERVAL, stretched when many
        jobs are in progress so the bot's own work stays bounded. Final results never wait."""
        return max(self._edit_interval, len(self._tickers) / MAX_PROGRESS_EDITS_PER_SECOND)

    def withdraw(self, job: Job, reason: str) -> None:
        """The job's reply is gone (`reason`: it was deleted, or the channel with it): nothing
        more of the job is shown there."""
        log.info("job %d: %s; the job is withdrawn", job.id, reason)
        self._in_background(self._bot.runner.withdraw(job.id, reason))

    def channel_deleted(self, channel_id: int) -> None:
        """Discord says a channel or thread was deleted: the jobs asked there are withdrawn at
        once, not left running (and holding their members' places) for replies no one can see."""
        for job in self._bot.runner.jobs_in_channel(channel_id):
            self.withdraw(job, REPLY_GONE[UNKNOWN_CHANNEL])

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        tickers = list(self._tickers.values())
        self._tickers.clear()
        for ticker in tickers:
            await ticker.close()

    async def deliver(self, job: Job, progress: DeliveryProgress) -> None:
        ticker = self._tickers.pop(job.id, None)
        if ticker is not None:
            await ticker.close()  # no progress edit may land after the final one
        try:
            if NOTE_WITHDRAWN not in job.notes:
                await self._show(job, progress)
            if NOTE_WITHDRAWN in job.notes:
                await self._tell_requester(job, _withdrawn_text(job), progress)
        except Exception as exc:
            self._metrics.discord_error(discord_error_kind(exc))
            raise
        if job.place is JobPlace.SERVER and job.guild_id is not None:
            # The member has the result: a slow or failing log channel must not hold the job open.
            self._in_background(self._log_job(job, job.guild_id))

    async def _log_job(self, job: Job, guild_id: int) -> None:
        try:
            policy = await self._bot.store.policy(guild_id)
        except Exception as exc:
            log.warning("job %d: no log line (the server's policy could not be read: %s)", job.id, describe_error(exc))
            return
        await post_to_log_channel(
            self._bot, guild_id, policy, job_log_line(job, server_texts(self._bot, guild_id, job.guild_locale))
        )

    async def _show(self, job: Job, progress: DeliveryProgress) -> None:
        rendered = render(job)
        if rendered.private:
            await self._tell_requester(job, rendered.content, progress, replace_reply=True)
            return
        as_card = (
            self._bot.settings.result_cards
            and job.state is JobState.SUCCEEDED
            and len(rendered.files) <= MAX_GALLERY_ITEMS
        )
        # Once the bot's own posts show part of the result (in the channel or by DM), the rest
        # follows them, the interaction's token notwithstanding (see INTERACTION_EXHAUSTED).
        late = job.delivered_in_channel or NOTE_LATE_BY_DM in job.notes or not job.token_valid()
        try:
            if not late:
                try:
                    await self._deliver_by_interaction(job, rendered, progress, as_card)
                except discord.HTTPException as exc:
                    if _reply_deleted(job, exc) or exc.code not in INTERACTION_EXHAUSTED:
                        raise
                    log.info("job %d: the interaction can show no more; the rest is posted by the bot", job.id)
                    late = True
            if late:
                await self._deliver_late(job, rendered, progress, as_card)
        except discord.HTTPException as exc:
            if _reply_deleted(job, exc):
                # A moderator deleted the reply: what it showed is not posted again.
                job.note(NOTE_WITHDRAWN, "its reply was deleted")
                return
            if exc.code == REQUEST_ENTITY_TOO_LARGE and _upload_less(job):
                raise  # tried again within the smaller limit
            if 400 <= exc.status < 500 and exc.status != 429:
                # Sent again, it would be refused again: the message itself (a 400), or the
                # channel is gone, the bot may not see or post in it, the member's DMs are
                # closed to it. Final, on either path.
                await self._say_not_shown(job, exc)
                raise Undeliverable(f"Discord refused the bot's post: {exc.status} {exc.code}") from exc
            raise

    async def _say_not_shown(self, job: Job, refused: discord.HTTPException) -> None:
        """Discord refused the job's final state for good: the reply says so, rather than go on
        showing its progress ("Generating…") forever. Only while the interaction can edit it
        and before any of the result is shown; the one line and nothing else, so that it is not
        refused in turn."""
        if job.delivered_parts > 0 or job.message_id is None or not job.token_valid():
            return
        _ = texts(job.locale)
        try:
            await self._webhook(job).edit_message(
                REPLY, content=_(NOT_SHOWN, code=refused.code), embed=None, view=None, attachments=[]
            )
        except discord.HTTPException as exc:
            log.warning("job %d: the reply could not say its result was refused: %s", job.id, describe_error(exc))

    async def _tell_requester(
        self, job: Job, text: str, progress: DeliveryProgress, *, replace_reply: bool = False
    ) -> None:
        """A message only the member who asked sees (while the token lives), in place of the
        public reply when `replace_reply`."""
        if job.token_valid():
            webhook = self._webhook(job)
            try:
                if replace_reply and job.message_id is not None:
                    with contextlib.suppress(discord.NotFound):
                        await webhook.delete_message(REPLY)
                message = await webhook.send(text, ephemeral=True, wait=True)
            except discord.HTTPException as exc:
                # Discord's clock ended the token first, or the channel is gone with its replies.
                if exc.code not in (INVALID_WEBHOOK_TOKEN, UNKNOWN_CHANNEL):
                    raise
            else:
                await progress.posted(job.delivered_parts, message_id=message.id, in_channel=False)
                return
        log.info("job %d: the member can no longer be told privately", job.id)

    async def _deliver_by_interaction(
        self, job: Job, rendered: Rendered, progress: DeliveryProgress, as_card: bool
    ) -> None:
        rendered, groups = _packed(job, rendered, as_card, job.upload_limit, _too_large_where_asked(job))
        webhook = self._webhook(job)
        for index in range(job.delivered_parts, len(groups)):
            shown = self._shown(job, rendered, groups[index], as_card)
            files = [file for _, file in shown]
            if index == 0:
                assert job.message_id is not None
                if as_card:
                    # The reply becomes the card: a components-v2 message has no content or embeds.
                    card = result_card(job, rendered, [(file.filename, image) for image, file in shown])
                    # discord.py's typing forbids content with a LayoutView, but its docs ask for
                    # content=None and embed=None to turn a message into a card (Webhook.edit_message).
                    reply = await webhook.edit_message(  # type: ignore[call-overload]
                        REPLY, content=None, embed=None, attachments=files, view=card
                    )
                else:
                    reply = await webhook.edit_message(
                        REPLY,
                        content=rendered.content,
                        embed=rendered.embed,
                        attachments=files,
                        view=job_view(job, rendered.buttons),
                    )
                # Done again after a crash, an edit of the reply shows the same.
                await progress.posted(
                    1, message_id=job.message_id, in_channel=False, repeatable=True, image_urls=image_urls(reply)
                )
            else:
                # As private as the reply: a followup's privacy is its own, not its interaction's.
                message = await webhook.send(
                    files=files, view=job_view(job, rendered.buttons), ephemeral=job.private_first, wait=True
                )
                await progress.posted(
                    index + 1, message_id=message.id, in_channel=False, image_urls=image_urls(message)
                )

    async def _deliver_late(self, job: Job, rendered: Rendered, progress: DeliveryProgress, as_card: bool) -> None:
        """After the 15-minute token, with the bot's own token (see `_late_in_channel`). Where
        Discord refuses the bot the channel before any of the result is there, the result goes
        to the member's DM instead of being lost: the bot's cache could not tell (a private
        thread it was never added to, which only its members see, is never in it). Its other
        parts then follow it there."""
        in_channel = self._late_in_channel(job, with_files=bool(rendered.files))
        try:
            await self._post_late(job, rendered, progress, as_card, in_channel=in_channel)
        except discord.Forbidden as exc:
            if not in_channel or job.delivered_in_channel:
                raise
            log.info("job %d: Discord refused the bot the channel (%s); the result goes by DM", job.id, exc.code)
            await self._post_late(job, rendered, progress, as_card, in_channel=False)

    async def _post_late(
        self, job: Job, rendered: Rendered, progress: DeliveryProgress, as_card: bool, *, in_channel: bool
    ) -> None:
        """In the channel, a message replying to the original that mentions only the member who
        asked; elsewhere a DM to the member that links the reply it belongs to."""
        _ = texts(job.locale)
        reference: discord.MessageReference | None = None
        mentions = discord.AllowedMentions.none()
        if in_channel:
            channel = cached_channel(self._bot, job.guild_id, job.channel_id) or await self._bot.fetch_channel(
                job.channel_id
            )
            lead = f"<@{job.user_id}>"
            mentions = discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(job.user_id)])
            if job.message_id:
                reference = discord.MessageReference(
                    message_id=job.message_id, channel_id=job.channel_id, fail_if_not_exists=False
                )
        else:
            if job.posts_late_in_channel:  # the bot may not post or read there: its messages are not the channel's
                job.note(NOTE_LATE_BY_DM, True)
            channel = await self._bot.create_dm(discord.Object(job.user_id))
            # "Ready" only where there are images to show: a failure, a cancel or a result
            # withheld whole is news of the edit, not its result.
            lead = _(
                LATE_DM_READY if rendered.files else LATE_DM_NEWS,
                reply=f"https://discord.com/channels/{job.guild_id or '@me'}/{job.channel_id}/{job.message_id}",
            )
        assert isinstance(channel, discord.abc.Messageable)
        if reference is not None and job.message_id and job.delivered_parts == 0:
            # No progress edit may have noticed that a moderator deleted the reply (its text had
            # not changed for a while): Unknown Message here withdraws the job (see _show).
            reply = await channel.fetch_message(job.message_id)
            if _shows_final_state(job, reply, rendered, as_card):
                # The final edit, which Discord carried out as the bot stopped, before the job was
                # stored (an edit of the reply is not: made again, it shows the same).
                log.info("job %d: its reply already shows how it ended; only the rest is posted", job.id)
                await progress.posted(1, message_id=job.message_id, in_channel=False, image_urls=image_urls(reply))
        rendered, groups = _packed(job, rendered, as_card, *self._own_upload_limit(job, in_channel))
        content = f"{lead} {rendered.content}" if in_channel else f"{lead}\n{rendered.content}"
        buttons = rendered.buttons
        if not in_channel and not job.place.personal:
            # A server's job in the member's DM, where a new job would follow the rules for
            # personal use: its Re-roll, Edit and Try again stay in the server (see views.job_for).
            buttons = tuple(action for action in buttons if action not in STARTS_A_JOB)
        # The caller's stays as it was, for a DM after all.
        rendered = dataclasses.replace(rendered, content=content, buttons=buttons)
        # Parts already shown through the interaction (public follow-ups) are not posted again;
        # the first one posted here says what it is.
        start = job.delivered_parts
        for index in range(start, len(groups)):
            shown = self._shown(job, rendered, groups[index], as_card)
            files = [file for _, file in shown]
            first = index == start
            if as_card:
                card = result_card(job, rendered, [(file.filename, image) for image, file in shown])
                message = await channel.send(
                    view=card,
                    files=files,
                    reference=reference,  # type: ignore[arg-type]
                    allowed_mentions=mentions,
                    nonce=_post_nonce(job, index),
                )
            else:
                message = await channel.send(
                    nonce=_post_nonce(job, index),
                    content=rendered.content if first else None,
                    embed=rendered.embed if index == 0 else None,  # type: ignore[arg-type]
                    files=files,
                    view=job_view(job, rendered.buttons),
                    reference=reference,  # type: ignore[arg-type]
                    allowed_mentions=mentions if first else discord.AllowedMentions.none(),
                )
            await progress.posted(
                index + 1, message_id=message.id, in_channel=in_channel, image_urls=image_urls(message)
            )

    def _late_in_channel(self, job: Job, *, with_files: bool = True) -> bool:
        """Whether the result goes to the job's channel after the reply's token, else to the
        member's DM. The channel where the bot may post (`Job.posts_late_in_channel`) and its
        permissions there, as Discord last sent them, let it post the message (images, unless
        `with_files` is false: a failure is only text) and read the channel's history: members
        may use the bot's commands in a channel where the bot itself may not write, and without
        the history the bot can neither reply to the reply (message.mdx, Create Message) nor see
        that a moderator deleted it, whose result is not posted there again. Not where the
        result began to go by DM (`NOTE_LATE_BY_DM`): its other parts are not sent after it to a
        channel that refused it, or that the cache now says the bot may post in."""
        if not job.posts_late_in_channel or NOTE_LATE_BY_DM in job.notes:
            return False
        channel = cached_channel(self._bot, job.guild_id, job.channel_id)
        permissions = own_permissions(channel)
        if permissions is None:
            return True  # not in the cache: Discord decides (its refusal sends the result by DM)
        posts = may_post_images(channel, permissions) if with_files else may_send(channel, permissions)
        return posts and permissions.read_message_history

    def _own_upload_limit(self, job: Job, in_channel: bool) -> tuple[int, str]:
        """What the bot's own post may upload, and the line linking images over it: the server's
        limit (its boosts), or Discord's default in a DM. The interaction's may be higher (a
        member's Nitro) and holds for its reply alone, and for the parts after those it showed:
        they keep its packing, so the rest resumes where it stopped."""
        if job.delivered_parts > 0 and job.posted_message_ids[:1] == [job.message_id]:
            return job.upload_limit, _too_large_where_asked(job)
        if in_channel and job.guild_id is not None:
            guild = self._bot.get_guild(job.guild_id)
            own = guild.filesize_limit if guild else discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES
            return min(own, job.upload_limit), TOO_LARGE_FOR_SERVER
        return min(discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES, job.upload_limit), TOO_LARGE_FOR_DM

    def _webhook(self, job: Job) -> discord.Webhook:
        """The interaction's own webhook, as discord.py builds it (`Interaction.followup`), from
        the stored token: it can edit the reply and send ephemeral follow-ups."""
        payload = {"id": job.application_id, "type": 3, "token": job.interaction_token}
        return discord.Webhook.from_state(data=payload, state=self._bot._connection)  # type: ignore[arg-type]

    @staticmethod
    def _shown(
        job: Job, rendered: Rendered, indexes: list[int], as_card: bool
    ) -> list[tuple[ResultImage, discord.File]]:
        """The images of one message, each with the file that uploads it. On a card the spoiler
        is the gallery item's; a classic message spoilers the attachment itself."""
        shown = []
        for i in indexes:
            image = rendered.files[i]
            if image.data is not None:
                image.data.seek(0)  # a retried delivery sends it again from the start
            source = image.data if image.data is not None else image.path
            assert source is not None, "the runner hands over only images at hand"
            name = attachment_name(job, i + 1, image)
            shown.append((image, discord.File(source, filename=name, spoiler=image.nsfw and not as_card)))
        return shown


def image_urls(message: discord.Message) -> list[str]:
    """The images a posted message shows, at the addresses Discord gave them."""
    return [attachment.url for attachment in image_attachments(message)]


def _packed(
    job: Job, rendered: Rendered, as_card: bool, limit: int, too_large_text: str
) -> tuple[Rendered, list[list[int]]]:
    """The result's messages (image indexes) within the upload limit, and a copy of `rendered`
    whose status line links each image over it instead: each path packs for its own limit."""
    sizes = [image.size for image in rendered.files]
    if as_card:
        # One message: Discord's upload limit is per file (reference.mdx, Uploading Files).
        groups = [[i for i, size in enumerate(sizes) if size <= limit]]
        too_large = [i for i, size in enumerate(sizes) if size > limit]
    else:
        groups, too_large = pack_files(sizes, limit)
    if too_large:
        _ = texts(job.locale)
        links = ", ".join(f"[{_(IMAGE_LINK, number=i + 1)}]({rendered.files[i].url})" for i in too_large)
        rendered = dataclasses.replace(rendered, content=rendered.content + "\n" + _(too_large_text, links=links))
    return rendered, groups or [[]]


def _shows_final_state(job: Job, reply: discord.Message, rendered: Rendered, as_card: bool) -> bool:
    """Whether the reply shows the first message of the job's final state, told by what no
    progress edit gives it: images named as the result's, the card, or the final text."""
    if {a.filename.removeprefix("SPOILER_") for a in reply.attachments} & posted_names(job).keys():
        return True
    if as_card:
        return reply.flags.components_v2
    final, _ = _packed(job, rendered, as_card, job.upload_limit, _too_large_where_asked(job))
    return bool(reply.content) and reply.content == final.content


def _too_large_where_asked(job: Job) -> str:
    """The line linking images over the interaction's upload limit, naming where it was used: a
    server, or a DM (the member's with the bot, a group DM), which has no server's limit."""
    return TOO_LARGE_FOR_SERVER if job.guild_id is not None else TOO_LARGE_FOR_DM


def _post_nonce(job: Job, index: int) -> str:
    """The nonce of the bot's own post of the result's part `index`, the same at every try and
    after a restart: discord.py sends it with enforce_nonce, so Discord returns the message it
    made for an earlier try whose answer was lost (a restart, a dropped connection) instead of
    posting the part again (message.mdx, Create Message). Its reply's id makes it unique (the
    job's, for a job with no reply on record)."""
    return f"{job.message_id}-{index}" if job.message_id is not None else f"job{job.id}-{index}"


def _upload_less(job: Job) -> bool:
    """Discord refused an upload as too large though it fit the limit it was packed for (an
    interaction announces the member's Nitro limit, which a bot's upload does not always get):
    lower the job's limit to Discord's default, then to nothing (every image linked), so the
    next try shows the result rather than none of it. False when there is nothing left to take
    off, or part of the result is shown already (a new packing would not match what it shows)."""
    if job.delivered_parts > 0 or job.upload_limit <= 0:
        return False
    default = discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES
    job.upload_limit = default if job.upload_limit > default else 0
    log.info("job %d: Discord refused the upload as too large; trying within %d bytes", job.id, job.upload_limit)
    return True


def _reply_deleted(job: Job, exc: discord.HTTPException) -> bool:
    """Whether Discord says the reply is gone before any of the result was shown."""
    return exc.code == UNKNOWN_MESSAGE and job.delivered_parts == 0


def _withdrawn_text(job: Job) -> str:
    _ = texts(job.locale)
    if job.state is JobState.SUCCEEDED:
        return _("The reply to your edit was deleted, so its result was not posted.")
    return _("The reply to your edit was deleted, so the edit was stopped.")


def discord_error_kind(exc: BaseException) -> str:
    """A failed call to Discord as one of the metrics' bounded kinds."""
    if isinstance(exc, Undeliverable):
        exc = exc.__cause__ or exc
    if isinstance(exc, discord.RateLimited):
        return "rate_limited"
    if isinstance(exc, discord.Forbidden):
        return "forbidden"
    if isinstance(exc, discord.NotFound):
        return "not_found"
    if isinstance(exc, discord.HTTPException):
        return "http_5xx" if exc.status >= 500 else "http_4xx"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "transport"
