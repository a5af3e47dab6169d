"""What the end-to-end tests look at, as a member would: the reply, its states, private answers."""

from __future__ import annotations

import base64

from fakes.discord_fake import EPHEMERAL, IS_COMPONENTS_V2, custom_ids, text_displays
from fakes.fal_fake import JobScript

FINAL_MARKS = ("✅", "❌", "🚫", "🛡️", "⚠️", "No image")


def text(message) -> str:
    """What a message says: its content, or on a components-v2 card its first Text Display
    (the status line; `details` has the rest)."""
    if message.flags & IS_COMPONENTS_V2:
        return (text_displays(message.components) or [""])[0]
    return message.content


def details(message) -> str:
    """A result card's details (prompt, who asked, options, seed, time, job number)."""
    assert message.flags & IS_COMPONENTS_V2, "not a card"
    return "\n".join(text_displays(message.components)[1:])


def contents(message) -> list[str]:
    """Every version of a message's text, in the order the member saw them."""
    shown = []
    for snapshot in message.history:
        if snapshot["flags"] & IS_COMPONENTS_V2:
            shown.append((text_displays(snapshot["components"]) or [""])[0])
        else:
            shown.append(snapshot.get("content") or "")
    return shown


def shows(handle, words: str) -> bool:
    message = handle.original
    return message is not None and words in text(message)


def is_final(handle) -> bool:
    message = handle.original
    return message is not None and text(message).startswith(FINAL_MARKS)


async def finished(handle, timeout: float = 15):
    """The reply once it shows a final state (result, failure or cancellation)."""
    await handle.wait_until(is_final, timeout=timeout)
    return handle.original


def private_answer(handle) -> str:
    """The text of an immediate, ephemeral answer to an interaction."""
    callback = handle.callback
    assert callback is not None and callback["type"] == 4, callback
    assert callback["data"]["flags"] & EPHEMERAL
    return callback["data"].get("content") or ""


def fal_job(world, index: int = 0):
    return list(world.fal.jobs.values())[index]


async def admin(world, command: str, user: str = "mod", **options) -> str:
    """Run a /kontext-admin command; returns the private answer, embed fields as `**name**: value`."""
    handle = await world.discord.invoke_slash(f"kontext-admin {command}", options=options, user=user)
    await handle.wait_for_callback()
    text = private_answer(handle)
    for embed in handle.callback["data"].get("embeds", []):
        text += "\n" + "\n".join(f"**{field['name']}**: {field['value']}" for field in embed.get("fields", []))
    return text


def button(message, action: str) -> str:
    """The custom_id of the message's button for `action` (kontext:<action>:<job id>:<key>)."""
    (found,) = [c for c in custom_ids(message.components) if c.startswith(f"kontext:{action}:")]
    return found


def has_button(message, action: str) -> bool:
    return message is not None and any(c.startswith(f"kontext:{action}:") for c in custom_ids(message.components))


def attachment_bytes(world, attachment: dict) -> bytes:
    """What the fake Discord's CDN serves for an attachment."""
    path = "/" + attachment["url"].split("/", 3)[3].split("?", 1)[0]
    return world.discord.cdn_files[path][0]


def data_uri(world, attachment: dict, content_type: str = "image/png") -> str:
    """The durable copy the bot hands fal for a small attachment: its bytes, inline."""
    return f"data:{content_type};base64," + base64.b64encode(attachment_bytes(world, attachment)).decode()


async def outliving_its_reply(world, *, bot_denied: int = 0, script: JobScript | None = None):
    """A job still at fal when its reply's 15-minute token ends, so the bot posts its result
    itself, in a channel where the bot's role is denied `bot_denied` (permission bits). `script`:
    how the job goes at fal (default: a success), as long as it waits a moment in fal's queue."""
    world.fal.default = script or JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2)
    if bot_denied:
        fake = world.discord
        fake.set_permission_overwrite(fake.channel_id, fake.default_guild.bot_role_id, deny=bot_denied)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_token(handle.token)
    return handle
