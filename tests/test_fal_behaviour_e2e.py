"""The bot against fal as fal really behaves (fal-queue-api.md, part 2), end to end: errors that
arrive from the result and are final, submits that may have been recorded, an account out of
credit, quiet status streams, inputs fetched when the job starts, cancels a running job ignores."""

from __future__ import annotations

import asyncio
import io
import random
import struct
import time
import urllib.parse
import zlib

import pytest
from aiohttp import web
from PIL import Image

from fakes.fal_fake import JobScript, infra_error, model_error
from services.fal_queue import FOLLOW_ATTEMPTS
from tests.e2e import (
    attachment_bytes,
    button,
    data_uri,
    fal_job,
    finished,
    has_button,
    is_final,
    private_answer,
    shows,
    text,
)


def elapsed_since_completion(world) -> float:
    job = fal_job(world, -1)
    assert job.completed_at is not None
    return time.monotonic() - job.completed_at


async def test_a_validation_error_arrives_from_the_result_and_is_shown_in_fals_words(world):
    """fal queues an invalid job, runs it and answers its result with a 422 `detail` list."""
    world.fal.default = model_error("image_too_small", "Image must be at least 256 pixels wide")
    await world.start_bot()
    message = await finished(await world.kontext())
    assert text(message) == "❌ FLUX.1 Kontext refused this edit: Image must be at least 256 pixels wide"
    assert world.fal.count("submit") == 1 and world.fal.count("result") == 1  # final: asked once
    assert elapsed_since_completion(world) < 3
    assert has_button(message, "retry")


async def test_a_stored_5xx_is_final_and_shown_at_once_not_retried_until_the_deadline(world):
    world.fal.default = model_error("downstream_service_unavailable", "The partner API is unavailable")
    await world.start_bot()
    message = await finished(await world.kontext())
    assert text(message).startswith("❌ FLUX.1 Kontext could not make this edit: The partner API is unavailable")
    assert world.fal.count("result") == 1
    assert elapsed_since_completion(world) < 3
    world.fal.default = infra_error("runner_disconnected", detail="Runner disconnected")
    message = await finished(await world.kontext())
    assert "could not make this edit: Runner disconnected" in text(message)
    assert world.fal.count("result") == 2


async def test_a_content_policy_refusal_quotes_fals_reason(world):
    world.fal.default = model_error("content_policy_violation", "The image was flagged for graphic violence.")
    await world.start_bot()
    message = await finished(await world.kontext())
    assert "safety system refused this edit: The image was flagged for graphic violence." in text(message)


async def test_a_submit_answered_with_500_is_never_sent_again(world):
    """fal may have recorded (and billed) it: both official clients refuse to retry a submit 500."""
    await world.start_bot()
    world.fal.fail_next("submit", status="500_after_record")
    message = await finished(await world.kontext())
    assert "cannot tell whether fal received it" in text(message) and has_button(message, "retry")
    assert world.fal.count("submit") == 1 and len(world.fal.jobs) == 1
    # Try again is the member's choice, and sends it once more.
    again = await finished(await world.discord.click_button(message.id, button(message, "retry")))
    assert text(again).startswith("✅") and world.fal.count("submit") == 2


async def test_a_submit_timed_out_by_a_proxy_after_fal_took_it_is_never_sent_again(world):
    """A 504 without fal's request id but not from fal's own front (no nginx page): the job may
    be at fal, as fal-client assumes; sent again, it would run and bill twice."""
    await world.start_bot()
    world.fal.fail_next("submit", status="proxy_504_after_record")
    message = await finished(await world.kontext())
    assert "cannot tell whether fal received it" in text(message)
    assert world.fal.count("submit") == 1 and len(world.fal.jobs) == 1


async def test_a_billed_result_survives_a_short_fal_outage(world):
    """fal keeps a result for an hour: a fetch is retried until the job's deadline, not a few
    times (the job was paid for)."""
    await world.start_bot()
    world.fal.fail_next("result", status="ingress_503", times=8)
    message = await finished(await world.kontext(), timeout=30)
    assert text(message).startswith("✅"), text(message)
    assert world.fal.count("result") == 9 and not fal_job(world).cancelled


async def test_a_result_file_fals_cdn_refuses_for_good_ends_the_job_plainly(world):
    """fal's CDN refuses the result's file (403: an account's access controls can keep outputs
    private, fal-queue-api.md part 2 §1.7), while fal answers every status and the result: the
    job ends at once saying so, the operator gets an ERROR line. It was taken for fal not
    answering: "📡 fal.ai is not answering…" and the file asked again for an hour or more."""
    await world.start_bot()
    world.fal.fail_next("file", 403, times=1000, json={"detail": "Forbidden"})
    message = await finished(await world.kontext(), timeout=10)
    assert text(message).startswith("❌") and "refused the bot the images" in text(message), text(message)
    assert world.fal.count("file") == 1
    errors = [line for line in world.bot.log_text().splitlines() if "ERROR" in line and "refused a result file" in line]
    assert len(errors) == 1, errors


async def test_a_job_still_running_at_its_timeout_is_followed_to_its_result(world):
    """JOB_TIMEOUT bounds the wait for fal to start a job; once running it is billed, and a
    cancel would not stop it: its images are posted."""
    # Started 1.6 s after the command, done at 3.1 s: past JOB_TIMEOUT, within as long again.
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.8, run_time=1.5)
    await world.start_bot(JOB_TIMEOUT="2")
    message = await finished(await world.kontext(), timeout=20)
    assert text(message).startswith("✅"), text(message)
    assert world.fal.count("cancel") == 0


async def test_a_job_fal_never_starts_is_cancelled_at_its_timeout(world):
    world.fal.default = JobScript(queue_positions=(5, 4, 3, 2, 1, 0), step=1.0, run_time=0.1)
    await world.start_bot(JOB_TIMEOUT="1")
    message = await finished(await world.kontext(), timeout=20)
    assert "took too long" in text(message), text(message)
    assert world.fal.count("cancel") == 1 and fal_job(world).cancelled


async def test_one_408_on_a_status_poll_does_not_end_the_job(world):
    world.fal.default = JobScript(queue_positions=(0,), step=0.05, run_time=0.5)
    await world.start_bot(FAL_STATUS_STREAM="0")
    world.fal.fail_next("status", 408, json={"detail": "Request Timeout"})
    message = await finished(await world.kontext(), timeout=20)
    assert text(message).startswith("✅"), text(message)


async def test_a_submit_whose_connection_was_refused_is_sent_again_and_runs_once(world):
    """Refused before anything was sent, fal cannot have recorded it: unlike a 500, it is safe to
    send again, and the member gets the result of exactly one job."""
    await world.start_bot()
    await world.fal.refuse_connections()
    handle = await world.kontext()
    await world.discord.wait_until(lambda: "fal submit failed (ClientConnectorError" in world.bot.log_text(), timeout=5)
    await world.fal.accept_connections()
    assert text(await finished(handle)).startswith("✅")
    assert world.fal.count("submit") == 1 and len(world.fal.jobs) == 1


async def test_an_account_out_of_credit_stops_submits_tells_the_operator_once_and_recovers(world):
    await world.start_bot(FAL_LOCK_RETRY_SECONDS="1.5")
    world.fal.lock_account("Exhausted balance")
    first = await finished(await world.kontext())
    assert "account can't take edits right now (it is out of credit or locked)" in text(first)
    assert "key was refused" not in text(first)
    # Asked again at once: refused privately, nothing sent to fal, nothing queued in vain.
    second = await world.kontext()
    await second.wait_for_callback()
    assert "out of credit or locked" in private_answer(second) and "Nothing was charged" in private_answer(second)
    assert world.fal.count("submit") == 1
    world.fal.unlock_account()
    await asyncio.sleep(1.6)
    third = await finished(await world.kontext())
    assert text(third).startswith("✅")
    await world.bot.stop()
    log = world.bot.log_text()
    errors = [line for line in log.splitlines() if "ERROR" in line and "User is locked" in line]
    assert len(errors) == 1 and "Exhausted balance" in errors[0], errors
    assert "fal accepts the bot's jobs again" in log


async def test_an_account_locked_at_the_upload_of_a_large_input_is_told_like_a_locked_submit(world):
    """An input past the inline size goes to fal's storage first, which refuses it with the same
    403 while the account is locked: nothing submitted, the member's out-of-credit text, the
    operator's one ERROR line, and new requests refused up front."""
    await world.start_bot(FAL_LOCK_RETRY_SECONDS="30")
    world.fal.lock_account("Exhausted balance")
    message = await finished(await world.kontext(image=world.input_image(size=200_000)))
    assert "account can't take edits right now (it is out of credit or locked)" in text(message)
    second = await world.kontext()
    await second.wait_for_callback()
    assert "out of credit or locked" in private_answer(second)
    assert world.fal.count("submit") == 0 and world.fal.uploads == []
    assert world.fal.count("storage_token") == 1 and world.fal.count("storage_initiate") == 0  # a lock is not retried
    await world.bot.stop()
    errors = [line for line in world.bot.log_text().splitlines() if "ERROR" in line and "User is locked" in line]
    assert len(errors) == 1 and "Exhausted balance" in errors[0], errors


async def test_a_storage_call_answered_429_is_tried_again(world):
    """A short burst of rate limiting at fal's storage: 429 to the CDN token, and (the CDN's
    upload refused, so the storage's own flow is used) to its initiate call. Each is tried
    again, as fal-client retries 408, 409 and 429 on uploads (fal-queue-api.md part 1 §4), and
    the member's large photo is edited. The job failed at once ("could not be handed to fal.ai
    right now"), nothing submitted."""
    await world.start_bot()
    world.fal.fail_next("storage_token", 429, json={"detail": "Too many requests"})
    world.fal.fail_next("upload", 403, json={"detail": "Forbidden"})
    world.fal.fail_next("storage_initiate", 429, json={"detail": "Too many requests"})
    message = await finished(await world.kontext(image=world.input_image(size=200_000)))
    assert text(message).startswith("✅"), text(message)
    assert [world.fal.count(op) for op in ("storage_token", "upload", "storage_initiate", "submit")] == [2, 1, 2, 1]


async def test_a_rejected_key_stays_its_own_message(world):
    await world.start_bot(FAL_KEY="not-the-right-key")
    message = await finished(await world.kontext())
    assert "fal.ai key was refused" in text(message)


async def test_a_stream_that_only_sends_keep_alives_is_checked_and_the_job_finishes(world):
    """The stream stays open with comments and no event: after FAL_STREAM_EVENT_TIMEOUT the bot
    polls once and reopens it, so the job ends long before its deadline."""
    world.fal.keepalive_interval = 0.2
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.3, stream_mode="comments_only")
    await world.start_bot(FAL_STREAM_EVENT_TIMEOUT="0.5", JOB_TIMEOUT="30")
    message = await finished(await world.kontext(), timeout=10)
    assert text(message).startswith("✅")
    assert world.fal.count("status") >= 1
    streams = world.fal.requests_for("stream")
    assert streams and all(r.accept == "text/event-stream" for r in streams)


async def test_an_input_outlives_its_discord_link(world):
    """fal fetches inputs when the job starts. The bot hands it its own durable copy, so a Discord
    link that expires while the job waits in fal's queue costs nothing."""
    world.fal.default = JobScript(queue_positions=(2, 1, 0), step=0.3, run_time=0.2)
    await world.start_bot()
    photo = world.input_image(size=200_000)  # past the inline size: uploaded to fal's storage
    handle = await world.kontext(image=photo)
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_cdn_urls()
    message = await finished(handle)
    assert text(message).startswith("✅")
    (upload,) = world.fal.uploads
    assert fal_job(world).payload["image_url"] == upload.url != photo["url"]
    assert upload.content_type == "image/png" and len(upload.data) == photo["size"]
    assert upload.lifecycle is not None and "expiration_duration_seconds" in upload.lifecycle


async def test_reroll_and_edit_a_week_later_work_and_reuse_the_upload(world):
    await world.start_bot()
    photo = world.input_image(size=200_000)
    first = await finished(await world.kontext(image=photo))
    world.discord.advance_cdn_clock(7 * 86400)  # every Discord link handed out so far has expired
    again = await finished(await world.discord.click_button(first.id, button(first, "reroll")))
    assert text(again).startswith("✅")
    assert len(world.fal.uploads) == 1  # the same durable copy, not a second upload
    assert world.fal.submits[1]["image_url"] == world.fal.uploads[0].url
    edit = await world.discord.click_button(first.id, button(first, "edit"))
    await edit.wait_for_callback()
    edited = await finished(await world.discord.submit_modal(edit, {"prompt": "now in winter"}))
    assert text(edited).startswith("✅")


async def test_a_link_whose_picture_changed_is_not_edited_from_the_old_picture(world):
    """A link that always shows the latest picture (a webcam's latest.png), posted again once the
    picture changed: Discord's media proxy serves it at the same address both times, and the bot
    must hand fal the new picture, not the copy it uploaded of the old one."""
    await world.start_bot()
    fake = world.discord
    link = "https://cam.example/latest.png"
    proxied = f"{fake.base_url}/cdn/external/k3Xq/https/cam.example/latest.png"
    pictures = []
    for size in (200_000, 210_000):  # past the inline size: uploaded to fal's storage
        picture = attachment_bytes(world, world.input_image(size=size))
        pictures.append(picture)
        fake.cdn_files[urllib.parse.urlsplit(proxied).path] = (picture, "image/png")
        post = fake.post_user_message("the view now", user="mod")
        post.embeds = [{"type": "image", "url": link, "thumbnail": {"url": link, "proxy_url": proxied}}]
        menu = await fake.invoke_message_command("Edit with Kontext", post.id, user="alice")
        assert (await menu.wait_for_callback())["type"] == 9
        submitted = await fake.submit_modal(menu, {"prompt": "add snow"}, user="alice")
        assert text(await finished(submitted)).startswith("✅")
    assert [upload.data for upload in world.fal.uploads] == pictures
    assert [submit["image_url"] for submit in world.fal.submits] == [upload.url for upload in world.fal.uploads]


async def lying_attachment(world, data: bytes, name: str = "photo.png"):
    return world.discord.add_cdn_file(data, name, "image/png")


async def test_a_file_that_only_claims_to_be_an_image_is_refused_privately_and_costs_nothing(world):
    await world.start_bot()
    for data, expected in (
        (b"just some text, honestly", "is not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "damaged"),  # a PNG signature and nothing whole behind it
    ):
        handle = await world.kontext(image=await lying_attachment(world, data))
        await handle.wait_until(lambda h: bool(h.followups), timeout=10)
        (note,) = handle.followups
        assert note.ephemeral and expected in text(note), text(note)
        assert handle.original is not None and handle.original.deleted  # the public "thinking…" is gone
    assert world.fal.count("submit") == 0 and world.fal.uploads == []


async def test_an_input_download_that_redirects_is_not_followed(world):
    """The bot fetches inputs only from Discord's hosts, so that no member can make it fetch an
    address of their choosing. A redirect from one of them (a misconfigured proxy, a host
    listed in DISCORD_CDN_HOSTS that redirects) would take it anywhere, the operator's own network
    included: it is not followed, and the member is told the image could not be fetched."""
    redirected_to: list[str] = []

    async def target(request: web.Request) -> web.Response:
        redirected_to.append(request.path)
        return web.Response(body=attachment_bytes(world, world.input_image()), content_type="image/png")

    async def redirecting(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{port}/internal/secret.png")  # any address would do

    app = web.Application()
    app.router.add_get("/internal/secret.png", target)
    app.router.add_get("/attachments/{name}", redirecting)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        await world.start_bot(DISCORD_CDN_HOSTS=f"127.0.0.1:{world.discord.port},127.0.0.1:{port}")
        photo = world.input_image()
        photo["url"] = photo["proxy_url"] = f"http://127.0.0.1:{port}/attachments/photo.png"
        message = await finished(await world.kontext(image=photo))
        assert "`photo.png` could not be fetched from Discord" in text(message), text(message)
        assert redirected_to == [] and world.fal.count("submit") == 0
    finally:
        await runner.cleanup()


async def test_a_cut_off_jpeg_is_refused(world):
    await world.start_bot()
    whole = world.input_image(size=80_000, fmt="jpeg")
    cut = world.discord.add_cdn_file(attachment_bytes(world, whole)[:40_000], "cut.jpg", "image/jpeg")
    handle = await world.kontext(image=cut)
    await handle.wait_until(lambda h: bool(h.followups), timeout=10)
    assert "`cut.jpg` is damaged" in text(handle.followups[0])
    assert world.fal.count("submit") == 0


def animated_gif(frames: int = 3) -> bytes:
    """A small animated GIF of noise: each frame's data runs over many sub-blocks."""
    pictures = [Image.frombytes("RGB", (64, 64), random.Random(i).randbytes(64 * 64 * 3)) for i in range(frames)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, "GIF", save_all=True, append_images=pictures[1:], loop=0, duration=100)
    return buffer.getvalue()


async def test_a_gif_cut_off_in_its_first_frame_is_refused_and_one_cut_in_a_later_frame_is_edited(world):
    """fal edits a GIF's first frame: a file that ends inside it would fail at fal after the
    member waited in its queue, while one whose first frame arrived whole is read as it is."""
    gif = animated_gif()
    first_frame_ends = gif.index(b"\x00\x21\xf9\x04", 800) + 1  # the second frame's control extension
    await world.start_bot()
    cut = world.discord.add_cdn_file(gif[: first_frame_ends // 2], "cut.gif", "image/gif")
    handle = await world.kontext(image=cut)
    await handle.wait_until(lambda h: bool(h.followups), timeout=10)
    assert "`cut.gif` is damaged: the image is cut off" in text(handle.followups[0])
    assert world.fal.count("submit") == 0
    later = world.discord.add_cdn_file(gif[: first_frame_ends + 100], "later.gif", "image/gif")
    message = await finished(await world.kontext(image=later))
    assert text(message).startswith("✅"), text(message)


async def test_a_motion_photo_whose_video_follows_the_jpeg_is_not_taken_for_a_cut_off_one(world):
    """A phone's motion photo is a whole JPEG with a short video (an MP4) after its end marker:
    the photo is there, so it is not refused as cut off."""
    jpeg = attachment_bytes(world, world.input_image(size=80_000, fmt="jpeg"))
    video = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(0xFF)) * 800  # no 0xFF byte
    photo = world.discord.add_cdn_file(jpeg + video, "PXL_20260101_120000000.MP.jpg", "image/jpeg")
    await world.start_bot()
    message = await finished(await world.kontext(image=photo))
    assert text(message).startswith("✅"), text(message)
    (upload,) = world.fal.uploads
    assert upload.data == jpeg + video and upload.content_type == "image/jpeg"


async def test_a_jpeg_with_stray_bytes_between_its_segments_is_not_taken_for_a_cut_off_one(world):
    """Some encoders leave stray bytes between a JPEG's segments, a stuffed 0xFF 0x00 among them:
    JPEG decoders skip those as they skip any byte that starts no marker (libjpeg counts them as
    "extraneous bytes before marker" and reads on), so the image is whole and readable."""
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), "teal").save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    quantization_table = jpeg.index(b"\xff\xdb")  # after SOI and the JFIF header
    assert quantization_table == 20
    stray = jpeg[:quantization_table] + b"\xff\x00" + jpeg[quantization_table:]
    attachment = world.discord.add_cdn_file(stray, "webcam.jpg", "image/jpeg")
    await world.start_bot()
    message = await finished(await world.kontext(image=attachment))
    assert text(message).startswith("✅"), text(message)
    assert fal_job(world).payload["image_url"] == data_uri(world, attachment, "image/jpeg")


async def test_a_camera_jpeg_with_a_second_picture_inside_is_an_ordinary_jpeg(world):
    """Cameras and phones write JPEGs whose Multi-Picture index holds a preview or an HDR gain
    map after the photo (Pillow names the format "MPO"); any JPEG reader shows the photo, so
    it is handed to fal byte for byte like any JPEG."""
    buffer = io.BytesIO()
    photo, gain_map = Image.new("RGB", (96, 64), "teal"), Image.new("L", (48, 32), 128)
    photo.save(buffer, "MPO", save_all=True, append_images=[gain_map])
    attachment = world.discord.add_cdn_file(buffer.getvalue(), "DSC_0042.JPG", "image/jpeg")
    await world.start_bot()
    message = await finished(await world.kontext(image=attachment))
    assert text(message).startswith("✅"), text(message)
    assert fal_job(world).payload["image_url"] == data_uri(world, attachment, "image/jpeg")


def png_claiming(width: int, height: int) -> bytes:
    """A whole, valid PNG of a few bytes whose header claims `width` x `height` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


@pytest.mark.parametrize("width,height", [(20_000, 10_000), (10_000, 10_000)], ids=["over-pillows-limit", "over-ours"])
async def test_an_image_of_too_many_pixels_is_refused_privately(world, width, height):
    """A decompression bomb (a few bytes claiming 100-200 million pixels) is the member's input
    to fix, not the bot's failure with a Try again that can only fail again."""
    await world.start_bot()
    handle = await world.kontext(image=world.discord.add_cdn_file(png_claiming(width, height), "pano.png", "image/png"))
    await handle.wait_until(lambda h: bool(h.followups), timeout=10)
    (note,) = handle.followups
    assert note.ephemeral and "`pano.png` has too many pixels" in text(note), text(note)
    assert world.fal.count("submit") == 0


async def test_cancel_while_queued_removes_the_job(world):
    world.fal.default = JobScript(queue_positions=(3, 2, 1, 0), step=1.0)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: has_button(h.original, "cancel"))
    await world.discord.click_button(handle.original.id, button(handle.original, "cancel"))
    message = await finished(handle)
    assert text(message).startswith("🚫 Cancelled by")
    assert fal_job(world).cancelled and fal_job(world).started_at is None


async def cancel_once_fal_has_started(world, script: JobScript):
    """Press Cancel while the reply still shows the job queued but fal has started it (the bot
    polls slowly here, so it has not seen the start yet): fal answers CANCELLATION_REQUESTED."""
    world.fal.default = script
    await world.start_bot(FAL_STATUS_STREAM="0", POLL_INTERVAL="1.0")
    handle = await world.kontext()
    await handle.wait_until(lambda h: has_button(h.original, "cancel"))
    await world.discord.wait_until(lambda: fal_job(world).state == "IN_PROGRESS", timeout=5)
    click = await world.discord.click_button(handle.original.id, button(handle.original, "cancel"))
    await click.wait_until(lambda h: bool(h.followups), timeout=5)
    return handle, click


async def test_cancel_of_a_running_job_says_fal_finishes_it_and_delivers_what_was_paid_for(world):
    handle, click = await cancel_once_fal_has_started(world, JobScript(queue_positions=(0,), step=0.1, run_time=1.5))
    assert "already started this edit" in text(click.followups[0]) and click.followups[0].ephemeral
    message = await finished(handle)
    assert text(message).startswith("✅ Done. The cancel came after fal had started")
    assert len(message.files) == 1 and fal_job(world).cancel_requested_at is not None


async def test_a_cancel_fal_honours_ends_as_cancelled(world):
    """A cancellation-aware app stops and answers 499: the job ends cancelled."""
    script = JobScript(queue_positions=(0,), step=0.1, run_time=3.0, cancellation_aware=True)
    handle, _ = await cancel_once_fal_has_started(world, script)
    message = await finished(handle)
    assert text(message).startswith("🚫 Cancelled by")


@pytest.mark.parametrize("answer", ["ALREADY_COMPLETED", "CANCELLATION_REQUESTED"])
async def test_a_job_fal_started_unseen_before_its_timeout_is_followed_to_its_result(world, answer):
    """fal started the job after the last status the bot saw, before its deadline: the timeout's
    cancel comes too late (fal answers that the job is done, or that it runs: the model finishes
    and bills it), so the job is followed to its images rather than reported as too slow."""
    if answer == "ALREADY_COMPLETED":
        # Polls right after the submit and 4 s later; fal runs it from 2 s to 2.5 s, the deadline is 3 s.
        world.fal.default = JobScript(queue_positions=(0,), step=2.0, run_time=0.5)
        await world.start_bot(JOB_TIMEOUT="3", FAL_STATUS_STREAM="0", POLL_INTERVAL="4")
    else:
        # The first status stream never answers (given up only after 10 s); fal runs the job
        # from 2 s to 4 s.
        world.fal.default = JobScript(queue_positions=(0,), step=2.0, run_time=2.0)
        world.fal.fail_next("stream", "hang")
        await world.start_bot(JOB_TIMEOUT="3", FAL_READ_TIMEOUT="10", FAL_STREAM_EVENT_TIMEOUT="10")
    message = await finished(await world.kontext(), timeout=20)
    assert text(message).startswith("✅"), text(message)
    assert len(message.files) == 1
    assert world.fal.count("cancel") == 1
    assert f"past its deadline, yet fal started it ({answer})" in world.bot.log_text()


async def test_a_queued_job_fal_starts_while_its_status_fails_is_followed_to_its_result(world):
    """fal stops answering the job's status while it waits in fal's line, for longer than the bot
    tries; fal starts it meanwhile. The cancel the bot then sends finds it running (it ignores
    the cancel: the model finishes and bills it), so it is followed to its images rather than
    reported as fal not answering."""
    world.fal.default = JobScript(queue_positions=(0,), step=1.0, run_time=3.0)
    await world.start_bot(FAL_STATUS_STREAM="0", RETRY_BASE_DELAY="0.05")
    world.fal.fail_next("status", status="ingress_503", times=FOLLOW_ATTEMPTS)
    message = await finished(await world.kontext(), timeout=20)
    assert text(message).startswith("✅"), text(message)
    assert world.fal.count("cancel") == 1
    assert "its status unanswered, yet fal started it (CANCELLATION_REQUESTED)" in world.bot.log_text()


async def test_a_queued_job_fal_answers_nothing_about_is_asked_after_until_fal_ran_it(world):
    """An outage at fal's front hits the job's status polls and the cancel alike while the job
    waits in fal's line. fal keeps it there and runs (and bills) it. The bot keeps asking, says
    so meanwhile, and when fal answers again delivers the result instead of leaving it unseen."""
    world.fal.default = JobScript(queue_positions=(0,), step=3.0, run_time=0.2)
    await world.start_bot(FAL_STATUS_STREAM="0", RETRY_BASE_DELAY="0.05")
    world.fal.fail_next("status", status="ingress_503", times=FOLLOW_ATTEMPTS)
    world.fal.fail_next("cancel", status="ingress_503", times=100_000)
    handle = await world.kontext()
    await handle.wait_until(
        lambda h: shows(h, "fal.ai is not answering. Your edit may still be in its queue"), timeout=30
    )
    assert fal_job(world).state == "COMPLETED" and not is_final(handle)
    world.fal.clear_faults("cancel")  # fal is back
    message = await finished(handle, timeout=20)
    assert text(message).startswith("✅"), text(message)
    assert world.fal.count("submit") == 1 and world.fal.count("result") == 1
    assert "fal answers neither its status nor a cancel" in world.bot.log_text()


async def test_a_running_job_is_followed_through_a_short_fal_outage(world):
    """Once fal runs a job it bills it, and a cancel would not stop it: its status is followed
    through an outage as long as its result's fetch would be, not given up after a few tries."""
    world.fal.default = JobScript(queue_positions=(0,), step=0.05, run_time=1.5)
    await world.start_bot(FAL_STATUS_STREAM="0")
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "Generating"))
    world.fal.fail_next("status", status="ingress_503", times=8)
    message = await finished(handle, timeout=30)
    assert text(message).startswith("✅"), text(message)
    assert world.fal.count("cancel") == 0
