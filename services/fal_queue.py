"""fal's queue protocol and nothing else: submit, follow status, fetch result, cancel, download.

Every failure surfaces as a `FalError` subclass whose `code` the Discord side turns into words.
What is retried follows how fal behaves (fal-queue-api.md, part 2):

- A submit is resent only when fal surely did not record it: no connection was made, a 408 or
  429, or an ingress error (502-504 from fal's front proxy: no `x-fal-request-id`, and nginx's
  page as the body, as fal-client checks). Anything else after the request went out (a 500, a
  409, another proxy's 504, a lost answer) may have been recorded and billed: it is
  `FalSubmitUncertain`, never resent.
- A completed job's error is final: fal answers every later result GET the same way, 5xx
  included, so it is reported at once in fal's own words.
- Transport failures, 408/409/429 and ingress errors while following a job are retried (a few
  times for the status of a job fal has not started, twice as many once it runs, and so is
  billed, and for its result's fetch and download), then reported as `FalUnavailable`.

Follow-up calls use the URLs fal returned on submit, never URLs built from the endpoint id (fal
drops the endpoint's sub-path from them), and the key is sent only to the configured queue host.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import aiohttp
import yarl

from .images import SNIFF_BYTES, sniff_image_type
from .redact import describe_error
from .retry import Backoff, retrying

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

QueueState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
_STATES = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
# After this many broken status streams for one job, poll for the rest of it.
MAX_BROKEN_STREAMS = 3
# "A few times": attempts of an idempotent call (status, result, cancel, download) through
# transport failures and ingress errors before fal counts as unavailable.
FOLLOW_ATTEMPTS = 6
# A made (and billed) result, which fal keeps for an hour, and the status of a job fal runs (and
# bills, whatever the bot does): tried through an outage of about a minute and a half with the
# default backoff (0.5 s doubling to 10 s), as fal-client's 10 tries.
RESULT_ATTEMPTS = 12
# fal's detail type for a refusal by its safety system.
CONTENT_POLICY = "content_policy_violation"
# What fal's 403 says when the account is out of credit or locked by fal.
ACCOUNT_LOCKED_PREFIX = "user is locked"


class FalError(Exception):
    """Base of every failure talking to fal; `code` names the kind for the user-facing message."""

    code = "fal_error"

    def __init__(self, message: str, *, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail

    @property
    def messages(self) -> list[str]:
        """fal's own words: its `detail` is a list of `{loc, msg, type}` or a plain string."""
        detail = self.detail
        if isinstance(detail, list):
            return [str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail]
        return [str(detail)] if detail else []


class FalRejected(FalError):
    """fal refused the job or its input (a 4xx, usually 422 with a `detail` list): final."""

    code = "fal_rejected"


class FalContentPolicy(FalRejected):
    """fal's safety system refused the prompt or image."""

    code = "content_policy"


class FalJobFailed(FalError):
    """The model failed the job (a stored 5xx such as `downstream_service_unavailable` or
    `generation_timeout`): final, fal answers every later result GET the same."""

    code = "fal_failed"


class FalCancelled(FalError):
    """fal stopped the job because it was asked to (a cancellation-aware app answers 499)."""

    code = "fal_cancelled"


class FalAuthError(FalError):
    """fal did not accept the API key (401, or a 403 other than a lock): the operator's problem."""

    code = "fal_auth"


class FalAccountLocked(FalError):
    """fal locked the bot's account (403 "User is locked", e.g. out of credit): nothing can be
    submitted until the operator tops it up. Status GETs keep working."""

    code = "fal_account_locked"

    @property
    def reason(self) -> str:
        return str(self.detail or "User is locked")


class FalUnavailable(FalError):
    """fal could not be reached or kept answering 429 or ingress errors, through the retries."""

    code = "fal_unavailable"


class FalSubmitUncertain(FalError):
    """The submit may or may not have been recorded by fal, so it is not resent (no job billed
    twice)."""

    code = "submit_uncertain"


class FalResultExpired(FalError):
    """fal no longer has the result (kept an hour after the job, 6 minutes if 10 KB or more; a
    Kontext result, its images' addresses, is smaller) or its file on the CDN."""

    code = "result_expired"


class FalBadOutput(FalError):
    """fal's output was not what the model promises (not an image, too large, malformed)."""

    code = "bad_output"


class FalResultRefused(FalError):
    """fal's CDN refuses the bot the result's file for good (a 4xx: outputs the account's or the
    request's access controls keep private, fal-queue-api.md part 2 §1.7): made and billed, and
    never to be had by asking again."""

    code = "result_refused"


class _Transient(FalError):
    """An answer that says nothing was done (408, 409, 429, an ingress error): retry a call
    that changes nothing at fal; a submit only if it `surely_not_recorded`."""

    def __init__(self, message: str, *, status: int | None = None, surely_not_recorded: bool = False) -> None:
        super().__init__(message, status=status)
        self.surely_not_recorded = surely_not_recorded


@dataclass(frozen=True)
class FalRequest:
    """A submitted job: fal's id and the three URLs fal returned for following it."""

    request_id: str
    status_url: str
    response_url: str
    cancel_url: str


@dataclass(frozen=True)
class QueueStatus:
    state: QueueState
    queue_position: int | None = None
    error: str | None = None
    error_type: str | None = None
    # Logs are for our log file only; they do not change what a member sees.
    logs: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_json(cls, data: Any) -> QueueStatus:
        if not isinstance(data, dict):
            raise FalBadOutput("a status is not a JSON object")
        state = data.get("status")
        if state not in _STATES:
            raise FalBadOutput(f"unknown queue status {state!r}")
        position = data.get("queue_position") if state == "IN_QUEUE" else None
        entries = data.get("logs")
        logs = tuple(
            str(entry.get("message", ""))
            for entry in (entries if isinstance(entries, list) else ())
            if isinstance(entry, dict)
        )
        error, error_type = data.get("error"), data.get("error_type")
        return cls(
            state,
            position if isinstance(position, int) and not isinstance(position, bool) else None,
            str(error) if error else None,
            str(error_type) if error_type else None,
            logs,
        )


class DownloadSink(Protocol):
    """Where a downloaded image goes as it arrives."""

    def write(self, chunk: bytes) -> None: ...

    def discard(self) -> None:
        """Forget what was written: the download failed or starts again."""


async def _copy_image(content: aiohttp.StreamReader, sink: DownloadSink, max_bytes: int) -> tuple[int, str]:
    """Copy a downloaded image to `sink` piece by piece as the network delivers it (no re-cutting
    into fixed chunks, which copies); returns its size and sniffed type."""
    size = 0
    head = b""
    content_type: str | None = None
    async for chunk in content.iter_any():
        if content_type is None:
            head += chunk[:SNIFF_BYTES]
            if len(head) >= SNIFF_BYTES:
                content_type = sniff_image_type(head)
                if content_type is None:
                    raise FalBadOutput("result file is not an image")
        size += len(chunk)
        if size > max_bytes:
            raise FalBadOutput(f"result image is over {max_bytes} bytes")
        sink.write(chunk)
    if content_type is None:
        content_type = sniff_image_type(head)  # a whole image shorter than the sniffed bytes
        if content_type is None:
            raise FalBadOutput("result file is empty" if not head else "result file is not an image")
    return size, content_type


def _detail_types(detail: Any) -> set[str]:
    if isinstance(detail, list):
        return {str(item.get("type")) for item in detail if isinstance(item, dict)}
    return set()


def error_for(status: int, body: Any, headers: Mapping[str, str]) -> FalError:
    """What an HTTP error from fal means. Ingress errors (502-504 without `x-fal-request-id`,
    from a proxy in front of fal's app) and 408, 409 and 429 are transient; the rest came from
    fal's app layer."""
    detail = body.get("detail") if isinstance(body, dict) else body
    if status in (408, 409, 429) or (status in (502, 503, 504) and "x-fal-request-id" not in headers):
        # fal-client resends on these; a submit only when fal's own front proxy said it.
        surely = status in (408, 429) or (status != 409 and "nginx" in str(body).lower())
        return _Transient(f"fal answered {status} before taking the request", status=status, surely_not_recorded=surely)
    if status == 401:
        return FalAuthError("fal refused the API key (401)", status=status, detail=detail)
    if status == 403:
        if isinstance(detail, str) and detail.lower().startswith(ACCOUNT_LOCKED_PREFIX):
            return FalAccountLocked(f"fal locked the account: {detail}", status=status, detail=detail)
        return FalAuthError("fal refused the API key (403)", status=status, detail=detail)
    if CONTENT_POLICY in _detail_types(detail):
        return FalContentPolicy("fal's content policy refused the job", status=status, detail=detail)
    if status == 499:
        return FalCancelled("fal cancelled the job", status=status, detail=detail)
    if status >= 500:
        return FalJobFailed(f"fal answered {status}", status=status, detail=detail)
    return FalRejected(f"fal answered {status}", status=status, detail=detail)


# Failures before the request went out: the connection was refused, or not made in time
# (`sock_connect`: aiohttp's ConnectionTimeoutError is a timeout, not a ClientConnectorError).
NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


class FalCalls:
    """What the calls to one of fal's services (its queue, its storage) showed, for /healthz and
    /metrics: when fal's app last answered one and when one last went unanswered (monotonic
    time), fal's refusal of FAL_KEY while no call with the key has succeeded since, and every
    call that did not succeed, counted by kind.

    An answer from fal's app layer shows fal is up, even one refusing the call or giving the
    job's failure (a 504 generation_timeout the model ran into): only calls fal's app never
    answered (transport, ingress) count against its health."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        self.answered_at: float | None = None
        self.unanswered_at: float | None = None
        # The status of fal's refusal (401, or a 403 other than a lock).
        self.key_refused: int | None = None

    def unanswered(self) -> None:
        """A call failed before any answer came: a connection or read that failed."""
        self.unanswered_at = time.monotonic()
        self._count("transport")

    def answer(self, status: int, body: Any, headers: Mapping[str, str], *, with_key: bool = True) -> FalError | None:
        """Note the answer to a call; returns the error it means, None for a success. `with_key`:
        the call carried FAL_KEY. A refusal of one that did not (a CDN upload with its short-lived
        token, a signed upload URL) says nothing about the key: it counts as a rejected call."""
        if status < 300:
            self.answered_at = time.monotonic()
            if with_key:
                self.key_refused = None
            return None
        error = error_for(status, body, headers)
        # fal's app layer answered (its 5xx carry x-fal-request-id), whatever it said.
        if not isinstance(error, _Transient) and (status < 500 or "x-fal-request-id" in headers):
            self.answered_at = time.monotonic()
            kind = error.code
            if isinstance(error, FalAuthError):
                if with_key:
                    self.key_refused = status
                else:
                    kind = FalRejected.code
        else:
            self.unanswered_at = time.monotonic()
            kind = "ingress"
        self._count(kind)
        return error

    def _count(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.fal_error(kind)


def _is_transport_failure(exc: BaseException) -> bool:
    return isinstance(exc, (_Transient, aiohttp.ClientError, asyncio.TimeoutError))


class FalQueueClient:
    """A client for `queue.fal.run` (or a stand-in at `base_url`) on the bot's HTTP session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        key: str,
        *,
        backoff: Backoff,
        poll_interval: float = 1.0,
        use_stream: bool = True,
        stream_event_timeout: float = 20.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._origin = yarl.URL(self._base_url).origin()
        self._origin_prefix = f"{self._origin}/"
        self._auth = {"Authorization": f"Key {key}"}
        self._backoff = backoff
        self._poll_interval = poll_interval
        self._use_stream = use_stream
        # A status stream with no event for this long is checked with one poll and reopened.
        self._event_timeout = stream_event_timeout
        self.calls = FalCalls(metrics)

    def __repr__(self) -> str:  # the key stays out of every repr and log line
        return f"<FalQueueClient {self._base_url}>"

    def _check_host(self, url: str) -> str:
        """The key goes only to the queue host: a follow-up URL elsewhere is not followed."""
        # The prefix settles the usual case without parsing (several calls per job).
        if url.startswith(self._origin_prefix):
            return url
        try:
            origin: yarl.URL | None = yarl.URL(url).origin()
        except (TypeError, ValueError):  # not an absolute URL at all
            origin = None
        if origin != self._origin:
            raise FalBadOutput(f"fal returned a URL outside {self._origin}")
        return url

    async def _json_call(self, method: str, url: str, *, json_body: Any = None, params: Any = None) -> Any:
        """One queue API call: the parsed body of a 2xx answer, or a FalError."""
        try:
            async with self._session.request(
                method, self._check_host(url), json=json_body, params=params, headers=self._auth
            ) as response:
                text = await response.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError):
            self.calls.unanswered()
            raise
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = text
        error = self.calls.answer(response.status, body, response.headers)
        if error is not None:
            raise error
        return body

    async def _retried(self, call: Any, *, what: str, deadline: float, attempts: int | None = FOLLOW_ATTEMPTS) -> Any:
        """Run an idempotent call through transport failures and transient answers; once they
        run out, fal is unavailable."""
        try:
            return await retrying(
                call,
                retryable=_is_transport_failure,
                backoff=self._backoff,
                deadline=deadline,
                what=what,
                attempts=attempts,
            )
        except (TimeoutError, _Transient, aiohttp.ClientError) as exc:
            raise FalUnavailable(f"{what}: {describe_error(exc)}") from None

    async def submit(
        self, endpoint: str, payload: dict[str, Any], *, deadline: float
    ) -> tuple[FalRequest, QueueStatus]:
        """POST the job. Resent only when fal surely did not record it (see the module doc)."""
        url = f"{self._base_url}/{endpoint.strip('/')}"

        async def attempt() -> Any:
            try:
                return await self._json_call("POST", url, json_body=payload)
            except _Transient as exc:
                if exc.surely_not_recorded:
                    raise  # safe to send again
                raise FalSubmitUncertain(f"fal answered {exc.status} to the submit", status=exc.status) from None
            except NOT_SENT:
                raise  # no connection was made: safe to send again
            except FalJobFailed as exc:
                raise FalSubmitUncertain(f"fal answered {exc.status} to the submit", status=exc.status) from None
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise FalSubmitUncertain(f"submit outcome unknown: {describe_error(exc)}") from None

        def not_recorded(exc: BaseException) -> bool:
            return isinstance(exc, (_Transient, *NOT_SENT))

        try:
            body = await retrying(
                attempt, retryable=not_recorded, backoff=self._backoff, deadline=deadline, what="fal submit"
            )
        except (_Transient, *NOT_SENT) as exc:
            raise FalUnavailable(f"could not submit to fal: {describe_error(exc)}") from None
        try:
            request = FalRequest(
                str(body["request_id"]),
                self._check_host(body["status_url"]),
                self._check_host(body["response_url"]),
                self._check_host(body["cancel_url"]),
            )
        except (KeyError, TypeError) as exc:
            raise FalBadOutput(f"submit answer lacks {exc}") from None
        status = (
            QueueStatus.from_json(body) if body.get("status") else QueueStatus("IN_QUEUE", body.get("queue_position"))
        )
        return request, status

    async def statuses(self, request: FalRequest, *, deadline: float) -> AsyncIterator[QueueStatus]:
        """Yield each change of the job's status until COMPLETED.

        Reads fal's server-sent status stream. When it breaks, or sends no event for a while
        (fal's keep-alive comments only show the connection lives), one status poll catches up
        and the stream is reopened; after three streams that broke or missed a change it polls
        for the rest of the job.
        """
        last: QueueStatus | None = None
        broken_streams = 0
        while True:
            streaming = self._use_stream and broken_streams < MAX_BROKEN_STREAMS
            source = self._stream(request) if streaming else self._poll(request, deadline, last)
            try:
                async for status in source:
                    if status != last:
                        last = status
                        yield status
                    if status.state == "COMPLETED":
                        return
                raise aiohttp.ClientPayloadError("status stream closed before COMPLETED")
            except _StreamUnsupported as exc:
                log.info("no status stream for %s (%s); polling", request.request_id, exc)
                broken_streams = MAX_BROKEN_STREAMS
                continue
            except _StreamQuiet:
                quiet = True
            except (TimeoutError, aiohttp.ClientError, ValueError, FalBadOutput) as exc:
                if not streaming:
                    raise
                quiet = False
                broken_streams += 1
                log.info(
                    "status stream for %s broke (%s); polling once and reconnecting",
                    request.request_id,
                    describe_error(exc),
                )
            status = await self.status(request, deadline=deadline, attempts=_status_attempts(last))
            if status != last:
                if quiet:  # the stream kept quiet through a change: it cannot be relied on
                    broken_streams += 1
                last = status
                yield status
            if status.state == "COMPLETED":
                return
            if not quiet:
                await asyncio.sleep(self._backoff.delay(broken_streams))

    async def status(self, request: FalRequest, *, deadline: float, attempts: int = FOLLOW_ATTEMPTS) -> QueueStatus:
        """One status poll, retried through transport failures (`attempts` calls at most)."""

        async def attempt() -> QueueStatus:
            try:
                return QueueStatus.from_json(await self._json_call("GET", request.status_url, params={"logs": "1"}))
            except FalJobFailed as exc:
                # A status GET changes nothing at fal: a 5xx here is worth another try.
                raise _Transient(f"status answered {exc.status}", status=exc.status) from None

        result: QueueStatus = await self._retried(attempt, what="fal status", deadline=deadline, attempts=attempts)
        return result

    async def _poll(self, request: FalRequest, deadline: float, last: QueueStatus | None) -> AsyncIterator[QueueStatus]:
        while True:
            status = last = await self.status(request, deadline=deadline, attempts=_status_attempts(last))
            yield status
            if status.state == "COMPLETED":
                return
            await asyncio.sleep(self._poll_interval)

    async def _stream(self, request: FalRequest) -> AsyncIterator[QueueStatus]:
        url = self._check_host(f"{request.status_url}/stream")
        headers = {**self._auth, "Accept": "text/event-stream"}
        loop = asyncio.get_running_loop()
        quiet_at = loop.time() + self._event_timeout
        async with contextlib.AsyncExitStack() as stack:
            # Its answer is awaited no longer than an event: a stream that never opens is broken
            # (a TimeoutError, polled around), not waited for as long as an ordinary call.
            async with asyncio.timeout_at(quiet_at):
                response = await stack.enter_async_context(
                    self._session.get(url, params={"logs": "1"}, headers=headers)
                )
            if response.status >= 300:
                raise _StreamUnsupported(f"status stream answered {response.status}")
            quiet_at = loop.time() + self._event_timeout
            # Read whatever has arrived (usually one whole event) rather than line by line:
            # a job's stream lives for its whole run, so its parsing is per-job CPU.
            decoder = codecs.getincrementaldecoder("utf-8")()
            pending = ""
            data_lines: list[str] = []
            while True:
                # Only the read is timed: a timeout around a `yield` would fire in the caller.
                try:
                    async with asyncio.timeout_at(quiet_at):
                        chunk = await response.content.readany()
                except TimeoutError:
                    raise _StreamQuiet() from None
                if not chunk:
                    return
                *lines, pending = (pending + decoder.decode(chunk)).split("\n")
                for line in lines:
                    line = line.rstrip("\r")
                    if line.startswith("data:"):
                        data_lines.append(line[5:].lstrip(" "))
                    elif not line and data_lines:
                        yield QueueStatus.from_json(json.loads("\n".join(data_lines)))
                        data_lines = []
                        quiet_at = loop.time() + self._event_timeout
                    # Comment lines (": ping") only keep the connection alive.

    async def result(self, request: FalRequest, *, deadline: float) -> Any:
        """The model's output. A failed job answers here with its error, the same at every GET:
        final, raised at once."""

        async def attempt() -> Any:
            try:
                return await self._json_call("GET", request.response_url)
            except (FalRejected, FalJobFailed) as exc:
                if exc.status in (404, 410):
                    raise FalResultExpired("fal no longer has this result", status=exc.status) from None
                raise

        return await self._retried(attempt, what="fal result", deadline=deadline, attempts=RESULT_ATTEMPTS)

    async def cancel(self, request: FalRequest, *, timeout: float = 15.0) -> str:
        """Ask fal to cancel; returns fal's answer: OK (it was queued: removed),
        CANCELLATION_REQUESTED (it runs: fal usually finishes it anyway), ALREADY_COMPLETED or
        NOT_FOUND. The body says which, whatever the HTTP code. Asking twice is harmless, so it
        is retried for up to `timeout` seconds."""

        async def attempt() -> str:
            async with self._session.put(self._check_host(request.cancel_url), headers=self._auth) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                answer = body.get("status") if isinstance(body, dict) else None
                if answer in ("OK", "CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"):
                    return str(answer)
                error = error_for(response.status, body, response.headers)
                raise _Transient(str(error), status=response.status) if isinstance(error, FalJobFailed) else error

        deadline = asyncio.get_running_loop().time() + timeout
        answer: str = await self._retried(attempt, what="fal cancel", deadline=deadline, attempts=None)
        return answer

    async def download(self, url: str, sink: DownloadSink, *, max_bytes: int, deadline: float) -> tuple[int, str]:
        """Fetch a result image into `sink` as it arrives, checking it is an image no larger
        than `max_bytes`; returns its size and sniffed content type. A retry starts the file
        again (the sink is told to discard what it got). The fal key is not sent: the files
        live on a public CDN."""

        async def attempt() -> tuple[int, str]:
            async with self._session.get(url) as response:
                if response.status in (404, 410):
                    # The CDN deleted the file: the same "gone" as an expired result.
                    raise FalResultExpired(
                        f"fal no longer has this result file ({response.status})", status=response.status
                    )
                if 400 <= response.status < 500 and response.status not in (408, 409, 429):
                    log.error(
                        "fal's CDN refused a result file (%d): the fal account may keep its results private",
                        response.status,
                    )
                    raise FalResultRefused(
                        f"fal's CDN refused the result file ({response.status})", status=response.status
                    )
                if response.status >= 300:
                    raise _Transient(f"fal's CDN answered {response.status}", status=response.status)
                if (response.content_length or 0) > max_bytes:
                    raise FalBadOutput(f"result image is {response.content_length} bytes, over {max_bytes}")
                try:
                    return await _copy_image(response.content, sink, max_bytes)
                except BaseException:
                    sink.discard()
                    raise

        size_and_type: tuple[int, str] = await self._retried(
            attempt, what="result download", deadline=deadline, attempts=RESULT_ATTEMPTS
        )
        return size_and_type


def _status_attempts(last: QueueStatus | None) -> int:
    """How often a status poll is tried: a job last seen running is billed whatever happens, so
    it is followed through an outage as long as its result's fetch would be."""
    return RESULT_ATTEMPTS if last is not None and last.state == "IN_PROGRESS" else FOLLOW_ATTEMPTS


class _StreamUnsupported(Exception):
    """The status stream answered with an error code: polling is the only way for this job."""


class _StreamQuiet(Exception):
    """The status stream sent no event for a while."""
