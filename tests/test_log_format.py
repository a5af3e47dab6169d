"""The log as written to stderr, in both formats: parseable, with ids as fields, and redacted."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.job import JobState
from services.log_format import NOISY_LOGGERS, configure_logging
from services.metrics import Metrics, RateLimitCounter

ROOT = Path(__file__).resolve().parents[1]

SECRET = "fal-key-0123456789abcdef"
TOKEN = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDpzZWNyZXQ" * 2
TOKEN_URL = f"https://discord.com/api/v10/webhooks/1122334455/{TOKEN}/messages/@original"

log = logging.getLogger("kontext.test")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def log_everything() -> None:
    """Records of every shape: plain, with ids, multi-line, with a secret in the arguments and
    in a traceback, and a token in a URL."""
    log.info("plain")
    log.info("job %d queued", 17, extra={"job_id": 17, "guild_id": 987654321012345678, "state": JobState.QUEUED})
    log.warning("line one\nline two")
    log.error("fal answered 401 for key %s", SECRET)
    log.info("PATCH %s responded with 404", TOKEN_URL)
    try:
        raise RuntimeError(f"request to {TOKEN_URL} with key {SECRET} failed")
    except RuntimeError:
        log.exception("delivery failed", extra={"job_id": 18, "request_id": "fal-req-1"})


def test_json_every_record_is_one_object_on_one_line(capsys):
    configure_logging(logging.INFO, "json", secrets=[SECRET])
    log_everything()
    entries = json_lines(capsys.readouterr().err)
    assert [entry["message"] for entry in entries][:3] == ["plain", "job 17 queued", "line one\nline two"]
    assert len(entries) == 6
    for entry in entries:
        assert entry["logger"] == "kontext.test"
        assert {"time", "level", "logger", "message"} <= entry.keys()
        moment = datetime.fromisoformat(str(entry["time"]))
        assert moment.utcoffset() == timedelta(0)
        assert abs((datetime.now(UTC) - moment).total_seconds()) < 60
    assert [entry["level"] for entry in entries] == ["INFO", "INFO", "WARNING", "ERROR", "INFO", "ERROR"]


def test_json_ids_land_as_fields_and_nothing_else_does(capsys):
    configure_logging(logging.INFO, "json", secrets=[])
    log_everything()
    log.info("with a prompt", extra={"prompt": "a cat", "user_token": "x", "job_id": 3})
    entries = json_lines(capsys.readouterr().err)
    queued = entries[1]
    assert queued["job_id"] == 17
    assert queued["guild_id"] == 987654321012345678  # a snowflake survives as an exact integer
    assert queued["state"] == "queued"
    assert "request_id" not in queued
    failed = entries[5]
    assert (failed["job_id"], failed["request_id"]) == (18, "fal-req-1")
    assert "Traceback (most recent call last)" in str(failed["exception"])
    assert "RuntimeError" in str(failed["exception"])
    assert entries[-1] == {k: entries[-1][k] for k in ("time", "level", "logger", "message", "job_id")}
    assert "exception" not in entries[0]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_and_interaction_tokens_are_redacted(capsys, fmt):
    configure_logging(logging.INFO, fmt, secrets=[SECRET, ""])
    log_everything()
    output = capsys.readouterr().err
    assert "Traceback (most recent call last)" in output
    assert "/webhooks/1122334455/***/messages/@original" in output
    assert SECRET not in output
    assert TOKEN not in output
    assert TOKEN[:20] not in output


def test_text_lines_look_like_discord_py_s(capsys):
    configure_logging(logging.INFO, "text", secrets=[])
    log.warning("hello")
    assert re.fullmatch(
        r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[WARNING \] kontext\.test: hello\n", capsys.readouterr().err
    )


def test_noisy_loggers_stay_at_info_whatever_the_level(capsys):
    configure_logging(logging.DEBUG, "json", secrets=[])
    log.debug("ours")
    logging.getLogger("discord.http").debug("PATCH %s with token", TOKEN_URL)
    logging.getLogger("aiosqlite").debug("executing UPDATE jobs SET interaction_token = ?")
    logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR'")
    logging.getLogger("discord.client").info("logging in")
    messages = [entry["message"] for entry in json_lines(capsys.readouterr().err)]
    assert messages == ["ours", "logging in"]


@pytest.mark.parametrize("level", [logging.ERROR, logging.CRITICAL])
def test_the_level_decides_what_is_written_not_what_is_counted(capsys, level):
    """LOG_LEVEL=ERROR dropped discord.py's 429 warnings before RateLimitCounter saw them: the
    metric stayed at 0."""
    metrics = Metrics()
    counter = RateLimitCounter(metrics)
    logging.getLogger("discord").addHandler(counter)
    try:
        configure_logging(level, "json", secrets=[])
        logging.getLogger("discord.http").warning("We are being rate limited. GET /x responded with 429.")
        logging.getLogger("discord.client").critical("shard lost")
    finally:
        logging.getLogger("discord").removeHandler(counter)
    assert b"kontext_discord_rate_limited_total 1.0" in metrics.exposition()
    assert [entry["message"] for entry in json_lines(capsys.readouterr().err)] == ["shard lost"]


def test_configuring_again_replaces_the_handler_and_keeps_others(capsys):
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    configure_logging(logging.INFO, "text", secrets=[])
    configure_logging(logging.INFO, "json", secrets=[])
    log.info("once")
    assert [entry["message"] for entry in json_lines(capsys.readouterr().err)] == ["once"]
    assert other in logging.getLogger().handlers


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        configure_logging(logging.INFO, "yaml", secrets=[])


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_passwords_are_masked_where_they_stand_whatever_their_value(capsys, fmt):
    configure_logging(logging.INFO, fmt, secrets=[SECRET])
    log.error("cannot connect to postgresql://kontext:p@ss%2Fw0rd@db1:5432,db2:5432/kontext")
    log.error("cannot connect to postgresql:///kontext?host=/run/pg&password=hush&sslmode=require")
    log.error("libpq says: host=db user=kontext password='two words' dbname=kontext")
    output = capsys.readouterr().err
    assert "postgresql://***@db1:5432,db2:5432/kontext" in output
    assert "?host=/run/pg&password=***&sslmode=require" in output
    assert "user=kontext password=*** dbname=kontext" in output
    assert not any(word in output for word in ("p@ss", "w0rd", "hush", "two words"))


def test_a_short_database_password_hides_no_other_word_of_the_log(tmp_path):
    """compose's default database password is the bot's own name: the settings line, commands
    and paths keep it, and the DSN shows no password."""
    env = {
        "PATH": "/usr/bin:/bin",
        "DISCORD_TOKEN": "discord-secret",
        "FAL_KEY": "fal-secret",
        "DATA_DIR": str(tmp_path / "kontext-data"),
        "DATABASE_URL": "postgresql://kontext:kontext@127.0.0.1:1/kontext",  # nothing listens: it stops at once
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "bot.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert "database_url='postgresql://***@127.0.0.1:1/kontext'" in done.stderr
    assert "kontext-data" in done.stderr and "kontext:kontext" not in done.stderr


def is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def run_bot(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "DISCORD_TOKEN": "discord-secret", "FAL_KEY": "fal-secret"}
    env |= {"DATA_DIR": str(tmp_path / "data"), **settings}
    return subprocess.run(
        [sys.executable, str(ROOT / "bot.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )


def test_a_start_up_failure_is_one_json_line_naming_the_cause(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = run_bot(tmp_path, LOG_FORMAT="json", HTTP_PORT=port)
    not_json = [line for line in done.stderr.splitlines() if line.strip() and not is_json(line)]
    assert not not_json, f"{len(not_json)} non-JSON lines, exit {done.returncode}: {not_json[-1]}"
    last = json.loads(done.stderr.splitlines()[-1])
    assert last["level"] == "ERROR" and f"127.0.0.1:{port} (HTTP_HOST, HTTP_PORT)" in last["message"]
    assert "exception" not in last and done.returncode == 3


@pytest.mark.parametrize(
    "settings,cause",
    [
        ({"DISCORD_API_BASE": "http://127.0.0.1:9/api/v10"}, "ClientConnectorError to 127.0.0.1:9"),
        ({"HTTP_PORT": "8080", "HTTP_HOST": "no-such-host.invalid"}, "no-such-host.invalid:8080 (HTTP_HOST"),
    ],
    ids=["discord-unreachable", "http-host-unknown"],
)
def test_a_start_up_failure_is_one_text_line_naming_the_cause(tmp_path, settings, cause):
    done = run_bot(tmp_path, **settings)
    assert "Traceback" not in done.stderr and "discord-secret" not in done.stderr
    assert done.returncode == 3 and cause in done.stderr.splitlines()[-1], done.stderr
