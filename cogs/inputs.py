"""Checking what members hand the bot (attachments, prompts) before anything is spent."""

from __future__ import annotations

import discord

from services.images import ACCEPTED_CONTENT_TYPES, declared_image_type
from services.input_images import hosted_on

from .errors import UserFacingError

MAX_PROMPT_LENGTH = 2000


def is_image_attachment(attachment: discord.Attachment) -> bool:
    return declared_image_type(attachment.content_type, attachment.filename) is not None


def image_url(attachment: discord.Attachment, max_bytes: int) -> str:
    """The attachment's URL for fal to fetch, once it is known to be an image fal can read."""
    if not is_image_attachment(attachment):
        kinds = ", ".join(sorted(t.split("/")[1].upper() for t in ACCEPTED_CONTENT_TYPES))
        raise UserFacingError(f"`{attachment.filename}` is not an image Kontext can read. Please attach {kinds}.")
    if attachment.size <= 0:
        raise UserFacingError(f"`{attachment.filename}` is empty.")
    if attachment.size > max_bytes:
        raise UserFacingError(
            f"`{attachment.filename}` is {human_size(attachment.size)}; the limit is {human_size(max_bytes)}."
        )
    return attachment.url


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def clean_prompt(prompt: str) -> str:
    cleaned = prompt.strip()
    if not cleaned:
        raise UserFacingError("Please describe the edit you want in `prompt`.")
    if len(cleaned) > MAX_PROMPT_LENGTH:
        raise UserFacingError(f"The prompt is {len(cleaned)} characters; the limit is {MAX_PROMPT_LENGTH}.")
    return cleaned


def first_image_url(message: discord.Message, max_bytes: int, discord_hosts: frozenset[str]) -> str:
    """The first image of a message, checked as `/kontext` checks its attachments: an image
    attachment, else an embed's image or thumbnail as Discord's media proxy serves it (never the
    address the embed points at, which whoever posted it controls)."""
    for attachment in message.attachments:
        if is_image_attachment(attachment):
            return image_url(attachment, max_bytes)
    for embed in message.embeds:
        for url in (embed.image.proxy_url, embed.thumbnail.proxy_url):
            if url and hosted_on(url, discord_hosts):
                return url
    raise UserFacingError("That message has no image to edit.")
