"""Checking what members hand the bot (attachments, prompts) before anything is spent."""

from __future__ import annotations

import discord
from discord import app_commands

from services.flux_kontext import ASPECT_RATIOS
from services.i18n import N_
from services.images import ACCEPTED_CONTENT_TYPES, declared_image_type
from services.input_images import hosted_on

from .errors import UserFacingError

MAX_PROMPT_LENGTH = 2000
# The model's choices, as /kontext and /kontext-settings offer them.
ASPECT_RATIO_CHOICES = [app_commands.Choice(name=ratio, value=ratio) for ratio in ASPECT_RATIOS]
OUTPUT_FORMAT_CHOICES = [app_commands.Choice(name="JPEG", value="jpeg"), app_commands.Choice(name="PNG", value="png")]


def is_image_attachment(attachment: discord.Attachment) -> bool:
    return declared_image_type(attachment.content_type, attachment.filename) is not None


def image_url(attachment: discord.Attachment, max_bytes: int) -> str:
    """The attachment's URL for fal to fetch, once it is known to be an image fal can read."""
    if not is_image_attachment(attachment):
        raise unreadable(attachment)
    if attachment.size <= 0:
        raise UserFacingError(N_("`{name}` is empty."), name=attachment.filename)
    if attachment.size > max_bytes:
        raise UserFacingError(
            N_("`{name}` is {size} MB; the limit is {limit} MB."),
            name=attachment.filename,
            size=megabytes(attachment.size),
            limit=megabytes(max_bytes),
        )
    return attachment.url


def unreadable(attachment: discord.Attachment) -> UserFacingError:
    """What a member is told of a file that is not an image Kontext reads: the kinds it reads."""
    kinds = ", ".join(sorted(t.split("/")[1].upper() for t in ACCEPTED_CONTENT_TYPES))
    return UserFacingError(
        N_("`{name}` is not an image Kontext can read. Please attach {kinds}."), name=attachment.filename, kinds=kinds
    )


def megabytes(size: int) -> str:
    """A size in MB as members read it (0.1 MB at least, so nothing is "0 MB")."""
    return f"{max(size / (1024 * 1024), 0.1):.1f}"


def clean_prompt(prompt: str) -> str:
    cleaned = prompt.strip()
    if not cleaned:
        raise UserFacingError(N_("Please describe the edit you want in `prompt`."))
    if len(cleaned) > MAX_PROMPT_LENGTH:
        raise UserFacingError(
            N_("The prompt is {length} characters; the limit is {limit}."), length=len(cleaned), limit=MAX_PROMPT_LENGTH
        )
    return cleaned


def first_image_url(message: discord.Message, max_bytes: int, discord_hosts: frozenset[str]) -> str:
    """The first image of a message, checked as `/kontext` checks its attachments: an image
    attachment, else an embed's image or thumbnail as Discord's media proxy serves it (never the
    address the embed points at, which whoever posted it controls). A forward has none of its
    own: its images are in its snapshot of the message forwarded."""
    sources: tuple[discord.Message | discord.MessageSnapshot, ...] = (message, *message.message_snapshots)
    attachments = [a for source in sources for a in source.attachments]
    for attachment in attachments:
        if is_image_attachment(attachment):
            return image_url(attachment, max_bytes)
    for embed in (e for source in sources for e in source.embeds):
        for url in (embed.image.proxy_url, embed.thumbnail.proxy_url):
            if url and hosted_on(url, discord_hosts):
                return url
    # A picture Discord shows but Kontext cannot read (AVIF, HEIC…): say which kinds it reads.
    for attachment in attachments:
        if (attachment.content_type or "").startswith("image/"):
            raise unreadable(attachment)
    raise UserFacingError(N_("That message has no image to edit."))
