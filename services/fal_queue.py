"""fal's queue protocol and nothing else: submit, follow status, fetch result, cancel, download.

One aiohttp session for everything. Every failure surfaces as a `FalError` subclass whose `code`
the Discord side turns into words. Follow-up calls use the URLs fal returned on submit, never URLs
built from the endpoint id (fal drops the endpoint's sub-path from them).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp

from .images import SNIFF_BYTES, sniff_image_type
from .retry import Backoff, retrying

log = logging.getLogger(__name__)

QueueState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
_STATES = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CHUNK = 256 * 1024
# After this many broken status streams for one job, poll for the rest of it.
MAX_BROKEN_STREAMS = 3


class FalError(Exception):
    """Base of every failure talking to fal; `code` names the kind for the user-facing message."""

    code = "fal_error"

    def __init__(self, message: str, *, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class FalRejected(FalError):
    """fal refused the job or its result (4xx, usually 422 with `detail`); retrying will not help."""

    code = "fal_rejected"

    @property
    def messages(self) -> list[str]:
        """fal's `detail` as readable sentences: it is a list of `{loc,msg,type}` or a string."""
        if isinstance(self.detail, list):
            return [str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in self.detail]
        return [str(self.detail)] if self.detail else []


class FalContentPolicy(FalRejected):
    """fal's safety system refused the prompt or image."""

    code = "content_policy"


class FalAuthError(FalError):
    """fal did not accept the API key (401/403): an operator problem, not the member's."""

    code = "fal_auth"


class FalUnavailable(FalError):
    """fal answered 5xx/429 or could not be reached, and retries within the deadline ran out."""

    code = "fal_unavailable"


class FalSubmitUncertain(FalError):
    """The submit may or may not have reached fal, so it is not resent (no job billed twice)."""

    code = "submit_uncertain"


class FalResultExpired(FalError):
    """fal no longer has the result (results of 10 KB and more are kept only 6 minutes)."""

    code = "result_expired"


class FalBadOutput(FalError):
    """fal's output was not what the model promises (not an image, too large, malformed)."""

    code = "bad_output"


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
    def from_json(cls, data: dict[str, Any]) -> QueueStatus:
        state = data.get("status")
        if state not in _STATES:
            raise FalBadOutput(f"unknown queue status {state!r}")
        position = data.get("queue_position") if state == "IN_QUEUE" else None
        logs = tuple(str(entry.get("message", "")) for entry in data.get("logs") or () if isinstance(entry, dict))
        return cls(state, position, data.get("error"), data.get("error_type"), logs)


class DownloadSink(Protocol):
    """Where a downloaded image goes as it arrives."""

    def write(self, chunk: bytes) -> None: ...

    def discard(self) -> None:
        """Forget what was written: the download failed or starts again."""


async def _copy_image(content: aiohttp.StreamReader, sink: DownloadSink, max_bytes: int) -> tuple[int, str]:
    """Copy a downloaded image to `sink` as it arrives; returns its size and sniffed type."""
    size = 0
    content_type: str | None = None
    async for chunk in content.iter_chunked(_CHUNK):
        if content_type is None:
            content_type = sniff_image_type(chunk[:SNIFF_BYTES])
            if content_type is None:
                raise FalBadOutput("result file is not an image")
        size += len(chunk)
        if size > max_bytes:
            raise FalBadOutput(f"result image is over {max_bytes} bytes")
        sink.write(chunk)
    if content_type is None:
        raise FalBadOutput("result file is empty")
    return size, content_type


def _detail_of(body: Any) -> Any:
    return body.get("detail") if isinstance(body, dict) else body


def _error_for(status: int, body: Any) -> FalError:
    detail = _detail_of(body)
    if status in (401, 403):
        return FalAuthError(f"fal refused the API key ({status})", status=status, detail=detail)
    if status in _TRANSIENT_STATUSES or status >= 500:
        return FalUnavailable(f"fal answered {status}", status=status, detail=detail)
    if isinstance(detail, list) and any(
        isinstance(item, dict) and item.get("type") == "content_policy_violation" for item in detail
    ):
        return FalContentPolicy("fal's content policy refused the job", status=status, detail=detail)
    return FalRejected(f"fal answered {status}", status=status, detail=detail)


class _StreamUnsupported(Exception):
    """The status stream answered with an error code: polling is the only way for this job."""


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (FalUnavailable, aiohttp.ClientError, asyncio.TimeoutError))


class FalQueueClient:
    """A client for `queue.fal.run` (or a stand-in at `base_url`) sharing one HTTP session."""

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        backoff: Backoff,
        poll_interval: float = 1.0,
        use_stream: bool = True,
        stream_stall_timeout: float = 30.0,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._auth = {"Authorization": f"Key {key}"}
        self._backoff = backoff
        self._poll_interval = poll_interval
        self._use_stream = use_stream
        # fal sends a keep-alive comment every 15 s, so silence beyond this means a dead stream.
        # Every other call uses it too: an answer that stops arriving for that long is a dead
        # connection (retried, or for a submit reported as uncertain), never an endless wait.
        self._stall_timeout = stream_stall_timeout
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # the key stays out of every repr and log line
        return f"<FalQueueClient {self._base_url}>"

    async def open(self) -> None:
        # No connection cap: every followed job holds one stream open, and fal is the only host.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self._stall_timeout)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers={"User-Agent": "kontext-discord-bot"}
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FalQueueClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("FalQueueClient.open() was not called")
        return self._session

    async def _json_call(self, method: str, url: str, *, json_body: Any = None, params: Any = None) -> Any:
        """One queue API call: returns the parsed body of a 2xx answer, raises FalError otherwise."""
        async with self.session.request(method, url, json=json_body, params=params, headers=self._auth) as response:
            text = await response.text()
            try:
                body = json.loads(text) if text else None
            except ValueError:
                body = text
            if response.status >= 300:
                raise _error_for(response.status, body)
            return body

    async def submit(
        self, endpoint: str, payload: dict[str, Any], *, deadline: float
    ) -> tuple[FalRequest, QueueStatus]:
        """POST the job. Retried only when fal surely did not take it: the connection was never
        made, or fal answered with a 5xx/429 and no request. A lost answer is `FalSubmitUncertain`."""
        url = f"{self._base_url}/{endpoint.strip('/')}"

        async def attempt() -> Any:
            try:
                return await self._json_call("POST", url, json_body=payload)
            except aiohttp.ClientConnectorError:
                raise  # never connected: safe to retry
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise FalSubmitUncertain(f"submit outcome unknown: {exc!r}") from exc

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, (aiohttp.ClientConnectorError, FalUnavailable))

        try:
            body = await retrying(
                attempt, retryable=retryable, backoff=self._backoff, deadline=deadline, what="fal submit"
            )
        except aiohttp.ClientConnectorError as exc:
            raise FalUnavailable(f"could not connect to fal: {exc}") from exc
        try:
            request = FalRequest(body["request_id"], body["status_url"], body["response_url"], body["cancel_url"])
        except (KeyError, TypeError) as exc:
            raise FalBadOutput(f"submit answer lacks {exc}") from exc
        status = (
            QueueStatus.from_json(body) if body.get("status") else QueueStatus("IN_QUEUE", body.get("queue_position"))
        )
        return request, status

    async def statuses(self, request: FalRequest, *, deadline: float) -> AsyncIterator[QueueStatus]:
        """Yield each change of the job's status until COMPLETED.

        Reads fal's server-sent status stream; when it breaks, polls `status_url` once to catch up
        and reopens it; after three broken streams it polls for the rest of the job.
        """
        last: QueueStatus | None = None
        broken_streams = 0
        while True:
            streaming = self._use_stream and broken_streams < MAX_BROKEN_STREAMS
            source = self._stream(request) if streaming else self._poll(request, deadline)
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
            except (TimeoutError, aiohttp.ClientError) as exc:
                if not streaming:
                    raise FalUnavailable(f"lost track of {request.request_id}: {exc!r}") from exc
                broken_streams += 1
                log.info("status stream for %s broke (%r); polling once and reconnecting", request.request_id, exc)
                status = await self.status(request, deadline=deadline)
                if status != last:
                    last = status
                    yield status
                if status.state == "COMPLETED":
                    return
                await asyncio.sleep(self._backoff.delay(broken_streams))

    async def status(self, request: FalRequest, *, deadline: float) -> QueueStatus:
        """One status poll, retried on transient failures."""

        async def attempt() -> QueueStatus:
            return QueueStatus.from_json(await self._json_call("GET", request.status_url, params={"logs": "1"}))

        return await retrying(
            attempt, retryable=_is_transient, backoff=self._backoff, deadline=deadline, what="fal status"
        )

    async def _poll(self, request: FalRequest, deadline: float) -> AsyncIterator[QueueStatus]:
        while True:
            status = await self.status(request, deadline=deadline)
            yield status
            if status.state == "COMPLETED":
                return
            await asyncio.sleep(self._poll_interval)

    async def _stream(self, request: FalRequest) -> AsyncIterator[QueueStatus]:
        async with self.session.get(
            f"{request.status_url}/stream", params={"logs": "1"}, headers=self._auth
        ) as response:
            if response.status >= 300:
                raise _StreamUnsupported(f"status stream answered {response.status}")
            # Read whatever has arrived (usually one whole event) rather than line by line:
            # a job's stream lives for its whole run, so its parsing is per-job CPU.
            decoder = codecs.getincrementaldecoder("utf-8")()
            pending = ""
            data_lines: list[str] = []
            async for chunk in response.content.iter_any():
                *lines, pending = (pending + decoder.decode(chunk)).split("\n")
                for line in lines:
                    line = line.rstrip("\r")
                    if line.startswith("data:"):
                        data_lines.append(line[5:].lstrip(" "))
                    elif not line and data_lines:
                        yield QueueStatus.from_json(json.loads("\n".join(data_lines)))
                        data_lines = []
                    # Comment lines (": ping") only keep the connection alive.

    async def result(self, request: FalRequest, *, deadline: float) -> dict[str, Any]:
        """The model's output; fal answers a failed job here with its error (often 422 + detail)."""

        async def attempt() -> dict[str, Any]:
            try:
                body = await self._json_call("GET", request.response_url)
            except FalRejected as exc:
                if exc.status in (404, 410):
                    raise FalResultExpired("fal no longer has this result", status=exc.status) from exc
                raise
            if not isinstance(body, dict):
                raise FalBadOutput("result is not a JSON object")
            return body

        return await retrying(
            attempt, retryable=_is_transient, backoff=self._backoff, deadline=deadline, what="fal result"
        )

    async def cancel(self, request: FalRequest, *, timeout: float = 15.0) -> str:
        """Ask fal to cancel; returns fal's answer (OK, CANCELLATION_REQUESTED, ALREADY_COMPLETED,
        NOT_FOUND). fal answers the last two with a 4xx, which is not an error here. Asking twice
        is harmless, so 5xx/429 and broken connections are retried for up to `timeout` seconds."""

        async def attempt() -> str:
            async with self.session.put(request.cancel_url, headers=self._auth) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                answer = body.get("status") if isinstance(body, dict) else None
                if answer in ("OK", "CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"):
                    return answer
                raise _error_for(response.status, body)

        deadline = asyncio.get_running_loop().time() + timeout
        try:
            return await retrying(
                attempt, retryable=_is_transient, backoff=self._backoff, deadline=deadline, what="fal cancel"
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise FalUnavailable(f"could not reach fal to cancel {request.request_id}: {exc!r}") from exc

    async def download(self, url: str, sink: DownloadSink, *, max_bytes: int, deadline: float) -> tuple[int, str]:
        """Fetch a result image into `sink` as it arrives, checking it is an image no larger
        than `max_bytes`; returns its size and sniffed content type. A retry starts the file
        again (the sink is told to discard what it got). The fal key is not sent: the files
        live on a public CDN."""

        async def attempt() -> tuple[int, str]:
            async with self.session.get(url) as response:
                if response.status in (404, 410):
                    # The CDN deleted the file: the same "gone" as an expired result.
                    raise FalResultExpired(
                        f"fal no longer has this result file ({response.status})", status=response.status
                    )
                if response.status >= 300:
                    raise _error_for(response.status, None)
                if (response.content_length or 0) > max_bytes:
                    raise FalBadOutput(f"result image is {response.content_length} bytes, over {max_bytes}")
                try:
                    return await _copy_image(response.content, sink, max_bytes)
                except BaseException:
                    sink.discard()
                    raise

        return await retrying(
            attempt, retryable=_is_transient, backoff=self._backoff, deadline=deadline, what="result download"
        )
