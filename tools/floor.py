"""The floor under the bot's CPU per job: what the HTTP traffic of one job costs by itself.

    python -m tools.floor                    # 200 jobs over 10 s, as the benchmark's default load
    python -m tools.floor --jobs 1000 --arrival-seconds 30

A job of the bot, stripped of everything but its network traffic, is ten HTTP calls and two
megabytes through loopback TCP: the acknowledgement, fal's submit, one status stream (six events),
fal's result, the input (4 KiB) and the result image (1 MiB) downloaded, two progress edits and
the final edit carrying the image (multipart). This tool makes exactly those calls, with aiohttp on
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

MIB = 1024 * 1024
INPUT = os.urandom(4096)
RESULT = os.urandom(MIB)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATUS_EVENTS = 6  # five queue positions and IN_PROGRESS; COMPLETED ends the stream


async def serve() -> tuple[web.AppRunner, str]:
    async def small_json(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"request_id": "r", "status": "IN_QUEUE", "id": "1", "content": "x"})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for position in range(STATUS_EVENTS, -1, -1):
            status = "COMPLETED" if position == 0 else "IN_QUEUE"
            event = {"status": status, "queue_position": position, "request_id": "r"}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write_eof()
        return response

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=INPUT if request.match_info["name"] == "input" else RESULT, content_type="image/png")

    app = web.Application(client_max_size=4 * MIB)
    app.router.add_post("/submit", small_json)
    app.router.add_get("/stream", stream)
    app.router.add_get("/result", small_json)
    app.router.add_get("/files/{name}", file)
    app.router.add_post("/callback", small_json)
    app.router.add_patch("/edit", small_json)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def one_job(session: aiohttp.ClientSession, base: str) -> None:
    async def call(method: str, path: str, **kwargs: object) -> bytes:
        async with session.request(method, base + path, **kwargs) as response:  # type: ignore[arg-type]
            return await response.read()

    await call("POST", "/callback", json={"type": 5})
    await call("GET", "/files/input")
    await call("POST", "/submit", json={"prompt": "make the sky purple", "image_url": "data:image/png;base64,AAAA"})
    async with session.get(base + "/stream") as response:
        async for line in response.content:
            if line.startswith(b"data:"):
                json.loads(line[5:])
    await call("PATCH", "/edit", json={"content": "🕒 In queue, position #1"})
    await call("PATCH", "/edit", json={"content": "🎨 Generating…"})
    await call("GET", "/result")
    image = await call("GET", "/files/result")
    form = aiohttp.FormData()
    form.add_field("payload_json", json.dumps({"content": "✅ Done."}), content_type="application/json")
    form.add_field("files[0]", image, filename="kontext.png", content_type="image/png")
    await call("PATCH", "/edit", data=form)


async def client(base: str, jobs: int, arrival_seconds: float) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await one_job(session, base)  # warm: connections, imports
        before = resource.getrusage(resource.RUSAGE_SELF)
        loop = asyncio.get_running_loop()
        start = loop.time()
        gap = arrival_seconds / max(1, jobs - 1)

        async def at(index: int) -> None:
            await asyncio.sleep(max(0.0, start + index * gap - loop.time()))
            await one_job(session, base)

        await asyncio.gather(*(at(i) for i in range(jobs)))
        after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(json.dumps({"jobs": jobs, "user": user, "system": system}))


def run_client(base: str, jobs: int, arrival_seconds: float) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(client(base, jobs, arrival_seconds))
    else:
        uvloop.run(client(base, jobs, arrival_seconds))


@dataclass(frozen=True)
class Floor:
    jobs: int
    user_seconds: float
    system_seconds: float

    @property
    def ms_per_job(self) -> float:
        return (self.user_seconds + self.system_seconds) / self.jobs * 1000


async def measure(jobs: int, arrival_seconds: float) -> Floor:
    """The client's CPU for `jobs` jobs' traffic, arriving evenly over `arrival_seconds`."""
    runner, base = await serve()
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tools.floor",
            "--client",
            base,
            "--jobs",
            str(jobs),
            "--arrival-seconds",
            str(arrival_seconds),
            stdout=asyncio.subprocess.PIPE,
            cwd=PROJECT_ROOT,
        )
        out, _ = await child.communicate()
    finally:
        await runner.cleanup()
    if child.returncode != 0:
        raise RuntimeError(f"the floor's client failed ({child.returncode})")
    figures = json.loads(out)
    return Floor(jobs, figures["user"], figures["system"])


async def main_async(args: argparse.Namespace) -> int:
    floor = await measure(args.jobs, args.arrival_seconds)
    print(
        f"{args.jobs} jobs over {args.arrival_seconds:g} s, 10 HTTP calls and 2 MiB each: "
        f"{floor.ms_per_job:.1f} ms CPU per job (user {floor.user_seconds:.2f} s, "
        f"system {floor.system_seconds:.2f} s)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--arrival-seconds", type=float, default=10.0)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        run_client(args.client, args.jobs, args.arrival_seconds)
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
