"""The job record: one row per `/kontext` request, from acceptance to delivery."""

from __future__ import annotations

import enum
import io
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from .fal_queue import FalRequest
from .flux_kontext import KontextEdit

# Keys of a job's notes (Job.notes): what the member is told besides the state.
NOTE_SAFETY_LIMITED_TO = "safety_limited_to"  # the policy lowered the tolerance asked for
NOTE_CANCEL_REQUESTED_BY = "cancel_requested_by"  # a cancel came once fal had started the job
NOTE_UNDELIVERABLE = "undeliverable"  # why the final state could not be shown
NOTE_WITHDRAWN = "withdrawn"  # why nothing more is shown in the channel (its reply was deleted)
NOTE_HANDED_BACK = "handed_back"  # asked out of fal's line, to take its turn in the bot's
NOTE_REPLY_EXPIRING = "reply_expiring"  # the reply's token ends soon: where the result will come (REPLY_EXPIRING_*)
NOTE_PRIVATE_REPLY = "private_reply"  # Discord made the reply ephemeral (the server keeps apps it lacks private)
NOTE_FROM_DEFAULTS = "from_defaults"  # the options filled from the member's defaults (/kontext-settings)
NOTE_PRIVATE_FIRST = "private_first"  # the member sees the result alone first, with Share to channel
NOTE_SHARED_AS = "shared_as"  # the message that shared a private-first result in the channel (the first)
NOTE_SHARED_PARTS = "shared_parts"  # {its message (str id): the channel message that shared it}
NOTE_FAL_SILENT = "fal_silent"  # fal answers nothing about the job: FAL_SILENT_*
NOTE_LATE_BY_DM = "late_by_dm"  # the bot could not post in the channel: the late result came by DM, all of it
NOTE_RECIPE = "recipe"  # a server recipe made the prompt: what members see of it (RecipeNote)

# What fal's silence means for the job (NOTE_FAL_SILENT).
FAL_SILENT_QUEUED = "queued"  # neither its status nor a cancel got through: fal may still run it
FAL_SILENT_STARTED = "started"  # fal runs or ran it (billed): its result is waited for

# Where a result that outlives its reply's token will come (NOTE_REPLY_EXPIRING).
REPLY_EXPIRING_IN_CHANNEL = "channel"
REPLY_EXPIRING_BY_DM = "dm"

# The interaction token of the reply lives 15 minutes; leave a margin for the final upload.
INTERACTION_TOKEN_LIFETIME = 15 * 60
TOKEN_SAFETY_MARGIN = 30


class RecipeNote(TypedDict):
    """A server recipe as a job used it. Its text is its moderators' (a wrapper is hidden from
    members, a complete prompt is offered by its name alone), so members see its name and the
    words they gave it, never the prompt sent."""

    name: str
    words: NotRequired[str]  # a wrapper's: the member's words it took


class JobPlace(enum.StrEnum):
    """Where a job was asked for, which decides whose policy governs it and where the bot may
    show it (platform doc A10; discord-api-docs receiving-and-responding.mdx, Authorizing
    Integration Owners)."""

    # A server that installed the bot: its moderators' policy, its channel.
    SERVER = "server"
    # The member's DM with the bot: the operator's personal policy; the bot may post there.
    BOT_DM = "bot_dm"
    # A group DM, or a server without the bot, where only the member's own install of the app
    # brings it: the operator's personal policy, and only the interaction can show anything.
    EXTERNAL = "external"

    @property
    def personal(self) -> bool:
        """No server governs: the operator's policy for personal use applies."""
        return self is not JobPlace.SERVER

    @property
    def bot_can_post(self) -> bool:
        """The bot may post in the channel with its own token (after the 15-minute token)."""
        return self is not JobPlace.EXTERNAL


class JobState(enum.StrEnum):
    """Where a job stands. Every state a restart needs is stored before the bot acts on it
    (RUNNING is not; SUCCEEDED only once its images are in DATA_DIR: see JobRunner)."""

    PENDING = "pending"  # accepted; waiting for a free slot in the bot's own queue
    SUBMITTING = "submitting"  # submit sent: after a crash here nobody knows whether fal took it
    QUEUED = "queued"  # at fal, waiting in its queue
    RUNNING = "running"  # at fal, generating
    SUCCEEDED = "succeeded"  # result images downloaded, ready to post
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def at_fal(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


@dataclass
class ResultImage:
    size: int
    content_type: str
    nsfw: bool
    width: int | None = None
    height: int | None = None
    # fal's CDN address: where the image is fetched again, and the link offered when the file
    # is over the server's upload limit.
    url: str | None = None
    # Whether a copy is kept in DATA_DIR (see services.results): a result that could not be
    # posted at once is kept there, so neither a wait nor a restart depends on fal still having it.
    on_disk: bool = False
    # Where the image is at hand right now, never stored: its file (the path is derived from the
    # job, never read from the database) or its bytes on their way from fal to Discord.
    path: Path | None = field(default=None, compare=False)
    data: io.BytesIO | None = field(default=None, repr=False, compare=False)

    @property
    def available(self) -> bool:
        """Whether the image can be posted without fetching it again."""
        return self.data is not None or self.path is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "on_disk": self.on_disk,
            "size": self.size,
            "content_type": self.content_type,
            "nsfw": self.nsfw,
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResultImage:
        return cls(
            data["size"],
            data["content_type"],
            data["nsfw"],
            data.get("width"),
            data.get("height"),
            data.get("url"),
            # Rows written before schema 4 stored a path instead of the flag.
            on_disk=bool(data.get("on_disk", data.get("path"))),
        )


@dataclass
class JobResult:
    seed: int | None
    images: list[ResultImage]
    inference_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "images": [image.to_dict() for image in self.images],
            "inference_seconds": self.inference_seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobResult:
        return cls(data.get("seed"), [ResultImage.from_dict(i) for i in data["images"]], data.get("inference_seconds"))


@dataclass
class JobRequest:
    """Everything needed to start a job, gathered by whoever accepted it (the Discord intake)."""

    guild_id: int | None
    channel_id: int
    user_id: int
    application_id: int
    interaction_token: str = field(repr=False)
    interaction_created_at: float
    message_id: int | None
    channel_nsfw: bool
    upload_limit: int
    edit: KontextEdit
    # Policy notes for the member, e.g. {"safety_limited_to": 3}.
    notes: dict[str, Any] = field(default_factory=dict)
    parent_job_id: int | None = None
    place: JobPlace = JobPlace.SERVER
    # The member's Discord locale: everything the bot shows of the job is in its language.
    locale: str = "en-US"
    # The server's preferred locale when the job was asked for (None outside a server, and for
    # jobs from before it was kept): its moderators' log line is in that language when the
    # process writing it does not have the server in its cache (another shard's process took
    # the job over, or a restart resumed it before the server was back in the cache).
    guild_locale: str | None = None
    # A thread's channel, and whether the thread is private (None, False: not a thread, or a job
    # from before they were kept): who may look the job up is decided there once the thread is
    # archived, which takes it out of discord.py's cache.
    parent_channel_id: int | None = None
    private_thread: bool = False
    # The prompt as the member typed it, before a server recipe wrapped it (None: they typed
    # none, e.g. Re-roll): what /kontext's autocomplete offers them again, never a recipe's text.
    member_prompt: str | None = None


@dataclass
class Job(JobRequest):
    id: int = 0
    state: JobState = JobState.PENDING
    created_at: float = field(default_factory=time.time)
    # Place in the bot's own queue while PENDING (1 = next), then fal's queue_position while QUEUED.
    bot_queue_position: int | None = None
    queue_position: int | None = None
    # When it should start (unix time), once fal's account limit lets that be estimated; shown,
    # never stored.
    starts_at: float | None = field(default=None, compare=False)
    request: FalRequest | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    delivered_at: float | None = None
    # Delivery progress, stored as it goes, so a delivery cut short resumes without repeating a
    # message: how many of the result's messages are posted, and whether the last went to the
    # channel as the bot's own post (by DM, see NOTE_LATE_BY_DM).
    delivered_parts: int = 0
    delivered_in_channel: bool = False
    error_code: str | None = None
    error_detail: str | None = None
    cancelled_by: int | None = None
    result: JobResult | None = None
    # In every button's custom_id with the job id: a button from a lost or restored database,
    # whose job id now names another job, matches nothing.
    button_key: str | None = field(default_factory=lambda: secrets.token_hex(4))
    # Every message showing the result (the reply, follow-ups, channel posts), for Delete.
    posted_message_ids: list[int] = field(default_factory=list)
    # The result's images as Discord returned them on the messages that show it (signed CDN
    # URLs that expire, about a day): the history's thumbnails while they last.
    posted_image_urls: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Final and shown to the member: nothing left to do."""
        return self.delivered_at is not None

    def token_valid(self, now: float | None = None) -> bool:
        """Whether the reply can still be edited through the interaction token."""
        age = (now or time.time()) - self.interaction_created_at
        return age < INTERACTION_TOKEN_LIFETIME - TOKEN_SAFETY_MARGIN

    def reply_through(self, token: str, created_at: float) -> None:
        """Edit the reply through a later interaction on it (a button pressed on it, answered as
        an update of it) if its token outlives the one the reply has: past the reply's own 15
        minutes, a Cancel pressed on it shows the job cancelled there, not in a new post."""
        if created_at > self.interaction_created_at:
            self.interaction_token, self.interaction_created_at = token, created_at

    def shared_as(self, part: int) -> int | None:
        """The channel message that shared `part` (one of the messages of a private-first result
        too large for one), if it was shared."""
        parts = self.notes.get(NOTE_SHARED_PARTS)
        if parts is None:  # shared before its parts were told apart: whole
            shared: int | None = self.notes.get(NOTE_SHARED_AS)
            return shared
        found: int | None = parts.get(str(part))
        return found

    # The notes are replaced, never changed in place: copies of the job (a render's) share them.
    def note(self, key: str, value: Any) -> None:
        self.notes = {**self.notes, key: value}

    def drop_note(self, key: str) -> None:
        self.notes = {name: value for name, value in self.notes.items() if name != key}

    @property
    def private_first(self) -> bool:
        return bool(self.notes.get(NOTE_PRIVATE_FIRST))

    @property
    def posts_late_in_channel(self) -> bool:
        """After the reply's token, the result goes to the channel (a reply to the reply), not
        to the member's DMs: where the bot may post, unless the member wanted it privately first."""
        return self.place.bot_can_post and not self.private_first

    @property
    def prompt(self) -> str:
        """The prompt sent to the model."""
        return self.edit.prompt

    @property
    def recipe(self) -> RecipeNote | None:
        """The server recipe that made the prompt (None: none, or a job from before it was kept)."""
        note: RecipeNote | None = self.notes.get(NOTE_RECIPE)
        return note

    @property
    def shown_prompt(self) -> str:
        """The prompt as members are shown it: made by a server recipe, the words they gave it
        (or, for a complete one, its name), never its text."""
        if self.recipe is None:
            return self.prompt
        return self.recipe.get("words") or self.recipe["name"]
