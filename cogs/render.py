"""What a member sees for a job: one pure function from job state to message parts.

Because rendering is pure (it builds content, an embed and the names of the buttons, and
touches nothing else), the presenter can compare two renderings and edit a message only when
what it shows changed. The buttons themselves are built by `cogs.views`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import discord

from services.flux_kontext import KontextOptions
from services.images import EXTENSIONS
from services.job import NOTE_CANCEL_REQUESTED_BY, NOTE_SAFETY_LIMITED_TO, Job, JobState, ResultImage

EMBED_COLOUR = discord.Colour.from_rgb(88, 101, 242)
FAILURE_COLOUR = discord.Colour.red()

# Failure codes (set by the services) -> what the member reads. `{detail}` is fal's own words
# (or, for the input checks, the bot's).
FAILURE_MESSAGES: dict[str, str] = {
    "fal_rejected": "FLUX.1 Kontext refused this edit: {detail}",
    "content_policy": "FLUX.1 Kontext's safety system refused this edit: {detail}",
    "fal_failed": "FLUX.1 Kontext could not make this edit: {detail}",
    "fal_auth": "The bot's fal.ai key was refused. The bot's operator needs to check its configuration.",
    "fal_account_locked": (
        "The bot's fal.ai account can't take edits right now (it is out of credit or locked). "
        "The bot's operator has been told; please try again later."
    ),
    "fal_unavailable": "fal.ai is not answering right now, even after several retries. Please try again in a few minutes.",
    "submit_uncertain": (
        "The bot lost contact with fal.ai while your edit was being sent, so it cannot tell whether "
        "fal received it. It was not sent again, so you are never billed twice for one edit; "
        "press Try again if no result shows up."
    ),
    "bad_input": "{detail}",
    "input_unavailable": "{detail} Please attach the image again.",
    "upload_failed": "The image could not be handed to fal.ai right now. Please try again in a few minutes.",
    "result_expired": "fal.ai no longer has this result (it keeps results only a few minutes). Please run the command again.",
    "bad_output": "fal.ai sent back something that is not a usable image. Please try again.",
    "timeout": "This edit took too long and was stopped. Please try again later.",
    "missing_files": "The result files were lost before they could be posted. Please run the command again.",
}
GENERIC_FAILURE = "Something went wrong with this edit. Please try again."
# Failures whose detail is the bot's own words (the input checks), shown as they are; any other
# detail is fal's, shown as plain text.
OWN_WORDS = frozenset({"bad_input", "input_unavailable"})
# Failures about what the member handed in are told to them alone, as a refusal would be.
PRIVATE_FAILURES = frozenset({"bad_input"})

OPTION_LABELS = (
    ("aspect_ratio", "Aspect ratio"),
    ("num_images", "Images"),
    ("guidance_scale", "Guidance"),
    ("output_format", "Format"),
    ("safety_tolerance", "Safety tolerance"),
    ("enhance_prompt", "Enhanced prompt"),
)


class JobAction(enum.Enum):
    """What a button on a job's message does; the value is its name in the button's custom_id."""

    CANCEL = "cancel"
    REROLL = "reroll"
    RETRY = "retry"  # a re-roll offered on a failed job
    EDIT = "edit"
    DELETE = "delete"


# Which buttons a reply carries, by state.
WHILE_WAITING = (JobAction.CANCEL,)
ON_RESULT = (JobAction.REROLL, JobAction.EDIT, JobAction.DELETE)
ON_FAILURE = (JobAction.RETRY,)


@dataclass
class Rendered:
    job_id: int
    content: str
    embed: discord.Embed
    buttons: tuple[JobAction, ...] = ()
    files: list[ResultImage] = field(default_factory=list)
    # Shown only to the member who asked, in place of the public reply.
    private: bool = False

    def key(self) -> tuple[Any, ...]:
        """Equal keys mean the member would see the same message."""
        return (self.content, self.embed.to_dict(), self.buttons, tuple((f.url, f.size) for f in self.files))


def failure_text(code: str | None, detail: str | None) -> str:
    template = FAILURE_MESSAGES.get(code or "", GENERIC_FAILURE)
    if not detail:
        return template.format(detail="no reason given")
    return template.format(detail=detail if code in OWN_WORDS else _plain(detail))


def _plain(text: str, limit: int = 500) -> str:
    """Outside words (fal's) shown as plain text on one line: no markdown, links or mentions."""
    flat = " ".join(text.split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return discord.utils.escape_mentions(discord.utils.escape_markdown(flat))


def render(job: Job) -> Rendered:
    """The message for `job` as it stands now."""
    embed = _request_embed(job)
    state = job.state
    if state is JobState.PENDING:
        place = job.bot_queue_position
        where = f"you are **{_place(place)}** in line" if place else "starting"
        return Rendered(job.id, f"⏳ Waiting for a free slot: {where}{_starting(job)}.", embed, WHILE_WAITING)
    if state is JobState.SUBMITTING:
        return Rendered(job.id, "📤 Sending your edit to FLUX.1 Kontext…", embed)
    if state is JobState.QUEUED:
        position = (job.queue_position or 0) + 1
        text = f"🕒 In queue, position **{_place(position, mark='')}**{_starting(job)}."
        return Rendered(job.id, text, embed, WHILE_WAITING)
    if state is JobState.RUNNING:
        started = int(job.started_at or job.created_at)
        note = " Cancel asked: fal usually finishes an edit it has started." if _cancel_came_late(job) else ""
        return Rendered(job.id, f"🎨 Generating… (started <t:{started}:R>){note}", embed)
    if state is JobState.CANCELLED:
        who = f"<@{job.cancelled_by}>" if job.cancelled_by else "the bot"
        return Rendered(job.id, f"🚫 Cancelled by {who}.", embed)
    if state is JobState.FAILED:
        embed.colour = FAILURE_COLOUR
        text = f"❌ {failure_text(job.error_code, job.error_detail)}"
        if job.error_code in PRIVATE_FAILURES:
            return Rendered(job.id, text, embed, private=True)
        return Rendered(job.id, text, embed, ON_FAILURE)
    return _render_result(job, embed)


def _render_result(job: Job, embed: discord.Embed) -> Rendered:
    assert job.result is not None
    shown, withheld = [], 0
    for image in job.result.images:
        if image.nsfw and not job.channel_nsfw:
            withheld += 1
        else:
            shown.append(image)
    if job.result.seed is not None:
        embed.add_field(name="Seed", value=str(job.result.seed))
    timing = _timing(job)
    if timing:
        embed.add_field(name="Time", value=timing)
    notes = []
    if withheld:
        notes.append(
            f"🛡️ {withheld} of {len(job.result.images)} image(s) were flagged by the safety checker and are not shown"
            + (" (age-restricted channels show them behind a spoiler)." if not job.channel_nsfw else ".")
        )
    if any(image.nsfw for image in shown):
        notes.append("⚠️ Flagged by the safety checker: shown behind a spoiler.")
    done = "✅ Done."
    if _cancel_came_late(job):
        done += " The cancel came after fal had started, and fal finishes (and bills) a started edit, so here it is."
    content = "\n".join(notes) if notes else (done if shown else "No image could be shown.")
    return Rendered(job.id, content, embed, ON_RESULT if shown else ON_FAILURE, files=shown)


def _place(place: int, mark: str = "#") -> str:
    """A place in line, exact up to 10 and rounded beyond (about #35): a long line moving one
    place at a time is not worth an edit of every reply at every step."""
    return f"{mark}{place}" if place <= 10 else f"about {mark}{place - place % 5}"


def _starting(job: Job) -> str:
    return f", starting <t:{int(job.starts_at)}:R>" if job.starts_at else ""


def _cancel_came_late(job: Job) -> bool:
    return NOTE_CANCEL_REQUESTED_BY in job.notes


def _request_embed(job: Job) -> discord.Embed:
    embed = discord.Embed(description=_quote(job.prompt), colour=EMBED_COLOUR)
    embed.set_author(name="FLUX.1 Kontext [max]")
    options = _options_text(job.edit.options)
    inputs = len(job.edit.image_urls)
    if inputs > 1:
        options = f"{inputs} images combined · {options}" if options else f"{inputs} images combined"
    embed.add_field(name="Requested by", value=f"<@{job.user_id}>")
    if options:
        embed.add_field(name="Options", value=options, inline=False)
    limited_to = job.notes.get(NOTE_SAFETY_LIMITED_TO)
    if limited_to is not None:
        embed.add_field(
            name="Policy", value=f"Safety tolerance limited to {limited_to} by this server's policy.", inline=False
        )
    footer = f"Job #{job.id}"
    if job.parent_job_id:
        footer += f" · from job #{job.parent_job_id}"
    embed.set_footer(text=footer)
    return embed


def _options_text(options: KontextOptions) -> str:
    shown = []
    for name, label in OPTION_LABELS:
        value = getattr(options, name)
        if value is None or value is False:
            continue
        shown.append(label if value is True else f"{label} {value}")
    return " · ".join(shown)


def _quote(prompt: str) -> str:
    """The prompt as the member wrote it, quoted, with markdown shown as typed: a masked link in a
    prompt is not a link in the bot's reply."""
    escaped = discord.utils.escape_markdown(prompt)
    return "\n".join(f"> {line}" for line in escaped.splitlines() or [""])[:4096]


def _timing(job: Job) -> str | None:
    parts = []
    if job.submitted_at and job.started_at:
        parts.append(f"queued {job.started_at - job.submitted_at:.1f}s")
    if job.result and job.result.inference_seconds:
        parts.append(f"generated in {job.result.inference_seconds:.1f}s")
    elif job.started_at and job.completed_at:
        parts.append(f"generated in {job.completed_at - job.started_at:.1f}s")
    return ", ".join(parts) or None


OUTCOME_MARKS = {JobState.SUCCEEDED: "✅", JobState.FAILED: "❌", JobState.CANCELLED: "🚫"}


def job_log_line(job: Job) -> str:
    """One line for the moderators' log channel: who, where, what, at which tolerance, outcome."""
    prompt = _plain(job.prompt, limit=200)  # one line, no markdown or mentions: it cannot forge entries
    outcome = job.state.value if job.state is not JobState.FAILED else f"failed ({job.error_code})"
    link = f"https://discord.com/channels/{job.guild_id}/{job.channel_id}/{job.message_id}"
    return (
        f"{OUTCOME_MARKS.get(job.state, '•')} Job #{job.id} by <@{job.user_id}> in <#{job.channel_id}> · "
        f"tolerance {job.edit.options.safety_tolerance or '?'} · {outcome} · “{prompt}” · {link}"
    )


def attachment_name(job: Job, index: int, image: ResultImage) -> str:
    extension = EXTENSIONS.get(image.content_type, "png")
    return f"kontext-{job.id}-{index}.{extension}"


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
