"""Sandbox and benchmark: the real bot against a fake Discord and a fake fal, with no accounts.

    python -m tools.sandbox                       # one /kontext job, shown as a member sees it
    python -m tools.sandbox --jobs 200 --arrival-seconds 10 --concurrency 200
    python -m tools.sandbox --jobs 100 --burst --concurrency 40
    python -m tools.sandbox --jobs 200 --arrival-seconds 10 --compare
    python -m tools.sandbox --fairness            # two servers share fal's account limit
    python -m tools.sandbox --growth              # 100, 300 and 1,000 jobs at 33 a second
    python -m tools.sandbox --jobs 200 --arrival-seconds 10 --against ../other --repeat 6

What runs: the fake Discord (REST + gateway) and the fake fal queue (fakes/) start in this
process on 127.0.0.1, and the real, unmodified bot runs as a subprocess (`python bot.py`) pointed
at them. The bot gets its *production* timing defaults (EDIT_INTERVAL 1.5 s, POLL_INTERVAL 1.0 s,
...; not the tests' fast ones) with LOG_LEVEL=INFO; `--concurrency` is its MAX_CONCURRENT_JOBS.
The fake Discord validates request bodies against Discord's OpenAPI spec only with `--validate`
(validation costs the fake, not the bot).

The fake fal is the realistic one (results without `file_size`, inputs fetched when a job
starts, a running job ignoring cancel); `--fal-limit N` gives the account fal's concurrency limit
(at most N jobs in progress, the rest IN_QUEUE in arrival order). Every fal job is scripted the
same: `--queue-seconds` in fal's queue (its position counting down
`--queue-updates` times), then `--run-seconds` in progress, then one result image of
`--image-bytes`. Each job has a unique prompt, which ties the fal job to its Discord reply.

What is measured (all times on this process's monotonic clock, which both fakes use):

* jobs delivered: the reply carries the result files.
* fal requests per job: the fake fal's recorded submit/status/stream/result/cancel requests
  (image downloads excluded) divided by jobs.
* Discord REST calls per job: recorded requests whose path carries the job's interaction id or
  token (acknowledgement callback, webhook edits and follow-ups); edits are the PATCHes of
  webhook messages. "States shown" counts the distinct versions of the reply a member saw
  (the "thinking…" placeholder included); the target is calls <= states + 1.
* completion -> posted: from the moment the fake fal reports the job COMPLETED (its
  `completed_at`) to the moment the fake Discord stored the reply carrying the files.
* acknowledgement latency: interaction dispatched on the gateway -> callback received.
* bot CPU: utime + stime of the bot process (/proc/<pid>/stat) from "bot ready" to "all
  delivered", divided by jobs; peak RSS is VmHWM from /proc/<pid>/status.

Everything started here (fakes, bot) is stopped before exit; only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakes.bot_process import PROJECT_ROOT, BotProcess
from fakes.discord_fake import (
    CALLBACK_WINDOW,
    IS_COMPONENTS_V2,
    LOADING,
    FakeDiscord,
    FakeMessage,
    InteractionHandle,
    text_displays,
    walk_components,
)
from fakes.fal_fake import FakeFal, JobScript, make_image
from fakes.world import DISCORD_TOKEN, FAL_KEY, World
from services.config import Settings
from services.policy import GuildPolicy
from tools import floor

MIB = 1024 * 1024
FAL_QUEUE_OPS = ("submit", "status", "stream", "result", "cancel")
# fal's storage: the durable copies of input images (token, upload; the initiate flow as fallback).
FAL_STORAGE_OPS = ("storage_token", "upload", "storage_initiate", "upload_put")
FINAL_MARKS = ("✅", "❌", "🚫", "🛡️", "⚠️", "No image")

# The bot's own defaults (services/config.py), overriding the tests' FAST_SETTINGS.
PRODUCTION_SETTINGS: dict[str, str] = {
    "EDIT_INTERVAL": str(Settings.edit_interval),
    "POLL_INTERVAL": str(Settings.poll_interval),
    "RETRY_BASE_DELAY": str(Settings.retry_base_delay),
    "FAL_READ_TIMEOUT": str(Settings.read_timeout),
    "FAL_STREAM_EVENT_TIMEOUT": str(Settings.stream_event_timeout),
    "JOB_TIMEOUT": str(Settings.job_timeout),
    "LOG_LEVEL": "INFO",
}


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One run: the load, fal's scripted timings and the bot's settings that matter here."""

    jobs: int = 1
    concurrency: int | None = Settings.max_concurrent_jobs
    arrival_seconds: float = 0.0
    burst: bool = False
    queue_seconds: float = 5.0
    queue_updates: int = 5
    run_seconds: float = 5.0
    run_jitter: float = 0.5
    image_bytes: int = MIB
    # Bytes of each job's own input attachment (0: one small image shared by all jobs).
    input_bytes: int = 0
    polling: bool = False
    poll_interval: float = Settings.poll_interval
    validate: bool = False
    prompt: str = "make the sky purple"
    num_images: int = 1
    profile: Path | None = None
    bot_root: Path = PROJECT_ROOT
    py_spy: Path | None = None
    extra_settings: tuple[tuple[str, str], ...] = ()
    label: str = ""
    # fal's account limit (None: fal runs every job at once).
    fal_limit: int | None = None
    # --fairness: a second server sends this many jobs this long after the first server's.
    second_server_jobs: int = 0
    second_server_delay: float = 10.0

    def fal_script(self) -> JobScript:
        updates = max(1, self.queue_updates) if self.queue_seconds > 0 else 1
        positions = tuple(range(updates - 1, -1, -1))
        step = self.queue_seconds / updates if self.queue_seconds > 0 else 0.0
        return JobScript(queue_positions=positions, step=step, run_time=self.run_seconds, image_size=self.image_bytes)

    def fal_scripts(self) -> Callable[[dict[str, Any]], JobScript]:
        """Per job: the run time is spread evenly over run_seconds +- run_jitter (by job number),
        so completions do not line up with the bot's poll ticks as identical timings would."""
        base = self.fal_script()

        def script(payload: dict[str, Any]) -> JobScript:
            match = re.search(r"\(job (\d+)\)$", str(payload.get("prompt", "")))
            index = int(match.group(1)) - 1 if match else 0
            fraction = (index * 0.618034) % 1.0  # golden-ratio spread: even for any job count
            run_time = max(0.0, self.run_seconds + (2 * fraction - 1) * self.run_jitter)
            return dataclasses.replace(base, run_time=run_time)

        return script

    def bot_settings(self) -> dict[str, str]:
        settings = dict(PRODUCTION_SETTINGS)
        if self.concurrency is not None:
            settings["MAX_CONCURRENT_JOBS"] = str(self.concurrency)
        if self.polling:
            settings.update(FAL_STATUS_STREAM="0", POLL_INTERVAL=str(self.poll_interval))
        settings.update(self.extra_settings)
        return settings

    def mode(self) -> str:
        return f"polling every {self.poll_interval:g} s" if self.polling else "status stream"

    def arrival_times(self) -> list[float]:
        """Offsets (s) at which each job's /kontext is sent: all at 0 for a burst, else even."""
        if self.burst or self.jobs <= 1 or self.arrival_seconds <= 0:
            return [0.0] * self.jobs
        gap = self.arrival_seconds / (self.jobs - 1)
        return [i * gap for i in range(self.jobs)]

    @property
    def floor_applies(self) -> bool:
        """tools.floor models this load's traffic: one 1 MiB result, a small input, one server,
        every job let in by fal as it comes (no account limit: no jobs handed back)."""
        return (
            self.image_bytes == MIB
            and self.num_images == 1
            and not self.input_bytes
            and not self.second_server_jobs
            and self.fal_limit is None
        )

    def floor_timeline(self) -> floor.Timeline:
        """Each job's time at fal, as the fake fal scripts it, for tools.floor's status stream."""
        script = self.fal_script()
        return floor.Timeline(script.queue_positions, script.step, script.run_time)

    @property
    def all_jobs(self) -> int:
        return self.jobs + self.second_server_jobs

    def delivery_timeout(self) -> float:
        width = min(self.concurrency or self.all_jobs, self.fal_limit or self.all_jobs)
        waves = math.ceil(self.all_jobs / max(1, width))
        per_job = self.queue_seconds + self.run_seconds + (self.poll_interval if self.polling else 0) + 2
        return self.arrival_seconds + waves * per_job * 1.5 + 60


# -- the bot process and the world -------------------------------------------------------------


class SandboxBot(BotProcess):
    """`python ROOT/bot.py`, or `python -m cProfile -o FILE ROOT/bot.py` when profiling."""

    def __init__(self, *, profile: Path | None, bot_root: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.profile = profile
        self.bot_root = bot_root

    def command(self) -> list[str]:
        profiler = ["-m", "cProfile", "-o", str(self.profile.resolve())] if self.profile else []
        return [sys.executable, *profiler, str((self.bot_root / "bot.py").resolve())]


class SandboxWorld(World):
    bot_class = SandboxBot

    def __init__(self, *args: Any, profile: Path | None = None, bot_root: Path = PROJECT_ROOT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.profile = profile
        self.bot_root = bot_root

    def bot_options(self) -> dict[str, object]:
        return {"profile": self.profile, "bot_root": self.bot_root}


@contextlib.asynccontextmanager
async def sandbox_world(config: RunConfig, data_dir: Path) -> AsyncIterator[SandboxWorld]:
    """Both fakes and the started bot; everything is stopped on the way out, whatever happens."""
    discord = FakeDiscord(token=DISCORD_TOKEN, spec_validation=config.validate)
    fal = FakeFal(key=FAL_KEY, default=config.fal_script(), concurrency_limit=config.fal_limit)
    if config.all_jobs > 1:
        fal.script_for(config.fal_scripts())
    await discord.start()
    try:
        await fal.start()
        world = SandboxWorld(
            discord, fal, data_dir, config.bot_settings(), profile=config.profile, bot_root=config.bot_root
        )
        try:
            await world.start_bot()
            yield world
        finally:
            if world.bot is not None:
                try:
                    await world.bot.stop(timeout=15)
                except AssertionError as exc:  # it was killed after the timeout
                    print(f"warning: {exc}", file=sys.stderr)
            await fal.stop()
    finally:
        await discord.stop()


# -- /proc readings ---------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of `pid` in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields from "state" (the 3rd) on
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- what a member sees -----------------------------------------------------------------------


def state_key(snapshot: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        snapshot.get("content"),
        json.dumps(snapshot.get("embeds"), sort_keys=True),
        json.dumps(snapshot.get("components"), sort_keys=True),
        bool(snapshot.get("flags", 0) & LOADING),
        tuple(sorted(snapshot.get("files") or {})),
    )


def distinct_states(message: FakeMessage) -> list[dict[str, Any]]:
    """The versions of `message` a member saw, in order (repeated identical edits collapsed)."""
    states: list[dict[str, Any]] = []
    for snapshot in message.history:
        if not states or state_key(snapshot) != state_key(states[-1]):
            states.append(snapshot)
    return states


def describe_state(snapshot: Mapping[str, Any], bot_name: str) -> list[str]:
    """A few lines: the content, then a short summary of embed, buttons and files."""
    content = snapshot.get("content") or ""
    if snapshot.get("flags", 0) & IS_COMPONENTS_V2:  # a result card: its texts, line by line
        content = "\n".join(text_displays(snapshot.get("components") or []))
    if not content and snapshot.get("flags", 0) & LOADING:
        content = f"{bot_name} is thinking…"
    lines = (content or "(no text)").splitlines()
    for embed in snapshot.get("embeds") or []:
        parts = [(embed.get("author") or {}).get("name"), (embed.get("description") or "").replace("\n", " ")[:80]]
        parts += [f"{f['name']}: {f['value']}" for f in embed.get("fields") or []]
        parts.append((embed.get("footer") or {}).get("text"))
        lines.append("embed: " + " | ".join(p for p in parts if p))
    buttons = [
        f"[{(c.get('emoji') or {}).get('name', '')}{c.get('label', '')}]"
        for c in walk_components(snapshot.get("components") or [])
        if c.get("type") == 2
    ]
    if buttons:
        lines.append("buttons: " + " ".join(buttons))
    files = snapshot.get("files") or {}
    if files:
        lines.append("files: " + ", ".join(f"{name} ({len(data) / 1024:.0f} KiB)" for name, data in files.items()))
    return lines


def print_conversation(handle: InteractionHandle, bot_name: str, command: str) -> None:
    print(f"\n{handle.user['username']:<8} {command}")
    messages = ([handle.original] if handle.original else []) + handle.followups
    for message in messages:
        for snapshot in distinct_states(message):
            offset = snapshot["time"] - handle.dispatched_at
            first, *rest = describe_state(snapshot, bot_name)
            print(f"{'bot':<8} +{offset:6.2f}s  {first}")
            for line in rest:
                print(f"{'':<8} {'':>8}  {line}")
    if handle.callback is None:
        print(f"{'':<8} (the interaction was never acknowledged)")


def save_files(handle: InteractionHandle, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    for message in ([handle.original] if handle.original else []) + handle.followups:
        for name, data in message.files.items():
            path = out / name
            path.write_bytes(data)
            saved.append(path)
    return saved


# -- running the load -------------------------------------------------------------------------


def job_prompt(config: RunConfig, index: int) -> str:
    return config.prompt if config.all_jobs == 1 else f"{config.prompt} (job {index + 1})"


def posted_at(handle: InteractionHandle) -> float | None:
    """When the reply (or a follow-up) first carried the result files."""
    times = [s["time"] for m in [handle.original, *handle.followups] if m for s in m.history if s.get("files")]
    return min(times) if times else None


def is_settled(handle: InteractionHandle) -> bool:
    """Delivered, failed visibly, or lost (never acknowledged in Discord's window)."""
    message = handle.original
    if message is not None and (message.files or message.content.startswith(FINAL_MARKS)):
        return True
    if handle.callback is not None and handle.callback.get("type") == 4:
        return True  # answered at once (a refusal): no job was started
    return handle.callback is None and handle.age > CALLBACK_WINDOW + 5


async def send_commands(world: World, config: RunConfig, image: dict[str, Any]) -> list[InteractionHandle]:
    """Every job's /kontext, each from its own member (per-member limits must not refuse the load,
    as at scale): the first server's on the arrival schedule, then the second server's, if any."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    senders: list[tuple[str, str | None, float]] = [
        ("alice" if i == 0 else world.discord.add_member(name=f"member{i}")["id"], None, offset)
        for i, offset in enumerate(config.arrival_times())
    ]
    if config.second_server_jobs:
        server_b = world.discord.add_guild("Server B")
        senders += [
            (world.discord.add_member(name=f"b-member{i}", guild=server_b)["id"], server_b.channel_id, delay)
            for i, delay in enumerate([config.second_server_delay] * config.second_server_jobs)
        ]
    own_inputs = [input_of_size(world, config.input_bytes) for _ in senders] if config.input_bytes else []

    async def one(index: int, user: str, channel_id: str | None, offset: float) -> InteractionHandle:
        await asyncio.sleep(max(0.0, start + offset - loop.time()))
        options: dict[str, Any] = {
            "image": own_inputs[index] if own_inputs else image,
            "prompt": job_prompt(config, index),
        }
        if config.num_images != 1:
            options["num_images"] = config.num_images
        return await world.kontext(user=user, channel_id=channel_id, **options)

    return list(await asyncio.gather(*(one(i, *sender) for i, sender in enumerate(senders))))


async def allow_the_load(world: World, config: RunConfig) -> None:
    """A server's default monthly budget (GuildPolicy) is smaller than a big load: its moderator
    raises it, as the operator of a busy server would."""
    images = config.jobs * config.num_images
    if images <= (GuildPolicy().monthly_image_budget or images):
        return
    handle = await world.discord.invoke_slash("kontext-admin limits", options={"monthly_images": images}, user="mod")
    await handle.wait_for_callback()
    print(f"a moderator raised the server's monthly image budget to {images} for this load", flush=True)


def input_of_size(world: World, size: int) -> dict[str, Any]:
    """A member's own photo: a PNG of `size` incompressible bytes under its own attachment URL."""
    data, width, height = make_image("png", size, 1024, 768)
    return world.discord.add_cdn_file(data, "photo.png", "image/png", width=width, height=height)


def input_attachment(world: World, path: Path | None) -> dict[str, Any]:
    if path is None:
        return world.input_image()
    suffix = path.suffix.lower().lstrip(".")
    kind = {"jpg": "jpeg"}.get(suffix, suffix)
    return world.discord.add_cdn_file(path.read_bytes(), path.name, f"image/{kind}")


# -- results ----------------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(p50, p95, max) by nearest rank, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return rank(0.50), rank(0.95), ordered[-1]


@dataclass
class RunResult:
    config: RunConfig
    jobs: int
    delivered: int
    wall_seconds: float
    fal_requests: dict[str, int]
    discord_calls: int
    discord_edits: int
    discord_acks: int
    discord_other: int
    states_shown: int
    over_budget_jobs: int  # jobs with more Discord calls than states shown + 1
    completion_to_posted_ms: list[float]
    ack_ms: list[float]
    unacknowledged: int
    refused: int
    bot_cpu_seconds: float
    bot_user_seconds: float
    bot_peak_rss_mib: float
    tool_cpu_seconds: float
    rejections: list[str] = field(default_factory=list)
    bot_warnings: int = 0
    # With --repeat: bot CPU per job (ms) of every run of the same load; this one is the median.
    cpu_per_job_runs: tuple[float, ...] = ()
    # Per job, in command order: seconds from the command to the job's start at fal.
    start_waits: list[float | None] = field(default_factory=list)
    # Jobs of the first server not yet started at fal when the second server's first command came.
    first_server_ahead: int = 0
    # tools.floor's CPU per job for the same load, measured right after the run (ms).
    floor_ms: float | None = None

    @property
    def fal_per_job(self) -> float:
        return sum(self.fal_requests.get(op, 0) for op in FAL_QUEUE_OPS) / max(1, self.jobs)

    def per_job(self, value: float) -> float:
        return value / max(1, self.jobs)

    @property
    def cpu_ms_per_job(self) -> float:
        """Bot CPU per job (ms); with --repeat the median of every run's, which for an even number
        of runs is no run's own (the mean of the middle two), not the faster of them."""
        if self.cpu_per_job_runs:
            return statistics.median(self.cpu_per_job_runs)
        return self.per_job(self.bot_cpu_seconds) * 1000


def collect(
    world: World,
    config: RunConfig,
    handles: list[InteractionHandle],
    first_request: int,
    cpu: tuple[float, float],
    rss: float,
    wall: float,
    tool_cpu: float,
) -> RunResult:
    discord, fal = world.discord, world.fal
    requests = discord.requests[first_request:]
    completed_at = {job.payload.get("prompt"): job.completed_at for job in fal.jobs.values() if job.completed_at}
    # A job handed back from fal's line was cancelled there unstarted and submitted again later.
    started_at = {job.payload.get("prompt"): job.started_at for job in fal.jobs.values() if job.started_at}
    ack_age = {d["id"]: d["age"] for _, kind, d in discord.events if kind == "callback"}
    calls = edits = acks = over_budget = states = 0
    attributed: set[int] = set()
    delays, ack_ms = [], []
    for index, handle in enumerate(handles):
        mine = [i for i, r in enumerate(requests) if handle.token in r.path]
        attributed.update(mine)
        n_calls = len(mine)
        n_edits = sum(1 for i in mine if requests[i].method == "PATCH" and "/messages/" in requests[i].path)
        n_states = sum(len(distinct_states(m)) for m in [handle.original, *handle.followups] if m)
        calls, edits, acks, states = (
            calls + n_calls,
            edits + n_edits,
            acks + (handle.callback is not None),
            states + n_states,
        )
        over_budget += n_calls > n_states + 1
        if handle.id in ack_age:
            ack_ms.append(ack_age[handle.id] * 1000)
        done, posted = completed_at.get(job_prompt(config, index)), posted_at(handle)
        if done is not None and posted is not None:
            delays.append((posted - done) * 1000)
    log = world.bot.log_text() if world.bot else ""
    start_waits = [
        started - handle.dispatched_at if (started := started_at.get(job_prompt(config, i))) is not None else None
        for i, handle in enumerate(handles)
    ]
    ahead = 0
    if config.second_server_jobs:
        second_arrived = handles[config.jobs].dispatched_at
        ahead = sum(
            1
            for i in range(config.jobs)
            if (started := started_at.get(job_prompt(config, i))) is None or started > second_arrived
        )
    return RunResult(
        config=config,
        jobs=len(handles),
        delivered=sum(1 for h in handles if posted_at(h) is not None),
        wall_seconds=wall,
        fal_requests={op: fal.count(op) for op in (*FAL_QUEUE_OPS, *FAL_STORAGE_OPS, "file")},
        discord_calls=calls,
        discord_edits=edits,
        discord_acks=acks,
        discord_other=len(requests) - len(attributed),
        states_shown=states,
        over_budget_jobs=over_budget,
        completion_to_posted_ms=delays,
        ack_ms=ack_ms,
        unacknowledged=sum(1 for h in handles if h.callback is None),
        refused=sum(1 for h in handles if h.callback is not None and h.callback.get("type") == 4),
        bot_cpu_seconds=sum(cpu),
        bot_user_seconds=cpu[0],
        bot_peak_rss_mib=rss,
        tool_cpu_seconds=tool_cpu,
        rejections=[f"{status} {where}" for status, _, where in discord.rejections],
        bot_warnings=sum(1 for line in log.splitlines() if re.search(r"WARNING|ERROR|CRITICAL", line)),
        start_waits=start_waits,
        first_server_ahead=ahead,
    )


@contextlib.asynccontextmanager
async def sampling(pid: int, output: Path | None) -> AsyncIterator[None]:
    """Sample the bot with py-spy (all threads, flame graph SVG or speedscope by suffix) while
    the body runs; py-spy is looked up on PATH or in $PY_SPY."""
    if output is None:
        yield
        return
    binary = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if binary is None:
        raise SystemExit("py-spy not found: pip install --target /tmp/pyspy py-spy; PY_SPY=/tmp/pyspy/bin/py-spy")
    fmt = "speedscope" if output.suffix == ".json" else "raw" if output.suffix == ".txt" else "flamegraph"
    command = [binary, "record", "--pid", str(pid), "--threads", "--rate", "250", "--format", fmt, "-o", str(output)]
    spy = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        yield
    finally:
        if spy.returncode is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                await asyncio.wait_for(spy.wait(), 30)
            except TimeoutError:
                spy.kill()
                await spy.wait()


async def run_once(
    config: RunConfig, data_dir: Path, *, show: bool, out: Path | None, input_path: Path | None
) -> RunResult:
    async with sandbox_world(config, data_dir) as world, sampling(world.bot.pid if world.bot else 0, config.py_spy):
        assert world.bot is not None
        pid = world.bot.pid
        image = input_attachment(world, input_path)
        await allow_the_load(world, config)
        first_request = len(world.discord.requests)
        tool_cpu0, cpu0, t0 = time.process_time(), cpu_times(pid), time.monotonic()
        handles = await send_commands(world, config, image)
        try:
            await world.discord.wait_until(lambda: all(is_settled(h) for h in handles), config.delivery_timeout())
        except TimeoutError:
            print(f"warning: not every job settled within {config.delivery_timeout():.0f}s", file=sys.stderr)
        wall = time.monotonic() - t0
        cpu1 = cpu_times(pid)
        cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
        rss, tool_cpu = peak_rss_mib(pid), time.process_time() - tool_cpu0
        if show:
            command = f"/kontext image:{image['filename']} prompt:{config.prompt}"
            print_conversation(handles[0], str(world.discord.bot_user["username"]), command)
            if out is not None:
                for path in save_files(handles[0], out):
                    print(f"\nsaved {path}")
        return collect(world, config, handles, first_request, cpu, rss, wall, tool_cpu)


# -- reports ----------------------------------------------------------------------------------


def fmt_pct(values: Sequence[float], unit: str = "ms") -> str:
    stats = percentiles(values)
    if stats is None:
        return "n/a"
    return " / ".join(f"{v:.0f}" for v in stats) + f" {unit}"


def describe_load(config: RunConfig, with_mode: bool = True) -> str:
    arrival = "in one burst" if config.burst or config.arrival_seconds <= 0 else f"over {config.arrival_seconds:g} s"
    return (
        f"{config.jobs} job(s) {arrival}"
        + (f", MAX_CONCURRENT_JOBS={config.concurrency}" if config.concurrency else "")
        + "; fal: "
        f"{config.queue_seconds:g} s queued ({config.queue_updates} position updates), "
        f"{config.run_seconds:g} s in progress"
        + (f" (+-{config.run_jitter:g} s)" if config.jobs > 1 and config.run_jitter else "")
        + f", {config.image_bytes / MIB:g} MiB x {config.num_images} image(s)"
        + (f"; each job's own {config.input_bytes / MIB:g} MiB input" if config.input_bytes else "")
        + (f"; fal's account limit {config.fal_limit} at once" if config.fal_limit else "")
        + (
            f"; server B: {config.second_server_jobs} job(s) {config.second_server_delay:g} s after"
            if config.second_server_jobs
            else ""
        )
        + (f"; bot follows jobs by {config.mode()}" if with_mode else "")
    )


def fmt_waits(values: Sequence[float]) -> str:
    stats = percentiles(values)
    return "n/a" if stats is None else " / ".join(f"{v:.1f}" for v in stats) + " s"


def fairness_rows(result: RunResult) -> list[tuple[str, str]]:
    """Each server's wait for its jobs to start at fal, against first come, first served."""
    config = result.config
    if not config.second_server_jobs:
        return []
    first, second = result.start_waits[: config.jobs], result.start_waits[config.jobs :]
    job_length = config.run_seconds
    started = [w for w in second if w is not None]
    limit = config.fal_limit or config.all_jobs
    fcfs = result.first_server_ahead / limit * job_length
    return [
        (
            "server A: command -> start at fal p50/p95/max",
            fmt_waits([w for w in first if w is not None]) + f" ({config.jobs} jobs)",
        ),
        (
            "server B: command -> start at fal p50/p95/max",
            fmt_waits(started)
            + f" ({config.second_server_jobs} jobs, {config.second_server_delay:g} s after A's)"
            + (f"; the last: {max(started) / job_length:.2f} job-lengths" if started else ""),
        ),
        (
            "server B, first come, first served",
            f"{result.first_server_ahead} of A's jobs ahead in fal's line: about {fcfs:.0f} s "
            f"({fcfs / job_length:.1f} job-lengths)",
        ),
    ]


def report_rows(result: RunResult) -> list[tuple[str, str]]:
    per = result.per_job
    fal_ops = ", ".join(f"{op} {per(result.fal_requests.get(op, 0)):.2f}" for op in FAL_QUEUE_OPS)
    return [
        ("jobs delivered", f"{result.delivered} / {result.jobs} (refused at once: {result.refused})"),
        ("fal queue requests per job", f"{result.fal_per_job:.2f} ({fal_ops})"),
        (
            "fal storage requests per job",
            ", ".join(f"{op} {per(result.fal_requests.get(op, 0)):.2f}" for op in FAL_STORAGE_OPS),
        ),
        (
            "Discord calls per job",
            f"{per(result.discord_calls):.2f} (ack {per(result.discord_acks):.2f}, "
            f"edits {per(result.discord_edits):.2f}; other calls in the run: {result.discord_other})",
        ),
        (
            "states shown per job",
            f"{per(result.states_shown):.2f} (jobs with calls > states + 1: {result.over_budget_jobs})",
        ),
        ("fal COMPLETED -> posted p50/p95/max", fmt_pct(result.completion_to_posted_ms)),
        ("acknowledgement p50/p95/max", fmt_pct(result.ack_ms) + f" (never acknowledged: {result.unacknowledged})"),
        (
            "bot CPU per job",
            f"{per(result.bot_cpu_seconds) * 1000:.1f} ms ({result.bot_cpu_seconds:.2f} s in all: "
            f"user {result.bot_user_seconds:.2f}, system {result.bot_cpu_seconds - result.bot_user_seconds:.2f})",
        ),
        *([("bot CPU per job, all runs", runs_text(result.cpu_per_job_runs))] if result.cpu_per_job_runs else []),
        *(
            [("the floor: its traffic alone", f"{result.floor_ms:.1f} ms per job (python -m tools.floor)")]
            if result.floor_ms
            else []
        ),
        ("bot peak RSS (VmHWM)", f"{result.bot_peak_rss_mib:.1f} MiB"),
        ("wall time, first command -> all settled", f"{result.wall_seconds:.1f} s"),
        ("sandbox's own CPU (fakes)", f"{result.tool_cpu_seconds:.1f} s"),
        ("bot log warnings/errors", str(result.bot_warnings)),
        *fairness_rows(result),
    ]


def runs_text(values: Sequence[float]) -> str:
    ordered = sorted(values)
    return f"median {statistics.median(ordered):.1f} ms of {len(ordered)} runs: " + ", ".join(
        f"{v:.1f}" for v in ordered
    )


def median_run(runs: list[RunResult]) -> RunResult:
    """The run with the median bot CPU (the lower middle one of an even number), carrying every
    run's figure: on a shared machine one run's CPU time can be off by a fifth either way. Its
    other figures are reported, and the median of every run's CPU (`cpu_ms_per_job`)."""
    cpu = [r.per_job(r.bot_cpu_seconds) * 1000 for r in runs]
    chosen = sorted(runs, key=lambda r: r.per_job(r.bot_cpu_seconds))[(len(runs) - 1) // 2]
    chosen.cpu_per_job_runs = tuple(cpu)
    return chosen


def print_report(result: RunResult) -> None:
    print(f"\n== {describe_load(result.config)}")
    rows = report_rows(result)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if result.rejections:
        print(f"  Discord rejected {len(result.rejections)} call(s), e.g. {result.rejections[:3]}")


def compare_table(results: list[RunResult]) -> str:
    """A markdown table with one column per run."""

    def cells(result: RunResult) -> list[str]:
        per = result.per_job
        delays, acks = percentiles(result.completion_to_posted_ms), percentiles(result.ack_ms)
        return [
            f"{result.delivered}/{result.jobs}",
            f"{result.fal_per_job:.2f}",
            f"{per(result.discord_calls):.2f} ({per(result.discord_edits):.2f} edits)",
            f"{per(result.states_shown):.2f}",
            "n/a" if delays is None else f"{delays[0]:.0f} / {delays[1]:.0f} / {delays[2]:.0f}",
            "n/a" if acks is None else f"{acks[1]:.0f} / {acks[2]:.0f}",
            f"{result.cpu_ms_per_job:.1f}"
            + (
                f" ({min(result.cpu_per_job_runs):.1f}–{max(result.cpu_per_job_runs):.1f})"
                if result.cpu_per_job_runs
                else ""
            ),
            f"{result.bot_peak_rss_mib:.0f}",
            "n/a"
            if not result.floor_ms
            else f"{result.floor_ms:.1f} ({per(result.bot_cpu_seconds) * 1000 / result.floor_ms:.1f}×)",
        ]

    names = [
        "Jobs delivered",
        "fal queue requests / job",
        "Discord calls / job",
        "Reply states shown / job",
        "fal COMPLETED → posted, p50 / p95 / max (ms)",
        "Acknowledgement p95 / max (ms)",
        "Bot CPU / job (ms)",
        "Bot peak RSS (MiB)",
        "Floor: the same traffic alone, CPU / job (ms) (bot ÷ floor)",
    ]
    repeats = max(len(r.cpu_per_job_runs) for r in results)
    if repeats > 1:
        names[names.index("Bot CPU / job (ms)")] = f"Bot CPU / job, median of {repeats} runs (range) (ms)"
    columns = [cells(r) for r in results]
    lines = [
        "| | " + " | ".join(r.config.label or r.config.mode() for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(col[i] for col in columns) + " |")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.sandbox",
        description="Run the real bot against a fake Discord and a fake fal: one job shown as a member "
        "sees it (default), or a load benchmark with --jobs N.",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--jobs", type=int, default=1, help="number of /kontext commands (default 1: the sandbox)")
    load.add_argument(
        "--concurrency",
        type=int,
        default=Settings.max_concurrent_jobs,
        help="the bot's MAX_CONCURRENT_JOBS (default: unset, no cap)",
    )
    load.add_argument(
        "--arrival-seconds",
        type=float,
        default=0.0,
        help="spread the commands evenly over this many seconds (default 0: all at once)",
    )
    load.add_argument("--burst", action="store_true", help="send every command at the same instant")
    fal = parser.add_argument_group("fake fal")
    fal.add_argument(
        "--queue-seconds",
        type=float,
        default=None,
        help="seconds each job waits in fal's queue (default 5; 0 with --fairness, where fal's limit makes the wait)",
    )
    fal.add_argument(
        "--fal-limit",
        type=int,
        default=None,
        metavar="N",
        help="fal's account limit: at most N jobs in progress, the rest IN_QUEUE in arrival order "
        "(fal: 2 for a new account, up to 40; default: none, every job runs at once; 4 with --fairness)",
    )
    fal.add_argument(
        "--queue-updates",
        type=int,
        default=5,
        help="how many queue positions fal reports while a job waits (default 5)",
    )
    fal.add_argument("--run-seconds", type=float, default=5.0, help="seconds each job is in progress (default 5)")
    fal.add_argument(
        "--run-jitter",
        type=float,
        default=0.5,
        help="benchmark: spread run times evenly over run-seconds +- this (default 0.5)",
    )
    fal.add_argument("--image-bytes", type=int, default=MIB, help="bytes per result image (default 1 MiB)")
    load.add_argument(
        "--input-bytes",
        type=int,
        default=0,
        help="give each job its own input attachment of this many bytes (default: one small image for all)",
    )
    bot = parser.add_argument_group("bot")
    bot.add_argument(
        "--polling", action="store_true", help="FAL_STATUS_STREAM=0: poll fal's status instead of streaming"
    )
    bot.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="POLL_INTERVAL in seconds (default 1.0; fal-client polls every 0.1); implies --polling",
    )
    bot.add_argument(
        "--bot-root",
        type=Path,
        default=PROJECT_ROOT,
        metavar="DIR",
        help="run DIR/bot.py, e.g. an export of another commit (default: this checkout)",
    )
    bot.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the bot under cProfile and write its stats to FILE (pstats format)",
    )
    bot.add_argument(
        "--bot-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other bot setting, e.g. EDIT_INTERVAL=3 (repeatable)",
    )
    bot.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="sample the bot with py-spy during the load: FILE.svg flame graph, .json speedscope, "
        ".txt collapsed stacks (py-spy from PATH or $PY_SPY)",
    )
    modes = parser.add_argument_group("benchmarks")
    modes.add_argument(
        "--fairness",
        action="store_true",
        help="two servers share fal's account limit: server A sends --jobs (default 40) at once, server B "
        "sends 2 jobs --second-server-delay s later; reports both servers' waits to start at fal",
    )
    modes.add_argument(
        "--second-server-delay",
        type=float,
        default=10.0,
        metavar="S",
        help="--fairness: seconds between server A's commands and server B's (default 10: A's first jobs "
        "have run, so fal's limit has shown)",
    )
    modes.add_argument(
        "--growth",
        action="store_true",
        help=f"run {', '.join(map(str, GROWTH_JOBS))} jobs at {GROWTH_RATE:.0f} commands a second and print "
        "a table of how CPU, memory and latency grow",
    )
    modes.add_argument(
        "--compare",
        action="store_true",
        help="run the load three times (stream, polling 1.0 s, polling 0.1 s) and print a markdown table",
    )
    modes.add_argument(
        "--against",
        type=Path,
        metavar="DIR",
        help="run this checkout's bot and DIR's (another checkout, e.g. a git worktree of main) under the "
        "same load, in alternating order with --repeat, and print both with the median ratio of their CPU "
        "per job over runs of the same round",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each load N times and report the median of the runs' bot CPU, with every run's "
        "figure, and the other figures of the run at the median (the lower middle of an even N; CPU "
        "time on a shared machine varies from run to run); with several loads, "
        "round by round, every other round in reverse order",
    )
    parser.add_argument(
        "--validate", action="store_true", help="validate every Discord request against the OpenAPI spec (slower fake)"
    )
    sandbox = parser.add_argument_group("sandbox (--jobs 1)")
    sandbox.add_argument("--prompt", default="make the sky purple", help="the prompt")
    sandbox.add_argument("--num-images", type=int, default=1, choices=range(1, 5), help="num_images option (1-4)")
    sandbox.add_argument("--input", type=Path, help="an image file to attach (default: a generated PNG)")
    sandbox.add_argument(
        "--out", type=Path, default=Path("sandbox-out"), help="folder for the result files (default %(default)s)"
    )
    parser.add_argument(
        "--keep-data",
        type=Path,
        metavar="DIR",
        help="use DIR as the bot's DATA_DIR and keep it (bot.log, database); default: a temp dir",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.concurrency is not None and args.concurrency < 1) or args.repeat < 1:
        parser.error("--jobs, --concurrency and --repeat must be at least 1")
    if any("=" not in item for item in args.bot_setting):
        parser.error("--bot-setting takes NAME=VALUE")
    if (args.profile or args.py_spy) and (args.compare or args.growth or args.against):
        parser.error("--profile and --py-spy profile one run; leave out --compare, --growth and --against")
    if sum((args.compare, args.growth, args.fairness)) > 1:
        parser.error("--compare, --growth and --fairness are separate benchmarks: choose one")
    if args.against and (args.compare or args.growth or args.bot_root != PROJECT_ROOT):
        parser.error(
            "--against compares this checkout with DIR under one load: leave out --compare, --growth and --bot-root"
        )
    if args.fal_limit is not None and args.fal_limit < 1:
        parser.error("--fal-limit must be at least 1")
    return args


def config_from(args: argparse.Namespace) -> RunConfig:
    fairness = args.fairness
    return RunConfig(
        jobs=40 if fairness and args.jobs == 1 else args.jobs,
        concurrency=args.concurrency,
        arrival_seconds=0.0 if args.burst else args.arrival_seconds,
        burst=args.burst,
        queue_seconds=args.queue_seconds if args.queue_seconds is not None else 0.0 if fairness else 5.0,
        fal_limit=args.fal_limit or (4 if fairness else None),
        second_server_jobs=2 if fairness else 0,
        second_server_delay=args.second_server_delay,
        queue_updates=args.queue_updates,
        run_seconds=args.run_seconds,
        run_jitter=args.run_jitter,
        image_bytes=args.image_bytes,
        input_bytes=args.input_bytes,
        polling=args.polling or args.poll_interval is not None,
        poll_interval=args.poll_interval or Settings.poll_interval,
        validate=args.validate,
        prompt=args.prompt,
        num_images=args.num_images,
        profile=args.profile,
        bot_root=args.bot_root,
        py_spy=args.py_spy,
        extra_settings=tuple((name, value) for name, _, value in (item.partition("=") for item in args.bot_setting)),
    )


GROWTH_JOBS = (100, 300, 1000)
GROWTH_RATE = 1000 / 30  # commands a second: 1,000 jobs over 30 s


def growth_configs(base: RunConfig) -> list[RunConfig]:
    return [
        dataclasses.replace(base, jobs=jobs, arrival_seconds=jobs / GROWTH_RATE, burst=False, label=f"{jobs} jobs")
        for jobs in GROWTH_JOBS
    ]


def against_configs(base: RunConfig, other_root: Path) -> list[RunConfig]:
    """This checkout's bot and another checkout's (`--against`), under the same load."""
    return [
        dataclasses.replace(base, label="this checkout"),
        dataclasses.replace(base, bot_root=other_root, label=str(other_root)),
    ]


def run_order(configs: int, repeat: int) -> list[int]:
    """The order of the runs (indexes into the configs): round by round, every other round
    reversed, so a drift of the machine over the minutes weighs on every config alike."""
    order: list[int] = []
    for round_number in range(repeat):
        indexes = range(configs)
        order.extend(indexes if round_number % 2 == 0 else reversed(indexes))
    return order


def paired_ratio(first: Sequence[float], second: Sequence[float]) -> float:
    """The median of first / second over runs of the same round: each pair shares its minute."""
    return statistics.median(a / b for a, b in zip(first, second, strict=True))


def compare_configs(base: RunConfig) -> list[RunConfig]:
    return [
        RunConfig(**{**base.__dict__, "polling": False, "label": "status stream"}),
        RunConfig(**{**base.__dict__, "polling": True, "poll_interval": 1.0, "label": "polling 1.0 s"}),
        RunConfig(**{**base.__dict__, "polling": True, "poll_interval": 0.1, "label": "polling 0.1 s (fal-client)"}),
    ]


@contextlib.contextmanager
def data_dir_for(keep: Path | None, label: str) -> Any:
    if keep is not None:
        path = keep / label if label else keep
        shutil.rmtree(path, ignore_errors=True)
        yield path
        print(f"bot data and log kept in {path}")
        return
    with tempfile.TemporaryDirectory(prefix="kontext-sandbox-") as tmp:
        yield Path(tmp) / "data"


async def main_async(args: argparse.Namespace) -> int:
    base = config_from(args)
    if args.compare:
        configs = compare_configs(base)
    elif args.growth:
        configs = growth_configs(base)
    elif args.against:
        configs = against_configs(base, args.against)
    else:
        configs = [base]
    sandbox = len(configs) == 1 and base.all_jobs == 1
    runs: list[list[RunResult]] = [[] for _ in configs]
    for index in run_order(len(configs), args.repeat):
        config = configs[index]
        label = re.sub(r"[^a-z0-9.]+", "-", config.label.lower()).strip("-")
        attempt = len(runs[index]) + 1
        print(
            f"running: {config.label + ': ' if config.label else ''}{describe_load(config)}"
            + (f" (run {attempt} of {args.repeat})" if args.repeat > 1 else ""),
            flush=True,
        )
        with data_dir_for(args.keep_data, label) as data_dir:
            run = await run_once(
                config, data_dir, show=sandbox, out=args.out if sandbox else None, input_path=args.input
            )
        if not sandbox and config.floor_applies:
            # The same minute, the same machine: what the traffic alone costs.
            measured = await floor.measure(
                config.jobs,
                config.arrival_seconds,
                config.floor_timeline(),
                poll_interval=config.poll_interval if config.polling else None,
            )
            run.floor_ms = measured.ms_per_job
        runs[index].append(run)
        print_report(run)
    cpu = [[r.per_job(r.bot_cpu_seconds) * 1000 for r in config_runs] for config_runs in runs]
    results = [median_run(config_runs) if len(config_runs) > 1 else config_runs[0] for config_runs in runs]
    for result in results:
        if len(result.cpu_per_job_runs) > 1:
            print(
                f"\n  bot CPU per job, {result.config.label or result.config.mode()}: {runs_text(result.cpu_per_job_runs)}"
            )
    if args.profile is not None:
        print(f"\nprofile written to {args.profile} (python -m pstats {args.profile})")
    if args.against:
        print(
            f"\n  this checkout's bot CPU per job / {args.against}'s, median of {args.repeat} same-round "
            f"pairs: {paired_ratio(cpu[0], cpu[1]):.3f}"
        )
    if args.compare or args.growth or args.against:
        load = (
            describe_load(base, with_mode=False)
            if args.compare or args.against
            else f"{GROWTH_RATE:.0f} commands a second; " + (describe_load(configs[0]).split("; ", 1)[1])
        )
        print(f"\nCommand: python -m tools.sandbox {' '.join(sys.argv[1:])}\nLoad: {load}\n")
        print(compare_table(results))
    return 0 if all(r.delivered == r.jobs for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    async def guarded() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # unwind: the bot and fakes are stopped
        return await main_async(args)

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
