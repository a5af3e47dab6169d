"""In-process fake of fal.ai's queue API (``https://queue.fal.run``) plus a fake CDN.

Built from fal's documented protocol (see /work/shared/reference/fal-queue-api.md,
sections 1 and 3), *not* from any client code, so it rejects what fal would reject.

Usage::

    fal = FakeFal(key="test-fal-key", default=JobScript(run_time=0.1))
    await fal.start()
    fal.base_url            # "http://127.0.0.1:PORT" -> the bot's FAL_QUEUE_URL
    ...
    await fal.stop()

Endpoints served (all on ``base_url``):

* ``POST /fal-ai/flux-pro/kontext/max`` and ``POST /fal-ai/flux-pro/kontext/max/multi``
* ``GET  /fal-ai/flux-pro/requests/<id>/status[?logs=1]``
* ``GET  /fal-ai/flux-pro/requests/<id>/status/stream[?logs=1]``  (SSE)
* ``GET  /fal-ai/flux-pro/requests/<id>``                         (result)
* ``PUT  /fal-ai/flux-pro/requests/<id>/cancel``
* ``GET  /files/<name>``                                          (fake CDN, no auth)

Like real fal, the status/result/cancel URLs use only owner/app ("fal-ai/flux-pro"); a
client that rebuilds them from the submit path (".../kontext/max/requests/...") gets 404.

The queue clock is computed from timestamps (no task per job), so hundreds of concurrent
jobs cost nothing; only SSE connections and ``fetch_inputs`` downloads run coroutines.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import functools
import json as _json
import math
import random
import re
import struct
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import aiohttp
from aiohttp import web

__all__ = ["FakeFal", "JobScript", "Job", "Recorded", "Fault", "make_png", "make_jpeg", "make_image"]

APP_ID = "fal-ai/flux-pro"
ENDPOINT_SINGLE = "fal-ai/flux-pro/kontext/max"
ENDPOINT_MULTI = "fal-ai/flux-pro/kontext/max/multi"
ENDPOINTS = (ENDPOINT_SINGLE, ENDPOINT_MULTI)

ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
SAFETY_TOLERANCES = ("1", "2", "3", "4", "5", "6")
OUTPUT_FORMATS = ("jpeg", "png")
STREAM_MODES = ("ok", "unavailable", "stall", "drop")
OPS = ("submit", "status", "stream", "result", "cancel", "file")

IN_QUEUE, IN_PROGRESS, COMPLETED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED"


# --------------------------------------------------------------------------------------
# Scripting and records
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobScript:
    """How one job behaves. All durations are seconds of real time."""

    queue_positions: tuple[int, ...] = (0,)  # positions reported while queued, each held `step` s
    step: float = 0.05
    run_time: float = 0.05  # IN_PROGRESS duration
    logs: tuple[str, ...] = ()  # emitted evenly during IN_PROGRESS (first one at start)
    log_level: str = "INFO"
    image_size: int = 2048  # bytes per image file (exact when achievable)
    width: int = 512  # requested pixel size; shrunk if it cannot fit in image_size
    height: int = 512
    image_format: Optional[str] = None  # "png"/"jpeg"; None -> follow payload output_format
    nsfw: tuple[bool, ...] = ()  # per image; missing -> False
    # Scripted failure: the result call returns this status/body (+headers). The COMPLETED
    # status then carries `error` (and `error_type`), derived from the body unless given.
    result_status: Optional[int] = None
    result_body: Any = None
    result_headers: Optional[dict[str, str]] = None
    error: Optional[str] = None
    error_type: Optional[str] = None
    result_ttl: Optional[float] = None  # result -> 404 this long after completion
    stream_mode: str = "ok"  # "ok" | "unavailable" (405) | "stall" | "drop"
    inference_time: Optional[float] = None  # metrics.inference_time; default = run_time
    cancel_delay: float = 0.02  # time for a running job to stop after PUT cancel

    def __post_init__(self) -> None:
        if self.stream_mode not in STREAM_MODES:
            raise ValueError(f"stream_mode must be one of {STREAM_MODES}")
        if self.image_format not in (None, "png", "jpeg"):
            raise ValueError("image_format must be None, 'png' or 'jpeg'")
        if self.result_status is not None and self.result_status < 400:
            raise ValueError("result_status is for failures (>= 400)")

    @property
    def failed(self) -> bool:
        return self.result_status is not None


@dataclass
class Recorded:
    op: str  # submit|status|stream|result|cancel|file|unknown
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    time: float = field(default_factory=time.monotonic)
    request_id: Optional[str] = None
    status: Optional[int] = None  # HTTP status the fake answered (None for drops/hangs)


@dataclass
class Fault:
    status: Union[int, str]  # HTTP code, "drop", "drop_after" or "hang"
    json: Any = None
    headers: Optional[dict[str, str]] = None


class Job:
    """One queued request. State is derived from timestamps (time.monotonic())."""

    def __init__(self, fal: "FakeFal", request_id: str, endpoint: str, payload: dict,
                 script: JobScript, base_url: str, headers: dict[str, str]) -> None:
        self.fal = fal
        self.request_id = request_id
        self.endpoint = endpoint
        self.payload = payload
        self.script = script
        self.headers = headers
        self.submitted_at = time.monotonic()
        self._wall0 = time.time()
        n_q = len(script.queue_positions)
        self._start_at = self.submitted_at + n_q * script.step
        self._end_at = self._start_at + script.run_time
        self._cancel_end: Optional[float] = None
        self.cancel_requested_at: Optional[float] = None
        # input fetching (fetch_inputs=True): completion waits for it
        self._fetch_done_at: Optional[float] = self.submitted_at
        self.input_error: Optional[dict] = None
        self.files_deleted = False
        self._changed = asyncio.Event()
        self._seed = payload.get("seed") if isinstance(payload.get("seed"), int) else random.randint(0, 2**31 - 1)
        fmt = script.image_format or payload.get("output_format") or "jpeg"
        self.image_format: str = fmt
        self.num_images: int = payload.get("num_images", 1)
        url = f"{base_url}/{APP_ID}/requests/{request_id}"
        self.response_url = url
        self.status_url = url + "/status"
        self.cancel_url = url + "/cancel"

    # -- timestamps ---------------------------------------------------------------
    @property
    def _end(self) -> Optional[float]:
        if self._cancel_end is not None:
            return self._cancel_end
        if self._fetch_done_at is None:
            return None
        return max(self._end_at, self._fetch_done_at)

    @property
    def cancelled(self) -> bool:
        return self._cancel_end is not None

    @property
    def started_at(self) -> Optional[float]:
        end = self._end
        if end is not None and end <= self._start_at:  # cancelled while queued
            return None
        return self._start_at if time.monotonic() >= self._start_at else None

    @property
    def completed_at(self) -> Optional[float]:
        end = self._end
        return end if end is not None and time.monotonic() >= end else None

    @property
    def state(self) -> str:
        return self.state_at(time.monotonic())

    def state_at(self, now: float) -> str:
        end = self._end
        if end is not None and now >= end:
            return COMPLETED
        if now >= self._start_at:
            return IN_PROGRESS
        return IN_QUEUE

    def queue_position_at(self, now: float) -> int:
        qp = self.script.queue_positions
        if not qp:
            return 0
        if self.script.step <= 0:
            return qp[-1]
        i = int((now - self.submitted_at) / self.script.step)
        return qp[min(max(i, 0), len(qp) - 1)]

    def _log_times(self) -> list[float]:
        n = len(self.script.logs)
        return [self._start_at + k * self.script.run_time / n for k in range(n)] if n else []

    def logs_at(self, now: float) -> list[dict]:
        end = self._end
        limit = now if end is None else min(now, end)
        out: list[dict] = []
        if end is not None and end <= self._start_at:  # cancelled while queued: never ran
            return out
        for t, msg in zip(self._log_times(), self.script.logs):
            if t > limit:
                break
            wall = self._wall0 + (t - self.submitted_at)
            out.append({
                "message": msg,
                "level": self.script.log_level,
                "source": "USER",
                "timestamp": _dt.datetime.fromtimestamp(wall, _dt.timezone.utc).isoformat(),
            })
        return out

    def next_change_after(self, now: float) -> Optional[float]:
        """Next monotonic time at which the status object may change (None = never / unknown)."""
        cands: list[float] = []
        end = self._end
        if end is not None and end > now:
            cands.append(end)
        if now < self._start_at:
            cands.append(self._start_at)
            if self.script.step > 0:
                nxt = self.submitted_at + (math.floor((now - self.submitted_at) / self.script.step) + 1) * self.script.step
                cands.append(nxt)
        else:
            cands.extend(t for t in self._log_times() if t > now)
        cands = [c for c in cands if c > now]
        return min(cands) if cands else None

    def notify(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    # -- outcome --------------------------------------------------------------------
    @property
    def failure(self) -> Optional[tuple[int, Any, dict[str, str]]]:
        """(status, body, headers) of the result call if the job failed."""
        if self.cancelled:
            return 400, {"detail": "Request was cancelled"}, {}
        if self.input_error is not None:
            return 422, {"detail": [self.input_error]}, {}
        s = self.script
        if s.failed:
            body = s.result_body if s.result_body is not None else {"detail": "Internal Server Error"}
            headers = dict(s.result_headers or {})
            if isinstance(body, dict) and body.get("error_type") and not any(
                    k.lower() == "x-fal-error-type" for k in headers):
                headers["X-Fal-Error-Type"] = str(body["error_type"])
            return s.result_status, body, headers  # type: ignore[return-value]
        return None

    def _error_fields(self) -> dict:
        if self.cancelled:
            return {"error": "Request cancelled"}
        fail = self.failure
        if fail is None:
            return {}
        _, body, headers = fail
        err, etype = self.script.error, self.script.error_type
        detail = body.get("detail") if isinstance(body, dict) else body
        if err is None:
            if isinstance(detail, list) and detail and isinstance(detail[0], dict):
                err = str(detail[0].get("msg", detail))
            else:
                err = str(detail)
        if etype is None:
            if isinstance(body, dict) and body.get("error_type"):
                etype = body["error_type"]
            elif isinstance(detail, list) and detail and isinstance(detail[0], dict):
                etype = detail[0].get("type")
            else:
                etype = next((v for k, v in headers.items() if k.lower() == "x-fal-error-type"), None)
        out = {"error": err}
        if etype is not None:
            out["error_type"] = etype
        return out

    def urls(self) -> dict:
        return {"response_url": self.response_url, "status_url": self.status_url,
                "cancel_url": self.cancel_url}

    def status_object(self, now: float, with_logs: bool) -> dict:
        st = self.state_at(now)
        obj: dict[str, Any] = {"status": st, "request_id": self.request_id, **self.urls()}
        if st == IN_QUEUE:
            obj["queue_position"] = self.queue_position_at(now)
            obj["logs"] = None
        elif st == IN_PROGRESS:
            obj["logs"] = self.logs_at(now) if with_logs else None
        else:
            obj["logs"] = self.logs_at(now) if with_logs else None
            if self.started_at is not None:
                it = self.script.inference_time
                if it is None:
                    it = float(round((self._end or now) - self._start_at, 6))
                obj["metrics"] = {"inference_time": float(it)}
            else:
                obj["metrics"] = {}
            obj.update(self._error_fields())
        return obj

    def file_name(self, i: int) -> str:
        return f"{self.request_id}_{i}.{'png' if self.image_format == 'png' else 'jpg'}"

    def image_blob(self) -> tuple[bytes, int, int]:
        return make_image(self.image_format, self.script.image_size, self.script.width, self.script.height)

    def output(self) -> dict:
        data, w, h = self.image_blob()
        ctype = "image/png" if self.image_format == "png" else "image/jpeg"
        images = []
        for i in range(self.num_images):
            if self.payload.get("sync_mode") is True:
                url = f"data:{ctype};base64," + base64.b64encode(data).decode()
            else:
                url = f"{self.fal.base_url}/files/{self.file_name(i)}"
            images.append({"url": url, "content_type": ctype, "file_name": self.file_name(i),
                           "file_size": len(data), "width": w, "height": h})
        nsfw = [bool(self.script.nsfw[i]) if i < len(self.script.nsfw) else False
                for i in range(self.num_images)]
        return {"images": images, "seed": self._seed, "has_nsfw_concepts": nsfw,
                "prompt": self.payload.get("prompt", ""),
                "timings": {"inference": float(self.script.inference_time
                                               if self.script.inference_time is not None
                                               else self.script.run_time)}}

    def __repr__(self) -> str:
        return f"<Job {self.request_id} {self.endpoint} {self.state}{' cancelled' if self.cancelled else ''}>"


# --------------------------------------------------------------------------------------
# Image generation (valid PNG / baseline JPEG padded to an exact byte size), cached
# --------------------------------------------------------------------------------------
def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def _png_base(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    row = b"\x00" + b"\x80\x80\x80" * w  # filter 0, mid grey
    idat = zlib.compress(row * h, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)


def make_png(size: int, width: int = 512, height: int = 512) -> tuple[bytes, int, int]:
    """Valid grey RGB PNG of exactly `size` bytes when possible (padding in a private
    ancillary chunk 'paDd'); shrinks dimensions if needed. Returns (bytes, w, h)."""
    w, h = max(1, width), max(1, height)
    iend = _png_chunk(b"IEND", b"")
    while True:
        base = _png_base(w, h)
        n = len(base) + len(iend)
        pad = size - n
        if pad == 0:
            return base + iend, w, h
        if pad >= 12:
            return base + _png_chunk(b"paDd", bytes(pad - 12)) + iend, w, h
        if w == 1 and h == 1:
            return base + iend, w, h  # cannot be smaller; returns a bit more than asked
        w, h = max(1, w // 2), max(1, h // 2)


def _jpeg_seg(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _jpeg_base(w: int, h: int) -> bytes:
    """Baseline greyscale JPEG, uniform mid-grey: every 8x8 block is DC diff 0 + EOB."""
    soi = b"\xff\xd8"
    app0 = _jpeg_seg(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    dqt = _jpeg_seg(0xDB, b"\x00" + bytes([1] * 64))
    sof = _jpeg_seg(0xC0, struct.pack(">BHHB", 8, h, w, 1) + b"\x01\x11\x00")
    # Standard luminance DC table (K.3); AC table with the single symbol EOB (code '0').
    dc_bits = bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    dc_vals = bytes(range(12))
    ac_bits = bytes([1] + [0] * 15)
    ac_vals = b"\x00"
    dht = _jpeg_seg(0xC4, b"\x00" + dc_bits + dc_vals + b"\x10" + ac_bits + ac_vals)
    sos = _jpeg_seg(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    blocks = math.ceil(w / 8) * math.ceil(h / 8)
    # per block: DC category 0 = '00' (standard table), EOB = '0'  -> '000'
    nbits = 3 * blocks
    nbytes = (nbits + 7) // 8
    # all-zero bits, padded with 1-bits to a byte boundary
    data = bytearray(nbytes)
    rem = nbytes * 8 - nbits
    if rem:
        data[-1] |= (1 << rem) - 1
    scan = bytes(data).replace(b"\xff", b"\xff\x00")
    return soi + app0 + dqt + sof + dht + sos + scan


def make_jpeg(size: int, width: int = 512, height: int = 512) -> tuple[bytes, int, int]:
    """Valid baseline JPEG of exactly `size` bytes when possible (padding in COM
    segments inserted after APP0); shrinks dimensions if needed. Returns (bytes, w, h)."""
    w, h = max(1, width), max(1, height)
    while True:
        base = _jpeg_base(w, h)
        n = len(base) + 2  # + EOI
        pad = size - n
        if pad == 0 or pad >= 4:
            break
        if w == 1 and h == 1:
            pad = 0
            break
        w, h = max(1, w // 2), max(1, h // 2)
    segs = []
    while pad > 0:
        # each COM segment costs 4 bytes overhead and holds <= 65533 payload bytes;
        # avoid leaving a remainder < 4
        take = min(pad, 65537)
        if pad - take and pad - take < 4:
            take -= 4
        segs.append(_jpeg_seg(0xFE, bytes(take - 4)))
        pad -= take
    head_len = 2 + 18  # SOI + APP0
    return base[:head_len] + b"".join(segs) + base[head_len:] + b"\xff\xd9", w, h


@functools.lru_cache(maxsize=64)
def make_image(fmt: str, size: int, width: int = 512, height: int = 512) -> tuple[bytes, int, int]:
    """Cached: each (format, size, dims) is generated once and shared by all jobs."""
    return (make_png if fmt == "png" else make_jpeg)(size, width, height)


IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


def is_image_bytes(data: bytes) -> bool:
    if data.startswith(IMAGE_MAGIC):
        return True
    return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP"


# --------------------------------------------------------------------------------------
# Input validation (Kontext Max schema, ref doc section 3)
# --------------------------------------------------------------------------------------
def _err(loc: list, msg: str, typ: str, inp: Any = None) -> dict:
    return {"loc": ["body", *loc], "msg": msg, "type": typ, "input": inp}


def _is_url(v: Any, allow_data_uri: bool) -> bool:
    if not isinstance(v, str):
        return False
    if re.match(r"^https?://[^\s/]+", v):
        return True
    return allow_data_uri and v.startswith("data:image/")


def validate_payload(endpoint: str, body: Any, allow_data_uri: bool = False) -> list[dict]:
    """Return a list of pydantic-style error dicts (empty = valid).

    Deliberately STRICT (stricter than fal's lax pydantic might be): unknown fields are
    rejected ("extra_forbidden") and no type coercion happens ("3" is not an int, 2 is not
    "2"), so typos and wrong types in the bot's payload fail loudly in tests.
    """
    if not isinstance(body, dict):
        return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type",
                 "input": body}]
    errs: list[dict] = []
    multi = endpoint == ENDPOINT_MULTI
    allowed = {"prompt", "seed", "guidance_scale", "sync_mode", "num_images", "output_format",
               "safety_tolerance", "enhance_prompt", "aspect_ratio",
               "image_urls" if multi else "image_url"}

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    # prompt
    if "prompt" not in body:
        errs.append(_err(["prompt"], "Field required", "missing"))
    elif not isinstance(body["prompt"], str):
        errs.append(_err(["prompt"], "Input should be a valid string", "string_type", body["prompt"]))
    elif not body["prompt"].strip():
        errs.append(_err(["prompt"], "String should have at least 1 character", "string_too_short", body["prompt"]))
    # image(s)
    if multi:
        v = body.get("image_urls")
        if "image_urls" not in body:
            errs.append(_err(["image_urls"], "Field required", "missing"))
        elif not isinstance(v, list):
            errs.append(_err(["image_urls"], "Input should be a valid list", "list_type", v))
        elif not v:
            errs.append(_err(["image_urls"], "List should have at least 1 item after validation, not 0",
                             "too_short", v))
        else:
            for i, u in enumerate(v):
                if not _is_url(u, allow_data_uri):
                    errs.append(_err(["image_urls", i], "Input should be a valid URL", "url_parsing", u))
    else:
        if "image_url" not in body:
            errs.append(_err(["image_url"], "Field required", "missing"))
        elif not _is_url(body["image_url"], allow_data_uri):
            errs.append(_err(["image_url"], "Input should be a valid URL", "url_parsing", body["image_url"]))
    if "seed" in body and not is_int(body["seed"]):
        errs.append(_err(["seed"], "Input should be a valid integer", "int_type", body["seed"]))
    if "guidance_scale" in body:
        v = body["guidance_scale"]
        if not (isinstance(v, (int, float)) and not isinstance(v, bool)):
            errs.append(_err(["guidance_scale"], "Input should be a valid number", "float_type", v))
        elif v < 1:
            errs.append(_err(["guidance_scale"], "Input should be greater than or equal to 1",
                             "greater_than_equal", v))
        elif v > 20:
            errs.append(_err(["guidance_scale"], "Input should be less than or equal to 20",
                             "less_than_equal", v))
    if "num_images" in body:
        v = body["num_images"]
        if not is_int(v):
            errs.append(_err(["num_images"], "Input should be a valid integer", "int_type", v))
        elif v < 1:
            errs.append(_err(["num_images"], "Input should be greater than or equal to 1", "greater_than_equal", v))
        elif v > 4:
            errs.append(_err(["num_images"], "Input should be less than or equal to 4", "less_than_equal", v))
    if "output_format" in body and body["output_format"] not in OUTPUT_FORMATS:
        errs.append(_err(["output_format"], "Input should be 'jpeg' or 'png'", "literal_error",
                         body["output_format"]))
    if "safety_tolerance" in body:
        v = body["safety_tolerance"]
        if not (isinstance(v, str) and v in SAFETY_TOLERANCES):
            errs.append(_err(["safety_tolerance"],
                             "Input should be '1', '2', '3', '4', '5' or '6'", "literal_error", v))
    for b in ("enhance_prompt", "sync_mode"):
        if b in body and not isinstance(body[b], bool):
            errs.append(_err([b], "Input should be a valid boolean", "bool_type", body[b]))
    if "aspect_ratio" in body and body["aspect_ratio"] not in ASPECT_RATIOS:
        errs.append(_err(["aspect_ratio"], "Input should be " + ", ".join(f"'{a}'" for a in ASPECT_RATIOS),
                         "literal_error", body["aspect_ratio"]))
    for k in body:
        if k not in allowed:
            errs.append(_err([k], "Extra inputs are not permitted", "extra_forbidden", body[k]))
    return errs


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------
_REQ_RE = re.compile(r"^/(?P<app>.+?)/requests/(?P<id>[^/]+)(?P<rest>/status|/status/stream|/cancel)?/?$")


class FakeFal:
    def __init__(self, key: str = "test-fal-key", default: Optional[JobScript] = None,
                 fetch_inputs: bool = False, keepalive_interval: float = 15.0,
                 fetch_timeout: float = 5.0, allow_data_uri: bool = False,
                 chunk_size: int = 64 * 1024) -> None:
        self.key = key
        self.default = default or JobScript()
        self.fetch_inputs = fetch_inputs
        self.keepalive_interval = keepalive_interval
        self.fetch_timeout = fetch_timeout
        self.allow_data_uri = allow_data_uri  # Kontext docs don't say data URIs work
        self.chunk_size = chunk_size
        self.requests: list[Recorded] = []
        self.jobs: dict[str, Job] = {}
        self.base_url = ""
        self._scripts: deque[JobScript] = deque()
        self._predicates: list[Callable[[dict], Optional[JobScript]]] = []
        self._faults: dict[str, deque[Fault]] = {op: deque() for op in OPS}
        self._runner: Optional[web.AppRunner] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._closing = False
        self._closing_event: Optional[asyncio.Event] = None
        self._submit_event: Optional[asyncio.Event] = None
        self._bg: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> "FakeFal":
        self._closing = False
        self._closing_event = asyncio.Event()
        self._submit_event = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5,
                                     handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        self._closing = True
        if self._closing_event:
            self._closing_event.set()
        for job in list(self.jobs.values()):
            job.notify()
        for t in list(self._bg):
            t.cancel()
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
        if self._session:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "FakeFal":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # -- scripting -----------------------------------------------------------------
    def script_next(self, script: JobScript, count: int = 1) -> None:
        """Use `script` for the next `count` accepted submits (FIFO, before predicates)."""
        self._scripts.extend([script] * count)

    def script_for(self, predicate: Callable[[dict], Optional[JobScript]]) -> None:
        """predicate(payload) -> JobScript|None; consulted after script_next, before default."""
        self._predicates.append(predicate)

    def fail_next(self, op: str, status: Union[int, str] = 500, times: int = 1,
                  json: Any = None, headers: Optional[dict[str, str]] = None) -> None:
        """Inject a fault into the next `times` requests of `op`.

        status: an HTTP code (answered with `json`, default {"detail": "Injected fault"}),
        "drop" (close the connection before doing anything; for submit: job NOT created),
        "drop_after" (process normally, then close without answering; for submit: job IS
        created but the response is lost), or "hang" (never answer until stop()).
        """
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}")
        self._faults[op].extend([Fault(status, json, headers)] * times)

    def _pick_script(self, payload: dict) -> JobScript:
        if self._scripts:
            return self._scripts.popleft()
        for p in self._predicates:
            s = p(payload)
            if s is not None:
                return s
        return self.default

    def expire_files(self, request_id: Optional[str] = None) -> None:
        """Make the CDN files of one job (or all jobs) return 404 from now on."""
        for job in ([self.jobs[request_id]] if request_id else self.jobs.values()):
            job.files_deleted = True

    # -- recording helpers ---------------------------------------------------------------
    @property
    def submits(self) -> list[dict]:
        return [j.payload for j in self.jobs.values()]

    def count(self, op: str) -> int:
        return sum(1 for r in self.requests if r.op == op)

    def requests_for(self, op: Optional[str] = None, request_id: Optional[str] = None) -> list[Recorded]:
        return [r for r in self.requests
                if (op is None or r.op == op) and (request_id is None or r.request_id == request_id)]

    async def wait_for_submits(self, n: int, timeout: float = 5.0) -> list[dict]:
        async def _wait() -> None:
            while len(self.jobs) < n:
                assert self._submit_event is not None
                ev = self._submit_event
                await ev.wait()
        await asyncio.wait_for(_wait(), timeout)
        return self.submits

    # -- HTTP plumbing -----------------------------------------------------------
    @staticmethod
    def _json(data: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> web.Response:
        return web.json_response(data, status=status, headers=headers)

    @staticmethod
    def _drop(request: web.Request) -> web.Response:
        tr = request.transport
        if tr is not None:
            tr.abort()
        # The connection is gone; aiohttp discards this response.
        return web.Response(status=500)

    def _auth_ok(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Key {self.key}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        method = request.method
        op, req_id, endpoint = "unknown", None, None
        m = _REQ_RE.match(path)
        if path.startswith("/files/"):
            op = "file"
        elif m:
            rest = m.group("rest") or ""
            op = {"": "result", "/status": "status", "/status/stream": "stream", "/cancel": "cancel"}[rest]
            req_id = m.group("id")
        elif path.strip("/") in ENDPOINTS:
            op, endpoint = "submit", path.strip("/")
        body_json: Any = None
        raw = b""
        if request.can_read_body:
            raw = await request.read()
            try:
                body_json = _json.loads(raw) if raw else None
            except ValueError:
                body_json = None
        rec = Recorded(op=op, method=method, path=path, query=dict(request.query),
                       headers=dict(request.headers), json=body_json, request_id=req_id)
        if op == "file":
            rec.request_id = path[len("/files/"):].split("_")[0]
        self.requests.append(rec)

        fault = self._faults[op].popleft() if op in self._faults and self._faults[op] else None
        if fault is not None:
            if fault.status == "drop":
                return self._drop(request)
            if fault.status == "hang":
                assert self._closing_event is not None
                await self._closing_event.wait()
                return self._drop(request)
            if fault.status != "drop_after":
                rec.status = int(fault.status)
                return self._json(fault.json if fault.json is not None else {"detail": "Injected fault"},
                                  status=int(fault.status), headers=fault.headers)

        resp = await self._route(request, rec, op, endpoint, raw, body_json)
        if fault is not None and fault.status == "drop_after":
            rec.status = None
            if isinstance(resp, web.Response):
                return self._drop(request)
            # stream already prepared: just cut the connection
            if request.transport is not None:
                request.transport.abort()
        else:
            rec.status = resp.status
        return resp

    async def _route(self, request: web.Request, rec: Recorded, op: str, endpoint: Optional[str],
                     raw: bytes, body_json: Any) -> web.StreamResponse:
        method = request.method
        if op == "file":
            if method not in ("GET", "HEAD"):
                return self._json({"detail": "Method Not Allowed"}, 405)
            return await self._file(request)
        if op == "unknown":
            return self._json({"detail": "Not Found"}, 404)
        if not self._auth_ok(request):
            detail = ("Missing authorization header" if "Authorization" not in request.headers
                      else "Invalid authorization credentials")
            return self._json({"detail": detail}, 401)
        if op == "submit":
            if method != "POST":
                return self._json({"detail": "Method Not Allowed"}, 405)
            return await self._submit(request, rec, endpoint or "", raw, body_json)
        expected = "PUT" if op == "cancel" else "GET"
        if method != expected:
            return self._json({"detail": "Method Not Allowed"}, 405)
        m = _REQ_RE.match(request.path)
        assert m is not None
        job = self.jobs.get(m.group("id"))
        if job is None or m.group("app") != APP_ID:
            if op == "cancel":
                return self._json({"status": "NOT_FOUND"}, 404)
            return self._json({"detail": "Request not found"}, 404)
        if op == "status":
            return self._json(job.status_object(time.monotonic(), _wants_logs(request)),
                              status=200 if job.state == COMPLETED else 202)
        if op == "stream":
            return await self._stream(request, job)
        if op == "result":
            return self._result(job)
        return self._cancel(job)

    # -- handlers -------------------------------------------------------------------
    async def _submit(self, request: web.Request, rec: Recorded, endpoint: str, raw: bytes,
                      body: Any) -> web.Response:
        if body is None and raw.strip() not in (b"", b"null"):
            return self._json({"detail": [{"loc": ["body"], "msg": "JSON decode error",
                                           "type": "json_invalid"}]}, 422)
        errors = validate_payload(endpoint, body, self.allow_data_uri)
        if errors:
            return self._json({"detail": errors}, 422)
        rid = str(uuid.uuid4())
        script = self._pick_script(body)
        job = Job(self, rid, endpoint, body, script, self.base_url, dict(request.headers))
        self.jobs[rid] = job
        rec.request_id = rid
        assert self._submit_event is not None
        ev, self._submit_event = self._submit_event, asyncio.Event()
        ev.set()
        if self.fetch_inputs:
            job._fetch_done_at = None
            t = asyncio.get_running_loop().create_task(self._fetch_inputs(job))
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)
        qp = script.queue_positions[0] if script.queue_positions else 0
        return self._json({"status": IN_QUEUE, "request_id": rid, **job.urls(),
                           "logs": None, "metrics": {}, "queue_position": qp},
                          headers={"x-fal-request-id": rid})

    async def _fetch_inputs(self, job: Job) -> None:
        if job.endpoint == ENDPOINT_MULTI:
            urls = [(["body", "image_urls", i], u) for i, u in enumerate(job.payload["image_urls"])]
        else:
            urls = [(["body", "image_url"], job.payload["image_url"])]
        try:
            for loc, url in urls:
                problem = None
                try:
                    if url.startswith("data:"):
                        data = base64.b64decode(url.split(",", 1)[1])
                    else:
                        assert self._session is not None
                        async with self._session.get(
                                url, timeout=aiohttp.ClientTimeout(total=self.fetch_timeout)) as r:
                            if r.status != 200:
                                problem = f"HTTP {r.status}"
                            data = await r.read()
                    if problem is None and not is_image_bytes(data):
                        problem = "not an image"
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - any failure = image load error
                    problem = f"{type(e).__name__}"
                if problem is not None:
                    job.input_error = {"loc": loc, "msg": f"Failed to load the image. Please ensure the image "
                                       f"URL is publicly accessible and a valid image. ({problem})",
                                       "type": "image_load_error", "input": url}
                    break
        finally:
            job._fetch_done_at = time.monotonic()
            job.notify()

    async def _stream(self, request: web.Request, job: Job) -> web.StreamResponse:
        mode = job.script.stream_mode
        if mode == "unavailable":
            return self._json({"detail": "Method Not Allowed"}, 405)
        with_logs = _wants_logs(request)
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if mode == "stall":
            assert self._closing_event is not None
            await self._closing_event.wait()
            return resp
        last: Optional[str] = None
        last_write = time.monotonic()
        try:
            while not self._closing:
                ev = job._changed  # grab before computing the snapshot
                now = time.monotonic()
                obj = job.status_object(now, with_logs)
                text = _json.dumps(obj)
                if text != last:
                    await resp.write(f"data: {text}\n\n".encode())
                    last, last_write = text, time.monotonic()
                    if mode == "drop":
                        if request.transport is not None:
                            request.transport.abort()
                        return resp
                    if obj["status"] == COMPLETED:
                        await resp.write_eof()
                        return resp
                now = time.monotonic()
                nxt = job.next_change_after(now)
                ping_at = last_write + self.keepalive_interval
                wake = ping_at if nxt is None else min(nxt, ping_at)
                try:
                    await asyncio.wait_for(ev.wait(), max(0.0, wake - now) + 0.001)
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() >= last_write + self.keepalive_interval:
                    await resp.write(b": ping\n\n")
                    last_write = time.monotonic()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        return resp

    def _result(self, job: Job) -> web.Response:
        now = time.monotonic()
        if job.state_at(now) != COMPLETED:
            return self._json({"detail": "Request is still in progress"}, 400)
        ttl = job.script.result_ttl
        end = job._end
        if ttl is not None and end is not None and now > end + ttl:
            return self._json({"detail": "Request not found"}, 404)
        fail = job.failure
        if fail is not None:
            status, body, headers = fail
            return self._json(body, status=status, headers={"x-fal-request-id": job.request_id, **headers})
        return self._json(job.output(), headers={"x-fal-request-id": job.request_id})

    def _cancel(self, job: Job) -> web.Response:
        now = time.monotonic()
        st = job.state_at(now)
        if st == COMPLETED:
            return self._json({"status": "ALREADY_COMPLETED"}, 400)
        if job.cancel_requested_at is None:
            job.cancel_requested_at = now
            if st == IN_QUEUE:
                job._cancel_end = now
            else:
                sched = job._end
                stop = now + job.script.cancel_delay
                job._cancel_end = stop if sched is None else min(sched, stop)
            job.notify()
        return self._json({"status": "CANCELLATION_REQUESTED"}, 202)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.path[len("/files/"):]
        rid, _, rest = name.partition("_")
        job = self.jobs.get(rid)
        idx_s = rest.rsplit(".", 1)[0]
        if (job is None or job.files_deleted or job.completed_at is None or job.failure is not None
                or not idx_s.isdigit() or int(idx_s) >= job.num_images or name != job.file_name(int(idx_s))):
            return self._json({"detail": "File not found"}, 404)
        data, _, _ = job.image_blob()
        ctype = "image/png" if job.image_format == "png" else "image/jpeg"
        resp = web.StreamResponse(status=200, headers={"Content-Type": ctype})
        resp.content_length = len(data)
        await resp.prepare(request)
        if request.method == "GET":
            view = memoryview(data)
            try:
                for off in range(0, len(data), self.chunk_size):
                    await resp.write(view[off:off + self.chunk_size])
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                return resp
        await resp.write_eof()
        return resp


def _wants_logs(request: web.Request) -> bool:
    return request.query.get("logs", "0").lower() in ("1", "true", "yes")
