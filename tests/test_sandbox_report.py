"""The benchmark's arithmetic: percentiles, the median of repeated runs, the order of runs and
the ratio of paired ones, the fairness report."""

from __future__ import annotations

import dataclasses

import pytest

from tools.sandbox import (
    RunConfig,
    RunResult,
    compare_table,
    fairness_rows,
    median_run,
    paired_ratio,
    percentiles,
    run_order,
)


def run(cpu_seconds: float, jobs: int = 100) -> RunResult:
    return RunResult(
        config=RunConfig(jobs=jobs, label="status stream"),
        jobs=jobs,
        delivered=jobs,
        wall_seconds=1.0,
        fal_requests={"submit": jobs},
        discord_calls=2 * jobs,
        discord_edits=jobs,
        discord_acks=jobs,
        discord_other=0,
        states_shown=2 * jobs,
        over_budget_jobs=0,
        completion_to_posted_ms=[10.0],
        ack_ms=[2.0],
        unacknowledged=0,
        refused=0,
        bot_cpu_seconds=cpu_seconds,
        bot_user_seconds=cpu_seconds,
        bot_peak_rss_mib=50.0,
        tool_cpu_seconds=0.0,
    )


def test_percentiles_by_nearest_rank():
    assert percentiles([]) is None
    assert percentiles([5.0]) == (5.0, 5.0, 5.0)
    assert percentiles([float(v) for v in range(1, 101)]) == (50.0, 95.0, 100.0)


def test_the_median_run_is_reported_with_every_runs_figure():
    runs = [run(1.2), run(0.8), run(1.0), run(2.5)]
    chosen = median_run(runs)
    assert chosen is runs[2]  # its other figures are shown: 10 ms, the lower middle of 8, 10, 12, 25
    assert sorted(chosen.cpu_per_job_runs) == [8.0, 10.0, 12.0, 25.0]
    table = compare_table([chosen])
    # The CPU shown as the median is the median, not the better of the two middle runs.
    assert "| Bot CPU / job, median of 4 runs (range) (ms) | 11.0 (8.0–25.0) |" in table


def test_two_runs_report_their_median_not_the_faster_one():
    table = compare_table([median_run([run(1.2), run(0.8)])])
    assert "| Bot CPU / job, median of 2 runs (range) (ms) | 10.0 (8.0–12.0) |" in table


def test_the_fairness_report_sets_each_servers_wait_against_first_come_first_served():
    config = RunConfig(jobs=4, fal_limit=2, run_seconds=5.0, second_server_jobs=2, second_server_delay=10.0)
    result = dataclasses.replace(run(1.0, jobs=6), config=config)
    result.start_waits = [0.1, 0.2, 5.0, None, 1.0, 4.0]
    result.first_server_ahead = 2
    rows = dict(fairness_rows(result))
    assert rows["server A: command -> start at fal p50/p95/max"] == "0.2 / 5.0 / 5.0 s (4 jobs)"
    assert rows["server B: command -> start at fal p50/p95/max"].endswith("the last: 0.80 job-lengths")
    # Two of A's jobs ahead, two at a time, five seconds each.
    assert rows["server B, first come, first served"].startswith("2 of A's jobs ahead in fal's line: about 5 s")
    assert fairness_rows(run(1.0)) == []


def test_runs_alternate_their_order_round_by_round():
    assert run_order(2, 4) == [0, 1, 1, 0, 0, 1, 1, 0]
    assert run_order(3, 2) == [0, 1, 2, 2, 1, 0]
    assert run_order(1, 3) == [0, 0, 0]


def test_the_paired_ratio_compares_runs_of_the_same_round():
    # A minute where everything ran slow (round 2) moves both alike and leaves the ratio.
    assert paired_ratio([10.0, 20.0, 11.0], [10.0, 16.0, 10.0]) == 1.1
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])


def test_the_floor_keeps_each_job_at_fal_as_long_as_the_benchmarks_fake_fal_does():
    # The bot holds every job's status stream open while fal has the job (200 at once under the
    # default load); a floor whose streams end at once would measure one connection, not those.
    timeline = RunConfig().floor_timeline()
    assert [(offset, s["status"], s.get("queue_position")) for offset, s in timeline.changes()] == [
        (0.0, "IN_QUEUE", 4),
        (1.0, "IN_QUEUE", 3),
        (2.0, "IN_QUEUE", 2),
        (3.0, "IN_QUEUE", 1),
        (4.0, "IN_QUEUE", 0),
        (5.0, "IN_PROGRESS", None),
        (10.0, "COMPLETED", None),
    ]
    # Polled, the floor answers what the stream would have said by then.
    assert timeline.status_at(0.5)["queue_position"] == 4
    assert timeline.status_at(9.9)["status"] == "IN_PROGRESS"
    assert timeline.status_at(10.0)["status"] == "COMPLETED"
    no_queue = RunConfig(queue_seconds=0.0, run_seconds=2.0).floor_timeline()
    assert [s["status"] for _, s in no_queue.changes()] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert no_queue.started == 0.0


def test_the_floor_is_left_out_where_it_is_not_the_loads_traffic():
    assert RunConfig(jobs=200).floor_applies
    # fal's account limit: jobs handed back and submitted again, cancels; not the floor's job.
    assert not RunConfig(jobs=200, fal_limit=20).floor_applies
    assert not RunConfig(jobs=200, image_bytes=2 * 1024 * 1024).floor_applies
