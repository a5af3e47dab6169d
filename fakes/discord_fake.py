"""A fake Discord (REST under /api/v10 + gateway websocket + CDN) on 127.0.0.1 for tests.

Faithful enough that real, unmodified discord.py 2.7.1 (``commands.AutoShardedBot``) runs against it.
Facts used here are from /work/shared/reference/discord-platform.md (Part B).

* Every JSON request body (or multipart ``payload_json``) is validated against Discord's OpenAPI
  spec (``discord_spec/openapi.json``). Invalid bodies get 400/50035 and are appended to
  ``fake.violations``; so are unknown routes (404) and other malformed-form errors (too many
  attachments, ``attachments`` entries without an uploaded file).
* Platform rules (3 s callback window, 15 min token, double ack, file size, auth) answer like
  Discord and are recorded in ``fake.rejections`` (not violations: tests provoke them on purpose).
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

EPHEMERAL = 1 << 6
LOADING = 1 << 7
DEFAULT_SIZE_LIMIT = 10 * 1024 * 1024
CALLBACK_WINDOW = 3.0
# Signed attachment CDN URLs (platform doc A8): `ex` (hex expiry), `is` (hex issue time), `hm`
# (signature). The lifetime is not documented; about 24 h is commonly observed.
CDN_URL_LIFETIME = 86400
CDN_GONE_TEXT = "This content is no longer available."
TOKEN_LIFETIME = 15 * 60.0
JOINED_AT = "2026-01-01T00:00:00+00:00"

_snow_counter = itertools.count()


def snowflake() -> str:
    """Real-time, unique snowflake (discord epoch ms << 22 | counter)."""
    ms = int(time.time() * 1000) - 1420070400000
    return str((ms << 22) | (next(_snow_counter) & 0x3FFFFF))


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
    status: int = 0
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
            "components": copy.deepcopy(self.components),
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
            if ref is not None and not ref.deleted:
                p["referenced_message"] = ref.to_payload()
        if self.guild_id:
            p["guild_id"] = self.guild_id
        return p

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
        self.followups: list[FakeMessage] = []
        self.dispatched_at = time.monotonic()
        self.age_offset = 0.0
        self._loading_untouched = False  # type 5 defer with no edit yet
        self.source_message_id: str | None = (payload.get("message") or {}).get("id")

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
        self.cdn_clock_offset = 0.0  # the CDN's clock = time.time() + this (advance_cdn_clock)
        self._cdn_secret = secrets.token_bytes(16)
        self._cdn_max_ex = 0
        self._faults: list[dict] = []
        self._hang_release = asyncio.Event()
        self._hanging = 0

        # gateway state
        self._ws: web.WebSocketResponse | None = None
        self._all_ws: list[web.WebSocketResponse] = []
        self._seq = 0
        self.session_id: str | None = None
        self.identify_count = 0
        self.identify_payloads: list[dict] = []
        self.gateway_received: list[dict] = []
        self._identified = asyncio.Event()
        self._commands_synced = asyncio.Event()
        self._changed = asyncio.Event()

        # world
        self.guild_id = snowflake()
        self.channel_id = snowflake()
        self.nsfw_channel_id = snowflake()
        self.roles: dict[str, dict] = {}
        self.channels: dict[str, dict] = {}
        self.members: dict[str, dict] = {}  # user id -> {"user", "roles", "permissions"}
        self.dm_channels: dict[str, str] = {}  # user id -> DM channel id
        self.premium_tier = 0
        self.bot_left_guild = False
        self.roles[self.guild_id] = self._role_obj(self.guild_id, "@everyone", 0, 0)
        self.add_channel("general", channel_id=self.channel_id)
        self.add_channel("nsfw-art", nsfw=True, channel_id=self.nsfw_channel_id)
        self.guild: dict[str, Any] = {"id": self.guild_id, "name": "Test Guild", "owner_id": None}
        self.alice = self.add_member(name="alice", permissions=MEMBER_PERMISSIONS)
        self.mod = self.add_member(name="mod", permissions=MOD_PERMISSIONS)
        # the owner implicitly has every permission, so it is a separate member (not "mod")
        self.owner = self.add_member(name="owner", permissions=ADMINISTRATOR)
        self.guild["owner_id"] = self.owner["id"]

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

    def add_role(self, name: str, permissions: int = 0, role_id: str | None = None) -> dict:
        rid = str(role_id or snowflake())
        role = self._role_obj(rid, name, permissions, len(self.roles))
        self.roles[rid] = role
        return role

    def add_channel(self, name: str, nsfw: bool = False, channel_id: str | None = None, type: int = 0) -> dict:
        cid = str(channel_id or snowflake())
        ch = {
            "id": cid,
            "type": type,
            "guild_id": self.guild_id,
            "name": name,
            "position": len(self.channels),
            "permission_overwrites": [],
            "nsfw": nsfw,
            "parent_id": None,
            "topic": None,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
        }
        self.channels[cid] = ch
        return ch

    def add_member(
        self,
        user_id: int | str | None = None,
        name: str = "alice",
        permissions: int = MEMBER_PERMISSIONS,
        roles: Sequence[Any] = (),
    ) -> dict:
        uid = str(user_id or snowflake())
        user = {
            "id": uid,
            "username": name,
            "discriminator": "0",
            "global_name": name.capitalize(),
            "avatar": None,
            "public_flags": 0,
            "bot": False,
        }
        self.members[uid] = {
            "user": user,
            "roles": [str(r["id"] if isinstance(r, dict) else r) for r in roles],
            "permissions": permissions,
        }
        return user

    def _resolve_user(self, user: Any) -> dict:
        if isinstance(user, dict):
            user = user["id"]
        user = str(user)
        if user in self.members:
            return self.members[user]["user"]
        for m in self.members.values():
            if m["user"]["username"] == user:
                return m["user"]
        raise KeyError(f"unknown member {user!r}")

    def member_permissions(self, user_id: str) -> int:
        m = self.members[user_id]
        perms = int(self.roles[self.guild_id]["permissions"]) | m["permissions"]
        for r in m["roles"]:
            if r in self.roles:
                perms |= int(self.roles[r]["permissions"])
        if perms & ADMINISTRATOR or user_id == self.guild.get("owner_id"):
            perms |= (1 << 51) - 1
        return perms

    def member_payload(self, user_id: str, with_permissions: bool = True) -> dict:
        m = self.members[user_id]
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
            p["permissions"] = str(self.member_permissions(user_id))
        return p

    def guild_payload(self) -> dict:
        members = [
            {"user": dict(self.bot_user), "roles": [], "joined_at": JOINED_AT, "deaf": False, "mute": False, "flags": 0}
        ]
        members += [self.member_payload(uid, with_permissions=False) for uid in self.members]
        return {
            "id": self.guild_id,
            "name": self.guild["name"],
            "icon": None,
            "owner_id": self.guild["owner_id"],
            "unavailable": False,
            "member_count": len(members),
            "large": False,
            "premium_tier": self.premium_tier,
            "preferred_locale": "en-US",
            "features": [],
            "joined_at": JOINED_AT,
            "nsfw_level": 0,
            "roles": list(self.roles.values()),
            "channels": [dict(c) for c in self.channels.values()],
            "members": members,
            "threads": [],
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
        lifetime: float = CDN_URL_LIFETIME,
    ) -> dict:
        path = f"/cdn/attachments/{channel_id}/{aid}/{urllib.parse.quote(filename)}"
        self.cdn_files[path] = (data, content_type or "application/octet-stream")
        self.cdn_lifetimes[path] = lifetime
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
        """A message written by a (fake) human, e.g. as a context-menu target."""
        msg = FakeMessage(
            self, str(channel_id or self.channel_id), author=dict(self._resolve_user(user)), guild_id=self.guild_id
        )
        msg.content = content
        msg.attachments = [dict(a) for a in attachments]
        self._record_message(msg, "create")
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
    ) -> None:
        """Answer the next `times` requests matching METHOD and regex (searched in the path after
        /api/v10) with `status`, after letting `skip` matching requests through. 429 gets
        Discord's body and a `Via` header by default.

        status="hang": record the request, never apply it and never answer until `release_hangs()`
        or stop() (then the connection is dropped): a request lost in flight."""
        if status == "hang":
            self._faults.append(
                {
                    "method": method.upper(),
                    "rx": re.compile(path_regex),
                    "status": "hang",
                    "times": times,
                    "json": None,
                    "headers": {},
                    "skip": skip,
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
            hdrs = {
                "Via": "1.1 google",
                "Retry-After": str(max(1, int(ra + 0.999))),
                "X-RateLimit-Scope": "user",
                "X-RateLimit-Global": "true" if json.get("global") else "false",
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset-After": str(ra),
                "X-RateLimit-Bucket": "fakebucket",
            }
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

    async def dispatch(self, t: str, d: dict, timeout: float = 10) -> None:
        """Send a DISPATCH event to the currently identified connection."""
        if self._ws is None or self._ws.closed:
            await self.wait_until(
                lambda: self._ws is not None and not self._ws.closed and self._identified.is_set(), timeout
            )
        self._seq += 1
        await self._send(self._ws, {"op": 0, "s": self._seq, "t": t, "d": d})  # type: ignore[arg-type]

    async def disconnect_gateway(self, code: int = 4000) -> None:
        """Close the current gateway connection (the client should resume/reconnect)."""
        if self._ws is not None:
            await self._ws.close(code=code)

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        self._all_ws.append(ws)
        self.event("gateway_connect", dict(request.query))
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
                    await self._on_identify(ws, data.get("d") or {})
                elif op == 6:
                    d = data.get("d") or {}
                    if d.get("token") != self.token and d.get("token") != f"Bot {self.token}":
                        await ws.close(code=4004)
                        break
                    if d.get("session_id") != self.session_id:
                        await self._send(ws, {"op": 9, "d": False, "s": None, "t": None})
                        continue
                    self._ws = ws
                    self.event("gateway_resume", d)
                    self._identified.set()
                    await self.dispatch("RESUMED", {"_trace": ["fake-gateway"]})
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
            if self._ws is ws:
                self._ws = None
                self._identified.clear()
            self.event("gateway_disconnect", ws.close_code)
            self._notify()
        return ws

    async def _on_identify(self, ws: web.WebSocketResponse, d: dict) -> None:
        tok = d.get("token", "")
        if tok not in (self.token, f"Bot {self.token}"):
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        self.identify_count += 1
        self.identify_payloads.append(d)
        self._ws = ws
        self._seq = 0
        self.session_id = secrets.token_hex(16)
        shard = d.get("shard") or [0, 1]
        await self.dispatch(
            "READY",
            {
                "v": 10,
                "user": dict(self.bot_user),
                "guilds": [{"id": self.guild_id, "unavailable": True}],
                "session_id": self.session_id,
                "session_type": "normal",
                "resume_gateway_url": self.gateway_url,
                "shard": shard,
                "application": {"id": self.application_id, "flags": 0},
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "_trace": ["fake-gateway"],
            },
        )
        await self.dispatch("GUILD_CREATE", self.guild_payload())
        self.event("gateway_identify", {"shard": shard, "intents": d.get("intents")})
        self._identified.set()
        self._notify()

    # ---------------------------------------------------------------- interaction builders
    def _channel_payload(self, channel_id: str) -> dict:
        ch = dict(self.channels[channel_id])
        ch["permissions"] = str(BOT_PERMISSIONS)
        return ch

    def _interaction_base(
        self,
        itype: int,
        data: dict | None,
        user: Any,
        channel_id: str | None,
        guild: bool,
        attachment_size_limit: int,
        app_permissions: int | None,
        locale: str,
    ) -> tuple[dict, dict]:
        u = self._resolve_user(user)
        if guild:
            cid = str(channel_id or self.channel_id)
        else:  # one DM channel per user
            cid = str(channel_id or self.dm_channels.setdefault(u["id"], snowflake()))
        payload: dict = {
            "id": snowflake(),
            "application_id": self.application_id,
            "type": itype,
            "token": "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48),
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "attachment_size_limit": attachment_size_limit,
            "app_permissions": str(BOT_PERMISSIONS if app_permissions is None else app_permissions),
        }
        if data is not None:
            payload["data"] = data
        if guild:
            payload.update(
                {
                    "guild": {"id": self.guild_id, "locale": "en-US", "features": []},
                    "guild_id": self.guild_id,
                    "guild_locale": "en-US",
                    "channel": self._channel_payload(cid),
                    "channel_id": cid,
                    "member": self.member_payload(u["id"]),
                    "authorizing_integration_owners": {"0": self.guild_id},
                    "context": 0,
                }
            )
        else:
            dm = {"id": cid, "type": 1, "last_message_id": None, "flags": 0, "recipients": [dict(u)]}
            payload.update(
                {
                    "channel": dm,
                    "channel_id": cid,
                    "user": dict(u),
                    "context": 1,
                    "authorizing_integration_owners": {"0": self.guild_id},
                }
            )
        return payload, u

    async def _fire(self, payload: dict, user: dict) -> InteractionHandle:
        h = InteractionHandle(self, payload, user)
        self.interactions[h.id] = h
        self._by_token[h.token] = h
        await self.dispatch("INTERACTION_CREATE", payload)
        h.dispatched_at = time.monotonic()
        self.event("interaction_dispatch", {"id": h.id, "type": h.type, "data": payload.get("data")})
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

    def _build_options(self, spec_opts: list, values: dict, resolved: dict) -> list:
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
                        "options": self._build_options(o.get("options") or [], value or {}, resolved),
                    }
                )
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
                mp = self.member_payload(u["id"])
                mp.pop("user")
                resolved.setdefault("members", {})[u["id"]] = mp
                v = u["id"]
            elif t == 7:
                cid = str(value)
                resolved.setdefault("channels", {})[cid] = self._channel_payload(cid)
                v = cid
            elif t == 8:
                rid = str(value["id"] if isinstance(value, dict) else value)
                resolved.setdefault("roles", {})[rid] = dict(self.roles[rid])
                v = rid
            else:
                v = value
            out.append({"name": name, "type": t, "value": v})
        return out

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
    ) -> InteractionHandle:
        """Slash command. `name` may be "cmd sub" or "cmd group sub" for subcommands."""
        parts = name.split()
        cmd = self.find_command(parts[0], 1)
        resolved: dict = {}
        values: dict = dict(options or {})
        for sub in reversed(parts[1:]):
            values = {sub: values}
        opts = self._build_options(cmd.get("options") or [], values, resolved)
        data = {"id": cmd["id"], "name": cmd["name"], "type": 1, "options": opts}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        if resolved:
            data["resolved"] = resolved
        payload, u = self._interaction_base(
            2, data, user, channel_id, guild, attachment_size_limit, app_permissions, locale
        )
        return await self._fire(payload, u)

    async def invoke_message_command(
        self,
        name: str,
        target_message_id: str,
        user: Any = "alice",
        channel_id: str | None = None,
        attachment_size_limit: int = DEFAULT_SIZE_LIMIT,
        app_permissions: int | None = None,
    ) -> InteractionHandle:
        cmd = self.find_command(name, 3)
        target = self.messages[str(target_message_id)]
        data = {
            "id": cmd["id"],
            "name": cmd["name"],
            "type": 3,
            "target_id": target.id,
            "resolved": {"messages": {target.id: target.to_payload()}},
        }
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        payload, u = self._interaction_base(
            2, data, user, channel_id or target.channel_id, True, attachment_size_limit, app_permissions, "en-US"
        )
        return await self._fire(payload, u)

    async def click_button(
        self,
        message_id: str,
        custom_id: str,
        user: Any = "alice",
        component_type: int = 2,
        values: list | None = None,
        attachment_size_limit: int = DEFAULT_SIZE_LIMIT,
        app_permissions: int | None = None,
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
        payload, u = self._interaction_base(
            3, data, user, msg.channel_id, msg.guild_id is not None, attachment_size_limit, app_permissions, "en-US"
        )
        payload["message"] = msg.to_payload()
        return await self._fire(payload, u)

    async def submit_modal(
        self,
        custom_id: Any,
        values: dict,
        user: Any = "alice",
        message_id: str | None = None,
        channel_id: str | None = None,
        attachment_size_limit: int = DEFAULT_SIZE_LIMIT,
        app_permissions: int | None = None,
    ) -> InteractionHandle:
        """`custom_id` may be the modal's custom_id or the InteractionHandle that received the modal."""
        if isinstance(custom_id, InteractionHandle):
            modal = custom_id.modal
            if modal is None:
                raise ValueError("that interaction was not answered with a modal")
            channel_id = channel_id or custom_id.channel_id
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
        payload, u = self._interaction_base(
            5,
            data,
            user,
            channel_id or (msg.channel_id if msg else None),
            True,
            attachment_size_limit,
            app_permissions,
            "en-US",
        )
        if msg is not None:
            payload["message"] = msg.to_payload()
        return await self._fire(payload, u)

    # ---------------------------------------------------------------- queries
    def channel_messages(self, channel_id: str | None = None, include_deleted: bool = False) -> list[FakeMessage]:
        cid = str(channel_id or self.channel_id)
        return [m for m in self.messages.values() if m.channel_id == cid and (include_deleted or not m.deleted)]

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
                body, files, had_body = await self._read_body(request)
                rec.json = body
                rec.files = {k: (v[0], v[1]) for k, v in files.items()}
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
            "approximate_guild_count": 1,
        }

    async def _h_gateway_bot(self, req, p, body, files):
        return 200, {
            "url": self.gateway_url,
            "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 14400000, "max_concurrency": 1},
        }

    async def _h_gateway(self, req, p, body, files):
        return 200, {"url": self.gateway_url}

    def _check_app(self, app: str) -> None:
        if app != self.application_id:
            raise ApiError(404, {"message": "Unknown Application", "code": 10002})

    async def _h_put_commands(self, req, p, body, files):
        self._check_app(p["app"])
        gid = p.get("gid")
        if gid is not None and gid != self.guild_id:
            raise ApiError(404, {"message": "Unknown Guild", "code": 10004})
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
        store = self.guild_commands.get(gid, {}) if gid else self.global_commands
        return 200, copy.deepcopy(list(store.values()))

    def _channel_or_404(self, cid: str) -> dict:
        ch = self.channels.get(cid)
        if ch is None:
            raise ApiError(404, {"message": "Unknown Channel", "code": 10003})
        return ch

    async def _h_get_channel(self, req, p, body, files):
        return 200, dict(self._channel_or_404(p["cid"]))

    async def _h_get_guild(self, req, p, body, files):
        if p["gid"] != self.guild_id:
            raise ApiError(404, {"message": "Unknown Guild", "code": 10004})
        g = self.guild_payload()
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
        return 200, g

    async def _h_get_guild_channels(self, req, p, body, files):
        if p["gid"] != self.guild_id:
            raise ApiError(404, {"message": "Unknown Guild", "code": 10004})
        return 200, [dict(c) for c in self.channels.values()]

    async def _h_get_member(self, req, p, body, files):
        if p["gid"] != self.guild_id:
            raise ApiError(404, {"message": "Unknown Guild", "code": 10004})
        if p["uid"] == self.bot_user["id"]:
            return 200, {
                "user": dict(self.bot_user),
                "roles": [],
                "joined_at": JOINED_AT,
                "deaf": False,
                "mute": False,
                "flags": 0,
            }
        if p["uid"] not in self.members:
            raise ApiError(404, {"message": "Unknown Member", "code": 10007})
        return 200, self.member_payload(p["uid"], with_permissions=False)

    async def _h_typing(self, req, p, body, files):
        self._channel_or_404(p["cid"])
        return 204, None

    def _msg_or_404(self, cid: str | None, mid: str, allow_ephemeral: bool = False) -> FakeMessage:
        m = self.messages.get(mid)
        if m is None or m.deleted or (cid is not None and m.channel_id != cid) or (m.ephemeral and not allow_ephemeral):
            raise ApiError(404, {"message": "Unknown Message", "code": 10008})
        return m

    async def _h_get_message(self, req, p, body, files):
        self._channel_or_404(p["cid"])
        return 200, self._msg_or_404(p["cid"], p["mid"]).to_payload()

    async def _h_list_messages(self, req, p, body, files):
        self._channel_or_404(p["cid"])
        msgs = [m for m in self.channel_messages(p["cid"]) if not m.ephemeral]
        limit = int(req.query.get("limit", 50))
        return 200, [m.to_payload() for m in reversed(msgs)][:limit]

    async def _h_post_message(self, req, p, body, files):
        ch = self._channel_or_404(p["cid"])
        body = body or {}
        msg = FakeMessage(self, ch["id"], author=dict(self.bot_user), type=0, guild_id=self.guild_id)
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
                "guild_id": self.guild_id,
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
        return 200, msg.to_payload()

    async def _h_patch_message(self, req, p, body, files):
        self._channel_or_404(p["cid"])
        msg = self._msg_or_404(p["cid"], p["mid"])
        if msg.author.get("id") != self.bot_user["id"]:
            raise ApiError(403, {"message": "Cannot edit a message authored by another user", "code": 50005})
        self._apply_write(msg, body or {}, files, DEFAULT_SIZE_LIMIT, create=False)
        self._record_message(msg, "edit")
        return 200, msg.to_payload()

    async def _h_delete_message(self, req, p, body, files):
        self._channel_or_404(p["cid"])
        msg = self._msg_or_404(p["cid"], p["mid"])
        self._delete(msg)
        return 204, None

    async def _h_leave_guild(self, req, p, body, files):
        """The bot leaves the server: Discord answers 204 and the gateway says GUILD_DELETE."""
        if p["gid"] != self.guild_id or self.bot_left_guild:
            raise ApiError(404, {"message": "Unknown Guild", "code": 10004})
        self.bot_left_guild = True
        asyncio.get_running_loop().create_task(self.dispatch("GUILD_DELETE", {"id": self.guild_id}))
        return 204, None

    # ---------------------------------------------------------------- message writes
    def _record_message(self, msg: FakeMessage, event: str) -> None:
        if event == "create":
            self.messages[msg.id] = msg
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
        # fields
        if "content" in body:
            msg.content = body["content"] or ""
        if "embeds" in body:
            msg.embeds = [_normalize_embed(e) for e in (body["embeds"] or [])]
        elif "embed" in body and body["embed"] is not None:
            msg.embeds = [_normalize_embed(body["embed"])]
        if "components" in body:
            msg.components = _normalize_components(body["components"] or [])
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

    # ---------------------------------------------------------------- interaction/webhook handlers
    def _handle_for_token(self, app: str, tok: str) -> InteractionHandle:
        if app != self.application_id:
            raise ApiError(404, {"message": "Unknown Webhook", "code": 10015})
        h = self._by_token.get(tok)
        if h is None or h.age > TOKEN_LIFETIME:
            raise ApiError(401, {"message": "Invalid Webhook Token", "code": 50027})
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
        return 200, {"interaction": info, "resource": resource}

    def _wh_message(self, h: InteractionHandle, mid: str) -> FakeMessage:
        if mid == "@original":
            if h.original is None or h.original.deleted:
                raise ApiError(404, {"message": "Unknown Message", "code": 10008})
            return h.original
        for m in ([h.original] if h.original else []) + h.followups:
            if m.id == mid and not m.deleted:
                return m
        raise ApiError(404, {"message": "Unknown Message", "code": 10008})

    async def _h_wh_get(self, req, p, body, files):
        h = self._handle_for_token(p["app"], p["tok"])
        return 200, self._wh_message(h, p["mid"]).to_payload()

    async def _h_wh_patch(self, req, p, body, files):
        h = self._handle_for_token(p["app"], p["tok"])
        msg = self._wh_message(h, p["mid"])
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
            self._record_message(msg, "edit")
            self.event("followup_edited_original", {"id": msg.id})
            return 200, msg.to_payload()
        msg = self._new_interaction_message(h)
        self._apply_write(msg, body, files, h.attachment_size_limit, create=True)
        if not (msg.content or msg.embeds or msg.attachments or msg.components or body.get("poll")):
            raise ApiError(400, {"message": "Cannot send an empty message", "code": 50006})
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
