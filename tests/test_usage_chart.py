"""The usage chart decoded back with Pillow: its size, metadata, bars and budget bar."""

from __future__ import annotations

import io
from datetime import date

import pytest
from PIL import Image

from services.usage_chart import (
    BAR_COLOUR,
    BUDGET_BAR,
    HEIGHT,
    OVER_BUDGET_COLOUR,
    PLOT,
    SPEND_COLOUR,
    WIDTH,
    DayUsage,
    last_days,
    render_usage_chart,
    usage_summary_text,
)

TODAY = date(2025, 3, 18)


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    image.load()
    return image


def bar_heights(image: Image.Image) -> list[int]:
    """The height in pixels of each bar, left to right (runs of columns holding the bar colour)."""
    pixels = image.convert("RGB").load()
    assert pixels is not None
    heights: list[int] = []
    previous = 0
    for x in range(PLOT[0], PLOT[2] + 1):
        height = sum(1 for y in range(PLOT[1], PLOT[3] + 1) if pixels[x, y] == BAR_COLOUR)
        if height and not previous:
            heights.append(height)
        elif height:
            heights[-1] = max(heights[-1], height)
        previous = height
    return heights


def filled_share(image: Image.Image, colour: tuple[int, int, int]) -> float:
    """How much of the budget bar's middle row has `colour`."""
    pixels = image.convert("RGB").load()
    assert pixels is not None
    left, top, right, bottom = BUDGET_BAR
    row = (top + bottom) // 2
    return sum(1 for x in range(left, right + 1) if pixels[x, row] == colour) / (right - left + 1)


def series(images: list[int]) -> list[DayUsage]:
    counts = {date(2025, 3, 1 + index): (n, n * 0.08) for index, n in enumerate(images)}
    return last_days(counts, date(2025, 3, len(images)), days=len(images))


def test_last_days_fills_the_gaps_oldest_first():
    counts = {date(2025, 3, 17): (3, 0.24), date(2025, 2, 17): (5, 0.4), date(2025, 2, 16): (9, 0.72)}
    days = last_days(counts, TODAY)
    assert len(days) == 30
    assert days[0] == DayUsage(date(2025, 2, 17), 5, 0.4)  # 30 days up to and including today
    assert days[-1] == DayUsage(TODAY, 0, 0.0)
    assert days[-2] == DayUsage(date(2025, 3, 17), 3, 0.24)
    assert [day.day for day in days] == sorted(day.day for day in days)
    assert sum(day.images for day in days) == 8  # the 16th is outside the window
    assert last_days({}, TODAY, days=1) == [DayUsage(TODAY, 0, 0.0)]
    with pytest.raises(ValueError):
        last_days({}, TODAY, days=0)


def test_the_png_has_the_size_mode_and_days_chunk():
    image = decode(render_usage_chart(last_days({}, TODAY), monthly_budget_usd=20.0, month_spent_usd=0, title="Usage"))
    assert image.size == (WIDTH, HEIGHT) == (800, 360)
    assert image.mode == "RGB"
    assert getattr(image, "text", {}) == {"days": "30"}
    week = decode(render_usage_chart(last_days({}, TODAY, 7), monthly_budget_usd=None, month_spent_usd=0, title="W"))
    assert getattr(week, "text", {}) == {"days": "7"}


def test_bars_scale_with_the_data():
    images = [0] * 30
    images[3], images[10], images[20], images[29] = 4, 8, 2, 12
    image = decode(render_usage_chart(series(images), monthly_budget_usd=None, month_spent_usd=0, title="Usage"))
    heights = bar_heights(image)
    assert len(heights) == 4  # one bar per day with images, none for the others
    unit = heights[3] / 12
    for height, count in zip(heights, [4, 8, 2, 12], strict=True):
        assert height == pytest.approx(count * unit, abs=1)
    # Ten times the images: the axis grows with them and the bars keep their proportions.
    tenfold = decode(
        render_usage_chart(series([n * 10 for n in images]), monthly_budget_usd=None, month_spent_usd=0, title="U")
    )
    assert bar_heights(tenfold) == pytest.approx(heights, abs=1)
    # The tallest bar uses most of the plot's height whatever the scale.
    assert heights[3] > 0.7 * (PLOT[3] - PLOT[1])


def test_empty_data_draws_an_empty_chart():
    for days in (last_days({}, TODAY), []):
        image = decode(render_usage_chart(days, monthly_budget_usd=None, month_spent_usd=0.0, title="Nothing yet"))
        assert image.size == (WIDTH, HEIGHT)
        assert bar_heights(image) == []
        assert getattr(image, "text", {}) == {"days": str(len(days))}


def test_the_budget_bar_shows_the_share_spent():
    days = last_days({}, TODAY)
    quarter = decode(render_usage_chart(days, monthly_budget_usd=20.0, month_spent_usd=5.0, title="U"))
    assert filled_share(quarter, SPEND_COLOUR) == pytest.approx(0.25, abs=0.01)
    assert filled_share(quarter, OVER_BUDGET_COLOUR) == 0
    over = decode(render_usage_chart(days, monthly_budget_usd=2.0, month_spent_usd=3.5, title="U"))
    assert filled_share(over, OVER_BUDGET_COLOUR) == pytest.approx(1.0, abs=0.01)
    unbudgeted = decode(render_usage_chart(days, monthly_budget_usd=None, month_spent_usd=3.5, title="U"))
    assert filled_share(unbudgeted, SPEND_COLOUR) == filled_share(unbudgeted, OVER_BUDGET_COLOUR) == 0


def test_a_long_title_still_renders():
    image = decode(
        render_usage_chart([], monthly_budget_usd=None, month_spent_usd=0, title="A very long server name " * 20)
    )
    assert image.size == (WIDTH, HEIGHT)


def test_a_budget_must_be_positive():
    with pytest.raises(ValueError):
        render_usage_chart([], monthly_budget_usd=0.0, month_spent_usd=0, title="U")
    with pytest.raises(ValueError):
        usage_summary_text([], -1.0, 0)


def test_the_summary_says_what_the_chart_shows():
    images = [0] * 30
    images[4], images[29] = 7, 3
    text = usage_summary_text(series(images), 20.0, 5.0)
    assert text == (
        "Images per day from March 1, 2025 to March 30, 2025: 10 images in 30 days, estimated $0.80. "
        "Busiest day March 5, 2025 with 7 images; images were made on 2 of the 30 days; 3 on the last day. "
        "This month: $5.00 of the $20.00 monthly budget (25%)."
    )
    assert usage_summary_text(series(images), 2.0, 3.5).endswith("of the $2.00 monthly budget (175%). Over budget.")
    assert usage_summary_text(last_days({}, TODAY), None, 0.0) == (
        "Images per day from February 17, 2025 to March 18, 2025: 0 images in 30 days, estimated $0.00. "
        "This month: $0.00 estimated; no monthly budget is set."
    )
    assert usage_summary_text([], None, 1.25) == "This month: $1.25 estimated; no monthly budget is set."


def test_the_summary_fits_discord_s_alt_text_limit():
    huge = last_days({date(2025, 3, d): (10**9, 8e7) for d in range(1, 19)}, TODAY)
    assert len(usage_summary_text(huge, 1e12, 1e11)) <= 1024
