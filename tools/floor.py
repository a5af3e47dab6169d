"""The floor under the bot's CPU per job: what the HTTP traffic of one job costs by itself.

    python -m tools.floor                    # 200 jobs over 10 s, as the benchmark's default load
    python -m tools.floor --jobs 1000 --arrival-seconds 30
    python -m tools.floor --poll-interval 0.1   # the job followed by polling instead of the stream

A job of the bot, stripped of everything but its network traffic, is nine HTTP calls and two
megabytes through loopback TCP: the acknowledgement, the input (4 KiB) downloaded, fal's submit,
one status stream (the queue positions, IN_PROGRESS and COMPLETED), a progress edit at the first
queue position and one at IN_PROGRESS, fal's result, the result image (1 MiB) downloaded and the
final edit carrying it (multipart). The stream follows the job's timeline at fal as the
benchmark's fake fal scripts it (by default five positions a second apart, then five seconds in
progress), so the jobs of a load are at fal together and their streams are open at once, each on
its own connection, as the bot's are; with a poll interval the status is polled instead, as the
bot's FAL_STATUS_STREAM=0 does. Discord's side and fal's are two ports, so their calls do not
share connections, as the bot's do not. This tool makes exactly those calls, with aiohttp on
uvloop like the bot, against a trivial aiohttp server, and reports the client's CPU per job. The
server runs in this process and the client in a child, so only the client's CPU is counted, as
the benchmark counts only the bot's. The bot's CPU per job divided by this is its overhead over
doing nothing but its traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from services.allocator import keep_image_buffers_on_the_heap
from services.config import allocator_tuned_by_operator

MIB = 1024 * 1024
INPUT = os.urandom(4096)
RESULT = os.urandom(MIB)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timeline:
    """A job's life at fal from its submit, as the benchmark's fake fal scripts it (`JobScript`):
    each queue position for `step` seconds, then `run_seconds` in progress."""

    queue_positions: tuple[int, ...] = (4, 3, 2, 1, 0)
    step: float = 1.0
    run_seconds: float = 5.0

    @property
    def started(self) -> float:
        return len(self.queue_positions) * self.step

    def changes(self) -> list[tuple[float, dict[str, Any]]]:
        """(seconds after the submit, status) at each change: what the status stream sends."""
        queued = [
            (i * self.step, {"status": "IN_QUEUE", "queue_position": position})
            for i, position in enumerate(self.queue_positions)
        ]
        return [
            *queued,
            (self.started, {"status": "IN_PROGRESS", "logs": []}),
            (self.started + self.run_seconds, {"status": "COMPLETED", "logs": [], "metrics": {}}),
        ]

    def status_at(self, elapsed: float) -> dict[str, Any]:
        """The status a poll `elapsed` seconds after the submit answers."""
        return [status for offset, status in self.changes() if offset <= elapsed][-1]


INSTANT = Timeline(queue_positions=(0,), step=0.0, run_seconds=0.0)  # the client's warm-up job


@dataclass
class Server:
    runner: web.AppRunner
    discord: str  # base URL of Discord's side (API and CDN)
    fal: str  # base URL of fal's side (queue and files)
    jobs_open: int = 0  # submitted, result not yet fetched
    peak_jobs_open: int = 0
    peers: set[object] = field(default_factory=set)  # the client's end of each connection


async def serve(timeline: Timeline) -> Server:
    """The trivial server, on two ports; every job but the warm-up follows `timeline`."""
    loop = asyncio.get_running_loop()
    jobs: dict[str, tuple[float, Timeline]] = {}

    @web.middleware
    async def count_connections(request: web.Request, handler: Any) -> web.StreamResponse:
        server.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        response: web.StreamResponse = await handler(request)
        return response

    async def small_json(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "1", "content": "x"})

    async def submit(request: web.Request) -> web.Response:
        await request.read()
        request_id = str(len(jobs))
        jobs[request_id] = (loop.time(), INSTANT if "warm" in request.query else timeline)
        server.jobs_open += 1
        server.peak_jobs_open = max(server.peak_jobs_open, server.jobs_open)
        return web.json_response({"request_id": request_id, "status": "IN_QUEUE", "queue_position": 0})

    async def status(request: web.Request) -> web.Response:
        submitted, job = jobs[request.match_info["id"]]
        return web.json_response({"request_id": request.match_info["id"], **job.status_at(loop.time() - submitted)})

    async def stream(request: web.Request) -> web.StreamResponse:
        submitted, job = jobs[request.match_info["id"]]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for offset, event in job.changes():
            await asyncio.sleep(submitted + offset - loop.time())
            await response.write(f"data: {json.dumps({'request_id': request.match_info['id'], **event})}\n\n".encode())
        await response.write_eof()
        return response

    async def result(request: web.Request) -> web.Response:
        server.jobs_open -= 1
        return web.json_response({"images": [{"url": "/files/result", "content_type": "image/png"}]})

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=INPUT if request.match_info["name"] == "input" else RESULT, content_type="image/png")

    app = web.Application(client_max_size=4 * MIB, middlewares=[count_connections])
    app.router.add_post("/submit", submit)
    app.router.add_get("/requests/{id}/status", status)
    app.router.add_get("/requests/{id}/status/stream", stream)
    app.router.add_get("/requests/{id}", result)
    app.router.add_get("/files/{name}", file)
    app.router.add_post("/callback", small_json)
    app.router.add_patch("/edit", small_json)
    runner = web.AppRunner(app)
    await runner.setup()
    for _side in ("discord", "fal"):
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    discord, fal = (f"http://127.0.0.1:{address[1]}" for address in runner.addresses)
    server = Server(runner, discord, fal)
    return server


async def statuses(session: aiohttp.ClientSession, url: str, poll_interval: float | None) -> AsyncIterator[str]:
    """The job's states until COMPLETED: from its status stream, or polled every `poll_interval`."""
    if poll_interval is None:
        async with session.get(url + "/status/stream") as response:
            async for line in response.content:
                if line.startswith(b"data:"):
                    yield json.loads(line[5:])["status"]
        return
    while True:
        async with session.get(url + "/status") as response:
            state = (await response.json())["status"]
        yield state
        if state == "COMPLETED":
            return
        await asyncio.sleep(poll_interval)


async def one_job(
    session: aiohttp.ClientSession, discord: str, fal: str, poll_interval: float | None, *, warm: bool = False
) -> None:
    async def call(method: str, url: str, **kwargs: Any) -> bytes:
        async with session.request(method, url, **kwargs) as response:
            return await response.read()

    await call("POST", discord + "/callback", json={"type": 5})
    await call("GET", discord + "/files/input")
    submitted = json.loads(
        await call(
            "POST",
            fal + "/submit" + ("?warm=1" if warm else ""),
            json={"prompt": "make the sky purple", "image_url": discord + "/files/input"},
        )
    )
    job = f"{fal}/requests/{submitted['request_id']}"
    progress = {"IN_QUEUE": "🕒 In queue, position #1", "IN_PROGRESS": "🎨 Generating…"}
    async for state in statuses(session, job, poll_interval):
        if state in progress:
            await call("PATCH", discord + "/edit", json={"content": progress.pop(state)})
    await call("GET", job)
    image = await call("GET", fal + "/files/result")
    form = aiohttp.FormData()
    form.add_field("payload_json", json.dumps({"content": "✅ Done."}), content_type="application/json")
    form.add_field("files[0]", image, filename="kontext.png", content_type="image/png")
    await call("PATCH", discord + "/edit", data=form)


async def client(discord: str, fal: str, jobs: int, arrival_seconds: float, poll_interval: float | None) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await one_job(session, discord, fal, poll_interval, warm=True)  # warm: connections, imports
        before = resource.getrusage(resource.RUSAGE_SELF)
        loop = asyncio.get_running_loop()
        start = loop.time()
        gap = arrival_seconds / max(1, jobs - 1)

        async def at(index: int) -> None:
            await asyncio.sleep(max(0.0, start + index * gap - loop.time()))
            await one_job(session, discord, fal, poll_interval)

        await asyncio.gather(*(at(i) for i in range(jobs)))
        after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(json.dumps({"jobs": jobs, "user": user, "system": system}))


def run_client(discord: str, fal: str, jobs: int, arrival_seconds: float, poll_interval: float | None) -> None:
    # As the bot does: the floor is what its traffic costs it.
    keep_image_buffers_on_the_heap(tuned_by_operator=allocator_tuned_by_operator())
    try:
        import uvloop
    except ImportError:
        asyncio.run(client(discord, fal, jobs, arrival_seconds, poll_interval))
    else:
        uvloop.run(client(discord, fal, jobs, arrival_seconds, poll_interval))


@dataclass(frozen=True)
class Floor:
    jobs: int
    user_seconds: float
    system_seconds: float
    peak_jobs_at_fal: int = 0  # jobs submitted and not yet finished, at the most
    connections: int = 0  # TCP connections the client opened, the warm-up's included

    @property
    def ms_per_job(self) -> float:
        return (self.user_seconds + self.system_seconds) / self.jobs * 1000


async def measure(
    jobs: int, arrival_seconds: float, timeline: Timeline = Timeline(), poll_interval: float | None = None
) -> Floor:
    """The client's CPU for `jobs` jobs' traffic, arriving evenly over `arrival_seconds`, each
    job at fal for `timeline`, followed by its status stream or by polling every `poll_interval`."""
    server = await serve(timeline)
    polling = ["--poll-interval", str(poll_interval)] if poll_interval is not None else []
    try:
        child = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tools.floor", "--client", server.discord, server.fal),
            *("--jobs", str(jobs), "--arrival-seconds", str(arrival_seconds), *polling),
            stdout=asyncio.subprocess.PIPE,
            cwd=PROJECT_ROOT,
        )
        out, _ = await child.communicate()
    finally:
        await server.runner.cleanup()
    if child.returncode != 0:
        raise RuntimeError(f"the floor's client failed ({child.returncode})")
    figures = json.loads(out)
    return Floor(jobs, figures["user"], figures["system"], server.peak_jobs_open, len(server.peers))


async def main_async(args: argparse.Namespace) -> int:
    from tools.sandbox import RunConfig  # the benchmark's fal script for this load (it imports this module)

    load = RunConfig(queue_seconds=args.queue_seconds, queue_updates=args.queue_updates, run_seconds=args.run_seconds)
    timeline = load.floor_timeline()
    floor = await measure(args.jobs, args.arrival_seconds, timeline, args.poll_interval)
    follow = "its status stream" if args.poll_interval is None else f"polling every {args.poll_interval:g} s"
    print(
        f"{args.jobs} jobs over {args.arrival_seconds:g} s, each {timeline.started:g} s in fal's queue and "
        f"{timeline.run_seconds:g} s in progress, followed by {follow}, 2 MiB each: "
        f"{floor.ms_per_job:.1f} ms CPU per job (user {floor.user_seconds:.2f} s, "
        f"system {floor.system_seconds:.2f} s); {floor.peak_jobs_at_fal} jobs at fal at once at the most, "
        f"{floor.connections} connections"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--arrival-seconds", type=float, default=10.0)
    parser.add_argument("--queue-seconds", type=float, default=5.0, help="seconds in fal's queue (default 5)")
    parser.add_argument("--queue-updates", type=int, default=5, help="queue positions over them (default 5)")
    parser.add_argument("--run-seconds", type=float, default=5.0, help="seconds in progress (default 5)")
    parser.add_argument("--poll-interval", type=float, help="poll the status this often instead of streaming it")
    parser.add_argument("--client", nargs=2, metavar=("DISCORD", "FAL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        discord, fal = args.client
        run_client(discord, fal, args.jobs, args.arrival_seconds, args.poll_interval)
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
