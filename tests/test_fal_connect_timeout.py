"""A submit whose connection was not made in time never reached fal, so it is sent again.

The queue's host here is a real listening socket whose accept queue is full: the kernel drops
the client's SYNs, as a host that drops packets does, so aiohttp's `sock_connect` runs out
(its ConnectionTimeoutError) with nothing sent. Then the host starts answering."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import aiohttp
from aiohttp import web

from services.fal_queue import FalQueueClient
from services.retry import Backoff


def full_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A socket listening with no room in its accept queue (backlog 0 holds one connection,
    which two pending ones fill), and the connections filling it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(2):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    return listener, fillers


async def test_a_submit_whose_connection_timed_out_is_sent_again_once(caplog):
    submits: list[str] = []

    async def queue(request: web.Request) -> web.Response:
        submits.append(request.path)
        base = f"http://{request.host}"
        return web.json_response(
            {
                "request_id": "r1",
                "status_url": f"{base}/requests/r1/status",
                "response_url": f"{base}/requests/r1",
                "cancel_url": f"{base}/requests/r1/cancel",
                "queue_position": 0,
            }
        )

    listener, fillers = full_listener()
    app = web.Application()
    app.router.add_post("/{path:.*}", queue)
    runner = web.AppRunner(app)
    await runner.setup()
    port = listener.getsockname()[1]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=0.2)

    first_attempt_timed_out = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "ConnectionTimeoutError" in record.getMessage():
                first_attempt_timed_out.set()

    logging.getLogger("services.retry").addHandler(watch := Watch())

    async def answer_after_the_first_attempt() -> None:
        await first_attempt_timed_out.wait()
        for filler in fillers:  # the host recovers: its queue drained, it accepts and answers
            filler.close()
        with contextlib.suppress(BlockingIOError):
            while True:
                listener.setblocking(False)
                listener.accept()[0].close()
        await web.SockSite(runner, listener).start()

    recovery = asyncio.ensure_future(answer_after_the_first_attempt())
    try:
        with caplog.at_level(logging.WARNING, logger="services.retry"):
            async with aiohttp.ClientSession(timeout=timeout) as session:
                client = FalQueueClient(session, f"http://127.0.0.1:{port}", "key", backoff=Backoff(base=0.1))
                deadline = asyncio.get_running_loop().time() + 10
                request, _ = await client.submit("fal-ai/flux-pro/kontext/max", {"prompt": "x"}, deadline=deadline)
    finally:
        recovery.cancel()
        logging.getLogger("services.retry").removeHandler(watch)
        await runner.cleanup()
        listener.close()
    assert request.request_id == "r1"
    assert submits == ["/fal-ai/flux-pro/kontext/max"]  # sent once: the first never left
    assert "fal submit failed (ConnectionTimeoutError" in caplog.text
