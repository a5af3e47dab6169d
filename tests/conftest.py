"""Shared fixtures: a fake Discord and a fake fal on 127.0.0.1, the real bot process, and a real
PostgreSQL server for the tests of the shared store."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import discord
import pytest
import yarl

from fakes.discord_fake import FakeDiscord
from fakes.postgres_server import PostgresMissing, PostgresServer
from fakes.world import DISCORD_TOKEN, FAL_KEY, World, running_world


@pytest.fixture
async def world(tmp_path, request) -> AsyncIterator[World]:
    async with running_world(tmp_path / "data") as world:
        yield world
        # Nothing the bot sent may be something real Discord (or fal) would reject.
        assert world.discord.violations == [], world.discord.violations
        assert world.fal.violations == [], world.fal.violations
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            for bot in world.bots:
                print(f"--- {bot.log_path}\n{bot.log_text()[-8000:]}")
    # After every end-to-end test, every bot process it ran has stopped: its whole log must be
    # free of the secrets and of every interaction token the fake Discord issued.
    secrets = {"FAL_KEY": FAL_KEY, "DISCORD_TOKEN": DISCORD_TOKEN}
    secrets |= {f"token of interaction {h.id}": h.token for h in world.discord.interactions.values()}
    for log_path in sorted({bot.log_path for bot in world.bots}):
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        leaked = [name for name, secret in secrets.items() if secret in log]
        assert leaked == [], f"{log_path} contains {leaked}"


@pytest.fixture
async def fake(monkeypatch) -> AsyncIterator[FakeDiscord]:
    """The fake Discord alone, for its own tests with a discord.py client in the test."""
    f = FakeDiscord(token="test-token")
    await f.start()
    # After an Invalid Session discord.py identifies again on DEFAULT_GATEWAY: point it here.
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(f.gateway_url))
    try:
        yield f
    finally:
        await f.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole run. Without the server binaries the tests that need
    it are skipped, except under CI, where a green run must not hide a missing server."""
    try:
        server = PostgresServer()
    except PostgresMissing as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{exc}: CI must run the PostgreSQL tests")
        pytest.skip(str(exc))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def database_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database of the session's server."""
    return await postgres_server.new_database()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
