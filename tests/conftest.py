"""Shared fixtures: a fake Discord and a fake fal on 127.0.0.1, and the real bot process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fakes.world import DISCORD_TOKEN, FAL_KEY, World, running_world


@pytest.fixture
async def world(tmp_path, request) -> AsyncIterator[World]:
    async with running_world(tmp_path / "data") as world:
        yield world
        # Nothing the bot sent may be something real Discord (or fal) would reject.
        assert world.discord.violations == [], world.discord.violations
        assert world.fal.violations == [], world.fal.violations
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(world.bot.log_text()[-8000:] if world.bot else "")
    # After every end-to-end test, every bot process it ran has stopped: its whole log must be
    # free of the secrets and of every interaction token the fake Discord issued.
    log = (tmp_path / "data" / "bot.log").read_text(errors="replace") if world.bot else ""
    secrets = {"FAL_KEY": FAL_KEY, "DISCORD_TOKEN": DISCORD_TOKEN}
    secrets |= {f"token of interaction {h.id}": h.token for h in world.discord.interactions.values()}
    leaked = [name for name, secret in secrets.items() if secret in log]
    assert leaked == [], f"the bot log contains {leaked}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
