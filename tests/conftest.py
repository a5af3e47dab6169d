"""Shared fixtures: a fake Discord and a fake fal on 127.0.0.1, and the real bot process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fakes.world import World, running_world


@pytest.fixture
async def world(tmp_path, request) -> AsyncIterator[World]:
    async with running_world(tmp_path / "data") as world:
        yield world
        # Nothing the bot sent may be something real Discord would reject.
        assert world.discord.violations == [], world.discord.violations
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(world.bot.log_text()[-8000:] if world.bot else "")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
