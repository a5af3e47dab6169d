"""The fal key goes only to the queue's own host: a submit answer whose follow-up URLs point
anywhere else is refused, and nothing is sent there."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from services.fal_queue import FalBadOutput, FalQueueClient
from services.retry import Backoff


async def submit_answered_with(status_url: str) -> tuple[str, list[str]]:
    """Submit to a queue that answers with `status_url` ("{base}" is its own address); returns
    the status URL the client kept (or the error's text) and the paths the queue was asked."""
    asked: list[str] = []

    async def queue(request: web.Request) -> web.Response:
        asked.append(request.path)
        base = f"http://{request.host}"
        return web.json_response(
            {
                "request_id": "r1",
                "status_url": status_url.format(base=base, port=request.url.port),
                "response_url": f"{base}/requests/r1",
                "cancel_url": f"{base}/requests/r1/cancel",
                "queue_position": 0,
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", queue)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            client = FalQueueClient(session, f"http://127.0.0.1:{port}", "key", backoff=Backoff(base=0.01))
            deadline = asyncio.get_running_loop().time() + 5
            try:
                request, _ = await client.submit("fal-ai/flux-pro/kontext/max", {"prompt": "x"}, deadline=deadline)
                kept = request.status_url
            except FalBadOutput as exc:
                kept = f"refused: {exc}"
    finally:
        await runner.cleanup()
    return kept, asked


async def test_the_queue_host_is_followed():
    kept, asked = await submit_answered_with("{base}/requests/r1/status")
    assert kept.endswith("/requests/r1/status") and not kept.startswith("refused")
    assert asked == ["/fal-ai/flux-pro/kontext/max"]


@pytest.mark.parametrize(
    "status_url",
    [
        "http://localhost:{port}/requests/r1/status",  # the same server under another name
        "http://127.0.0.1:{port}.example.com/requests/r1/status",  # the queue's address as a prefix
        "http://127.0.0.1:{port}@example.com/requests/r1/status",  # the queue's address as a user
        "https://127.0.0.1:{port}/requests/r1/status",  # another scheme
        "http://127.0.0.1:1/requests/r1/status",  # another port
        "/requests/r1/status",  # not an absolute URL
    ],
)
async def test_any_other_host_is_refused(status_url):
    kept, asked = await submit_answered_with(status_url)
    assert kept.startswith("refused: fal returned a URL outside http://127.0.0.1:")
    assert asked == ["/fal-ai/flux-pro/kontext/max"]  # the submit only
