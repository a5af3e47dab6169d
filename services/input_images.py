"""Input images made durable before a job is submitted.

fal fetches a job's inputs when the job starts, not when it is submitted, and Discord's
attachment URLs are signed and expire (about a day). So the bot fetches each input itself,
only from Discord's CDN or media proxy (never an address a member controls), within the size
limit, checks that the bytes really are an image fal can read (a lying content type or a broken
file costs nothing), and hands fal a copy that lasts: a data URI for a small image, else an upload
to fal's storage, reused for every job built on the same picture.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
import yarl
from PIL import Image, UnidentifiedImageError

from .fal_storage import FalStorage
from .flux_kontext import KontextEdit
from .i18n import N_, LocalizedError
from .images import EXTENSIONS, SNIFF_BYTES, sniff_image_type
from .redact import describe_error
from .retry import Backoff, retrying
from .store import Store

log = logging.getLogger(__name__)

# Up to this size a data URI costs less than an upload (no round trip; the body grows by a third).
INLINE_MAX_BYTES = 64 * 1024
# How long fal keeps an uploaded input, and how long the bot reuses it.
INPUT_LIFETIME_SECONDS = 30 * 86400
REUSE_MARGIN_SECONDS = 86400
# Pillow's format names. "MPO" is a JPEG whose Multi-Picture index lists more pictures after the
# first (a camera's preview, a phone's HDR gain map): any JPEG reader shows its first, the photo.
_PILLOW_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}


class InputRejected(LocalizedError):
    """The member's image cannot be used (not an image, broken, too large, not on Discord)."""


class InputUnavailable(LocalizedError):
    """Discord no longer serves the image (an expired link or a deleted message), or could not
    be reached."""


class InputExpired(InputUnavailable):
    """An earlier job's input can no longer be had, so the job cannot be re-rolled or tried
    again as it is: its copy at fal is gone, or will be before a job built on it could start,
    or (a job that failed before its copy was made) its Discord link expired."""


_DISCORD_LINK_GONE = N_("Discord no longer has `{name}` (the link expired or the message is gone).")
_NOT_FETCHED = N_("`{name}` could not be fetched from Discord right now.")


def _shown_name(url: str) -> str:
    """An input's file name as the member is told it, between backticks."""
    return (yarl.URL(url).name or "image").replace("`", "'")


def _earlier_copy_key(url: str) -> str:
    """What versions before `_copy_key` recorded a copy by: the attachment's address without its
    signature. Such copies last up to INPUT_LIFETIME_SECONDS after those versions ran."""
    return str(yarl.URL(url).with_query(None).with_fragment(None))


def _copy_key(data: bytes) -> str:
    """What an upload of `data` is found again by: its bytes, not the address they came from.
    The same attachment comes with a new signature (`ex`, `is`, `hm`) each time Discord hands it
    out, and a link whose picture changes (a webcam's latest.jpg) keeps its address at Discord's
    media proxy."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# A few kilobytes can claim a picture of billions of pixels (a "decompression bomb"): past
# Pillow's own warning limit (about 89 million, twice an 8K image), an input is refused.
MAX_INPUT_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def _too_many_pixels(name: str) -> InputRejected:
    return InputRejected(
        N_("`{name}` has too many pixels: at most {limit} million."), name=name, limit=MAX_INPUT_PIXELS // 1_000_000
    )


def check_image(data: bytes, name: str) -> str:
    """The content type of `data` if it is a whole image of a kind fal reads; else InputRejected."""
    if not data:
        raise InputRejected(N_("`{name}` is empty."), name=name)
    sniffed = sniff_image_type(data[:SNIFF_BYTES])
    if sniffed is None:
        raise InputRejected(N_("`{name}` is not an image FLUX.1 Kontext can read (PNG, JPEG, WebP or GIF)."), name=name)
    try:
        with Image.open(io.BytesIO(data)) as image:
            pillow_type = _PILLOW_FORMATS.get(image.format or "")
            pixels = image.width * image.height
            image.verify()
    except Image.DecompressionBombError:  # Pillow's own refusal, at twice its limit
        raise _too_many_pixels(name) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputRejected(N_("`{name}` is damaged: it could not be read as an image."), name=name) from None
    if pixels > MAX_INPUT_PIXELS:
        raise _too_many_pixels(name)
    if pillow_type != sniffed:
        raise InputRejected(N_("`{name}` is not an image FLUX.1 Kontext can read."), name=name)
    # Pillow's verify does not read JPEG data to its end: a cut-off file lacks its end marker.
    # Nor GIF data: a cut-off file's first frame, the one FLUX.1 Kontext edits, lacks its end.
    if (sniffed == "image/jpeg" and not _jpeg_reaches_its_end(data)) or (
        sniffed == "image/gif" and not _gif_first_frame_is_whole(data)
    ):
        raise InputRejected(N_("`{name}` is damaged: the image is cut off."), name=name)
    return sniffed


_JPEG_START_OF_SCAN = 0xDA
# Markers that stand alone, with no length after them: TEM, SOI and the restart markers.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})


def _jpeg_reaches_its_end(data: bytes) -> bool:
    """Whether the JPEG's image data is followed by its end marker (EOI). It is looked for after
    the image data starts, not in the file's last bytes: a phone's motion photo has a video after
    it, and the segments before the image data (a comment, an EXIF thumbnail) may hold the same
    two bytes. In the image data itself a 0xFF byte is always followed by 0x00 or a restart
    marker, so the first EOI there ends it."""
    position = 2  # after SOI
    while position + 4 <= len(data):
        if data[position] != 0xFF or data[position + 1] in (0xFF, 0x00):
            # Fill bytes, or stray ones between segments, a stuffed 0xFF 0x00 among them: they
            # start no segment, and decoders skip them (libjpeg's "extraneous bytes").
            position += 1
            continue
        marker = data[position + 1]
        if marker in _JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == _JPEG_START_OF_SCAN:
            return data.find(b"\xff\xd9", position) != -1
    return False


_GIF_EXTENSION, _GIF_IMAGE = 0x21, 0x2C
_GIF_HEADER_BYTES = 13  # the signature, then the logical screen descriptor
_GIF_IMAGE_DESCRIPTOR_BYTES = 10  # its separator, position, size and flags


def _gif_color_table_bytes(flags: int) -> int:
    """The size of the colour table a GIF's screen or image descriptor flags announce."""
    return 3 << ((flags & 0x07) + 1) if flags & 0x80 else 0


def _gif_first_frame_is_whole(data: bytes) -> bool:
    """Whether the GIF's first image arrived to its last data sub-block. Extensions before it
    (an animation's loop count, a frame's delay) are skipped; later frames do not matter, as
    fal reads the first one."""
    if len(data) < _GIF_HEADER_BYTES:
        return False
    position = _GIF_HEADER_BYTES + _gif_color_table_bytes(data[10])
    while position < len(data):
        block = data[position]
        if block == _GIF_EXTENSION:
            position += 2  # the introducer and the extension's label
        elif block == _GIF_IMAGE:
            if position + _GIF_IMAGE_DESCRIPTOR_BYTES > len(data):
                return False
            position += _GIF_IMAGE_DESCRIPTOR_BYTES + _gif_color_table_bytes(data[position + 9]) + 1  # + LZW size
        else:
            return False  # the trailer, or bytes that start no block, before any image
        while position < len(data) and data[position] != 0:  # sub-blocks, each led by its size
            position += 1 + data[position]
        if position >= len(data):
            return False
        if block == _GIF_IMAGE:
            return True
        position += 1  # the terminator
    return False


class InputStager:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        storage: FalStorage,
        store: Store,
        *,
        discord_cdn_hosts: frozenset[str],
        max_bytes: int,
        backoff: Backoff,
    ) -> None:
        self._session = session
        self._storage = storage
        self._store = store
        self._discord_hosts = discord_cdn_hosts
        self._max_bytes = max_bytes
        self._max_mb = max_bytes // (1024 * 1024)
        self._backoff = backoff

    async def _lasts(self, url: str, now: float) -> bool:
        """Whether an earlier copy at fal can still be used (see `check_lasting`)."""
        return await self._store.staged_url_lasts(url, now=now + REUSE_MARGIN_SECONDS)

    async def found_again(
        self, edit: KontextEdit, candidates: Callable[[], Awaitable[Sequence[str]]], *, deadline: float
    ) -> KontextEdit:
        """`edit` with each input that can no longer be used replaced by the one of
        `candidates()` (Discord links to where the pictures came from, signed afresh; asked for
        only when an input is missing) that holds the same picture, for `stage` to copy: for an
        earlier copy at fal that no longer lasts, the candidate with the very same bytes (the
        same attachment, for a copy recorded by `_earlier_copy_key`); for a Discord link past its
        expiry (a job that failed before its copy was made), the same attachment signed afresh.
        Inputs none of them holds are left as they are (`check_lasting` refuses them); a
        candidate Discord no longer serves is skipped."""
        now = time.time()
        copies: dict[str, str] = {}  # the picture's key -> its copy that no longer lasts
        links: dict[str, str] = {}  # the attachment (its link's path) -> its link past its expiry
        for url in edit.image_urls:
            if url.startswith("data:"):
                continue
            if hosted_on(url, self._discord_hosts):
                if url_expired(url, now):
                    links[yarl.URL(url).path] = url
            elif not await self._lasts(url, now):
                source = await self._store.staged_source(url)
                if source is not None:
                    copies[source] = url
        if not copies and not links:
            return edit
        found: dict[str, str] = {}  # the input that can no longer be used -> a fresh Discord link
        for candidate in await candidates():
            if not hosted_on(candidate, self._discord_hosts):
                continue
            # The same attachment: a link past its expiry, or a copy an earlier version recorded.
            same = links.pop(yarl.URL(candidate).path, None) or copies.pop(_earlier_copy_key(candidate), None)
            if same is not None:
                found[same] = candidate
                continue
            if not copies:
                continue
            try:
                data = await self._fetch(candidate, _shown_name(candidate), deadline)
            except (InputUnavailable, InputRejected):
                continue
            copy = copies.pop(await asyncio.to_thread(_copy_key, data), None)
            if copy is not None:
                found[copy] = candidate
        return dataclasses.replace(edit, image_urls=tuple(found.get(url, url) for url in edit.image_urls))

    async def same_pictures(self, one: KontextEdit, other: KontextEdit) -> bool:
        """Whether two edits are built on the same pictures: the same inputs, or copies made of
        the same pictures (a Re-roll whose copy was found again, `found_again`, made its own)."""
        if len(one.image_urls) != len(other.image_urls):
            return False
        for url, other_url in zip(one.image_urls, other.image_urls, strict=True):
            if url != other_url:
                source = await self._store.staged_source(url)
                if source is None or source != await self._store.staged_source(other_url):
                    return False
        return True

    async def check_lasting(self, edit: KontextEdit) -> None:
        """Raise InputExpired if an earlier copy at fal among `edit`'s inputs (a Re-roll's, a
        Try again's) does not last long enough to be used (REUSE_MARGIN_SECONDS, as for reusing
        it): fal fetches inputs only when a job starts, so the job would wait in fal's queue and
        then fail. Data URIs last. A Discord link (a job that failed before its copy was made)
        is fetched at once by `stage`, so it only needs to be still signed: one past its expiry
        is refused too, before anything is acknowledged, as Discord no longer serves it."""
        now = time.time()
        several = len(edit.image_urls) > 1
        for number, url in enumerate(edit.image_urls, start=1):
            if url.startswith("data:"):
                continue
            if hosted_on(url, self._discord_hosts):
                if url_expired(url, now):
                    raise InputExpired(_DISCORD_LINK_GONE, name=_shown_name(url))
                continue
            if not await self._lasts(url, now):
                days = INPUT_LIFETIME_SECONDS // 86400
                if several:
                    raise InputExpired(
                        N_("The bot no longer has image {number} of this job (it keeps copies for {days} days)."),
                        number=number,
                        days=days,
                    )
                raise InputExpired(
                    N_("The bot no longer has the image of this job (it keeps copies for {days} days)."), days=days
                )

    async def stage(self, edit: KontextEdit, *, deadline: float) -> KontextEdit:
        """The same edit with every Discord-hosted input replaced by a durable copy. Inputs
        that are durable already (data URIs, earlier copies) are kept as they are, once they
        are known to last (`check_lasting`)."""
        await self.check_lasting(edit)
        urls = await asyncio.gather(*(self._durable(url, deadline) for url in edit.image_urls))
        return dataclasses.replace(edit, image_urls=tuple(urls))

    async def _durable(self, url: str, deadline: float) -> str:
        if not hosted_on(url, self._discord_hosts):
            return url  # a data URI or a copy at fal made before
        name = _shown_name(url)
        data = await self._fetch(url, name, deadline)
        if len(data) <= INLINE_MAX_BYTES:
            # Reading a small image costs less than a trip to a worker thread.
            return f"data:{check_image(data, name)};base64,{base64.b64encode(data).decode()}"
        key = await asyncio.to_thread(_copy_key, data)
        now = time.time()
        reused = await self._store.staged_input(key, now=now + REUSE_MARGIN_SECONDS)
        if reused is not None:
            return reused  # checked when it was uploaded
        content_type = await asyncio.to_thread(check_image, data, name)
        durable = await self._storage.upload(
            data,
            content_type,
            f"input.{EXTENSIONS[content_type]}",
            lifetime_seconds=INPUT_LIFETIME_SECONDS,
            deadline=deadline,
        )
        await self._store.record_staged_input(key, durable, expires_at=now + INPUT_LIFETIME_SECONDS)
        return durable

    async def _fetch(self, url: str, name: str, deadline: float) -> bytes:
        async def attempt() -> bytes:
            # Not followed: a redirect could lead anywhere, the operator's own network included.
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status in (403, 404, 410):
                    raise InputUnavailable(_DISCORD_LINK_GONE, name=name)
                if 300 <= response.status < 400:
                    log.warning("an input image's download was redirected; the redirect is not followed")
                    raise InputUnavailable(_NOT_FETCHED, name=name)
                if response.status >= 300:
                    raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
                if (response.content_length or 0) > self._max_bytes:
                    raise InputRejected(N_("`{name}` is over the {limit} MB limit."), name=name, limit=self._max_mb)
                data = bytearray()
                async for chunk in response.content.iter_chunked(256 * 1024):
                    data += chunk
                    if len(data) > self._max_bytes:
                        raise InputRejected(N_("`{name}` is over the {limit} MB limit."), name=name, limit=self._max_mb)
                return bytes(data)

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError))

        try:
            data: bytes = await retrying(
                attempt,
                retryable=transient,
                backoff=self._backoff,
                deadline=deadline,
                what="input download",
                attempts=4,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("could not fetch an input image from Discord: %s", describe_error(exc))
            raise InputUnavailable(_NOT_FETCHED, name=name) from None
        return data


def url_expired(url: str, now: float) -> bool:
    """Whether a signed Discord CDN URL is past its expiry (`ex`, hex unix time)."""
    expires = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("ex")
    try:
        return expires is not None and int(expires[0], 16) <= now
    except ValueError:
        return True


def hosted_on(url: str, hosts: frozenset[str]) -> bool:
    """Whether `url` is an http(s) address on one of `hosts` (each "host" or "host:port")."""
    parsed = yarl.URL(url)
    host = (parsed.host or "").lower()
    netloc = f"{host}:{parsed.port}" if parsed.explicit_port else host
    return parsed.scheme in ("http", "https") and netloc in hosts
