"""In-process fake of fal.ai's queue API (``https://queue.fal.run``), its storage API
(``https://rest.fal.ai/storage/...``) and its CDN (``v3.fal.media``), all on one loopback port.

The rule: this fake models fal as its documentation and the collected evidence say fal behaves,
not as the bot expects. Source: /work/shared/reference/fal-queue-api.md; "part 2" is the section
"Part 2 (2026-12): how the real service behaves ..." and wins where it differs from part 1.

Usage::

    fal = FakeFal(key="test-fal-key", default=JobScript(run_time=0.1))
    await fal.start()
    fal.base_url            # "http://127.0.0.1:PORT" -> the bot's FAL_QUEUE_URL
    fal.rest_url            # "http://127.0.0.1:PORT/rest" -> the bot's FAL_REST_URL
    ...
    assert fal.violations == []
    await fal.stop()

Endpoints served (all on ``base_url``):

* ``POST /fal-ai/flux-pro/kontext/max``, ``.../kontext/max/multi``, ``.../kontext/max/text-to-image``
* ``GET  /fal-ai/flux-pro/requests/<id>/status[?logs=1]``
* ``GET  /fal-ai/flux-pro/requests/<id>/status/stream[?logs=1]``  (SSE)
* ``GET  /fal-ai/flux-pro/requests/<id>``                         (result)
* ``PUT  /fal-ai/flux-pro/requests/<id>/cancel``
* ``GET  /files/<request id>_<n>.<ext>``                          (result images, stands for v3.fal.media)
* ``POST /rest/storage/auth/token?storage_type=fal-cdn-v3``       (= rest.fal.ai)
* ``POST /rest/storage/upload/initiate?storage_type=gcs``
* ``POST /cdn3/files/upload``                                     (= the token's ``base_url``)
* ``PUT  /gcs-upload/<id>?X-Goog-Signature=...``                  (signed upload URL of the fallback)
* ``GET  /cdn3/files/<key>/<name>``, ``GET /storage/files/<key>/<name>`` (uploaded files, no auth)

Modelled behaviour, with its source ("P2" = part 2, "P1" = part 1 of the reference)
-------------------------------------------------------------------------------------
* Follow-up URLs use only owner/app (``fal-ai/flux-pro/requests/<id>``) for every endpoint; a
  rebuilt ``.../kontext/max/requests/<id>`` URL gets 404 and is recorded as a violation. P2 §1.1, P1 §1.2.
* Submit answers 200 ``{"status":"IN_QUEUE", request_id, response_url, status_url, cancel_url,
  "logs":null, "metrics":{}, queue_position}``. P2 §1.1.
* **The body is not validated at submit.** An invalid body (strict ``validate_payload``) is
  queued, goes IN_PROGRESS (for ``JobScript.fail_time``) and COMPLETES; the status carries
  ``error``/``error_type`` and the result answers 422 ``{"detail":[{loc,msg,type,input}]}``.
  P2 §0.2, §1.1. ``FakeFal(validate_at_submit=True)`` restores a 422 at submit: NOT what fal does.
  A body that is not JSON at all is still refused with 422 at submit: fal's docs are silent (P2 §1.1
  "what the gateway rejects by itself ... is not documented"); a gateway refusing it is plausible.
* States are only IN_QUEUE / IN_PROGRESS / COMPLETED; status 202 until COMPLETED, then 200. P2 §1.2.
* **A completed job's error is final**: every result GET repeats the same status, headers and body,
  5xx included (helpers ``model_error`` / ``infra_error``). P2 §0.3, §1.4, §0.10.
* Every answer from fal's app layer carries ``x-fal-request-id``; only ingress errors
  (``fail_next(op, "ingress_502"|"ingress_503"|"ingress_504")``: nginx HTML, no
  ``x-fal-request-id``) mean "not recorded". P2 §1.1 (fal-client ``_is_ingress_error``), P1 §4.
* Submit 5xx from the app layer (``fail_next("submit", 500)`` or ``"500_after_record"``): the job IS
  created and runs, the answer is a JSON 5xx with ``x-fal-request-id``. Nothing documents a JSON 5xx
  that was not recorded (fal-client never retries a submit 500, fal-js neither, P2 §1.1), so the fake
  has no such kind. Submit 4xx faults (e.g. 429) are not recorded. The same "answered after acting"
  rule applies to 5xx faults on cancel and the storage calls; faults on reads answer at once.
* Account lock: ``lock_account(reason)`` -> submits and storage token/initiate/CDN uploads answer 403
  ``{"detail":"User is locked. Reason: ..."}``; status/stream/result/cancel keep working. P2 §0.5, §3.
  A wrong key stays 401 ``{"detail": "..."}``.
* Cancel (P2 §0.4, §1.5): a queued job is removed -> 202 ``{"status":"OK"}`` (the HTTP code is not
  documented; 202 like the other answer), it then reports COMPLETED with an error and its result answers
  499 ``client_cancelled`` (an infrastructure-style error, P2 §0.10; the exact answer is not
  documented). A running job -> 202 ``{"status":"CANCELLATION_REQUESTED"}`` and, by default, it IGNORES
  the cancel and completes normally (Kontext Max proxies to BFL). ``JobScript(cancellation_aware=True)``
  stops it after ``cancel_delay`` with 499 ``{"detail": ...}`` from the result (fal's App behaviour).
  Completed -> 400 ``ALREADY_COMPLETED`` (code unconfirmed), unknown -> 404 ``NOT_FOUND`` (unconfirmed).
* Status stream: ``data:`` lines with status objects, closed after COMPLETED, a comment line
  (``: ping``) every ``keepalive_interval`` (fal: 15 s). Modes ``ok``, ``unavailable`` (405),
  ``stall``, ``drop``, ``comments_only`` (pings forever, never data). The request's ``Accept``
  header is recorded (``Recorded.accept``) but not required: not documented. P2 §1.3.
* Results: single/text-to-image images carry ``url, width, height, content_type, file_name``;
  ``file_size`` only with ``JobScript(announce_file_size=True)``; the multi endpoint's images have
  ``url, width, height, content_type`` only and ``timings`` is ``{}``. P2 §4.
* Result images are valid PNG/JPEG files padded with deterministic pseudo-random (incompressible)
  bytes, cached per size so 1,000 jobs share one byte string.
* Inputs are fetched by the runner **when the job starts** (``fetch_inputs=True``): http(s) URLs (the
  fake Discord CDN, fal storage, anything) and data URIs (accepted: P2 §0.1, so ``allow_data_uri``
  defaults to True). A failed download -> 422 ``file_download_error``; bytes that are not an image ->
  422 ``image_load_error``; both from the result, the job COMPLETED with an error. P2 §3, §1.4. Which
  type goes with which failure is inferred from the type names (the docs list both).
* Concurrency: ``FakeFal(concurrency_limit=N)``: at most N jobs IN_PROGRESS account-wide; the rest wait
  IN_QUEUE in submit order with their true 0-based ``queue_position``; nothing is ever rejected.
  P1 §1.9, P2 §5. The scripted ``queue_positions``/``step`` time is a minimum queue time (dispatch delay)
  in both modes; without a limit the reported positions are the scripted ones (as before).
* Storage as fal-client 1.x uses it (P1 §2, P2 §3): token -> ``{token, token_type, base_url,
  expires_at, created_at}`` (``created_at`` as in fal-js' type); ``POST {base_url}/files/upload`` with the
  token -> ``{"access_url"}``; fallback initiate -> ``{upload_url, file_url}`` + ``PUT``. Recorded in
  ``fal.uploads``; served back without auth; ``expire_uploads()``; lifecycle header honoured.
* Result retention: result 404 after ``JobScript.result_ttl`` (fal: 1 h, 6 min for >=10 KB; P2 §1.4);
  the default is fal's hour.
* Transport faults: ``fail_next(op, "drop"|"drop_after"|"hang"|"hang_after"|"malformed")`` (see its doc);
  ``refuse_connections()`` stops listening (a host that is down: connecting is refused, nothing is
  sent) until ``accept_connections()``.
* Hygiene: ``fal.violations`` lists any request carrying ``Authorization: Key ...`` to a CDN/file URL or
  the upload host, any unknown route, wrong method or rebuilt request URL.

Not documented, chosen here: result GET before COMPLETED -> 400 "Request is still in progress"
(P2 §1.4 hints the text); status object ``error`` text (derived from the body's msg/detail);
token lifetime (``token_ttl``, 1 h); the GCS signed PUT is not refused while locked (a storage
provider's signed URL knows nothing of fal's billing); ``storage_type`` is checked strictly
(``fal-cdn-v3`` for the token, ``gcs``/``fal-cdn-v3`` for initiate: the values the clients send);
the runner's fetches of fal's own URLs (uploads, result files) are resolved in memory and not
recorded as requests; input errors echo a data URI shortened to 64 characters.

Not modelled: webhooks, ``X-Fal-Request-Timeout`` expiry, fal's internal retries (a job going
IN_PROGRESS -> IN_QUEUE again), multipart uploads, the older FAQ's 10 requests/s limit.

The queue clock is computed from timestamps and one scheduler timer (no task per job), so
thousands of concurrent jobs cost little; only SSE connections and input downloads of jobs that
have started run coroutines.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as _dt
import functools
import heapq
import json as _json
import math
import random
import re
import secrets
import struct
import time
import urllib.parse
import uuid
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

__all__ = [
    "FakeFal",
    "JobScript",
    "Job",
    "Recorded",
    "Fault",
    "Upload",
    "make_png",
    "make_jpeg",
    "make_image",
    "model_error",
    "infra_error",
    "error_detail",
    "validate_payload",
    "LOCK_MESSAGES",
    "MODEL_ERROR_STATUS",
    "INFRA_ERROR_STATUS",
]

APP_ID = "fal-ai/flux-pro"
ENDPOINT_SINGLE = "fal-ai/flux-pro/kontext/max"
ENDPOINT_MULTI = "fal-ai/flux-pro/kontext/max/multi"
ENDPOINT_T2I = "fal-ai/flux-pro/kontext/max/text-to-image"
ENDPOINTS = (ENDPOINT_SINGLE, ENDPOINT_MULTI, ENDPOINT_T2I)

ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
SAFETY_TOLERANCES = ("1", "2", "3", "4", "5", "6")
OUTPUT_FORMATS = ("jpeg", "png")
STREAM_MODES = ("ok", "unavailable", "stall", "drop", "comments_only")
QUEUE_OPS = ("submit", "status", "stream", "result", "cancel")
STORAGE_OPS = ("storage_token", "storage_initiate", "upload", "upload_put", "uploaded_file")
OPS = (*QUEUE_OPS, "file", *STORAGE_OPS)
CDN_OPS = ("file", "uploaded_file", "upload", "upload_put")  # never send the fal key here
LOCKED_OPS = ("submit", "storage_token", "storage_initiate", "upload")
# 5xx faults on these are applied *after* the request was processed: fal's app layer answered,
# so it may have acted (the job / cancel / upload happened, the answer says 5xx).
ACTING_OPS = ("submit", "cancel", "storage_token", "storage_initiate", "upload", "upload_put")
INGRESS_FAULTS = ("ingress_502", "ingress_503", "ingress_504")
# A proxy between the bot and fal's own front (a cloud load balancer, an egress proxy) that timed
# out after passing the request on: fal ran it, the answer is that proxy's plain 504, without
# x-fal-request-id and without nginx's page (fal-client resends only on nginx's).
PROXY_TIMEOUT_BODY = "upstream request timeout"
FAULT_KINDS = (
    "drop",
    "drop_after",
    "hang",
    "hang_after",
    "malformed",
    "500_after_record",
    "proxy_504_after_record",
    *INGRESS_FAULTS,
)
# What "malformed" answers: a header line without a colon, as a broken proxy on the path might
# send. aiohttp cannot parse it and raises ClientResponseError, which carries the request's
# headers (the fal key among them).
MALFORMED_ANSWER = b"HTTP/1.1 200 OK\r\nthis is not a header\r\n\r\n"

IN_QUEUE, IN_PROGRESS, COMPLETED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED"

# P2 §0.5
LOCK_MESSAGES = {
    "Exhausted balance": "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing.",
    "TOP_UP": "User is locked. Reason: TOP_UP.",
    "Admin lock": "User is locked. Reason: Admin lock. Please contact support@fal.ai",
}

# Model errors (detail list), P2 §1.4 / §0.3; msg texts from fal's error reference.
MODEL_ERROR_STATUS = {
    "content_policy_violation": 422,
    "image_load_error": 422,
    "file_download_error": 422,
    "image_too_large": 422,
    "image_too_small": 422,
    "file_too_large": 422,
    "greater_than_equal": 422,
    "less_than_equal": 422,
    "face_detection_error": 422,
    "downstream_service_error": 400,
    "downstream_service_unavailable": 500,
    "internal_server_error": 500,
    "generation_timeout": 504,
}
MODEL_ERROR_MSG = {
    "content_policy_violation": "The content could not be processed because it contained material "
    "flagged by a content checker.",
    "image_load_error": "Image load error",
    "file_download_error": "File download error",
    "image_too_large": "Image too large",
    "image_too_small": "Image too small",
    "file_too_large": "File too large",
    "downstream_service_error": "Downstream service error",
    "downstream_service_unavailable": "Downstream service unavailable",
    "internal_server_error": "Internal server error",
    "generation_timeout": "Generation timeout",
}
MODEL_ERROR_LOC = {
    "content_policy_violation": ("body", "prompt"),
    "image_load_error": ("body", "image_url"),
    "file_download_error": ("body", "image_url"),
    "image_too_large": ("body", "image_url"),
    "image_too_small": ("body", "image_url"),
    "file_too_large": ("body", "image_url"),
}
# Infrastructure errors ({"detail": str, "error_type"} + X-Fal-Error-Type), P1 §1.5, P2 §0.10.
INFRA_ERROR_STATUS = {
    "request_timeout": 504,
    "startup_timeout": 504,
    "runner_scheduling_failure": 503,
    "runner_connection_timeout": 503,
    "runner_disconnected": 503,
    "runner_connection_refused": 503,  # code not given in the docs; 503 like its siblings
    "runner_connection_error": 503,
    "runner_incomplete_response": 502,
    "runner_server_error": 500,
    "client_disconnected": 499,
    "client_cancelled": 499,
    "bad_request": 400,
    "internal_error": 500,
}


# --------------------------------------------------------------------------------------
# Scripting and records
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobScript:
    """How one job behaves. All durations are seconds of real time."""

    # Positions reported while queued (each held `step` s) when FakeFal has no concurrency
    # limit. In both modes len(queue_positions) * step is the job's minimum queue time.
    queue_positions: tuple[int, ...] = (0,)
    step: float = 0.05
    run_time: float = 0.05  # IN_PROGRESS duration of a successful (or scripted-failure) job
    logs: tuple[str, ...] = ()  # emitted evenly during IN_PROGRESS (first one at start)
    log_level: str = "INFO"
    image_size: int = 2048  # bytes per image file (exact when achievable)
    width: int = 512  # requested pixel size; shrunk if it cannot fit in image_size
    height: int = 512
    image_format: str | None = None  # "png"/"jpeg"; None -> follow payload output_format
    nsfw: tuple[bool, ...] = ()  # per image; missing -> False
    # Scripted failure: every result call returns this status/body (+headers). The COMPLETED
    # status then carries `error` (and `error_type`), derived from the body unless given.
    # See model_error() / infra_error() for realistic bodies.
    result_status: int | None = None
    result_body: Any = None
    result_headers: dict[str, str] | None = None
    error: str | None = None
    error_type: str | None = None
    result_ttl: float | None = 3600.0  # result -> 404 this long after completion (fal: an hour; None: kept)
    stream_mode: str = "ok"  # see STREAM_MODES
    inference_time: float | None = None  # metrics.inference_time; default = time in progress
    cancel_delay: float = 0.02  # cancellation-aware job: time to stop after PUT cancel
    cancellation_aware: bool = False  # False: a running job ignores cancel (Kontext Max -> BFL)
    announce_file_size: bool = False  # single endpoint: include images[].file_size
    fail_time: float = 0.05  # IN_PROGRESS time before a validation / input error ends the job
    #                          (capped at run_time; also waits for the input download)

    def __post_init__(self) -> None:
        if self.stream_mode not in STREAM_MODES:
            raise ValueError(f"stream_mode must be one of {STREAM_MODES}")
        if self.image_format not in (None, "png", "jpeg"):
            raise ValueError("image_format must be None, 'png' or 'jpeg'")
        if self.result_status is not None and self.result_status < 400:
            raise ValueError("result_status is for failures (>= 400)")
        if self.fail_time < 0 or self.run_time < 0 or self.step < 0:
            raise ValueError("durations must be >= 0")

    @property
    def failed(self) -> bool:
        return self.result_status is not None


def error_detail(
    type: str, msg: str | None = None, loc: tuple | None = None, input: Any = None, ctx: dict | None = None
) -> dict:
    """One entry of a model error's ``detail`` list, shaped like fal's error reference."""
    d: dict[str, Any] = {
        "loc": list(loc or MODEL_ERROR_LOC.get(type) or ("body",)),
        "msg": msg or MODEL_ERROR_MSG.get(type, type.replace("_", " ").capitalize()),
        "type": type,
        "url": f"https://docs.fal.ai/errors/#{type}",
    }
    if ctx is not None:
        d["ctx"] = ctx
    if input is not None:
        d["input"] = input
    return d


def model_error(
    type: str,
    msg: str | None = None,
    status: int | None = None,
    *,
    loc: tuple | None = None,
    input: Any = None,
    ctx: dict | None = None,
    retryable: bool | None = None,
    headers: dict[str, str] | None = None,
    **script: Any,
) -> JobScript:
    """A job that ends with a model error: ``{"detail": [{loc, msg, type, url, ...}]}``.

    The status defaults from MODEL_ERROR_STATUS (e.g. downstream_service_unavailable 500,
    generation_timeout 504, downstream_service_error 400, else 422). ``retryable`` adds the
    ``X-Fal-Retryable`` header. Other keyword arguments are JobScript fields."""
    hdrs = dict(headers or {})
    if retryable is not None:
        hdrs["X-Fal-Retryable"] = "true" if retryable else "false"
    return JobScript(
        result_status=status or MODEL_ERROR_STATUS.get(type, 422),
        result_body={"detail": [error_detail(type, msg, loc, input, ctx)]},
        result_headers=hdrs or None,
        **script,
    )


def infra_error(
    error_type: str,
    status: int | None = None,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **script: Any,
) -> JobScript:
    """A job that ends with an infrastructure error: ``{"detail": "<text>", "error_type": ...}``
    plus header ``X-Fal-Error-Type``; status from INFRA_ERROR_STATUS (default 500)."""
    hdrs = {"X-Fal-Error-Type": error_type, **(headers or {})}
    return JobScript(
        result_status=status or INFRA_ERROR_STATUS.get(error_type, 500),
        result_body={"detail": detail or error_type.replace("_", " ").capitalize(), "error_type": error_type},
        result_headers=hdrs,
        **script,
    )


@dataclass
class Recorded:
    op: str  # one of OPS, or "unknown"
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    time: float = field(default_factory=time.monotonic)
    request_id: str | None = None
    status: int | None = None  # HTTP status the fake answered (None for drops/hangs)

    def header(self, name: str) -> str | None:
        low = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == low), None)

    @property
    def accept(self) -> str | None:
        return self.header("Accept")


@dataclass
class Fault:
    status: int | str  # HTTP code or one of FAULT_KINDS
    json: Any = None
    headers: dict[str, str] | None = None


@dataclass
class Upload:
    """A file stored through fal's storage API (and served back at `url`)."""

    url: str
    data: bytes
    content_type: str
    file_name: str | None
    lifecycle: Any  # parsed X-Fal-Object-Lifecycle(-Preference) header, raw text if not JSON, or None
    via: str  # "cdn-v3" (POST {base_url}/files/upload) or "gcs" (initiate + PUT)
    uploaded_at: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # monotonic; from expiration_duration_seconds
    deleted: bool = False

    def available(self, now: float | None = None) -> bool:
        if self.deleted:
            return False
        return self.expires_at is None or (now if now is not None else time.monotonic()) < self.expires_at


class Job:
    """One queued request. Its timeline (start, end) is set by FakeFal's scheduler; its state is
    derived from those timestamps (time.monotonic())."""

    def __init__(
        self,
        fal: FakeFal,
        request_id: str,
        endpoint: str,
        payload: Any,
        script: JobScript,
        headers: dict[str, str],
        seq: int,
        validation_errors: list[dict] | None = None,
    ) -> None:
        self.fal = fal
        self.request_id = request_id
        self.endpoint = endpoint
        self.payload = payload
        self.script = script
        self.headers = headers
        self.seq = seq  # arrival order (1-based)
        self.validation_errors: list[dict] = list(validation_errors or [])
        self.submitted_at = time.monotonic()
        self._wall0 = time.time()
        self.min_start_at = self.submitted_at + len(script.queue_positions) * script.step
        self.start_at: float | None = None  # set by the scheduler
        self._end: float | None = None  # known end time (None: not started / still fetching)
        self._removed_at: float | None = None  # cancelled while queued
        self._stop_at: float | None = None  # cancellation-aware stop
        self._stopped = False  # the end came from the cancel
        self._released = False  # its concurrency slot was freed
        self.cancel_requested_at: float | None = None
        # input fetching (at start)
        self._fetching = False
        self.fetch_started_at: float | None = None
        self.fetch_done_at: float | None = None
        self.input_error: dict | None = None
        self.files_deleted = False
        self._changed = asyncio.Event()
        p = payload if isinstance(payload, dict) else {}
        seed = p.get("seed")
        self._seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else random.randint(0, 2**31 - 1)
        fmt = script.image_format or p.get("output_format") or "jpeg"
        self.image_format: str = fmt if fmt in OUTPUT_FORMATS else "jpeg"
        n = p.get("num_images", 1)
        self.num_images: int = n if isinstance(n, int) and 1 <= n <= 4 else 1
        url = f"{fal.base_url}/{APP_ID}/requests/{request_id}"
        self.response_url = url
        self.status_url = url + "/status"
        self.cancel_url = url + "/cancel"

    # -- inputs ---------------------------------------------------------------------
    def input_urls(self) -> list[tuple[list, str]]:
        p = self.payload if isinstance(self.payload, dict) else {}
        if self.endpoint == ENDPOINT_MULTI:
            return [
                (["body", "image_urls", i], u) for i, u in enumerate(p.get("image_urls") or []) if isinstance(u, str)
            ]
        if self.endpoint == ENDPOINT_SINGLE and isinstance(p.get("image_url"), str):
            return [(["body", "image_url"], p["image_url"])]
        return []

    # -- timeline -------------------------------------------------------------------
    def _recompute_end(self) -> None:
        if self._removed_at is not None:
            self._end, self._stopped = self._removed_at, False
            return
        if self.start_at is None:
            self._end = None
            return
        s = self.script
        natural: float | None
        if self.validation_errors or self.input_error is not None:
            natural = self.start_at + min(s.fail_time, s.run_time)
        else:
            natural = self.start_at + s.run_time
        if self._fetching:
            natural = None
        elif self.fetch_done_at is not None:
            natural = max(natural, self.fetch_done_at)
        if self._stop_at is not None and (natural is None or self._stop_at < natural):
            self._end, self._stopped = self._stop_at, True
        else:
            self._end, self._stopped = natural, False

    @property
    def cancelled(self) -> bool:
        """True if the job ended because of a cancel (removed from the queue, or stopped)."""
        return self._removed_at is not None or self._stopped

    @property
    def started_at(self) -> float | None:
        self.fal._advance(time.monotonic())
        return self.start_at

    @property
    def completed_at(self) -> float | None:
        now = time.monotonic()
        self.fal._advance(now)
        end = self._end
        return end if end is not None and now >= end else None

    @property
    def state(self) -> str:
        return self.state_at(time.monotonic())

    def state_at(self, now: float) -> str:
        self.fal._advance(now)
        end = self._end
        if end is not None and now >= end:
            return COMPLETED
        if self.start_at is not None and now >= self.start_at:
            return IN_PROGRESS
        return IN_QUEUE

    def queue_position_at(self, now: float) -> int:
        if self.fal.concurrency_limit is not None:
            return self.fal._waiting.prefix(self.seq - 1)
        qp = self.script.queue_positions
        if not qp:
            return 0
        if self.script.step <= 0:
            return qp[-1]
        i = int((now - self.submitted_at) / self.script.step)
        return qp[min(max(i, 0), len(qp) - 1)]

    def _log_times(self) -> list[float]:
        n = len(self.script.logs)
        if not n or self.start_at is None:
            return []
        return [self.start_at + k * self.script.run_time / n for k in range(n)]

    def logs_at(self, now: float) -> list[dict]:
        end = self._end
        limit = now if end is None else min(now, end)
        out: list[dict] = []
        if self.validation_errors:
            return out
        for t, msg in zip(self._log_times(), self.script.logs, strict=False):
            if t > limit:
                break
            wall = self._wall0 + (t - self.submitted_at)
            out.append(
                {
                    "message": msg,
                    "level": self.script.log_level,
                    "source": "USER",
                    "timestamp": _dt.datetime.fromtimestamp(wall, _dt.UTC).isoformat(),
                }
            )
        return out

    def next_change_after(self, now: float) -> float | None:
        """Next monotonic time at which the status object may change by itself (None = only on
        notify()). Changes caused by other jobs (a freed slot) arrive through notify()."""
        cands: list[float] = []
        end = self._end
        if end is not None and end > now:
            cands.append(end)
        if self.start_at is None and self._removed_at is None:
            cands.append(self.min_start_at)
            s = self.script
            if self.fal.concurrency_limit is None and s.step > 0:
                cands.append(self.submitted_at + (math.floor((now - self.submitted_at) / s.step) + 1) * s.step)
        elif self.start_at is not None:
            cands.extend(t for t in self._log_times() if t > now)
        cands = [c for c in cands if c > now]
        return min(cands) if cands else None

    def notify(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    # -- outcome --------------------------------------------------------------------
    @property
    def failure(self) -> tuple[int, Any, dict[str, str]] | None:
        """(status, body, headers) of the result call if the job failed."""
        if self._removed_at is not None:
            return (
                499,
                {"detail": "Request was cancelled before it started", "error_type": "client_cancelled"},
                {"X-Fal-Error-Type": "client_cancelled"},
            )
        if self._stopped:
            return 499, {"detail": "Request cancelled"}, {}
        if self.validation_errors:
            return 422, {"detail": self.validation_errors}, {}
        if self.input_error is not None:
            return 422, {"detail": [self.input_error]}, {}
        s = self.script
        if s.failed:
            body = s.result_body if s.result_body is not None else {"detail": "Internal Server Error"}
            headers = dict(s.result_headers or {})
            if (
                isinstance(body, dict)
                and body.get("error_type")
                and not any(k.lower() == "x-fal-error-type" for k in headers)
            ):
                headers["X-Fal-Error-Type"] = str(body["error_type"])
            return s.result_status, body, headers  # type: ignore[return-value]
        return None

    def _error_fields(self) -> dict:
        fail = self.failure
        if fail is None:
            return {}
        _, body, headers = fail
        scripted = (
            self._removed_at is None and not self._stopped and not self.validation_errors and self.input_error is None
        )
        err = self.script.error if scripted else None
        etype = self.script.error_type if scripted else None
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
        return {"response_url": self.response_url, "status_url": self.status_url, "cancel_url": self.cancel_url}

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
            if self.start_at is not None and self._removed_at is None:
                it = self.script.inference_time
                if it is None:
                    it = float(round((self._end or now) - self.start_at, 6))
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
        multi = self.endpoint == ENDPOINT_MULTI
        p = self.payload if isinstance(self.payload, dict) else {}
        images = []
        for i in range(self.num_images):
            if p.get("sync_mode") is True:
                url = f"data:{ctype};base64," + base64.b64encode(data).decode()
            else:
                url = f"{self.fal.base_url}/files/{self.file_name(i)}"
            img: dict[str, Any] = {"url": url, "width": w, "height": h, "content_type": ctype}
            if not multi:  # FluxKontextOutput -> fal toolkit Image (P2 §4)
                img["file_name"] = self.file_name(i)
                if self.script.announce_file_size:
                    img["file_size"] = len(data)
            images.append(img)
        nsfw = [bool(self.script.nsfw[i]) if i < len(self.script.nsfw) else False for i in range(self.num_images)]
        if multi:
            timings: dict = {}  # a captured multi result shows "timings": {} (P2 §4)
        else:
            timings = {
                "inference": float(
                    self.script.inference_time if self.script.inference_time is not None else self.script.run_time
                )
            }
        return {
            "images": images,
            "seed": self._seed,
            "has_nsfw_concepts": nsfw,
            "prompt": p.get("prompt", ""),
            "timings": timings,
        }

    def __repr__(self) -> str:
        return f"<Job {self.request_id} {self.endpoint} {self.state}{' cancelled' if self.cancelled else ''}>"


class _Fenwick:
    """Counts of waiting jobs by arrival number, for O(log n) queue positions."""

    __slots__ = ("n", "tree", "vals")

    def __init__(self, n: int = 1024) -> None:
        self.n = n
        self.tree = [0] * (n + 1)
        self.vals = bytearray(n + 1)

    def _grow(self, need: int) -> None:
        n = max(need, self.n * 2)
        self.vals.extend(bytes(n - self.n))
        tree = list(self.vals)
        for i in range(1, n + 1):
            j = i + (i & -i)
            if j <= n:
                tree[j] += tree[i]
        self.n, self.tree = n, tree

    def set(self, i: int, present: bool) -> None:
        if i > self.n:
            self._grow(i)
        v = 1 if present else 0
        d = v - self.vals[i]
        if not d:
            return
        self.vals[i] = v
        tree, n = self.tree, self.n
        while i <= n:
            tree[i] += d
            i += i & -i

    def prefix(self, i: int) -> int:
        """Number of set entries with index <= i."""
        i = min(i, self.n)
        s, tree = 0, self.tree
        while i > 0:
            s += tree[i]
            i -= i & -i
        return s


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


@functools.lru_cache(maxsize=16)
def _noise(n: int) -> bytes:
    """n deterministic pseudo-random (incompressible) bytes; cached."""
    return random.Random(n).randbytes(n)


def make_png(size: int, width: int = 512, height: int = 512, incompressible: bool = True) -> tuple[bytes, int, int]:
    """Valid grey RGB PNG of exactly `size` bytes when possible (padding in a private
    ancillary chunk 'paDd', pseudo-random bytes unless incompressible=False); shrinks
    dimensions if needed. Returns (bytes, w, h)."""
    w, h = max(1, width), max(1, height)
    iend = _png_chunk(b"IEND", b"")
    while True:
        base = _png_base(w, h)
        n = len(base) + len(iend)
        pad = size - n
        if pad == 0:
            return base + iend, w, h
        if pad >= 12:
            filler = _noise(pad - 12) if incompressible else bytes(pad - 12)
            return base + _png_chunk(b"paDd", filler) + iend, w, h
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


def make_jpeg(size: int, width: int = 512, height: int = 512, incompressible: bool = True) -> tuple[bytes, int, int]:
    """Valid baseline JPEG of exactly `size` bytes when possible (padding in COM segments
    inserted after APP0, pseudo-random bytes unless incompressible=False; decoders skip
    segments by their length); shrinks dimensions if needed. Returns (bytes, w, h)."""
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
    filler = _noise(pad) if incompressible else bytes(pad)
    used = 0
    while pad > 0:
        # each COM segment costs 4 bytes overhead and holds <= 65533 payload bytes;
        # avoid leaving a remainder < 4
        take = min(pad, 65537)
        if pad - take and pad - take < 4:
            take -= 4
        segs.append(_jpeg_seg(0xFE, filler[used : used + take - 4]))
        used += take - 4
        pad -= take
    head_len = 2 + 18  # SOI + APP0
    return base[:head_len] + b"".join(segs) + base[head_len:] + b"\xff\xd9", w, h


@functools.lru_cache(maxsize=64)
def make_image(
    fmt: str, size: int, width: int = 512, height: int = 512, incompressible: bool = True
) -> tuple[bytes, int, int]:
    """Cached: each (format, size, dims) is generated once and shared by all jobs."""
    return (make_png if fmt == "png" else make_jpeg)(size, width, height, incompressible)


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


def validate_payload(endpoint: str, body: Any, allow_data_uri: bool = True) -> list[dict]:
    """Return a list of pydantic-style error dicts (empty = valid).

    fal runs this kind of check on the runner, after queueing: the errors come back from the
    result call, not the submit (P2 §0.2). Data URIs are accepted by Kontext Max (P2 §0.1).

    Deliberately STRICT (stricter than fal's lax pydantic might be): unknown fields are
    rejected ("extra_forbidden") and no type coercion happens ("3" is not an int, 2 is not
    "2"), so typos and wrong types in the bot's payload fail loudly in tests.
    """
    if not isinstance(body, dict):
        return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type", "input": body}]
    errs: list[dict] = []
    multi = endpoint == ENDPOINT_MULTI
    t2i = endpoint == ENDPOINT_T2I
    allowed = {
        "prompt",
        "seed",
        "guidance_scale",
        "sync_mode",
        "num_images",
        "output_format",
        "safety_tolerance",
        "enhance_prompt",
        "aspect_ratio",
    }
    if not t2i:  # text-to-image has no image field at all
        allowed.add("image_urls" if multi else "image_url")

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
            errs.append(
                _err(["image_urls"], "List should have at least 1 item after validation, not 0", "too_short", v)
            )
        else:
            for i, u in enumerate(v):
                if not _is_url(u, allow_data_uri):
                    errs.append(_err(["image_urls", i], "Input should be a valid URL", "url_parsing", u))
    elif not t2i:
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
            errs.append(_err(["guidance_scale"], "Input should be greater than or equal to 1", "greater_than_equal", v))
        elif v > 20:
            errs.append(_err(["guidance_scale"], "Input should be less than or equal to 20", "less_than_equal", v))
    if "num_images" in body:
        v = body["num_images"]
        if not is_int(v):
            errs.append(_err(["num_images"], "Input should be a valid integer", "int_type", v))
        elif v < 1:
            errs.append(_err(["num_images"], "Input should be greater than or equal to 1", "greater_than_equal", v))
        elif v > 4:
            errs.append(_err(["num_images"], "Input should be less than or equal to 4", "less_than_equal", v))
    if "output_format" in body and body["output_format"] not in OUTPUT_FORMATS:
        errs.append(_err(["output_format"], "Input should be 'jpeg' or 'png'", "literal_error", body["output_format"]))
    if "safety_tolerance" in body:
        v = body["safety_tolerance"]
        if not (isinstance(v, str) and v in SAFETY_TOLERANCES):
            errs.append(
                _err(["safety_tolerance"], "Input should be '1', '2', '3', '4', '5' or '6'", "literal_error", v)
            )
    for b in ("enhance_prompt", "sync_mode"):
        if b in body and not isinstance(body[b], bool):
            errs.append(_err([b], "Input should be a valid boolean", "bool_type", body[b]))
    if "aspect_ratio" in body and body["aspect_ratio"] not in ASPECT_RATIOS:
        errs.append(
            _err(
                ["aspect_ratio"],
                "Input should be " + ", ".join(f"'{a}'" for a in ASPECT_RATIOS),
                "literal_error",
                body["aspect_ratio"],
            )
        )
    for k in body:
        if k not in allowed:
            errs.append(_err([k], "Extra inputs are not permitted", "extra_forbidden", body[k]))
    return errs


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------
_REQ_RE = re.compile(r"^/(?P<app>.+?)/requests/(?P<id>[^/]+)(?P<rest>/status|/status/stream|/cancel)?/?$")
_UPLOADED_RE = re.compile(r"^/(?:cdn3|storage)/files/(?P<key>[A-Za-z0-9]+)/(?P<name>[^/]+)$")
_METHODS = {
    "submit": ("POST",),
    "status": ("GET",),
    "stream": ("GET",),
    "result": ("GET",),
    "cancel": ("PUT",),
    "file": ("GET", "HEAD"),
    "storage_token": ("POST",),
    "storage_initiate": ("POST",),
    "upload": ("POST",),
    "upload_put": ("PUT",),
    "uploaded_file": ("GET", "HEAD"),
}
_INGRESS_REASON = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}
_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif"}


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200] or "upload.bin"


class FakeFal:
    """The fake. Constructor arguments:

    key                 the only accepted ``Authorization: Key <key>``
    default             JobScript of jobs not matched by script_next / script_for
    fetch_inputs        the runner downloads image_url(s) when the job starts (fal does: P2 §3)
    keepalive_interval  seconds between SSE comment lines (fal: 15)
    fetch_timeout       seconds before an input download counts as failed
    allow_data_uri      accept data:image/... inputs (Kontext Max does: P2 §0.1)
    chunk_size          bytes per write when serving files
    validate_at_submit  NOT what fal does: refuse an invalid body with 422 at submit, no job
    concurrency_limit   max jobs IN_PROGRESS account-wide (fal: 2..40); None = unlimited
    token_ttl           lifetime of CDN upload tokens (not documented; 1 h)
    """

    def __init__(
        self,
        key: str = "test-fal-key",
        default: JobScript | None = None,
        fetch_inputs: bool = True,
        keepalive_interval: float = 15.0,
        fetch_timeout: float = 5.0,
        allow_data_uri: bool = True,
        chunk_size: int = 64 * 1024,
        validate_at_submit: bool = False,
        concurrency_limit: int | None = None,
        token_ttl: float = 3600.0,
    ) -> None:
        self.key = key
        self.default = default or JobScript()
        self.fetch_inputs = fetch_inputs
        self.keepalive_interval = keepalive_interval
        self.fetch_timeout = fetch_timeout
        self.allow_data_uri = allow_data_uri
        self.chunk_size = chunk_size
        self.validate_at_submit = validate_at_submit
        self.token_ttl = token_ttl
        self.requests: list[Recorded] = []
        self.jobs: dict[str, Job] = {}
        self.violations: list[str] = []
        self.uploads: list[Upload] = []
        self.locked_reason: str | None = None
        self.base_url = ""
        self._scripts: deque[JobScript] = deque()
        self._predicates: list[Callable[[Any], JobScript | None]] = []
        self._faults: dict[str, deque[Fault]] = {op: deque() for op in OPS}
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closing_event: asyncio.Event | None = None
        self._submit_event: asyncio.Event | None = None
        self._recorded_event = asyncio.Event()
        self._bg: set[asyncio.Task] = set()
        # scheduler
        self._concurrency_limit = concurrency_limit
        self._seq = 0
        self._pending: list[tuple[float, int, Job]] = []  # not yet past min_start_at
        self._eligible: list[tuple[int, Job]] = []  # may start, in arrival order
        self._ending: list[tuple[float, int, Job]] = []  # holding a slot, known end
        self._tick = 0  # unique tie-breaker for _ending entries
        self._running = 0  # jobs holding a slot
        self._waiting = _Fenwick()  # queued jobs by arrival number
        self._last_t = 0.0
        self._advancing = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stream_jobs: dict[Job, int] = {}  # jobs with open status streams
        # storage
        self._tokens: dict[str, float] = {}  # token -> expiry (wall clock)
        self._uploads_by_path: dict[str, Upload] = {}
        self._gcs_pending: dict[str, dict] = {}

    # -- lifecycle --------------------------------------------------------------------
    @property
    def rest_url(self) -> str:
        """Stands for https://rest.fal.ai (storage token and upload initiate)."""
        return f"{self.base_url}/rest"

    @property
    def cdn_upload_url(self) -> str:
        """Stands for https://v3.fal.media: the ``base_url`` handed out with upload tokens."""
        return f"{self.base_url}/cdn3"

    async def start(self) -> FakeFal:
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._closing_event = asyncio.Event()
        self._submit_event = asyncio.Event()
        self._recorded_event = asyncio.Event()
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await self._site.start()
        self.base_url = f"http://127.0.0.1:{self._site.port}"
        self._session = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, None
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

    async def refuse_connections(self) -> None:
        """fal's host is down: it stops listening, so a new connection is refused before anything
        is sent (the client's ClientConnectorError), and the connections open to it are closed.
        `accept_connections` listens again on the same port."""
        assert self._site is not None and self._runner is not None and self._runner.server is not None
        await self._site.stop()
        for connection in self._runner.server.connections:
            connection.force_close()

    async def accept_connections(self) -> None:
        assert self._runner is not None and self._site is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self._site.port)
        await self._site.start()

    async def __aenter__(self) -> FakeFal:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # -- scripting -----------------------------------------------------------------
    def script_next(self, script: JobScript, count: int = 1) -> None:
        """Use `script` for the next `count` accepted submits (FIFO, before predicates)."""
        self._scripts.extend([script] * count)

    def script_for(self, predicate: Callable[[Any], JobScript | None]) -> None:
        """predicate(payload) -> JobScript|None; consulted after script_next, before default."""
        self._predicates.append(predicate)

    def fail_next(
        self, op: str, status: int | str = 500, times: int = 1, json: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        """Inject a fault into the next `times` requests of `op` (one of OPS).

        status:
        * an HTTP code: a JSON answer (`json`, default {"detail": "Injected fault"}) with
          x-fal-request-id. A 5xx on submit/cancel/uploads is sent *after* processing (fal's app
          layer answered, so the job IS created / the cancel done); a 4xx is sent instead of
          processing (submit: no job).
        * "500_after_record": submit is processed (job created and runs), the answer is a JSON
          500 internal_error with x-fal-request-id (same as 500 with a realistic body).
        * "ingress_502" / "ingress_503" / "ingress_504": nginx HTML, no x-fal-request-id; the
          request never reached fal (submit: no job).
        * "proxy_504_after_record": processed (submit: job created), then a proxy's plain-text
          504 (`PROXY_TIMEOUT_BODY`), no x-fal-request-id, no nginx page.
        * "drop": close the connection before doing anything (submit: no job).
        * "drop_after": process normally, then close without answering (submit: job created).
        * "hang": never answer until stop().
        * "hang_after": process normally, then never answer until stop() (the answer is lost on
          the way, and a client waits for it until its read timeout).
        * "malformed": answer with a response HTTP cannot parse (`MALFORMED_ANSWER`), then close,
          before doing anything (submit: no job): something broken on the path.
        """
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}")
        if not isinstance(status, int) and status not in FAULT_KINDS:
            raise ValueError(f"status must be an HTTP code or one of {FAULT_KINDS}")
        self._faults[op].extend([Fault(status, json, headers)] * times)

    def clear_faults(self, *ops: str) -> None:
        """fal is back: the faults still waiting for `ops` (all of them without any) are dropped."""
        for op in ops or OPS:
            self._faults[op].clear()

    def _pick_script(self, payload: Any) -> JobScript:
        if self._scripts:
            return self._scripts.popleft()
        for p in self._predicates:
            s = p(payload if isinstance(payload, dict) else {})
            if s is not None:
                return s
        return self.default

    def expire_files(self, request_id: str | None = None) -> None:
        """Make the result files of one job (or all jobs) return 404 from now on."""
        for job in [self.jobs[request_id]] if request_id else self.jobs.values():
            job.files_deleted = True

    def expire_uploads(self, url: str | None = None) -> None:
        """Delete one uploaded file (by its access/file URL) or all of them: GET -> 404 and
        a job that starts afterwards fails with file_download_error."""
        for up in self.uploads:
            if url is None or up.url == url:
                up.deleted = True

    def expire_tokens(self) -> None:
        """Expire every CDN upload token handed out so far (uploads with them -> 401)."""
        now = time.time()
        for t in self._tokens:
            self._tokens[t] = min(self._tokens[t], now - 1)

    def lock_account(self, reason: str = "Exhausted balance") -> None:
        """Answer submits and storage token/initiate/upload requests with 403 "User is locked"
        (P2 §0.5). reason: "Exhausted balance", "TOP_UP", "Admin lock" or any text."""
        self.locked_reason = reason

    def unlock_account(self) -> None:
        self.locked_reason = None

    @property
    def lock_message(self) -> str | None:
        r = self.locked_reason
        if r is None:
            return None
        return LOCK_MESSAGES.get(r, f"User is locked. Reason: {r}.")

    @property
    def concurrency_limit(self) -> int | None:
        return self._concurrency_limit

    @concurrency_limit.setter
    def concurrency_limit(self, value: int | None) -> None:
        self._concurrency_limit = value
        self._advance(time.monotonic())

    # -- recording helpers ---------------------------------------------------------------
    @property
    def submits(self) -> list[Any]:
        return [j.payload for j in self.jobs.values()]

    @property
    def running(self) -> int:
        """Jobs holding a concurrency slot right now."""
        self._advance(time.monotonic())
        return self._running

    def count(self, op: str) -> int:
        return sum(1 for r in self.requests if r.op == op)

    def requests_for(self, op: str | None = None, request_id: str | None = None) -> list[Recorded]:
        return [
            r
            for r in self.requests
            if (op is None or r.op == op) and (request_id is None or r.request_id == request_id)
        ]

    async def wait_for_submits(self, n: int, timeout: float = 5.0) -> list[Any]:
        async def _wait() -> None:
            while len(self.jobs) < n:
                assert self._submit_event is not None
                ev = self._submit_event
                await ev.wait()

        await asyncio.wait_for(_wait(), timeout)
        return self.submits

    async def wait_for_requests(self, op: str, n: int = 1, timeout: float = 5.0) -> list[Recorded]:
        """Until `n` requests of `op` have arrived (answered or not); returns them."""

        async def _wait() -> None:
            while self.count(op) < n:
                await self._recorded_event.wait()

        await asyncio.wait_for(_wait(), timeout)
        return self.requests_for(op)

    # -- scheduler -------------------------------------------------------------------
    # Events (a job passing its minimum queue time, a job's end freeing its slot) are
    # processed in time order, lazily: on every request and from one timer armed for the next
    # event. Start times are the event times, so the schedule does not depend on polling.
    def _new_job(self, endpoint: str, payload: Any, headers: dict[str, str], validation_errors: list[dict]) -> Job:
        now = time.monotonic()
        self._advance(now)
        self._seq += 1
        rid = str(uuid.uuid4())
        job = Job(self, rid, endpoint, payload, self._pick_script(payload), headers, self._seq, validation_errors)
        self.jobs[rid] = job
        self._waiting.set(job.seq, True)
        heapq.heappush(self._pending, (job.min_start_at, job.seq, job))
        assert self._submit_event is not None
        ev, self._submit_event = self._submit_event, asyncio.Event()
        ev.set()
        self._advance(job.submitted_at)
        return job

    def _peek_ending(self) -> float:
        h = self._ending
        while h and (h[0][2]._released or h[0][2]._end != h[0][0]):
            heapq.heappop(h)
        return h[0][0] if h else math.inf

    def _peek_pending(self) -> float:
        h = self._pending
        while h and h[0][2]._removed_at is not None:
            heapq.heappop(h)
        return h[0][0] if h else math.inf

    def _advance(self, now: float) -> None:
        if self._advancing:
            return
        self._advancing = True
        queue_changed = False
        try:
            t = self._last_t
            while True:
                limit = self._concurrency_limit
                while self._eligible and (limit is None or self._running < limit):
                    _, job = heapq.heappop(self._eligible)
                    if job._removed_at is None:
                        self._start(job, t)
                        queue_changed = True
                t_end, t_pend = self._peek_ending(), self._peek_pending()
                nxt = min(t_end, t_pend)
                if nxt > now:
                    break
                t = max(t, nxt)
                if t_end <= t_pend:
                    _, _, job = heapq.heappop(self._ending)
                    job._released = True
                    self._running -= 1
                else:
                    _, seq, job = heapq.heappop(self._pending)
                    heapq.heappush(self._eligible, (seq, job))
            self._last_t = max(self._last_t, now)
        finally:
            self._advancing = False
        if queue_changed:
            self._queue_changed()
        self._arm_timer(now)

    def _start(self, job: Job, t: float) -> None:
        job.start_at = t
        self._running += 1
        self._waiting.set(job.seq, False)
        if self.fetch_inputs and not job.validation_errors:
            self._begin_inputs(job)
        job._recompute_end()
        if job._end is not None:
            self._push_ending(job)
        job.notify()

    def _push_ending(self, job: Job) -> None:
        assert job._end is not None
        self._tick += 1
        heapq.heappush(self._ending, (job._end, self._tick, job))

    def _queue_changed(self) -> None:
        """Positions moved: wake the status streams of queued jobs (limit mode only)."""
        if self._concurrency_limit is None:
            return
        for job in list(self._stream_jobs):
            if job.start_at is None and job._removed_at is None:
                job.notify()

    def _end_changed(self, job: Job) -> None:
        job._recompute_end()
        if job._end is not None and not job._released and job.start_at is not None:
            self._push_ending(job)
        job.notify()
        self._advance(time.monotonic())

    def _arm_timer(self, now: float) -> None:
        if self._closing:
            return
        nxt = min(self._peek_ending(), self._peek_pending())
        if nxt == math.inf:
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= nxt:
            return
        loop = self._loop
        if loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = nxt
        self._timer = loop.call_later(max(0.0, nxt - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        if not self._closing:
            self._advance(time.monotonic())

    def _remove_queued(self, job: Job, now: float) -> None:
        job._removed_at = now
        self._waiting.set(job.seq, False)
        job._recompute_end()
        job.notify()
        self._queue_changed()
        self._advance(now)

    # -- input fetching (at start) ------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        loop = self._loop
        assert loop is not None
        t = loop.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    def _is_own(self, url: str) -> bool:
        return bool(self.base_url) and url.startswith(self.base_url + "/")

    def _begin_inputs(self, job: Job) -> None:
        urls = job.input_urls()
        if not urls:
            return
        job.fetch_started_at = job.start_at
        if all(u.startswith("data:") or self._is_own(u) for _, u in urls):
            for loc, u in urls:  # resolved at once: no download needed
                problem = self._check_data_uri(u) if u.startswith("data:") else self._check_own(u)
                if problem is not None:
                    job.input_error = self._input_error(loc, u, problem)
                    break
            job.fetch_done_at = job.start_at
            return
        if self._closing or self._loop is None:
            return
        job._fetching = True
        self._spawn(self._fetch_inputs(job, urls))

    @staticmethod
    def _input_error(loc: list, url: str, problem: str) -> dict:
        typ = "image_load_error" if problem == "not an image" else "file_download_error"
        shown = url if not url.startswith("data:") or len(url) <= 80 else url[:64] + "..."
        return error_detail(typ, loc=tuple(loc), input=shown)

    @staticmethod
    def _check_data_uri(url: str) -> str | None:
        head, sep, data = url.partition(",")
        if not sep:
            return "not an image"
        try:
            raw = (
                base64.b64decode(data, validate=True)
                if head.endswith(";base64")
                else urllib.parse.unquote_to_bytes(data)
            )
        except (binascii.Error, ValueError):
            return "not an image"
        return None if is_image_bytes(raw) else "not an image"

    def _own_bytes(self, url: str) -> bytes | None:
        path = urllib.parse.urlsplit(url).path
        if path.startswith("/files/"):
            job, _ = self._result_file(path[len("/files/") :])
            return job.image_blob()[0] if job is not None else None
        up = self._uploads_by_path.get(path)
        return up.data if up is not None and up.available() else None

    def _check_own(self, url: str) -> str | None:
        data = self._own_bytes(url)
        if data is None:
            return "HTTP 404"
        return None if is_image_bytes(data) else "not an image"

    async def _fetch_inputs(self, job: Job, urls: list[tuple[list, str]]) -> None:
        error: dict | None = None
        try:
            for loc, url in urls:
                problem: str | None
                if url.startswith("data:"):
                    problem = self._check_data_uri(url)
                elif self._is_own(url):
                    problem = self._check_own(url)
                else:
                    problem = None
                    try:
                        assert self._session is not None
                        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=self.fetch_timeout)) as r:
                            if r.status != 200:
                                problem = f"HTTP {r.status}"
                            else:
                                data = await r.read()
                                if not is_image_bytes(data):
                                    problem = "not an image"
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:
                        problem = type(e).__name__
                if problem is not None:
                    error = self._input_error(loc, url, problem)
                    break
        finally:
            now = time.monotonic()
            job._fetching = False
            job.fetch_done_at = now
            finished = job._end is not None and job._end <= now  # stopped meanwhile
            if error is not None and not finished:
                job.input_error = error
            if not self._closing:
                self._end_changed(job)

    # -- HTTP plumbing -----------------------------------------------------------
    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(data, status=status, headers=headers)

    @staticmethod
    def _drop(request: web.Request) -> web.Response:
        tr = request.transport
        if tr is not None:
            tr.abort()
        # The connection is gone; aiohttp discards this response.
        return web.Response(status=500)

    @staticmethod
    def _malformed(request: web.Request) -> web.Response:
        tr = request.transport
        if tr is not None:
            tr.write(MALFORMED_ANSWER)
            tr.close()
        # The connection is closing; aiohttp discards this response.
        return web.Response(status=500)

    @staticmethod
    def _ingress(code: int) -> web.Response:
        reason = _INGRESS_REASON[code]
        html = (
            f"<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
            f"<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
            "</body>\r\n</html>\r\n"
        )
        return web.Response(status=code, text=html, content_type="text/html")

    def _auth_ok(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Key {self.key}"

    def _classify(self, path: str) -> tuple[str, str | None, str | None]:
        """-> (op, request id, submit endpoint)."""
        if path.startswith("/files/"):
            return "file", path[len("/files/") :].split("_")[0], None
        if path == "/rest/storage/auth/token":
            return "storage_token", None, None
        if path == "/rest/storage/upload/initiate":
            return "storage_initiate", None, None
        if path == "/cdn3/files/upload":
            return "upload", None, None
        if path.startswith("/gcs-upload/"):
            return "upload_put", None, None
        if _UPLOADED_RE.match(path):
            return "uploaded_file", None, None
        m = _REQ_RE.match(path)
        if m:
            rest = m.group("rest") or ""
            op = {"": "result", "/status": "status", "/status/stream": "stream", "/cancel": "cancel"}[rest]
            return op, m.group("id"), None
        if path.strip("/") in ENDPOINTS:
            return "submit", None, path.strip("/")
        return "unknown", None, None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        method = request.method
        op, req_id, endpoint = self._classify(path)
        body_json: Any = None
        raw = b""
        if request.can_read_body:
            raw = await request.read()
            if op not in ("upload", "upload_put"):
                try:
                    body_json = _json.loads(raw) if raw else None
                except ValueError:
                    body_json = None
        rec = Recorded(
            op=op,
            method=method,
            path=path,
            query=dict(request.query),
            headers=dict(request.headers),
            json=body_json,
            request_id=req_id,
        )
        self.requests.append(rec)
        recorded, self._recorded_event = self._recorded_event, asyncio.Event()
        recorded.set()
        auth = request.headers.get("Authorization", "")
        if op in CDN_OPS and auth.startswith("Key "):
            self.violations.append(f"fal key sent to the CDN / upload host: {method} {path}")

        fault = self._faults[op].popleft() if op in self._faults and self._faults[op] else None
        after: Fault | None = None
        if fault is not None:
            kind = fault.status
            if kind == "drop":
                return self._drop(request)
            if kind == "malformed":
                return self._malformed(request)
            if kind == "hang":
                assert self._closing_event is not None
                await self._closing_event.wait()
                return self._drop(request)
            if kind in INGRESS_FAULTS:
                code = int(str(kind).rsplit("_", 1)[1])
                rec.status = code
                return self._ingress(code)
            if kind == "proxy_504_after_record":
                after = fault
            elif kind == "500_after_record":
                after = Fault(
                    500,
                    fault.json
                    if fault.json is not None
                    else {"detail": "Internal Server Error", "error_type": "internal_error"},
                    {"X-Fal-Error-Type": "internal_error", **(fault.headers or {})},
                )
            elif isinstance(kind, int):
                if kind >= 500 and op in ACTING_OPS:
                    after = fault
                else:
                    rec.status = kind
                    return self._json(
                        fault.json if fault.json is not None else {"detail": "Injected fault"},
                        status=kind,
                        headers={"x-fal-request-id": req_id or str(uuid.uuid4()), **(fault.headers or {})},
                    )

        resp = await self._route(request, rec, op, endpoint, raw, body_json)
        if fault is not None and fault.status == "hang_after":
            rec.status = None
            assert self._closing_event is not None
            await self._closing_event.wait()
            return self._drop(request)
        if fault is not None and fault.status == "drop_after":
            rec.status = None
            if isinstance(resp, web.Response):
                return self._drop(request)
            # stream already prepared: just cut the connection
            if request.transport is not None:
                request.transport.abort()
            return resp
        if after is not None and after.status == "proxy_504_after_record":
            rec.status = 504
            return web.Response(status=504, text=PROXY_TIMEOUT_BODY, content_type="text/plain")
        if after is not None:
            code = int(after.status)
            rec.status = code
            return self._json(
                after.json if after.json is not None else {"detail": "Injected fault"},
                status=code,
                headers={"x-fal-request-id": rec.request_id or str(uuid.uuid4()), **(after.headers or {})},
            )
        rec.status = resp.status
        if (
            op not in ("file", "uploaded_file", "upload_put")
            and not resp.prepared
            and "x-fal-request-id" not in resp.headers
        ):
            resp.headers["x-fal-request-id"] = rec.request_id or str(uuid.uuid4())
        return resp

    async def _route(
        self, request: web.Request, rec: Recorded, op: str, endpoint: str | None, raw: bytes, body_json: Any
    ) -> web.StreamResponse:
        method = request.method
        if op == "unknown":
            self.violations.append(f"unknown route {method} {request.path}")
            return self._json({"detail": "Not Found"}, 404)
        if method not in _METHODS[op]:
            self.violations.append(f"wrong method {method} {request.path} ({op})")
            return self._json({"detail": "Method Not Allowed"}, 405)
        if op == "file":
            return await self._file(request)
        if op == "uploaded_file":
            return await self._uploaded_file(request)
        if op == "upload_put":
            return self._upload_put(request, raw)
        if op == "upload":
            return self._upload(request, raw)
        if not self._auth_ok(request):
            detail = (
                "Missing authorization header"
                if "Authorization" not in request.headers
                else "Invalid authorization credentials"
            )
            return self._json({"detail": detail}, 401)
        if op in LOCKED_OPS and self.locked_reason is not None:
            return self._json({"detail": self.lock_message}, 403)
        if op == "submit":
            return self._submit(request, rec, endpoint or "", raw, body_json)
        if op == "storage_token":
            return self._storage_token(request)
        if op == "storage_initiate":
            return self._storage_initiate(request, body_json)
        m = _REQ_RE.match(request.path)
        assert m is not None
        if m.group("app") != APP_ID:
            self.violations.append(
                f"request URL not under {APP_ID}/requests (rebuilt from the endpoint id?): {method} {request.path}"
            )
        job = self.jobs.get(m.group("id"))
        if job is None or m.group("app") != APP_ID:
            if op == "cancel":
                return self._json({"status": "NOT_FOUND"}, 404)
            return self._json({"detail": "Request not found"}, 404)
        if op == "status":
            now = time.monotonic()
            st = job.status_object(now, _wants_logs(request))
            return self._json(st, status=200 if st["status"] == COMPLETED else 202)
        if op == "stream":
            return await self._stream(request, job)
        if op == "result":
            return self._result(job)
        return self._cancel(job)

    # -- queue handlers -------------------------------------------------------------------
    def _submit(self, request: web.Request, rec: Recorded, endpoint: str, raw: bytes, body: Any) -> web.Response:
        if body is None and raw.strip() != b"null":
            # Not JSON at all: refused by the gateway (plausible; not documented, P2 §1.1).
            return self._json(
                {"detail": [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid", "input": None}]}, 422
            )
        errors = validate_payload(endpoint, body, self.allow_data_uri)
        if errors and self.validate_at_submit:  # NOT what fal does (P2 §0.2)
            return self._json({"detail": errors}, 422)
        job = self._new_job(endpoint, body, dict(request.headers), errors)
        rec.request_id = job.request_id
        return self._json(
            {
                "status": IN_QUEUE,
                "request_id": job.request_id,
                **job.urls(),
                "logs": None,
                "metrics": {},
                "queue_position": job.queue_position_at(time.monotonic()),
            },
            headers={"x-fal-request-id": job.request_id},
        )

    async def _stream(self, request: web.Request, job: Job) -> web.StreamResponse:
        mode = job.script.stream_mode
        if mode == "unavailable":
            return self._json({"detail": "Method Not Allowed"}, 405, headers={"x-fal-request-id": job.request_id})
        with_logs = _wants_logs(request)
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-fal-request-id": job.request_id,
            },
        )
        await resp.prepare(request)
        assert self._closing_event is not None
        if mode == "stall":
            await self._closing_event.wait()
            return resp
        try:
            if mode == "comments_only":
                while not self._closing:
                    try:
                        async with asyncio.timeout(self.keepalive_interval):
                            await self._closing_event.wait()
                    except TimeoutError:
                        pass
                    if self._closing:
                        break
                    await resp.write(b": ping\n\n")
                return resp
            self._stream_jobs[job] = self._stream_jobs.get(job, 0) + 1
            try:
                await self._stream_events(resp, request, job, mode, with_logs)
            finally:
                n = self._stream_jobs.get(job, 1) - 1
                if n <= 0:
                    self._stream_jobs.pop(job, None)
                else:
                    self._stream_jobs[job] = n
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        return resp

    async def _stream_events(
        self, resp: web.StreamResponse, request: web.Request, job: Job, mode: str, with_logs: bool
    ) -> None:
        last: str | None = None
        last_write = time.monotonic()
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
                    return
                if obj["status"] == COMPLETED:
                    await resp.write_eof()
                    return
            now = time.monotonic()
            nxt = job.next_change_after(now)
            ping_at = last_write + self.keepalive_interval
            wake = ping_at if nxt is None else min(nxt, ping_at)
            if not ev.is_set():
                try:
                    async with asyncio.timeout(max(0.0, wake - now) + 0.001):
                        await ev.wait()
                except TimeoutError:
                    pass
            if time.monotonic() >= last_write + self.keepalive_interval:
                await resp.write(b": ping\n\n")
                last_write = time.monotonic()

    def _result(self, job: Job) -> web.Response:
        now = time.monotonic()
        hdr = {"x-fal-request-id": job.request_id}
        if job.state_at(now) != COMPLETED:
            # Not documented; P2 §1.4: a client handles this text, code unknown.
            return self._json({"detail": "Request is still in progress"}, 400, headers=hdr)
        ttl = job.script.result_ttl
        end = job._end
        if ttl is not None and end is not None and now > end + ttl:
            return self._json({"detail": "Request not found"}, 404, headers=hdr)
        fail = job.failure
        if fail is not None:
            status, body, headers = fail
            return self._json(body, status=status, headers={**hdr, **headers})
        return self._json(job.output(), headers=hdr)

    def _cancel(self, job: Job) -> web.Response:
        now = time.monotonic()
        st = job.state_at(now)
        if st == COMPLETED:
            return self._json({"status": "ALREADY_COMPLETED"}, 400)  # code unconfirmed (P2 §1.5)
        if job.cancel_requested_at is None:
            job.cancel_requested_at = now
        if st == IN_QUEUE:
            self._remove_queued(job, now)
            return self._json({"status": "OK"}, 202)  # "removed from the queue" (P2 §0.4)
        if job.script.cancellation_aware and job._stop_at is None:
            job._stop_at = now + job.script.cancel_delay
            self._end_changed(job)
        return self._json({"status": "CANCELLATION_REQUESTED"}, 202)

    def _result_file(self, name: str) -> tuple[Job | None, int]:
        rid, _, rest = name.partition("_")
        job = self.jobs.get(rid)
        idx_s = rest.rsplit(".", 1)[0]
        if (
            job is None
            or job.files_deleted
            or job.completed_at is None
            or job.failure is not None
            or not idx_s.isdigit()
            or int(idx_s) >= job.num_images
            or name != job.file_name(int(idx_s))
        ):
            return None, 0
        return job, int(idx_s)

    async def _send_bytes(self, request: web.Request, data: bytes, ctype: str) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": ctype})
        resp.content_length = len(data)
        await resp.prepare(request)
        if request.method == "GET":
            view = memoryview(data)
            try:
                for off in range(0, len(data), self.chunk_size):
                    await resp.write(view[off : off + self.chunk_size])
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                return resp
        await resp.write_eof()
        return resp

    async def _file(self, request: web.Request) -> web.StreamResponse:
        job, _ = self._result_file(request.path[len("/files/") :])
        if job is None:
            return self._json({"detail": "File not found"}, 404)
        data, _, _ = job.image_blob()
        return await self._send_bytes(request, data, "image/png" if job.image_format == "png" else "image/jpeg")

    # -- storage handlers (P1 §2, P2 §3) ------------------------------------------------
    def _storage_token(self, request: web.Request) -> web.Response:
        if request.query.get("storage_type") != "fal-cdn-v3":
            # strict: fal-client and fal-js always send this; other values are not documented
            return self._json(
                {
                    "detail": [
                        {
                            "loc": ["query", "storage_type"],
                            "msg": "Input should be 'fal-cdn-v3'",
                            "type": "literal_error",
                            "input": request.query.get("storage_type"),
                        }
                    ]
                },
                422,
            )
        token = secrets.token_urlsafe(24)
        now = time.time()
        self._tokens[token] = now + self.token_ttl
        return self._json(
            {
                "token": token,
                "token_type": "Bearer",
                "base_url": self.cdn_upload_url,
                "expires_at": _iso(now + self.token_ttl),
                "created_at": _iso(now),
            }
        )

    def _token_ok(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        exp = self._tokens.get(token)
        return scheme == "Bearer" and exp is not None and time.time() < exp

    @staticmethod
    def _lifecycle(request: web.Request) -> tuple[Any, float | None]:
        raw = request.headers.get("X-Fal-Object-Lifecycle-Preference") or request.headers.get("X-Fal-Object-Lifecycle")
        if raw is None:
            return None, None
        try:
            pref = _json.loads(raw)
        except ValueError:
            return raw, None
        secs = pref.get("expiration_duration_seconds") if isinstance(pref, dict) else None
        if isinstance(secs, (int, float)) and not isinstance(secs, bool):
            return pref, time.monotonic() + float(secs)
        return pref, None

    def _store(
        self, path: str, data: bytes, ctype: str, name: str | None, lifecycle: Any, expires_at: float | None, via: str
    ) -> Upload:
        up = Upload(
            url=f"{self.base_url}{path}",
            data=data,
            content_type=ctype,
            file_name=name,
            lifecycle=lifecycle,
            via=via,
            expires_at=expires_at,
        )
        self.uploads.append(up)
        self._uploads_by_path[path] = up
        return up

    def _upload(self, request: web.Request, raw: bytes) -> web.Response:
        if not self._token_ok(request):
            return self._json({"detail": "Invalid or expired token"}, 401)
        if self.locked_reason is not None:
            return self._json({"detail": self.lock_message}, 403)
        ctype = request.headers.get("Content-Type") or "application/octet-stream"
        name = request.headers.get("X-Fal-File-Name")
        key = secrets.token_hex(8)
        fname = _safe_name(name) if name else key + _EXT.get(ctype.split(";")[0].strip(), ".bin")
        lifecycle, expires_at = self._lifecycle(request)
        up = self._store(f"/cdn3/files/{key}/{fname}", bytes(raw), ctype, name, lifecycle, expires_at, "cdn-v3")
        return self._json({"access_url": up.url})

    def _storage_initiate(self, request: web.Request, body: Any) -> web.Response:
        if request.query.get("storage_type") not in ("gcs", "fal-cdn-v3"):
            return self._json(
                {
                    "detail": [
                        {
                            "loc": ["query", "storage_type"],
                            "msg": "Input should be 'gcs' or 'fal-cdn-v3'",
                            "type": "literal_error",
                            "input": request.query.get("storage_type"),
                        }
                    ]
                },
                422,
            )
        if not isinstance(body, dict):
            return self._json(
                {
                    "detail": [
                        {
                            "loc": ["body"],
                            "msg": "Input should be a valid dictionary",
                            "type": "dict_type",
                            "input": body,
                        }
                    ]
                },
                422,
            )
        name = body.get("file_name") or "upload.bin"
        ctype = body.get("content_type") or "application/octet-stream"
        uid = secrets.token_hex(8)
        sig = secrets.token_hex(16)
        lifecycle, expires_at = self._lifecycle(request)
        path = f"/storage/files/{uid}/{_safe_name(str(name))}"
        self._gcs_pending[uid] = {
            "sig": sig,
            "path": path,
            "name": name,
            "content_type": ctype,
            "lifecycle": lifecycle,
            "expires_at": expires_at,
        }
        return self._json(
            {
                "upload_url": f"{self.base_url}/gcs-upload/{uid}?X-Goog-Signature={sig}",
                "file_url": f"{self.base_url}{path}",
            }
        )

    def _upload_put(self, request: web.Request, raw: bytes) -> web.Response:
        uid = request.path[len("/gcs-upload/") :]
        pend = self._gcs_pending.get(uid)
        if pend is None or request.query.get("X-Goog-Signature") != pend["sig"]:
            return web.Response(status=403, text="SignatureDoesNotMatch", content_type="text/plain")
        del self._gcs_pending[uid]
        ctype = request.headers.get("Content-Type") or pend["content_type"]
        self._store(pend["path"], bytes(raw), ctype, pend["name"], pend["lifecycle"], pend["expires_at"], "gcs")
        return web.Response(status=200)

    async def _uploaded_file(self, request: web.Request) -> web.StreamResponse:
        up = self._uploads_by_path.get(request.path)
        if up is None or not up.available():
            return self._json({"detail": "File not found"}, 404)
        return await self._send_bytes(request, up.data, up.content_type)


def _wants_logs(request: web.Request) -> bool:
    return request.query.get("logs", "0").lower() in ("1", "true", "yes")
