"""Keeping secrets out of the log: the fal key, the bot token and interaction tokens.

aiohttp puts the whole request (headers, so the fal key, and URLs, which for interaction
webhooks carry the token) into the text of some of its exceptions. Errors are therefore logged
through `describe_error`, and every log record passes `RedactingFilter` as a last line of defence.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import aiohttp

# Interaction and webhook routes carry a token after the id: /interactions/<id>/<token>/...
_TOKEN_IN_URL = re.compile(r"(/(?:webhooks|interactions)/\d+/)[A-Za-z0-9_.\-]{20,}")


def describe_error(exc: BaseException) -> str:
    """An exception as a log line may show it."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__} {exc.status}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{type(exc).__name__} to {exc.host}:{exc.port}"
    if isinstance(exc, aiohttp.ClientError):
        return type(exc).__name__
    text = redact(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return _TOKEN_IN_URL.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """Replaces the given secrets and any interaction token in a URL with *** in every record,
    its arguments and its traceback."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message, self._secrets)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
