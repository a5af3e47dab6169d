"""Which jobs go to fal now, and in what order the others wait.

fal never refuses a job for concurrency: beyond the account's limit it keeps jobs IN_QUEUE,
first come, first served for the whole account (fal-queue-api.md, part 2 §5). Holding jobs back in
the bot therefore only costs time, and by default every job goes to fal at once. What the bot can
add is fairness: fal's one line lets a busy server make every other server wait behind all of its
jobs. So the scheduler watches for fal's account limit at work, that is our jobs starting only as
other jobs of ours finish, the number running always coming back to the same ceiling. Once every
running slot has been handed from a finished job to a waiting one like that, it keeps that many
plus a small margin at fal and the rest in its own line. The line serves the server with the
fewest jobs at fal first (ties: the one whose turn came longest ago, that is last served, or
joined the line with nothing waiting or at fal), and within a server the member with the fewest,
each member's jobs in order. Jobs already waiting in fal's line when the limit shows
are handed back (a queued job cancelled at fal is removed and never billed), but for the margin,
chosen the same fair way, so they take their turn too; and a server joining the line with fewer
jobs running than the server of a job in the margin takes that job's place at the front of fal's
line. A number running held above the ceiling (longer, once a limit is known: a finish seen
late looks the same for a moment) means the limit rose (or was never there): the limit is raised
to it, and a margin more goes to fal, again and again while the number keeps rising. One kept
below it for a job length while a job of ours waits in fal's line means the limit fell: the
ceiling comes down to what runs, and the limit is seen again there.

An operator's cap (`MAX_CONCURRENT_JOBS`) bounds the jobs at fal whatever fal shows.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

# A finish and the start taking its slot, seen within this long of each other, are a handoff
# (at most a quarter of a job length).
HANDOFF_SECONDS = 1.0
# The limit shows once this many handoffs (and at least one per running slot) came in a row.
HANDOFFS_TO_SEE_A_LIMIT = 3
# A count above a known limit is taken for a rise once held this many handoff windows.
RISE_HOLD = 3.0
# Before a job length is known (no job has run yet).
FIRST_JOB_LENGTH_GUESS = 10.0


@dataclass(frozen=True)
class Place:
    """Where a waiting job stands: its place in the bot's line (1 = next), and when it should
    start, once that can be estimated (unix time)."""

    position: int
    starts_at: float | None


@dataclass
class _Waiter:
    job_id: int
    guild_id: int
    user_id: int
    ready: asyncio.Future[None]


Owner = tuple[int, int]  # (server, member)
T = TypeVar("T")


def fair_order(
    groups: Mapping[int, Mapping[int, Sequence[T]]],
    shares: Mapping[int | Owner, int],
    last_served: Mapping[int | Owner, int],
) -> Iterator[tuple[Owner, T]]:
    """Items grouped by server, then member, in the order they should be served: the server
    holding the fewest `shares` first (ties: the lowest `last_served`, then the first listed),
    within it likewise the member, each member's items in order. Serving one counts as a share."""
    held = Counter(shares)
    serial = max(last_served.values(), default=0)

    def rank(key: int | Owner, first_seen: int) -> tuple[int, int, int]:
        return held[key], last_served.get(key, -1), first_seen

    servers = [(*rank(guild, i), guild) for i, guild in enumerate(groups)]
    heapq.heapify(servers)
    # A server's members are ranked when it is first served: the line's next job (all most
    # callers take) costs the servers and that one server's members, not every member waiting.
    members: dict[int, list[tuple[int, int, int, int]]] = {}
    served: Counter[Owner] = Counter()
    while servers:
        _, _, i, guild = heapq.heappop(servers)
        in_server = members.get(guild)
        if in_server is None:
            in_server = [(*rank((guild, member), j), member) for j, member in enumerate(groups[guild])]
            heapq.heapify(in_server)
            members[guild] = in_server
        _, _, j, member = heapq.heappop(in_server)
        owner = (guild, member)
        items = groups[guild][member]
        yield owner, items[served[owner]]
        serial += 1
        served[owner] += 1
        held[guild] += 1
        held[owner] += 1
        if served[owner] < len(items):
            heapq.heappush(in_server, (held[owner], serial, j, member))
        if in_server:
            heapq.heappush(servers, (held[guild], serial, i, guild))


class FairScheduler:
    """The bot's line and fal's limit (see the module docstring). `on_places` hears the waiting
    jobs' places at most once per `places_interval` seconds: each report is a pass over the whole
    line, and a long line moving fast would otherwise cost one at every step."""

    def __init__(
        self,
        on_places: Callable[[dict[int, Place]], None],
        on_displace: Callable[[int], None],
        *,
        cap: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        places_interval: float = 1.0,
    ) -> None:
        self._on_places = on_places
        self._on_displace = on_displace
        self._cap = cap
        self._clock = clock
        self._wall_clock = wall_clock
        # Our jobs at fal, by id: True once it runs.
        self._at_fal: dict[int, bool] = {}
        # When each running job started (on `wall_clock`), for the start estimates; and when
        # they should end, soonest first, while no job starts or ends.
        self._started_at: dict[int, float] = {}
        self._ends: list[float] | None = None
        self._owners: dict[int, Owner] = {}  # job -> (server, member), while at fal
        self._shares_held: Counter[int | Owner] = Counter()  # jobs at fal by server and by (server, member)
        # The line: server -> member -> their waiting jobs, in the order they were accepted.
        self._line: dict[int, dict[int, list[_Waiter]]] = {}
        self._waiters: dict[int, _Waiter] = {}
        # Our jobs fal has taken and not started: its line (jobs still being sent are not in it),
        # and since when it has held one without a break (on `clock`).
        self._in_fals_line: set[int] = set()
        self._fals_line_held_since: float | None = None
        self._displacing: set[int] = set()
        # What fal shows of the account's limit.
        self.limit: int | None = None
        self._ceiling = 0  # the most of our jobs seen running at once since the last change
        self._handoffs = 0  # starts in a row that took a freed slot
        self._level = 0  # our jobs running, as last counted
        self._level_since = -math.inf
        self._left_ceiling_at: float | None = None
        self._starts_off_ceiling = 0  # starts seen since the count left the ceiling
        self._highest_off_ceiling = 0  # the highest count held since then
        # When each server, and each member, with jobs waiting or at fal had its turn (a serial
        # number): when last let in, or when it joined the line with nothing waiting or at fal.
        # Ties go to the lowest, so servers with equal shares take turns and one joining the
        # line takes its turn after those already in it. Those that leave are forgotten: a bot
        # serving thousands of servers must not remember every member it ever let in.
        self._served = 0
        self._last_served: dict[int | Owner, int] = {}
        self._job_length = FIRST_JOB_LENGTH_GUESS
        self._runs_seen = 0
        # When each job let in from the line was (on `clock`), until fal takes it, and how long
        # that takes on average: the slots freed meanwhile are the margin's to take.
        self._let_in_at: dict[int, float] = {}
        self._submit_time = 0.0
        self._places_due = False
        self._places_interval = places_interval
        self._places_reported_at = -math.inf  # on the event loop's clock

    # -- what the runner reports --------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(self._at_fal.values())

    @property
    def queued_at_fal(self) -> int:
        return len(self._at_fal) - self.running

    @property
    def waiting(self) -> int:
        """Jobs in the bot's own line."""
        return len(self._waiters)

    def resumed_at_fal(self, job_id: int, guild_id: int, user_id: int) -> None:
        """A job found at fal after a restart: it counts as at fal without waiting its turn."""
        if not self._at_fal.setdefault(job_id, False):
            self._joined_fals_line(job_id)
        self._own(job_id, (guild_id, user_id))

    def submitted(self, job_id: int) -> None:
        """fal took the job: it joins the back of fal's line, which fal serves first come, first
        served. Jobs are sent side by side and answered in any order; the margin kept at fal when
        the limit shows must be the front of that line, the jobs fal starts next. A job sent
        before the limit showed and taken after is beyond what the bot keeps at fal now: it is
        handed back as those waiting in fal's line were. Jobs still being sent are not counted:
        fal has not taken them, and the one it takes first is ahead of them in its line."""
        if job_id not in self._at_fal:
            return
        self._at_fal[job_id] = self._at_fal.pop(job_id)
        self._joined_fals_line(job_id)
        let_in_at = self._let_in_at.pop(job_id, None)
        if let_in_at is not None:
            # A submit held up once (a retry) must not keep a large margin: each counts at most
            # half a job length, in a moving average.
            took = min(self._clock() - let_in_at, self._job_length / 2)
            self._submit_time = 0.8 * self._submit_time + 0.2 * took
        if self.limit is None:
            return  # every job goes to fal at once: nothing to count (a pass over all of them)
        kept = sum(
            1
            for other, running in self._at_fal.items()
            if (running or other in self._in_fals_line) and other not in self._displacing
        )
        if kept > self.limit + self.margin:
            self._displacing.add(job_id)
            self._on_displace(job_id)

    def started(self, job_id: int) -> None:
        """fal reports the job IN_PROGRESS."""
        if self._at_fal.get(job_id, True):
            return  # unknown, or already running
        self._at_fal[job_id] = True
        self._started_at[job_id] = self._wall_clock()
        self._ends = None
        self._left_fals_line(job_id)
        self._running_changed(started=True)
        self._release_waiters()  # the ceiling may have risen past the limit

    def left_fal(self, job_id: int, *, ran_for: float | None) -> None:
        """The job ended at fal (done, failed, cancelled) or was handed back to the line."""
        was_running = self._at_fal.pop(job_id, None)
        self._let_in_at.pop(job_id, None)
        self._disown(job_id)
        self._left_fals_line(job_id)
        self._displacing.discard(job_id)
        if self._started_at.pop(job_id, None) is not None:
            self._ends = None
        if was_running:
            if ran_for is not None and ran_for > 0:
                # The first job seen replaces the guess; later ones move a running average.
                self._job_length = 0.8 * self._job_length + 0.2 * ran_for if self._runs_seen else ran_for
                self._runs_seen += 1
            self._running_changed()
        self._release_waiters()

    def _joined_fals_line(self, job_id: int) -> None:
        if not self._in_fals_line:
            self._fals_line_held_since = self._clock()
        self._in_fals_line.add(job_id)

    def _left_fals_line(self, job_id: int) -> None:
        self._in_fals_line.discard(job_id)
        if not self._in_fals_line:
            self._fals_line_held_since = None

    @property
    def _handoff_window(self) -> float:
        return min(HANDOFF_SECONDS, self._job_length / 4)

    def _running_changed(self, *, started: bool = False) -> None:
        """Follow the number of our jobs running. A finish and the start that takes its slot
        arrive on different streams, in either order, so the count briefly dips or spikes by
        one; only a count held longer than the handoff window is real. The ceiling is the
        highest count held; a quick dip or spike that comes back to it, with jobs of ours still
        queued at fal, is a handoff."""
        now = self._clock()
        window = self._handoff_window
        previous, running = self._level, self.running
        if now - self._level_since > window:
            self._held(previous, now - self._level_since)
        if previous == self._ceiling != running:
            self._left_ceiling_at, self._starts_off_ceiling, self._highest_off_ceiling = now, 0, 0
        self._starts_off_ceiling += started
        if (
            running == self._ceiling != previous
            and self._left_ceiling_at is not None
            and now - self._left_ceiling_at <= window
            and self.queued_at_fal
        ):
            self._handoffs += self._starts_off_ceiling  # each start took a freed slot
            self._check_for_limit()
        self._level, self._level_since = running, now
        self._lower_a_ceiling_out_of_reach(now)

    def _held(self, running: int, held_for: float) -> None:
        if running > self._ceiling and self.limit is not None and held_for < RISE_HOLD * self._handoff_window:
            return  # one more than a known limit, briefly: as likely a finish seen late
        if running > self._ceiling:
            # More at once than ever: no limit in sight, or a higher one. A known limit is raised
            # to the count, so a margin more goes to fal, and again while the count keeps rising:
            # a few steps to fal's new limit, where setting it aside would send the whole line
            # to fal, to be handed back again if the rise was a start seen before the finish
            # that made room for it.
            self._ceiling = running
            self._handoffs = 0
            if self.limit is not None:
                self.limit = running
                log.info("more of our jobs run at once (%d): fal's limit rose", running)
        elif running < self._ceiling:
            self._highest_off_ceiling = max(self._highest_off_ceiling, running)
            if self.queued_at_fal:
                self._handoffs = 0  # room to spare while jobs waited at fal: no limit at work

    def _lower_a_ceiling_out_of_reach(self, now: float) -> None:
        """fal's line has held jobs of ours since the count left the ceiling, a job length ago
        and more, and no more than `_highest_off_ceiling` ran meanwhile: fal allows no more now.
        Its limit fell (another app on the key, fal's own choice), or a start seen long before
        the finish that made room raised the ceiling past it. So the ceiling comes down, and the
        limit is seen again there."""
        left = self._left_ceiling_at
        if left is None or self._level >= self._ceiling or now - left < self._job_length:
            return
        held_since = self._fals_line_held_since
        if held_since is None or held_since > left or not self._highest_off_ceiling:
            return
        log.info(
            "fewer of our jobs run than before (%d, not %d): watching for a lower limit",
            self._highest_off_ceiling,
            self._ceiling,
        )
        self._ceiling = self._highest_off_ceiling
        self._handoffs = 0
        # Below the new ceiling still (a count held while the line drained): watched afresh.
        self._left_ceiling_at = now if self._level < self._ceiling else None
        self._highest_off_ceiling = 0

    def _check_for_limit(self) -> None:
        if self._handoffs < max(HANDOFFS_TO_SEE_A_LIMIT, self._ceiling) or self.limit == self._ceiling:
            return
        if self._ceiling == 0:
            return  # jobs that end as they start, none running long enough to count: no limit
        self.limit = self._ceiling
        log.info("fal's account limit shows: %d jobs at once; sharing it fairly", self.limit)
        self._displace_excess()
        self._schedule_places()

    # -- the line -----------------------------------------------------------------------------

    @property
    def margin(self) -> int:
        """Jobs kept queued at fal beyond those running, so a freed slot is taken at once: a
        quarter of the limit, or the slots that free up while a job let in from the line reaches
        fal (its submit), if more; at most the limit."""
        limit = self.limit or 0
        in_transit = math.ceil(limit * self._submit_time / self._job_length)
        return max(1, limit // 4, min(limit, in_transit))

    def _room(self) -> int | None:
        """How many more jobs may go to fal now (None: any number)."""
        bounds = []
        if self.limit is not None:
            bounds.append(self.limit + self.margin)
        if self._cap is not None:
            bounds.append(self._cap)
        if not bounds:
            return None
        return max(0, min(bounds) - len(self._at_fal))

    def must_wait(self) -> bool:
        """Whether `admit` would wait now."""
        room = self._room()
        return bool(self._waiters) or (room is not None and room <= 0)

    async def admit(self, job_id: int, guild_id: int, user_id: int) -> None:
        """Return once the job may go to fal (it then counts as at fal until `left_fal`); until
        then it waits its turn. A member's jobs wait in the order they were accepted (job ids
        rise), whatever order they join in: jobs handed back from fal rejoin as fal answers,
        before the member's later jobs and after their earlier ones."""
        if not self.must_wait():
            self._at_fal[job_id] = False
            self._own(job_id, (guild_id, user_id))
            return
        waiter = _Waiter(job_id, guild_id, user_id, asyncio.get_running_loop().create_future())
        self._last_served.setdefault(guild_id, self._served)
        self._last_served.setdefault((guild_id, user_id), self._served)
        members = self._line.setdefault(guild_id, {})
        bisect.insort(members.setdefault(user_id, []), waiter, key=lambda other: other.job_id)
        self._waiters[job_id] = waiter
        self._make_way_for(guild_id)
        self._schedule_places()
        try:
            await waiter.ready
        except asyncio.CancelledError:
            if self._waiters.get(job_id) is waiter:
                self._remove(waiter)
                self._schedule_places()
            elif waiter.ready.done() and not waiter.ready.cancelled():
                # Let in just as it gave up: the room it held goes to the next.
                self._at_fal.pop(job_id, None)
                self._disown(job_id)
                self._release_waiters()
            raise

    def _remove(self, waiter: _Waiter) -> None:
        del self._waiters[waiter.job_id]
        members = self._line[waiter.guild_id]
        jobs = members[waiter.user_id]
        jobs.remove(waiter)
        if not jobs:
            del members[waiter.user_id]
        if not members:
            del self._line[waiter.guild_id]
        self._forget_if_gone((waiter.guild_id, waiter.user_id))

    def _own(self, job_id: int, owner: Owner) -> None:
        """The job counts as at fal, in its server's and member's shares."""
        if self._owners.get(job_id) == owner:
            return
        self._disown(job_id)
        self._owners[job_id] = owner
        self._shares_held[owner[0]] += 1
        self._shares_held[owner] += 1

    def _disown(self, job_id: int) -> None:
        owner = self._owners.pop(job_id, None)
        if owner is None:
            return
        for key in owner[0], owner:
            self._shares_held[key] -= 1
            if not self._shares_held[key]:
                del self._shares_held[key]
        self._forget_if_gone(owner)

    def _forget_if_gone(self, owner: Owner) -> None:
        """A member, or server, with nothing left waiting or at fal leaves the turn order."""
        guild, member = owner
        waiting = self._line.get(guild, {})
        if owner not in self._shares_held and member not in waiting:
            self._last_served.pop(owner, None)
        if guild not in self._shares_held and not waiting:
            self._last_served.pop(guild, None)

    def _running_shares(self) -> Counter[int | Owner]:
        """Jobs running at fal by server and by (server, member)."""
        shares: Counter[int | Owner] = Counter()
        for job_id, owner in self._owners.items():
            if self._at_fal.get(job_id):
                shares[owner[0]] += 1
                shares[owner] += 1
        return shares

    def _serving_order(self) -> Iterator[tuple[Owner, _Waiter]]:
        return fair_order(self._line, self._shares_held, self._last_served)

    def _release_waiters(self) -> None:
        changed = False
        while self._waiters:
            room = self._room()
            if room is not None and room <= 0:
                break
            owner, waiter = next(self._serving_order())
            self._remove(waiter)
            changed = True
            if waiter.ready.cancelled():
                # It gave up (cancelled, timed out) and would leave the line when its task next
                # runs: it takes no room, the next one does.
                continue
            self._served += 1
            self._last_served[owner[0]] = self._last_served[owner] = self._served
            self._at_fal[waiter.job_id] = False  # holds its room until it is submitted or gives up
            self._own(waiter.job_id, owner)
            self._let_in_at[waiter.job_id] = self._clock()
            waiter.ready.set_result(None)
        if changed:
            self._schedule_places()

    def _displace_excess(self) -> None:
        """The limit shows: hand back the jobs waiting in fal's line but for the margin, the
        margin chosen as the line would serve them (the running jobs counted as shares), so every
        server's jobs take their turn. Jobs still being sent are handed back once fal takes them
        (see `submitted`)."""
        queued: dict[int, dict[int, list[int]]] = {}
        for job_id in self._at_fal:
            if job_id in self._in_fals_line and job_id not in self._displacing:
                guild_id, user_id = self._owners.get(job_id, (0, 0))
                queued.setdefault(guild_id, {}).setdefault(user_id, []).append(job_id)
        order = fair_order(queued, self._running_shares(), self._last_served)
        for _, job_id in list(order)[self.margin :]:
            self._displacing.add(job_id)
            self._on_displace(job_id)

    def _make_way_for(self, guild_id: int) -> None:
        """A server joins the line with fewer jobs running than the server of a job kept in fal's
        line (the margin, there to take the next freed slot): that job is handed back, and its
        room goes to the line's next, so this server's job is at the front of fal's line, not
        behind it (up to a job-length later). Only for strictly fewer running: servers as well
        served as each other do not take each other's places back and forth."""
        if self.limit is None:
            return
        running = self._running_shares()
        queued = [job for job in self._in_fals_line if job not in self._displacing and job in self._owners]
        most = max(queued, key=lambda job: (running[self._owners[job][0]], job), default=None)
        if most is not None and running[self._owners[most][0]] > running[guild_id]:
            self._displacing.add(most)
            self._on_displace(most)

    def stay(self, job_id: int) -> None:
        """A job asked back from fal had already started there: it stays."""
        self._displacing.discard(job_id)

    # -- places and start times ---------------------------------------------------------------

    def _schedule_places(self) -> None:
        """Places are computed once however many jobs joined or left meanwhile: at once after a
        quiet while, else `places_interval` after the last report."""
        if self._places_due:
            return
        self._places_due = True
        loop = asyncio.get_running_loop()
        wait = self._places_reported_at + self._places_interval - loop.time()
        if wait > 0:
            loop.call_later(wait, self._report_places)
        else:
            loop.call_soon(self._report_places)

    def _report_places(self) -> None:
        self._places_due = False
        self._places_reported_at = asyncio.get_running_loop().time()
        self._on_places(self.places())

    def places(self) -> dict[int, Place]:
        """Every waiting job's place in the order the line serves them, and its estimated
        start."""
        queued = self.queued_at_fal
        return {
            waiter.job_id: Place(position, self.start_estimate(queued + position))
            for position, (_, waiter) in enumerate(self._serving_order(), 1)
        }

    def start_estimate(self, ahead: int) -> float | None:
        """When a job with `ahead` jobs queued before it (itself counted) should start, once fal's
        limit is known: each takes the slot of the next running job to end (a job length after
        its start), and each slot starts another every job length."""
        if self.limit is None:
            return None
        now = self._wall_clock()
        if self._ends is None:
            self._ends = sorted(started + self._job_length for started in self._started_at.values())
        rounds, slot = divmod(ahead - 1, max(self.limit, 1))
        # A slot no job of ours holds is free at once; a job past its length may end any moment.
        first = self._ends[slot] if slot < len(self._ends) else now
        return max(now, first) + rounds * self._job_length
