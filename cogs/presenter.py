"""Shows jobs in Discord: throttled progress edits, then the final delivery.

The runner reports changes; this listener decides what reaches Discord. Progress edits are
best-effort and only sent when the rendered message differs from the one shown; delivery is
awaited and raises, so the runner retries it until it is shown (or raises Undeliverable when
Discord says it never will be).

Where a result goes: the interaction's reply while its 15-minute token lives, else a channel
message that replies to it. A reply that is gone (a moderator deleted it) is not posted again:
the job is withdrawn and the member told privately.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import discord

from services.job import NOTE_WITHDRAWN, Job, JobState
from services.metrics import Metrics
from services.redact import describe_error
from services.runner import DeliveryProgress, Undeliverable

from .modlog import post_to_log_channel
from .render import Rendered, attachment_name, job_log_line, pack_files, render
from .views import job_view

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)

# Discord answers 401 with this code once an interaction token is older than 15 minutes.
INVALID_WEBHOOK_TOKEN = 50027
# The message is gone (deleted).
UNKNOWN_MESSAGE = 10008
# All replies together get at most this many progress edits per second.
MAX_PROGRESS_EDITS_PER_SECOND = 20


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
        on_reply_gone: Callable[[], None],
        metrics: Metrics,
        held: Callable[[], bool],
    ) -> None:
        self._job = job
        self._webhook = webhook
        self._pace = pace
        self._on_reply_gone = on_reply_gone
        self._metrics = metrics
        # Whether this process still drives the job (it may have lost it to another while paused).
        self._held = held
        self._shown: Rendered | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"progress-{job.id}")

    def poke(self) -> None:
        """The job changed; show it when the next edit is due."""
        self._changed.set()

    async def _run(self) -> None:
        # The deferred "thinking…" stands for the first interval, so a job that is submitted
        # within it goes straight to its queue position.
        await asyncio.sleep(self._pace())
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self._job.state.is_final or not self._held():
                return  # the final state is deliver()'s to show, with its files
            try:
                rendered = render(self._job)
                if self._shown is not None and rendered.key() == self._shown.key():
                    continue
                await self._edit(rendered)
                self._shown = rendered
                self._metrics.progress_edit()
            except discord.NotFound as exc:
                if exc.code == UNKNOWN_MESSAGE:
                    self._on_reply_gone()
                    return
                self._metrics.discord_error(discord_error_kind(exc))
                log.warning("job %d: progress edit failed: %s", self._job.id, describe_error(exc))
            except Exception as exc:
                self._metrics.discord_error(discord_error_kind(exc))
                log.warning("job %d: progress edit failed: %s", self._job.id, describe_error(exc))
            await asyncio.sleep(self._pace())

    async def _edit(self, rendered: Rendered) -> None:
        # Only what changed is sent: Discord keeps the fields an edit leaves out.
        changes: dict[str, Any] = {"content": rendered.content}
        shown = self._shown
        if shown is None or rendered.embed.to_dict() != shown.embed.to_dict():
            changes["embed"] = rendered.embed
        if shown is None or rendered.buttons != shown.buttons:
            changes["view"] = job_view(self._job, rendered.buttons)
        assert self._job.message_id is not None, "a job is started once its reply exists"
        await self._webhook.edit_message(self._job.message_id, **changes)

    def stop(self) -> None:
        self._task.cancel()

    async def close(self) -> None:
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
        self._withdrawals: set[asyncio.Task[None]] = set()

    def job_changed(self, job: Job) -> None:
        if job.state.is_final or not job.token_valid() or NOTE_WITHDRAWN in job.notes:
            return  # the final state is shown by deliver(); an expired token cannot edit
        ticker = self._tickers.get(job.id)
        if ticker is None:
            ticker = self._tickers[job.id] = ProgressTicker(
                job,
                self._webhook(job),
                self._progress_pace,
                lambda: self._reply_gone(job),
                self._metrics,
                held=lambda: self._bot.store.holds(job),
            )
        ticker.poke()

    def job_dropped(self, job: Job) -> None:
        ticker = self._tickers.pop(job.id, None)
        if ticker is not None:
            ticker.stop()

    def _progress_pace(self) -> float:
        """Seconds between two progress edits of one reply: EDIT_INTERVAL, stretched when many
        jobs are in progress so the bot's own work stays bounded. Final results never wait."""
        return max(self._edit_interval, len(self._tickers) / MAX_PROGRESS_EDITS_PER_SECOND)

    def _reply_gone(self, job: Job) -> None:
        log.info("job %d: its reply was deleted; the job is withdrawn", job.id)
        task = asyncio.create_task(self._bot.runner.withdraw(job.id, "its reply was deleted"))
        self._withdrawals.add(task)
        task.add_done_callback(self._withdrawals.discard)

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
        if job.guild_id is not None:
            policy = await self._bot.store.policy(job.guild_id)
            await post_to_log_channel(self._bot, policy, job_log_line(job))

    async def _show(self, job: Job, progress: DeliveryProgress) -> None:
        rendered = render(job)
        if rendered.private:
            await self._tell_requester(job, rendered.content, progress, replace_reply=True)
            return
        groups, too_large = pack_files([image.size for image in rendered.files], job.upload_limit)
        if too_large:
            links = ", ".join(f"[image {i + 1}]({rendered.files[i].url})" for i in too_large)
            rendered.content = f"{rendered.content}\n📦 Too large for this server's upload limit: {links}"
        groups = groups or [[]]
        in_channel = job.delivered_in_channel or not job.token_valid()
        if not in_channel:
            try:
                await self._deliver_by_interaction(job, rendered, groups, progress)
            except discord.HTTPException as exc:
                if exc.code == UNKNOWN_MESSAGE and job.delivered_parts == 0:
                    # A moderator deleted the reply: what it showed is not posted again.
                    job.notes = {**job.notes, NOTE_WITHDRAWN: "its reply was deleted"}
                    return
                if exc.code not in (INVALID_WEBHOOK_TOKEN, UNKNOWN_MESSAGE):
                    raise
                log.info("job %d: the token expired; posting the rest in the channel", job.id)
                in_channel = True
        if in_channel:
            try:
                await self._deliver_in_channel(job, rendered, groups, progress)
            except discord.HTTPException as exc:
                if 400 <= exc.status < 500 and exc.status != 429:
                    # The channel is gone, or the bot may not see or post in it: final.
                    raise Undeliverable(f"Discord refused the channel post: {exc.status} {exc.code}") from exc
                raise

    async def _tell_requester(
        self, job: Job, text: str, progress: DeliveryProgress, *, replace_reply: bool = False
    ) -> None:
        """A message only the member who asked sees (while the token lives), in place of the
        public reply when `replace_reply`."""
        if not job.token_valid():
            log.info("job %d: too late to tell the member privately", job.id)
            return
        webhook = self._webhook(job)
        if replace_reply and job.message_id is not None:
            with contextlib.suppress(discord.NotFound):
                await webhook.delete_message(job.message_id)
        message = await webhook.send(text, ephemeral=True, wait=True)
        await progress.posted(job.delivered_parts, message_id=message.id, in_channel=False)

    async def _deliver_by_interaction(
        self, job: Job, rendered: Rendered, groups: list[list[int]], progress: DeliveryProgress
    ) -> None:
        webhook = self._webhook(job)
        view = job_view(job, rendered.buttons)
        for index in range(job.delivered_parts, len(groups)):
            files = self._files(job, rendered, groups[index])
            if index == 0:
                assert job.message_id is not None
                await webhook.edit_message(
                    job.message_id, content=rendered.content, embed=rendered.embed, attachments=files, view=view
                )
                # Done again after a crash, an edit of the reply shows the same.
                await progress.posted(1, message_id=job.message_id, in_channel=False, repeatable=True)
            else:
                message = await webhook.send(files=files, view=view, wait=True)
                await progress.posted(index + 1, message_id=message.id, in_channel=False)

    async def _deliver_in_channel(
        self, job: Job, rendered: Rendered, groups: list[list[int]], progress: DeliveryProgress
    ) -> None:
        """After the 15-minute token: a channel message replying to the original, which mentions
        only the member who asked."""
        channel = self._bot.get_channel(job.channel_id) or await self._bot.fetch_channel(job.channel_id)
        assert isinstance(channel, discord.abc.Messageable)
        reference = (
            discord.MessageReference(message_id=job.message_id, channel_id=job.channel_id, fail_if_not_exists=False)
            if job.message_id
            else None
        )
        only_requester = discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(job.user_id)])
        content = f"<@{job.user_id}> {rendered.content}"
        view = job_view(job, rendered.buttons)
        # Parts already shown through the interaction (public follow-ups) are not posted again.
        for index in range(job.delivered_parts, len(groups)):
            message = await channel.send(
                content=content if index == 0 else None,
                embed=rendered.embed if index == 0 else None,  # type: ignore[arg-type]
                files=self._files(job, rendered, groups[index]),
                view=view,
                reference=reference,  # type: ignore[arg-type]
                allowed_mentions=only_requester if index == 0 else discord.AllowedMentions.none(),
            )
            await progress.posted(index + 1, message_id=message.id, in_channel=True)

    def _webhook(self, job: Job) -> discord.Webhook:
        """The interaction's own webhook, as discord.py builds it (`Interaction.followup`), from
        the stored token: it can edit the reply and send ephemeral follow-ups."""
        payload = {"id": job.application_id, "type": 3, "token": job.interaction_token}
        return discord.Webhook.from_state(data=payload, state=self._bot._connection)  # type: ignore[arg-type]

    @staticmethod
    def _files(job: Job, rendered: Rendered, indexes: list[int]) -> list[discord.File]:
        files = []
        for i in indexes:
            image = rendered.files[i]
            if image.data is not None:
                image.data.seek(0)  # a retried delivery sends it again from the start
            source = image.data if image.data is not None else image.path
            assert source is not None, "the runner hands over only images at hand"
            files.append(discord.File(source, filename=attachment_name(job, i + 1, image), spoiler=image.nsfw))
        return files


def _withdrawn_text(job: Job) -> str:
    if job.state is JobState.SUCCEEDED:
        return "The reply to your edit was deleted, so its result was not posted."
    return "The reply to your edit was deleted, so the edit was stopped."


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
