"""fal's file storage, used the way fal's official clients use it (fal-queue-api.md, part 1 §2):
a short-lived CDN token from the REST host, then one POST of the bytes to the upload host the
token names; the older "initiate, then PUT" flow when that fails. The returned URL is public
and outlives Discord's signed attachment URLs, so jobs can be submitted, retried and re-rolled
from it for as long as the file is kept (`lifetime_seconds`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from .fal_queue import FalAccountLocked, FalAuthError, FalCalls, FalError
from .redact import describe_error
from .retry import Backoff, retrying

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

# Refresh a CDN token this long before fal says it expires.
TOKEN_MARGIN_SECONDS = 60


class FalUploadFailed(FalError):
    """fal's storage did not take the file."""

    code = "upload_failed"


@dataclass(frozen=True)
class _CdnToken:
    token: str
    token_type: str
    upload_base: str
    expires_at: float  # unix time


def _expiry(value: Any) -> float:
    """fal sends `expires_at` as an ISO 8601 time; a number is taken as unix seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return time.time() + 300  # unknown: a short, safe lifetime


class FalStorage:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        rest_url: str,
        key: str,
        *,
        backoff: Backoff,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._rest_url = rest_url.rstrip("/")
        self._auth = {"Authorization": f"Key {key}"}
        self._backoff = backoff
        # Every call, to the REST host and to the upload hosts alike, as the queue client's.
        self.calls = FalCalls(metrics)
        self._token: _CdnToken | None = None
        self._token_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<FalStorage {self._rest_url}>"

    async def upload(
        self, data: bytes, content_type: str, file_name: str, *, lifetime_seconds: int, deadline: float
    ) -> str:
        """Store `data` at fal and return its URL. Raises FalAccountLocked (uploads are refused
        with submits while the account is locked), FalAuthError or FalUploadFailed."""
        lifecycle = json.dumps({"expiration_duration_seconds": lifetime_seconds})
        try:
            return await self._retry(lambda: self._upload_to_cdn(data, content_type, file_name, lifecycle), deadline)
        except (TimeoutError, FalUploadFailed, aiohttp.ClientError) as exc:
            log.info("fal CDN upload failed (%s); trying fal's storage initiate flow", describe_error(exc))
        try:
            return await self._retry(lambda: self._upload_initiated(data, content_type, file_name, lifecycle), deadline)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise FalUploadFailed(f"could not upload to fal: {describe_error(exc)}") from None

    async def _retry(self, call: Any, deadline: float) -> str:
        def transient(exc: BaseException) -> bool:
            # "Try again" answers as fal-client retries them for uploads: 408, 409, 429 and 5xx.
            return isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError)) or (
                isinstance(exc, FalUploadFailed) and ((exc.status or 0) >= 500 or exc.status in (408, 409, 429))
            )

        url: str = await retrying(
            call, retryable=transient, backoff=self._backoff, deadline=deadline, what="fal upload", attempts=3
        )
        return url

    async def _cdn_token(self) -> _CdnToken:
        async with self._token_lock:
            token = self._token
            if token is None or token.expires_at - TOKEN_MARGIN_SECONDS <= time.time():
                body = await self._call(
                    "POST", f"{self._rest_url}/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json_body={}
                )
                try:
                    token = _CdnToken(
                        str(body["token"]),
                        str(body.get("token_type") or "Bearer"),
                        str(body["base_url"]).rstrip("/"),
                        _expiry(body.get("expires_at")),
                    )
                except (KeyError, TypeError):
                    raise FalUploadFailed("fal's token answer lacks a token or base_url") from None
                self._token = token
            return token

    async def _upload_to_cdn(self, data: bytes, content_type: str, file_name: str, lifecycle: str) -> str:
        token = await self._cdn_token()
        headers = {
            "Authorization": f"{token.token_type} {token.token}",
            "Content-Type": content_type,
            "X-Fal-File-Name": file_name,
            "X-Fal-Object-Lifecycle-Preference": lifecycle,
        }
        status, body, error = await self._send(
            "POST", f"{token.upload_base}/files/upload", with_key=False, data=data, headers=headers
        )
        if status == 401:
            self._token = None  # expired early: the next try fetches a new one
        if error is not None:
            raise FalUploadFailed(f"fal's CDN answered {status}", status=status, detail=body)
        url = body.get("access_url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url:
            raise FalUploadFailed("fal's CDN answer has no access_url")
        return url

    async def _upload_initiated(self, data: bytes, content_type: str, file_name: str, lifecycle: str) -> str:
        body = await self._call(
            "POST",
            f"{self._rest_url}/storage/upload/initiate",
            params={"storage_type": "gcs"},
            json_body={"file_name": file_name, "content_type": content_type},
            headers={"X-Fal-Object-Lifecycle-Preference": lifecycle},
        )
        try:
            upload_url, file_url = str(body["upload_url"]), str(body["file_url"])
        except (KeyError, TypeError):
            raise FalUploadFailed("fal's initiate answer lacks upload_url or file_url") from None
        status, _, error = await self._send(
            "PUT", upload_url, with_key=False, data=data, headers={"Content-Type": content_type}
        )
        if error is not None:
            raise FalUploadFailed(f"fal's storage answered {status} to the upload", status=status)
        return file_url

    async def _call(
        self, method: str, url: str, *, params: Any, json_body: Any, headers: dict[str, str] | None = None
    ) -> Any:
        status, body, error = await self._send(
            method, url, with_key=True, params=params, json=json_body, headers={**self._auth, **(headers or {})}
        )
        if isinstance(error, (FalAccountLocked, FalAuthError)):
            raise error
        if error is not None:
            raise FalUploadFailed(f"fal's storage answered {status}", status=status, detail=body)
        return body

    async def _send(self, method: str, url: str, *, with_key: bool, **request: Any) -> tuple[int, Any, FalError | None]:
        """One call, noted in `calls`: its status, its body and the error the answer means."""
        try:
            async with self._session.request(method, url, **request) as response:
                body = await self._body(response)
        except (TimeoutError, aiohttp.ClientError):
            self.calls.unanswered()
            raise
        return response.status, body, self.calls.answer(response.status, body, response.headers, with_key=with_key)

    @staticmethod
    async def _body(response: aiohttp.ClientResponse) -> Any:
        text = await response.text(errors="replace")
        try:
            return json.loads(text) if text else None
        except ValueError:
            return text
