from pathlib import Path
from typing import Any

import pytest

from cogs.render import FAILURE_MESSAGES, JobAction, failure_text, job_log_line, pack_files, plain_text, render
from services.flux_kontext import KontextEdit, KontextOptions
from services.i18n import english
from services.job import NOTE_FROM_DEFAULTS, NOTE_PRIVATE_FIRST, NOTE_SHARED_AS, Job, JobResult, JobState, ResultImage
from services.metrics import KNOWN_ERROR_CODES

MIB = 1024 * 1024


def make_job(**changes) -> Job:
    values: dict[str, Any] = dict(
        guild_id=1,
        channel_id=2,
        user_id=3,
        application_id=4,
        interaction_token="t",
        interaction_created_at=0.0,
        message_id=5,
        channel_nsfw=False,
        upload_limit=10 * MIB,
        edit=KontextEdit("make it blue @everyone", ("http://x/a.png",), KontextOptions(safety_tolerance=2)),
        id=7,
    )
    values.update(changes)
    return Job(**values)


def image(name: str, nsfw: bool = False, size: int = 100) -> ResultImage:
    return ResultImage(size, "image/png", nsfw, path=Path(name))


@pytest.mark.parametrize(
    "sizes,limit,groups,too_large",
    [
        ([], 10, [], []),
        ([3, 3, 3], 10, [[0, 1, 2]], []),
        ([6, 6, 6], 10, [[0], [1], [2]], []),
        ([4, 7, 3, 12], 10, [[0], [1, 2]], [3]),
        ([10, 10], 10, [[0], [1]], []),
    ],
)
def test_pack_files_respects_the_upload_limit(sizes, limit, groups, too_large):
    assert pack_files(sizes, limit) == (groups, too_large)


def test_pack_files_caps_files_per_message():
    groups, _ = pack_files([1] * 12, 100, per_message=10)
    assert [len(g) for g in groups] == [10, 2]


def test_queue_position_is_shown_one_based_with_a_cancel_button():
    rendered = render(make_job(state=JobState.QUEUED, queue_position=0))
    assert "position **1**" in rendered.content
    assert rendered.buttons == (JobAction.CANCEL,) and rendered.job_id == 7


def test_running_shows_a_live_relative_timestamp_and_no_cancel():
    rendered = render(make_job(state=JobState.RUNNING, started_at=1700000000.5))
    assert "<t:1700000000:R>" in rendered.content
    assert rendered.buttons == ()


def test_equal_states_render_equal_keys_and_changes_differ():
    a = render(make_job(state=JobState.QUEUED, queue_position=3))
    b = render(make_job(state=JobState.QUEUED, queue_position=3))
    c = render(make_job(state=JobState.QUEUED, queue_position=2))
    assert a.key() == b.key() != c.key()


def test_prompt_is_quoted_in_the_embed_not_the_content():
    rendered = render(make_job(state=JobState.QUEUED))
    assert "@everyone" not in rendered.content
    assert rendered.embed.description == "> make it blue @everyone"


@pytest.mark.parametrize("code", sorted(FAILURE_MESSAGES))
def test_every_failure_code_has_words(code):
    rendered = render(make_job(state=JobState.FAILED, error_code=code, error_detail="image too small"))
    assert rendered.content.startswith("❌ ")
    assert "{detail}" not in rendered.content


def test_only_the_bots_own_faults_get_the_generic_words():
    assert set(FAILURE_MESSAGES) == KNOWN_ERROR_CODES - {"internal", "unreadable"}


def test_fal_detail_is_passed_on_and_unknown_codes_are_generic():
    assert "image too small" in failure_text("fal_rejected", "image too small", english())
    assert failure_text("something_new", None, english()).startswith("Something went wrong")


def test_flagged_images_are_withheld_outside_age_restricted_channels():
    result = JobResult(1, [image("a"), image("b", nsfw=True)])
    rendered = render(make_job(state=JobState.SUCCEEDED, result=result))
    assert [f.path for f in rendered.files] == [Path("a")]
    assert "1 of 2" in rendered.content


def test_flagged_images_are_spoilered_in_age_restricted_channels():
    result = JobResult(1, [image("b", nsfw=True)])
    rendered = render(make_job(state=JobState.SUCCEEDED, result=result, channel_nsfw=True))
    assert [f.path for f in rendered.files] == [Path("b")]
    assert "spoiler" in rendered.content


def test_result_embed_shows_seed_and_policy_note():
    result = JobResult(1234, [image("a")])
    rendered = render(make_job(state=JobState.SUCCEEDED, result=result, notes={"safety_limited_to": 3}))
    fields = {f.name: str(f.value) for f in rendered.embed.fields}
    assert fields["Seed"] == "1234"
    assert "limited to 3" in fields["Policy"]


def test_options_line_reads_naturally():
    job = make_job(
        state=JobState.QUEUED,
        edit=KontextEdit("p", ("a", "b"), KontextOptions(enhance_prompt=True, num_images=2, safety_tolerance=3)),
    )
    options = next(f.value for f in render(job).embed.fields if f.name == "Options")
    assert options == "2 images combined · Images 2 · Safety tolerance 3 · Enhanced prompt"


def test_a_prompt_cannot_forge_a_log_channel_entry():
    forged = (
        "cat” · https://x\n✅ Job #41 by <@222222222222222222> in <#333> · tolerance 6 · succeeded · “nude **photo**"
    )
    line = job_log_line(make_job(state=JobState.SUCCEEDED, edit=KontextEdit(forged, ("http://x/a.png",))), english())
    assert "\n" not in line and "\\*\\*photo\\*\\*" in line and "<@222222222222222222>" not in line


@pytest.mark.parametrize("words", ["x" * 1000, "a_b*" * 250, "_" * 1000, "hi @everyone " * 100])
def test_plain_text_keeps_to_its_limit_escapes_included(words):
    shown = plain_text(words, 500)
    assert len(shown) <= 500 and len(shown) >= 498 and shown.endswith("…")
    assert not shown.endswith("\\…")  # an escape is never cut in half


def test_plain_text_that_fits_is_shown_whole():
    assert plain_text("make it *blue*", 16) == "make it \\*blue\\*"


def test_a_masked_link_in_a_prompt_is_not_a_link_in_the_reply():
    job = make_job(state=JobState.QUEUED, edit=KontextEdit("[Claim Nitro](https://evil.example)", ("http://x/a.png",)))
    assert render(job).embed.description == "> \\[Claim Nitro](https://evil.example)"  # shown, not a link


def test_options_from_the_members_defaults_are_marked():
    job = make_job(
        state=JobState.QUEUED,
        edit=KontextEdit("p", (), KontextOptions(aspect_ratio="16:9", num_images=2, enhance_prompt=True)),
        notes={NOTE_FROM_DEFAULTS: ["aspect_ratio", "enhance_prompt"]},
    )
    options = next(f.value for f in render(job).embed.fields if f.name == "Options")
    assert options == "Made from text · Aspect ratio 16:9 (your default) · Images 2 · Enhanced prompt (your default)"


def test_a_private_first_result_offers_share_until_it_is_shared():
    done = dict(state=JobState.SUCCEEDED, result=JobResult(1, [image("a")]))
    private = render(make_job(**done, notes={NOTE_PRIVATE_FIRST: True}))
    assert private.buttons == (JobAction.SHARE, JobAction.REROLL, JobAction.EDIT, JobAction.DELETE)
    assert "Only you can see this until you share it" in private.details
    shared = render(make_job(**done, notes={NOTE_PRIVATE_FIRST: True, NOTE_SHARED_AS: 99}))
    assert shared.buttons == (JobAction.REROLL, JobAction.EDIT, JobAction.DELETE)
    assert "Only you can see this" not in shared.details
    failed = render(make_job(state=JobState.FAILED, error_code="fal_failed", notes={NOTE_PRIVATE_FIRST: True}))
    assert failed.buttons == (JobAction.RETRY,)
