"""A cap on bytes held in memory at once, shared by all jobs."""

from __future__ import annotations


class ByteBudget:
    """Counts the bytes taken and not yet given back. `try_take` refuses rather than waits, so
    a caller over the cap goes another way (result images go through DATA_DIR instead)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def try_take(self, amount: int) -> bool:
        if self._used + amount > self._limit:
            return False
        self._used += amount
        return True

    def take(self, amount: int) -> None:
        """Count bytes that are held already, whether or not they fit."""
        self._used += amount

    def give_back(self, amount: int) -> None:
        self._used -= amount
        assert self._used >= 0, "gave back more than was taken"
