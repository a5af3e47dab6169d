"""What moderators and members set (a server's policy and recipes, a member's defaults): read on
every command, changed rarely. The store keeps what it read here and forgets an entry when this
process changes it or another process sharing the database says it did."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar, get_args

SettingKind = Literal["policy", "recipes", "defaults"]
# Entries kept per kind (servers, members): beyond, the oldest is read again when next needed.
MAX_ENTRIES = 10_000

T = TypeVar("T")


class SettingsCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: dict[SettingKind, dict[int, Any]] = {kind: {} for kind in get_args(SettingKind)}
        self._max_entries = max_entries
        # Counts every forget: a value read while one happened may predate the change, so it
        # is returned but not kept.
        self._forgets = 0

    async def get(self, kind: SettingKind, key: int, read: Callable[[], Awaitable[T]]) -> T:
        """The kept value, or `read()`'s (kept unless a change was signalled meanwhile)."""
        entries = self._entries[kind]
        if key in entries:
            value: T = entries[key]
            return value
        forgets = self._forgets
        value = await read()
        if forgets == self._forgets:
            if len(entries) >= self._max_entries:
                del entries[next(iter(entries))]
            entries[key] = value
        return value

    def forget(self, kind: SettingKind, key: int) -> None:
        self._forgets += 1
        self._entries[kind].pop(key, None)

    def forget_all(self) -> None:
        """Changes may have been missed (the notifications were cut off): read everything again."""
        self._forgets += 1
        for entries in self._entries.values():
            entries.clear()
