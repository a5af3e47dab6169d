"""fal's status stream as bytes arrive from the network: events split across reads, several in
one read, CRLF line endings, keep-alive comments and a character split between two reads."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from services.fal_queue import FalQueueClient, FalRequest
from services.retry import Backoff


def event(status: dict) -> bytes:
    return f"data: {json.dumps(status, ensure_ascii=False)}\r\n\r\n".encode()


async def serve_stream(pieces: list[bytes]) -> tuple[web.AppRunner, str]:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0.01)  # let each piece arrive as its own read
        return response

    app = web.Application()
    app.router.add_get("/requests/r1/status/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def test_events_are_parsed_whatever_the_reads_cut():
    queued = event({"status": "IN_QUEUE", "queue_position": 2})
    log_line = event({"status": "IN_PROGRESS", "logs": [{"message": "élan ✓"}]})
    done = event({"status": "COMPLETED"})
    cut = log_line.index("✓".encode()) + 1  # inside the three bytes of one character
    pieces = [
        queued[:7],
        queued[7:],  # one event over two reads
        b": ping\r\n\r\n" + log_line[:cut],  # a comment, then half an event
        log_line[cut:] + done,  # the rest, and the last event in the same read
    ]
    runner, base = await serve_stream(pieces)
    try:
        async with aiohttp.ClientSession() as session:
            client = FalQueueClient(session, base, "key", backoff=Backoff(base=0.01))
            request = FalRequest(
                "r1", f"{base}/requests/r1/status", f"{base}/requests/r1", f"{base}/requests/r1/cancel"
            )
            deadline = asyncio.get_running_loop().time() + 5
            seen = [status async for status in client.statuses(request, deadline=deadline)]
    finally:
        await runner.cleanup()
    assert [(s.state, s.queue_position) for s in seen] == [("IN_QUEUE", 2), ("IN_PROGRESS", None), ("COMPLETED", None)]
    assert seen[1].logs == ("élan ✓",)


async def test_malformed_events_are_a_broken_stream_not_a_crash():
    """Truncated JSON, invalid UTF-8 and odd fields are caught up with a status poll."""
    bodies = [b'data: {"status": "IN_QUEUE", "queue_pos\n\n', b'data: {"status": "IN_QUEUE"}\xff\n\n']
    polls: list[int] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(bodies[min(len(polls), len(bodies) - 1)])
        return response

    async def status(request: web.Request) -> web.Response:
        polls.append(1)
        done = len(polls) >= len(bodies)
        body = {"status": "COMPLETED"} if done else {"status": "IN_QUEUE", "queue_position": 1, "logs": 5}
        return web.json_response(body, status=200 if done else 202)

    app = web.Application()
    app.router.add_get("/requests/r1/status/stream", stream)
    app.router.add_get("/requests/r1/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            client = FalQueueClient(session, base, "key", backoff=Backoff(base=0.01))
            request = FalRequest(
                "r1", f"{base}/requests/r1/status", f"{base}/requests/r1", f"{base}/requests/r1/cancel"
            )
            seen = [s.state async for s in client.statuses(request, deadline=asyncio.get_running_loop().time() + 5)]
    finally:
        await runner.cleanup()
    assert seen == ["IN_QUEUE", "COMPLETED"]
