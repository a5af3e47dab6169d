"""A member's defaults: what they fill in, what they leave alone, how they are stored."""

from __future__ import annotations

import pytest

from services.flux_kontext import KontextOptions
from services.member_defaults import MemberDefaults


def test_defaults_fill_only_what_the_member_left_out():
    defaults = MemberDefaults(aspect_ratio="16:9", num_images=2, output_format="png", enhance_prompt=True)
    options, filled = defaults.apply(KontextOptions(aspect_ratio="1:1", seed=5, enhance_prompt=False))
    assert options == KontextOptions(
        aspect_ratio="1:1", num_images=2, seed=5, output_format="png", enhance_prompt=False
    )
    assert filled == ("num_images", "output_format")


def test_no_defaults_change_nothing():
    options = KontextOptions(seed=1)
    assert MemberDefaults().apply(options) == (options, ())
    assert MemberDefaults().is_empty and not MemberDefaults(private_first=True).is_empty


def test_defaults_round_trip_through_their_stored_form():
    defaults = MemberDefaults("9:16", 3, "jpeg", 4, True, private_first=True)
    assert MemberDefaults.from_dict(defaults.to_dict()) == defaults
    assert MemberDefaults().to_dict() == {}
    chosen_off = MemberDefaults(enhance_prompt=False)
    assert MemberDefaults.from_dict(chosen_off.to_dict()) == chosen_off


@pytest.mark.parametrize(
    "stored",
    [
        {"aspect_ratio": "5:4"},  # not one the model takes
        {"num_images": True},  # a bool is not a count
        {"num_images": 9},
        {"safety_tolerance": "3"},
        {"output_format": "gif"},
        {"enhance_prompt": "yes"},
        {"private_first": 1},
        {"something_newer": 1},
    ],
)
def test_a_damaged_or_foreign_value_is_dropped_never_sent(stored):
    assert MemberDefaults.from_dict(stored) == MemberDefaults()
