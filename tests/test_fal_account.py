"""How long the bot stops submitting after fal's "User is locked" (services/fal_account.py)."""

from __future__ import annotations

import logging

import pytest

from services.fal_account import AccountGate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusals_of_submits_sent_together_are_one_lock():
    clock = Clock()
    gate = AccountGate(30, clock=clock)
    for _ in range(4):  # four submits on their way when the credit ran out
        gate.locked("Exhausted balance")
    clock.now += 29
    assert gate.refuses()
    clock.now += 2
    assert not gate.refuses()  # 30 s, not 240 s


def test_a_lock_seen_after_a_pause_doubles_the_next_up_to_ten_minutes():
    clock = Clock()
    gate = AccountGate(30, clock=clock)
    pauses = []
    for _ in range(7):
        gate.locked("Exhausted balance")
        start = clock.now
        while gate.refuses():
            clock.now += 1
        pauses.append(clock.now - start)
    assert pauses == [30, 60, 120, 240, 480, 600, 600]
    gate.accepted()
    gate.locked("Exhausted balance")
    assert gate.refuses() and gate.locked_reason == "Exhausted balance"
    clock.now += 30
    assert not gate.refuses()  # taken again: the pause starts over


def test_a_first_pause_longer_than_ten_minutes_is_kept():
    clock = Clock()
    gate = AccountGate(900, clock=clock)
    gate.locked("User is locked")
    clock.now += 900
    gate.locked("User is locked")
    clock.now += 899
    assert gate.refuses()
    clock.now += 1
    assert not gate.refuses()


def test_fals_words_for_a_lock_stay_one_line_in_the_log(caplog: pytest.LogCaptureFixture):
    """fal's detail is text from outside the bot: a line break in it must not start a log line
    of its own (in the text format, a forged entry)."""
    gate = AccountGate(30, clock=Clock())
    with caplog.at_level(logging.ERROR, logger="services.fal_account"):
        gate.locked("Exhausted balance\n[2026-12-04 12:00:00] [INFO    ] kontext: all is well")
    (record,) = caplog.records
    assert "\n" not in record.getMessage()
    assert gate.locked_reason == "Exhausted balance [2026-12-04 12:00:00] [INFO ] kontext: all is well"
