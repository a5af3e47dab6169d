"""Keeping secrets out of the log: the fal key, the bot token, interaction tokens and passwords.

aiohttp puts the whole request (headers, so the fal key, and URLs, which for interaction
webhooks carry the token) into the text of some of its exceptions. Errors are therefore logged
through `describe_error`, and every log record passes `RedactingFilter` as a last line of defence.

The bot token and the fal key are long and random: they are replaced wherever they appear.
Passwords (DATABASE_URL's) are masked by where they stand, whatever their value: a URL's
`user:password@` and a `password=` parameter. Replacing a password's text everywhere would hide
unrelated words when it is a short one (compose's default database password is `kontext`, the
bot's own name, in its commands and every settings line), and would miss the password spelt
otherwise (percent-encoded in a URL); its place in a URL or a parameter does neither.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import aiohttp

# Interaction and webhook routes carry a token after the id: /interactions/<id>/<token>/...
_TOKEN_IN_URL = re.compile(r"(/(?:webhooks|interactions)/\d+/)[A-Za-z0-9_.\-]{20,}")
# A URL's user:password part, up to the last @ before its path (a password may hold an @).
_CREDENTIALS_IN_URL = re.compile(r"(://)[^\s/?#]*@")
# A password as a parameter: a URL's ?password=, libpq's password=, PGPASSWORD=.
_PASSWORD_PARAMETER = re.compile(r"(password=)('[^']*'|[^\s&'\"]*)", re.IGNORECASE)


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


def without_credentials(text: str) -> str:
    """`text` with any URL's user:password part and any password parameter masked."""
    return _PASSWORD_PARAMETER.sub(r"\1***", _CREDENTIALS_IN_URL.sub(r"\1***@", text))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return without_credentials(_TOKEN_IN_URL.sub(r"\1***", text))


def one_line(text: str, secrets: Iterable[str] = (), limit: int = 300) -> str:
    """Words from outside the bot (fal's detail in an answer) fit for a line an operator reads:
    secrets and passwords masked, line breaks and control characters as spaces, at most `limit`
    characters."""
    printable = "".join(c if c.isprintable() else " " for c in redact(text, secrets))
    line = " ".join(printable.split())
    return line if len(line) <= limit else f"{line[: limit - 1]}…"


class RedactingFilter(logging.Filter):
    """Replaces the given secrets, any interaction token in a URL and any password with *** in
    every record, its arguments and its traceback."""

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
