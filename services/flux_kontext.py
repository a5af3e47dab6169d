"""FLUX.1 Kontext [max] on fal: its endpoints, the options a member can set, the payload fal
takes and the output it gives back. The one module that knows the model's API
(fal-queue-api.md, part 1 §3 and part 2 §4); everything else speaks `KontextEdit`: with input
images an edit, without one an image made from the prompt alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .fal_queue import FalBadOutput
from .i18n import N_, LocalizedError

ENDPOINT_EDIT = "fal-ai/flux-pro/kontext/max"
# Several input images ("put the hat from image 2 on the person in image 1").
ENDPOINT_MULTI = "fal-ai/flux-pro/kontext/max/multi"
# No input image: the same options, made from the prompt alone (aspect ratio 1:1 unless asked).
ENDPOINT_TEXT = "fal-ai/flux-pro/kontext/max/text-to-image"

ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
OUTPUT_FORMATS = ("jpeg", "png")
NUM_IMAGES_MIN, NUM_IMAGES_MAX = 1, 4
GUIDANCE_MIN, GUIDANCE_MAX = 1.0, 20.0
SEED_MAX = 2**32 - 1
SAFETY_MIN, SAFETY_MAX = 1, 6
MAX_INPUT_IMAGES = 4


class InvalidEdit(LocalizedError, ValueError):
    """A request the model would refuse: caught before anything is spent."""


@dataclass(frozen=True)
class KontextOptions:
    """The model's options; None means "not sent", so fal's own default applies."""

    aspect_ratio: str | None = None
    num_images: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    output_format: str | None = None
    enhance_prompt: bool | None = None
    # An int here; fal takes the string "1".."6", converted in `KontextEdit.payload` only.
    safety_tolerance: int | None = None

    @property
    def image_count(self) -> int:
        """How many images the job makes (and is billed for)."""
        return self.num_images or 1

    def check(self) -> None:
        """Raise InvalidEdit for a value the model does not take. Discord enforces the slash
        options' ranges, but discord.py does not check them again on receipt."""
        if self.aspect_ratio is not None and self.aspect_ratio not in ASPECT_RATIOS:
            raise InvalidEdit(
                N_("the aspect ratio {ratio} is not one of {ratios}"),
                ratio=self.aspect_ratio,
                ratios=", ".join(ASPECT_RATIOS),
            )
        if self.output_format is not None and self.output_format not in OUTPUT_FORMATS:
            raise InvalidEdit(N_("the output format {format} is not JPEG or PNG"), format=self.output_format)
        if self.num_images is not None and not NUM_IMAGES_MIN <= self.num_images <= NUM_IMAGES_MAX:
            raise InvalidEdit(N_("the number of images must be {min} to {max}"), min=NUM_IMAGES_MIN, max=NUM_IMAGES_MAX)
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX:
            raise InvalidEdit(N_("the seed must be 0 to {max}"), max=SEED_MAX)
        guidance = self.guidance_scale
        if guidance is not None and not (math.isfinite(guidance) and GUIDANCE_MIN <= guidance <= GUIDANCE_MAX):
            raise InvalidEdit(
                N_("the guidance scale must be {min} to {max}"), min=f"{GUIDANCE_MIN:g}", max=f"{GUIDANCE_MAX:g}"
            )
        if self.safety_tolerance is not None and not SAFETY_MIN <= self.safety_tolerance <= SAFETY_MAX:
            raise InvalidEdit(N_("the safety tolerance must be {min} to {max}"), min=SAFETY_MIN, max=SAFETY_MAX)

    def for_follow_up_edit(self) -> KontextOptions:
        """What carries over when a result is edited further (one image from one image): its
        look (shape, guidance, format, prompt enhancement) and tolerance, not its seed or count."""
        return KontextOptions(
            aspect_ratio=self.aspect_ratio,
            guidance_scale=self.guidance_scale,
            output_format=self.output_format,
            enhance_prompt=self.enhance_prompt,
            safety_tolerance=self.safety_tolerance,
        )


_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(KontextOptions))


@dataclass(frozen=True)
class KontextEdit:
    """One job as the member asked for it: the prompt, the input images (none: an image made
    from the prompt alone) and the options."""

    prompt: str
    image_urls: tuple[str, ...]
    options: KontextOptions = KontextOptions()

    def __post_init__(self) -> None:
        if len(self.image_urls) > MAX_INPUT_IMAGES:
            raise InvalidEdit(
                N_("a job takes at most {max} images, not {count}"), max=MAX_INPUT_IMAGES, count=len(self.image_urls)
            )

    @property
    def from_text(self) -> bool:
        """Made from the prompt alone, with no input image."""
        return not self.image_urls

    @property
    def endpoint(self) -> str:
        if self.from_text:
            return ENDPOINT_TEXT
        return ENDPOINT_MULTI if len(self.image_urls) > 1 else ENDPOINT_EDIT

    def with_options(self, **changes: Any) -> KontextEdit:
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **changes))

    def payload(self) -> dict[str, Any]:
        """The JSON body fal takes: options left unset are left out."""
        body: dict[str, Any] = {"prompt": self.prompt}
        if self.endpoint == ENDPOINT_MULTI:
            body["image_urls"] = list(self.image_urls)
        elif self.endpoint == ENDPOINT_EDIT:
            body["image_url"] = self.image_urls[0]
        for name in _OPTION_FIELDS:
            value = getattr(self.options, name)
            if value is not None:
                body[name] = str(value) if name == "safety_tolerance" else value
        return body

    @classmethod
    def from_payload(cls, endpoint: str, body: dict[str, Any]) -> KontextEdit:
        """The edit a stored payload describes (the inverse of `payload`)."""
        urls: tuple[str, ...] = ()
        if endpoint == ENDPOINT_MULTI:
            urls = tuple(body["image_urls"])
        elif endpoint == ENDPOINT_EDIT:
            urls = (body["image_url"],)
        values = {name: body[name] for name in _OPTION_FIELDS if body.get(name) is not None}
        if "safety_tolerance" in values:
            values["safety_tolerance"] = int(values["safety_tolerance"])
        return cls(str(body["prompt"]), urls, KontextOptions(**values))


@dataclass(frozen=True)
class OutputImage:
    url: str
    # Announced sizes are optional (the multi endpoint never sends `file_size`).
    file_size: int | None
    width: int | None
    height: int | None
    nsfw: bool


@dataclass(frozen=True)
class KontextOutput:
    images: tuple[OutputImage, ...]
    seed: int | None
    inference_seconds: float | None


def parse_output(body: Any) -> KontextOutput:
    """Read the model's output: `{images: [{url, ...}], seed, has_nsfw_concepts, timings}`."""
    if not isinstance(body, dict):
        raise FalBadOutput("the result is not a JSON object")
    images = body.get("images")
    if not isinstance(images, list) or not images:
        raise FalBadOutput("the result has no images")
    flags = body.get("has_nsfw_concepts")
    flags = flags if isinstance(flags, list) else []
    parsed = []
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
            raise FalBadOutput(f"result image {index + 1} has no URL")
        parsed.append(
            OutputImage(
                url=image["url"],
                file_size=_positive_int(image.get("file_size")),
                width=_positive_int(image.get("width")),
                height=_positive_int(image.get("height")),
                nsfw=index < len(flags) and flags[index] is True,
            )
        )
    timings = body.get("timings")
    inference = timings.get("inference") if isinstance(timings, dict) else None
    return KontextOutput(
        images=tuple(parsed),
        seed=_positive_int(body.get("seed"), allow_zero=True),
        inference_seconds=float(inference) if isinstance(inference, (int, float)) and inference > 0 else None,
    )


def _positive_int(value: Any, *, allow_zero: bool = False) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if value > 0 or (allow_zero and value == 0) else None
