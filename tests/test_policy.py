"""Tests for services.policy: every decision the /kontext cog delegates to it."""

from __future__ import annotations

import dataclasses
import itertools
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from services.policy import (
    POLICY_FIELDS,
    SAFETY_MAX,
    SAFETY_MIN,
    Allowed,
    GuildPolicy,
    JobAsk,
    OperatorLimits,
    RefusalReason,
    Refused,
    Requester,
    Usage,
    day_start,
    effective_maximum,
    month_start,
    next_month_start,
    next_utc_midnight,
    policy_from_dict,
    policy_to_dict,
    resolve,
    showing_refusal,
    validate_policy,
)

PRICE = 0.08
SAFETY = range(SAFETY_MIN, SAFETY_MAX + 1)


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


NOW = ts(2026, 11, 25, 15, 30, 12)
USER, ROLE, CHANNEL, PARENT, OTHER = 10, 20, 30, 40, 50


def who(
    *,
    roles: frozenset[int] = frozenset(),
    channel: int = CHANNEL,
    parent: int | None = None,
    nsfw: bool = False,
) -> Requester:
    return Requester(USER, roles, channel, parent, nsfw)


def usage(
    *,
    last: float | None = None,
    today: int = 0,
    member_active: int = 0,
    guild_active: int = 0,
    month_images: int = 0,
) -> Usage:
    return Usage(last, today, member_active, guild_active, month_images)


DEFAULT_POLICY = GuildPolicy()


def run(
    policy: GuildPolicy = DEFAULT_POLICY,
    requester: Requester | None = None,
    use: Usage | None = None,
    ask: JobAsk | None = None,
    *,
    now: float = NOW,
    price: float = PRICE,
):
    return resolve(
        policy,
        requester or who(),
        use or usage(),
        ask or JobAsk(None, 1),
        now=now,
        price_per_image=price,
    )


# --- safety tolerance: all combinations --------------------------------------------------


@pytest.mark.parametrize("nsfw", [False, True])
@pytest.mark.parametrize("requested", [None, *SAFETY])
def test_safety_all_combinations(requested: int | None, nsfw: bool) -> None:
    # default/maximum/nsfw_maximum looped inside: 6*6*6*7*2 = 3024 cases, cheap.
    for default, maximum, nsfw_max in itertools.product(SAFETY, repeat=3):
        policy = GuildPolicy(safety_default=default, safety_maximum=maximum, safety_nsfw_maximum=nsfw_max)
        result = run(policy, who(nsfw=nsfw), ask=JobAsk(requested, 1))
        assert isinstance(result, Allowed)
        eff = nsfw_max if nsfw else maximum
        assert effective_maximum(policy, nsfw) == eff
        assert SAFETY_MIN <= result.safety_tolerance <= eff
        assert result.requested == requested
        if requested is None:
            assert result.safety_tolerance == min(default, eff)
            assert result.limited_to is None  # default clamped silently
        else:
            assert result.safety_tolerance == min(requested, eff)
            clamped = requested > eff
            assert (result.limited_to is not None) == clamped
            if clamped:
                assert result.limited_to == eff == result.safety_tolerance


def test_new_server_defaults() -> None:
    assert run() == Allowed(2, None, None)
    assert run(ask=JobAsk(5, 1)) == Allowed(2, 5, 2)
    assert run(requester=who(nsfw=True), ask=JobAsk(5, 1)) == Allowed(4, 5, 4)
    assert run(requester=who(nsfw=True), ask=JobAsk(3, 1)) == Allowed(3, 3, None)
    # NSFW maximum replaces the ordinary one, even when it is stricter.
    strict_nsfw = GuildPolicy(safety_default=1, safety_maximum=5, safety_nsfw_maximum=1)
    assert run(strict_nsfw, who(nsfw=True), ask=JobAsk(5, 1)) == Allowed(1, 5, 1)


@pytest.mark.parametrize("bad", [-3, 0, 7, 99])
def test_invalid_stored_safety_values_are_clamped_into_range(bad: int) -> None:
    policy = GuildPolicy(safety_default=bad, safety_maximum=bad, safety_nsfw_maximum=bad)
    for nsfw in (False, True):
        assert SAFETY_MIN <= effective_maximum(policy, nsfw) <= SAFETY_MAX
        for requested in (None, *SAFETY):
            result = run(policy, who(nsfw=nsfw), ask=JobAsk(requested, 1))
            assert isinstance(result, Allowed)
            assert SAFETY_MIN <= result.safety_tolerance <= SAFETY_MAX


@pytest.mark.parametrize("ask", [JobAsk(0, 1), JobAsk(7, 1), JobAsk(None, 0), JobAsk(3, -1)])
def test_impossible_asks_raise(ask: JobAsk) -> None:
    with pytest.raises(ValueError):
        run(ask=ask)


def test_negative_price_raises() -> None:
    with pytest.raises(ValueError):
        run(price=-0.01)


# --- access ------------------------------------------------------------------------------


def test_empty_channel_list_allows_everywhere() -> None:
    assert isinstance(run(GuildPolicy(), who(channel=12345)), Allowed)


def test_channel_allow_list() -> None:
    policy = GuildPolicy(allowed_channel_ids=frozenset({CHANNEL, PARENT}))
    assert isinstance(run(policy, who(channel=CHANNEL)), Allowed)
    assert run(policy, who(channel=OTHER)) == Refused(RefusalReason.CHANNEL_NOT_ALLOWED, None, None)


def test_thread_of_allowed_channel_is_allowed() -> None:
    policy = GuildPolicy(allowed_channel_ids=frozenset({PARENT}))
    assert isinstance(run(policy, who(channel=OTHER, parent=PARENT)), Allowed)
    # A thread under a channel that is not listed stays refused.
    refused = run(policy, who(channel=OTHER, parent=CHANNEL))
    assert isinstance(refused, Refused) and refused.reason is RefusalReason.CHANNEL_NOT_ALLOWED
    # Allowing a thread itself also works.
    policy = GuildPolicy(allowed_channel_ids=frozenset({OTHER}))
    assert isinstance(run(policy, who(channel=OTHER, parent=PARENT)), Allowed)


def test_required_role() -> None:
    policy = GuildPolicy(required_role_id=ROLE)
    assert isinstance(run(policy, who(roles=frozenset({ROLE, 99}))), Allowed)
    assert run(policy, who(roles=frozenset({99}))) == Refused(RefusalReason.MISSING_ROLE, None, None)
    assert run(policy, who()) == Refused(RefusalReason.MISSING_ROLE, None, None)


def test_a_result_is_shown_again_only_where_a_job_could_have_used_its_tolerance() -> None:
    for default, maximum, nsfw_max in itertools.product(SAFETY, repeat=3):
        policy = GuildPolicy(safety_default=default, safety_maximum=maximum, safety_nsfw_maximum=nsfw_max)
        for nsfw, made_at in itertools.product((False, True), SAFETY):
            job_here = run(policy, who(nsfw=nsfw), ask=JobAsk(made_at, 1))
            assert isinstance(job_here, Allowed)
            refused = showing_refusal(policy, who(nsfw=nsfw), made_at)
            if job_here.limited_to is None:
                assert refused is None
            else:
                assert refused == Refused(RefusalReason.SAFETY_ABOVE_MAXIMUM, None, job_here.limited_to)
    # Access comes first, as for a job; a tolerance not recorded counts as the most permissive.
    closed = GuildPolicy(allowed_channel_ids=frozenset({OTHER}))
    assert showing_refusal(closed, who(), 1) == Refused(RefusalReason.CHANNEL_NOT_ALLOWED, None, None)
    assert showing_refusal(GuildPolicy(safety_nsfw_maximum=6), who(nsfw=True), None) is None
    assert showing_refusal(GuildPolicy(), who(nsfw=True), None) == Refused(RefusalReason.SAFETY_ABOVE_MAXIMUM, None, 4)


# --- usage limits ------------------------------------------------------------------------


def test_member_concurrency() -> None:
    policy = GuildPolicy(concurrent_jobs_per_member=2)
    assert isinstance(run(policy, use=usage(member_active=1)), Allowed)
    assert run(policy, use=usage(member_active=2)) == Refused(RefusalReason.MEMBER_CONCURRENCY, None, 2, used=2)
    unlimited = GuildPolicy(concurrent_jobs_per_member=None)
    assert isinstance(run(unlimited, use=usage(member_active=500)), Allowed)


def test_guild_concurrency() -> None:
    policy = GuildPolicy(concurrent_jobs_per_guild=5, concurrent_jobs_per_member=None)
    assert isinstance(run(policy, use=usage(guild_active=4)), Allowed)
    assert run(policy, use=usage(guild_active=5)) == Refused(RefusalReason.GUILD_CONCURRENCY, None, 5, used=5)
    assert isinstance(run(GuildPolicy(), use=usage(guild_active=10_000)), Allowed)


def test_cooldown() -> None:
    policy = GuildPolicy(cooldown_seconds=60)
    last = NOW - 59.5
    assert run(policy, use=usage(last=last)) == Refused(RefusalReason.COOLDOWN, last + 60, 60, used=59.5)
    assert isinstance(run(policy, use=usage(last=NOW - 60)), Allowed)  # exactly over
    assert isinstance(run(policy, use=usage(last=None)), Allowed)  # first job ever
    assert isinstance(run(GuildPolicy(cooldown_seconds=0), use=usage(last=NOW)), Allowed)


def test_daily_limit_retry_at_next_utc_midnight() -> None:
    policy = GuildPolicy(daily_jobs_per_member=3)
    assert isinstance(run(policy, use=usage(today=2)), Allowed)
    assert run(policy, use=usage(today=3)) == Refused(RefusalReason.DAILY_LIMIT, ts(2026, 11, 26), 3, used=3)
    late = ts(2026, 12, 31, 23, 59, 59)
    refused = run(policy, use=usage(today=3), now=late)
    assert isinstance(refused, Refused) and refused.retry_at == ts(2027, 1, 1)
    # Zero means nobody may run jobs today (a pause); still well-defined.
    assert run(GuildPolicy(daily_jobs_per_member=0)).reason is RefusalReason.DAILY_LIMIT


def test_monthly_image_budget_counts_this_job() -> None:
    policy = GuildPolicy(monthly_image_budget=10)
    assert isinstance(run(policy, use=usage(month_images=9), ask=JobAsk(None, 1)), Allowed)
    assert isinstance(run(policy, use=usage(month_images=6), ask=JobAsk(None, 4)), Allowed)
    assert run(policy, use=usage(month_images=7), ask=JobAsk(None, 4)) == Refused(
        RefusalReason.MONTHLY_IMAGE_BUDGET, ts(2026, 12, 1), 10, used=7
    )
    assert run(policy, use=usage(month_images=10)).reason is RefusalReason.MONTHLY_IMAGE_BUDGET


def test_monthly_usd_budget_exact_float_boundary() -> None:
    policy = GuildPolicy(monthly_usd_budget=0.80)
    for done in range(10):
        result = run(policy, use=usage(month_images=done), ask=JobAsk(None, 1))
        assert isinstance(result, Allowed), done
    assert isinstance(run(policy, use=usage(month_images=0), ask=JobAsk(None, 10)), Allowed)
    assert isinstance(run(policy, use=usage(month_images=6), ask=JobAsk(None, 4)), Allowed)
    assert run(policy, use=usage(month_images=10)) == Refused(
        RefusalReason.MONTHLY_USD_BUDGET, ts(2026, 12, 1), 0.80, used=0.80
    )
    assert run(policy, use=usage(month_images=7), ask=JobAsk(None, 4)).reason is (RefusalReason.MONTHLY_USD_BUDGET)


@pytest.mark.parametrize("budget", [0.08, 0.16, 0.24, 0.56, 0.8, 1.2, 2.4, 2.8, 8.0, 80.0, 123.04])
def test_usd_budget_admits_exactly_floor_images(budget: float) -> None:
    # 2.8 is the trap: 35 * 0.08 == 2.8000000000000003 > 2.8 in floats.
    fits = round(budget / PRICE)
    policy = GuildPolicy(monthly_usd_budget=budget, monthly_image_budget=None)
    assert isinstance(run(policy, use=usage(month_images=fits - 1)), Allowed)
    assert isinstance(run(policy, use=usage(month_images=fits)), Refused)


def test_usd_budget_with_free_images_never_refuses() -> None:
    policy = GuildPolicy(monthly_usd_budget=1.0, monthly_image_budget=None)
    assert isinstance(run(policy, use=usage(month_images=10**6), price=0.0), Allowed)


def test_budget_retry_at_rolls_over_december() -> None:
    policy = GuildPolicy(monthly_image_budget=1, monthly_usd_budget=None)
    refused = run(policy, use=usage(month_images=1), now=ts(2026, 12, 15, 12))
    assert refused == Refused(RefusalReason.MONTHLY_IMAGE_BUDGET, ts(2027, 1, 1), 1, used=1)
    policy = GuildPolicy(monthly_usd_budget=0.08)
    refused = run(policy, use=usage(month_images=1), now=ts(2026, 12, 31, 23, 59, 59))
    assert refused == Refused(RefusalReason.MONTHLY_USD_BUDGET, ts(2027, 1, 1), 0.08, used=0.08)


# --- order of checks ---------------------------------------------------------------------

EVERYTHING_FAILS = GuildPolicy(
    allowed_channel_ids=frozenset({PARENT}),
    required_role_id=ROLE,
    concurrent_jobs_per_member=1,
    concurrent_jobs_per_guild=1,
    cooldown_seconds=60,
    daily_jobs_per_member=1,
    monthly_image_budget=1,
    monthly_usd_budget=0.08,
)
ALL_FAILING_USAGE = usage(last=NOW - 1, today=1, member_active=1, guild_active=1, month_images=1)
ORDER = [
    RefusalReason.CHANNEL_NOT_ALLOWED,
    RefusalReason.MISSING_ROLE,
    RefusalReason.MEMBER_CONCURRENCY,
    RefusalReason.GUILD_CONCURRENCY,
    RefusalReason.COOLDOWN,
    RefusalReason.DAILY_LIMIT,
    RefusalReason.MONTHLY_IMAGE_BUDGET,
    RefusalReason.MONTHLY_USD_BUDGET,
]
# How to lift each check, in the same order.
LIFT: list[dict[str, Any]] = [
    {"allowed_channel_ids": frozenset()},
    {"required_role_id": None},
    {"concurrent_jobs_per_member": None},
    {"concurrent_jobs_per_guild": None},
    {"cooldown_seconds": 0},
    {"daily_jobs_per_member": None},
    {"monthly_image_budget": None},
    {"monthly_usd_budget": None},
]


def test_check_order() -> None:
    # The operator's budget is tested on its own; a result's tolerance is refused only when shown again.
    elsewhere = {RefusalReason.OPERATOR_BUDGET, RefusalReason.SAFETY_ABOVE_MAXIMUM}
    assert [r for r in RefusalReason if r not in elsewhere] == ORDER
    policy = EVERYTHING_FAILS
    for expected, lift in zip(ORDER, LIFT, strict=True):
        result = run(policy, use=ALL_FAILING_USAGE, ask=JobAsk(6, 1))
        assert isinstance(result, Refused) and result.reason is expected
        policy = dataclasses.replace(policy, **lift)
    assert run(policy, use=ALL_FAILING_USAGE, ask=JobAsk(6, 1)) == Allowed(2, 6, 2)


@pytest.mark.parametrize("mask", range(1, 2 ** len(ORDER)))
def test_first_failing_check_wins_for_every_subset(mask: int) -> None:
    failing = [i for i in range(len(ORDER)) if mask >> i & 1]
    policy = EVERYTHING_FAILS
    for i, lift in enumerate(LIFT):
        if i not in failing:
            policy = dataclasses.replace(policy, **lift)
    result = run(policy, use=ALL_FAILING_USAGE)
    assert isinstance(result, Refused) and result.reason is ORDER[failing[0]]
    assert (result.retry_at is None) == (
        result.reason
        in {
            RefusalReason.CHANNEL_NOT_ALLOWED,
            RefusalReason.MISSING_ROLE,
            RefusalReason.MEMBER_CONCURRENCY,
            RefusalReason.GUILD_CONCURRENCY,
        }
    )


def test_no_moderator_bypass_parameter() -> None:
    with pytest.raises(TypeError):
        resolve(GuildPolicy(), who(), usage(), JobAsk(None, 1), now=NOW, price_per_image=PRICE, bypass=True)  # type: ignore[call-arg]


# --- time helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "midnight"),
    [
        (ts(2026, 11, 25, 15, 30), ts(2026, 11, 26)),
        (ts(2026, 11, 25), ts(2026, 11, 26)),  # exactly midnight: the next one
        (ts(2026, 11, 25, 23, 59, 59) + 0.999, ts(2026, 11, 26)),
        (ts(2026, 11, 30, 12), ts(2026, 12, 1)),
        (ts(2026, 12, 31, 12), ts(2027, 1, 1)),
        (ts(2028, 2, 28, 12), ts(2028, 2, 29)),  # leap day
    ],
)
def test_next_utc_midnight(now: float, midnight: float) -> None:
    assert next_utc_midnight(now) == midnight


@pytest.mark.parametrize(
    ("now", "start"),
    [
        (ts(2026, 11, 25, 15, 30), ts(2026, 12, 1)),
        (ts(2026, 11, 1), ts(2026, 12, 1)),  # exactly the start: the next one
        (ts(2026, 12, 1), ts(2027, 1, 1)),
        (ts(2026, 12, 31, 23, 59, 59), ts(2027, 1, 1)),
        (ts(2027, 1, 31, 12), ts(2027, 2, 1)),
    ],
)
def test_next_month_start(now: float, start: float) -> None:
    assert next_month_start(now) == start


def test_period_starts() -> None:
    assert day_start(NOW) == ts(2026, 11, 25)
    assert month_start(NOW) == ts(2026, 11, 1)
    assert day_start(ts(2027, 1, 1) - 0.001) == ts(2026, 12, 31)
    assert day_start(ts(2027, 1, 1)) == ts(2027, 1, 1)
    assert month_start(ts(2027, 1, 1) - 0.001) == ts(2026, 12, 1)
    assert month_start(ts(2027, 1, 1)) == ts(2027, 1, 1)
    # Counters reset exactly when retry_at says.
    assert day_start(next_utc_midnight(NOW)) == next_utc_midnight(NOW)
    assert month_start(next_month_start(NOW)) == next_month_start(NOW)


# --- validation --------------------------------------------------------------------------


def test_default_policy_is_valid() -> None:
    assert validate_policy(GuildPolicy()) == []


def test_validate_all_safety_combinations() -> None:
    values = range(-1, 9)
    for default, maximum, nsfw_max in itertools.product(values, repeat=3):
        policy = GuildPolicy(safety_default=default, safety_maximum=maximum, safety_nsfw_maximum=nsfw_max)
        problems = validate_policy(policy)
        in_range = all(SAFETY_MIN <= v <= SAFETY_MAX for v in (default, maximum, nsfw_max))
        expect_ok = in_range and default <= maximum and default <= nsfw_max
        assert (problems == []) == expect_ok, (default, maximum, nsfw_max, problems)
        if in_range and default > maximum:
            assert any("above the maximum" in p for p in problems)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"safety_maximum": 7}, "between 1 and 6"),
        ({"safety_default": 0}, "between 1 and 6"),
        ({"safety_default": 3}, "above the maximum"),
        ({"cooldown_seconds": -1}, "negative"),
        ({"daily_jobs_per_member": -1}, "negative"),
        ({"concurrent_jobs_per_member": -1}, "negative"),
        ({"concurrent_jobs_per_guild": -2}, "negative"),
        ({"monthly_image_budget": 0}, "above 0"),
        ({"monthly_image_budget": -5}, "above 0"),
        ({"monthly_usd_budget": 0.0}, "above 0"),
        ({"monthly_usd_budget": -1.0}, "above 0"),
        ({"monthly_usd_budget": float("nan")}, "above 0"),
        ({"required_role_id": 0}, "valid Discord id"),
        ({"log_channel_id": -4}, "valid Discord id"),
        ({"allowed_channel_ids": frozenset({5, -1})}, "invalid ids"),
    ],
)
def test_validate_reports_problem(change: dict, fragment: str) -> None:
    problems = validate_policy(dataclasses.replace(GuildPolicy(), **change))
    assert len(problems) == 1 and fragment in problems[0], problems


@pytest.mark.parametrize(
    "change",
    [
        {"daily_jobs_per_member": 0},
        {"concurrent_jobs_per_member": 0},
        {"cooldown_seconds": 3600},
        {"monthly_image_budget": 1},
        {"monthly_usd_budget": 0.01},
        {"safety_default": 1, "safety_maximum": 6, "safety_nsfw_maximum": 1},
        {"allowed_channel_ids": frozenset({1, 2}), "required_role_id": 3, "log_channel_id": 4},
    ],
)
def test_validate_accepts(change: dict) -> None:
    assert validate_policy(dataclasses.replace(GuildPolicy(), **change)) == []


# --- fields and (de)serialisation --------------------------------------------------------


def test_policy_fields_match_dataclass() -> None:
    names = [f.name for f in dataclasses.fields(GuildPolicy)]
    assert list(POLICY_FIELDS) == names
    default = GuildPolicy()
    for name, (label, value) in POLICY_FIELDS.items():
        assert label and isinstance(label, str)
        assert getattr(default, name) == value


def test_reset_each_field_to_default() -> None:
    custom = GuildPolicy(
        safety_default=1, safety_maximum=3, safety_nsfw_maximum=6,
        allowed_channel_ids=frozenset({1}), required_role_id=2, cooldown_seconds=30,
        daily_jobs_per_member=5, concurrent_jobs_per_member=1, concurrent_jobs_per_guild=4,
        monthly_image_budget=100, monthly_usd_budget=8.0, log_channel_id=9,
    )  # fmt: skip
    for name, info in POLICY_FIELDS.items():
        assert getattr(custom, name) != info.default
        reset = dataclasses.replace(custom, **{name: info.default})
        assert getattr(reset, name) == getattr(GuildPolicy(), name)
    for name, (_, default) in POLICY_FIELDS.items():
        custom = dataclasses.replace(custom, **{name: default})
    assert custom == GuildPolicy()


def test_round_trip_through_json() -> None:
    policy = GuildPolicy(
        safety_default=3, safety_maximum=4, safety_nsfw_maximum=6,
        allowed_channel_ids=frozenset({1234567890123456789, 5, 3}), required_role_id=987654321098765432,
        cooldown_seconds=15, daily_jobs_per_member=20, concurrent_jobs_per_member=None,
        concurrent_jobs_per_guild=8, monthly_image_budget=500, monthly_usd_budget=40.0, log_channel_id=77,
    )  # fmt: skip
    d = policy_to_dict(policy)
    assert d["allowed_channel_ids"] == [3, 5, 1234567890123456789]
    assert policy_from_dict(json.loads(json.dumps(d))) == policy
    assert policy_from_dict(policy_to_dict(GuildPolicy())) == GuildPolicy()


def test_from_dict_missing_and_unknown_keys() -> None:
    assert policy_from_dict({}) == GuildPolicy()
    old_row = {"safety_default": 1, "retired_setting": True, "future": {"x": 1}}
    assert policy_from_dict(old_row) == GuildPolicy(safety_default=1)


def test_from_dict_explicit_none_means_unlimited_where_optional() -> None:
    p = policy_from_dict({"concurrent_jobs_per_member": None, "monthly_usd_budget": None})
    assert p.concurrent_jobs_per_member is None and p.monthly_usd_budget is None


def test_from_dict_coerces_json_shapes() -> None:
    p = policy_from_dict(
        {
            "allowed_channel_ids": ["1234567890123456789", 5],  # snowflakes stored as strings
            "required_role_id": "42",
            "cooldown_seconds": 30.0,
            "monthly_usd_budget": 5,
            "monthly_image_budget": "100",
        }
    )
    assert p.allowed_channel_ids == frozenset({1234567890123456789, 5})
    assert p.required_role_id == 42
    assert p.cooldown_seconds == 30 and isinstance(p.cooldown_seconds, int)
    assert p.monthly_usd_budget == 5.0 and isinstance(p.monthly_usd_budget, float)
    assert p.monthly_image_budget == 100


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("safety_default", None),
        ("safety_default", "high"),
        ("safety_maximum", True),
        ("safety_nsfw_maximum", 2.5),
        ("cooldown_seconds", [1]),
        ("allowed_channel_ids", "123"),
        ("allowed_channel_ids", 123),
        ("allowed_channel_ids", ["a"]),
        ("allowed_channel_ids", None),
        ("required_role_id", {"id": 1}),
        ("daily_jobs_per_member", "many"),
        ("concurrent_jobs_per_member", False),
        ("monthly_usd_budget", "NaN"),
        ("monthly_usd_budget", float("inf")),
        ("monthly_usd_budget", "lots"),
        ("log_channel_id", 1.5),
    ],
)
def test_from_dict_bad_value_falls_back_to_that_fields_default(name: str, bad: object) -> None:
    p = policy_from_dict({name: bad, "cooldown_seconds": 9} if name != "cooldown_seconds" else {name: bad})
    assert getattr(p, name) == POLICY_FIELDS[name].default
    if name != "cooldown_seconds":
        assert p.cooldown_seconds == 9  # the other fields survive


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(TypeError):
        policy_from_dict([("safety_default", 1)])  # type: ignore[arg-type]


def test_objects_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        GuildPolicy().safety_default = 6  # type: ignore[misc]


def test_a_new_server_starts_with_a_monthly_image_budget() -> None:
    """Anyone may add a public bot and the operator pays: no server starts unlimited."""
    assert GuildPolicy().monthly_image_budget == 250
    assert run(use=usage(month_images=250)) == Refused(
        RefusalReason.MONTHLY_IMAGE_BUDGET, ts(2026, 12, 1), 250, used=250
    )


def test_the_operators_budget_binds_every_server_after_access() -> None:
    operator = OperatorLimits(monthly_usd_budget=8.0)  # 100 images at $0.08
    unlimited = GuildPolicy(monthly_image_budget=None)
    spent = Usage(None, 0, 0, 0, guild_images_this_month=0, all_images_this_month=100)
    refused = resolve(unlimited, who(), spent, JobAsk(None, 1), now=NOW, price_per_image=PRICE, operator=operator)
    assert refused == Refused(RefusalReason.OPERATOR_BUDGET, ts(2026, 12, 1), 8.0, used=8.0)
    below = dataclasses.replace(spent, all_images_this_month=99)
    assert isinstance(
        resolve(unlimited, who(), below, JobAsk(None, 1), now=NOW, price_per_image=PRICE, operator=operator), Allowed
    )
    # Access still comes first: nothing about budgets is told to someone who may not use the bot here.
    closed = GuildPolicy(allowed_channel_ids=frozenset({PARENT}))
    outside = resolve(closed, who(), spent, JobAsk(None, 1), now=NOW, price_per_image=PRICE, operator=operator)
    assert isinstance(outside, Refused) and outside.reason is RefusalReason.CHANNEL_NOT_ALLOWED
