"""The FLUX Kontext model's request and response: what is sent to fal and read back."""

from __future__ import annotations

import pytest

from services.fal_queue import FalBadOutput
from services.flux_kontext import (
    ENDPOINT_EDIT,
    ENDPOINT_MULTI,
    ENDPOINT_TEXT,
    InvalidEdit,
    KontextEdit,
    KontextOptions,
    parse_output,
)


def test_one_image_goes_to_the_edit_endpoint_with_only_the_options_set():
    edit = KontextEdit("make it blue", ("https://cdn/a.png",), KontextOptions(num_images=2, safety_tolerance=3))
    assert edit.endpoint == ENDPOINT_EDIT
    assert edit.payload() == {
        "prompt": "make it blue",
        "image_url": "https://cdn/a.png",
        "num_images": 2,
        "safety_tolerance": "3",  # fal's string enum
    }


def test_several_images_go_to_the_multi_endpoint_as_a_list():
    edit = KontextEdit("combine", ("https://cdn/a.png", "https://cdn/b.png"))
    assert edit.endpoint == ENDPOINT_MULTI
    assert edit.payload() == {"prompt": "combine", "image_urls": ["https://cdn/a.png", "https://cdn/b.png"]}


def test_no_image_goes_to_the_text_to_image_endpoint_without_an_image_field():
    edit = KontextEdit("a red fox in snow", (), KontextOptions(aspect_ratio="16:9", num_images=2))
    assert edit.from_text and edit.endpoint == ENDPOINT_TEXT
    assert edit.payload() == {"prompt": "a red fox in snow", "aspect_ratio": "16:9", "num_images": 2}


@pytest.mark.parametrize("urls", [(), ("https://cdn/a.png",), ("https://cdn/a.png", "https://cdn/b.png")])
def test_a_stored_payload_reads_back_as_the_same_edit(urls):
    options = KontextOptions("16:9", 4, 42, 7.5, "png", True, 6)
    edit = KontextEdit("p", urls, options)
    assert KontextEdit.from_payload(edit.endpoint, edit.payload()) == edit


@pytest.mark.parametrize(
    "options",
    [
        KontextOptions(aspect_ratio="5:4"),
        KontextOptions(output_format="gif"),
        KontextOptions(num_images=5),
        KontextOptions(seed=-1),
        KontextOptions(guidance_scale=float("nan")),
        KontextOptions(guidance_scale=21.0),
        KontextOptions(safety_tolerance=7),
    ],
)
def test_values_the_model_does_not_take_are_refused(options):
    with pytest.raises(InvalidEdit):
        options.check()


def test_a_job_takes_at_most_four_images():
    with pytest.raises(InvalidEdit):
        KontextEdit("p", tuple(f"https://cdn/{i}.png" for i in range(5)))


def test_a_follow_up_edit_keeps_the_look_not_the_seed_or_count():
    options = KontextOptions("16:9", 4, 42, 7.5, "png", True, 3)
    assert options.for_follow_up_edit() == KontextOptions("16:9", None, None, 7.5, "png", True, 3)


def test_output_without_sizes_or_flags_reads_as_unknown_size_and_not_flagged():
    output = parse_output({"images": [{"url": "https://v3.fal.media/a.jpg", "width": 512, "height": 384}], "seed": 0})
    (image,) = output.images
    assert (image.file_size, image.width, image.height, image.nsfw) == (None, 512, 384, False)
    assert output.seed == 0 and output.inference_seconds is None


def test_output_flags_and_timings_are_read():
    output = parse_output(
        {
            "images": [{"url": "u1", "file_size": 10}, {"url": "u2"}],
            "has_nsfw_concepts": [False, True],
            "timings": {"inference": 4.2},
        }
    )
    assert [i.nsfw for i in output.images] == [False, True]
    assert output.images[0].file_size == 10 and output.inference_seconds == 4.2


@pytest.mark.parametrize("body", [None, [], {"images": []}, {"images": [{"width": 1}]}, {"images": ["x"]}])
def test_malformed_output_is_a_bad_output_error(body):
    with pytest.raises(FalBadOutput):
        parse_output(body)
