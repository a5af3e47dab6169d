"""Whether fal takes jobs from the bot's account right now.

fal answers a submit (and an upload) with 403 "User is locked" when the account is out of
credit or locked by fal. Every job would then fail the same way, so after one such answer the
bot stops submitting for a while and refuses new requests up front (nothing billed, nothing
queued in vain), then lets jobs through again to find out; a lock seen after a pause doubles the
next one, up to ten minutes (or the first pause, if longer). Refusals of submits already on
their way during a pause are the same lock and change nothing. The operator is told once per
lock, in one ERROR line with fal's own words.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .redact import one_line

log = logging.getLogger(__name__)

LONGEST_PAUSE_SECONDS = 600.0


class AccountGate:
    def __init__(self, first_pause: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._first_pause = first_pause
        self._clock = clock
        self._reason: str | None = None
        self._pause = 0.0
        self._closed_until = 0.0

    @property
    def locked_reason(self) -> str | None:
        """fal's words for the lock while the bot believes the account is locked."""
        return self._reason

    def refuses(self) -> bool:
        """Whether new jobs are refused now (a lock was seen and its pause has not run out)."""
        return self._reason is not None and self._clock() < self._closed_until

    def locked(self, reason: str) -> None:
        """fal refused a submit or upload with its account lock, in `reason`'s words: kept as
        one line, since they reach the log and /healthz (a line break would forge a log line)."""
        reason = one_line(reason)
        if self._reason is None:
            log.error("fal refused the bot's account: %s. No jobs are submitted until fal accepts them again.", reason)
            self._pause = self._first_pause
        elif self.refuses():
            self._reason = reason  # a submit sent before this pause began: the same lock
            return
        else:
            self._pause = min(max(LONGEST_PAUSE_SECONDS, self._first_pause), self._pause * 2)
        self._reason = reason
        self._closed_until = self._clock() + self._pause

    def accepted(self) -> None:
        """fal took a submit: the account works. (Only a submit says so: the job that uploads
        its input after a pause submits right after, and that answer decides.)"""
        if self._reason is not None:
            log.info("fal accepts the bot's jobs again")
        self._reason = None
        self._pause = 0.0
