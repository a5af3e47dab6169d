"""Self-tests for fakes/fal_fake.py (the fal.ai queue + storage + CDN double).

Each modelled behaviour (see the module docstring and /work/shared/reference/fal-queue-api.md,
part 2) has a test here that fails without it. Every test ends with ``fal.violations == []``
unless it provokes a violation on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import zlib

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from fakes.fal_fake import (
    LOCK_MESSAGES,
    PROXY_TIMEOUT_BODY,
    FakeFal,
    JobScript,
    infra_error,
    make_image,
    make_jpeg,
    make_png,
    model_error,
)

KEY = "test-fal-key"
AUTH = {"Authorization": f"Key {KEY}"}
EP = "fal-ai/flux-pro/kontext/max"
PNG_IN, _, _ = make_png(300, 4, 4)
IMG_URI = "data:image/png;base64," + base64.b64encode(PNG_IN).decode()
PAYLOAD = {
    "prompt": "make it blue",
    "image_url": IMG_URI,
    "safety_tolerance": "2",
    "output_format": "png",
    "num_images": 1,
}
QUICK = JobScript(queue_positions=(), run_time=0.02)


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


@pytest_asyncio.fixture
async def origin():
    """A plain image host on loopback: /ok.png, /ok.jpg, /text; records request times."""
    png, _, _ = make_png(300, 4, 4)
    jpg, _, _ = make_jpeg(400, 8, 8)
    hits: list[tuple[str, float]] = []
    app = web.Application()

    def serve(**response):
        async def handler(request):
            hits.append((request.path, time.monotonic()))
            return web.Response(**response)

        return handler

    app.router.add_get("/ok.png", serve(body=png, content_type="image/png"))
    app.router.add_get("/ok.jpg", serve(body=jpg, content_type="image/jpeg"))
    app.router.add_get("/text", serve(text="<html>hi</html>"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        yield base, hits
    finally:
        await runner.cleanup()


async def submit(http, fal, payload=None, endpoint=EP, headers=AUTH):
    async with http.post(f"{fal.base_url}/{endpoint}", json=payload or PAYLOAD, headers=headers) as r:
        return r.status, await r.json()


async def submit_r(http, fal, payload=None, endpoint=EP, headers=AUTH):
    """-> (status, headers, text) for answers that may not be JSON."""
    async with http.post(f"{fal.base_url}/{endpoint}", json=payload or PAYLOAD, headers=headers) as r:
        return r.status, r.headers, await r.text()


async def get(http, url, headers=AUTH):
    async with http.get(url, headers=headers) as r:
        return r.status, r.headers, await r.json()


async def wait_completed(http, sub, timeout=3.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        async with http.get(sub["status_url"], headers=AUTH) as r:
            st = await r.json()
        if st["status"] == "COMPLETED":
            return st
        await asyncio.sleep(0.01)
    raise AssertionError("job did not complete")


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


# ---------------------------------------------------------------------------------- happy path
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

    st_code, hdrs, st = await get(http, sub["status_url"] + "?logs=1")
    assert st_code == 202 and hdrs["x-fal-request-id"] == rid
    assert st["status"] == "IN_QUEUE" and st["request_id"] == rid and "queue_position" in st
    # result before completion (not documented: 400 + the text a client handles)
    async with http.get(sub["response_url"], headers=AUTH) as r:
        assert r.status == 400 and (await r.json())["detail"] == "Request is still in progress"

    async with http.get(
        sub["status_url"] + "/stream", params={"logs": "1"}, headers={**AUTH, "Accept": "text/event-stream"}
    ) as r:
        assert r.status == 200 and r.headers["x-fal-request-id"] == rid
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events, _ = await read_sse(r)
    assert fal.requests_for("stream")[0].accept == "text/event-stream"
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

    code, hdrs, out = await get(http, sub["response_url"])
    assert code == 200 and hdrs["x-fal-request-id"] == rid
    assert out["prompt"] == PAYLOAD["prompt"] and isinstance(out["seed"], int)
    assert out["has_nsfw_concepts"] == [False]
    img = out["images"][0]
    assert img["content_type"] == "image/png" and "file_size" not in img
    assert {"url", "width", "height", "content_type"} <= img.keys()
    async with http.get(img["url"]) as r:
        assert r.status == 200 and r.headers["Content-Length"] == "2048"
        assert "x-fal-request-id" not in r.headers  # a CDN file, not an app answer
        data = await r.read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) == 2048
    assert fal.count("submit") == 1 and fal.count("stream") == 1 and fal.count("file") == 1
    assert fal.jobs[rid].state == "COMPLETED" and fal.jobs[rid].started_at is not None
    assert fal.submits == [PAYLOAD]
    assert fal.violations == []

    # a client that rebuilds URLs from the submit path gets 404 (and it is a violation)
    async with http.get(f"{fal.base_url}/{EP}/requests/{rid}/status", headers=AUTH) as r:
        assert r.status == 404
    assert len(fal.violations) == 1 and "rebuilt" in fal.violations[0]


@pytest.mark.asyncio
async def test_multi_jpeg_num_images_seed_nsfw(fal, http):
    fal.default = JobScript(
        queue_positions=(), run_time=0.02, image_size=5000, nsfw=(True,), announce_file_size=True
    )  # the multi endpoint never announces it
    payload = {"prompt": "merge", "image_urls": [IMG_URI, IMG_URI], "num_images": 2, "seed": 42}
    status, sub = await submit(http, fal, payload, endpoint=EP + "/multi")
    assert status == 200, sub
    await wait_completed(http, sub)
    _, _, out = await get(http, sub["response_url"])
    assert out["seed"] == 42 and out["has_nsfw_concepts"] == [True, False]
    assert len(out["images"]) == 2
    assert all(set(i) == {"url", "width", "height", "content_type"} for i in out["images"])
    assert out["images"][0]["content_type"] == "image/jpeg" and out["timings"] == {}
    async with http.get(out["images"][1]["url"]) as r:
        data = await r.read()
    assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9" and len(data) == 5000
    assert fal.violations == []


@pytest.mark.asyncio
async def test_single_file_size_only_when_announced(fal, http):
    fal.script_next(QUICK)
    fal.script_next(JobScript(queue_positions=(), run_time=0.02, announce_file_size=True, image_size=3000))
    _, a = await submit(http, fal)
    _, b = await submit(http, fal)
    await wait_completed(http, a)
    await wait_completed(http, b)
    _, _, out_a = await get(http, a["response_url"])
    _, _, out_b = await get(http, b["response_url"])
    assert "file_size" not in out_a["images"][0]
    assert set(out_a["images"][0]) == {"url", "width", "height", "content_type", "file_name"}
    assert out_b["images"][0]["file_size"] == 3000
    assert isinstance(out_a["timings"], dict)


@pytest.mark.asyncio
async def test_text_to_image_endpoint(fal, http):
    fal.default = QUICK
    status, sub = await submit(
        http, fal, {"prompt": "a red fox", "aspect_ratio": "16:9"}, endpoint=EP + "/text-to-image"
    )
    assert status == 200 and "/requests/" in sub["status_url"] and "/kontext" not in sub["status_url"]
    st = await wait_completed(http, sub)
    assert st.get("error") is None
    _, _, out = await get(http, sub["response_url"])
    assert set(out) == {"images", "seed", "has_nsfw_concepts", "prompt", "timings"}
    assert {"url", "width", "height", "content_type"} <= out["images"][0].keys()
    # no image field is allowed: the error comes from the result
    _, bad = await submit(http, fal, {"prompt": "x", "image_url": IMG_URI}, endpoint=EP + "/text-to-image")
    await wait_completed(http, bad)
    async with http.get(bad["response_url"], headers=AUTH) as r:
        assert r.status == 422
        assert (await r.json())["detail"][0] == {
            **(await r.json())["detail"][0],
            "loc": ["body", "image_url"],
            "type": "extra_forbidden",
        }
    assert fal.violations == []


@pytest.mark.asyncio
async def test_result_images_are_valid_and_incompressible():
    for fmt in ("png", "jpeg"):
        data, w, h = make_image(fmt, 1 << 20, 512, 512)
        assert len(data) == 1 << 20 and (w, h) == (512, 512)
        assert len(zlib.compress(data, 6)) > 0.98 * len(data), fmt
        assert make_image(fmt, 1 << 20, 512, 512)[0] is data  # cached: shared by every job
    png, _, _ = make_image("png", 50_000)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png.endswith(b"IEND\xaeB`\x82")
    # walk the PNG chunks: lengths and CRCs are consistent
    off = 8
    while off < len(png):
        n = int.from_bytes(png[off : off + 4], "big")
        ctype, body, crc = png[off + 4 : off + 8], png[off + 8 : off + 8 + n], png[off + 8 + n : off + 12 + n]
        assert zlib.crc32(ctype + body).to_bytes(4, "big") == crc
        off += 12 + n
    assert off == len(png)
    jpg, _, _ = make_image("jpeg", 200_000)
    # walk the JPEG segments up to SOS: every segment length is consistent
    off = 2
    while jpg[off + 1] != 0xDA:
        assert jpg[off] == 0xFF
        off += 2 + int.from_bytes(jpg[off + 2 : off + 4], "big")
    assert jpg.endswith(b"\xff\xd9")
    assert make_png(5000, incompressible=False)[0].count(b"\x00") > 4000  # the old zero padding


# ------------------------------------------------------------------ validation after queueing
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
async def test_invalid_body_is_queued_and_fails_from_the_result(fal, http, bad, field):
    status, body = await submit(http, fal, {**PAYLOAD, **bad})
    assert status == 200 and body["status"] == "IN_QUEUE"  # not validated at submit (P2 §0.2)
    rid = body["request_id"]
    assert fal.requests_for("submit")[-1].request_id == rid
    seen = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2:
        code, hdrs, st = await get(http, body["status_url"])
        assert hdrs["x-fal-request-id"] == rid
        seen.add(st["status"])
        if st["status"] == "COMPLETED":
            break
        await asyncio.sleep(0.005)
    assert seen == {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert code == 200 and st["error"] and st["error_type"]
    for _ in range(2):  # the error is final: the same answer every time
        code, hdrs, res = await get(http, body["response_url"])
        assert code == 422 and hdrs["x-fal-request-id"] == rid
        assert any(d["loc"] == ["body", field] for d in res["detail"]), res
        assert all({"loc", "msg", "type", "input"} <= d.keys() for d in res["detail"])
    assert fal.violations == []


@pytest.mark.asyncio
async def test_validate_at_submit_is_a_named_unrealistic_mode(http):
    f = FakeFal(key=KEY, validate_at_submit=True)
    await f.start()
    try:
        status, body = await submit(http, f, {**PAYLOAD, "num_images": 9})
        assert status == 422 and body["detail"][0]["loc"] == ["body", "num_images"]
        assert f.jobs == {}
    finally:
        await f.stop()


@pytest.mark.asyncio
async def test_non_json_body_refused_at_submit(fal, http):
    for raw in (b"{not json", b""):
        async with http.post(
            f"{fal.base_url}/{EP}", data=raw, headers={**AUTH, "Content-Type": "application/json"}
        ) as r:
            assert r.status == 422 and (await r.json())["detail"][0]["type"] == "json_invalid"
            assert r.headers["x-fal-request-id"]
    assert fal.jobs == {}
    # JSON that is not an object is accepted and fails from the result
    _, sub = await submit(http, fal, [1, 2])
    await wait_completed(http, sub)
    async with http.get(sub["response_url"], headers=AUTH) as r:
        assert r.status == 422 and (await r.json())["detail"][0]["type"] == "dict_type"


@pytest.mark.asyncio
async def test_multi_schema(fal, http):
    fal.default = QUICK

    async def detail(payload, endpoint=EP + "/multi"):
        status, sub = await submit(http, fal, payload, endpoint=endpoint)
        assert status == 200
        await wait_completed(http, sub)
        async with http.get(sub["response_url"], headers=AUTH) as r:
            assert r.status == 422
            return (await r.json())["detail"]

    assert (await detail({"prompt": "x", "image_urls": []}))[0]["loc"] == ["body", "image_urls"]
    assert (await detail({"prompt": "x", "image_urls": [IMG_URI], "image_url": IMG_URI}))[0][
        "type"
    ] == "extra_forbidden"
    d = (await detail({"image_url": IMG_URI}, endpoint=EP))[0]
    assert d["loc"] == ["body", "prompt"] and d["type"] == "missing"


@pytest.mark.asyncio
async def test_every_app_answer_carries_a_request_id(fal, http):
    """Only ingress errors lack x-fal-request-id (fal-client tells them apart that way)."""
    fal.default = QUICK
    _, sub = await submit(http, fal)
    await wait_completed(http, sub)
    rid = sub["request_id"]
    answers = []
    for method, url, headers in [
        ("GET", sub["status_url"], AUTH),
        ("GET", sub["response_url"], AUTH),
        ("PUT", sub["cancel_url"], AUTH),
        ("GET", sub["status_url"], {}),
        ("GET", f"{fal.base_url}/fal-ai/flux-pro/requests/unknown/status", AUTH),
    ]:
        async with http.request(method, url, headers=headers) as r:
            answers.append((r.status, r.headers.get("x-fal-request-id")))
    assert answers[:3] == [(200, rid), (200, rid), (400, rid)]
    assert answers[3][0] == 401 and answers[3][1] and answers[4][0] == 404 and answers[4][1]
    fal.lock_account()
    status, hdrs, _ = await submit_r(http, fal)
    assert status == 403 and hdrs["x-fal-request-id"]
    assert fal.violations == []


# ----------------------------------------------------------------------------- auth and lock
@pytest.mark.asyncio
async def test_auth(fal, http):
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Key wrong"}):
        status, body = await submit(http, fal, headers=headers)
        assert status == 401 and isinstance(body["detail"], str)
    assert fal.jobs == {}
    _, sub = await submit(http, fal)
    async with http.get(sub["status_url"]) as r:
        assert r.status == 401
    assert fal.violations == []


@pytest.mark.asyncio
async def test_account_lock(fal, http):
    fal.default = JobScript(queue_positions=(0,), step=0.05, run_time=0.05)
    _, sub = await submit(http, fal)  # submitted before the lock
    fal.lock_account()  # default reason: exhausted balance
    msg = "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
    status, body = await submit(http, fal)
    assert status == 403 and body == {"detail": msg} and len(fal.jobs) == 1
    # storage refuses too
    async with http.post(f"{fal.rest_url}/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=AUTH) as r:
        assert r.status == 403 and (await r.json())["detail"] == msg
    async with http.post(
        f"{fal.rest_url}/storage/upload/initiate?storage_type=gcs",
        json={"file_name": "a.png", "content_type": "image/png"},
        headers=AUTH,
    ) as r:
        assert r.status == 403
    # ... while status, stream, result and cancel keep working
    st = await wait_completed(http, sub)
    assert st.get("error") is None
    async with http.get(sub["status_url"] + "/stream", headers=AUTH) as r:
        events, _ = await read_sse(r)
        assert r.status == 200 and events[-1]["status"] == "COMPLETED"
    code, _, _ = await get(http, sub["response_url"])
    assert code == 200
    async with http.put(sub["cancel_url"], headers=AUTH) as r:
        assert (await r.json())["status"] == "ALREADY_COMPLETED"
    # a wrong key is still a 401, not a 403
    status, body = await submit(http, fal, headers={"Authorization": "Key nope"})
    assert status == 401
    for reason in ("TOP_UP", "Admin lock"):
        fal.lock_account(reason)
        status, body = await submit(http, fal)
        assert status == 403 and body["detail"] == LOCK_MESSAGES[reason]
    assert LOCK_MESSAGES["TOP_UP"] == "User is locked. Reason: TOP_UP."
    assert LOCK_MESSAGES["Admin lock"] == "User is locked. Reason: Admin lock. Please contact support@fal.ai"
    fal.unlock_account()
    status, _ = await submit(http, fal)
    assert status == 200 and len(fal.jobs) == 2
    assert fal.violations == []


@pytest.mark.asyncio
async def test_account_lock_refuses_cdn_uploads_with_a_valid_token(fal, http):
    async with http.post(f"{fal.rest_url}/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=AUTH) as r:
        tok = await r.json()
    fal.lock_account("TOP_UP")
    async with http.post(
        f"{tok['base_url']}/files/upload",
        data=PNG_IN,
        headers={"Content-Type": "image/png", "Authorization": f"{tok['token_type']} {tok['token']}"},
    ) as r:
        assert r.status == 403 and (await r.json())["detail"] == LOCK_MESSAGES["TOP_UP"]
    assert fal.uploads == []


# --------------------------------------------------------------------------------------- cancel
@pytest.mark.asyncio
async def test_cancel_queued_removes_the_job(fal, http):
    fal.script_next(JobScript(queue_positions=(5, 4, 3), step=1.0))
    _, sub = await submit(http, fal)
    async with http.put(sub["cancel_url"], headers=AUTH) as r:
        assert r.status == 202 and await r.json() == {"status": "OK"}
        assert r.headers["x-fal-request-id"] == sub["request_id"]
    code, _, st = await get(http, sub["status_url"])
    assert code == 200 and st["status"] == "COMPLETED" and st["error"]
    assert st["error_type"] == "client_cancelled" and st["metrics"] == {}
    for _ in range(2):
        code, hdrs, body = await get(http, sub["response_url"])
        assert code == 499 and body["error_type"] == "client_cancelled" and isinstance(body["detail"], str)
        assert hdrs["X-Fal-Error-Type"] == "client_cancelled"
    job = fal.jobs[sub["request_id"]]
    assert job.cancelled and job.started_at is None and job.completed_at is not None
    async with http.put(sub["cancel_url"], headers=AUTH) as r:
        assert r.status == 400 and (await r.json())["status"] == "ALREADY_COMPLETED"
    async with http.put(f"{fal.base_url}/fal-ai/flux-pro/requests/nope/cancel", headers=AUTH) as r:
        assert r.status == 404 and (await r.json())["status"] == "NOT_FOUND"
    async with http.get(f"{fal.base_url}/fal-ai/flux-pro/requests/nope", headers=AUTH) as r:
        assert r.status == 404
    assert fal.violations == []


@pytest.mark.asyncio
async def test_cancel_running_is_ignored_by_default(fal, http):
    fal.script_next(JobScript(queue_positions=(), run_time=0.3))
    _, sub = await submit(http, fal)
    async with http.get(sub["status_url"] + "/stream", headers=AUTH) as r:
        first = json.loads((await r.content.readline()).decode()[6:])
        assert first["status"] == "IN_PROGRESS"
        async with http.put(sub["cancel_url"], headers=AUTH) as c:
            assert c.status == 202 and await c.json() == {"status": "CANCELLATION_REQUESTED"}
        async with http.put(sub["cancel_url"], headers=AUTH) as c:  # again: same answer
            assert c.status == 202 and (await c.json())["status"] == "CANCELLATION_REQUESTED"
        events, _ = await read_sse(r)
    assert events[-1]["status"] == "COMPLETED" and events[-1].get("error") is None
    code, _, out = await get(http, sub["response_url"])
    assert code == 200 and out["images"]
    job = fal.jobs[sub["request_id"]]
    assert not job.cancelled and job.cancel_requested_at is not None
    assert job.completed_at - job.started_at >= 0.29  # ran its full time


@pytest.mark.asyncio
async def test_cancel_running_cancellation_aware_answers_499(fal, http):
    fal.script_next(JobScript(queue_positions=(), run_time=5.0, cancellation_aware=True))
    _, sub = await submit(http, fal)
    async with http.get(sub["status_url"] + "/stream", headers=AUTH) as r:
        first = json.loads((await r.content.readline()).decode()[6:])
        assert first["status"] == "IN_PROGRESS"
        async with http.put(sub["cancel_url"], headers=AUTH) as c:
            assert c.status == 202 and (await c.json())["status"] == "CANCELLATION_REQUESTED"
        t0 = time.monotonic()
        events, _ = await read_sse(r)
        assert time.monotonic() - t0 < 1
    assert events[-1]["status"] == "COMPLETED" and events[-1]["error"]
    for _ in range(2):
        code, _, body = await get(http, sub["response_url"])
        assert code == 499 and isinstance(body["detail"], str)
    assert fal.jobs[sub["request_id"]].cancelled


# ------------------------------------------------------------------------ final errors repeat
@pytest.mark.asyncio
@pytest.mark.parametrize(
    "script, status, etype",
    [
        (model_error("content_policy_violation"), 422, "content_policy_violation"),
        (model_error("downstream_service_unavailable"), 500, "downstream_service_unavailable"),
        (model_error("generation_timeout"), 504, "generation_timeout"),
        (model_error("internal_server_error", retryable=True), 500, "internal_server_error"),
        (model_error("downstream_service_error"), 400, "downstream_service_error"),
        (infra_error("runner_disconnected"), 503, "runner_disconnected"),
        (infra_error("request_timeout", headers={"X-Fal-Request-Timeout-Type": "user"}), 504, "request_timeout"),
    ],
)
async def test_final_errors_repeat_on_every_result_get(fal, http, script, status, etype):
    fal.script_next(dataclasses.replace(script, queue_positions=(), run_time=0.01))
    _, sub = await submit(http, fal)
    st = await wait_completed(http, sub)
    assert st["error"] and st["error_type"] == etype
    answers = []
    for _ in range(3):
        async with http.get(sub["response_url"], headers=AUTH) as r:
            answers.append(
                (r.status, {k: v for k, v in r.headers.items() if k.lower().startswith("x-fal")}, await r.read())
            )
    assert all(a == answers[0] for a in answers)
    code, hdrs, body = answers[0]
    body = json.loads(body)
    assert code == status and hdrs["x-fal-request-id"] == sub["request_id"]
    if etype in ("runner_disconnected", "request_timeout"):
        assert body == {"detail": body["detail"], "error_type": etype} and isinstance(body["detail"], str)
        assert hdrs["X-Fal-Error-Type"] == etype
    else:
        d = body["detail"][0]
        assert d["type"] == etype and d["url"].endswith("#" + etype) and d["msg"] and d["loc"][0] == "body"
    if etype == "internal_server_error":
        assert hdrs["X-Fal-Retryable"] == "true"
    if etype == "request_timeout":
        assert hdrs["X-Fal-Request-Timeout-Type"] == "user"


def test_error_helpers():
    s = model_error("content_policy_violation", run_time=0.2)
    assert s.run_time == 0.2 and s.result_status == 422
    assert s.result_body["detail"][0]["loc"] == ["body", "prompt"]
    s = model_error("image_too_large", "too big", ctx={"max_width": 1024}, input="u")
    assert s.result_body["detail"][0] == {
        "loc": ["body", "image_url"],
        "msg": "too big",
        "type": "image_too_large",
        "ctx": {"max_width": 1024},
        "input": "u",
        "url": "https://docs.fal.ai/errors/#image_too_large",
    }
    s = infra_error("runner_incomplete_response")
    assert s.result_status == 502 and s.result_headers == {"X-Fal-Error-Type": "runner_incomplete_response"}
    assert infra_error("client_cancelled").result_status == 499


@pytest.mark.asyncio
async def test_scripted_failures_keep_explicit_fields(fal, http):
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
    st = await wait_completed(http, a)
    assert st["error"] == "flagged" and st["error_type"] == "content_policy_violation"
    await wait_completed(http, b)
    async with http.get(a["response_url"], headers=AUTH) as r:
        assert r.status == 422 and await r.json() == cp
    async with http.get(b["response_url"], headers=AUTH) as r:
        assert r.status == 503 and r.headers["X-Fal-Error-Type"] == "runner_disconnected"


# ------------------------------------------------------------------------------------ faults
@pytest.mark.asyncio
@pytest.mark.parametrize("code", [502, 503, 504])
async def test_ingress_errors_are_nginx_html_without_request_id(fal, http, code):
    kind = f"ingress_{code}"
    fal.fail_next("submit", kind)
    status, hdrs, text = await submit_r(http, fal)
    assert status == code and "nginx" in text and "x-fal-request-id" not in hdrs
    assert hdrs["Content-Type"].startswith("text/html")
    assert fal.jobs == {}  # never reached fal
    fal.default = QUICK
    _, sub = await submit(http, fal)
    await wait_completed(http, sub)
    _, _, out = await get(http, sub["response_url"])
    async with http.post(f"{fal.rest_url}/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=AUTH) as r:
        tok = await r.json()
    checks = [
        ("status", "GET", sub["status_url"], AUTH, None),
        ("stream", "GET", sub["status_url"] + "/stream", AUTH, None),
        ("result", "GET", sub["response_url"], AUTH, None),
        ("cancel", "PUT", sub["cancel_url"], AUTH, None),
        ("file", "GET", out["images"][0]["url"], {}, None),
        ("storage_token", "POST", f"{fal.rest_url}/storage/auth/token?storage_type=fal-cdn-v3", AUTH, b"{}"),
        (
            "upload",
            "POST",
            f"{tok['base_url']}/files/upload",
            {"Authorization": f"Bearer {tok['token']}", "Content-Type": "image/png"},
            PNG_IN,
        ),
    ]
    for op, method, url, headers, data in checks:
        # twice: aiohttp retries an idempotent request once after some failures
        fal.fail_next(op, kind, times=2)
        async with http.request(method, url, headers=headers, data=data) as r:
            assert r.status == code and "nginx" in await r.text(), op
            assert "x-fal-request-id" not in r.headers, op
        fal._faults[op].clear()
    assert fal.uploads == [] and len(fal.jobs) == 1
    assert fal.violations == []


@pytest.mark.asyncio
async def test_submit_5xx_after_record_creates_the_job(fal, http):
    fal.default = QUICK
    fal.fail_next("submit", "500_after_record")
    status, hdrs, text = await submit_r(http, fal)
    assert status == 500 and json.loads(text)["error_type"] == "internal_error"
    rid = hdrs["x-fal-request-id"]
    assert list(fal.jobs) == [rid]  # recorded, and it runs
    await asyncio.sleep(0.05)
    assert fal.jobs[rid].state == "COMPLETED" and fal.jobs[rid].failure is None

    # a plain 500 (JSON from fal's app layer) may also have been recorded: it is
    fal.fail_next("submit", 500, json={"detail": "boom"}, headers={"X-Fal-Error-Type": "x"})
    status, hdrs, text = await submit_r(http, fal)
    assert status == 500 and json.loads(text) == {"detail": "boom"} and hdrs["X-Fal-Error-Type"] == "x"
    assert len(fal.jobs) == 2 and hdrs["x-fal-request-id"] in fal.jobs

    # a 4xx is a refusal: not recorded
    fal.fail_next("submit", 429)
    status, hdrs, text = await submit_r(http, fal)
    assert status == 429 and hdrs["x-fal-request-id"] and len(fal.jobs) == 2

    # a proxy in front of fal timed out after passing it on: recorded, and its plain 504 says nothing
    fal.fail_next("submit", "proxy_504_after_record")
    status, hdrs, text = await submit_r(http, fal)
    assert (status, text) == (504, PROXY_TIMEOUT_BODY) and "x-fal-request-id" not in hdrs
    assert len(fal.jobs) == 3


@pytest.mark.asyncio
async def test_fail_next_drop_hang_and_read_faults(fal, http):
    fal.fail_next("submit", "drop")
    with pytest.raises(aiohttp.ClientError):
        await submit(http, fal)
    assert fal.jobs == {}

    fal.fail_next("submit", "drop_after")
    with pytest.raises(aiohttp.ClientError):
        await submit(http, fal)
    assert len(fal.jobs) == 1  # created, response lost
    assert fal.count("submit") == 2

    _, sub = await submit(http, fal)
    fal.fail_next("status", 503, times=2)
    for _ in range(2):
        async with http.get(sub["status_url"], headers=AUTH) as r:
            assert r.status == 503 and r.headers["x-fal-request-id"] == sub["request_id"]
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
    fal.fail_next("status", "hang")
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(sub["status_url"], headers=AUTH, timeout=aiohttp.ClientTimeout(total=0.2)):
            pass
    assert await fal.wait_for_submits(2, timeout=1) and len(fal.submits) == 2
    # "hang_after": done at fal (here: the queued job is cancelled), the answer never comes.
    fal.script_next(JobScript(queue_positions=(5, 4, 3, 2, 1, 0), step=10))
    _, queued = await submit(http, fal)
    fal.fail_next("cancel", "hang_after")
    with pytest.raises(asyncio.TimeoutError):
        async with http.put(queued["cancel_url"], headers=AUTH, timeout=aiohttp.ClientTimeout(total=0.2)):
            pass
    assert fal.jobs[queued["request_id"]].cancelled and fal.count("cancel") == 1
    with pytest.raises(ValueError):
        fal.fail_next("submit", "ingress_500")


# ------------------------------------------------------------------------------------ streams
@pytest.mark.asyncio
async def test_stream_modes_and_keepalive(http):
    fal = FakeFal(key=KEY, keepalive_interval=0.05)
    await fal.start()
    try:
        fal.script_next(JobScript(queue_positions=(0,), step=0.3, run_time=0.01))
        _, sub = await submit(http, fal)
        async with http.get(sub["status_url"] + "/stream", headers=AUTH) as r:  # no Accept: fine
            events, comments = await read_sse(r)
        assert ": ping" in comments and events[-1]["status"] == "COMPLETED"
        assert fal.requests_for("stream")[0].accept in (None, "*/*")

        fal.script_next(JobScript(stream_mode="stall"))
        _, sub = await submit(http, fal)
        async with http.get(
            sub["status_url"] + "/stream", headers=AUTH, timeout=aiohttp.ClientTimeout(sock_read=0.3)
        ) as r:
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
        assert fal.violations == []
    finally:
        await fal.stop()


@pytest.mark.asyncio
async def test_stream_comments_only_never_sends_data(http):
    fal = FakeFal(key=KEY, keepalive_interval=0.2)
    await fal.start()
    try:
        fal.script_next(JobScript(queue_positions=(), run_time=0.05, stream_mode="comments_only"))
        _, sub = await submit(http, fal)
        chunks = b""
        t0 = time.monotonic()
        async with http.get(sub["status_url"] + "/stream", headers={**AUTH, "Accept": "text/event-stream"}) as r:
            assert r.status == 200
            while time.monotonic() - t0 < 0.9:
                try:
                    chunks += await asyncio.wait_for(r.content.readany(), 0.95 - (time.monotonic() - t0))
                except TimeoutError:
                    break
            assert not r.content.at_eof()  # still open although the job completed long ago
        assert fal.jobs[sub["request_id"]].state == "COMPLETED"
        assert b"data:" not in chunks and 3 <= chunks.count(b": ping\n\n") <= 5
        assert fal.requests_for("stream")[0].accept == "text/event-stream"
    finally:
        await fal.stop()


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


# ------------------------------------------------------------------------------- input fetch
@pytest.mark.asyncio
async def test_fetch_inputs_errors_from_the_result(http, origin):
    o, _ = origin
    f = FakeFal(key=KEY, default=QUICK)
    assert f.fetch_inputs and f.allow_data_uri  # the defaults
    await f.start()
    try:
        _, ok = await submit(http, f, {**PAYLOAD, "image_url": o + "/ok.png"})
        _, ok_multi = await submit(
            http, f, {"prompt": "p", "image_urls": [o + "/ok.png", o + "/ok.jpg", IMG_URI]}, endpoint=EP + "/multi"
        )
        _, ok_uri = await submit(http, f, PAYLOAD)
        bad = {}
        for name, url, typ in [
            ("404", o + "/missing.png", "file_download_error"),
            ("text", o + "/text", "image_load_error"),
            ("refused", "http://127.0.0.1:1/x.png", "file_download_error"),
            ("bad uri", "data:image/png;base64,aGVsbG8=", "image_load_error"),
        ]:
            _, bad[name] = await submit(http, f, {**PAYLOAD, "image_url": url})
            bad[name]["typ"] = typ
        _, bad_multi = await submit(
            http, f, {"prompt": "p", "image_urls": [o + "/ok.png", o + "/gone.png"]}, endpoint=EP + "/multi"
        )
        for sub in (ok, ok_multi, ok_uri):
            st = await wait_completed(http, sub)
            assert st.get("error") is None
            async with http.get(sub["response_url"], headers=AUTH) as r:
                assert r.status == 200, await r.text()
        for name, sub in bad.items():
            st = await wait_completed(http, sub)
            assert st["error_type"] == sub["typ"], name
            for _ in range(2):
                async with http.get(sub["response_url"], headers=AUTH) as r:
                    body = await r.json()
                    assert r.status == 422, name
                d = body["detail"][0]
                assert d["loc"] == ["body", "image_url"] and d["type"] == sub["typ"] and d["msg"], name
        await wait_completed(http, bad_multi)
        async with http.get(bad_multi["response_url"], headers=AUTH) as r:
            d = (await r.json())["detail"][0]
            assert d["loc"] == ["body", "image_urls", 1] and d["type"] == "file_download_error"
        assert f.violations == []
    finally:
        await f.stop()


@pytest.mark.asyncio
async def test_inputs_are_fetched_when_the_job_starts_not_at_submit(http, origin):
    o, hits = origin
    f = FakeFal(key=KEY, default=JobScript(queue_positions=(2, 1, 0), step=0.1, run_time=0.05))
    await f.start()
    try:
        _, sub = await submit(http, f, {**PAYLOAD, "image_url": o + "/ok.png"})
        job = f.jobs[sub["request_id"]]
        await asyncio.sleep(0.15)
        assert hits == [] and job.state == "IN_QUEUE"  # not at submit
        await wait_completed(http, sub)
        assert len(hits) == 1
        assert hits[0][1] >= job.min_start_at - 0.005 and abs(hits[0][1] - job.started_at) < 0.1
        # hundreds of queued jobs cost no task each
        f.default = JobScript(queue_positions=(0,), step=30.0)
        for _ in range(200):
            await submit(http, f, {**PAYLOAD, "image_url": o + "/ok.png"})
        assert len(f._bg) == 0 and len(hits) == 1
    finally:
        await f.stop()


@pytest.mark.asyncio
async def test_expired_discord_cdn_url_fails_the_job_at_start(http):
    from fakes.discord_fake import FakeDiscord

    discord = FakeDiscord(spec_validation=False)
    await discord.start()
    f = FakeFal(key=KEY, default=JobScript(queue_positions=(0,), step=0.2, run_time=0.02))
    await f.start()
    try:
        ok = discord.add_cdn_file(PNG_IN, "a.png")
        late = discord.add_cdn_file(PNG_IN, "b.png")
        _, s_ok = await submit(http, f, {**PAYLOAD, "image_url": ok["url"]})
        await wait_completed(http, s_ok)
        _, s_late = await submit(http, f, {**PAYLOAD, "image_url": late["url"]})  # valid at submit ...
        discord.advance_cdn_clock(86401)  # ... expired by the time the runner starts
        st = await wait_completed(http, s_late)
        assert st["error_type"] == "file_download_error"
        async with http.get(s_ok["response_url"], headers=AUTH) as r:
            assert r.status == 200
        async with http.get(s_late["response_url"], headers=AUTH) as r:
            assert r.status == 422 and (await r.json())["detail"][0]["input"] == late["url"]
    finally:
        await f.stop()
        await discord.stop()


# ------------------------------------------------------------------------- concurrency limit
@pytest.mark.asyncio
async def test_concurrency_limit_queues_in_arrival_order(http):
    f = FakeFal(key=KEY, concurrency_limit=2, default=JobScript(queue_positions=(), run_time=0.2))
    await f.start()
    try:
        subs = [(await submit(http, f))[1] for _ in range(5)]
        assert [s["queue_position"] for s in subs] == [0, 0, 0, 1, 2]
        states = []
        for s in subs:
            _, _, st = await get(http, s["status_url"])
            states.append((st["status"], st.get("queue_position")))
        assert states == [
            ("IN_PROGRESS", None),
            ("IN_PROGRESS", None),
            ("IN_QUEUE", 0),
            ("IN_QUEUE", 1),
            ("IN_QUEUE", 2),
        ]
        # the last job's stream sees its position fall as slots free, promptly
        async with http.get(subs[4]["status_url"] + "/stream", headers=AUTH) as r:
            events = []
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append((time.monotonic(), json.loads(line[6:])))
        seq = [(e["status"], e.get("queue_position")) for _, e in events]
        assert seq[0] == ("IN_QUEUE", 2) and ("IN_QUEUE", 0) in seq and seq[-1][0] == "COMPLETED"
        jobs = [f.jobs[s["request_id"]] for s in subs]
        starts = [j.started_at for j in jobs]
        assert starts == sorted(starts)  # arrival order
        # never more than 2 in progress: job k+2 starts when job k ends
        for k in range(3):
            assert abs(jobs[k + 2].started_at - jobs[k].completed_at) < 1e-6
        # the stream event for each start arrived close to the start time (woken, not polled)
        t_prog = next(t for t, e in events if e["status"] == "IN_PROGRESS")
        assert t_prog - jobs[4].started_at < 0.05
        assert f.running == 0
    finally:
        await f.stop()


@pytest.mark.asyncio
async def test_concurrency_limit_and_cancels_free_capacity(http):
    f = FakeFal(key=KEY, concurrency_limit=1, default=JobScript(queue_positions=(), run_time=0.3))
    await f.start()
    try:
        f.script_next(JobScript(queue_positions=(), run_time=0.3))  # A: ignores cancel
        f.script_next(JobScript(queue_positions=(), run_time=5.0, cancellation_aware=True))  # B
        a, b, c, d = [(await submit(http, f))[1] for _ in range(4)]
        ja, jb, jc, jd = (f.jobs[s["request_id"]] for s in (a, b, c, d))
        # cancelling a queued job moves the ones behind it up
        _, _, st = await get(http, d["status_url"])
        assert st["queue_position"] == 2
        async with http.put(c["cancel_url"], headers=AUTH) as r:
            assert (await r.json())["status"] == "OK"
        _, _, st = await get(http, d["status_url"])
        assert st["queue_position"] == 1
        # A ignores the cancel and keeps its slot until it finishes
        async with http.put(a["cancel_url"], headers=AUTH) as r:
            assert (await r.json())["status"] == "CANCELLATION_REQUESTED"
        await asyncio.sleep(0.1)
        assert ja.state == "IN_PROGRESS" and jb.state == "IN_QUEUE"
        await wait_completed(http, a)
        await asyncio.sleep(0.02)
        assert jb.state == "IN_PROGRESS" and abs(jb.started_at - ja.completed_at) < 1e-6
        # B honours the cancel: its slot frees after cancel_delay and D starts
        async with http.put(b["cancel_url"], headers=AUTH) as r:
            assert (await r.json())["status"] == "CANCELLATION_REQUESTED"
        await wait_completed(http, b)
        await asyncio.sleep(0.02)
        assert jd.state == "IN_PROGRESS" and jc.started_at is None
        async with http.get(b["response_url"], headers=AUTH) as r:
            assert r.status == 499
        await wait_completed(http, d)
        async with http.get(d["response_url"], headers=AUTH) as r:
            assert r.status == 200
    finally:
        await f.stop()


@pytest.mark.asyncio
async def test_concurrency_limit_with_minimum_queue_time_and_raise(http):
    f = FakeFal(key=KEY, concurrency_limit=1, default=JobScript(queue_positions=(0,), step=0.1, run_time=0.1))
    await f.start()
    try:
        a, b = [(await submit(http, f))[1] for _ in range(2)]
        ja, jb = f.jobs[a["request_id"]], f.jobs[b["request_id"]]
        await asyncio.sleep(0.05)
        assert ja.state == "IN_QUEUE"  # scripted minimum queue time still applies
        await wait_completed(http, b, timeout=2)
        assert abs(ja.started_at - ja.min_start_at) < 1e-6
        assert abs(jb.started_at - ja.completed_at) < 1e-6
        # raising the limit starts waiting jobs at once
        f.default = JobScript(queue_positions=(), run_time=1.0)
        subs = [(await submit(http, f))[1] for _ in range(3)]
        await asyncio.sleep(0.02)
        assert [f.jobs[s["request_id"]].state for s in subs] == ["IN_PROGRESS", "IN_QUEUE", "IN_QUEUE"]
        f.concurrency_limit = 3
        assert [f.jobs[s["request_id"]].state for s in subs] == ["IN_PROGRESS"] * 3
    finally:
        await f.stop()


@pytest.mark.asyncio
async def test_concurrency_limit_1000_jobs_is_cheap(http):
    f = FakeFal(key=KEY, concurrency_limit=40, default=JobScript(queue_positions=(), run_time=0.05))
    await f.start()
    try:
        cpu0 = time.process_time()
        conn = aiohttp.TCPConnector(limit=50)
        async with aiohttp.ClientSession(connector=conn) as s:
            subs = await asyncio.gather(*[submit(s, f) for _ in range(1000)])
            assert all(code == 200 for code, _ in subs)
            # a round of status polls with true positions
            sts = await asyncio.gather(*[get(s, sub["status_url"]) for _, sub in subs[::50]])
            waiting = [st for _, _, st in sts if st["status"] == "IN_QUEUE"]
            assert waiting and all(st["queue_position"] >= 0 for st in waiting)
        # positions are consistent: 0..n-1 over the queued jobs, in arrival order
        now = time.monotonic()
        queued = [j for j in f.jobs.values() if j.state_at(now) == "IN_QUEUE"]
        assert [j.queue_position_at(now) for j in queued] == list(range(len(queued)))
        t0 = time.monotonic()
        while any(j.state != "COMPLETED" for j in f.jobs.values()):
            await asyncio.sleep(0.05)
            assert time.monotonic() - t0 < 10
        assert f.running == 0 and len(f._bg) == 0
        starts = sorted(j.started_at for j in f.jobs.values())
        # never more than 40 in progress
        ends = sorted(j.completed_at for j in f.jobs.values())
        assert all(starts[k + 40] >= ends[k] - 1e-9 for k in range(len(starts) - 40))
        assert time.process_time() - cpu0 < 8  # client included; the fake itself is a small part
    finally:
        await f.stop()


# ------------------------------------------------------------------------------------ storage
async def _token(http, fal):
    async with http.post(f"{fal.rest_url}/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=AUTH) as r:
        assert r.status == 200
        return await r.json()


@pytest.mark.asyncio
async def test_storage_v3_upload_and_use_as_input(fal, http):
    import datetime as dt

    fal.default = QUICK
    assert fal.rest_url == fal.base_url + "/rest"
    tok = await _token(http, fal)
    assert set(tok) >= {"token", "token_type", "base_url", "expires_at"}
    assert tok["base_url"].startswith(fal.base_url)
    assert dt.datetime.fromisoformat(tok["expires_at"]) > dt.datetime.now(dt.UTC)
    up_hdrs = {
        "Content-Type": "image/png",
        "Authorization": f"{tok['token_type']} {tok['token']}",
        "X-Fal-File-Name": "input.png",
        "X-Fal-Object-Lifecycle-Preference": json.dumps({"expiration_duration_seconds": 86400}),
    }
    async with http.post(f"{tok['base_url']}/files/upload", data=PNG_IN, headers=up_hdrs) as r:
        assert r.status == 200
        url = (await r.json())["access_url"]
    [up] = fal.uploads
    assert (up.url, up.data, up.content_type, up.file_name, up.via) == (url, PNG_IN, "image/png", "input.png", "cdn-v3")
    assert up.lifecycle == {"expiration_duration_seconds": 86400}
    async with http.get(url) as r:  # served back, no auth
        assert r.status == 200 and await r.read() == PNG_IN and r.headers["Content-Type"] == "image/png"
    _, sub = await submit(http, fal, {**PAYLOAD, "image_url": url})
    st = await wait_completed(http, sub)
    assert st.get("error") is None
    # the runner's own fetch of fal storage is not one of the bot's requests
    assert fal.count("uploaded_file") == 1
    # deleted files: 404, and a job that starts afterwards fails
    fal.expire_uploads()
    async with http.get(url) as r:
        assert r.status == 404
    _, sub = await submit(http, fal, {**PAYLOAD, "image_url": url})
    st = await wait_completed(http, sub)
    assert st["error_type"] == "file_download_error"
    assert fal.violations == []


@pytest.mark.asyncio
async def test_storage_tokens_are_checked(fal, http):
    tok = await _token(http, fal)
    url = f"{tok['base_url']}/files/upload"
    async with http.post(url, data=PNG_IN, headers={"Content-Type": "image/png", "Authorization": "Bearer wrong"}) as r:
        assert r.status == 401
    async with http.post(url, data=PNG_IN, headers={"Content-Type": "image/png"}) as r:
        assert r.status == 401
    fal.expire_tokens()
    async with http.post(
        url, data=PNG_IN, headers={"Content-Type": "image/png", "Authorization": f"Bearer {tok['token']}"}
    ) as r:
        assert r.status == 401
    async with http.post(f"{fal.rest_url}/storage/auth/token?storage_type=fal-cdn-v3", json={}) as r:
        assert r.status == 401  # the token request itself needs the key
    assert fal.uploads == [] and fal.violations == []
    # the fal key on the upload host is refused and recorded
    async with http.post(url, data=PNG_IN, headers={"Content-Type": "image/png", **AUTH}) as r:
        assert r.status == 401
    assert len(fal.violations) == 1 and "fal key" in fal.violations[0]


@pytest.mark.asyncio
async def test_storage_gcs_fallback(fal, http):
    fal.default = QUICK
    async with http.post(
        f"{fal.rest_url}/storage/upload/initiate?storage_type=gcs",
        json={"file_name": "in.png", "content_type": "image/png"},
        headers=AUTH,
    ) as r:
        assert r.status == 200
        ini = await r.json()
    async with http.get(ini["file_url"]) as r:
        assert r.status == 404  # nothing uploaded yet
    async with http.put(ini["upload_url"], data=PNG_IN, headers={"Content-Type": "image/png"}) as r:
        assert r.status == 200
    [up] = fal.uploads
    assert up.url == ini["file_url"] and up.via == "gcs" and up.file_name == "in.png"
    async with http.get(ini["file_url"]) as r:
        assert await r.read() == PNG_IN
    async with http.put(ini["upload_url"] + "x", data=PNG_IN) as r:
        assert r.status == 403  # signed URL: a changed signature is refused
    _, sub = await submit(http, fal, {**PAYLOAD, "image_url": ini["file_url"]})
    assert (await wait_completed(http, sub)).get("error") is None
    assert fal.violations == []


@pytest.mark.asyncio
async def test_storage_lifecycle_expiry(fal, http):
    tok = await _token(http, fal)
    async with http.post(
        f"{tok['base_url']}/files/upload",
        data=PNG_IN,
        headers={
            "Content-Type": "image/png",
            "Authorization": f"Bearer {tok['token']}",
            "X-Fal-Object-Lifecycle-Preference": '{"expiration_duration_seconds": 0.1}',
        },
    ) as r:
        url = (await r.json())["access_url"]
    async with http.get(url) as r:
        assert r.status == 200
    await asyncio.sleep(0.15)
    async with http.get(url) as r:
        assert r.status == 404


# ---------------------------------------------------------------------------------- hygiene
@pytest.mark.asyncio
async def test_violations_key_to_cdn_unknown_route_wrong_method(fal, http):
    fal.default = QUICK
    _, sub = await submit(http, fal)
    await wait_completed(http, sub)
    _, _, out = await get(http, sub["response_url"])
    assert fal.violations == []
    async with http.get(out["images"][0]["url"], headers=AUTH) as r:  # key sent to the CDN
        assert r.status == 200
    assert len(fal.violations) == 1 and "fal key" in fal.violations[0]
    async with http.get(f"{fal.base_url}/v1/whatever", headers=AUTH) as r:
        assert r.status == 404
    assert "unknown route GET /v1/whatever" in fal.violations[1]
    async with http.post(sub["status_url"], headers=AUTH) as r:
        assert r.status == 405
    assert "wrong method" in fal.violations[2]


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
    assert fal.violations == []


@pytest.mark.asyncio
async def test_a_malformed_answer_is_an_error_that_carries_the_request_headers(fal, http):
    """What a broken proxy on the path might send: aiohttp cannot parse it, and its exception
    holds the request's headers, so the key (what the bot must never log)."""
    for op in ("submit", "status"):
        fal.fail_next(op, "malformed")
    with pytest.raises(aiohttp.ClientResponseError) as refused:
        await submit(http, fal)
    assert fal.jobs == {} and KEY in repr(refused.value)
    _, sub = await submit(http, fal)
    with pytest.raises(aiohttp.ClientResponseError):
        async with http.get(sub["status_url"], headers=AUTH) as r:
            await r.read()
    async with http.get(sub["status_url"], headers=AUTH) as r:  # one fault, one request
        assert r.status in (200, 202)


@pytest.mark.asyncio
async def test_a_host_that_refuses_connections_records_nothing_and_comes_back_on_its_port(fal, http):
    _, sub = await submit(http, fal)
    fal.fail_next("status", "hang")
    hanging = asyncio.ensure_future(http.get(sub["status_url"], headers=AUTH))
    await asyncio.sleep(0.05)
    await fal.refuse_connections()
    with pytest.raises(aiohttp.ClientError):  # an open connection is closed
        await hanging
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectorError):
            await submit(fresh, fal)
    assert len(fal.jobs) == 1 and fal.count("submit") == 1
    await fal.accept_connections()
    await submit(http, fal)
    assert len(fal.jobs) == 2
