"""Buttons that act on jobs, and the result card that carries them. Every button's custom_id
carries its action, job id and key (`kontext:<action>:<job id>:<key>`), so buttons keep working
after a restart, on a classic message or inside a card."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord

from services.fal_queue import FalError
from services.flux_kontext import KontextEdit
from services.i18n import N_, texts
from services.job import NOTE_SHARED_AS, Job, JobPlace, JobState, ResultImage
from services.runner import CancelOutcome

from .errors import UserFacingError, place_of, placeholder_withdrawn_on_failure, report, tell
from .inputs import image_url, is_image_attachment
from .intake import is_nsfw_channel, requester_in
from .modal import PromptModal, answer_of, form_id, start_edit
from .render import STARTS_A_JOB, JobAction, Rendered, in_public, posted_names, render
from .translation import member_texts

log = logging.getLogger(__name__)

# The server channels a result is posted in.
ServerChannel = discord.TextChannel | discord.Thread | discord.VoiceChannel | discord.StageChannel

# Discord's limit of items in one Media Gallery (components/reference.mdx).
MAX_GALLERY_ITEMS = 10

# How long a Re-roll or Try again looks for its inputs again (see `inputs_found_again`): the
# member's interaction is answered after it, within Discord's 3 seconds.
FIND_AGAIN_SECONDS = 1.5
# The ✏️ Edit form's custom_id: the job it edits and its key, as on the job's buttons.
EDIT_FORM = re.compile(r"kontext:form:(?P<job_id>[0-9]+)(?::(?P<key>[0-9a-f]+))?")

if TYPE_CHECKING:
    from bot import KontextBot

    Interaction = discord.Interaction[KontextBot]


def is_moderator(interaction: Interaction) -> bool:
    """Whether the member acting moderates the interaction's channel: Discord sends their
    permissions there, the channel's overwrites included."""
    return moderates(interaction.permissions)


def moderates(permissions: discord.Permissions) -> bool:
    """Whether a member's permissions in a channel make them a moderator of it."""
    return permissions.manage_messages or permissions.manage_guild


def cached_channel(bot: discord.Client, guild_id: int | None, channel_id: int) -> object | None:
    """A channel or thread from discord.py's cache, looked up in its server: `Client.get_channel`
    searches every server the bot is in, a cost that grows with them (0.5 ms at 2,500)."""
    if guild_id is None:
        return bot.get_channel(channel_id)  # a DM: found before any server is searched
    guild = bot.get_guild(guild_id)
    return guild.get_channel_or_thread(channel_id) if guild is not None else None


def own_permissions(channel: object) -> discord.Permissions | None:
    """The bot's own permissions in a server channel, as Discord last sent them (its roles and
    the channel's overwrites); None where the bot's cache cannot tell."""
    if not isinstance(channel, (discord.abc.GuildChannel, discord.Thread)):
        return None
    try:
        return channel.permissions_for(channel.guild.me)
    except discord.ClientException:  # a thread whose parent channel is not cached
        return None


def may_send(channel: object, permissions: discord.Permissions) -> bool:
    """Whether `permissions` let their holder see the channel and post in it (message.mdx,
    Create Message; permissions.mdx: SEND_MESSAGES does not cover threads)."""
    sends = permissions.send_messages_in_threads if isinstance(channel, discord.Thread) else permissions.send_messages
    return permissions.view_channel and sends


def may_post_images(channel: object, permissions: discord.Permissions) -> bool:
    """Whether the bot may post a message with images in the channel (ATTACH_FILES uploads)."""
    return may_send(channel, permissions) and permissions.attach_files


def may_ask_here(interaction: Interaction) -> bool:
    """Whether the member could ask for a job where they press a button: in a server channel,
    post in it and use its app commands, as Discord sends their permissions there (overwrites
    included). Buttons stay pressable without either (discord-api-docs#7900), so a member muted
    there could otherwise have the bot post for them. A DM carries no permissions to check."""
    if interaction.guild_id is None:
        return True
    permissions = interaction.permissions
    return may_send(interaction.channel, permissions) and permissions.use_application_commands


def image_attachments(message: discord.Message | None) -> list[discord.Attachment]:
    return [a for a in (message.attachments if message else []) if is_image_attachment(a)]


async def fetch_result_attachments(bot: KontextBot, job: Job) -> list[discord.Attachment]:
    """The images on the messages that show the job's result, fetched again (with URLs Discord
    signs afresh) where the bot can read them: not where only the member's interaction could post.
    Messages deleted are skipped; discord.Forbidden where the bot may not read the channel's
    history (its role, the channel's overwrites): the result is there, unread."""
    if not job.place.bot_can_post:
        return []
    channel = bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
    found: list[discord.Attachment] = []
    for message_id in job.posted_message_ids:
        with contextlib.suppress(discord.NotFound):
            message = await channel.fetch_message(message_id)
            found += [a for a in message.attachments if is_image_attachment(a)]
    return found


# The presses being handled now, by action, job and member: a new job is started, a share
# recorded, only at the end of its press, so a second press meanwhile (a double click, a double
# tap) is told instead of doing it twice. In-process is enough: both presses of one message come
# through the same gateway shard.
_pressed: set[tuple[JobAction, int, int]] = set()

ALREADY_STARTING = N_("This edit is already being started from your first press.")


@contextlib.contextmanager
def one_press_at_a_time(interaction: Interaction, job: Job, action: JobAction, refusal: str) -> Iterator[None]:
    """Do `action` to `job` for this member once at a time, telling a press meanwhile `refusal`.
    Pressed again once the first is done, it is done again (re-rolling many times is the point)."""
    pressed = (action, job.id, interaction.user.id)
    if pressed in _pressed:
        raise UserFacingError(refusal)
    _pressed.add(pressed)
    try:
        yield
    finally:
        _pressed.discard(pressed)


# -- what each button does --------------------------------------------------------------------


async def cancel_job(interaction: Interaction, job: Job) -> None:
    _ = member_texts(interaction)
    await interaction.response.defer()  # an update of the message pressed on: its token edits it
    on_reply = interaction.message is not None and interaction.message.id == job.message_id
    reply_token = (interaction.token, interaction.created_at.timestamp()) if on_reply else None
    try:
        outcome = await interaction.client.runner.cancel(job.id, interaction.user.id, reply_token=reply_token)
    except FalError:
        raise UserFacingError(N_("fal.ai did not answer the cancel request. Please try again in a moment.")) from None
    if outcome is CancelOutcome.TOO_LATE:
        await tell(interaction, _("Too late to cancel: this edit has already finished."))
    elif outcome is CancelOutcome.REQUESTED:
        await tell(interaction, _("Cancelling: the edit is being handed to fal right now and will be stopped there."))
    elif outcome is CancelOutcome.FORWARDED:
        await tell(interaction, _("Cancelling: this edit will be stopped in a moment."))
    elif outcome is CancelOutcome.STARTED:
        await tell(
            interaction,
            _(
                "FLUX.1 Kontext had already started this edit. fal passes the cancel on, but a started edit is "
                "usually finished (and billed) anyway, so the images will be posted when they are ready."
            ),
        )


async def reroll_job(interaction: Interaction, job: Job) -> None:
    """Same inputs, a new seed, as a new reply, shown as the job is (a recipe's words and name)."""
    with one_press_at_a_time(interaction, job, JobAction.REROLL, ALREADY_STARTING):
        edit = await inputs_found_again(interaction.client, job)
        await interaction.client.intake.start(
            interaction, edit.with_options(seed=None), parent_job_id=job.id, recipe=job.recipe
        )


async def retry_job(interaction: Interaction, job: Job) -> None:
    """A failed job made nothing to vary: the same job again, as the member asked for it, the
    seed they chose included."""
    with one_press_at_a_time(interaction, job, JobAction.RETRY, ALREADY_STARTING):
        edit = await inputs_found_again(interaction.client, job)
        await interaction.client.intake.start(interaction, edit, parent_job_id=job.id, recipe=job.recipe)


async def inputs_found_again(bot: KontextBot, job: Job) -> KontextEdit:
    """The job's edit, with the copies of its inputs that no longer last (older than their
    lifetime at fal) found again where the bot can: a job built on a result (✏️ Edit, and the
    re-rolls of it, which share its inputs) edits one of that result's images, which the bot
    reads again from the result's message if it is still there. Looked for briefly, as the
    member's interaction is answered after it; copies not found are refused by the intake."""

    async def images_of_the_result_edited() -> list[str]:
        source = job
        while source.parent_job_id is not None:
            parent = await bot.store.get_job(source.parent_job_id)
            if parent is None:
                break
            # `source` edited `parent`'s result, rather than repeating `parent` (a Re-roll, a Try
            # again, which may have made copies of their own): only a result has ✏️ Edit.
            if parent.state is JobState.SUCCEEDED and not await bot.runner.same_inputs(parent.edit, source.edit):
                try:
                    return [a.url for a in await fetch_result_attachments(bot, parent)]
                except discord.HTTPException:
                    break
            source = parent
        return []

    return await bot.runner.inputs_found_again(job.edit, images_of_the_result_edited, within=FIND_AGAIN_SECONDS)


async def edit_job(interaction: Interaction, job: Job) -> None:
    """Anyone in the channel may build on a result: ask for a prompt (and which image). The form
    carries the job in its custom_id: its submit comes to `submit_edit_form`, after a restart too."""
    _ = member_texts(interaction)
    await interaction.client.intake.check_access(interaction)
    images = image_attachments(interaction.message)
    if not images:
        raise UserFacingError(N_("This message has no image left to edit."))
    form = PromptModal(
        title=_("Edit the result of job #{id}", id=job.id),
        image_labels=[_("Image {number}: {name}", number=i, name=a.filename) for i, a in enumerate(images, start=1)],
        texts=_,
        custom_id=f"kontext:form:{job.id}" + (f":{job.button_key}" if job.button_key else ""),
    )
    await interaction.response.send_modal(form)


async def delete_result(interaction: Interaction, job: Job) -> None:
    """Every message of the result goes, not only the one whose button was pressed: in a server
    channel and in the member's DM with the bot, the bot deletes the others with its own token
    (where it may not, a group DM or a server without the bot, the others stay: Discord would
    refuse the bot's token there, and each refusal counts towards its invalid-request limit)."""
    await interaction.response.defer()
    pressed = interaction.message.id if interaction.message is not None else None
    channel = interaction.channel
    # A result shown again elsewhere ("Show here") is one message of its own.
    of_result = pressed in job.posted_message_ids
    for message_id in job.posted_message_ids if of_result and place_of(interaction).bot_can_post else ():
        if message_id != pressed and isinstance(channel, ServerChannel | discord.DMChannel):
            with contextlib.suppress(discord.NotFound, discord.Forbidden):
                await channel.get_partial_message(message_id).delete()
    await interaction.delete_original_response()


async def share_result(interaction: Interaction, job: Job) -> None:
    """Post a result its member saw alone first to the channel, once however often it is pressed."""
    with one_press_at_a_time(interaction, job, JobAction.SHARE, N_("This result is already being shared.")):
        await _share(interaction, job)


async def _share(interaction: Interaction, job: Job) -> None:
    """The same card with the job's buttons: the images are those of the member's private copy
    (already within this channel's upload limit), uploaded again, since an ephemeral message's
    attachments are not the channel's. From its reply, through the interaction; from the DM a late
    result came in, with the bot's own token, where the bot may post."""
    bot = interaction.client
    _ = member_texts(interaction)
    assert interaction.message is not None, "a button's interaction has its message"
    pressed = interaction.message.id  # a result too large for one message is shared a part at a time
    shared_as = job.shared_as(pressed)
    if shared_as is not None:
        raise UserFacingError(N_("Already shared: {link}"), link=_message_link(job, shared_as))
    from_reply = (interaction.guild_id, interaction.channel_id) == (job.guild_id, job.channel_id)
    if not from_reply and not job.place.bot_can_post:
        raise UserFacingError(N_("This result can be shared only from its reply, in the channel it was made in."))
    channel = None if from_reply else await _channel_of(bot, job)
    permissions = own_permissions(channel)
    if permissions is not None and not may_post_images(channel, permissions):
        raise UserFacingError(
            N_(
                "The bot may not post images in {channel}, so the result can't be shared there. "
                "A moderator can allow its role Send Messages and Attach Files in that channel."
            ),
            channel=f"<#{job.channel_id}>",
        )
    await _check_sharing(interaction, job, channel)
    public = in_public(job, channel_nsfw=is_nsfw_channel(channel or interaction.channel))
    rendered = render(public)
    # A classic message spoilers a flagged image's attachment (SPOILER_…), a card its gallery item.
    held = {a.filename.removeprefix("SPOILER_"): a for a in image_attachments(interaction.message)}
    shown = [(name, image) for name, image in posted_names(job).items() if name in held and image in rendered.files]
    if not shown:
        raise UserFacingError(N_("This message has no image left to share."))
    # From the reply: a new message in the channel, for everyone; elsewhere a private answer.
    callback = await interaction.response.defer(thinking=True, ephemeral=not from_reply)
    if from_reply and callback is not None and callback.is_ephemeral():
        # Discord keeps this answer private, as it kept the reply: posted, it would be shared with no one.
        raise UserFacingError(
            N_("This server keeps the replies of apps it has not added private, so a result can't be shared here.")
        )
    async with placeholder_withdrawn_on_failure(interaction):
        as_card = bot.settings.result_cards and len(shown) <= MAX_GALLERY_ITEMS
        files = [
            discord.File(io.BytesIO(await held[name].read()), filename=name, spoiler=image.nsfw and not as_card)
            for name, image in shown
        ]
        message: discord.Message
        if from_reply and as_card:
            # A deferred reply becomes a card only by this edit (see presenter._deliver_by_interaction).
            card = result_card(public, rendered, shown)
            message = await interaction.edit_original_response(content=None, embed=None, attachments=files, view=card)
        elif from_reply:
            view = job_view(public, rendered.buttons)
            message = await interaction.edit_original_response(
                content=rendered.content, embed=rendered.embed, attachments=files, view=view
            )
        else:
            assert channel is not None
            if as_card:
                message = await channel.send(view=result_card(public, rendered, shown), files=files)
            else:
                message = await channel.send(
                    rendered.content, embed=rendered.embed, files=files, view=job_view(public, rendered.buttons)
                )
    await bot.store.record_share(job, message.id, part=pressed)
    if not from_reply:
        await interaction.edit_original_response(content=_("📣 Shared: {link}", link=message.jump_url))
    log.info("job %d: shared to the channel by its member (message %d)", job.id, message.id)


async def _channel_of(bot: KontextBot, job: Job) -> ServerChannel:
    """The result's channel, for the bot to post in with its own token. One its cache lacks is
    fetched; Discord refuses (403) a private thread the bot was never added to, whose members
    alone see it, and any channel of a server the bot has left."""
    try:
        channel = cached_channel(bot, job.guild_id, job.channel_id) or await bot.fetch_channel(job.channel_id)
    except discord.Forbidden:
        raise UserFacingError(
            N_(
                "The bot can't see the channel of this result, so it can't be shared there. In a private "
                "thread, someone in it can add the bot (mention it there); then press Share again."
            )
        ) from None
    assert isinstance(channel, ServerChannel)
    return channel


async def _check_sharing(interaction: Interaction, job: Job, channel: ServerChannel | None) -> None:
    """Sharing shows the result in its channel now, so it is checked as Show here is, under that
    channel's policy now (its safety maximum may have been lowered since the job): from its reply,
    there; from the DM a late result came in, as the member in `channel`. There the bot posts with
    its own token, so it asks what Discord asks of an interaction in the channel: that the member
    may still see it and post in it (not shut out of it since, nor timed out)."""
    intake = interaction.client.intake
    made_at = job.edit.options.safety_tolerance
    if channel is None:
        await intake.check_showing(interaction, made_at)
        return
    user_id = interaction.user.id
    try:
        member = channel.guild.get_member(user_id) or await channel.guild.fetch_member(user_id)
    except discord.NotFound:
        raise UserFacingError(
            N_("You are no longer in the server of this result, so it can't be shared there.")
        ) from None
    if not may_send(channel, channel.permissions_for(member)):
        raise UserFacingError(N_("You can no longer post in the channel of this result, so it can't be shared there."))
    await intake.check_showing_in(channel.guild.id, requester_in(member, channel, channel.id), made_at)


def _message_link(job: Job, message_id: int) -> str:
    return f"https://discord.com/channels/{job.guild_id or '@me'}/{job.channel_id}/{message_id}"


@dataclass(frozen=True)
class ButtonSpec:
    label: str
    emoji: str
    style: discord.ButtonStyle
    handler: Callable[[Interaction, Job], Awaitable[None]]
    # Only the member who asked and the moderators of a server that added the bot may press it,
    # and this is what anyone else is told; None: anyone in the channel may.
    refusal: str | None


BUTTONS: dict[JobAction, ButtonSpec] = {
    JobAction.CANCEL: ButtonSpec(
        N_("Cancel"),
        "✖️",
        discord.ButtonStyle.secondary,
        cancel_job,
        N_("Only the member who asked for this edit or a moderator can cancel it."),
    ),
    JobAction.REROLL: ButtonSpec(
        N_("Re-roll"),
        "🎲",
        discord.ButtonStyle.primary,
        reroll_job,
        N_("Only the member who asked for this edit or a moderator can re-roll it."),
    ),
    JobAction.RETRY: ButtonSpec(
        N_("Try again"),
        "🔁",
        discord.ButtonStyle.primary,
        retry_job,
        N_("Only the member who asked for this edit or a moderator can try it again."),
    ),
    JobAction.EDIT: ButtonSpec(N_("Edit"), "✏️", discord.ButtonStyle.secondary, edit_job, None),
    JobAction.SHARE: ButtonSpec(
        N_("Share to channel"),
        "📣",
        discord.ButtonStyle.success,
        share_result,
        N_("Only the member who asked for this edit can share it."),
    ),
    JobAction.DELETE: ButtonSpec(
        N_("Delete"),
        "🗑️",
        discord.ButtonStyle.danger,
        delete_result,
        N_("Only the member who asked for this edit or a moderator can delete it."),
    ),
}


def job_buttons(job: Job, actions: tuple[JobAction, ...]) -> list[JobButton]:
    """A job's buttons, labelled in the language of the member who asked."""
    _ = texts(job.locale)
    return [JobButton(action, job.id, job.button_key, label=_(BUTTONS[action].label)) for action in actions]


def job_view(job: Job, actions: tuple[JobAction, ...]) -> discord.ui.View:
    """A job's buttons, in one row; an empty view removes any shown before."""
    view = discord.ui.View(timeout=None)
    for button in job_buttons(job, actions):
        view.add_item(button)
    return view


def result_card(job: Job, rendered: Rendered, images: list[tuple[str, ResultImage]]) -> discord.ui.LayoutView:
    """A finished result as one components-v2 message: a container holding the status line, a
    media gallery of the images (a spoiler only on those fal flagged, the prompt as each one's
    alt text), the job's details and the buttons: at most 9 of Discord's 40 components. The
    images, at most 10 (a Media Gallery's limit), are the message's attachments of those names."""
    assert len(images) <= MAX_GALLERY_ITEMS
    items: list[discord.ui.Item[Any]] = [discord.ui.TextDisplay(rendered.content)]
    if images:
        items.append(
            discord.ui.MediaGallery(
                *(
                    discord.MediaGalleryItem(
                        f"attachment://{name}", description=rendered.alt_text or None, spoiler=image.nsfw
                    )
                    for name, image in images
                )
            )
        )
    items.append(discord.ui.TextDisplay(rendered.details))
    if rendered.buttons:
        items.append(discord.ui.Separator(visible=False))
        items.append(discord.ui.ActionRow(*job_buttons(job, rendered.buttons)))
    card = discord.ui.LayoutView(timeout=None)
    card.add_item(discord.ui.Container(*items, accent_colour=rendered.embed.colour))
    return card


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button],
    # Buttons posted before the job key existed have none.
    template=r"kontext:(?P<action>[a-z]+):(?P<job_id>[0-9]+)(?::(?P<key>[0-9a-f]+))?",
):
    def __init__(self, action: JobAction, job_id: int, key: str | None, *, label: str | None = None) -> None:
        spec = BUTTONS[action]
        custom_id = f"kontext:{action.value}:{job_id}" + (f":{key}" if key else "")
        super().__init__(
            discord.ui.Button(label=label or spec.label, emoji=spec.emoji, style=spec.style, custom_id=custom_id)
        )
        self.action = action
        self.job_id = job_id
        self.key = key
        self.job: Job | None = None

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # typed with the bot's own interactions
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> JobButton:
        return cls(JobAction(match["action"]), int(match["job_id"]), match["key"])  # ValueError: unknown action

    async def interaction_check(self, interaction: Interaction) -> bool:  # type: ignore[override]
        """Find the job and check who may press this. discord.py ignores an error raised here
        for a dynamic item, so the member is told here."""
        try:
            job = await job_for(interaction, self.job_id, self.key, self.action)
            if job is None:
                raise UserFacingError(N_("This button belongs to an edit the bot no longer knows."))
        except Exception as exc:
            await report(interaction, exc)
            return False
        self.job = job
        return True

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]
        assert self.job is not None, "interaction_check found the job"
        try:
            await BUTTONS[self.action].handler(interaction, self.job)
        except Exception as exc:
            await report(interaction, exc)


async def job_for(interaction: Interaction, job_id: int, key: str | None, action: JobAction) -> Job | None:
    """The job a button (or the form it opened) acts on, or None when the bot no longer knows
    it there; refused (UserFacingError) when this member may not do `action` to it."""
    bot = interaction.client
    job = bot.runner.active_job(job_id) or await bot.store.get_job(job_id)
    if job is None or not await _belongs_to(job, key, interaction):
        return None
    refusal = BUTTONS[action].refusal
    if refusal is not None and interaction.user.id != job.user_id:
        if not is_moderator(interaction):
            raise UserFacingError(refusal)
        if place_of(interaction) is not JobPlace.SERVER:
            # Where the button is pressed, as for /kontext-history's lookups: where only members'
            # own installs bring the app (a server without the bot, where a result can also be
            # shown again), no server governs their jobs, and its moderators are none of theirs.
            raise UserFacingError(
                N_("Acting on another member's edit is for the moderators of a server that added the bot.")
            )
    if (action in STARTS_A_JOB or action is JobAction.SHARE) and not may_ask_here(interaction):
        # What posts in the channel for the member: a new job's reply, a shared result.
        raise UserFacingError(
            N_("You can't post or use app commands in this channel, so the bot posts nothing here for you.")
        )
    message = interaction.message
    own_copy = message is not None and message.id in (job.message_id, *job.posted_message_ids)
    if action in STARTS_A_JOB and interaction.guild_id is None and not job.place.personal and own_copy:
        # A server's job in the member's DM (its copies there carry no such button since): a new
        # job here would follow the rules for personal use, not the server's. A copy the member
        # showed here ("Show here") is the DM's, as they could have asked for it here.
        shared_as = job.notes.get(NOTE_SHARED_AS)
        raise UserFacingError(
            N_("This edit was made in a server and follows its rules: re-roll or edit it there, {where}."),
            where=_message_link(job, shared_as) if shared_as is not None else f"<#{job.channel_id}>",
        )
    return job


async def _belongs_to(job: Job, key: str | None, interaction: Interaction) -> bool:
    """A button acts only on the job it was posted for: same key (a job id alone is reused
    when a database is lost or restored), same server and channel (or the requester's DM
    with the bot, where a result that outlived its reply is sent), one of its messages; or
    on the job's result shown again elsewhere ("Show here"), in that message's channel."""
    if job.button_key is not None and key != job.button_key:
        return False
    message = interaction.message
    if message is not None and message.id not in (job.message_id, *job.posted_message_ids):
        shown = await interaction.client.store.shown_job(message.id)
        return shown == (job.id, interaction.channel_id)
    where = (interaction.guild_id, interaction.channel_id)
    sent_to_dm = interaction.guild_id is None and interaction.user.id == job.user_id and message is not None
    return where == (job.guild_id, job.channel_id) or sent_to_dm


async def submit_edit_form(interaction: Interaction) -> None:
    """A submitted ✏️ Edit form (listening to every interaction: discord.py routes no modal by
    its custom_id): the same checks as the button, then the edit, on the image chosen among the
    images of the message whose button opened the form."""
    match = EDIT_FORM.fullmatch(form_id(interaction) or "")
    if match is None:
        return
    answer = answer_of(interaction)
    try:
        job = await job_for(interaction, int(match["job_id"]), match["key"], JobAction.EDIT)
        if job is None:
            raise UserFacingError(N_("This form belongs to an edit the bot no longer knows, so nothing was started."))
        images = image_attachments(interaction.message)
        if answer.image >= len(images):
            raise UserFacingError(N_("This message has no image left to edit."))
        # Checked as an attached image is, before anything is acknowledged or spent.
        url = image_url(images[answer.image], interaction.client.settings.max_input_bytes)
        options = job.edit.options.for_follow_up_edit()
        with one_press_at_a_time(interaction, job, JobAction.EDIT, ALREADY_STARTING):
            await start_edit(interaction, answer.prompt, url, options, parent_job_id=job.id)
    except Exception as exc:
        await report(interaction, exc, typed=answer.prompt)
