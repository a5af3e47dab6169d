"""How the log is written: discord.py's text lines for people (`LOG_FORMAT=text`), or one JSON
object per line for log collectors (`LOG_FORMAT=json`). Either way every record passes
`RedactingFilter` first, so no secret or interaction token reaches the output."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

from .redact import RedactingFilter

LOG_FORMATS = ("text", "json")

# Attributes given with `extra=` that become JSON fields. A fixed list: anything else a record
# carries (discord.py's and aiohttp's own attributes included) stays out of the output.
EXTRA_FIELDS = ("job_id", "guild_id", "request_id", "state")

# discord.py and aiosqlite log request URLs and SQL parameters at DEBUG, and those carry
# interaction tokens; Pillow logs every image chunk. They log at INFO whatever the level, and the
# handler keeps to the level: discord.py's warnings for the 429s it waits out must reach
# RateLimitCounter (services/metrics.py) even where LOG_LEVEL=ERROR leaves them out of the log.
NOISY_LOGGERS = ("discord", "aiosqlite", "PIL")

# discord.utils.setup_logging's format, without its colours.
TEXT_FORMAT = "[{asctime}] [{levelname:<8}] {name}: {message}"
TEXT_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message, the
    allowlisted extras, and the traceback as `exception`. Newlines inside values are escaped
    by the encoder, so a record is always exactly one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            if name in record.__dict__:
                entry[name] = record.__dict__[name]
        # RedactingFilter leaves the redacted traceback in exc_text; format it only if no
        # filter ran (the same caching logging.Formatter does).
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra such as a JobState or a Path is written as its text.
        return json.dumps(entry, ensure_ascii=False, default=str)


class _RootHandler(logging.StreamHandler):
    """The handler configure_logging installs, told apart so a second call replaces it."""


def configure_logging(level: int, fmt: str, *, secrets: Iterable[str]) -> None:
    """Log to stderr at `level` in the format `fmt` ("text" or "json"), with `secrets` and
    interaction tokens redacted, and the noisy loggers kept at INFO whatever `level` says (the
    handler drops what is below `level`). Replaces what an earlier call installed; other
    handlers are left alone."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = _RootHandler(sys.stderr)
    handler.setLevel(level)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, TEXT_DATE_FORMAT, style="{"))
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _RootHandler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
