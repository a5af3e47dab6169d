"""Self-tests for fakes/fal_fake.py (the fal.ai queue API double)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from fakes.fal_fake import FakeFal, JobScript, make_jpeg, make_png

KEY = "test-fal-key"
AUTH = {"Authorization": f"Key {KEY}"}
EP = "fal-ai/flux-pro/kontext/max"
PAYLOAD = {
    "prompt": "make it blue",
    "image_url": "https://example.com/in.png",
    "safety_tolerance": "2",
    "output_format": "png",
    "num_images": 1,
}


@pytest_asyncio.fixture
async def fal():
    f = FakeFal(
        key=KEY, default=JobScript(queue_positions=(2, 1, 0), step=0.05, run_time=0.1, logs=("loading", "generating"))
    )
    await f.start()
    try:
        yield f
    finally:
        await f.stop()


@pytest_asyncio.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


async def submit(http, fal, payload=None, endpoint=EP, headers=AUTH):
    async with http.post(f"{fal.base_url}/{endpoint}", json=payload or PAYLOAD, headers=headers) as r:
        return r.status, await r.json()


async def read_sse(resp):
    """Return (events, comments) until the server closes the stream."""
    events, comments = [], []
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            for line in block.decode().splitlines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                elif line.startswith(":"):
                    comments.append(line)
    return events, comments


@pytest.mark.asyncio
async def test_full_flow_stream_result_download(fal, http):
    status, sub = await submit(http, fal)
    assert status == 200
    assert sub["status"] == "IN_QUEUE" and sub["queue_position"] == 2
    assert sub["logs"] is None and sub["metrics"] == {}
    rid = sub["request_id"]
    base = f"{fal.base_url}/fal-ai/flux-pro/requests/{rid}"
    assert sub["response_url"] == base
    assert sub["status_url"] == base + "/status"
    assert sub["cancel_url"] == base + "/cancel"
    assert "/kontext/max" not in sub["status_url"]
    # a client that rebuilds URLs from the submit path gets 404
    async with http.get(f"{fal.base_url}/{EP}/requests/{rid}/status", headers=AUTH) as r:
        assert r.status == 404

    async with http.get(sub["status_url"], params={"logs": "1"}, headers=AUTH) as r:
        assert r.status == 202
        st = await r.json()
        assert st["status"] == "IN_QUEUE" and st["request_id"] == rid and "queue_position" in st
    # result before completion
    async with http.get(sub["response_url"], headers=AUTH) as r:
        assert r.status == 400 and (await r.json())["detail"] == "Request is still in progress"

    async with http.get(sub["status_url"] + "/stream", params={"logs": "1"}, headers=AUTH) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events, _ = await read_sse(r)
    statuses = [e["status"] for e in events]
    assert statuses[-1] == "COMPLETED" and "IN_PROGRESS" in statuses
    positions = [e["queue_position"] for e in events if e["status"] == "IN_QUEUE"]
    assert positions == sorted(positions, reverse=True) and positions[-1] == 0
    final = events[-1]
    assert [entry["message"] for entry in final["logs"]] == ["loading", "generating"]
    assert final["logs"][0]["source"] == "USER" and "T" in final["logs"][0]["timestamp"]
    assert isinstance(final["metrics"]["inference_time"], float)
    assert final.get("error") is None and final["response_url"] == sub["response_url"]

    async with http.get(sub["status_url"], headers=AUTH) as r:
        assert r.status == 200
        assert (await r.json())["logs"] is None  # logs not requested

    async with http.get(sub["response_url"], headers=AUTH) as r:
        assert r.status == 200
        out = await r.json()
    assert out["prompt"] == PAYLOAD["prompt"] and isinstance(out["seed"], int)
    assert out["has_nsfw_concepts"] == [False]
    img = out["images"][0]
    assert img["content_type"] == "image/png" and img["file_size"] == 2048
    async with http.get(img["url"]) as r:
        assert r.status == 200 and r.headers["Content-Length"] == "2048"
        data = await r.read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) == 2048
    assert fal.count("submit") == 1 and fal.count("stream") == 1 and fal.count("file") == 1
    assert fal.jobs[rid].state == "COMPLETED" and fal.jobs[rid].started_at is not None
    assert fal.submits == [PAYLOAD]


@pytest.mark.asyncio
async def test_multi_jpeg_num_images_seed_nsfw(fal, http):
    fal.default = JobScript(queue_positions=(), run_time=0.02, image_size=5000, nsfw=(True,))
    payload = {"prompt": "merge", "image_urls": ["https://a/1.png", "https://a/2.jpg"], "num_images": 2, "seed": 42}
    status, sub = await submit(http, fal, payload, endpoint=EP + "/multi")
    assert status == 200, sub
    await asyncio.sleep(0.05)
    async with http.get(sub["response_url"], headers=AUTH) as r:
        out = await r.json()
    assert out["seed"] == 42 and out["has_nsfw_concepts"] == [True, False]
    assert len(out["images"]) == 2 and out["images"][0]["content_type"] == "image/jpeg"
    async with http.get(out["images"][1]["url"]) as r:
        data = await r.read()
    assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9" and len(data) == 5000


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bad, field",
    [
        ({"safety_tolerance": 2}, "safety_tolerance"),
        ({"num_images": 5}, "num_images"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"aspect_ratio": "5:4"}, "aspect_ratio"),
        ({"output_format": "webp"}, "output_format"),
        ({"seed": "1"}, "seed"),
        ({"promt": "typo"}, "promt"),
        ({"prompt": ""}, "prompt"),
        ({"image_url": "not a url"}, "image_url"),
    ],
)
async def test_invalid_body_422(fal, http, bad, field):
    status, body = await submit(http, fal, {**PAYLOAD, **bad})
    assert status == 422
    assert any(d["loc"] == ["body", field] for d in body["detail"]), body
    assert all({"loc", "msg", "type"} <= d.keys() for d in body["detail"])
    assert fal.jobs == {}


@pytest.mark.asyncio
async def test_multi_schema(fal, http):
    status, body = await submit(http, fal, {"prompt": "x", "image_urls": []}, endpoint=EP + "/multi")
    assert status == 422 and body["detail"][0]["loc"] == ["body", "image_urls"]
    status, body = await submit(
        http, fal, {"prompt": "x", "image_urls": ["https://a/b"], "image_url": "https://a/b"}, endpoint=EP + "/multi"
    )
    assert status == 422 and body["detail"][0]["type"] == "extra_forbidden"
    status, body = await submit(http, fal, {"image_url": "https://a/b"})
    assert status == 422 and body["detail"][0] == {**body["detail"][0], "loc": ["body", "prompt"], "type": "missing"}


@pytest.mark.asyncio
async def test_auth(fal, http):
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Key wrong"}):
        status, body = await submit(http, fal, headers=headers)
        assert status == 401 and isinstance(body["detail"], str)
    assert fal.jobs == {}
    _, sub = await submit(http, fal)
    async with http.get(sub["status_url"]) as r:
        assert r.status == 401


@pytest.mark.asyncio
async def test_cancel_in_queue_and_already_completed(fal, http):
    fal.script_next(JobScript(queue_positions=(5, 4, 3), step=1.0))
    _, sub = await submit(http, fal)
    async with http.put(sub["cancel_url"], headers=AUTH) as r:
        assert r.status == 202 and (await r.json())["status"] == "CANCELLATION_REQUESTED"
    async with http.get(sub["status_url"], headers=AUTH) as r:
        st = await r.json()
        assert r.status == 200 and st["status"] == "COMPLETED" and st["error"] == "Request cancelled"
    async with http.get(sub["response_url"], headers=AUTH) as r:
        assert r.status == 400 and (await r.json())["detail"] == "Request was cancelled"
    job = fal.jobs[sub["request_id"]]
    assert job.cancelled and job.started_at is None and job.completed_at is not None
    async with http.put(sub["cancel_url"], headers=AUTH) as r:
        assert r.status == 400 and (await r.json())["status"] == "ALREADY_COMPLETED"
    async with http.put(f"{fal.base_url}/fal-ai/flux-pro/requests/nope/cancel", headers=AUTH) as r:
        assert r.status == 404 and (await r.json())["status"] == "NOT_FOUND"
    async with http.get(f"{fal.base_url}/fal-ai/flux-pro/requests/nope", headers=AUTH) as r:
        assert r.status == 404


@pytest.mark.asyncio
async def test_cancel_in_progress_ends_stream(fal, http):
    fal.script_next(JobScript(queue_positions=(), run_time=5.0))
    _, sub = await submit(http, fal)
    async with http.get(sub["status_url"] + "/stream", headers=AUTH) as r:
        first = json.loads((await r.content.readline()).decode()[6:])
        assert first["status"] == "IN_PROGRESS"
        async with http.put(sub["cancel_url"], headers=AUTH) as c:
            assert c.status == 202
        t0 = time.monotonic()
        events, _ = await read_sse(r)
        assert time.monotonic() - t0 < 1
    assert events[-1]["status"] == "COMPLETED" and events[-1]["error"] == "Request cancelled"


@pytest.mark.asyncio
async def test_fail_next_500_and_drop(fal, http):
    fal.fail_next("submit", 500, json={"detail": "boom"}, headers={"X-Fal-Error-Type": "x"})
    status, body = await submit(http, fal)
    assert status == 500 and body == {"detail": "boom"} and fal.jobs == {}

    fal.fail_next("submit", "drop")
    with pytest.raises(aiohttp.ClientError):
        await submit(http, fal)
    assert fal.jobs == {}

    fal.fail_next("submit", "drop_after")
    with pytest.raises(aiohttp.ClientError):
        await submit(http, fal)
    assert len(fal.jobs) == 1  # created, response lost
    assert fal.count("submit") == 3

    _, sub = await submit(http, fal)
    fal.fail_next("status", 503, times=2)
    for _ in range(2):
        async with http.get(sub["status_url"], headers=AUTH) as r:
            assert r.status == 503
    async with http.get(sub["status_url"], headers=AUTH) as r:
        assert r.status in (200, 202)
    # NOTE aiohttp 3.14 silently retries an idempotent request (GET/PUT) once after a
    # dropped connection, so a single "drop" on status/result/cancel is invisible to an
    # aiohttp client; two consecutive drops surface as an error.
    n_before = fal.count("result")
    fal.fail_next("result", "drop", times=2)
    with pytest.raises(aiohttp.ClientError):
        async with http.get(sub["response_url"], headers=AUTH) as r:
            await r.read()
    assert fal.count("result") == n_before + 2
    assert await fal.wait_for_submits(2, timeout=1) and len(fal.submits) == 2


@pytest.mark.asyncio
async def test_scripted_failures(fal, http):
    cp = {"detail": [{"loc": ["body", "prompt"], "msg": "flagged", "type": "content_policy_violation"}]}
    fal.script_next(JobScript(queue_positions=(), run_time=0.01, result_status=422, result_body=cp))
    fal.script_next(
        JobScript(
            queue_positions=(),
            run_time=0.01,
            result_status=503,
            result_body={"detail": "runner gone", "error_type": "runner_disconnected"},
        )
    )
    _, a = await submit(http, fal)
    _, b = await submit(http, fal)
    await asyncio.sleep(0.05)
    async with http.get(a["status_url"], headers=AUTH) as r:
        st = await r.json()
        assert st["error"] == "flagged" and st["error_type"] == "content_policy_violation"
    async with http.get(a["response_url"], headers=AUTH) as r:
        assert r.status == 422 and await r.json() == cp
    async with http.get(b["response_url"], headers=AUTH) as r:
        assert r.status == 503 and r.headers["X-Fal-Error-Type"] == "runner_disconnected"


@pytest.mark.asyncio
async def test_stream_modes_and_keepalive(fal, http):
    fal.keepalive_interval = 0.05
    fal.script_next(JobScript(queue_positions=(0,), step=0.3, run_time=0.01))
    _, sub = await submit(http, fal)
    async with http.get(sub["status_url"] + "/stream", headers=AUTH) as r:
        events, comments = await read_sse(r)
    assert ": ping" in comments and events[-1]["status"] == "COMPLETED"

    fal.script_next(JobScript(stream_mode="stall"))
    _, sub = await submit(http, fal)
    async with http.get(sub["status_url"] + "/stream", headers=AUTH, timeout=aiohttp.ClientTimeout(sock_read=0.3)) as r:
        assert r.status == 200
        with pytest.raises(asyncio.TimeoutError):
            await r.content.read(1)

    fal.script_next(JobScript(stream_mode="unavailable"))
    _, sub = await submit(http, fal)
    async with http.get(sub["status_url"] + "/stream", headers=AUTH) as r:
        assert r.status == 405

    fal.script_next(JobScript(stream_mode="drop", step=1.0))
    _, sub = await submit(http, fal)
    async with http.get(sub["status_url"] + "/stream", headers=AUTH) as r:
        line = await r.content.readline()
        assert line.startswith(b"data: ")
        with pytest.raises(aiohttp.ClientError):
            await r.content.read()


@pytest.mark.asyncio
async def test_result_expiry(fal, http):
    fal.script_next(JobScript(queue_positions=(), run_time=0.01, result_ttl=0.1))
    _, sub = await submit(http, fal)
    await asyncio.sleep(0.05)
    async with http.get(sub["response_url"], headers=AUTH) as r:
        assert r.status == 200
    await asyncio.sleep(0.12)
    async with http.get(sub["response_url"], headers=AUTH) as r:
        assert r.status == 404 and (await r.json())["detail"] == "Request not found"


@pytest.mark.asyncio
async def test_fetch_inputs(http):
    png, _, _ = make_png(300, 4, 4)
    jpg, _, _ = make_jpeg(400, 8, 8)
    origin = web.Application()

    def serve(**response):
        async def handler(request):
            return web.Response(**response)

        return handler

    origin.router.add_get("/ok.png", serve(body=png, content_type="image/png"))
    origin.router.add_get("/ok.jpg", serve(body=jpg, content_type="image/jpeg"))
    origin.router.add_get("/text", serve(text="<html>hi</html>"))
    runner = web.AppRunner(origin)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    o = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    f = FakeFal(key=KEY, default=JobScript(queue_positions=(), run_time=0.01), fetch_inputs=True)
    await f.start()
    try:
        _, ok = await submit(http, f, {**PAYLOAD, "image_url": o + "/ok.png"})
        _, ok_multi = await submit(
            http, f, {"prompt": "p", "image_urls": [o + "/ok.png", o + "/ok.jpg"]}, endpoint=EP + "/multi"
        )
        bad = {}
        for name, url in [("404", o + "/missing.png"), ("text", o + "/text"), ("refused", "http://127.0.0.1:1/x.png")]:
            _, bad[name] = await submit(http, f, {**PAYLOAD, "image_url": url})
        await asyncio.sleep(0.2)
        for sub in (ok, ok_multi):
            async with http.get(sub["response_url"], headers=AUTH) as r:
                assert r.status == 200, await r.text()
        for name, sub in bad.items():
            async with http.get(sub["status_url"], headers=AUTH) as r:
                st = await r.json()
                assert st["status"] == "COMPLETED" and st["error_type"] == "image_load_error", name
            async with http.get(sub["response_url"], headers=AUTH) as r:
                body = await r.json()
                assert r.status == 422, name
                assert body["detail"][0]["loc"] == ["body", "image_url"]
                assert body["detail"][0]["type"] == "image_load_error"
                assert body["detail"][0]["msg"].startswith("Failed to load the image")
    finally:
        await f.stop()
        await runner.cleanup()


@pytest.mark.asyncio
async def test_many_concurrent_jobs_cheap(fal, http):
    fal.default = JobScript(queue_positions=(1, 0), step=0.02, run_time=0.02, image_size=100_000)
    results = await asyncio.gather(*[submit(http, fal) for _ in range(200)])
    assert all(s == 200 for s, _ in results)
    await asyncio.sleep(0.1)
    assert all(j.state == "COMPLETED" for j in fal.jobs.values())
    blobs = {id(j.image_blob()[0]) for j in fal.jobs.values()}
    assert len(blobs) == 1  # one shared byte string for every job
    _, sub = results[0]
    async with http.get(sub["response_url"], headers=AUTH) as r:
        url = (await r.json())["images"][0]["url"]
    async with http.get(url) as r:
        assert len(await r.read()) == 100_000
