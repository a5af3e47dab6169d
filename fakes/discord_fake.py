"""A fake Discord (REST under /api/v10 + gateway websocket + CDN) on 127.0.0.1 for tests.

Faithful enough that real, unmodified discord.py 2.7.1 (``commands.AutoShardedBot``, one or several
shards, in one or several processes) runs against it.
Facts used here are from /work/shared/reference/discord-platform.md (Part B).

* Every JSON request body (or multipart ``payload_json``) is validated against Discord's OpenAPI
  spec (``discord_spec/openapi.json``). Invalid bodies get 400/50035 and are appended to
  ``fake.violations``; so are unknown routes (404) and other malformed-form errors (too many
  attachments, ``attachments`` entries without an uploaded file).
* Platform rules (3 s callback window, 15 min token, double ack, file size, auth) answer like
  Discord and are recorded in ``fake.rejections`` (not violations: tests provoke them on purpose).
* Several servers (``add_guild`` -> ``FakeGuild``; the first one is the default guild that
  ``guild_id``, ``channel_id``, ``members``, ... keep meaning), each with its own channels, roles and
  per-guild member records; the bot joins (``add_bot_to_guild``: GUILD_CREATE) and leaves
  (``DELETE /users/@me/guilds/{id}``: GUILD_DELETE) per guild.
* A sharded gateway: ``shard_count`` / ``max_concurrency`` in ``GET /gateway/bot``; each session
  gets READY/GUILD_CREATE for the guilds of its ``[shard_id, num_shards]`` (``(guild_id >> 22) %
  num_shards``); ``dispatch`` routes by guild (no guild: shard 0); RESUME per session; IDENTIFY
  limited to one per 5 s per bucket ``shard_id % max_concurrency`` (Invalid Session, op 9).
* Interaction contexts and installs (guild install, user install, the bot's DM, group DMs),
  autocomplete (type 4 / callback 8), components v2 (``IS_COMPONENTS_V2``) and locales (command
  localizations keyed by Discord's locales only).
* The bot's DMs: ``POST /users/@me/channels`` opens one; posting there needs a shared server or
  the user's install of the app, and DMs the user has not closed (``dms_closed``), else 50007.
* Permissions in a server channel, computed as Discord documents it: roles, then the channel's
  overwrites (``set_permission_overwrite``); a thread's are its parent's, and a private thread is
  seen only by its members (``add_thread_member``) and those with MANAGE_THREADS. The bot's
  (``bot_permissions``) are in ``app_permissions`` and enforced on the bot-token message routes
  (50001 / 50013); the member's (``member_permissions_in``) in an interaction's
  ``member.permissions`` and ``channel.permissions``, and a member who cannot see a channel (or
  may not use app commands there) cannot act in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as _dt
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import struct
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

SPEC_PATH = os.path.join(os.path.dirname(__file__), "discord_spec", "openapi.json")

# Permission bits
CREATE_INSTANT_INVITE = 1 << 0
ADMINISTRATOR = 1 << 3
MANAGE_CHANNELS = 1 << 4
MANAGE_GUILD = 1 << 5
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
MENTION_EVERYONE = 1 << 17
USE_EXTERNAL_EMOJIS = 1 << 18
CHANGE_NICKNAME = 1 << 26
USE_APPLICATION_COMMANDS = 1 << 31
MANAGE_THREADS = 1 << 34
SEND_MESSAGES_IN_THREADS = 1 << 38

MEMBER_PERMISSIONS = (
    VIEW_CHANNEL
    | SEND_MESSAGES
    | ATTACH_FILES
    | EMBED_LINKS
    | READ_MESSAGE_HISTORY
    | ADD_REACTIONS
    | USE_EXTERNAL_EMOJIS
    | USE_APPLICATION_COMMANDS
    | SEND_MESSAGES_IN_THREADS
    | CREATE_INSTANT_INVITE
    | CHANGE_NICKNAME
)
MOD_PERMISSIONS = MEMBER_PERMISSIONS | MANAGE_GUILD | MANAGE_MESSAGES | MANAGE_CHANNELS | MENTION_EVERYONE
BOT_PERMISSIONS = MEMBER_PERMISSIONS  # app_permissions default: view, send, attach, embed, ...

USE_EXTERNAL_APPS = 1 << 50
ALL_PERMISSIONS = (1 << 51) - 1
THREAD_TYPES = (10, 11, 12)  # announcement, public and private threads (docs resources/channel.mdx)
PRIVATE_THREAD = 12

# What an app may do where it has no bot member (platform doc A10; docs
# receiving-and-responding.mdx Interaction Structure note ***; change-log 2022-06-29 and
# 2024-03-18): the permissions usable in interaction responses.
DM_APP_PERMISSIONS = ATTACH_FILES | EMBED_LINKS | MENTION_EVERYONE | USE_EXTERNAL_EMOJIS  # DM with the bot
PRIVATE_APP_PERMISSIONS = ATTACH_FILES | EMBED_LINKS | MENTION_EVERYONE  # (G)DMs with other users
USER_APP_PERMISSIONS = ATTACH_FILES | EMBED_LINKS | MENTION_EVERYONE | USE_EXTERNAL_EMOJIS

EPHEMERAL = 1 << 6
LOADING = 1 << 7
IS_COMPONENTS_V2 = 1 << 15
# Message reference types (resources/message.mdx): a reply, and a forward.
REFERENCE_DEFAULT, REFERENCE_FORWARD = 0, 1
MAX_COMPONENTS_V2 = 40  # docs components/reference.mdx (intro)
MAX_TEXT_DISPLAY_TOTAL = 4000  # all Text Displays of a message together ([3rd] discord-api-docs PR #8562)
USER_INSTALL_FOLLOWUP_LIMIT = 5  # docs receiving-and-responding.mdx (Create Followup Message)
IDENTIFY_INTERVAL = 5.0  # docs events/gateway.mdx (Session Start Limit: "per 5 seconds")
MAX_GUILDS_PER_SHARD = 2500  # docs events/gateway.mdx (Sharding)

# Interaction context types and installation types (docs receiving-and-responding.mdx,
# resources/application.mdx).
GUILD_CONTEXT, BOT_DM_CONTEXT, PRIVATE_CHANNEL_CONTEXT = 0, 1, 2
GUILD_INSTALL, USER_INSTALL = 0, 1
_CONTEXT_NAMES = {
    "guild": GUILD_CONTEXT,
    "user_guild": GUILD_CONTEXT,
    "bot_dm": BOT_DM_CONTEXT,
    "dm": BOT_DM_CONTEXT,
    "private_channel": PRIVATE_CHANNEL_CONTEXT,
    "group_dm": PRIVATE_CHANNEL_CONTEXT,
}

# docs reference.mdx (Locales)
_LOCALE_CODES = "id da de en-GB en-US es-ES es-419 fr hr it lt hu nl no pl pt-BR ro fi sv-SE vi tr cs el bg ru uk hi th"
LOCALES = frozenset(f"{_LOCALE_CODES} zh-CN ja zh-TW ko".split())
DEFAULT_SIZE_LIMIT = 10 * 1024 * 1024
CALLBACK_WINDOW = 3.0
# Signed attachment CDN URLs (platform doc A8): `ex` (hex expiry), `is` (hex issue time), `hm`
# (signature). The lifetime is not documented; about 24 h is commonly observed.
CDN_URL_LIFETIME = 86400
CDN_GONE_TEXT = "This content is no longer available."
TOKEN_LIFETIME = 15 * 60.0
# docs resources/message.mdx (Create Message, enforce_nonce): "checked for uniqueness in the past
# few minutes. If another message was created by the same author with the same nonce, that
# message will be returned and no new message will be created." The fake takes the short end.
NONCE_WINDOW = 120.0
JOINED_AT = "2026-01-01T00:00:00+00:00"

_snow_counter = itertools.count()


def snowflake() -> str:
    """Real-time, unique snowflake (discord epoch ms << 22 | counter)."""
    ms = int(time.time() * 1000) - 1420070400000
    return str((ms << 22) | (next(_snow_counter) & 0x3FFFFF))


def snowflake_on_shard(shard_id: int, num_shards: int) -> str:
    """A real-time snowflake (at most `num_shards` ms old) whose guild routes to `shard_id`:
    Discord's sharding formula is `(guild_id >> 22) % num_shards` (docs events/gateway.mdx)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard {shard_id} is not in 0..{num_shards - 1}")
    ms = int(time.time() * 1000) - 1420070400000
    ms -= (ms - shard_id) % num_shards
    return str((ms << 22) | (next(_snow_counter) & 0x3FFFFF))


def shard_of(guild_id: int | str | None, num_shards: int) -> int:
    """The shard a guild's events go to; events without a guild go to shard 0 (docs events/gateway.mdx)."""
    return 0 if guild_id is None else (int(guild_id) >> 22) % num_shards


class CommandNotAvailable(LookupError):
    """Discord would not offer this command there (contexts / integration_types / scope), so no
    interaction is ever sent. The fake records a violation and raises this instead of dispatching."""


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat()


class ApiError(Exception):
    def __init__(self, status: int, body: dict | None, headers: dict | None = None, violation: str | None = None):
        super().__init__(f"{status} {body}")
        self.status, self.body, self.headers, self.violation = status, body, headers or {}, violation


def _form_error(path: list, code: str, message: str) -> dict:
    out: dict = {"_errors": [{"code": code, "message": message}]}
    for p in reversed(path):
        out = {str(p): out}
    return out


def invalid_form(errors: dict, why: str) -> ApiError:
    return ApiError(400, {"code": 50035, "message": "Invalid Form Body", "errors": errors}, violation=why)


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return struct.unpack(">II", data[16:24])
        if data[:2] == b"\xff\xd8":
            i = 2
            while i < len(data):
                if data[i] != 0xFF:
                    i += 1
                    continue
                marker = data[i + 1]
                seglen = struct.unpack(">H", data[i + 2 : i + 4])[0]
                if marker in (0xC0, 0xC1, 0xC2):
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                i += 2 + seglen
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            import io

            from PIL import Image

            return Image.open(io.BytesIO(data)).size
    except Exception:
        pass
    return None, None


# --------------------------------------------------------------------------------------------------
# OpenAPI validation
# --------------------------------------------------------------------------------------------------


def _patch_spec(spec: dict) -> None:
    """Relaxations of the published spec, each a documented mismatch with what Discord accepts.

    1. Snowflakes: the spec says string with a digit pattern; Discord also accepts JSON integers,
       and discord.py sends ints (attachment placeholder ids ``{"id": 0}``, message_reference ids).
    2. ``default_member_permissions`` (platform doc A10): discord.py sends an int; Discord documents a
       string. Accept both (this spec version already says integer; strings are accepted too).
    """
    schemas = spec["components"]["schemas"]
    sf = schemas["SnowflakeType"]
    schemas["SnowflakeType"] = {"anyOf": [dict(sf), {"type": "integer", "minimum": 0}]}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and "default_member_permissions" in props:
                props["default_member_permissions"] = {
                    "anyOf": [props["default_member_permissions"], {"type": "string", "pattern": "^[0-9]+$"}]
                }
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schemas)


class SpecValidator:
    _cache: dict[str, SpecValidator] = {}

    def __init__(self, path: str = SPEC_PATH):
        from referencing import Registry
        from referencing.jsonschema import DRAFT202012

        with open(path, "rb") as f:
            self.spec = json.load(f)
        _patch_spec(self.spec)
        self.uri = "urn:discord-openapi"
        self.registry: Registry[Any] = Registry().with_resource(self.uri, DRAFT202012.create_resource(self.spec))
        self.validators: dict[tuple[str, str], Any] = {}
        self._valid_cache: dict[tuple, bool] = {}
        # path templates -> regex; literal segments beat parameters (@original vs {message_id})
        routes = []
        for tmpl, item in self.spec["paths"].items():
            segs = tmpl.strip("/").split("/")
            rx = "^/" + "/".join("[^/]+" if s.startswith("{") else re.escape(s) for s in segs) + "$"
            nparams = sum(s.startswith("{") for s in segs)
            methods = {m.upper() for m in item if m in ("get", "put", "post", "patch", "delete")}
            routes.append((nparams, tmpl, re.compile(rx), methods))
        routes.sort(key=lambda r: r[0])
        self.routes = routes

    @classmethod
    def shared(cls, path: str = SPEC_PATH) -> SpecValidator:
        if path not in cls._cache:
            cls._cache[path] = cls(path)
        return cls._cache[path]

    def match(self, method: str, path: str) -> tuple[str | None, bool]:
        """-> (template or None, method allowed)."""
        found = None
        for _, tmpl, rx, methods in self.routes:
            if rx.match(path):
                if method in methods:
                    return tmpl, True
                found = found or tmpl
        return found, False

    def validator(self, tmpl: str, method: str):
        key = (tmpl, method)
        if key not in self.validators:
            from jsonschema import Draft202012Validator

            op = self.spec["paths"][tmpl][method.lower()]
            content = (op.get("requestBody") or {}).get("content") or {}
            if "application/json" in content:
                ptr = "/".join(
                    p.replace("~", "~0").replace("/", "~1")
                    for p in ["paths", tmpl, method.lower(), "requestBody", "content", "application/json", "schema"]
                )
                ref = self.uri + "#/" + urllib.parse.quote(ptr, safe="/~@")
                self.validators[key] = Draft202012Validator({"$ref": ref}, registry=self.registry)
            else:
                self.validators[key] = None
        return self.validators[key]

    def validate(self, tmpl: str, method: str, body: Any) -> dict | None:
        """Return a Discord-style ``errors`` dict, or None if valid."""
        v = self.validator(tmpl, method)
        if v is None:
            return None
        try:  # bodies repeat a lot (progress edits): remember the ones already found valid
            key = (tmpl, method, json.dumps(body, sort_keys=True))
        except (TypeError, ValueError):
            key = None
        if key is not None and key in self._valid_cache:
            return None
        errs = list(itertools.islice(v.iter_errors(body), 20))
        if not errs:
            if key is not None:
                if len(self._valid_cache) > 4096:
                    self._valid_cache.clear()
                self._valid_cache[key] = True
            return None
        from jsonschema.exceptions import best_match

        errors: dict = {}
        for e in [best_match(errs)] + errs[:4]:
            leaf = _form_error(list(e.absolute_path), "BASE_TYPE_" + str(e.validator).upper(), e.message[:300])
            _deep_merge(errors, leaf)
        return errors


def _deep_merge(a: dict, b: dict) -> None:
    for k, v in b.items():
        if k == "_errors":
            a.setdefault("_errors", [])
            for item in v:
                if item not in a["_errors"]:
                    a["_errors"].append(item)
        elif isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_merge(a[k], v)
        else:
            a[k] = v


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict
    headers: dict
    json: Any
    files: dict  # field name -> (filename, bytes)
    time: float
    status: int = 0  # 0 while unanswered (or held by a "hang" fault); 499: the client went away mid-body
    response: Any = None


class FakeMessage:
    def __init__(
        self,
        fake: FakeDiscord,
        channel_id: str,
        *,
        author: dict,
        type: int = 0,
        webhook_id: str | None = None,
        interaction_metadata: dict | None = None,
        guild_id: str | None = None,
    ):
        self.fake = fake
        self.id = snowflake()
        self.channel_id = channel_id
        self.guild_id = guild_id
        self.author = author
        self.type = type
        self.webhook_id = webhook_id
        self.interaction_metadata = interaction_metadata
        self.content = ""
        self.embeds: list = []
        self.components: list = []
        self.attachments: list = []
        self.files: dict[str, bytes] = {}
        self._data_by_att_id: dict[str, bytes] = {}
        self.flags = 0
        self.allowed_mentions: dict | None = None
        self.message_reference: dict | None = None
        # A forward: the forwarded message's content as it was, its own fields left empty.
        self.message_snapshots: list[dict] = []
        self.tts = False
        self.deleted = False
        self.timestamp = _now_iso()
        self.edited_timestamp: str | None = None
        self.history: list[dict] = []
        self.interaction: InteractionHandle | None = None

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & LOADING)

    def snapshot(self, event: str) -> dict:
        return {
            "event": event,
            "time": time.monotonic(),
            "content": self.content,
            "embeds": copy.deepcopy(self.embeds),
            "components": copy.deepcopy(self.components),
            "attachments": copy.deepcopy(self.attachments),
            "files": dict(self.files),
            "flags": self.flags,
            "allowed_mentions": copy.deepcopy(self.allowed_mentions),
            "deleted": self.deleted,
        }

    def to_payload(self) -> dict:
        p = {
            "id": self.id,
            "channel_id": self.channel_id,
            "author": copy.deepcopy(self.author),
            "type": self.type,
            "content": self.content,
            "timestamp": self.timestamp,
            "edited_timestamp": self.edited_timestamp,
            "tts": self.tts,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "mention_channels": [],
            "embeds": copy.deepcopy(self.embeds),
            # Discord refreshes signed CDN URLs in the payloads it hands out (platform doc A8)
            "attachments": [self.fake.refresh_attachment(a) for a in self.attachments],
            "components": self._components_payload(),
            "pinned": False,
            "flags": self.flags,
            "reactions": [],
        }
        if self.webhook_id:
            p["webhook_id"] = self.webhook_id
            p["application_id"] = self.fake.application_id
        if self.interaction_metadata:
            p["interaction_metadata"] = copy.deepcopy(self.interaction_metadata)
        if self.message_reference:
            p["message_reference"] = copy.deepcopy(self.message_reference)
            ref = self.fake.messages.get(str(self.message_reference.get("message_id")))
            if ref is not None and not ref.deleted and self.message_reference.get("type", 0) == REFERENCE_DEFAULT:
                p["referenced_message"] = ref.to_payload()
        if self.message_snapshots:
            p["message_snapshots"] = [
                {
                    "message": {
                        **copy.deepcopy(m),
                        "attachments": [self.fake.refresh_attachment(a) for a in m["attachments"]],
                    }
                }
                for m in self.message_snapshots
            ]
        if self.guild_id:
            p["guild_id"] = self.guild_id
        return p

    def _components_payload(self) -> list:
        comps = copy.deepcopy(self.components)
        if self.flags & IS_COMPONENTS_V2:
            for media in _media_dicts(comps):  # signed CDN URLs are refreshed like attachments'
                for k in ("url", "proxy_url"):
                    if isinstance(media.get(k), str):
                        media[k] = self.fake.refresh_cdn_url(media[k])
        return comps

    def __repr__(self) -> str:
        return f"<FakeMessage id={self.id} content={self.content!r} flags={self.flags} deleted={self.deleted}>"


class InteractionHandle:
    def __init__(self, fake: FakeDiscord, payload: dict, user: dict):
        self.fake = fake
        self.payload = payload
        self.id: str = payload["id"]
        self.token: str = payload["token"]
        self.type: int = payload["type"]
        self.user = user
        self.channel_id: str | None = payload.get("channel_id")
        self.attachment_size_limit: int = payload["attachment_size_limit"]
        self.callback: dict | None = None
        self.callback_files: dict = {}
        self.original: FakeMessage | None = None
        # Its response is the message it was pressed on (callback type 6 or 7), not one it sent.
        self.responded_on_source = False
        self.followups: list[FakeMessage] = []
        self.dispatched_at = time.monotonic()
        self.age_offset = 0.0
        self._loading_untouched = False  # type 5 defer with no edit yet
        self.source_message_id: str | None = (payload.get("message") or {}).get("id")
        self.context: int | None = payload.get("context")
        self.owners: dict[str, str] = dict(payload.get("authorizing_integration_owners") or {})
        self.guild_id: str | None = payload.get("guild_id")
        self.locale: str | None = payload.get("locale")
        self.followup_calls = 0  # successful POSTs to the followup endpoint
        self.shard: tuple[int, int] | None = None  # the gateway shard it was dispatched on
        self.session_id: str | None = None
        self.place: _Place | None = None

    @property
    def user_install_only(self) -> bool:
        """Authorized only by a user install (the app is not installed where it was used): such
        interactions get at most 5 followups (docs receiving-and-responding.mdx)."""
        return set(self.owners) == {str(USER_INSTALL)}

    @property
    def choices(self) -> list | None:
        """The autocomplete choices the app answered with (callback type 8)."""
        if self.callback and self.callback.get("type") == 8:
            return (self.callback.get("data") or {}).get("choices")
        return None

    @property
    def age(self) -> float:
        return time.monotonic() - self.dispatched_at + self.age_offset

    @property
    def modal(self) -> dict | None:
        if self.callback and self.callback.get("type") == 9:
            return self.callback.get("data")
        return None

    async def wait_for_callback(self, timeout: float = 5) -> dict:
        await self.wait_until(lambda h: h.callback is not None, timeout)
        return self.callback  # type: ignore[return-value]

    async def wait_until(self, predicate: Callable[[InteractionHandle], bool], timeout: float = 10) -> None:
        await self.fake.wait_until(lambda: predicate(self), timeout)

    def __repr__(self) -> str:
        return f"<InteractionHandle id={self.id} type={self.type} callback={self.callback}>"


class FakeGuild:
    """One server: its roles (@everyone has the guild's id), channels and per-guild member
    records ({"user", "roles"}; a member's permissions come from its roles, as on Discord).
    `bot_member`: the bot user was added (guild install); `bot_left`: it left since
    (DELETE /users/@me/guilds/{id})."""

    def __init__(
        self,
        guild_id: str,
        name: str,
        premium_tier: int = 0,
        preferred_locale: str = "en-US",
        bot_member: bool = True,
    ):
        self.id = guild_id
        self.info: dict[str, Any] = {"id": guild_id, "name": name, "owner_id": None}
        self.premium_tier = premium_tier
        self.preferred_locale = preferred_locale
        self.features: list[str] = []
        self.roles: dict[str, dict] = {}
        self.channels: dict[str, dict] = {}
        self.members: dict[str, dict] = {}
        self.bot_member = bot_member
        self.bot_left = False
        # Server setting "Use External Apps" (docs change-log 2024-06-27): when off, replies of a
        # user-installed app that is not installed in the server are ephemeral.
        self.use_external_apps = True
        self.channel_id: str | None = None  # the default text channel
        # Who has joined each thread (thread id -> user ids): a private thread is seen only by
        # them and by those with MANAGE_THREADS (docs resources/channel.mdx, Channel Types).
        self.thread_members: dict[str, set[str]] = {}
        # The role Discord makes for a bot added with permissions (managed, tags.bot_id): where
        # the bot's own permissions come from (see FakeDiscord.bot_permissions).
        self.bot_role_id: str | None = None

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def owner_id(self) -> str | None:
        return self.info["owner_id"]

    @property
    def bot_present(self) -> bool:
        """The bot user is in the guild now: it gets its events and may use its REST routes."""
        return self.bot_member and not self.bot_left

    def __repr__(self) -> str:
        return f"<FakeGuild id={self.id} name={self.name!r} bot_present={self.bot_present}>"


class GatewaySession:
    """One identified gateway session (RESUME re-attaches a new socket to it)."""

    def __init__(self, session_id: str, shard: tuple[int, int], ws: web.WebSocketResponse):
        self.session_id = session_id
        self.shard = shard
        self.ws: web.WebSocketResponse | None = ws
        self.seq = 0
        self.identified_at = time.monotonic()
        self.ready: dict | None = None
        self.guild_ids: list[str] = []  # guilds sent in READY (GUILD_CREATE followed for each)

    def covers(self, guild_id: str | None) -> bool:
        i, n = self.shard
        return shard_of(guild_id, n) == i

    def __repr__(self) -> str:
        return f"<GatewaySession {self.session_id[:8]} shard={list(self.shard)} seq={self.seq}>"


@dataclass
class _Place:
    """Where an interaction happens and who authorized the app there."""

    context: int
    guild: FakeGuild | None
    channel: dict
    owners: dict[str, str]
    app_permissions: int
    installed: bool  # the app is installed where it is used (guild install, or the bot's DM)


# --------------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------------


class FakeDiscord:
    def __init__(
        self,
        token: str = "test-token",
        application_id: int | str | None = None,
        spec_validation: bool = True,
        spec_path: str = SPEC_PATH,
        bot_name: str = "KontextBot",
        heartbeat_interval: int = 41250,
    ):
        self.token = token
        self.application_id = str(application_id or snowflake())
        self.spec_validation = spec_validation
        self.spec = SpecValidator.shared(spec_path) if spec_validation else None
        self.heartbeat_interval = heartbeat_interval
        self.bot_user = {
            "id": self.application_id,
            "username": bot_name,
            "discriminator": "0",
            "global_name": None,
            "avatar": None,
            "bot": True,
            "public_flags": 0,
            "flags": 0,
            "verified": True,
            "mfa_enabled": False,
        }
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

        self.violations: list[str] = []
        self.rejections: list[tuple[int, dict | None, str]] = []  # (status, body, "METHOD path")
        self.requests: list[RecordedRequest] = []
        self.events: list[tuple[float, str, Any]] = []
        self.messages: dict[str, FakeMessage] = {}
        self.interactions: dict[str, InteractionHandle] = {}  # by id
        self._by_token: dict[str, InteractionHandle] = {}
        self.commands: dict[str, dict] = {}  # name -> command json (global + guild merged)
        self.global_commands: dict[str, dict] = {}
        self.guild_commands: dict[str, dict[str, dict]] = {}
        self.cdn_files: dict[str, tuple[bytes, str]] = {}  # cdn path -> (data, content type)
        self.cdn_lifetimes: dict[str, float] = {}  # cdn path -> lifetime of its signed URLs (s)
        # How long the signed URLs of files uploaded to messages last (undocumented; about a day):
        # a test shortens it to see them expire in real time, as the bot's clock sees it.
        self.upload_url_lifetime: float = CDN_URL_LIFETIME
        self.cdn_clock_offset = 0.0  # the CDN's clock = time.time() + this (advance_cdn_clock)
        self._cdn_secret = secrets.token_bytes(16)
        self._cdn_max_ex = 0
        self._faults: list[dict] = []
        # nonce -> the message the bot created with it and when (enforce_nonce; the bot is the
        # only author posting through the API)
        self._nonces: dict[str, tuple[FakeMessage, float]] = {}
        self._hang_release = asyncio.Event()
        self._hanging = 0

        # gateway state
        self._all_ws: list[web.WebSocketResponse] = []
        self.gateway_outage = False  # see start_gateway_outage
        self.session_id: str | None = None  # the newest session's id
        self.sessions: dict[str, GatewaySession] = {}  # every session, for RESUME
        self._attached: list[GatewaySession] = []  # sessions with a live socket, oldest first
        self.identify_count = 0  # accepted IDENTIFYs (each got READY)
        self.identify_payloads: list[dict] = []
        # every IDENTIFY: {"shard": [i, n], "time": monotonic, "wall": unix, "accepted": bool,
        # "reason": str | None, "session_id": str | None}
        self.identifies: list[dict] = []
        self.identifies_by_shard: dict[int, list[float]] = {}  # shard id -> monotonic times accepted
        self.gateway_rejections: list[dict] = []  # {"shard", "op" or "close", "reason"}
        self.gateway_received: list[dict] = []
        # GET /gateway/bot (docs events/gateway.mdx): recommended shards, identify concurrency.
        # Discord allows one IDENTIFY per `identify_interval` s per bucket `shard_id % max_concurrency`.
        self.shard_count = 1
        self.max_concurrency = 1
        self.identify_interval = IDENTIFY_INTERVAL
        # True: a too-fast IDENTIFY gets Invalid Session (op 9), as Discord documents. None (auto):
        # enforced once sharding is in play (shard_count or max_concurrency > 1, or an IDENTIFY
        # with num_shards > 1); a lone unsharded connection is only recorded in
        # identify_limit_breaches, because discord.py reconnects after op 9 to its built-in
        # DEFAULT_GATEWAY (wss://gateway.discord.gg), which a bot pointed at this fake only by
        # Route.BASE cannot reach, so quick restarts in tests would end the bot. False: record only.
        self.enforce_identify_limit: bool | None = None
        self.identify_limit_breaches: list[dict] = []  # every too-fast IDENTIFY, enforced or not
        self.max_guilds_per_shard = MAX_GUILDS_PER_SHARD
        self._bucket_last_identify: dict[int, float] = {}
        self._identified = asyncio.Event()
        self._commands_synced = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

        # world
        # The app's supported installation contexts (docs change-log 2024-06-27: new apps default
        # to both "User Install" and "Guild Install"; resources/application.mdx still says guild
        # only). A command synced without integration_types gets these.
        self.app_integration_types: list[int] = [GUILD_INSTALL, USER_INSTALL]
        self.users: dict[str, dict] = {}  # user id -> user object (every guild's members, DM users)
        self.guilds: dict[str, FakeGuild] = {}  # the first one is the default guild
        self.user_installs: set[str] = set()  # users who installed the app to their account
        self.private_channels: dict[str, dict] = {}  # DM / group DM channel objects by id
        self.dm_channels: dict[str, str] = {}  # user id -> DM channel id (with the bot)
        self.group_dms: dict[str, str] = {}  # user id -> a group DM channel id (without the bot)
        self._bot_dm_ids: set[str] = set()  # private channels the bot is a recipient of
        # Users who turned off DMs from apps and server members (privacy settings): the bot's
        # messages to them get 50007.
        self.dms_closed: set[str] = set()
        self._messages_by_channel: dict[str, list[FakeMessage]] = {}
        self.deleted_channels: set[str] = set()  # see delete_channel
        self.guild_id = snowflake()
        self.channel_id = snowflake()
        self.nsfw_channel_id = snowflake()
        self.default_guild = self._new_guild(self.guild_id, "Test Guild")
        self.add_channel("general", channel_id=self.channel_id)
        self.add_channel("nsfw-art", nsfw=True, channel_id=self.nsfw_channel_id)
        self.alice = self.add_member(name="alice", permissions=MEMBER_PERMISSIONS)
        self.mod = self.add_member(name="mod", permissions=MOD_PERMISSIONS)
        # the owner implicitly has every permission, so it is a separate member (not "mod")
        self.owner = self.add_member(name="owner", permissions=ADMINISTRATOR)
        self.guild["owner_id"] = self.owner["id"]

    # ---------------------------------------------------------------- the default guild
    # These keep meaning "the first guild", as before there were several.
    @property
    def guild(self) -> dict[str, Any]:
        return self.default_guild.info

    @property
    def roles(self) -> dict[str, dict]:
        return self.default_guild.roles

    @property
    def channels(self) -> dict[str, dict]:
        return self.default_guild.channels

    @property
    def members(self) -> dict[str, dict]:
        return self.default_guild.members

    @property
    def premium_tier(self) -> int:
        return self.default_guild.premium_tier

    @premium_tier.setter
    def premium_tier(self, value: int) -> None:
        self.default_guild.premium_tier = value

    @property
    def bot_left_guild(self) -> bool:
        return self.default_guild.bot_left

    @bot_left_guild.setter
    def bot_left_guild(self, value: bool) -> None:
        self.default_guild.bot_left = value

    # ---------------------------------------------------------------- world building
    @staticmethod
    def _role_obj(rid: str, name: str, permissions: int, position: int) -> dict:
        return {
            "id": rid,
            "name": name,
            "permissions": str(permissions),
            "position": position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "flags": 0,
            "icon": None,
            "unicode_emoji": None,
            "description": None,
        }

    def _new_guild(
        self, gid: str, name: str, premium_tier: int = 0, preferred_locale: str = "en-US", bot_member: bool = True
    ) -> FakeGuild:
        if preferred_locale not in LOCALES:
            raise ValueError(f"{preferred_locale!r} is not one of Discord's locales")
        g = FakeGuild(gid, name, premium_tier, preferred_locale, bot_member)
        g.roles[gid] = self._role_obj(gid, "@everyone", 0, 0)
        bot_role = self._role_obj(snowflake(), str(self.bot_user["username"]), BOT_PERMISSIONS, 1)
        bot_role.update(managed=True, tags={"bot_id": self.application_id})
        g.roles[bot_role["id"]] = bot_role
        g.bot_role_id = bot_role["id"]
        self.guilds[gid] = g
        return g

    def get_guild(self, guild: Any = None) -> FakeGuild:
        """A FakeGuild by object, id or name; None means the default (first) guild."""
        if guild is None:
            return self.default_guild
        if isinstance(guild, FakeGuild):
            return guild
        key = str(guild["id"] if isinstance(guild, dict) else guild)
        if key in self.guilds:
            return self.guilds[key]
        for g in self.guilds.values():
            if g.name == key:
                return g
        raise KeyError(f"unknown guild {guild!r}")

    def add_guild(
        self,
        name: str | None = None,
        owner: Any = None,
        premium_tier: int = 0,
        preferred_locale: str = "en-US",
        *,
        shard: tuple[int, int] | None = None,
        bot: bool = True,
        guild_id: int | str | None = None,
        channel_name: str = "general",
    ) -> FakeGuild:
        """Another server, with @everyone, a default text channel (`guild.channel_id`) and its owner
        as a member (`owner`: an existing user, or None for a new user "owner<N>").

        `shard=(i, n)` picks a real-time snowflake that Discord's formula routes to shard i of n.
        `bot=False`: the bot is not in it (only a member may have installed the app to their
        account); `await add_bot_to_guild(g)` adds it later. With `bot=True` while the bot is
        connected, the guild's shard gets a GUILD_CREATE (the bot was just added)."""
        if guild_id is not None and shard is not None:
            raise ValueError("give guild_id or shard, not both")
        gid = str(guild_id) if guild_id is not None else (snowflake_on_shard(*shard) if shard else snowflake())
        if gid in self.guilds:
            raise ValueError(f"guild {gid} exists")
        n = len(self.guilds) + 1
        g = self._new_guild(gid, name or f"Guild {n}", premium_tier, preferred_locale, bot)
        self.add_channel(channel_name, guild=g)
        if owner is None:
            owner_user = self.add_member(name=f"owner{n}", permissions=ADMINISTRATOR, guild=g)
        else:
            uid = self._resolve_user(owner)["id"]
            owner_user = self.add_member(user_id=uid, permissions=MEMBER_PERMISSIONS, guild=g)
        g.info["owner_id"] = owner_user["id"]
        if bot and self._route(gid) is not None:
            self._spawn(self._dispatch_if_connected("GUILD_CREATE", self._join_payload(g)))
        return g

    async def add_bot_to_guild(self, guild: Any) -> FakeGuild:
        """The bot is added to (or rejoins) a server: GUILD_CREATE goes to that guild's shard, so
        discord.py fires on_guild_join. Without a connected shard for it, READY will list it."""
        g = self.get_guild(guild)
        g.bot_member, g.bot_left = True, False
        await self._dispatch_if_connected("GUILD_CREATE", self._join_payload(g))
        return g

    def _join_payload(self, g: FakeGuild) -> dict:
        # A guild the bot just joined comes without `unavailable` (lazy-loaded ones after READY say
        # false); discord.py fires on_guild_join only then (state.py parse_guild_create).
        payload = self.guild_payload(g)
        payload.pop("unavailable", None)
        return payload

    def add_role(self, name: str, permissions: int = 0, role_id: str | None = None, guild: Any = None) -> dict:
        g = self.get_guild(guild)
        rid = str(role_id or snowflake())
        role = self._role_obj(rid, name, permissions, len(g.roles))
        g.roles[rid] = role
        return role

    def add_channel(
        self, name: str, nsfw: bool = False, channel_id: str | None = None, type: int = 0, guild: Any = None
    ) -> dict:
        g = self.get_guild(guild)
        cid = str(channel_id or snowflake())
        ch = {
            "id": cid,
            "type": type,
            "guild_id": g.id,
            "name": name,
            "position": len(g.channels),
            "permission_overwrites": [],
            "nsfw": nsfw,
            "parent_id": None,
            "topic": None,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
        }
        g.channels[cid] = ch
        if g.channel_id is None and type == 0:
            g.channel_id = cid
        return ch

    def add_thread(self, parent_id: Any, name: str, owner: Any = "alice", type: int = 11) -> dict:
        """A thread of a guild channel (a forum's or media channel's post, or a text channel's
        thread): type 11 public, 12 private, 10 announcement (docs resources/channel.mdx, Thread
        Metadata). It reaches the bot in GUILD_CREATE's `threads`, as an active thread does."""
        parent, g = self.find_channel(parent_id)
        if parent is None or g is None:
            raise KeyError(f"{parent_id} is not a guild channel")
        ch = self.add_channel(name, type=type, guild=g)
        ch.update(
            parent_id=parent["id"],
            owner_id=self._resolve_user(owner)["id"],
            message_count=0,
            member_count=1,
            thread_metadata={
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": JOINED_AT,
                "locked": False,
            },
        )
        g.thread_members[ch["id"]] = {ch["owner_id"]}
        return ch

    async def archive_thread(self, thread_id: Any) -> None:
        """The thread is archived (by a member, or after its auto_archive_duration without a
        message): a connected bot that can see it gets THREAD_UPDATE with `archived` true, and
        GUILD_CREATE lists it no more, as it lists only active threads (docs
        events/gateway-events.mdx, Thread Update and Guild Create; topics/threads.mdx)."""
        ch, g = self.find_channel(thread_id)
        if ch is None or g is None or ch["type"] not in THREAD_TYPES:
            raise KeyError(f"{thread_id} is not a thread")
        ch["thread_metadata"] = {**ch["thread_metadata"], "archived": True, "archive_timestamp": _now_iso()}
        if g.bot_present and self.bot_permissions(ch["id"]) & VIEW_CHANNEL:
            await self._dispatch_if_connected("THREAD_UPDATE", dict(ch))

    async def delete_channel(self, channel_id: Any) -> None:
        """A moderator deletes a guild channel or thread (docs resources/channel.mdx, Delete/Close
        Channel): it is gone with its messages, and with a channel its threads. A connected bot
        that could see it gets CHANNEL_DELETE with the channel object, or for a thread
        THREAD_DELETE with only `id`, `guild_id`, `parent_id` and `type` (docs
        events/gateway-events.mdx). Every call about it afterwards, interaction webhooks of
        interactions used there included, is answered 404 10003 Unknown Channel."""
        ch, g = self.find_channel(channel_id)
        if ch is None or g is None:
            raise KeyError(f"{channel_id} is not a guild channel")
        threads = [c for c in g.channels.values() if c.get("parent_id") == ch["id"] and c["type"] in THREAD_TYPES]
        seen = g.bot_present and bool(self.bot_permissions(ch["id"]) & VIEW_CHANNEL)
        for gone in [ch, *threads]:
            del g.channels[gone["id"]]
            g.thread_members.pop(gone["id"], None)
            self.deleted_channels.add(gone["id"])
            for msg in self._messages_by_channel.get(gone["id"], []):
                if not msg.deleted:
                    self._delete(msg)
        if not seen:
            return
        if ch["type"] in THREAD_TYPES:
            event = {k: ch[k] for k in ("id", "guild_id", "parent_id", "type")}
            await self._dispatch_if_connected("THREAD_DELETE", event)
        else:
            await self._dispatch_if_connected("CHANNEL_DELETE", dict(ch))

    def _refuse_edits_if_archived(self, channel_id: str) -> None:
        """Archived threads "are generally immutable": editing a message there is refused with
        50083 (docs resources/channel.mdx, Thread; topics/opcodes-and-status-codes.mdx)."""
        ch, _ = self.find_channel(channel_id)
        if ch is not None and (ch.get("thread_metadata") or {}).get("archived"):
            # The docs give the code's meaning, not Discord's wording of the message.
            raise ApiError(400, {"message": "Thread is archived", "code": 50083})

    async def _unarchive_for_a_message(self, channel_id: str) -> None:
        """A new message unarchives its thread: "The API will helpfully automatically unarchive a
        thread when sending a message in that thread" (docs resources/channel.mdx, Thread). Only
        those with MANAGE_THREADS may unarchive a locked one, which this fake does not model."""
        ch, g = self.find_channel(channel_id)
        meta = (ch or {}).get("thread_metadata") or {}
        if ch is None or g is None or not meta.get("archived"):
            return
        if meta.get("locked"):
            raise KeyError(f"posting in locked thread {channel_id} is not modelled")
        ch["thread_metadata"] = {**meta, "archived": False, "archive_timestamp": _now_iso()}
        await self._dispatch_if_connected("THREAD_UPDATE", dict(ch))

    def add_thread_member(self, thread_id: Any, user: Any) -> None:
        """`user` (a member, or the bot: `fake.bot_user`) joins the thread, or is added to a
        private one (docs resources/channel.mdx, Add Thread Member). A connected bot added to a
        thread gets THREAD_CREATE (docs events/gateway-events.mdx: "or when the current user is
        added to a thread")."""
        ch, g = self.find_channel(thread_id)
        if ch is None or g is None or ch["type"] not in THREAD_TYPES:
            raise KeyError(f"{thread_id} is not a thread")
        is_bot = (user["id"] if isinstance(user, dict) else str(user)) == self.application_id
        uid = self.application_id if is_bot else self._resolve_user(user)["id"]
        g.thread_members.setdefault(ch["id"], set()).add(uid)
        if is_bot and g.bot_present and self._route(g.id) is not None:
            self._spawn(self._dispatch_if_connected("THREAD_CREATE", {**ch, "newly_created": False}))

    def add_member(
        self,
        user_id: Any = None,
        name: str = "alice",
        permissions: int = MEMBER_PERMISSIONS,
        roles: Sequence[Any] = (),
        guild: Any = None,
    ) -> dict:
        """A member of `guild` (default: the first guild). An existing user's id (or user dict)
        adds that user to another guild with its own roles and permissions there. Discord grants
        permissions only through roles (and channel overwrites): `permissions` are the member's
        through a role of the guild holding exactly them (see `_permissions_role`), so a bot
        computing them from the member's roles, as real bots do, finds them."""
        g = self.get_guild(guild)
        if isinstance(user_id, dict):
            user_id = user_id["id"]
        uid = str(user_id or snowflake())
        user = self.users.get(uid)
        if user is None:
            user = {
                "id": uid,
                "username": name,
                "discriminator": "0",
                "global_name": name.capitalize(),
                "avatar": None,
                "public_flags": 0,
                "bot": False,
            }
            self.users[uid] = user
        role_ids = [str(r["id"] if isinstance(r, dict) else r) for r in roles]
        if permissions:
            role_ids.append(self._permissions_role(g, permissions))
        g.members[uid] = {"user": user, "roles": role_ids}
        return user

    def _permissions_role(self, g: FakeGuild, permissions: int) -> str:
        """The guild's role granting exactly `permissions`, one per distinct set (a server's
        "Members" and "Moderators"); a new one reaches a connected bot as GUILD_ROLE_CREATE."""
        for rid, role in g.roles.items():
            if rid != g.id and role["name"].startswith("perms-") and int(role["permissions"]) == permissions:
                return rid
        role = self.add_role(f"perms-{permissions:x}", permissions, guild=g)
        if g.bot_member and self._route(g.id) is not None:
            event = {"guild_id": g.id, "role": role}
            self._spawn(self._dispatch_if_connected("GUILD_ROLE_CREATE", event))
        return role["id"]

    def authorize_user_install(self, user: Any) -> dict:
        """The user installs the app to their account (integration type USER_INSTALL)."""
        u = self._resolve_user(user)
        self.user_installs.add(u["id"])
        return u

    def add_group_dm(self, *users: Any) -> dict:
        """A group DM (channel type 3) of these users, without the bot: a PRIVATE_CHANNEL context."""
        recipients = [dict(self._resolve_user(u)) for u in users]
        cid = snowflake()
        ch = {
            "id": cid,
            "type": 3,
            "name": None,
            "icon": None,
            "owner_id": recipients[0]["id"] if recipients else None,
            "recipients": recipients,
            "last_message_id": None,
            "flags": 0,
        }
        self.private_channels[cid] = ch
        return ch

    def _dm_channel(self, uid: str) -> dict:
        cid = self.dm_channels.setdefault(uid, snowflake())
        ch = self.private_channels.get(cid)
        if ch is None:
            ch = {
                "id": cid,
                "type": 1,
                "last_message_id": None,
                "flags": 0,
                "recipients": [dict(self.users[uid])],
            }
            self.private_channels[cid] = ch
            self._bot_dm_ids.add(cid)
        return ch

    def _resolve_user(self, user: Any) -> dict:
        if isinstance(user, dict):
            user = user["id"]
        user = str(user)
        if user in self.users:
            return self.users[user]
        for u in self.users.values():
            if u["username"] == user:
                return u
        raise KeyError(f"unknown member {user!r}")

    def find_channel(self, channel_id: Any) -> tuple[dict | None, FakeGuild | None]:
        """(channel, its guild) for a guild channel, (channel, None) for a DM / group DM."""
        cid = str(channel_id)
        for g in self.guilds.values():
            ch = g.channels.get(cid)
            if ch is not None:
                return ch, g
        return self.private_channels.get(cid), None

    def guild_of_channel(self, channel_id: Any) -> FakeGuild | None:
        return self.find_channel(channel_id)[1]

    def member_permissions(self, user_id: str, guild: Any = None) -> int:
        """A member's permissions in the server: @everyone's and its roles', all of them for an
        administrator or the owner (docs topics/permissions.mdx, Permission Hierarchy)."""
        g = self.get_guild(guild)
        m = g.members[user_id]
        perms = int(g.roles[g.id]["permissions"])
        for r in m["roles"]:
            if r in g.roles:
                perms |= int(g.roles[r]["permissions"])
        if perms & ADMINISTRATOR or user_id == g.owner_id:
            perms |= ALL_PERMISSIONS
        return perms

    def member_permissions_in(self, user_id: str, channel_id: Any) -> int:
        """A member's permissions in a guild channel, as `member.permissions` of an interaction
        there carries them ("total permissions of the member in the channel, including
        overwrites": docs resources/guild.mdx, Guild Member Object)."""
        ch, g = self.find_channel(channel_id)
        if ch is None or g is None:
            raise KeyError(f"{channel_id} is not a guild channel")
        roles = [r for r in g.members[user_id]["roles"] if r in g.roles]
        return self._permissions_in(g, ch, self.member_permissions(user_id, g), roles, user_id)

    def _permissions_in(self, g: FakeGuild, ch: dict, base: int, role_ids: list[str], user_id: str) -> int:
        """Server-wide permissions `base` of a member (its `role_ids`, its `user_id`) in channel
        `ch`, computed as Discord documents it (docs topics/permissions.mdx, Permission
        Overwrites): ADMINISTRATOR means all; else the channel's overwrites for @everyone, then
        for the member's roles together, then for the member. A thread has its parent's
        permissions; a private thread is seen only by its members and by those with
        MANAGE_THREADS (docs resources/channel.mdx, Channel Types)."""
        if base & ADMINISTRATOR:
            return ALL_PERMISSIONS
        thread = ch if ch.get("type") in THREAD_TYPES else None
        if thread is not None and thread.get("parent_id") in g.channels:
            ch = g.channels[thread["parent_id"]]
        overwrites = {str(o["id"]): o for o in ch.get("permission_overwrites") or []}
        perms = base
        for layer in ([g.id], role_ids, [user_id]):
            allow = deny = 0
            for target in layer:
                o = overwrites.get(target)
                if o is not None:
                    allow, deny = allow | int(o["allow"]), deny | int(o["deny"])
            perms = (perms & ~deny) | allow
        joined = thread is not None and user_id in g.thread_members.get(thread["id"], ())
        if thread is not None and thread["type"] == PRIVATE_THREAD and not joined and not perms & MANAGE_THREADS:
            perms &= ~VIEW_CHANNEL
        return perms

    def member_payload(
        self, user_id: str, with_permissions: bool = True, guild: Any = None, channel_id: Any = None
    ) -> dict:
        """A member object; `with_permissions`: with its `permissions`, as an interaction carries
        them: in `channel_id` (overwrites included) where it is given, else server-wide."""
        g = self.get_guild(guild)
        m = g.members[user_id]
        p = {
            "user": dict(m["user"]),
            "roles": list(m["roles"]),
            "joined_at": JOINED_AT,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "avatar": None,
            "banner": None,
            "premium_since": None,
            "communication_disabled_until": None,
        }
        if with_permissions:
            perms = (
                self.member_permissions(user_id, g)
                if channel_id is None
                else self.member_permissions_in(user_id, channel_id)
            )
            p["permissions"] = str(perms)
        return p

    def _bot_member_payload(self, g: FakeGuild) -> dict:
        return {
            "user": dict(self.bot_user),
            "roles": [g.bot_role_id],
            "joined_at": JOINED_AT,
            "deaf": False,
            "mute": False,
            "flags": 0,
        }

    def bot_permissions(self, channel_id: Any) -> int:
        """The bot's permissions in a guild channel: @everyone's and its managed role's, then the
        channel's overwrites for them and for the bot itself (see `_permissions_in`)."""
        ch, g = self.find_channel(channel_id)
        if ch is None or g is None:
            raise KeyError(f"{channel_id} is not a guild channel")
        bot_roles = [g.bot_role_id] if g.bot_role_id in g.roles else []
        base = 0
        for rid in [g.id, *bot_roles]:
            base |= int(g.roles[rid]["permissions"])
        return self._permissions_in(g, ch, base, bot_roles, self.application_id)

    def set_permission_overwrite(self, channel_id: Any, target: Any, *, allow: int = 0, deny: int = 0) -> dict:
        """A channel's permission overwrite for a role (@everyone is the guild's id) or a member
        (`target`: a role or user dict or id; the bot by its user id, `fake.bot_user`). A
        connected bot gets CHANNEL_UPDATE, as from Discord."""
        ch, g = self.find_channel(channel_id)
        if ch is None or g is None:
            raise KeyError(f"{channel_id} is not a guild channel")
        tid = str(target["id"] if isinstance(target, dict) else target)
        overwrite = {"id": tid, "type": 0 if tid in g.roles else 1, "allow": str(allow), "deny": str(deny)}
        ch["permission_overwrites"] = [o for o in ch["permission_overwrites"] if o["id"] != tid] + [overwrite]
        if g.bot_present and self._route(g.id) is not None:
            self._spawn(self._dispatch_if_connected("CHANNEL_UPDATE", dict(ch)))
        return overwrite

    def _check_bot_permissions(self, ch: dict, needed: int, what: str) -> None:
        """Refuse a bot-token request in a guild channel the bot lacks permissions for, as Discord
        does: no VIEW_CHANNEL -> 403 50001 Missing Access, the rest -> 403 50013 Missing
        Permissions (docs topics/opcodes-and-status-codes.mdx)."""
        if not ch.get("guild_id"):
            return  # DMs have no permissions
        perms = self.bot_permissions(ch["id"])
        if not perms & VIEW_CHANNEL:
            raise ApiError(403, {"message": "Missing Access", "code": 50001})
        missing = needed & ~perms
        if missing:
            self.event("missing_permissions", {"channel_id": ch["id"], "what": what, "missing": missing})
            raise ApiError(403, {"message": "Missing Permissions", "code": 50013})

    def guild_payload(self, guild: Any = None) -> dict:
        g = self.get_guild(guild)
        members = [self._bot_member_payload(g)]
        members += [self.member_payload(uid, with_permissions=False, guild=g) for uid in g.members]
        return {
            "id": g.id,
            "name": g.name,
            "icon": None,
            "owner_id": g.owner_id,
            "unavailable": False,
            "member_count": len(members),
            "large": False,
            "premium_tier": g.premium_tier,
            "preferred_locale": g.preferred_locale,
            "features": list(g.features),
            "joined_at": JOINED_AT,
            "nsfw_level": 0,
            "roles": list(g.roles.values()),
            "channels": [dict(c) for c in g.channels.values() if c["type"] not in THREAD_TYPES],
            "members": members,
            # docs events/gateway-events.mdx (Guild Create): "active threads in the guild that
            # current user has permission to view"
            "threads": [
                dict(c)
                for c in g.channels.values()
                if c["type"] in THREAD_TYPES
                and not c["thread_metadata"]["archived"]
                and self.bot_permissions(c["id"]) & VIEW_CHANNEL
            ],
            "emojis": [],
            "stickers": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "application_id": None,
            "afk_channel_id": None,
            "system_channel_id": None,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "max_members": 500000,
            "premium_subscription_count": 0,
        }

    def add_cdn_file(
        self,
        data: bytes,
        filename: str = "image.png",
        content_type: str = "image/png",
        ephemeral: bool = True,
        width: int | None = None,
        height: int | None = None,
        channel_id: str | None = None,
        lifetime: float = CDN_URL_LIFETIME,
    ) -> dict:
        """An attachment served by the fake CDN; its signed URL expires `lifetime` s after issue
        (on the CDN clock: see advance_cdn_clock / expire_cdn_urls)."""
        aid = snowflake()
        att = self._store_attachment(
            aid, channel_id or self.channel_id, filename, data, content_type, lifetime=lifetime
        )
        w, h = (width, height) if width else _image_size(data)
        if w:
            att["width"], att["height"] = w, h
        if ephemeral:
            att["ephemeral"] = True
        return att

    def _store_attachment(
        self,
        aid: str,
        channel_id: str,
        filename: str,
        data: bytes,
        content_type: str | None,
        lifetime: float | None = None,
    ) -> dict:
        path = f"/cdn/attachments/{channel_id}/{aid}/{urllib.parse.quote(filename)}"
        self.cdn_files[path] = (data, content_type or "application/octet-stream")
        self.cdn_lifetimes[path] = self.upload_url_lifetime if lifetime is None else lifetime
        url = self._sign_cdn_path(path)
        att = {"id": aid, "filename": filename, "size": len(data), "url": url, "proxy_url": url}
        if content_type:
            att["content_type"] = content_type
        return att

    # ---------------------------------------------------------------- signed CDN URLs
    def cdn_now(self) -> float:
        """The CDN's clock (unix seconds): real time plus what advance_cdn_clock() added."""
        return time.time() + self.cdn_clock_offset

    def advance_cdn_clock(self, seconds: float) -> None:
        """Move the CDN's clock forward: URLs whose `ex` falls behind it answer 404."""
        self.cdn_clock_offset += seconds

    def expire_cdn_urls(self) -> None:
        """Expire every CDN URL handed out so far (URLs signed afterwards are valid again)."""
        gap = self._cdn_max_ex - self.cdn_now() + 1
        if gap > 0:
            self.advance_cdn_clock(gap)

    def _cdn_signature(self, path: str, ex: str, is_: str) -> str:
        return hmac.new(self._cdn_secret, f"{path}|{ex}|{is_}".encode(), hashlib.sha256).hexdigest()

    def _sign_cdn_path(self, path: str) -> str:
        t = int(self.cdn_now())
        ex = t + int(self.cdn_lifetimes.get(path, CDN_URL_LIFETIME))
        self._cdn_max_ex = max(self._cdn_max_ex, ex)
        hm = self._cdn_signature(path, f"{ex:x}", f"{t:x}")
        return f"{self.base_url}{path}?ex={ex:x}&is={t:x}&hm={hm}&"

    def _cdn_url_expired(self, url: str) -> bool:
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        try:
            return int(q["ex"][0], 16) <= self.cdn_now()
        except (KeyError, ValueError):
            return False

    def refresh_cdn_url(self, url: str) -> str:
        """A freshly signed URL for one of this CDN's files if `url` has expired (what Discord
        does in payloads it hands out); any other URL unchanged."""
        parts = urllib.parse.urlsplit(url)
        if (
            not url.startswith(self.base_url + "/cdn/")
            or parts.path not in self.cdn_files
            or not self._cdn_url_expired(url)
        ):
            return url
        return self._sign_cdn_path(parts.path)

    def refresh_attachment(self, att: dict) -> dict:
        a = copy.deepcopy(att)
        for k in ("url", "proxy_url"):
            if isinstance(a.get(k), str):
                a[k] = self.refresh_cdn_url(a[k])
        return a

    def post_user_message(
        self, content: str = "", user: Any = "alice", channel_id: str | None = None, attachments: Sequence[dict] = ()
    ) -> FakeMessage:
        """A message written by a (fake) human, e.g. as a context-menu target (in any guild's
        channel or a DM)."""
        cid = str(channel_id or self.channel_id)
        g = self.guild_of_channel(cid)
        msg = FakeMessage(self, cid, author=dict(self._resolve_user(user)), guild_id=g.id if g else None)
        msg.content = content
        msg.attachments = [dict(a) for a in attachments]
        self._record_message(msg, "create")
        return msg

    def forward_message(self, source: FakeMessage, user: Any = "alice", channel_id: str | None = None) -> FakeMessage:
        """`source` forwarded by a (fake) human: a message of its own with no content or
        attachments, a reference of type FORWARD and a snapshot of what `source` said
        (resources/message.mdx, Message Snapshot Object)."""
        msg = self.post_user_message(user=user, channel_id=channel_id)
        msg.message_reference = {"type": REFERENCE_FORWARD, "channel_id": source.channel_id, "message_id": source.id}
        if source.guild_id:
            msg.message_reference["guild_id"] = source.guild_id
        msg.message_snapshots = [
            {
                "type": source.type,
                "content": source.content,
                "mentions": [],
                "mention_roles": [],
                "attachments": copy.deepcopy(source.attachments),
                "embeds": copy.deepcopy(source.embeds),
                "timestamp": source.timestamp,
                "edited_timestamp": source.edited_timestamp,
                "flags": source.flags,
                "components": copy.deepcopy(source.components),
            }
        ]
        return msg

    # ---------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> FakeDiscord:
        # re-create loop-bound primitives on the running loop
        self._identified, self._commands_synced, self._changed = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._hang_release = asyncio.Event()
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_route("GET", "/gateway", self._gateway)
        app.router.add_route("GET", "/cdn/{tail:.*}", self._cdn)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._api)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port or 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._hang_release.set()
        for task in list(self._tasks):
            task.cancel()
        for ws in list(self._all_ws):
            with contextlib.suppress(Exception):
                await ws.close(code=1001)
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ---------------------------------------------------------------- waiting helpers
    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s")
            ev = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), min(remaining, 0.5))

    async def wait_for_identify(self, timeout: float = 10) -> None:
        await asyncio.wait_for(self._identified.wait(), timeout)

    async def wait_for_commands(self, timeout: float = 10) -> dict:
        await asyncio.wait_for(self._commands_synced.wait(), timeout)
        return self.commands

    def event(self, kind: str, detail: Any = None) -> None:
        self.events.append((time.monotonic(), kind, detail))

    # ---------------------------------------------------------------- faults & clock
    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int | str = 500,
        times: int = 1,
        json: dict | None = None,
        headers: dict | None = None,
        skip: int = 0,
        delay: float = 0.0,
        applied: bool = False,
    ) -> None:
        """Answer the next `times` requests matching METHOD and regex (searched in the path after
        /api/v10) with `status`, after letting `skip` matching requests through. 429 gets
        Discord's body and a `Via` header by default.

        applied=True: carry the request out first, then answer `status` all the same (a 5xx from
        Discord's edge for a request its backend did: the client cannot tell it was done).

        status="hang": record the request, never apply it and never answer until `release_hangs()`
        or stop() (then the connection is dropped): a request lost in flight.

        status="slow": apply the request and answer as usual, `delay` seconds after it arrived (a
        big upload Discord takes its time over). Applied even when the client gave up waiting
        meanwhile, as Discord's servers carry on with a request they received whole."""
        if status in ("hang", "slow"):
            self._faults.append(
                {
                    "method": method.upper(),
                    "rx": re.compile(path_regex),
                    "status": status,
                    "times": times,
                    "json": None,
                    "headers": {},
                    "skip": skip,
                    "delay": delay,
                }
            )
            return
        if json is None:
            if status == 429:
                json = {"message": "You are being rate limited.", "retry_after": 0.2, "global": False}
            else:
                json = {"message": f"{status}: fault injected", "code": 0}
        hdrs = {}
        if status == 429:
            ra = json.get("retry_after", 0.2)
            # docs topics/rate-limits.mdx (Header Format): X-RateLimit-Global is "returned only on
            # HTTP 429 responses if the rate limit encountered is the global rate limit", and
            # X-RateLimit-Scope is then "global" (a route's own limit: "user").
            hdrs = {
                "Via": "1.1 google",
                "Retry-After": str(max(1, int(ra + 0.999))),
                "X-RateLimit-Scope": "global" if json.get("global") else "user",
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset-After": str(ra),
                "X-RateLimit-Bucket": "fakebucket",
            }
            if json.get("global"):
                hdrs["X-RateLimit-Global"] = "true"
        hdrs.update(headers or {})
        self._faults.append(
            {
                "method": method.upper(),
                "rx": re.compile(path_regex),
                "status": status,
                "times": times,
                "json": json,
                "headers": hdrs,
                "skip": skip,
                "applied": applied,
            }
        )

    def release_hangs(self) -> None:
        """Drop the connection of every request held by a "hang" fault."""
        ev, self._hang_release = self._hang_release, asyncio.Event()
        ev.set()

    @property
    def hanging(self) -> int:
        """How many requests are held by a "hang" fault right now."""
        return self._hanging

    def expire_token(self, token: str) -> None:
        h = self._by_token[token]
        h.age_offset += TOKEN_LIFETIME + 1

    def age_interactions(self, seconds: float) -> None:
        for h in self.interactions.values():
            h.age_offset += seconds

    # ---------------------------------------------------------------- gateway
    async def _send(self, ws: web.WebSocketResponse, payload: dict) -> None:
        await ws.send_str(json.dumps(payload))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def _ws(self) -> web.WebSocketResponse | None:
        """The newest live, identified connection (None when no shard is connected)."""
        return self._attached[-1].ws if self._attached else None

    @property
    def gateway_sessions(self) -> list[GatewaySession]:
        """Sessions with a live socket, oldest first."""
        return list(self._attached)

    def shard_for(self, guild: Any, num_shards: int | None = None) -> int:
        """The shard id Discord routes a guild's events to (default: of `shard_count` shards)."""
        gid = guild.id if isinstance(guild, FakeGuild) else guild
        return shard_of(gid, num_shards or self.shard_count)

    @staticmethod
    def _event_guild_id(t: str, d: Any) -> str | None:
        if not isinstance(d, dict):
            return None
        gid = d.get("id") if t in ("GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE") else d.get("guild_id")
        return None if gid is None else str(gid)

    def _route(self, guild_id: str | None, shard: int | None = None) -> GatewaySession | None:
        """The session an event goes to: the newest live session whose [shard_id, num_shards]
        covers the guild (events without a guild: shard 0), or of shard id `shard` if given."""
        for sess in reversed(self._attached):
            if sess.ws is None or sess.ws.closed:
                continue
            if shard is not None:
                if sess.shard[0] == shard:
                    return sess
            elif sess.covers(guild_id):
                return sess
        return None

    async def _send_dispatch(self, sess: GatewaySession, t: str, d: dict) -> None:
        sess.seq += 1
        assert sess.ws is not None
        await self._send(sess.ws, {"op": 0, "s": sess.seq, "t": t, "d": d})

    async def dispatch(self, t: str, d: dict, timeout: float = 10, shard: int | None = None) -> GatewaySession:
        """Send a DISPATCH event to the connection of the event's shard: by Discord's formula on
        the guild id (`d["id"]` for GUILD_CREATE/UPDATE/DELETE, else `d["guild_id"]`), shard 0 for
        events without a guild (DMs). `shard=` forces a shard id. Waits up to `timeout` for
        that shard to be connected."""
        gid = self._event_guild_id(t, d)
        sess = self._route(gid, shard)
        if sess is None:
            await self.wait_until(lambda: self._route(gid, shard) is not None, timeout)
            sess = self._route(gid, shard)
        assert sess is not None
        await self._send_dispatch(sess, t, d)
        return sess

    async def _dispatch_if_connected(self, t: str, d: dict) -> GatewaySession | None:
        sess = self._route(self._event_guild_id(t, d))
        if sess is None:
            return None
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await self._send_dispatch(sess, t, d)
        return sess

    async def disconnect_gateway(self, code: int = 4000, shard: int | None = None) -> None:
        """Close the newest gateway connection (or that of shard id `shard`): the client should
        resume/reconnect."""
        sess = self._route(None, shard) if shard is not None else (self._attached[-1] if self._attached else None)
        if sess is not None and sess.ws is not None:
            await sess.ws.close(code=code)

    async def start_gateway_outage(self) -> None:
        """The gateway goes down: every connection closes (1001, going away) and new ones are
        refused with 503 (as Cloudflare answers for it in an outage) until `end_gateway_outage`.
        REST keeps working, as in Discord's partial outages."""
        self.gateway_outage = True
        for ws in list(self._all_ws):
            await ws.close(code=1001)

    def end_gateway_outage(self) -> None:
        self.gateway_outage = False

    async def invalidate_session(self, shard: int | None = None, resumable: bool = False) -> None:
        """Invalidate the newest session (or shard id `shard`'s): op 9 Invalid Session (docs
        events/gateway-events.mdx). Not resumable: the session is forgotten, so the client must
        IDENTIFY again (discord.py then connects to its DEFAULT_GATEWAY)."""
        sess = self._route(None, shard) if shard is not None else (self._attached[-1] if self._attached else None)
        if sess is None or sess.ws is None:
            return
        if not resumable:
            self.sessions.pop(sess.session_id, None)
        await self._send(sess.ws, {"op": 9, "d": resumable, "s": None, "t": None})

    def _attach(self, sess: GatewaySession, ws: web.WebSocketResponse) -> None:
        if sess in self._attached:
            self._attached.remove(sess)
        old = sess.ws
        sess.ws = ws
        self._attached.append(sess)
        self.session_id = sess.session_id
        self._identified.set()
        if old is not None and old is not ws and not old.closed:
            self._spawn(old.close(code=4000))

    def _detach(self, ws: web.WebSocketResponse) -> None:
        for sess in list(self._attached):
            if sess.ws is ws:
                self._attached.remove(sess)
                sess.ws = None
        if not self._attached:
            self._identified.clear()

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        if self.gateway_outage:
            self.event("gateway_refused", dict(request.query))
            return web.Response(status=503, text="upstream connect error")
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        self._all_ws.append(ws)
        self.event("gateway_connect", dict(request.query))
        session: GatewaySession | None = None
        try:
            await self._send(
                ws,
                {
                    "op": 10,
                    "d": {"heartbeat_interval": self.heartbeat_interval, "_trace": ["fake-gateway"]},
                    "s": None,
                    "t": None,
                },
            )
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                        break
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    await ws.close(code=4002)
                    break
                self.gateway_received.append(data)
                op = data.get("op")
                if op == 1:
                    # A network's worth of delay: discord.py records a heartbeat as sent only
                    # after its send completes, so an instant ACK would be measured against the
                    # previous heartbeat ("Can't keep up … 41s behind").
                    await asyncio.sleep(0.01)
                    await self._send(ws, {"op": 11, "d": None, "s": None, "t": None})
                elif op == 2:
                    if session is not None:  # docs: 4005 "You sent more than one identify payload"
                        self._gateway_reject(session.shard, "already authenticated", close=4005)
                        await ws.close(code=4005, message=b"Already authenticated.")
                        break
                    session = await self._on_identify(ws, data.get("d") or {})
                    if ws.closed:
                        break
                elif op == 6:
                    d = data.get("d") or {}
                    if d.get("token") != self.token and d.get("token") != f"Bot {self.token}":
                        await ws.close(code=4004)
                        break
                    resumed = self.sessions.get(str(d.get("session_id")))
                    if resumed is None:
                        await self._send(ws, {"op": 9, "d": False, "s": None, "t": None})
                        continue
                    session = resumed
                    self._attach(session, ws)
                    self.event("gateway_resume", {**d, "shard": list(session.shard)})
                    await self._send_dispatch(session, "RESUMED", {"_trace": ["fake-gateway"]})
                    self._notify()
                elif op == 3 or op == 4 or op == 8:
                    pass  # presence / voice / request members: ignored
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        except Exception as e:  # never let one dead socket crash the fake
            self.event("gateway_error", repr(e))
        finally:
            if ws in self._all_ws:
                self._all_ws.remove(ws)
            self._detach(ws)
            self.event("gateway_disconnect", ws.close_code)
            self._notify()
        return ws

    def _gateway_reject(self, shard: Any, reason: str, op: int | None = None, close: int | None = None) -> None:
        rec: dict = {"shard": shard, "reason": reason, "time": time.monotonic()}
        if op is not None:
            rec["op"] = op
        if close is not None:
            rec["close"] = close
        self.gateway_rejections.append(rec)
        self.event("gateway_rejected", rec)

    async def _on_identify(self, ws: web.WebSocketResponse, d: dict) -> GatewaySession | None:
        tok = d.get("token", "")
        if tok not in (self.token, f"Bot {self.token}"):
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        now = time.monotonic()
        raw_shard = d.get("shard") if d.get("shard") is not None else [0, 1]
        record: dict = {"shard": raw_shard, "time": now, "wall": time.time(), "accepted": False}
        record.update(reason=None, session_id=None)
        self.identifies.append(record)
        # docs topics/opcodes-and-status-codes.mdx: 4010 "You sent us an invalid shard when identifying"
        if (
            not isinstance(raw_shard, list)
            or len(raw_shard) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw_shard)
            or raw_shard[1] < 1
            or not 0 <= raw_shard[0] < raw_shard[1]
        ):
            record["reason"] = "invalid shard"
            self._gateway_reject(raw_shard, "invalid shard", close=4010)
            await ws.close(code=4010, message=b"Invalid shard.")
            return None
        shard = (raw_shard[0], raw_shard[1])
        # docs events/gateway.mdx (Identifying; Rate Limiting; Max Concurrency): one IDENTIFY per
        # 5 s per bucket `shard_id % max_concurrency`; a faster one gets Invalid Session (op 9).
        bucket = shard[0] % max(1, self.max_concurrency)
        last = self._bucket_last_identify.get(bucket)
        if last is not None and now - last < self.identify_interval:
            why = f"IDENTIFY of shard {list(shard)} {now - last:.3f}s after the last one of bucket {bucket}"
            enforce = self.enforce_identify_limit
            if enforce is None:
                enforce = self.shard_count > 1 or self.max_concurrency > 1 or shard[1] > 1
            self.identify_limit_breaches.append({"shard": list(shard), "reason": why, "enforced": enforce})
            if enforce:
                record["reason"] = why
                self._gateway_reject(list(shard), why, op=9)
                await self._send(ws, {"op": 9, "d": False, "s": None, "t": None})
                return None
        guilds = [g for g in self.guilds.values() if g.bot_present and shard_of(g.id, shard[1]) == shard[0]]
        # docs: 4011 "The session would have handled too many guilds - you are required to shard"
        if len(guilds) > self.max_guilds_per_shard:
            record["reason"] = "sharding required"
            self._gateway_reject(list(shard), "sharding required", close=4011)
            await ws.close(code=4011, message=b"Sharding required.")
            return None
        self._bucket_last_identify[bucket] = now
        sess = GatewaySession(secrets.token_hex(16), shard, ws)
        self.sessions[sess.session_id] = sess
        record.update(accepted=True, session_id=sess.session_id)
        self.identifies_by_shard.setdefault(shard[0], []).append(now)
        self.identify_count += 1
        self.identify_payloads.append(d)
        sess.guild_ids = [g.id for g in guilds]
        sess.ready = {
            "v": 10,
            "user": dict(self.bot_user),
            "guilds": [{"id": g.id, "unavailable": True} for g in guilds],
            "session_id": sess.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "shard": list(shard),
            "application": {"id": self.application_id, "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "_trace": ["fake-gateway"],
        }
        await self._send_dispatch(sess, "READY", sess.ready)
        for g in guilds:
            await self._send_dispatch(sess, "GUILD_CREATE", self.guild_payload(g))
        self.event("gateway_identify", {"shard": list(shard), "intents": d.get("intents")})
        self._attach(sess, ws)
        self._notify()
        return sess

    # ---------------------------------------------------------------- interaction builders
    def _channel_payload(self, channel_id: str, permissions: int = BOT_PERMISSIONS) -> dict:
        ch, _ = self.find_channel(channel_id)
        if ch is None:
            raise KeyError(f"unknown channel {channel_id}")
        ch = dict(ch)
        ch["permissions"] = str(permissions)
        return ch

    def command_contexts(self, cmd: dict) -> set[int]:
        """Interaction contexts a synced command is offered in (docs application-commands.mdx:
        `contexts` defaults to all; `dm_permission: false` (deprecated) keeps it out of DMs;
        guild commands only exist in their guild)."""
        if cmd.get("guild_id"):
            return {GUILD_CONTEXT}
        ctx = cmd.get("contexts")
        if ctx is None:
            if cmd.get("dm_permission") is False:
                return {GUILD_CONTEXT}
            return {GUILD_CONTEXT, BOT_DM_CONTEXT, PRIVATE_CHANNEL_CONTEXT}
        return {int(c) for c in ctx}

    def command_installs(self, cmd: dict) -> set[int]:
        """Installation contexts of a synced command (`integration_types`; guild commands: guild
        install only)."""
        if cmd.get("guild_id"):
            return {GUILD_INSTALL}
        it = cmd.get("integration_types")
        return {int(i) for i in (it if it is not None else self.app_integration_types)}

    def _unavailable(self, why: str) -> CommandNotAvailable:
        self.violations.append(f"command not available: {why}")
        return CommandNotAvailable(why)

    @staticmethod
    def _context_value(context: Any) -> int | None:
        if context is None:
            return None
        if isinstance(context, str):
            if context not in _CONTEXT_NAMES:
                raise ValueError(f"unknown context {context!r}; one of {sorted(_CONTEXT_NAMES)} or 0, 1, 2")
            return _CONTEXT_NAMES[context]
        if context not in (GUILD_CONTEXT, BOT_DM_CONTEXT, PRIVATE_CHANNEL_CONTEXT):
            raise ValueError(f"unknown context {context!r}")
        return int(context)

    def _resolve_context(self, context: Any, guild_id: Any, channel_id: Any, guild_flag: bool) -> int:
        ctx = self._context_value(context)
        if ctx is not None:
            return ctx
        if channel_id is not None:
            ch, g = self.find_channel(channel_id)
            if ch is None:
                raise KeyError(f"unknown channel {channel_id}")
            if g is not None:
                return GUILD_CONTEXT
            return BOT_DM_CONTEXT if ch["id"] in self._bot_dm_ids else PRIVATE_CHANNEL_CONTEXT
        if guild_id is not None:
            return GUILD_CONTEXT
        return GUILD_CONTEXT if guild_flag else BOT_DM_CONTEXT

    def _lookup_guild(self, ctx: int, guild_id: Any, channel_id: Any, context: Any = None) -> FakeGuild | None:
        g = self._lookup_guild_of(ctx, guild_id, channel_id)
        if context == "user_guild" and g is not None and g.bot_member:
            raise ValueError(f"context 'user_guild' means a guild without the bot, but the bot is in {g.name!r}")
        return g

    def _lookup_guild_of(self, ctx: int, guild_id: Any, channel_id: Any) -> FakeGuild | None:
        if ctx != GUILD_CONTEXT:
            return None
        if channel_id is not None:
            g = self.guild_of_channel(channel_id)
            if g is None:
                raise ValueError(f"channel {channel_id} is not a guild channel (context 0)")
            if guild_id is not None and self.get_guild(guild_id) is not g:
                raise ValueError(f"channel {channel_id} is not in guild {guild_id}")
            return g
        return self.get_guild(guild_id)

    def _command_at(self, name: str, type: int, guild: FakeGuild | None) -> dict:
        """The synced command a user sees under `name` there: the guild's own commands, then
        global ones (then, as before there were several guilds, any synced command)."""
        if guild is not None:
            for c in self.guild_commands.get(guild.id, {}).values():
                if c["name"] == name and c.get("type", 1) == type:
                    return c
        for c in self.global_commands.values():
            if c["name"] == name and c.get("type", 1) == type:
                return c
        return self.find_command(name, type)

    def _place(
        self,
        u: dict,
        cmd: dict | None,
        ctx: int,
        guild: FakeGuild | None,
        channel_id: Any,
        app_permissions: int | None,
    ) -> _Place:
        """Where an interaction happens; refuses (violation + CommandNotAvailable) a command that
        Discord would not offer there (docs application-commands.mdx Contexts;
        receiving-and-responding.mdx Authorizing Integration Owners Object)."""
        uid = u["id"]
        installs = self.command_installs(cmd) if cmd is not None else {GUILD_INSTALL, USER_INSTALL}
        label = f"/{cmd['name']}" if cmd is not None else "interaction"
        if cmd is not None and ctx not in self.command_contexts(cmd):
            raise self._unavailable(
                f"{label} is not offered in context {ctx} (contexts {sorted(self.command_contexts(cmd))})"
            )
        owners: dict[str, str] = {}
        if ctx == GUILD_CONTEXT:
            assert guild is not None
            g = guild
            if cmd is not None and cmd.get("guild_id") and cmd["guild_id"] != g.id:
                raise self._unavailable(f"{label} is a command of guild {cmd['guild_id']}, not of {g.id}")
            if uid not in g.members:
                raise KeyError(f"{u['username']} is not a member of guild {g.name!r} (add_member(..., guild=))")
            cid = str(channel_id or g.channel_id)
            # A guild the bot left still counts as installed (kept from the single-guild fake).
            if g.bot_member and GUILD_INSTALL in installs:
                owners[str(GUILD_INSTALL)] = g.id
            if not g.bot_member and USER_INSTALL in installs:
                self.user_installs.add(uid)  # only a user install can bring it here
            if USER_INSTALL in installs and uid in self.user_installs:
                owners[str(USER_INSTALL)] = uid
            if not owners:
                why = "the bot is not in it" if not g.bot_member else "it is not installed there"
                raise self._unavailable(
                    f"{label} in guild {g.name!r}: {why} (integration_types {sorted(installs)}, "
                    f"user installed: {uid in self.user_installs})"
                )
            installed = str(GUILD_INSTALL) in owners
            member_perms = self.member_permissions_in(uid, cid)
            if not member_perms & VIEW_CHANNEL:
                raise KeyError(f"{u['username']} cannot see channel {cid} (its permission overwrites)")
            if cmd is not None and not member_perms & USE_APPLICATION_COMMANDS:
                # docs topics/permissions.mdx: USE_APPLICATION_COMMANDS, per channel.
                raise self._unavailable(f"{label}: {u['username']} may not use app commands in channel {cid}")
            channel, perms = self._guild_channel_seen_by(uid, cid, installed)
            return _Place(ctx, g, channel, owners, perms if app_permissions is None else app_permissions, installed)
        if cmd is not None and cmd.get("guild_id"):
            raise self._unavailable(f"{label} is a guild command: guild commands exist only in their guild")
        if ctx == BOT_DM_CONTEXT:
            if channel_id is not None and str(channel_id) not in self._bot_dm_ids:
                raise ValueError(f"channel {channel_id} is not a DM with the bot")
            ch = self._dm_channel(uid)
            if GUILD_INSTALL in installs:
                owners[str(GUILD_INSTALL)] = "0"  # docs: "0" in a DM with the app's bot user
            if USER_INSTALL in installs and uid in self.user_installs:
                owners[str(USER_INSTALL)] = uid
            if not owners:
                raise self._unavailable(
                    f"{label} in a DM with the bot: not installed (integration_types {sorted(installs)})"
                )
            perms = DM_APP_PERMISSIONS if app_permissions is None else app_permissions
            return _Place(ctx, None, dict(ch), owners, perms, True)
        # PRIVATE_CHANNEL: group DMs and DMs other than with the bot: user installs only
        if USER_INSTALL not in installs:
            raise self._unavailable(f"{label} in a private channel needs USER_INSTALL in integration_types")
        if channel_id is not None:
            pch = self.private_channels.get(str(channel_id))
            if pch is None or pch["id"] in self._bot_dm_ids:
                raise ValueError(f"channel {channel_id} is not a group DM / private channel")
        else:
            gdm_id = self.group_dms.get(uid)
            pch = self.private_channels.get(gdm_id) if gdm_id else None
            if pch is None:
                pch = self.add_group_dm(u)
                self.group_dms[uid] = pch["id"]
        self.user_installs.add(uid)
        owners[str(USER_INSTALL)] = uid
        perms = PRIVATE_APP_PERMISSIONS if app_permissions is None else app_permissions
        return _Place(ctx, None, dict(pch), owners, perms, False)

    def _guild_channel_seen_by(self, uid: str, channel_id: Any, installed: bool) -> tuple[dict, int]:
        """An interaction's `channel` in a server, with the invoking member's permissions there
        ("computed permissions for the invoking user in the channel, including overwrites": docs
        resources/channel.mdx, Channel Object), and its `app_permissions`: the bot's in the
        channel where the app is installed, else the member's, limited to what interaction
        responses can use (docs change-log 2022-06-29, 2024-06-27; platform doc A10)."""
        member_perms = self.member_permissions_in(uid, channel_id)
        app_permissions = self.bot_permissions(channel_id) if installed else member_perms & USER_APP_PERMISSIONS
        return self._channel_payload(str(channel_id), member_perms), app_permissions

    def _place_of_message(self, msg: FakeMessage, u: dict, app_permissions: int | None) -> _Place:
        """A component on a message lives where the message is, authorized like the interaction
        that made the message."""
        src = msg.interaction.place if msg.interaction is not None else None
        if src is not None:
            if src.guild is not None:
                uid = u["id"]
                if uid not in src.guild.members:
                    raise KeyError(f"{u['username']} is not a member of guild {src.guild.name!r}")
                if not self.member_permissions_in(uid, msg.channel_id) & VIEW_CHANNEL:
                    raise KeyError(f"{u['username']} cannot see channel {msg.channel_id} (its permission overwrites)")
                channel, perms = self._guild_channel_seen_by(uid, msg.channel_id, src.installed)
                if app_permissions is None:
                    app_permissions = perms
            else:
                channel = dict(self.private_channels[msg.channel_id])
                if app_permissions is None:
                    app_permissions = src.app_permissions
            return _Place(src.context, src.guild, channel, dict(src.owners), app_permissions, src.installed)
        ch, g = self.find_channel(msg.channel_id)
        if g is not None:
            return self._place(u, None, GUILD_CONTEXT, g, msg.channel_id, app_permissions)
        if ch is not None and ch["id"] in self._bot_dm_ids:
            return self._place(u, None, BOT_DM_CONTEXT, None, msg.channel_id, app_permissions)
        return self._place(u, None, PRIVATE_CHANNEL_CONTEXT, None, msg.channel_id, app_permissions)

    def _payload(
        self,
        itype: int,
        data: dict | None,
        u: dict,
        place: _Place,
        attachment_size_limit: int,
        locale: str,
    ) -> dict:
        if locale not in LOCALES:
            raise ValueError(f"{locale!r} is not one of Discord's locales")
        payload: dict = {
            "id": snowflake(),
            "application_id": self.application_id,
            "type": itype,
            "token": "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48),
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "attachment_size_limit": attachment_size_limit,
            "app_permissions": str(place.app_permissions),
        }
        if data is not None:
            payload["data"] = data
        if place.guild is not None:
            g = place.guild
            payload.update(
                {
                    "guild": {"id": g.id, "locale": g.preferred_locale, "features": list(g.features)},
                    "guild_id": g.id,
                    "guild_locale": g.preferred_locale,
                    "channel": place.channel,
                    "channel_id": place.channel["id"],
                    "member": self.member_payload(u["id"], guild=g, channel_id=place.channel["id"]),
                    "authorizing_integration_owners": dict(place.owners),
                    "context": place.context,
                }
            )
        else:
            payload.update(
                {
                    "channel": place.channel,
                    "channel_id": place.channel["id"],
                    "user": dict(u),
                    "context": place.context,
                    "authorizing_integration_owners": dict(place.owners),
                }
            )
        return payload

    async def _fire(self, payload: dict, user: dict, place: _Place | None = None) -> InteractionHandle:
        h = InteractionHandle(self, payload, user)
        h.place = place
        self.interactions[h.id] = h
        self._by_token[h.token] = h
        sess = await self.dispatch("INTERACTION_CREATE", payload)
        h.dispatched_at = time.monotonic()
        h.shard, h.session_id = sess.shard, sess.session_id
        self.event(
            "interaction_dispatch",
            {"id": h.id, "type": h.type, "data": payload.get("data"), "shard": list(sess.shard)},
        )
        return h

    def find_command(self, name: str, type: int = 1) -> dict:
        for cmds in [self.commands] + list(self.guild_commands.values()):
            c = cmds.get(name)
            if c is not None and c.get("type", 1) == type:
                return c
        for c in self.global_commands.values():
            if c["name"] == name and c.get("type", 1) == type:
                return c
        raise KeyError(f"command {name!r} (type {type}) was not synced; synced: {list(self.commands)}")

    def _build_options(
        self,
        spec_opts: list,
        values: dict,
        resolved: dict,
        guild: FakeGuild | None = None,
        focused: str | None = None,
    ) -> list:
        g = guild or self.default_guild
        by_name = {o["name"]: o for o in spec_opts or []}
        out = []
        for name, value in values.items():
            if name not in by_name:
                raise KeyError(f"option {name!r} not in synced command options {list(by_name)}")
            o = by_name[name]
            t = o["type"]
            if t in (1, 2):
                out.append(
                    {
                        "name": name,
                        "type": t,
                        "options": self._build_options(o.get("options") or [], value or {}, resolved, guild, focused),
                    }
                )
                continue
            if name == focused:
                # docs application-commands.mdx (Autocomplete): the option being typed carries
                # `focused: true` and the partial input.
                if not o.get("autocomplete"):
                    raise self._unavailable(f"option {name!r} does not have autocomplete enabled")
                out.append({"name": name, "type": t, "value": "" if value is None else str(value), "focused": True})
                continue
            if t == 11:
                att = value if isinstance(value, dict) else None
                if att is None:
                    raise TypeError(f"option {name!r} needs an attachment dict from add_cdn_file()")
                resolved.setdefault("attachments", {})[att["id"]] = dict(att)
                v: Any = att["id"]
            elif t == 3:
                v = str(value)
            elif t == 4:
                v = int(value)
            elif t == 5:
                v = bool(value)
            elif t == 10:
                v = float(value)
            elif t in (6, 9):
                u = self._resolve_user(value)
                resolved.setdefault("users", {})[u["id"]] = dict(u)
                if guild is not None and u["id"] in g.members:
                    mp = self.member_payload(u["id"], guild=g)
                    mp.pop("user")
                    resolved.setdefault("members", {})[u["id"]] = mp
                v = u["id"]
            elif t == 7:
                cid = str(value)
                kind = (self.find_channel(cid)[0] or {}).get("type")
                if o.get("channel_types") and kind not in o["channel_types"]:
                    # docs application-commands.mdx (Application Command Option Structure): the
                    # client offers only channels of the option's `channel_types`.
                    raise self._unavailable(f"option {name!r} does not offer channels of type {kind}")
                resolved.setdefault("channels", {})[cid] = self._channel_payload(cid)
                v = cid
            elif t == 8:
                rid = str(value["id"] if isinstance(value, dict) else value)
                resolved.setdefault("roles", {})[rid] = dict(g.roles[rid])
                v = rid
            else:
                v = value
            out.append({"name": name, "type": t, "value": v})
        return out

    def _command_data(
        self, name: str, options: dict | None, guild: FakeGuild | None, focused: str | None = None
    ) -> tuple[dict, dict]:
        parts = name.split()
        cmd = self._command_at(parts[0], 1, guild)
        resolved: dict = {}
        values: dict = dict(options or {})
        if focused is not None:
            values.setdefault(focused, "")
        for sub in reversed(parts[1:]):
            values = {sub: values}
        opts = self._build_options(cmd.get("options") or [], values, resolved, guild, focused)
        data = {"id": cmd["id"], "name": cmd["name"], "type": 1, "options": opts}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        if resolved:
            data["resolved"] = resolved
        return cmd, data

    async def invoke_slash(
        self,
        name: str,
        options: dict | None = None,
        user: Any = "alice",
        channel_id: str | None = None,
        guild: bool = True,
        attachment_size_limit: int = DEFAULT_SIZE_LIMIT,
        app_permissions: int | None = None,
        locale: str = "en-US",
        guild_id: Any = None,
        context: Any = None,
    ) -> InteractionHandle:
        """Slash command. `name` may be "cmd sub" or "cmd group sub" for subcommands.

        Where: `channel_id` (any guild's channel, a DM or a group DM) or `guild_id` (its default
        channel), else the default guild (`guild=False`: the user's DM with the bot).
        `context`: 0 / "guild" (a guild; if the bot is not in it, only the member's user install
        authorizes the app: `authorizing_integration_owners` {"1": user}; "user_guild" insists
        on a guild without the bot), 1 / "bot_dm" / "dm",
        2 / "private_channel" / "group_dm" (a group DM without the bot: `add_group_dm`, or one per
        user). None: from the channel, else `guild`. A command whose synced `contexts` /
        `integration_types` exclude that place is refused: violation + CommandNotAvailable."""
        u = self._resolve_user(user)
        ctx = self._resolve_context(context, guild_id, channel_id, guild)
        g = self._lookup_guild(ctx, guild_id, channel_id, context)
        cmd, data = self._command_data(name, options, g)
        place = self._place(u, cmd, ctx, g, channel_id, app_permissions)
        payload = self._payload(2, data, u, place, attachment_size_limit, locale)
        return await self._fire(payload, u, place)

    async def autocomplete(
        self,
        name: str,
        options: dict | None = None,
        focused: str = "prompt",
        user: Any = "alice",
        channel_id: str | None = None,
        guild: bool = True,
        attachment_size_limit: int = DEFAULT_SIZE_LIMIT,
        app_permissions: int | None = None,
        locale: str = "en-US",
        guild_id: Any = None,
        context: Any = None,
    ) -> InteractionHandle:
        """An autocomplete interaction (type 4) while the user types option `focused` (its value in
        `options` is the partial text; options already filled are sent too). The option must have
        been synced with `autocomplete: true`. The answer (callback type 8) is in `handle.choices`."""
        u = self._resolve_user(user)
        ctx = self._resolve_context(context, guild_id, channel_id, guild)
        g = self._lookup_guild(ctx, guild_id, channel_id, context)
        cmd, data = self._command_data(name, options, g, focused=focused)
        place = self._place(u, cmd, ctx, g, channel_id, app_permissions)
        data.pop("resolved", None)  # [inference] partial input: nothing is resolved yet
        payload = self._payload(4, data, u, place, attachment_size_limit, locale)
        return await self._fire(payload, u, place)

    async def invoke_message_command(
        self,
        name: str,
        target_message_id: str,
        user: Any = "alice",
        channel_id: str | None = None,
        attachment_size_limit: int = DEFAULT_SIZE_LIMIT,
        app_permissions: int | None = None,
        locale: str = "en-US",
        context: Any = None,
    ) -> InteractionHandle:
        target = self.messages[str(target_message_id)]
        u = self._resolve_user(user)
        cid = channel_id or target.channel_id
        ctx = self._resolve_context(context, None, cid, True)
        g = self._lookup_guild(ctx, None, cid)
        cmd = self._command_at(name, 3, g)
        data = {
            "id": cmd["id"],
            "name": cmd["name"],
            "type": 3,
            "target_id": target.id,
            "resolved": {"messages": {target.id: target.to_payload()}},
        }
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        place = self._place(u, cmd, ctx, g, cid, app_permissions)
        payload = self._payload(2, data, u, place, attachment_size_limit, locale)
        return await self._fire(payload, u, place)

    async def click_button(
        self,
        message_id: str,
        custom_id: str,
        user: Any = "alice",
        component_type: int = 2,
        values: list | None = None,
        attachment_size_limit: int = DEFAULT_SIZE_LIMIT,
        app_permissions: int | None = None,
        locale: str = "en-US",
    ) -> InteractionHandle:
        msg = self.messages[str(message_id)]
        if msg.deleted:
            raise KeyError(f"message {message_id} was deleted")
        # Discord validates a clicked custom_id against the message ("Component validation failed").
        if custom_id not in custom_ids(msg.components):
            raise KeyError(f"message {message_id} has no component {custom_id!r}: {custom_ids(msg.components)}")
        data: dict = {"custom_id": custom_id, "component_type": component_type}
        if values is not None:
            data["values"] = list(values)
        u = self._resolve_user(user)
        place = self._place_of_message(msg, u, app_permissions)
        payload = self._payload(3, data, u, place, attachment_size_limit, locale)
        payload["message"] = msg.to_payload()
        return await self._fire(payload, u, place)

    async def submit_modal(
        self,
        custom_id: Any,
        values: dict,
        user: Any = "alice",
        message_id: str | None = None,
        channel_id: str | None = None,
        attachment_size_limit: int = DEFAULT_SIZE_LIMIT,
        app_permissions: int | None = None,
        locale: str = "en-US",
    ) -> InteractionHandle:
        """`custom_id` may be the modal's custom_id or the InteractionHandle that received the modal.
        A modal opened by a component carries that component's message, as Discord's does
        (`message`: "for components or modals triggered by components")."""
        src_place: _Place | None = None
        if isinstance(custom_id, InteractionHandle):
            modal = custom_id.modal
            if modal is None:
                raise ValueError("that interaction was not answered with a modal")
            channel_id = channel_id or custom_id.channel_id
            src_place = custom_id.place
            message_id = message_id or custom_id.source_message_id
            custom_id = modal["custom_id"]
        comps = []
        for i, (k, v) in enumerate(values.items()):
            # A list answers a select menu; a string a text input.
            inner = (
                {"type": 3, "id": 2 * i + 2, "custom_id": k, "values": list(v)}
                if isinstance(v, list)
                else {"type": 4, "id": 2 * i + 2, "custom_id": k, "value": v}
            )
            comps.append({"type": 18, "id": 2 * i + 1, "component": inner})
        data = {"custom_id": custom_id, "components": comps}
        msg = self.messages.get(str(message_id)) if message_id else None
        u = self._resolve_user(user)
        if msg is not None:
            place = self._place_of_message(msg, u, app_permissions)
        elif src_place is not None:
            place = _Place(
                src_place.context,
                src_place.guild,
                dict(src_place.channel),
                dict(src_place.owners),
                src_place.app_permissions if app_permissions is None else app_permissions,
                src_place.installed,
            )
        else:
            cid = channel_id
            ctx = self._resolve_context(None, None, cid, True)
            place = self._place(u, None, ctx, self._lookup_guild(ctx, None, cid), cid, app_permissions)
        payload = self._payload(5, data, u, place, attachment_size_limit, locale)
        if msg is not None:
            payload["message"] = msg.to_payload()
        return await self._fire(payload, u, place)

    # ---------------------------------------------------------------- queries
    def channel_messages(self, channel_id: str | None = None, include_deleted: bool = False) -> list[FakeMessage]:
        cid = str(channel_id or self.channel_id)
        return [m for m in self._messages_by_channel.get(cid, ()) if include_deleted or not m.deleted]

    def guild_messages(self, guild: Any = None, include_deleted: bool = False) -> list[FakeMessage]:
        """Every message in one guild's channels (default: the first guild), in order."""
        g = self.get_guild(guild)
        return [m for m in self.messages.values() if m.guild_id == g.id and (include_deleted or not m.deleted)]

    def requests_to(self, method: str, path_regex: str) -> list[RecordedRequest]:
        rx = re.compile(path_regex)
        return [r for r in self.requests if r.method == method.upper() and rx.search(r.path)]

    # ---------------------------------------------------------------- HTTP plumbing
    @staticmethod
    def _json_response(status: int, body: Any, headers: dict | None = None) -> web.Response:
        if body is None:
            return web.Response(status=status, headers=headers)
        # exactly "application/json": discord.py compares the header with == (doc B6)
        return web.Response(
            status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers
        )

    async def _unknown(self, request: web.Request) -> web.Response:
        self.violations.append(f"unknown route {request.method} {request.path}")
        return self._json_response(404, {"code": 0, "message": "404: Not Found"})

    async def _cdn(self, request: web.Request) -> web.Response:
        path = urllib.parse.quote(urllib.parse.unquote(request.path))
        key = path if path in self.cdn_files else request.path
        item = self.cdn_files.get(key)
        if item is None:
            return web.Response(status=404, text="Not Found")
        # Signed URL check (platform doc A8). A URL without `ex` is served (lenient: what Discord
        # does with unsigned attachment URLs is not in the reference).
        ex, is_, hm = (request.query.get(k) for k in ("ex", "is", "hm"))
        if ex is not None:
            try:
                expired = int(ex, 16) <= self.cdn_now()
            except ValueError:
                expired = True
            forged = (
                is_ is not None and hm is not None and not hmac.compare_digest(hm, self._cdn_signature(key, ex, is_))
            )
            if expired or forged:
                return web.Response(status=404, text=CDN_GONE_TEXT)
        data, ctype = item
        return web.Response(body=data, headers={"Content-Type": ctype})

    async def _read_body(self, request: web.Request) -> tuple[Any, dict, bool]:
        """-> (json body or None, files {field: (filename, bytes, content_type)}, had_body)."""
        ctype = request.content_type
        files: dict = {}
        if ctype.startswith("multipart/"):
            body = None
            reader = await request.multipart()
            async for part in reader:
                assert isinstance(part, BodyPartReader), "Discord's forms are flat"
                if part.name == "payload_json":
                    raw = await part.text()
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        raise ApiError(
                            400,
                            {"code": 50109, "message": "The request body contains invalid JSON."},
                            violation="invalid payload_json",
                        ) from None
                elif part.filename is not None:
                    files[part.name] = (part.filename, bytes(await part.read()), part.headers.get("Content-Type"))
                else:
                    raw = await part.text()
                    body = body or {}
            return body, files, True
        data = await request.read()
        if not data:
            return None, files, False
        try:
            return json.loads(data), files, True
        except ValueError:
            raise ApiError(
                400,
                {"code": 50109, "message": "The request body contains invalid JSON."},
                violation="invalid JSON body",
            ) from None

    def _routes(self):
        if not hasattr(self, "_route_table"):
            S = r"(?P<%s>[^/]+)"
            tbl = [
                ("GET", r"/users/@me", self._h_me, True),
                ("GET", r"/oauth2/applications/@me", self._h_appinfo, True),
                ("GET", r"/applications/@me", self._h_appinfo, True),
                ("GET", r"/gateway/bot", self._h_gateway_bot, True),
                ("GET", r"/gateway", self._h_gateway, False),
                ("PUT", r"/applications/%s/commands" % (S % "app"), self._h_put_commands, True),
                ("GET", r"/applications/%s/commands" % (S % "app"), self._h_get_commands, True),
                (
                    "PUT",
                    r"/applications/{}/guilds/{}/commands".format(S % "app", S % "gid"),
                    self._h_put_commands,
                    True,
                ),
                (
                    "GET",
                    r"/applications/{}/guilds/{}/commands".format(S % "app", S % "gid"),
                    self._h_get_commands,
                    True,
                ),
                ("POST", r"/interactions/{}/{}/callback".format(S % "iid", S % "tok"), self._h_callback, False),
                ("GET", r"/webhooks/{}/{}/messages/{}".format(S % "app", S % "tok", S % "mid"), self._h_wh_get, False),
                (
                    "PATCH",
                    r"/webhooks/{}/{}/messages/{}".format(S % "app", S % "tok", S % "mid"),
                    self._h_wh_patch,
                    False,
                ),
                (
                    "DELETE",
                    r"/webhooks/{}/{}/messages/{}".format(S % "app", S % "tok", S % "mid"),
                    self._h_wh_delete,
                    False,
                ),
                ("POST", r"/webhooks/{}/{}".format(S % "app", S % "tok"), self._h_wh_post, False),
                ("GET", r"/channels/%s" % (S % "cid"), self._h_get_channel, True),
                ("GET", r"/channels/{}/messages/{}".format(S % "cid", S % "mid"), self._h_get_message, True),
                ("PATCH", r"/channels/{}/messages/{}".format(S % "cid", S % "mid"), self._h_patch_message, True),
                ("DELETE", r"/channels/{}/messages/{}".format(S % "cid", S % "mid"), self._h_delete_message, True),
                ("POST", r"/channels/%s/messages" % (S % "cid"), self._h_post_message, True),
                ("GET", r"/channels/%s/messages" % (S % "cid"), self._h_list_messages, True),
                ("POST", r"/channels/%s/typing" % (S % "cid"), self._h_typing, True),
                ("GET", r"/guilds/%s" % (S % "gid"), self._h_get_guild, True),
                ("GET", r"/guilds/%s/channels" % (S % "gid"), self._h_get_guild_channels, True),
                ("GET", r"/guilds/{}/members/{}".format(S % "gid", S % "uid"), self._h_get_member, True),
                ("DELETE", r"/users/@me/guilds/%s" % (S % "gid"), self._h_leave_guild, True),
                ("POST", r"/users/@me/channels", self._h_create_dm, True),
            ]
            self._route_table = [(m, re.compile("^" + rx + "$"), h, auth) for m, rx, h, auth in tbl]
        return self._route_table

    async def _api(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        method = request.method
        rec = RecordedRequest(method, path, dict(request.query), dict(request.headers), None, {}, time.monotonic())
        self.requests.append(rec)
        where = f"{method} {path}"
        try:
            try:
                try:
                    body, files, had_body = await self._read_body(request)
                except ConnectionResetError:
                    # The client went away mid-body (a bot killed while uploading): Discord never
                    # gets the request whole, so nothing is done. 499: "client closed request".
                    rec.status = 499
                    return web.Response(status=499)
                rec.json = body
                rec.files = {k: (v[0], v[1]) for k, v in files.items()}
                lost_answer: dict | None = None
                # fault injection first (Discord/Cloudflare answers before validating)
                for f in self._faults:
                    if f["times"] > 0 and f["method"] == method and f["rx"].search(path):
                        if f["skip"] > 0:
                            f["skip"] -= 1
                            continue
                        f["times"] -= 1
                        self.event("fault", {"where": where, "status": f["status"]})
                        if f["status"] == "hang":
                            await self._hang(request, rec)
                            return web.Response(status=500)  # the connection is gone
                        if f["status"] == "slow":
                            await asyncio.sleep(f["delay"])
                            break
                        if f.get("applied"):
                            lost_answer = f
                            break
                        raise ApiError(f["status"], f["json"], f["headers"])
                # route: must exist in Discord's spec
                tmpl = None
                if self.spec is not None:
                    tmpl, allowed = self.spec.match(method, path)
                    if tmpl is None:
                        raise ApiError(
                            404, {"code": 0, "message": "404: Not Found"}, violation=f"unknown route {where}"
                        )
                    if not allowed:
                        raise ApiError(
                            405,
                            {"code": 0, "message": "405: Method Not Allowed"},
                            violation=f"method not allowed {where} (spec {tmpl})",
                        )
                handler, params, needs_auth = None, {}, False
                for m, rx, h, auth in self._routes():
                    mm = rx.match(path)
                    if m == method and mm:
                        handler, params, needs_auth = h, mm.groupdict(), auth
                        break
                if handler is None:
                    raise ApiError(
                        404,
                        {"code": 0, "message": "404: Not Found"},
                        violation=f"route not implemented by the fake (or unknown): {where}",
                    )
                if needs_auth and request.headers.get("Authorization") != f"Bot {self.token}":
                    raise ApiError(401, {"message": "401: Unauthorized", "code": 0})
                if self.spec is not None and had_body and tmpl is not None:
                    errors = self.spec.validate(tmpl, method, body if body is not None else {})
                    if errors is not None:
                        raise invalid_form(errors, f"spec violation {where}: {json.dumps(errors)[:1500]}")
                status, out = await handler(request, params, body, files)
                if lost_answer is not None:
                    raise ApiError(lost_answer["status"], lost_answer["json"], lost_answer["headers"])
            except ApiError as e:
                if e.violation:
                    self.violations.append(e.violation)
                if e.status >= 400:
                    self.rejections.append((e.status, e.body, where))
                rec.status, rec.response = e.status, e.body
                self.event("rejected", {"where": where, "status": e.status, "body": e.body})
                return self._json_response(e.status, e.body, e.headers)
            rec.status, rec.response = status, out
            return self._json_response(status, out)
        except Exception as e:  # a bug in the fake: surface it
            self.violations.append(f"fake internal error on {where}: {e!r}")
            rec.status = 500
            return self._json_response(500, {"code": 0, "message": f"500: fake error {e!r}"})
        finally:
            self._notify()

    async def _hang(self, request: web.Request, rec: RecordedRequest) -> None:
        rec.status = 0
        self._hanging += 1
        self._notify()
        try:
            await self._hang_release.wait()
        finally:
            self._hanging -= 1
            if request.transport is not None:
                request.transport.abort()

    # ---------------------------------------------------------------- bot-token handlers
    async def _h_me(self, req, p, body, files):
        return 200, dict(self.bot_user)

    async def _h_appinfo(self, req, p, body, files):
        owner = self.members[self.guild["owner_id"]]["user"]
        return 200, {
            "id": self.application_id,
            "name": self.bot_user["username"],
            "description": "",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": secrets.token_hex(32),
            "owner": dict(owner),
            "flags": 0,
            "team": None,
            "summary": "",
            "rpc_origins": [],
            "tags": [],
            "bot": dict(self.bot_user),
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "approximate_guild_count": sum(g.bot_present for g in self.guilds.values()),
            "integration_types_config": {str(t): {} for t in sorted(self.app_integration_types)},
        }

    async def _h_gateway_bot(self, req, p, body, files):
        used = sum(1 for r in self.identifies if r["accepted"])
        return 200, {
            "url": self.gateway_url,
            "shards": self.shard_count,
            "session_start_limit": {
                "total": 1000,
                "remaining": max(0, 1000 - used),
                "reset_after": 14400000,
                "max_concurrency": self.max_concurrency,
            },
        }

    async def _h_gateway(self, req, p, body, files):
        return 200, {"url": self.gateway_url}

    def _check_app(self, app: str) -> None:
        if app != self.application_id:
            raise ApiError(404, {"message": "Unknown Application", "code": 10002})

    def _guild_for_bot(self, gid: str) -> FakeGuild:
        """A guild the bot may use REST routes of: unknown -> 404 10004; the bot is not in it ->
        403 50001 Missing Access (docs topics/opcodes-and-status-codes.mdx)."""
        g = self.guilds.get(gid)
        if g is None:
            raise ApiError(404, {"message": "Unknown Guild", "code": 10004})
        if not g.bot_present:
            raise ApiError(403, {"message": "Missing Access", "code": 50001})
        return g

    def _check_localizations(self, node: dict, path: list) -> None:
        """`name_localizations` / `description_localizations` are keyed by Discord's locales (docs
        application-commands.mdx Localization; reference.mdx Locales); the spec allows any key."""
        for key in ("name_localizations", "description_localizations"):
            for locale in node.get(key) or {}:
                if locale not in LOCALES:
                    raise invalid_form(
                        _form_error([*path, key, locale], "LOCALE_INVALID", f"Invalid locale {locale!r}"),
                        f"{key} with {locale!r}, which is not one of Discord's locales",
                    )
        for j, choice in enumerate(node.get("choices") or []):
            if isinstance(choice, dict):
                self._check_localizations(choice, [*path, "choices", j])

    def _check_command_body(self, cmds: list, guild_scoped: bool) -> None:
        """Rules the spec cannot express (docs application-commands.mdx)."""
        for i, c in enumerate(cmds or []):
            self._check_localizations(c, [i])
            it = c.get("integration_types")
            if not guild_scoped and it is not None:
                bad = [t for t in it if t not in self.app_integration_types]
                if bad:
                    # "as long as any included contexts are already supported on the application-level"
                    raise invalid_form(
                        _form_error(
                            [i, "integration_types"],
                            "APPLICATION_COMMAND_INTEGRATION_TYPE_INVALID",
                            f"Installation context(s) {bad} are not supported by this application",
                        ),
                        f"command {c.get('name')!r}: integration_types {it} but the app supports "
                        f"{self.app_integration_types} (fake.app_integration_types)",
                    )

            def walk(opts: list, path: list) -> None:
                for j, o in enumerate(opts or []):
                    if not isinstance(o, dict):
                        continue
                    self._check_localizations(o, [*path, j])
                    if o.get("autocomplete") and o.get("choices"):
                        raise invalid_form(
                            _form_error(
                                [*path, j, "autocomplete"],
                                "APPLICATION_COMMAND_OPTION_AUTOCOMPLETE_WITH_CHOICES",
                                "Autocomplete cannot be set when choices are present",
                            ),
                            f"option {o.get('name')!r}: autocomplete together with choices",
                        )
                    if o.get("autocomplete") and o.get("type") not in (3, 4, 10):
                        raise invalid_form(
                            _form_error(
                                [*path, j, "autocomplete"],
                                "APPLICATION_COMMAND_OPTION_AUTOCOMPLETE_INVALID",
                                "Autocomplete is only available for STRING, INTEGER and NUMBER options",
                            ),
                            f"option {o.get('name')!r}: autocomplete on option type {o.get('type')}",
                        )
                    walk(o.get("options") or [], [*path, j, "options"])

            walk(c.get("options") or [], [i, "options"])

    async def _h_put_commands(self, req, p, body, files):
        self._check_app(p["app"])
        gid = p.get("gid")
        if gid is not None:
            self._guild_for_bot(gid)
        self._check_command_body(body or [], gid is not None)
        store = self.guild_commands.setdefault(gid, {}) if gid else self.global_commands
        old = {(c["name"], c.get("type", 1)): c for c in store.values()}
        store.clear()
        out = []
        for c in body or []:
            c = copy.deepcopy(c)
            c.setdefault("type", 1)
            prev = old.get((c["name"], c["type"]))
            c["id"] = prev["id"] if prev else snowflake()
            c["application_id"] = self.application_id
            c["version"] = snowflake()
            if c.get("description") is None:
                c["description"] = ""
            dmp = c.get("default_member_permissions")
            c["default_member_permissions"] = None if dmp is None else str(dmp)
            if gid:
                c["guild_id"] = gid
            elif c.get("integration_types") is None:
                # "Defaults to your app's configured contexts" at the time of creation
                c["integration_types"] = list(self.app_integration_types)
            store[c["id"]] = c
            out.append(c)
        # fake.commands: name -> command (guild commands override globals of the same name)
        self.commands = {}
        for c in self.global_commands.values():
            self.commands[c["name"]] = c
        for g in self.guild_commands.values():
            for c in g.values():
                self.commands[c["name"]] = c
        self.event("commands_synced", {"guild_id": gid, "names": [c["name"] for c in out]})
        self._commands_synced.set()
        return 200, copy.deepcopy(out)

    async def _h_get_commands(self, req, p, body, files):
        self._check_app(p["app"])
        gid = p.get("gid")
        if gid is not None:
            self._guild_for_bot(gid)
        store = self.guild_commands.get(gid, {}) if gid else self.global_commands
        return 200, copy.deepcopy(list(store.values()))

    def _channel_or_404(self, cid: str) -> dict:
        """A channel the bot can use: a channel of a guild the bot is in, or its own DM. Unknown ->
        404 10003; a channel of a guild without the bot, or a group DM / DM it is not part of ->
        403 50001 Missing Access."""
        ch, g = self.find_channel(cid)
        if ch is None:
            raise ApiError(404, {"message": "Unknown Channel", "code": 10003})
        if (g is not None and not g.bot_present) or (g is None and cid not in self._bot_dm_ids):
            raise ApiError(403, {"message": "Missing Access", "code": 50001})
        return ch

    async def _h_get_channel(self, req, p, body, files):
        ch = self._channel_or_404(p["cid"])
        self._check_bot_permissions(ch, 0, "get a channel")  # one it may not see: 50001
        return 200, dict(ch)

    def guild_object(self, guild: Any = None) -> dict:
        """The guild object of Get Guild and GUILD_UPDATE: GUILD_CREATE's payload without the
        fields only GUILD_CREATE carries (docs events/gateway-events.mdx, Guild Create)."""
        g = self.guild_payload(guild)
        for k in (
            "channels",
            "members",
            "threads",
            "voice_states",
            "presences",
            "joined_at",
            "large",
            "member_count",
            "unavailable",
        ):
            g.pop(k, None)
        return g

    async def set_preferred_locale(self, guild: Any, locale: str) -> None:
        """A server's admin changes its language (Server Settings, Community, Server Primary
        Language): GUILD_UPDATE reaches the bot on that guild's shard, if it is connected."""
        if locale not in LOCALES:
            raise ValueError(f"{locale!r} is not one of Discord's locales")
        g = self.get_guild(guild)
        g.preferred_locale = locale
        if g.bot_present:
            await self._dispatch_if_connected("GUILD_UPDATE", self.guild_object(g))

    async def _h_get_guild(self, req, p, body, files):
        return 200, self.guild_object(self._guild_for_bot(p["gid"]))

    async def _h_get_guild_channels(self, req, p, body, files):
        g = self._guild_for_bot(p["gid"])
        return 200, [dict(c) for c in g.channels.values()]

    async def _h_get_member(self, req, p, body, files):
        g = self._guild_for_bot(p["gid"])
        if p["uid"] == self.bot_user["id"]:
            return 200, self._bot_member_payload(g)
        if p["uid"] not in g.members:
            raise ApiError(404, {"message": "Unknown Member", "code": 10007})
        return 200, self.member_payload(p["uid"], with_permissions=False, guild=g)

    async def _h_typing(self, req, p, body, files):
        self._channel_or_404(p["cid"])
        return 204, None

    def _msg_or_404(self, cid: str | None, mid: str, allow_ephemeral: bool = False) -> FakeMessage:
        m = self.messages.get(mid)
        if m is None or m.deleted or (cid is not None and m.channel_id != cid) or (m.ephemeral and not allow_ephemeral):
            raise ApiError(404, {"message": "Unknown Message", "code": 10008})
        return m

    async def _h_get_message(self, req, p, body, files):
        # docs resources/message.mdx (Get Channel Message): VIEW_CHANNEL and READ_MESSAGE_HISTORY
        self._check_bot_permissions(self._channel_or_404(p["cid"]), READ_MESSAGE_HISTORY, "get a message")
        return 200, self._msg_or_404(p["cid"], p["mid"]).to_payload()

    async def _h_list_messages(self, req, p, body, files):
        ch = self._channel_or_404(p["cid"])
        self._check_bot_permissions(ch, 0, "list messages")
        if ch.get("guild_id") and not self.bot_permissions(ch["id"]) & READ_MESSAGE_HISTORY:
            # docs resources/message.mdx (Get Channel Messages): "no messages will be returned"
            return 200, []
        msgs = [m for m in self.channel_messages(p["cid"]) if not m.ephemeral]
        limit = int(req.query.get("limit", 50))
        return 200, [m.to_payload() for m in reversed(msgs)][:limit]

    async def _h_post_message(self, req, p, body, files):
        ch = self._channel_or_404(p["cid"])
        gid = ch.get("guild_id")
        if ch["id"] in self._bot_dm_ids:
            (recipient,) = ch["recipients"]
            if not self.dm_reachable(recipient["id"]):
                # docs topics/opcodes-and-status-codes.mdx
                raise ApiError(403, {"message": "Cannot send messages to this user", "code": 50007})
        body = body or {}
        # docs resources/message.mdx (Create Message, Limitations): SEND_MESSAGES, and
        # READ_MESSAGE_HISTORY for a reply; topics/permissions.mdx: ATTACH_FILES "allows for
        # uploading images and files", SEND_MESSAGES "does not allow sending messages in threads".
        needed = SEND_MESSAGES_IN_THREADS if ch.get("type") in THREAD_TYPES else SEND_MESSAGES
        if body.get("message_reference"):
            needed |= READ_MESSAGE_HISTORY
        if files:
            needed |= ATTACH_FILES
        self._check_bot_permissions(ch, needed, "post a message")
        await self._unarchive_for_a_message(ch["id"])
        nonce = str(body["nonce"]) if body.get("enforce_nonce") and body.get("nonce") else None
        if nonce is not None and nonce in self._nonces:
            earlier, at = self._nonces[nonce]
            if time.monotonic() - at < NONCE_WINDOW:
                return 200, earlier.to_payload()
        msg = FakeMessage(self, ch["id"], author=dict(self.bot_user), type=0, guild_id=gid)
        ref = body.get("message_reference")
        if ref:
            rid = str(ref.get("message_id"))
            target = self.messages.get(rid)
            if (target is None or target.deleted) and ref.get("fail_if_not_exists", True):
                raise invalid_form(
                    _form_error(["message_reference"], "REPLIES_UNKNOWN_MESSAGE", "Unknown message"),
                    f"reply to unknown message {rid}",
                )
            msg.type = 19
            msg.message_reference = {
                "type": ref.get("type", 0),
                "message_id": rid,
                "channel_id": str(ref.get("channel_id") or ch["id"]),
                "guild_id": gid,
            }
        body = {k: v for k, v in body.items() if k not in ("message_reference", "nonce", "enforce_nonce")}
        if body.get("flags", 0) & EPHEMERAL:
            raise invalid_form(
                _form_error(["flags"], "MESSAGE_FLAGS_INVALID", "Invalid flags"), "ephemeral flag on a channel message"
            )
        self._apply_write(
            msg, body, files, DEFAULT_SIZE_LIMIT, create=True, default_parse=["users", "roles", "everyone"]
        )
        if not (
            msg.content
            or msg.embeds
            or msg.attachments
            or msg.components
            or body.get("sticker_ids")
            or body.get("poll")
        ):
            raise ApiError(400, {"message": "Cannot send an empty message", "code": 50006})
        self._record_message(msg, "create")
        if nonce is not None:
            self._nonces[nonce] = (msg, time.monotonic())
        return 200, msg.to_payload()

    async def _h_patch_message(self, req, p, body, files):
        self._channel_or_404(p["cid"])
        msg = self._msg_or_404(p["cid"], p["mid"])
        self._refuse_edits_if_archived(msg.channel_id)
        if msg.author.get("id") != self.bot_user["id"]:
            raise ApiError(403, {"message": "Cannot edit a message authored by another user", "code": 50005})
        self._apply_write(msg, body or {}, files, DEFAULT_SIZE_LIMIT, create=False)
        self._record_message(msg, "edit")
        return 200, msg.to_payload()

    async def _h_delete_message(self, req, p, body, files):
        """Delete Message (docs resources/message.mdx): the bot's own messages; another's in a
        guild channel "requires the MANAGE_MESSAGES permission", and in a DM none (403 50003
        "Cannot execute action on a DM channel", topics/opcodes-and-status-codes.mdx)."""
        ch = self._channel_or_404(p["cid"])
        msg = self._msg_or_404(p["cid"], p["mid"])
        own = msg.author.get("id") == self.bot_user["id"]
        if not ch.get("guild_id") and not own:
            raise ApiError(403, {"message": "Cannot execute action on a DM channel", "code": 50003})
        self._check_bot_permissions(ch, 0 if own else MANAGE_MESSAGES, "delete a message")
        self._delete(msg)
        return 204, None

    async def _h_create_dm(self, req, p, body, files):
        """Create DM (docs resources/user.mdx): the DM channel with `recipient_id`, the existing
        one if there is one. Opening it always works; whether the bot may write there is decided
        when it posts (see `dm_reachable`)."""
        uid = str((body or {}).get("recipient_id") or "")
        if uid not in self.users:
            raise invalid_form(
                _form_error(["recipient_id"], "USER_UNKNOWN", "Unknown user"), f"Create DM for unknown user {uid!r}"
            )
        return 200, dict(self._dm_channel(uid))

    def dm_reachable(self, uid: str) -> bool:
        """Whether the bot may message a user in their DM with it: the user shares a server with
        the bot or installed the app to their account (discord-api-docs #7666: user-installed
        apps DM their users), and has not closed DMs."""
        if uid in self.dms_closed:
            return False
        shares_a_guild = any(g.bot_present and uid in g.members for g in self.guilds.values())
        return shares_a_guild or uid in self.user_installs

    async def _h_leave_guild(self, req, p, body, files):
        """The bot leaves a server: Discord answers 204 and the guild's shard gets GUILD_DELETE."""
        g = self.guilds.get(p["gid"])
        if g is None or not g.bot_present:
            raise ApiError(404, {"message": "Unknown Guild", "code": 10004})
        g.bot_left = True
        self._spawn(self._dispatch_if_connected("GUILD_DELETE", {"id": g.id}))
        return 204, None

    # ---------------------------------------------------------------- message writes
    def _record_message(self, msg: FakeMessage, event: str) -> None:
        if event == "create":
            self.messages[msg.id] = msg
            self._messages_by_channel.setdefault(msg.channel_id, []).append(msg)
        elif event == "edit":
            msg.edited_timestamp = _now_iso()
        msg.history.append(msg.snapshot(event))
        self.event(
            f"message_{event}",
            {
                "id": msg.id,
                "content": msg.content,
                "flags": msg.flags,
                "attachments": [a["filename"] for a in msg.attachments],
            },
        )

    def _delete(self, msg: FakeMessage) -> None:
        msg.deleted = True
        msg.history.append(msg.snapshot("delete"))
        self.event("message_delete", {"id": msg.id})

    def _apply_write(
        self,
        msg: FakeMessage,
        body: dict,
        files: dict,
        size_limit: int,
        create: bool,
        default_parse: list | None = None,
    ) -> None:
        """Apply a create/edit body (+ uploaded files) to msg, enforcing Discord's attachment rules."""
        # files
        uploaded: dict[str, tuple[str, bytes, str | None]] = {}
        for field_name, (fname, data, ctype) in files.items():
            mm = re.fullmatch(r"files\[(\d+)\]|file(\d*)", field_name)
            if not mm:
                raise invalid_form(
                    _form_error([field_name], "UNKNOWN_FIELD", "Unknown file field"),
                    f"unexpected multipart field {field_name}",
                )
            idx = mm.group(1) if mm.group(1) is not None else (mm.group(2) or "0")
            if len(data) > size_limit:
                raise ApiError(413, {"message": "Request entity too large", "code": 40005})
            uploaded[str(int(idx))] = (fname, data, ctype)
        new_atts: list[dict] = []
        new_data: dict[str, bytes] = {}
        att_req = body.get("attachments")
        if att_req is None:
            keep = [] if create else list(msg.attachments)
            new_atts.extend(keep)
            for a in keep:
                new_data[a["id"]] = msg._data_by_att_id.get(a["id"], b"")
            for idx in sorted(uploaded, key=int):
                fname, data, ctype = uploaded[idx]
                a = self._store_attachment(snowflake(), msg.channel_id, fname, data, ctype or None)
                new_atts.append(a)
                new_data[a["id"]] = data
        else:
            existing = {a["id"]: a for a in msg.attachments}
            used = set()
            for i, entry in enumerate(att_req):
                eid = str(entry.get("id"))
                if eid in uploaded:
                    fname, data, ctype = uploaded[eid]
                    used.add(eid)
                    fname = entry.get("filename") or fname
                    a = self._store_attachment(snowflake(), msg.channel_id, fname, data, _guess_ctype(fname, ctype))
                    if entry.get("description"):
                        a["description"] = entry["description"]
                    w, h = _image_size(data)
                    if w:
                        a["width"], a["height"] = w, h
                    new_atts.append(a)
                    new_data[a["id"]] = data
                elif eid in existing and not create:
                    new_atts.append(existing[eid])
                    new_data[eid] = msg._data_by_att_id.get(eid, b"")
                else:
                    raise invalid_form(
                        _form_error(
                            ["attachments", i, "id"],
                            "ATTACHMENT_NOT_FOUND",
                            f"Unknown attachment or no files[{eid}] uploaded",
                        ),
                        f"attachments[{i}] id={eid} matches no uploaded file or existing attachment",
                    )
            for idx in uploaded:
                if idx not in used:  # uploaded but not listed: Discord still attaches it
                    fname, data, ctype = uploaded[idx]
                    a = self._store_attachment(snowflake(), msg.channel_id, fname, data, _guess_ctype(fname, ctype))
                    new_atts.append(a)
                    new_data[a["id"]] = data
        if len(new_atts) > 10:
            raise invalid_form(
                _form_error(["attachments"], "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length."),
                f"{len(new_atts)} attachments on one message (max 10)",
            )
        # Discord limits beyond the spec (platform doc A5): the spec allows 4000 chars (Nitro users);
        # bots and webhooks get 2000. All embeds together at most 6000 chars.
        content = body.get("content")
        if isinstance(content, str) and len(content) > 2000:
            raise invalid_form(
                _form_error(["content"], "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length."),
                f"content of {len(content)} chars (max 2000)",
            )
        if body.get("embeds"):
            total = sum(_embed_chars(e) for e in body["embeds"] if isinstance(e, dict))
            if total > 6000:
                raise invalid_form(
                    _form_error(["embeds"], "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000"),
                    f"embeds total {total} chars (max 6000)",
                )
        self._check_components(msg, body, new_atts, create)
        # fields
        if "content" in body:
            msg.content = body["content"] or ""
        if "embeds" in body:
            msg.embeds = [_normalize_embed(e) for e in (body["embeds"] or [])]
        elif "embed" in body and body["embed"] is not None:
            msg.embeds = [_normalize_embed(body["embed"])]
        if "components" in body:
            msg.components = _resolve_media(_normalize_components(body["components"] or []), new_atts)
        if "tts" in body and create:
            msg.tts = bool(body["tts"])
        if "flags" in body and body["flags"] is not None:
            kept_flags = msg.flags & EPHEMERAL if not create else 0
            msg.flags = kept_flags | (int(body["flags"]) & ~LOADING & ~(0 if create else EPHEMERAL))
        if "allowed_mentions" in body:
            msg.allowed_mentions = body["allowed_mentions"]
        elif create:
            msg.allowed_mentions = None  # Discord default applies
        msg.attachments = new_atts
        msg._data_by_att_id = new_data
        msg.files = {a["filename"]: new_data[a["id"]] for a in new_atts}

    def _check_components(self, msg: FakeMessage, body: dict, new_atts: list[dict], create: bool) -> None:
        """Cross-field component rules the spec cannot express (docs components/reference.mdx;
        resources/message.mdx Create Message / Edit Message)."""
        raw_flags = body.get("flags")
        had_v2 = not create and bool(msg.flags & IS_COMPONENTS_V2)
        sets_v2 = raw_flags is not None and bool(int(raw_flags) & IS_COMPONENTS_V2)
        if had_v2 and raw_flags is not None and not sets_v2:
            # "Once a message has been sent with this flag, it can't be removed from that message."
            raise invalid_form(
                _form_error(["flags"], "MESSAGE_FLAGS_INVALID", "The IS_COMPONENTS_V2 flag cannot be removed"),
                f"edit drops IS_COMPONENTS_V2 from message {msg.id} (flags {raw_flags})",
            )
        v2 = had_v2 or sets_v2
        if v2:
            # "When the flag IS_COMPONENTS_V2 is set, the message can only contain components.
            # Providing content, embeds, sticker_ids, poll ... will fail with a 400"
            for field in ("content", "embeds", "embed", "sticker_ids", "poll"):
                if body.get(field) not in (None, "", []):
                    raise invalid_form(
                        _form_error(
                            [field], "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2", f"{field} cannot be used"
                        ),
                        f"{field} on a message with IS_COMPONENTS_V2",
                    )
            if not create and not had_v2:
                # setting the flag on an edit: used content/embeds "must have their values reset"
                for field, used in (("content", bool(msg.content)), ("embeds", bool(msg.embeds))):
                    if used and field not in body:
                        raise invalid_form(
                            _form_error(
                                [field],
                                "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2",
                                f"{field} must be reset when setting IS_COMPONENTS_V2",
                            ),
                            f"edit sets IS_COMPONENTS_V2 on message {msg.id} but keeps its {field}",
                        )
        comps = body.get("components")
        if not isinstance(comps, list):
            return
        stats = _component_stats(comps)
        where = "components"
        if v2:
            if stats["count"] > MAX_COMPONENTS_V2:
                raise invalid_form(
                    _form_error([where], "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_COMPONENTS_V2} or fewer in total."),
                    f"{stats['count']} components in total (max {MAX_COMPONENTS_V2} with IS_COMPONENTS_V2)",
                )
            if stats["text"] > MAX_TEXT_DISPLAY_TOTAL:
                raise invalid_form(
                    _form_error(
                        [where],
                        "BASE_TYPE_MAX_LENGTH",
                        f"Text displays total must be {MAX_TEXT_DISPLAY_TOTAL} or fewer.",
                    ),
                    f"text displays total {stats['text']} chars (max {MAX_TEXT_DISPLAY_TOTAL})",
                )
        else:
            # legacy messages: up to 5 action rows as top-level components; the other types need
            # the IS_COMPONENTS_V2 flag
            for i, c in enumerate(comps):
                if isinstance(c, dict) and c.get("type") != 1:
                    raise invalid_form(
                        _form_error(
                            [where, i, "type"],
                            "COMPONENT_LAYOUT_INVALID",
                            f"Component type {c.get('type')} requires the IS_COMPONENTS_V2 flag",
                        ),
                        f"component type {c.get('type')} at the top level without IS_COMPONENTS_V2",
                    )
            if len(comps) > 5:
                raise invalid_form(
                    _form_error([where], "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length."),
                    f"{len(comps)} action rows (max 5 without IS_COMPONENTS_V2)",
                )
        for why in stats["buttons"]:
            raise invalid_form(_form_error([where], "BUTTON_COMPONENT_INVALID", why), f"button: {why}")
        dup = _first_duplicate(stats["custom_ids"])
        if dup is not None:
            # "Multiple components on the same message must not share the same custom_id."
            raise invalid_form(
                _form_error([where], "COMPONENT_CUSTOM_ID_DUPLICATED", f"Component custom id {dup!r} is duplicated"),
                f"custom_id {dup!r} used twice in one message",
            )
        dup = _first_duplicate([i for i in stats["ids"] if i])
        if dup is not None:
            # "The id field ... must be unique within the message" (0 means empty)
            raise invalid_form(
                _form_error([where], "COMPONENT_ID_DUPLICATED", f"Component id {dup} is duplicated"),
                f"component id {dup} used twice in one message",
            )
        names = {a["filename"] for a in new_atts}
        for kind, url in stats["media"]:
            if kind == "file" and not url.startswith("attachment://"):
                # File: "only supports attachment references using the attachment://<filename> syntax"
                raise invalid_form(
                    _form_error([where], "UNFURLED_MEDIA_ITEM_INVALID", "File components need attachment://"),
                    f"File component with url {url[:100]!r} (only attachment://<filename>)",
                )
            if url.startswith("attachment://") and url[len("attachment://") :] not in names:
                raise invalid_form(
                    _form_error([where], "UNFURLED_MEDIA_ITEM_ATTACHMENT_NOT_FOUND", f"Unknown attachment {url}"),
                    f"{url} matches no attachment of the message ({sorted(names)})",
                )

    # ---------------------------------------------------------------- interaction/webhook handlers
    def _handle_for_token(self, app: str, tok: str) -> InteractionHandle:
        if app != self.application_id:
            raise ApiError(404, {"message": "Unknown Webhook", "code": 10015})
        h = self._by_token.get(tok)
        if h is None or h.age > TOKEN_LIFETIME:
            raise ApiError(401, {"message": "Invalid Webhook Token", "code": 50027})
        if h.channel_id in self.deleted_channels:
            raise ApiError(404, {"message": "Unknown Channel", "code": 10003})
        return h

    def _message_type_for(self, h: InteractionHandle) -> int:
        if h.type == 2:
            return 23 if (h.payload.get("data") or {}).get("type") in (2, 3) else 20
        return 19

    def _new_interaction_message(self, h: InteractionHandle) -> FakeMessage:
        meta = {
            "id": h.id,
            "type": h.type,
            "user": dict(h.user),
            "authorizing_integration_owners": h.payload.get("authorizing_integration_owners", {}),
        }
        if h.type == 2:
            meta["name"] = (h.payload.get("data") or {}).get("name")
        if h.type == 3 and h.source_message_id:
            meta["interacted_message_id"] = h.source_message_id
        msg = FakeMessage(
            self,
            h.channel_id or "",
            author=dict(self.bot_user),
            type=self._message_type_for(h),
            webhook_id=self.application_id,
            interaction_metadata=meta,
            guild_id=h.payload.get("guild_id"),
        )
        msg.interaction = h
        if msg.type == 19 and h.source_message_id:
            msg.message_reference = {
                "type": 0,
                "message_id": h.source_message_id,
                "channel_id": msg.channel_id,
                "guild_id": msg.guild_id,
            }
        return msg

    async def _h_callback(self, req, p, body, files):
        h = self.interactions.get(p["iid"])
        if h is None or h.token != p["tok"]:
            raise ApiError(404, {"message": "Unknown interaction", "code": 10062})
        if h.callback is not None:
            raise ApiError(400, {"message": "Interaction has already been acknowledged.", "code": 40060})
        if h.age > CALLBACK_WINDOW:
            raise ApiError(404, {"message": "Unknown interaction", "code": 10062})
        body = body or {}
        ctype = body.get("type")
        data = body.get("data") or {}
        allowed = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 4: {8}, 5: {4, 5, 6, 7}}.get(h.type, set())
        if ctype not in allowed:
            raise invalid_form(
                _form_error(
                    ["type"],
                    "INTERACTION_RESPONSE_TYPE_INVALID",
                    f"Callback type {ctype} not allowed for interaction type {h.type}",
                ),
                f"callback type {ctype} for interaction type {h.type}",
            )
        resource: dict = {"type": ctype}
        info: dict = {"id": h.id, "type": h.type}
        if ctype == 8:
            self._check_choices(h, data)
        if ctype in (4, 5):
            msg = self._new_interaction_message(h)
            if ctype == 4:
                self._apply_write(msg, data, files, h.attachment_size_limit, create=True)
                if not (msg.content or msg.embeds or msg.attachments or msg.components or data.get("poll")):
                    raise ApiError(400, {"message": "Cannot send an empty message", "code": 50006})
            else:
                if data.get("flags", 0) & ~EPHEMERAL:
                    raise invalid_form(
                        _form_error(
                            ["data", "flags"],
                            "INTERACTION_RESPONSE_FLAGS_INVALID",
                            "Only EPHEMERAL is allowed on a deferred response",
                        ),
                        f"defer with flags {data.get('flags')}",
                    )
                msg.flags = (data.get("flags", 0) & EPHEMERAL) | LOADING
                h._loading_untouched = True
            self._force_ephemeral(h, msg)
            h.original = msg
            self._record_message(msg, "create")
            resource["message"] = msg.to_payload()
            info.update(
                {
                    "response_message_id": msg.id,
                    "response_message_loading": ctype == 5,
                    "response_message_ephemeral": msg.ephemeral,
                }
            )
        elif ctype in (6, 7):
            src = self.messages.get(h.source_message_id or "")
            if src is None:
                raise invalid_form(
                    _form_error(["type"], "INTERACTION_RESPONSE_TYPE_INVALID", "No message to update"),
                    f"callback {ctype} without a message",
                )
            h.original = src
            h.responded_on_source = True
            if ctype == 7:
                self._apply_write(src, data, files, h.attachment_size_limit, create=False)
                self._record_message(src, "edit")
                resource["message"] = src.to_payload()
            info.update(
                {
                    "response_message_id": src.id,
                    "response_message_loading": False,
                    "response_message_ephemeral": src.ephemeral,
                }
            )
        h.callback = copy.deepcopy(body)
        h.callback_files = {k: (v[0], v[1]) for k, v in files.items()}
        self.event("callback", {"id": h.id, "type": ctype, "age": h.age})
        if ctype == 8:
            return 200, {"interaction": info}
        return 200, {"interaction": info, "resource": resource}

    def _force_ephemeral(self, h: InteractionHandle, msg: FakeMessage) -> None:
        """A user-installed app not installed in a server whose "Use External Apps" is off
        answers ephemerally (docs change-log 2024-06-27)."""
        place = h.place
        if place is not None and place.guild is not None and not place.installed and not place.guild.use_external_apps:
            msg.flags |= EPHEMERAL

    def _focused_option(self, h: InteractionHandle) -> dict | None:
        def walk(opts: list) -> dict | None:
            for o in opts or []:
                if o.get("focused"):
                    return o
                found = walk(o.get("options") or [])
                if found:
                    return found
            return None

        return walk((h.payload.get("data") or {}).get("options") or [])

    def _check_choices(self, h: InteractionHandle, data: dict) -> None:
        """Autocomplete results (docs application-commands.mdx Option Choice Structure;
        receiving-and-responding.mdx Autocomplete): at most 25 choices, name 1-100 chars, a string
        value at most 100 chars (the spec allows 6000), value of the focused option's type."""
        choices = data.get("choices") or []
        focused = self._focused_option(h) or {}
        want = {3: (str,), 4: (int,), 10: (int, float)}.get(focused.get("type", 3), (str,))
        if len(choices) > 25:
            raise invalid_form(
                _form_error(["data", "choices"], "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."),
                f"{len(choices)} autocomplete choices (max 25)",
            )
        for i, c in enumerate(choices):
            if not isinstance(c, dict):
                continue
            name, value = c.get("name"), c.get("value")
            if not isinstance(name, str) or not 1 <= len(name) <= 100:
                raise invalid_form(
                    _form_error(
                        ["data", "choices", i, "name"], "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                    ),
                    f"autocomplete choice {i} name of {len(name) if isinstance(name, str) else name!r} chars (1-100)",
                )
            if isinstance(value, bool) or not isinstance(value, want):
                raise invalid_form(
                    _form_error(["data", "choices", i, "value"], "BASE_TYPE_INVALID", "Value has the wrong type."),
                    f"autocomplete choice {i} value {value!r} for an option of type {focused.get('type')}",
                )
            if isinstance(value, str) and len(value) > 100:
                raise invalid_form(
                    _form_error(
                        ["data", "choices", i, "value"], "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length."
                    ),
                    f"autocomplete choice {i} value of {len(value)} chars (max 100)",
                )

    def _wh_message(self, h: InteractionHandle, mid: str) -> FakeMessage:
        """The message an interaction's webhook route names: `@original`, its response (the
        message a component was pressed on, once answered by type 6 or 7), or by id one it sent
        itself. Discord documents editing by id for messages "from the same token" (webhook.mdx,
        Edit Webhook Message), so a pressed message, which another interaction sent, is named
        only `@original` here [inference: the documented form; by id, unconfirmed]."""
        if mid == "@original":
            if h.original is None or h.original.deleted:
                raise ApiError(404, {"message": "Unknown Message", "code": 10008})
            return h.original
        sent = [h.original] if h.original is not None and not h.responded_on_source else []
        for m in sent + h.followups:
            if m.id == mid and not m.deleted:
                return m
        raise ApiError(404, {"message": "Unknown Message", "code": 10008})

    async def _h_wh_get(self, req, p, body, files):
        h = self._handle_for_token(p["app"], p["tok"])
        return 200, self._wh_message(h, p["mid"]).to_payload()

    async def _h_wh_patch(self, req, p, body, files):
        h = self._handle_for_token(p["app"], p["tok"])
        msg = self._wh_message(h, p["mid"])
        self._refuse_edits_if_archived(msg.channel_id)
        self._apply_write(msg, body or {}, files, h.attachment_size_limit, create=False)
        msg.flags &= ~LOADING
        if msg is h.original:
            h._loading_untouched = False
        self._record_message(msg, "edit")
        return 200, msg.to_payload()

    async def _h_wh_delete(self, req, p, body, files):
        h = self._handle_for_token(p["app"], p["tok"])
        msg = self._wh_message(h, p["mid"])
        self._delete(msg)
        if msg is h.original:
            h._loading_untouched = False
        return 204, None

    async def _h_wh_post(self, req, p, body, files):
        h = self._handle_for_token(p["app"], p["tok"])
        if h.callback is None:
            raise ApiError(404, {"message": "Unknown Webhook", "code": 10015})
        if h.user_install_only and h.followup_calls >= USER_INSTALL_FOLLOWUP_LIMIT:
            # docs receiving-and-responding.mdx (Create Followup Message); code: opcodes file
            raise ApiError(
                400, {"message": "This interaction has hit the maximum number of follow up messages", "code": 40094}
            )
        body = dict(body or {})
        for k in ("username", "avatar_url", "thread_name"):
            body.pop(k, None)
        if h._loading_untouched and h.original is not None and not h.original.deleted:
            # deprecated behaviour: first followup after a type-5 defer edits the loading message;
            # the ephemeral state of the defer wins.
            msg = h.original
            body.pop("flags", None)
            self._apply_write(msg, body, files, h.attachment_size_limit, create=False)
            msg.flags &= ~LOADING
            h._loading_untouched = False
            h.followup_calls += 1
            self._record_message(msg, "edit")
            self.event("followup_edited_original", {"id": msg.id})
            return 200, msg.to_payload()
        msg = self._new_interaction_message(h)
        self._apply_write(msg, body, files, h.attachment_size_limit, create=True)
        if not (msg.content or msg.embeds or msg.attachments or msg.components or body.get("poll")):
            raise ApiError(400, {"message": "Cannot send an empty message", "code": 50006})
        self._force_ephemeral(h, msg)
        h.followup_calls += 1
        h.followups.append(msg)
        self._record_message(msg, "create")
        if req.query.get("wait") in ("1", "true", "True"):
            return 200, msg.to_payload()
        return 204, None


def _guess_ctype(fname: str, ctype: str | None) -> str | None:
    if ctype and ctype != "application/octet-stream":
        return ctype
    import mimetypes

    return mimetypes.guess_type(fname)[0] or ctype


def _embed_chars(e: dict) -> int:
    n = len(e.get("title") or "") + len(e.get("description") or "")
    n += len((e.get("footer") or {}).get("text") or "") + len((e.get("author") or {}).get("name") or "")
    for f in e.get("fields") or []:
        n += len(f.get("name") or "") + len(f.get("value") or "")
    return n


def _normalize_embed(e: dict) -> dict:
    e = copy.deepcopy(e)
    e.setdefault("type", "rich")
    for k in ("image", "thumbnail"):
        if isinstance(e.get(k), dict) and "url" in e[k]:
            e[k].setdefault("proxy_url", e[k]["url"])
    return e


def _normalize_components(comps: list) -> list:
    comps = copy.deepcopy(comps)
    counter = itertools.count(1)

    def walk(c: dict) -> None:
        c.setdefault("id", next(counter))
        for child in c.get("components") or []:
            walk(child)
        if isinstance(c.get("component"), dict):
            walk(c["component"])
        if isinstance(c.get("accessory"), dict):
            walk(c["accessory"])

    for c in comps:
        walk(c)
    return comps


def custom_ids(components: list) -> list[str]:
    """Every custom_id in a message's components, nested ones included."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("custom_id"), str):
                found.append(node["custom_id"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(components)
    return found


def walk_components(node: Any):
    """Every component dict in a component tree (children, accessories, label components)."""
    if isinstance(node, list):
        for c in node:
            yield from walk_components(c)
    elif isinstance(node, dict) and "type" in node:
        yield node
        for key in ("components", "accessory", "component"):
            if key in node:
                yield from walk_components(node[key])


def _component_stats(comps: list) -> dict:
    stats: dict = {"count": 0, "text": 0, "custom_ids": [], "ids": [], "media": [], "buttons": []}
    for c in walk_components(comps):
        stats["count"] += 1
        if c.get("type") == 2:
            # docs components/reference.mdx (Button Structure): which fields each style must have
            style, has = c.get("style"), {k for k in ("custom_id", "url", "sku_id") if c.get(k) is not None}
            need = {5: {"url"}, 6: {"sku_id"}}.get(style, {"custom_id"})
            if has != need:
                stats["buttons"].append(f"style {style} needs exactly {sorted(need)}, got {sorted(has)}")
        if isinstance(c.get("custom_id"), str):
            stats["custom_ids"].append(c["custom_id"])
        if isinstance(c.get("id"), int):
            stats["ids"].append(c["id"])
        t = c.get("type")
        if t == 10 and isinstance(c.get("content"), str):
            stats["text"] += len(c["content"])
        elif t == 11 and isinstance(c.get("media"), dict):
            stats["media"].append(("thumbnail", str(c["media"].get("url", ""))))
        elif t == 12:
            for item in c.get("items") or []:
                if isinstance(item, dict) and isinstance(item.get("media"), dict):
                    stats["media"].append(("gallery", str(item["media"].get("url", ""))))
        elif t == 13 and isinstance(c.get("file"), dict):
            stats["media"].append(("file", str(c["file"].get("url", ""))))
    return stats


def _first_duplicate(values: list) -> Any:
    seen: set = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


def _media_dicts(components: list):
    for c in walk_components(components):
        t = c.get("type")
        if t == 11 and isinstance(c.get("media"), dict):
            yield c["media"]
        elif t == 12:
            for item in c.get("items") or []:
                if isinstance(item, dict) and isinstance(item.get("media"), dict):
                    yield item["media"]
        elif t == 13 and isinstance(c.get("file"), dict):
            yield c["file"]


def _resolve_media(components: list, attachments: list[dict]) -> list:
    """`attachment://name` media become the uploaded attachment's CDN URL, as Discord fills in
    unfurled media items (docs components/reference.mdx Unfurled Media Item)."""
    by_name = {a["filename"]: a for a in attachments}
    for media in _media_dicts(components):
        url = media.get("url")
        if isinstance(url, str) and url.startswith("attachment://"):
            att = by_name.get(url[len("attachment://") :])
            if att is None:
                continue
            media.update(
                {
                    "url": att["url"],
                    "proxy_url": att["proxy_url"],
                    "content_type": att.get("content_type"),
                    "width": att.get("width"),
                    "height": att.get("height"),
                    "flags": 0,
                    "attachment_id": att["id"],
                }
            )
    return components


def text_displays(components: list) -> list[str]:
    """The contents of every Text Display in a component tree, in order."""
    return [c["content"] for c in walk_components(components) if c.get("type") == 10 and "content" in c]


def media_gallery_items(message: Any) -> list[dict]:
    """Every Media Gallery item of a message (nested ones included), in order: the item as stored
    plus `filename` and `data` (the bytes) when it shows one of the message's attachments."""
    by_id = {a["id"]: a for a in message.attachments}
    out = []
    for c in walk_components(message.components):
        if c.get("type") != 12:
            continue
        for item in c.get("items") or []:
            entry = copy.deepcopy(item)
            aid = (item.get("media") or {}).get("attachment_id")
            att = by_id.get(aid) if aid else None
            entry["filename"] = att["filename"] if att else None
            entry["data"] = message._data_by_att_id.get(aid) if att else None
            out.append(entry)
    return out
