"""The fair scheduler: nothing held back until fal's account limit shows, then that many (plus
a margin) at fal and the rest served round-robin by server, then by member."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.scheduler import HANDOFF_SECONDS, HANDOFFS_TO_SEE_A_LIMIT, RISE_HOLD, FairScheduler, Place


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scheduler(clock: Clock, *, cap: int | None = None):
    handed_back: list[int] = []
    places: list[dict[int, Place]] = []
    s = FairScheduler(places.append, handed_back.append, cap=cap, clock=clock, wall_clock=clock, places_interval=0)
    return s, handed_back, places


async def test_nothing_waits_while_no_limit_shows():
    s, _, _ = scheduler(Clock())
    for job in range(500):
        assert not s.must_wait()
        await s.admit(job, guild_id=1, user_id=job)
    assert s.queued_at_fal == 500 and s.waiting == 0


async def test_an_operators_cap_holds_the_rest_in_line():
    s, _, _ = scheduler(Clock(), cap=2)
    await s.admit(1, 1, 1)
    await s.admit(2, 1, 1)
    third = asyncio.ensure_future(s.admit(3, 1, 1))
    await asyncio.sleep(0)
    assert not third.done() and s.waiting == 1
    s.left_fal(1, ran_for=None)
    await asyncio.wait_for(third, 1)


def run_at_the_limit(
    s: FairScheduler,
    clock: Clock,
    limit: int,
    queued: int,
    job_length: float = 5.0,
    owner: Callable[[int], tuple[int, int]] = lambda job: (1, job),
    fal_line: list[int] | None = None,
) -> list[int]:
    """`limit` of our jobs run; each finishing one is followed at once by a start, as fal does
    when the account limit holds its line, until the limit shows; returns the jobs then still
    queued at fal. `fal_line`: the order fal took them in (default: the order they came)."""
    for job in range(limit + queued):
        s.resumed_at_fal(job, *owner(job))
    jobs = fal_line or list(range(limit + queued))
    for job in jobs:
        s.submitted(job)
    for job in jobs[:limit]:
        s.started(job)
    clock.now += HANDOFF_SECONDS + 0.5  # they all still run: that is the ceiling
    waiting_at_fal = jobs[limit:]
    running = jobs[:limit]
    for _ in range(HANDOFFS_TO_SEE_A_LIMIT + limit):
        if s.limit is not None:
            break
        clock.now += job_length / limit
        done = running.pop(0)
        s.left_fal(done, ran_for=job_length)
        nxt = waiting_at_fal.pop(0)
        s.started(nxt)
        running.append(nxt)
    return waiting_at_fal


async def test_the_account_limit_shows_when_starts_only_follow_finishes():
    clock = Clock()
    s, handed_back, _ = scheduler(clock)
    still_queued = run_at_the_limit(s, clock, limit=4, queued=30)
    assert s.limit == 4
    # Jobs waiting in fal's line beyond the margin are asked back, to take their turn fairly;
    # the first in fal's line stay there, to take the next freed slot at once.
    assert sorted(handed_back) == still_queued[s.margin :]
    assert s.must_wait()


async def test_the_margin_kept_at_fal_is_the_front_of_fal_s_line_not_the_first_sent():
    """Jobs sent side by side are answered in any order; fal starts them in the order it took
    them, so that is the order whose front stays at fal."""
    clock = Clock()
    s, handed_back, _ = scheduler(clock)
    still_queued = run_at_the_limit(s, clock, limit=2, queued=6, fal_line=[0, 1, 2, 3, 4, 7, 5, 6])
    assert s.limit == 2 and s.margin == 1 and still_queued == [7, 5, 6]
    assert sorted(handed_back) == [5, 6]


async def test_a_job_sent_as_the_limit_shows_is_handed_back_once_fal_takes_it():
    """Jobs still being sent when the limit shows cannot be asked back yet (fal does not have
    them): once fal takes one beyond what the bot keeps there, it is handed back too, instead of
    making every other server wait behind it in fal's line."""
    clock = Clock()
    s, handed_back, _ = scheduler(clock)
    for job in (100, 101):
        await s.admit(job, guild_id=1, user_id=job)  # let in at once: no limit shows yet
    still_queued = run_at_the_limit(s, clock, limit=2, queued=5)
    assert s.limit == 2 and s.margin == 1 and still_queued == [5, 6] and handed_back == [6]
    s.submitted(100)
    assert handed_back == [6, 100]
    for job in (6, 100):
        s.left_fal(job, ran_for=None)  # out of fal's line, back in the bot's
    s.left_fal(3, ran_for=5.0)
    s.started(5)  # the margin took the freed slot: one more fits in fal's line
    s.submitted(101)
    assert handed_back == [6, 100]


async def test_of_jobs_sent_as_the_limit_shows_the_first_fal_takes_is_the_one_kept():
    """Two jobs still being sent when the limit shows, and room in fal's line for one of them:
    the one fal takes first is at the front of its line and stays; the later one is handed back
    (a job still being sent is not yet at fal, so it takes none of the room)."""
    clock = Clock()
    s, handed_back, _ = scheduler(clock)
    for job in (100, 101):
        await s.admit(job, guild_id=1, user_id=job)  # let in at once: no limit shows yet
    assert run_at_the_limit(s, clock, limit=2, queued=5) == [5, 6] and handed_back == [6]
    s.left_fal(6, ran_for=None)  # out of fal's line, back in the bot's
    s.left_fal(3, ran_for=5.0)
    s.started(5)  # fal's line is empty: 4 and 5 run, room for one there
    s.submitted(100)
    s.submitted(101)
    assert handed_back == [6, 101]


async def test_the_limit_shows_only_once_every_running_slot_was_handed_on():
    clock = Clock()
    s, _, _ = scheduler(clock)
    for job in range(40):
        s.resumed_at_fal(job, 1, job)
    for job in range(6):
        s.started(job)
    clock.now += HANDOFF_SECONDS + 0.5
    for done, nxt in zip(range(5), range(6, 11), strict=True):
        clock.now += 1.0
        s.left_fal(done, ran_for=6.0)
        s.started(nxt)
        assert s.limit is None  # five of six slots handed on: not yet
    clock.now += 1.0
    s.left_fal(5, ran_for=6.0)
    s.started(11)
    assert s.limit == 6


async def test_the_margin_left_at_fal_is_the_job_of_a_server_with_nothing_running():
    clock = Clock()
    s, handed_back, _ = scheduler(clock)
    still_queued = run_at_the_limit(s, clock, limit=4, queued=30, owner=lambda job: (2, 99) if job == 20 else (1, job))
    assert s.limit == 4 and s.margin == 1 and 20 in still_queued
    assert sorted(handed_back) == [job for job in still_queued if job != 20]


async def test_a_server_with_fewer_jobs_at_fal_is_served_first():
    s, _, places = scheduler(Clock(), cap=4)
    for job in range(4):
        await s.admit(job, 1, job)  # server 1 holds every room
    waits = {
        job: asyncio.ensure_future(s.admit(job, guild, user)) for job, guild, user in [(4, 1, 4), (5, 1, 5), (6, 2, 6)]
    }
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert {job: place.position for job, place in places[-1].items()} == {6: 1, 4: 2, 5: 3}
    s.left_fal(0, ran_for=None)
    await asyncio.sleep(0)
    assert waits[6].done() and not waits[4].done()
    for wait in waits.values():
        wait.cancel()
    await asyncio.gather(*waits.values(), return_exceptions=True)


async def test_starts_that_do_not_follow_finishes_show_no_limit():
    """fal's own queue time (a busy model) is not the account limit: jobs start on their own."""
    clock = Clock()
    s, handed_back, _ = scheduler(clock)
    for job in range(50):
        s.resumed_at_fal(job, 1, job)
    for job in range(50):
        clock.now += 0.1
        s.started(job)  # one after another, nothing finished
    for job in range(50):
        clock.now += 0.1
        s.left_fal(job, ran_for=5.0)
    assert s.limit is None and handed_back == []


async def test_a_count_held_past_the_ceiling_raises_the_limit_a_step_at_a_time():
    """fal's limit rose: each count held above the ceiling is the new limit, so a margin more goes
    to fal, and the count rises again, to fal's new limit in a few steps."""
    clock = Clock()
    s, _, _ = scheduler(clock)
    run_at_the_limit(s, clock, limit=2, queued=10)
    assert s.limit == 2
    for extra in (999, 1000, 1001):  # a third, then a fourth runs, with no finish making room
        s.resumed_at_fal(extra, 1, extra)
        s.started(extra)
        clock.now += RISE_HOLD * HANDOFF_SECONDS + 0.5
    assert s.limit == 4


def fal_at(limit: int, s: FairScheduler, clock: Clock, running: list[int], line: list[int], finishes: int) -> None:
    """fal allowing `limit` of our jobs at once: one of those running finishes every 1.5 s, and
    the first of its `line` start while fewer run."""
    for _ in range(finishes):
        clock.now += 1.5
        s.left_fal(running.pop(0), ran_for=4.0)
        while len(running) < limit and line:
            running.append(line.pop(0))
            s.started(running[-1])


async def test_a_limit_that_fell_is_seen_again():
    """Fewer of our jobs run than the limit for a job length and more while ours wait in fal's
    line: fal's limit fell (another app on the key). The ceiling comes down to what runs, and the
    limit is seen there: kept at the old one, the bot would leave jobs in fal's first-come line."""
    clock = Clock()
    s, _, _ = scheduler(clock)
    line = run_at_the_limit(s, clock, limit=4, queued=40, job_length=4.0)
    assert s.limit == 4
    running = list(range(line[0] - 4, line[0]))
    fal_at(2, s, clock, running, line, finishes=20)
    assert s.limit == 2


async def test_a_ceiling_raised_by_a_start_seen_early_comes_down_again():
    """A start seen long before the finish that made room for it (a status that came late) makes
    one more look held. Briefly, it is taken for what it most likely is; for longer, the limit is
    raised a step, then lowered again once fal shows that it runs no more. Before, the ceiling
    stayed up, the limit was never seen again, and every job went to fal's first-come line."""
    clock = Clock()
    s, _, _ = scheduler(clock)
    line = run_at_the_limit(s, clock, limit=4, queued=40, job_length=16.0)
    running = list(range(line[0] - 4, line[0]))
    for late_by, limit_then in ((1.5, 4), (RISE_HOLD * HANDOFF_SECONDS + 0.5, 5)):
        running.append(line.pop(0))
        s.started(running[-1])
        clock.now += late_by
        s.left_fal(running.pop(0), ran_for=16.0)  # its finish, seen late
        clock.now += 0.5
        assert s.limit == limit_then
    fal_at(4, s, clock, running, line, finishes=12)
    assert s.limit == 4


async def test_a_start_seen_just_before_the_finish_that_made_room_is_a_handoff():
    """The start and the finish come on different streams, in either order."""
    clock = Clock()
    s, _, _ = scheduler(clock)
    for job in range(20):
        s.resumed_at_fal(job, 1, job)
    s.started(0)
    s.started(1)
    clock.now += HANDOFF_SECONDS + 0.5
    running = [0, 1]
    for nxt in range(2, 2 + HANDOFFS_TO_SEE_A_LIMIT + 4):
        clock.now += 2.5
        s.started(nxt)  # seen first
        clock.now += 0.01
        s.left_fal(running.pop(0), ran_for=5.0)
        running.append(nxt)
    assert s.limit == 2


async def test_the_line_is_served_round_robin_by_server_then_member():
    clock = Clock()
    s, _, places = scheduler(clock, cap=1)
    await s.admit(0, 9, 9)  # fills the only room
    order: list[int] = []

    async def wait(job: int, guild: int, user: int) -> None:
        await s.admit(job, guild, user)
        order.append(job)
        s.left_fal(job, ran_for=None)

    waits = [
        asyncio.ensure_future(wait(job, guild, user))
        for job, guild, user in [(1, 1, 10), (2, 1, 10), (3, 1, 11), (4, 1, 10), (5, 2, 20), (6, 2, 20)]
    ]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    latest = places[-1]
    assert [job for job, _ in sorted(latest.items(), key=lambda item: item[1].position)] == [1, 5, 3, 6, 2, 4]
    s.left_fal(0, ran_for=None)
    await asyncio.wait_for(asyncio.gather(*waits), 1)
    assert order == [1, 5, 3, 6, 2, 4]


async def test_a_job_that_gives_up_leaves_the_line():
    s, _, _ = scheduler(Clock(), cap=1)
    await s.admit(0, 1, 1)
    waiting = asyncio.ensure_future(s.admit(1, 1, 2))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert s.waiting == 0


async def test_a_job_let_in_just_as_it_gives_up_leaves_its_room_to_the_next():
    s, _, _ = scheduler(Clock(), cap=1)
    await s.admit(0, 1, 1)
    waiting = asyncio.ensure_future(s.admit(1, 1, 2))
    await asyncio.sleep(0)
    s.left_fal(0, ran_for=None)  # job 1 is let in; it gives up before it hears so
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert s.queued_at_fal == 0 and not s.must_wait()
    await asyncio.wait_for(s.admit(2, 1, 3), 1)


async def test_places_are_reported_at_once_then_at_most_once_an_interval():
    """A long line moving fast costs one pass over it per interval, not one per step."""
    places: list[dict[int, Place]] = []
    # An interval far longer than the twenty joins take, so a busy machine cannot split them.
    s = FairScheduler(places.append, lambda job: None, cap=1, places_interval=0.5)
    await s.admit(0, 1, 0)
    waits = []
    for job in range(1, 21):
        waits.append(asyncio.ensure_future(s.admit(job, 1, job)))
        await asyncio.sleep(0)
    assert [list(p) for p in places] == [[1]]  # the first change, at once
    await asyncio.sleep(0.6)
    assert len(places) == 2 and list(places[-1]) == list(range(1, 21))  # the rest, together
    for wait in waits:
        wait.cancel()
    await asyncio.gather(*waits, return_exceptions=True)


async def test_the_margin_covers_the_slots_freed_while_a_job_let_in_reaches_fal():
    """Submits that take a while (fal slow to answer, a retry): as many jobs stay queued at fal as
    slots free up meanwhile, so fal's slots do not wait for the bot. A quarter of the limit, as
    before, left them idle up to 29 % of the time with 6 s submits (a simulation)."""
    clock = Clock()
    s, handed_back, _ = scheduler(clock)
    line = run_at_the_limit(s, clock, limit=8, queued=20, job_length=8.0)
    assert s.limit == 8 and s.margin == 2
    for job in handed_back:  # out of fal's line, as fal answers their cancel
        line.remove(job)
        s.left_fal(job, ran_for=None)
    running = list(range(line[0] - 8, line[0]))
    waiting = [asyncio.ensure_future(s.admit(job, 2, job)) for job in range(100, 112)]
    await asyncio.sleep(0)
    assert not any(admission.done() for admission in waiting)
    for job in range(100, 110):  # each job let in takes 4 s to reach fal's line
        clock.now += 1.0
        s.left_fal(running.pop(0), ran_for=8.0)
        running.append(line.pop(0))
        s.started(running[-1])
        clock.now += 4.0
        s.submitted(job)
        line.append(job)
    assert s.margin == 4  # 8 slots, each freed every 8 s: 4 free up in a 4 s submit
    await asyncio.gather(*waiting[:10])
    for admission in waiting[10:]:
        admission.cancel()


async def test_start_estimates_follow_the_ends_of_the_running_jobs():
    """Once the limit is known, each job waiting takes the slot of the next running job to end,
    and each slot starts another every job length. Rounded up to whole job lengths, as they
    were, the first 4 in line all read "in 8 s" and the fifth "in 16 s"."""
    clock = Clock()
    s, _, _ = scheduler(clock)
    assert s.start_estimate(5) is None
    line = run_at_the_limit(s, clock, limit=4, queued=20, job_length=8.0)
    running = list(range(line[0] - 4, line[0]))
    for _ in range(4):  # fal's slots handed on 2 s apart: the jobs now running end 2 s apart
        clock.now += 2.0
        s.left_fal(running.pop(0), ran_for=8.0)
        running.append(line.pop(0))
        s.started(running[-1])
    assert [s.start_estimate(ahead) - clock.now for ahead in (1, 2, 4, 5, 9)] == [2, 4, 8, 10, 18]


async def test_a_job_that_gives_up_while_another_leaves_fal_does_not_break_the_line():
    """A waiting job's member cancels it (or its deadline passes): its wait is cancelled at once,
    but it leaves the line only when its task next runs. A job leaving fal in between must let
    in the next waiting job, not stumble over the one that gave up."""
    s, _, _ = scheduler(Clock(), cap=1)
    await s.admit(0, 1, 1)
    giving_up = asyncio.ensure_future(s.admit(1, 1, 2))
    next_in_line = asyncio.ensure_future(s.admit(2, 1, 3))
    await asyncio.sleep(0)
    giving_up.cancel()
    s.left_fal(0, ran_for=5.0)  # before the cancelled wait has run
    await asyncio.gather(giving_up, return_exceptions=True)
    await asyncio.wait_for(next_in_line, 1)
    assert s.waiting == 0 and s.queued_at_fal == 1


async def test_a_member_s_jobs_handed_back_keep_their_order():
    """fal's limit shows with one member's jobs queued there: they are handed back in their
    order and rejoin the bot's line as fal's answers come, each before the member's other
    waiting jobs; the member's earlier job must still go before their later one."""
    clock = Clock()
    s, handed_back, _ = scheduler(clock)
    still_queued = run_at_the_limit(s, clock, limit=2, queued=8, owner=lambda job: (1, job) if job < 2 else (2, 50))
    assert s.limit == 2 and len(handed_back) >= 3
    order: list[int] = []

    async def join(job: int) -> None:
        await s.admit(job, 2, 50)
        order.append(job)

    waits = [asyncio.ensure_future(join(100))]  # the member's next job waits in the bot's line
    await asyncio.sleep(0)
    for job in handed_back:  # fal answers the hand-backs in the order they were asked
        s.left_fal(job, ran_for=None)
        waits.append(asyncio.ensure_future(join(job)))
        await asyncio.sleep(0)
    assert s.waiting == len(handed_back) + 1
    for job in [j for j in still_queued if j not in handed_back] + list(range(10)):
        s.left_fal(job, ran_for=None)  # whatever was at fal ends, making room
    await asyncio.wait_for(asyncio.gather(*waits), 1)
    assert order == [*sorted(handed_back), 100]


async def test_the_line_forgets_whom_it_served_once_that_decides_no_tie():
    """A bot serving thousands of servers for months meets millions of members. Ties go to the
    one served longest ago, which matters only against those still waiting or at fal: the line
    must not remember everyone it ever let in, nor look through them all at every turn."""
    s, _, _ = scheduler(Clock(), cap=1)
    await s.admit(0, 0, 0)
    for job in range(1, 5000):
        waiting = asyncio.ensure_future(s.admit(job, guild_id=job, user_id=job))
        await asyncio.sleep(0)
        s.left_fal(job - 1, ran_for=None)
        await asyncio.wait_for(waiting, 1)
    assert len(s._last_served) < 200


async def test_newcomers_do_not_keep_a_server_already_waiting_behind_them():
    """Ties between servers with as many jobs at fal go to the one whose turn came longest ago. A
    server joining the line takes its turn after those already in it: a stream of new servers
    must not hold back one that waits with its second job."""
    s, _, _ = scheduler(Clock(), cap=1)
    await s.admit(0, 9, 9)
    served: list[int] = []

    async def wait(job: int, guild: int) -> None:
        await s.admit(job, guild, guild)
        served.append(job)

    waits = [asyncio.ensure_future(wait(1, 1)), asyncio.ensure_future(wait(2, 1))]
    await asyncio.sleep(0)
    running = 0
    for newcomer in range(100, 106):
        waits.append(asyncio.ensure_future(wait(newcomer, newcomer)))
        await asyncio.sleep(0)
        s.left_fal(running, ran_for=None)
        await asyncio.sleep(0)
        running = served[-1]
    s.left_fal(running, ran_for=None)
    for _ in range(len(waits)):
        await asyncio.sleep(0)
        s.left_fal(served[-1], ran_for=None)
    await asyncio.wait_for(asyncio.gather(*waits), 1)
    assert served[:3] == [1, 100, 2]


async def test_a_server_with_fewer_jobs_running_takes_the_margin_s_place_in_fal_s_line():
    """The limit shows with server 1's jobs running and one of its jobs kept in fal's line (the
    margin, for the next freed slot). A job of server 2, with nothing running, joins the line:
    server 1's queued job is handed back, so server 2's goes to the front of fal's line and
    starts at the next finish, not behind it (up to a job-length later)."""
    clock = Clock()
    s, handed_back, _ = scheduler(clock)
    still_queued = run_at_the_limit(s, clock, limit=4, queued=30)
    kept = [job for job in still_queued if job not in handed_back]
    assert s.limit == 4 and len(kept) == s.margin == 1
    for job in handed_back:
        s.left_fal(job, ran_for=None)  # out of fal's line, back in the bot's
    waiting = asyncio.ensure_future(s.admit(100, guild_id=2, user_id=50))
    await asyncio.sleep(0)
    assert handed_back[-1] == kept[0]
    s.left_fal(kept[0], ran_for=None)  # fal took it out of its line
    await asyncio.wait_for(waiting, 1)  # its room went to server 2's job
    # A job of the server with jobs running takes nobody's place.
    again = asyncio.ensure_future(s.admit(101, guild_id=1, user_id=1))
    await asyncio.sleep(0)
    s.submitted(100)
    assert handed_back[-1] == kept[0] and not again.done()
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)


async def test_jobs_that_end_as_soon_as_they_start_show_no_limit():
    """fal fails invalid inputs within a moment of starting them: jobs starting and ending at
    once, none running long enough to count, are no limit at work (they made it 0, which held
    every other job in the bot's line but one, and broke the start estimates)."""
    clock = Clock()
    s, handed_back, _ = scheduler(clock)
    for job in range(10):
        s.resumed_at_fal(job, 1, job)
    for job in range(HANDOFFS_TO_SEE_A_LIMIT + 2):
        clock.now += 0.1
        s.started(job)
        clock.now += 0.1
        s.left_fal(job, ran_for=None)  # failed: no run time to learn from
    assert s.limit is None and handed_back == [] and not s.must_wait()
