"""What a member sees for a job: one pure function from job state to message parts, in the
language of the member who asked (the job's locale).

Because rendering is pure (it builds content, an embed, the result card's texts and the names
of the buttons, and touches nothing else), the presenter can compare two renderings and edit a
message only when what it shows changed. The buttons and the card's layout are built by
`cogs.views`.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import discord

from services.flux_kontext import KontextOptions
from services.i18n import N_, Texts, texts
from services.images import EXTENSIONS
from services.job import (
    FAL_SILENT_STARTED,
    NOTE_CANCEL_REQUESTED_BY,
    NOTE_FAL_SILENT,
    NOTE_FROM_DEFAULTS,
    NOTE_PRIVATE_FIRST,
    NOTE_PRIVATE_REPLY,
    NOTE_REPLY_EXPIRING,
    NOTE_SAFETY_LIMITED_TO,
    NOTE_SHARED_AS,
    REPLY_EXPIRING_IN_CHANNEL,
    Job,
    JobState,
    ResultImage,
)

EMBED_COLOUR = discord.Colour.from_rgb(88, 101, 242)
FAILURE_COLOUR = discord.Colour.red()
BRAND = "FLUX.1 Kontext [max]"
CARD_HEAD = f"-# {BRAND}\n"

# Discord's limits for a components-v2 card (components/reference.mdx): all Text Displays of a
# message together, and a Media Gallery item's description (its alt text).
CARD_TEXT_LIMIT = 4000
ALT_TEXT_LIMIT = 1024
# Channels named in a text at most; the others are counted.
CHANNELS_LISTED = 10

# Failure codes (set by the services) -> what the member reads. `{detail}` is fal's own words
# (or, for the input checks, the bot's, already in the member's language).
FAILURE_MESSAGES: dict[str, str] = {
    "fal_rejected": N_("FLUX.1 Kontext refused this edit: {detail}"),
    "content_policy": N_("FLUX.1 Kontext's safety system refused this edit: {detail}"),
    "fal_failed": N_("FLUX.1 Kontext could not make this edit: {detail}"),
    "fal_auth": N_("The bot's fal.ai key was refused. The bot's operator needs to check its configuration."),
    "fal_account_locked": N_(
        "The bot's fal.ai account can't take edits right now (it is out of credit or locked). "
        "The bot's operator has been told; please try again later."
    ),
    "fal_unavailable": N_(
        "fal.ai is not answering right now, even after several retries. Please try again in a few minutes."
    ),
    "submit_uncertain": N_(
        "The bot lost contact with fal.ai while your edit was being sent, so it cannot tell whether "
        "fal received it. It was not sent again, so you are never billed twice for one edit; "
        "press Try again if no result shows up."
    ),
    "bad_input": "{detail}",  # the bot's own words, in the member's language already
    "input_unavailable": N_("{detail} Please attach the image again."),
    "upload_failed": N_("The image could not be handed to fal.ai right now. Please try again in a few minutes."),
    "result_expired": N_(
        "fal.ai no longer has this result (it keeps one for about an hour). Please run the command again."
    ),
    # fal honoured a cancel no member asked for (the bot's own, of a job it could not follow).
    "fal_cancelled": N_("fal.ai stopped this edit before it was finished. Please try again."),
    "bad_output": N_("fal.ai sent back something that is not a usable image. Please try again."),
    "result_refused": N_(
        "fal.ai made this edit but its file server refused the bot the images (the fal account keeps "
        "its results private). The bot's operator can change that in fal's settings."
    ),
    "timeout": N_("This edit took too long and was stopped. Please try again later."),
    "missing_files": N_("The result files were lost before they could be posted. Please run the command again."),
    "abandoned": N_(
        "The bot restarted before this edit could start, so it was not sent to fal.ai and nothing was "
        "billed. Press Try again to send it again."
    ),
}
GENERIC_FAILURE = N_("Something went wrong with this edit. Please try again.")
# Failures whose detail is the bot's own words (the input checks), shown as they are; any other
# detail is fal's, shown as plain text.
OWN_WORDS = frozenset({"bad_input", "input_unavailable"})
# Failures about what the member handed in are told to them alone, as a refusal would be.
PRIVATE_FAILURES = frozenset({"bad_input"})

OPTION_LABELS = (
    ("aspect_ratio", N_("Aspect ratio")),
    ("num_images", N_("Images")),
    ("guidance_scale", N_("Guidance")),
    ("output_format", N_("Format")),
    ("safety_tolerance", N_("Safety tolerance")),
    ("enhance_prompt", N_("Enhanced prompt")),
)


class JobAction(enum.Enum):
    """What a button on a job's message does; the value is its name in the button's custom_id."""

    CANCEL = "cancel"
    REROLL = "reroll"
    RETRY = "retry"  # a failed job sent again as it was
    EDIT = "edit"
    DELETE = "delete"
    SHARE = "share"  # a private-first result, posted to the channel


# Which buttons a reply carries, by state.
WHILE_WAITING = (JobAction.CANCEL,)
ON_RESULT = (JobAction.REROLL, JobAction.EDIT, JobAction.DELETE)
# A result the member sees alone first, until they share it.
ON_PRIVATE_RESULT = (JobAction.SHARE, *ON_RESULT)
ON_FAILURE = (JobAction.RETRY,)
# The buttons that start a new job, governed by the place they are pressed in.
STARTS_A_JOB = frozenset({JobAction.REROLL, JobAction.RETRY, JobAction.EDIT})


@dataclass
class Rendered:
    job_id: int
    content: str
    embed: discord.Embed
    buttons: tuple[JobAction, ...] = ()
    files: list[ResultImage] = field(default_factory=list)
    # Shown only to the member who asked, in place of the public reply.
    private: bool = False
    # A result as one card (see cogs.views.result_card): `content` is its first line, then the
    # prompt quoted and the rest of the request's details as markdown (see `details`), and each
    # image's alt text (the prompt).
    quoted_prompt: str = ""
    details_rest: str = ""
    alt_text: str = ""

    def key(self) -> tuple[Any, ...]:
        """Equal keys mean the member would see the same message."""
        return (self.content, self.embed.to_dict(), self.buttons, tuple((f.url, f.size) for f in self.files))

    @property
    def details(self) -> str:
        """The card's text under the images. Made from the status line as it is when the card
        is built (the presenter adds links and leads to it), so the card's texts together stay
        within Discord's limit: the prompt is cut to the room left."""
        room = CARD_TEXT_LIMIT - len(self.content) - len(CARD_HEAD) - len(self.details_rest)
        return CARD_HEAD + _shortened(self.quoted_prompt, room) + self.details_rest


def failure_text(code: str | None, detail: str | None, _: Texts) -> str:
    template = FAILURE_MESSAGES.get(code or "", GENERIC_FAILURE)
    if not detail:
        return _(template, detail=_("no reason given"))
    return _(template, detail=detail if code in OWN_WORDS else plain_text(detail))


def plain_text(text: str, limit: int = 500) -> str:
    """Outside words (fal's, a moderator's) shown as plain text on one line: no markdown, links
    or mentions. `limit` counts the text as sent, escapes included (each `_` or `*` gains one),
    since that is what Discord's limits count."""
    flat = " ".join(text.split())
    shown = _defused(flat)
    if len(shown) <= limit:
        return shown

    def sent_length(end: int) -> int:
        return len(_defused(flat[:end]))

    # The longest start of the words that fits with the ellipsis, escaped whole: never half an escape.
    end = bisect.bisect_right(range(min(len(flat), limit)), limit - 1, key=sent_length) - 1
    return _defused(flat[:end]) + "…"


def _defused(text: str) -> str:
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def channel_list(channel_ids: Iterable[int], _: Texts) -> str:
    """Channels as mentions, the first few (by id) and the number of the others: a server may
    allow hundreds, and a message holds 2,000 characters."""
    ordered = sorted(channel_ids)
    shown = ", ".join(f"<#{channel}>" for channel in ordered[:CHANNELS_LISTED])
    others = len(ordered) - CHANNELS_LISTED
    if others <= 0:
        return shown
    return _.ngettext("{channels} and {count} more", "{channels} and {count} more", others, channels=shown)


def render(job: Job) -> Rendered:
    """The message for `job` as it stands now, in the language of the member who asked."""
    _ = texts(job.locale)
    rendered = _render(job, _)
    late = job.notes.get(NOTE_REPLY_EXPIRING)
    if not job.state.is_final and late:
        rendered.content += "\n" + (
            _("📬 This reply can only be updated for 15 minutes: the result will be posted in this channel.")
            if late == REPLY_EXPIRING_IN_CHANNEL
            else _("📬 This reply can only be updated for 15 minutes: the result will come in a DM from the bot.")
        )
    return rendered


def _render(job: Job, _: Texts) -> Rendered:
    embed = _request_embed(job, _)
    state = job.state
    if state is JobState.PENDING:
        return Rendered(job.id, _waiting_text(job, _), embed, WHILE_WAITING)
    if state is JobState.SUBMITTING:
        return Rendered(job.id, _("📤 Sending your edit to FLUX.1 Kontext…"), embed)
    silent = job.notes.get(NOTE_FAL_SILENT)
    if silent == FAL_SILENT_STARTED and state in (JobState.QUEUED, JobState.RUNNING):
        text = _(
            "📡 fal.ai is not answering. It has started your edit, so the bot keeps asking for the "
            "result: you get it once fal is back."
        )
        return Rendered(job.id, text, embed)
    if state is JobState.QUEUED and silent:
        text = _(
            "📡 fal.ai is not answering. Your edit may still be in its queue, so the bot keeps asking: "
            "you get the result if fal makes it; if not, it is cancelled there, unbilled."
        )
        return Rendered(job.id, text, embed, WHILE_WAITING)
    if state is JobState.QUEUED:
        position = _place((job.queue_position or 0) + 1, _, mark="")
        if job.starts_at:
            text = _("🕒 In queue, position **{position}**, starting {when}.", position=position, when=_when(job))
        else:
            text = _("🕒 In queue, position **{position}**.", position=position)
        return Rendered(job.id, text, embed, WHILE_WAITING)
    if state is JobState.RUNNING:
        text = _("🎨 Generating… (started {when})", when=f"<t:{int(job.started_at or job.created_at)}:R>")
        if _cancel_came_late(job):
            text += " " + _("Cancel asked: fal usually finishes an edit it has started.")
        return Rendered(job.id, text, embed)
    if state is JobState.CANCELLED:
        if job.cancelled_by:
            return Rendered(job.id, _("🚫 Cancelled by {member}.", member=f"<@{job.cancelled_by}>"), embed)
        return Rendered(job.id, _("🚫 Cancelled by the bot."), embed)
    if state is JobState.FAILED:
        embed.colour = FAILURE_COLOUR
        text = f"❌ {failure_text(job.error_code, job.error_detail, _)}"
        if job.error_code in PRIVATE_FAILURES:
            return Rendered(job.id, text, embed, private=True)
        return Rendered(job.id, text, embed, ON_FAILURE)
    return _render_result(job, embed, _)


def _waiting_text(job: Job, _: Texts) -> str:
    place = job.bot_queue_position
    if not place:
        return _("⏳ Waiting for a free slot: starting.")
    if job.starts_at:
        return _(
            "⏳ Waiting for a free slot: you are **{place}** in line, starting {when}.",
            place=_place(place, _),
            when=_when(job),
        )
    return _("⏳ Waiting for a free slot: you are **{place}** in line.", place=_place(place, _))


def _render_result(job: Job, embed: discord.Embed, _: Texts) -> Rendered:
    assert job.result is not None
    shown, withheld = [], 0
    for image in job.result.images:
        if image.nsfw and not job.channel_nsfw:
            withheld += 1
        else:
            shown.append(image)
    for item in _result_fields(job, _):
        embed.add_field(name=item.name, value=item.value)
    notes = []
    if withheld:
        notes.append(
            _.ngettext(
                "🛡️ {count} of {total} image was flagged by the safety checker and is not shown "
                "(age-restricted channels show it behind a spoiler).",
                "🛡️ {count} of {total} images were flagged by the safety checker and are not shown "
                "(age-restricted channels show them behind a spoiler).",
                withheld,
                total=len(job.result.images),
            )
        )
    if any(image.nsfw for image in shown):
        notes.append(_("⚠️ Flagged by the safety checker: shown behind a spoiler."))
    done = _("✅ Done.")
    if _cancel_came_late(job):
        done += " " + _(
            "The cancel came after fal had started, and fal finishes (and bills) a started edit, so here it is."
        )
    content = "\n".join(notes) if notes else (done if shown else _("No image could be shown."))
    return Rendered(
        job.id,
        content,
        embed,
        (ON_PRIVATE_RESULT if _unshared(job) else ON_RESULT) if shown else ON_FAILURE,
        files=shown,
        quoted_prompt=_quote(job.shown_prompt),
        details_rest=_card_details(job, _),
        alt_text=_shortened(" ".join(job.shown_prompt.split()), ALT_TEXT_LIMIT),
    )


def _place(place: int, _: Texts, mark: str = "#") -> str:
    """A place in line, exact up to 10 and rounded beyond (about #35): a long line moving one
    place at a time is not worth an edit of every reply at every step."""
    if place <= 10:
        return f"{mark}{place}"
    return _("about {place}", place=f"{mark}{place - place % 5}")


def _when(job: Job) -> str:
    return f"<t:{int(job.starts_at or 0)}:R>"


def _cancel_came_late(job: Job) -> bool:
    return NOTE_CANCEL_REQUESTED_BY in job.notes


@dataclass(frozen=True)
class _Field:
    name: str
    value: str
    inline: bool = True


def _request_fields(job: Job, _: Texts) -> list[_Field]:
    """What was asked for, by whom, and what the policy changed: shown from the first reply on."""
    options = _options_text(job.edit.options, frozenset(job.notes.get(NOTE_FROM_DEFAULTS, ())), _)
    inputs = len(job.edit.image_urls)
    source = None
    if inputs > 1:
        source = _("{count} images combined", count=inputs)
    elif job.edit.from_text:
        source = _("Made from text")
    if source:
        options = f"{source} · {options}" if options else source
    fields = [_Field(_("Requested by"), f"<@{job.user_id}>")]
    if job.recipe is not None:
        fields.append(_Field(_("Recipe"), plain_text(job.recipe["name"])))  # a moderator's words
    if options:
        fields.append(_Field(_("Options"), options, inline=False))
    limited_to = job.notes.get(NOTE_SAFETY_LIMITED_TO)
    if limited_to is not None:
        if job.place.personal:
            why = _(
                "Safety tolerance limited to {value} by the bot's policy for use outside servers.", value=limited_to
            )
        else:
            why = _("Safety tolerance limited to {value} by this server's policy.", value=limited_to)
        fields.append(_Field(_("Policy"), why, inline=False))
    return fields


def _result_fields(job: Job, _: Texts) -> list[_Field]:
    assert job.result is not None
    fields = []
    if job.result.seed is not None:
        fields.append(_Field(_("Seed"), str(job.result.seed)))
    timing = _timing(job, _)
    if timing:
        fields.append(_Field(_("Time"), timing))
    return fields


def _footer(job: Job, _: Texts) -> str:
    if job.parent_job_id:
        return _("Job #{id} · from job #{parent}", id=job.id, parent=job.parent_job_id)
    return _("Job #{id}", id=job.id)


def _request_embed(job: Job, _: Texts) -> discord.Embed:
    embed = discord.Embed(description=_quote(job.shown_prompt), colour=EMBED_COLOUR)
    embed.set_author(name=BRAND)
    for item in _request_fields(job, _):
        embed.add_field(name=item.name, value=item.value, inline=item.inline)
    embed.set_footer(text=_footer(job, _))
    return embed


def _card_details(job: Job, _: Texts) -> str:
    """The result card's text after the prompt: what the embed's fields say, then the job's number."""
    lines = [f"**{item.name}** {item.value}" for item in (*_request_fields(job, _), *_result_fields(job, _))]
    tail = [f"-# {_footer(job, _)}"]
    if _unshared(job):
        tail.append("-# " + _("🔒 Only you can see this until you share it to the channel."))
    elif job.notes.get(NOTE_PRIVATE_REPLY):
        tail.append(
            "-# " + _("🔒 Only you can see this: this server keeps the replies of apps it has not added private.")
        )
    return "\n" + "\n".join(lines + tail)


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _options_text(options: KontextOptions, from_defaults: frozenset[str], _: Texts) -> str:
    """The options set, each marked when it came from the member's defaults."""
    shown = []
    for name, label in OPTION_LABELS:
        value = getattr(options, name)
        if value is None or value is False:
            continue
        text = _(label) if value is True else f"{_(label)} {value}"
        shown.append(_("{option} (your default)", option=text) if name in from_defaults else text)
    return " · ".join(shown)


def in_public(job: Job, *, channel_nsfw: bool) -> Job:
    """The job as a message everyone in a channel sees renders it (its share, a copy shown again
    with Show here): not the member's own private-first copy, nor the reply Discord kept private,
    so no private notice, no Share; and with the images fal flagged shown only if that channel is
    age-restricted now (it may not be the job's, or no longer be what it was when the job ran)."""
    private = (NOTE_PRIVATE_FIRST, NOTE_PRIVATE_REPLY)
    notes = {k: v for k, v in job.notes.items() if k not in private}
    return dataclasses.replace(job, notes=notes, channel_nsfw=channel_nsfw)


def _unshared(job: Job) -> bool:
    """A private-first result its member has not shared to the channel yet."""
    return job.private_first and NOTE_SHARED_AS not in job.notes


def _quote(prompt: str) -> str:
    """The prompt as the member wrote it, quoted, with markdown shown as typed: a masked link in a
    prompt is not a link in the bot's reply."""
    escaped = discord.utils.escape_markdown(prompt)
    return "\n".join(f"> {line}" for line in escaped.splitlines() or [""])[:4096]


def _timing(job: Job, _: Texts) -> str | None:
    parts = []
    if job.submitted_at and job.started_at:
        parts.append(_("queued {seconds} s", seconds=_.number(job.started_at - job.submitted_at, 1)))
    if job.result and job.result.inference_seconds:
        parts.append(_("generated in {seconds} s", seconds=_.number(job.result.inference_seconds, 1)))
    elif job.started_at and job.completed_at:
        parts.append(_("generated in {seconds} s", seconds=_.number(job.completed_at - job.started_at, 1)))
    return ", ".join(parts) or None


OUTCOME_MARKS = {JobState.SUCCEEDED: "✅", JobState.FAILED: "❌", JobState.CANCELLED: "🚫"}


def job_log_line(job: Job, _: Texts) -> str:
    """One line for the moderators' log channel (in the server's language): who, where, what, at
    which tolerance, outcome. What: the prompt sent, a server recipe's text included (the
    moderators' own), since that is what made the image they moderate."""
    prompt = plain_text(job.prompt, limit=200)  # one line, no markdown or mentions: it cannot forge entries
    if job.state is JobState.SUCCEEDED:
        outcome = _("succeeded")
    elif job.state is JobState.CANCELLED:
        outcome = _("cancelled")
    else:
        outcome = _("failed ({code})", code=job.error_code)
    return _(
        "{mark} Job #{id} by <@{user}> in <#{channel}> · tolerance {tolerance} · {outcome} · “{prompt}” · {link}",
        mark=OUTCOME_MARKS.get(job.state, "•"),
        id=job.id,
        user=job.user_id,
        channel=job.channel_id,
        tolerance=job.edit.options.safety_tolerance or "?",
        outcome=outcome,
        prompt=prompt,
        link=f"https://discord.com/channels/{job.guild_id}/{job.channel_id}/{job.message_id}",
    )


def attachment_name(job: Job, index: int, image: ResultImage) -> str:
    extension = EXTENSIONS.get(image.content_type, "png")
    return f"kontext-{job.id}-{index}.{extension}"


def posted_names(job: Job) -> dict[str, ResultImage]:
    """The result's images by the names its own messages carry them under: numbered among the
    images shown there, so a copy shown where fewer may be seen (a channel not age-restricted)
    finds each image by its name, not by its place."""
    return {attachment_name(job, i, image): image for i, image in enumerate(render(job).files, start=1)}


def pack_files(sizes: list[int], limit: int, per_message: int = 10) -> tuple[list[list[int]], list[int]]:
    """Group file indexes into messages whose total stays within `limit` (Discord's upload
    limit for the server) and `per_message` files; files larger than `limit` on their own are
    returned separately, since they cannot be uploaded at all."""
    groups: list[list[int]] = []
    too_large: list[int] = []
    current: list[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if size > limit:
            too_large.append(index)
            continue
        if current and (total + size > limit or len(current) == per_message):
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        groups.append(current)
    return groups, too_large
