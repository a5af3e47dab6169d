"""The image's health check, run as Docker would run it against a live OpsServer (there is no
Docker engine here), and what the Dockerfile and docker-compose.yml promise about it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.metrics import Metrics
from services.ops_server import HealthReport, OpsServer

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (keyword, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def healthcheck_command() -> list[str]:
    (arguments,) = [args for keyword, args in instructions() if keyword == "HEALTHCHECK"]
    options, command = arguments.split(" CMD ", 1)
    assert "--timeout=5s" in options.split()
    argv = json.loads(command)  # exec form: no shell, which the slim image's check does not need
    assert isinstance(argv, list) and argv[:2] == ["python", "-c"]
    return argv


def compose_healthcheck_command() -> list[str]:
    (line,) = re.findall(r"^\s+test: (\[.*\])$", (ROOT / "docker-compose.yml").read_text(), flags=re.MULTILINE)
    argv = json.loads(line)  # written as a JSON array, which is also a YAML flow sequence
    assert isinstance(argv, list)
    return argv


def compose_entries() -> dict[str, str]:
    """docker-compose.yml's top-level `x-` entries and its services, each by name, as their text
    (the test dependencies have no YAML parser; the file keeps to a plain layout)."""
    entries: dict[str, list[str]] = {}
    top = name = ""
    for line in (ROOT / "docker-compose.yml").read_text().splitlines():
        if match := re.match(r"([\w-]+):", line):
            top = name = match[1]
        elif top == "services" and (match := re.match(r"  ([\w-]+):", line)):
            name = match[1]
        entries.setdefault(name, []).append(line)
    return {name: "\n".join(lines) for name, lines in entries.items() if name not in ("", "services", "volumes")}


async def run_check(port: int) -> int:
    _, code = healthcheck_command()[1:]
    # A proxy set for the bot's own traffic must not catch the check.
    env = {"PATH": os.environ.get("PATH", ""), "HTTP_PORT": str(port), "http_proxy": "http://127.0.0.1:9"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), timeout=10)


@pytest.fixture
async def server() -> AsyncIterator[tuple[OpsServer, list[HealthReport]]]:
    """An endpoint whose readiness always fails (fal down) and whose liveness is the last report."""
    reports = [HealthReport({"running": True}, [])]

    async def fal_down() -> HealthReport:
        return HealthReport({"fal": False}, ["fal: the last call failed 3s ago and none succeeded since"])

    async def liveness() -> HealthReport:
        return reports[-1]

    ops = OpsServer("127.0.0.1", 0, Metrics(), fal_down, liveness)
    await ops.start()
    yield ops, reports
    await ops.stop()


async def test_the_check_asks_liveness_and_fails_on_503(server):
    """What acts on the check restarts the container, so it follows /livez, not /healthz: an
    outage at fal is not cured by a restart."""
    ops, reports = server
    assert await run_check(ops.port) == 0
    reports.append(HealthReport({"running": False}, ["the bot is stopping"]))
    assert await run_check(ops.port) == 1


async def test_the_check_fails_when_nothing_listens():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert await run_check(port) == 1


def test_compose_runs_the_same_check():
    assert compose_healthcheck_command() == ["CMD", *healthcheck_command()]


def test_the_image_serves_the_ops_endpoint_on_8080_as_a_non_root_user():
    found = instructions()
    env = " ".join(args for keyword, args in found if keyword == "ENV").split()
    assert {"HTTP_HOST=0.0.0.0", "HTTP_PORT=8080"} <= set(env)
    assert ("EXPOSE", "8080") in found
    users = [args for keyword, args in found if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("COPY", "services ./services") in found and ("COPY", "locales ./locales") in found
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(pattern.startswith(("services", "locales")) for pattern in ignored)
    compose = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r'^\s+- "127\.0\.0\.1:8080:8080"$', compose, flags=re.MULTILINE)


def test_every_bot_in_compose_has_its_data_dir_on_its_volume():
    """DATA_DIR=./data from .env would make a bot write to /app/data, which is not the volume
    (and not writable by the bot's user)."""
    entries = compose_entries()
    assert {"HTTP_HOST: 0.0.0.0", 'HTTP_PORT: "8080"', "DATA_DIR: /data"} <= {
        line.strip() for line in entries["x-container-env"].splitlines()
    }
    assert "<<: *container-env" in entries["x-cluster-env"]
    bots = {name: entry for name, entry in entries.items() if "<<: *bot" in entry}
    assert set(bots) == {"bot", "bot-0", "bot-1"}
    for name, entry in bots.items():
        assert re.search(r"^\s+- [\w-]+:/data$", entry, flags=re.MULTILINE), name
        assert re.search(r"environment: \*container-env$|environment:\n\s+<<: \*cluster-env$", entry, re.M), name


def test_each_compose_set_up_starts_only_its_own_services():
    """With `bot` outside every profile, `--profile cluster up` started it too: a process on
    SQLite running every shard next to the cluster's."""
    entries = compose_entries()
    profiles = {
        name: re.findall(r"^    profiles: \[(.*)\]$", entry, flags=re.MULTILINE)
        for name, entry in entries.items()
        if not name.startswith("x-")
    }
    assert profiles == {
        "bot": ["single"],
        "db": ["cluster"],
        "bot-0": ["cluster"],
        "bot-1": ["cluster"],
        "nirn": ["proxy"],
    }
    documents = (ROOT / "README.md").read_text() + (ROOT / "docker-compose.yml").read_text()
    commands = re.findall(r"docker compose (?!logs)[^\n`]*", documents)
    assert commands and all("--profile" in command for command in commands), commands
