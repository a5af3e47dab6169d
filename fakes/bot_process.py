"""Runs the real bot as a user does (`python bot.py`), pointed at the fakes by its environment."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Fast timings for tests and the sandbox; each is an ordinary setting of the bot (see README).
FAST_SETTINGS = {
    "EDIT_INTERVAL": "0.05",
    "POLL_INTERVAL": "0.05",
    "RETRY_BASE_DELAY": "0.02",
    "FAL_READ_TIMEOUT": "1.0",
    "FAL_STREAM_EVENT_TIMEOUT": "1.0",
    "LOG_LEVEL": "DEBUG",
}


class BotProcess:
    """One `python bot.py` process. Its log goes to `log_path` so a failing test can show it."""

    def __init__(
        self,
        *,
        discord_api_base: str,
        discord_token: str,
        fal_url: str,
        fal_key: str,
        data_dir: Path,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / "bot.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "FAL_"))},
            "PYTHONUNBUFFERED": "1",
            "DISCORD_TOKEN": discord_token,
            "FAL_KEY": fal_key,
            "DISCORD_API_BASE": discord_api_base,
            "FAL_QUEUE_URL": fal_url,
            "DATA_DIR": str(data_dir),
            **FAST_SETTINGS,
            **(settings or {}),
        }
        self.process: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        return [sys.executable, str(PROJECT_ROOT / "bot.py")]

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - opening a local log file is instant
            self.process = await asyncio.create_subprocess_exec(
                *self.command(),
                cwd=self.data_dir,
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, as `docker stop` sends; returns the exit code."""
        return await self._end(signal.SIGTERM, timeout)

    async def kill(self) -> int:
        """SIGKILL: no chance to clean up, as in a crash or power loss."""
        return await self._end(signal.SIGKILL, 5.0)

    async def _end(self, signum: int, timeout: float) -> int:
        process = self.process
        if process is None:
            return 0
        if process.returncode is not None:
            return process.returncode
        process.send_signal(signum)
        try:
            return await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"the bot did not exit within {timeout}s of signal {signum}") from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
