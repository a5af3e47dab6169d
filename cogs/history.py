"""`/kontext-history`: a member's own jobs, privately, newest first. From each one a member can
jump to its result, show it again where they are ("Show here", like Midjourney's /show) and
follow its chain of edits both ways. Moderators may look a member up in their own server.

The list is an ephemeral components-v2 message; its buttons carry who opened it, whose jobs it
shows, the filter and where the page starts, so they keep working after a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import io
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from services.i18n import N_, Texts
from services.input_images import url_expired
from services.job import NOTE_LATE_BY_DM, NOTE_PRIVATE_REPLY, NOTE_SHARED_AS, Job, JobPlace, JobState, ResultImage

from .errors import UserFacingError, place_of, placeholder_withdrawn_on_failure, report
from .intake import is_nsfw_channel
from .render import in_public, plain_text, posted_names, render
from .translation import member_texts
from .views import fetch_result_attachments, is_moderator, moderates, result_card

if TYPE_CHECKING:
    from bot import KontextBot

    Interaction = discord.Interaction[KontextBot]

# Jobs per page: each takes 7 components (a section with its text and thumbnail, a row of
# three buttons), and a message holds at most 40 (components/reference.mdx).
PAGE_SIZE = 4
# A chain shows the job, the one it was made from and the newest jobs made from it.
CHAIN_MADE_FROM_SHOWN = 2
PROMPT_SHOWN = 150
# How long the thumbnails that need their message fetched again may take, all together.
THUMBNAILS_WITHIN = 1.5
# While skipping the jobs of servers the bot left, how many rows one query reads.
FETCH_SIZE = 2 * PAGE_SIZE + 1

OUTCOMES = {
    JobState.SUCCEEDED: N_("✅ Done"),
    JobState.FAILED: N_("❌ Failed"),
    JobState.CANCELLED: N_("🚫 Cancelled"),
}
IN_PROGRESS = N_("⏳ In progress")
NOT_YOURS = N_("This list belongs to someone else: open your own with /kontext-history.")
MODERATORS_ONLY = N_("Only moderators can look at another member's jobs, and only in their server.")
NO_SERVER_GOVERNS = N_("Looking at another member's jobs is for the moderators of a server that added the bot.")


class Scope(enum.StrEnum):
    """Which of the member's jobs a list shows; the value is its mark in the buttons' custom_id."""

    EVERYWHERE = "a"
    SERVER = "s"


@dataclass(frozen=True)
class Lookup:
    """Whose jobs a list shows, to whom, and which of them."""

    owner: int  # who opened it: the only one whose presses count
    subject: int  # whose jobs
    scope: Scope

    @property
    def ids(self) -> str:
        """How a button's custom_id carries it."""
        return f"{self.owner}:{self.subject}:{self.scope.value}"

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Lookup:
        return cls(int(match["owner"]), int(match["subject"]), Scope(match["scope"]))

    def check(self, interaction: Interaction) -> None:
        """The member pressing may use this list: its owner, and for another member's jobs
        still a moderator of this server, one that added the bot (where only members' own
        installs bring it, no server governs their jobs, and its moderators are none of theirs)."""
        if interaction.user.id != self.owner:
            raise UserFacingError(NOT_YOURS)
        if self.subject == self.owner:
            return
        if not (interaction.guild_id is not None and self.scope is Scope.SERVER and is_moderator(interaction)):
            raise UserFacingError(MODERATORS_ONLY)
        if place_of(interaction) is not JobPlace.SERVER:
            raise UserFacingError(NO_SERVER_GOVERNS)

    def shows(self, interaction: Interaction, job: Job) -> bool:
        """Whether the list may show `job` to the member asking: the subject's, in this server for
        a server list, and only in servers the bot is still in (personal use, DMs included, is the
        member's own, and no moderator's to look up: a job made in the server before it added the
        bot, too). A moderator looking at another member sees only the jobs of channels they
        moderate themself: Manage Messages does not open a staff-only channel's prompts and
        images, and Manage Messages in one channel (its own moderator) not the other channels'."""
        bot = interaction.client
        if job.user_id != self.subject:
            return False
        if self.subject != self.owner and (
            job.place is not JobPlace.SERVER or not moderates_channel_of(interaction, job)
        ):
            return False
        if self.scope is Scope.SERVER and job.guild_id != server_of(self, interaction):
            return False
        return job.place.personal or (job.guild_id is not None and still_in(bot, job.guild_id))


def moderates_channel_of(interaction: Interaction, job: Job) -> bool:
    """Whether the member asking may see the job's channel in this server and moderates it: their
    roles and the channel's overwrites as the bot's cache has them (a thread as its parent; one
    archived since, which discord.py keeps out of its cache, as the parent the job recorded). A
    private thread is seen only by its members and those who may manage threads
    (resources/channel.mdx, Channel Types), and the bot does not learn who else joined it: it
    takes Manage Threads. A channel the cache does not know (deleted, or the thread of a job from
    before its parent was recorded) counts as not moderated."""
    guild, member = interaction.guild, interaction.user
    if guild is None or not isinstance(member, discord.Member):
        return False
    channel = guild.get_channel_or_thread(job.channel_id)
    if channel is None and job.parent_channel_id is not None:
        channel = guild.get_channel(job.parent_channel_id)
    if channel is None:
        return False
    try:
        permissions = channel.permissions_for(member)
    except discord.ClientException:  # a thread whose parent channel is not cached
        return False
    private_thread = job.private_thread or (isinstance(channel, discord.Thread) and channel.is_private())
    if private_thread and not permissions.manage_threads:
        return False
    return permissions.view_channel and moderates(permissions)


def still_in(bot: KontextBot, guild_id: int) -> bool:
    """Whether the bot is still in a server, as far as this process can tell: it knows only the
    servers on its own shards (SHARD_IDS), so one on another process's shard counts as kept."""
    if bot.shard_count is not None and (guild_id >> 22) % bot.shard_count not in bot.shards:
        return True
    return bot.get_guild(guild_id) is not None


@dataclass
class Page:
    jobs: list[Job]
    newer: bool  # a page before it exists
    older: bool  # a page after it exists


def server_of(lookup: Lookup, interaction: Interaction) -> int | None:
    return interaction.guild_id if lookup.scope is Scope.SERVER else None


async def load_page(interaction: Interaction, lookup: Lookup, anchor: Job | None, newer: bool) -> Page:
    """The page after `anchor` (None: the first), or with `newer` the page before it. Jobs the
    list may not show (servers the bot left) are skipped, so a page may take more than one read."""
    bot = interaction.client
    guild_id = server_of(lookup, interaction)
    found: list[Job] = []
    cursor = (anchor.created_at, anchor.id) if anchor is not None else None
    while len(found) <= PAGE_SIZE:
        batch = await bot.store.member_jobs(
            lookup.subject, guild_id=guild_id, after=cursor, newer=newer, limit=FETCH_SIZE
        )
        found += [job for job in batch if lookup.shows(interaction, job)]
        if len(batch) < FETCH_SIZE:
            break
        cursor = (batch[-1].created_at, batch[-1].id)
    more = len(found) > PAGE_SIZE
    jobs = found[:PAGE_SIZE]
    if not newer:
        return Page(jobs, newer=anchor is not None, older=more)
    if not more:  # walked back to the newest jobs: that is the first page
        return await load_page(interaction, lookup, None, newer=False)
    return Page(jobs[::-1], newer=True, older=True)


def _bot_reads_result(job: Job) -> bool:
    """Whether the bot can fetch the messages showing the result in its channel: posted where the
    bot posts, in that channel (not a late result the bot could post only in the member's DM),
    and public (a private first result not shared is ephemeral: only its interaction sees it)."""
    in_channel = job.place.bot_can_post and NOTE_LATE_BY_DM not in job.notes
    return in_channel and (not job.private_first or NOTE_SHARED_AS in job.notes)


async def thumbnail(bot: KontextBot, job: Job, now: float) -> str | None:
    """The job's first image as Discord serves it: the stored URL while it lasts, else from the
    result's message fetched again; None if it is gone."""
    if job.state is not JobState.SUCCEEDED:
        return None
    urls = job.posted_image_urls
    if urls and not url_expired(urls[0], now):
        return urls[0]
    try:
        attachments = await fetch_result_attachments(bot, job)
    except discord.HTTPException:
        return None
    if not attachments:
        return None
    # Kept for the next look, so a result's message is fetched about once a day at most.
    await bot.store.set_posted_image_urls(job.id, [a.url for a in attachments])
    return attachments[0].url


async def thumbnails(bot: KontextBot, jobs: list[Job]) -> list[str | None]:
    """Each job's thumbnail, those that need a message fetched again given at most
    THUMBNAILS_WITHIN seconds together: the list must answer within Discord's 3 seconds."""
    now = time.time()
    tasks = [asyncio.ensure_future(thumbnail(bot, job, now)) for job in jobs]
    if tasks:
        _done, late = await asyncio.wait(tasks, timeout=THUMBNAILS_WITHIN)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    return [
        task.result() if task.done() and not task.cancelled() and task.exception() is None else None for task in tasks
    ]


def jump_url(job: Job) -> str | None:
    if job.message_id is None:
        return None
    return f"https://discord.com/channels/{job.guild_id or '@me'}/{job.channel_id}/{job.message_id}"


def entry_text(job: Job, made_from: int, _: Texts) -> str:
    outcome = OUTCOMES.get(job.state, IN_PROGRESS)
    if job.guild_id is not None:
        where = f"<#{job.channel_id}>"
    else:
        where = _("a DM") if job.place is JobPlace.BOT_DM else _("a group DM")
    lines = [f"**#{job.id}** · {_(outcome)} · <t:{int(job.created_at)}:R> · {where}"]
    lines.append("> " + (plain_text(job.shown_prompt, PROMPT_SHOWN) or "…"))
    notes = []
    if job.recipe is not None:
        notes.append(_("recipe “{name}”", name=plain_text(job.recipe["name"])))
    if job.parent_job_id is not None:
        notes.append(_("from job #{id}", id=job.parent_job_id))
    if made_from:
        notes.append(_.ngettext("{count} job made from it", "{count} jobs made from it", made_from))
    if notes:
        lines.append("-# " + " · ".join(notes))
    return "\n".join(lines)


def entry_items(job: Job, thumb: str | None, made_from: int, lookup: Lookup, _: Texts) -> list[discord.ui.Item[Any]]:
    text: discord.ui.TextDisplay[Any] = discord.ui.TextDisplay(entry_text(job, made_from, _))
    head: discord.ui.Item[Any] = (
        discord.ui.Section(
            text,
            accessory=discord.ui.Thumbnail(
                thumb,
                description=_("job #{id}", id=job.id),
                spoiler=job.result is not None and any(image.nsfw for image in job.result.images),
            ),
        )
        if thumb is not None
        else text
    )
    buttons: list[discord.ui.Item[Any]] = []
    if lookup.owner == lookup.subject and job.state is JobState.SUCCEEDED:
        buttons.append(JobEntryButton(EntryAction.SHOW, lookup, job.id, _))
    url = jump_url(job)
    if url is not None:
        buttons.append(discord.ui.Button(label=_("Open"), emoji="↗️", url=url))
    if job.parent_job_id is not None or made_from:
        buttons.append(JobEntryButton(EntryAction.CHAIN, lookup, job.id, _))
    return [head, discord.ui.ActionRow(*buttons)] if buttons else [head]


async def history_card(
    bot: KontextBot, lookup: Lookup, title: str, jobs: list[Job], nav: list[discord.ui.Item[Any]], _: Texts
) -> discord.ui.LayoutView:
    thumbs = await thumbnails(bot, jobs)
    made_from = await bot.store.made_from_counts([job.id for job in jobs], lookup.subject)
    items: list[discord.ui.Item[Any]] = [discord.ui.TextDisplay(title)]
    if not jobs:
        items.append(discord.ui.TextDisplay(_("No jobs yet. Start one with /kontext.")))
    for job, thumb in zip(jobs, thumbs, strict=True):
        items += entry_items(job, thumb, made_from.get(job.id, 0), lookup, _)
    if nav:
        items += [discord.ui.Separator(), discord.ui.ActionRow(*nav)]
    card = discord.ui.LayoutView(timeout=None)
    card.add_item(discord.ui.Container(*items))
    return card


def list_title(lookup: Lookup, _: Texts) -> str:
    if lookup.subject != lookup.owner:
        return "### " + _("Jobs of <@{member}> in this server", member=lookup.subject)
    if lookup.scope is Scope.SERVER:
        return "### " + _("Your Kontext jobs in this server")
    return "### " + _("Your Kontext jobs")


async def list_card(bot: KontextBot, lookup: Lookup, interaction: Interaction, page: Page) -> discord.ui.LayoutView:
    _ = member_texts(interaction)
    first, last = (page.jobs[0].id, page.jobs[-1].id) if page.jobs else (0, 0)
    nav: list[discord.ui.Item[Any]] = [
        PageButton(lookup, newer=True, anchor=first, label=_("Previous"), disabled=not page.newer),
        PageButton(lookup, newer=False, anchor=last, label=_("Next"), disabled=not page.older),
    ]
    if lookup.owner == lookup.subject and interaction.guild_id is not None:
        other = Scope.EVERYWHERE if lookup.scope is Scope.SERVER else Scope.SERVER
        label = _("Everywhere") if other is Scope.EVERYWHERE else _("This server only")
        nav.append(PageButton(dataclasses.replace(lookup, scope=other), newer=False, anchor=0, label=label))
    return await history_card(bot, lookup, list_title(lookup, _), page.jobs, nav, _)


async def chain_card(bot: KontextBot, lookup: Lookup, interaction: Interaction, job: Job) -> discord.ui.LayoutView:
    """A job with the one it was made from above it and the newest made from it below."""
    _ = member_texts(interaction)
    source = await bot.store.get_job(job.parent_job_id) if job.parent_job_id is not None else None
    made = await bot.store.jobs_made_from(job.id, lookup.subject, limit=CHAIN_MADE_FROM_SHOWN)
    shown = [j for j in (source, job, *made) if j is not None and lookup.shows(interaction, j)]
    title = "### " + _("The chain of job #{id}", id=job.id)
    if source is not None and source not in shown:
        title += "\n-# " + _("Made from job #{id}, which is not yours or no longer shown.", id=source.id)
    back = PageButton(lookup, newer=False, anchor=0, label=_("Back to the list"))
    return await history_card(bot, lookup, title, shown, [back], _)


class PageButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"kh:page:(?P<owner>[0-9]+):(?P<subject>[0-9]+):(?P<scope>[as]):(?P<dir>[on]):(?P<anchor>[0-9]+)",
):
    """Previous, Next and the filter: the page older (`o`) or newer (`n`) than job `anchor`
    (0: the first page)."""

    def __init__(self, lookup: Lookup, *, newer: bool, anchor: int, label: str = "", disabled: bool = False) -> None:
        direction = "n" if newer else "o"
        super().__init__(
            discord.ui.Button(
                label=label or "…",
                style=discord.ButtonStyle.secondary,
                custom_id=f"kh:page:{lookup.ids}:{direction}:{anchor}",
                disabled=disabled,
            )
        )
        self.lookup = lookup
        self.newer = newer
        self.anchor = anchor

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # typed with the bot's own interactions
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> PageButton:
        return cls(Lookup.from_match(match), newer=match["dir"] == "n", anchor=int(match["anchor"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]
        try:
            self.lookup.check(interaction)
            bot = interaction.client
            anchor = await bot.store.get_job(self.anchor) if self.anchor else None
            page = await load_page(interaction, self.lookup, anchor, self.newer)
            card = await list_card(bot, self.lookup, interaction, page)
            await interaction.response.edit_message(view=card)
        except Exception as exc:
            await report(interaction, exc)


class EntryAction(enum.StrEnum):
    SHOW = "show"
    CHAIN = "chain"


ENTRY_LABELS = {EntryAction.SHOW: (N_("Show here"), "📌"), EntryAction.CHAIN: (N_("Chain"), "🔗")}


class JobEntryButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"kh:(?P<action>show|chain):(?P<owner>[0-9]+):(?P<subject>[0-9]+):(?P<scope>[as]):(?P<job_id>[0-9]+)",
):
    """A job's own buttons in a list: post its result here again, or show its chain."""

    def __init__(self, action: EntryAction, lookup: Lookup, job_id: int, _: Texts | None = None) -> None:
        label, emoji = ENTRY_LABELS[action]
        super().__init__(
            discord.ui.Button(
                label=_(label) if _ is not None else label,
                emoji=emoji,
                style=discord.ButtonStyle.primary if action is EntryAction.SHOW else discord.ButtonStyle.secondary,
                custom_id=f"kh:{action.value}:{lookup.ids}:{job_id}",
            )
        )
        self.action = action
        self.lookup = lookup
        self.job_id = job_id

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # typed with the bot's own interactions
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> JobEntryButton:
        return cls(EntryAction(match["action"]), Lookup.from_match(match), int(match["job_id"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]
        try:
            self.lookup.check(interaction)
            bot = interaction.client
            job = await bot.store.get_job(self.job_id)
            if job is None or not self.lookup.shows(interaction, job):
                raise UserFacingError(N_("That job is not in this list any more."))
            if self.action is EntryAction.CHAIN:
                await interaction.response.edit_message(view=await chain_card(bot, self.lookup, interaction, job))
            else:
                await show_here(interaction, job)
        except Exception as exc:
            await report(interaction, exc)


# -- Show here ----------------------------------------------------------------------------------


async def result_files(
    bot: KontextBot, job: Job, images: list[ResultImage], limit: int
) -> list[tuple[discord.File, ResultImage]]:
    """The result's images (those of `images` still on Discord and within `limit`) downloaded
    again from Discord's CDN, named as the bot first posted them: the original messages fetched
    afresh where the bot can read them, else the addresses stored when they were posted. Where
    the bot can read the result, messages gone are a result deleted (by its member, or by a
    moderator): its images are not posted again from the addresses stored."""
    names = posted_names(job)
    readable = _bot_reads_result(job)
    try:
        fetched = await fetch_result_attachments(bot, job)
    except discord.Forbidden:  # the bot may not read the result again: it is not gone for that
        fetched, readable = [], False
    sources: list[tuple[str, str, int | None]] = [(a.filename.removeprefix("SPOILER_"), a.url, a.size) for a in fetched]
    if not sources and not readable:
        sources = [(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1], url, None) for url in job.posted_image_urls]
    files = []
    for name, url, size in sources:
        image = names.get(name.removeprefix("SPOILER_"))
        if image is None or image not in images or (size or image.size) > limit:
            continue
        try:
            data = await bot.http.get_from_cdn(url)
        except (discord.NotFound, discord.Forbidden):
            continue  # expired, or the message is gone
        files.append((discord.File(io.BytesIO(data), filename=name), image))
    return files


async def show_here(interaction: Interaction, job: Job) -> None:
    """Post the job's result again in this channel, with its buttons, as the member would have
    been allowed to ask for it here (the place's policy: channels, role, safety maximum)."""
    bot = interaction.client
    _ = member_texts(interaction)
    await bot.intake.check_showing(interaction, job.edit.options.safety_tolerance)
    here = in_public(job, channel_nsfw=is_nsfw_channel(interaction.channel))
    rendered = render(here)  # images flagged by the safety checker only where they may be seen
    if job.state is not JobState.SUCCEEDED or not rendered.files:
        raise UserFacingError(N_("Job #{id} has no images that can be shown here."), id=job.id)
    if all(image.size > interaction.filesize_limit for image in rendered.files):
        raise UserFacingError(
            N_("The images of job #{id} are over the upload limit here: open the original instead."), id=job.id
        )
    callback = await interaction.response.defer(thinking=True)
    if callback is not None and callback.is_ephemeral():
        # Where the server keeps the replies of apps it has not added private, so is this copy.
        here = dataclasses.replace(here, notes={**here.notes, NOTE_PRIVATE_REPLY: True})
        rendered = render(here)
    async with placeholder_withdrawn_on_failure(interaction):
        files = await result_files(bot, job, rendered.files, interaction.filesize_limit)
        if not files:
            raise UserFacingError(
                N_("Discord no longer has the images of job #{id} (the message was deleted or cannot be read)."),
                id=job.id,
            )
        if missing := len(rendered.files) - len(files):
            rendered.content += "\n" + _.ngettext(
                "📦 {count} image could not be shown again here (over the upload limit here, or gone "
                "from Discord): the original has it.",
                "📦 {count} images could not be shown again here (over the upload limit here, or gone "
                "from Discord): the original has them.",
                missing,
            )
        rendered.content += "\n-# " + _("📌 Shown again by <@{member}>", member=interaction.user.id)
        if (url := jump_url(job)) is not None:
            rendered.content += " · " + _("[original]({url})", url=url)
        card = result_card(here, rendered, [(file.filename or "", image) for file, image in files])
        message = await interaction.edit_original_response(view=card, attachments=[file for file, _image in files])
    await bot.store.record_shown(
        message.id, job.id, channel_id=interaction.channel_id or 0, by_user=interaction.user.id, now=time.time()
    )


class History(commands.Cog):
    def __init__(self, bot: KontextBot) -> None:
        self.bot = bot

    @app_commands.command(
        name="kontext-history", description=N_("Your recent Kontext jobs: find, show and continue them")
    )
    @app_commands.describe(
        where=N_("Jobs from this server only, or from everywhere (default)"),
        member=N_("Moderators: look at a member's jobs in this server"),
    )
    @app_commands.choices(
        where=[
            app_commands.Choice(name=N_("everywhere"), value=Scope.EVERYWHERE.value),
            app_commands.Choice(name=N_("this server"), value=Scope.SERVER.value),
        ]
    )
    async def history(
        self, interaction: Interaction, where: str | None = None, member: discord.User | None = None
    ) -> None:
        """Privately: the member's jobs, newest first; a moderator's lookup stays in their server."""
        subject = member.id if member is not None else interaction.user.id
        scope = Scope(where) if where else Scope.EVERYWHERE
        if subject != interaction.user.id or interaction.guild_id is None:
            scope = Scope.SERVER if interaction.guild_id is not None else Scope.EVERYWHERE
        lookup = Lookup(interaction.user.id, subject, scope)
        lookup.check(interaction)
        page = await load_page(interaction, lookup, None, newer=False)
        card = await list_card(self.bot, lookup, interaction, page)
        await interaction.response.send_message(view=card, ephemeral=True)


async def setup(bot: KontextBot) -> None:
    bot.add_dynamic_items(PageButton, JobEntryButton)
    await bot.add_cog(History(bot))
