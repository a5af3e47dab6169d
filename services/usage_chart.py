"""A server's last 30 days at a glance, for its moderators: images per day as bars, and this
month's estimated spend against the monthly budget, drawn as a PNG with Pillow, with the same
facts as plain text for screen readers (the attachment's alt text).

The chart is an opaque dark card with light text: it reads the same on Discord's dark and
light themes, where a transparent image would have to suit two backgrounds at once.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .i18n import Texts, english

WIDTH, HEIGHT = 800, 360

BACKGROUND = (43, 45, 49)  # Discord's dark panel
TEXT = (242, 243, 245)
MUTED = (181, 186, 193)
GRID = (70, 72, 79)
# Light blurple and Discord's green and red: each at least 3:1 against the background.
BAR_COLOUR = (121, 132, 245)
SPEND_COLOUR = (87, 242, 135)
OVER_BUDGET_COLOUR = (237, 66, 69)

# The plot area of the bars: left, top, right, bottom.
PLOT = (64, 64, 776, 244)
BUDGET_BAR = (64, 318, 776, 336)
# A date under every 7th bar, counted back from the newest, so the last day is always named.
LABEL_EVERY = 7
ALT_TEXT_LIMIT = 1024  # Discord's limit for an attachment's description


@dataclass(frozen=True)
class DayUsage:
    day: date
    images: int
    usd: float


def last_days(counts: Mapping[date, tuple[int, float]], today: date, days: int = 30) -> list[DayUsage]:
    """The `days` days up to and including `today`, oldest first; a day with no entry in
    `counts` (images, usd) made nothing."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    first = today - timedelta(days=days - 1)
    span = (first + timedelta(days=offset) for offset in range(days))
    return [DayUsage(day, *counts.get(day, (0, 0.0))) for day in span]


def render_usage_chart(
    days: Sequence[DayUsage],
    *,
    monthly_budget_usd: float | None,
    month_spent_usd: float,
    title: str,
    in_language: Texts | None = None,
) -> bytes:
    """The chart as PNG bytes, WIDTH x HEIGHT, with the number of days in its `days` text chunk;
    its words and dates in `in_language` (English by default)."""
    _check_budget(monthly_budget_usd)
    _ = in_language or english()
    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    title_font, font, small = _font(20), _font(14), _font(12)
    draw.text((PLOT[0], 14), _fit(title, title_font, PLOT[2] - PLOT[0]), font=title_font, fill=TEXT)
    draw.text((PLOT[0], 42), _("Images per day"), font=small, fill=MUTED)
    total_images = sum(day.images for day in days)
    totals = _totals(days, _)
    draw.text((PLOT[2], 42), totals, font=small, fill=MUTED, anchor="ra")
    _draw_bars(draw, days, small, _)
    if not total_images:
        middle = ((PLOT[0] + PLOT[2]) // 2, (PLOT[1] + PLOT[3]) // 2)
        draw.text(middle, _("No images in this period"), font=font, fill=MUTED, anchor="mm")
    _draw_budget(draw, monthly_budget_usd, month_spent_usd, font, _)
    info = PngInfo()
    info.add_text("days", str(len(days)))
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=info, optimize=True)
    return out.getvalue()


def usage_summary_text(
    days: Sequence[DayUsage], monthly_budget_usd: float | None, month_spent_usd: float, in_language: Texts | None = None
) -> str:
    """What the chart shows, in sentences (at most ALT_TEXT_LIMIT characters), in `in_language`
    (English by default)."""
    _check_budget(monthly_budget_usd)
    _ = in_language or english()
    parts: list[str] = []
    if days:
        images = sum(day.images for day in days)
        usd = sum(day.usd for day in days)
        parts.append(
            _.ngettext(
                "Images per day from {first} to {last}: {count} image in {days} days, estimated {cost}.",
                "Images per day from {first} to {last}: {count} images in {days} days, estimated {cost}.",
                images,
                first=_.long_day(days[0].day),
                last=_.long_day(days[-1].day),
                days=len(days),
                cost=_.money(usd),
            )
        )
        busiest = max(days, key=lambda day: day.images)
        if busiest.images:
            active = sum(1 for day in days if day.images)
            parts.append(
                _.ngettext(
                    "Busiest day {day} with {count} image; images were made on {active} of the {days} days; "
                    "{last} on the last day.",
                    "Busiest day {day} with {count} images; images were made on {active} of the {days} days; "
                    "{last} on the last day.",
                    busiest.images,
                    day=_.long_day(busiest.day),
                    active=active,
                    days=len(days),
                    last=days[-1].images,
                )
            )
    parts.append(_budget_sentence(monthly_budget_usd, month_spent_usd, _))
    return " ".join(parts)[:ALT_TEXT_LIMIT]


def _totals(days: Sequence[DayUsage], _: Texts) -> str:
    images = sum(day.images for day in days)
    return _.ngettext(
        "{count} image, {cost} in {days} days",
        "{count} images, {cost} in {days} days",
        images,
        cost=_.money(sum(day.usd for day in days)),
        days=len(days),
    )


def _check_budget(monthly_budget_usd: float | None) -> None:
    if monthly_budget_usd is not None and not monthly_budget_usd > 0:
        raise ValueError(f"a monthly budget must be above 0 (None: no budget), got {monthly_budget_usd}")


def _budget_sentence(budget: float | None, spent: float, _: Texts) -> str:
    if budget is None:
        return _("This month: {spent} estimated; no monthly budget is set.", spent=_.money(spent))
    sentence = _(
        "This month: {spent} of the {budget} monthly budget ({share}).",
        spent=_.money(spent),
        budget=_.money(budget),
        share=_.percent(spent / budget),
    )
    return f"{sentence} {_('Over budget.')}" if spent > budget else sentence


def _draw_bars(draw: ImageDraw.ImageDraw, days: Sequence[DayUsage], font: ImageFont.FreeTypeFont, _: Texts) -> None:
    left, top, right, bottom = PLOT
    axis_top, step = _scale(max((day.images for day in days), default=0))
    for tick in range(0, axis_top + 1, step):
        y = bottom - round(tick / axis_top * (bottom - top))
        draw.line((left, y, right, y), fill=GRID)
        draw.text((left - 8, y), str(tick), font=font, fill=MUTED, anchor="rm")
    if not days:
        return
    slot = (right - left) / len(days)
    width = max(1.0, slot * 0.7)
    for index, day in enumerate(days):
        centre = left + slot * (index + 0.5)
        if day.images:
            height = round(day.images / axis_top * (bottom - top))
            draw.rectangle(
                (round(centre - width / 2), bottom - height, round(centre + width / 2) - 1, bottom - 1), fill=BAR_COLOUR
            )
        if (len(days) - 1 - index) % LABEL_EVERY == 0:
            label = _.day(day.day)
            half = font.getlength(label) / 2
            x = min(max(centre, left - 24 + half), WIDTH - 4 - half)  # kept inside the card
            draw.text((x, bottom + 8), label, font=font, fill=MUTED, anchor="ma")


def _draw_budget(
    draw: ImageDraw.ImageDraw, budget: float | None, spent: float, font: ImageFont.FreeTypeFont, _: Texts
) -> None:
    left, top, right, bottom = BUDGET_BAR
    draw.text((left, top - 26), _budget_sentence(budget, spent, _), font=font, fill=TEXT)
    if budget is None:
        return
    draw.rectangle(BUDGET_BAR, fill=GRID)
    share = min(spent / budget, 1.0)
    if share > 0:
        filled = left + max(1, round(share * (right - left)))
        draw.rectangle((left, top, filled, bottom), fill=OVER_BUDGET_COLOUR if spent > budget else SPEND_COLOUR)


def _scale(peak: int) -> tuple[int, int]:
    """The y axis' top and tick step: whole images, 1, 2 or 5 times a power of ten, about four
    steps, the top at or above `peak`."""
    raw = max(peak, 1) / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = max(1, round(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)))
    return max(step, math.ceil(peak / step) * step), step


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font (no system fonts in the slim image); FreeType is in Pillow's wheels."""
    font = ImageFont.load_default(size)
    assert isinstance(font, ImageFont.FreeTypeFont), "Pillow was built without FreeType"
    return font
