"""`standings`: where a member stands against each limit (what /kontext-me shows), always in step
with what `resolve` refuses."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from services.policy import (
    GuildPolicy,
    JobAsk,
    OperatorLimits,
    RefusalReason,
    Refused,
    Requester,
    Usage,
    next_month_start,
    next_utc_midnight,
    resolve,
    standings,
)

PRICE = 0.08
NOW = datetime(2026, 12, 1, 15, 0, tzinfo=UTC).timestamp()
ANYONE = Requester(user_id=1, role_ids=frozenset(), channel_id=5, parent_channel_id=None, channel_nsfw=False)
NEXT_JOB = JobAsk(None, 1)


def usage(**values) -> Usage:
    base = dict(
        member_last_job_at=None,
        member_jobs_today=0,
        member_active_jobs=0,
        guild_active_jobs=0,
        guild_images_this_month=0,
    )
    return Usage(**{**base, **values})


def test_every_limit_set_is_listed_in_the_order_resolve_checks_them():
    policy = GuildPolicy(
        cooldown_seconds=60, daily_jobs_per_member=5, concurrent_jobs_per_guild=3, monthly_usd_budget=9
    )
    found = standings(policy, usage(), NEXT_JOB, now=NOW, price_per_image=PRICE, operator=OperatorLimits(50))
    assert [s.reason for s in found] == [
        RefusalReason.OPERATOR_BUDGET,
        RefusalReason.MEMBER_CONCURRENCY,
        RefusalReason.GUILD_CONCURRENCY,
        RefusalReason.COOLDOWN,
        RefusalReason.DAILY_LIMIT,
        RefusalReason.MONTHLY_IMAGE_BUDGET,
        RefusalReason.MONTHLY_USD_BUDGET,
    ]
    assert not any(s.reached for s in found)


def test_unset_limits_are_left_out():
    policy = GuildPolicy(concurrent_jobs_per_member=None, monthly_image_budget=None)
    assert standings(policy, usage(), NEXT_JOB, now=NOW, price_per_image=PRICE) == []


def test_figures_and_reset_moments():
    policy = GuildPolicy(cooldown_seconds=600, daily_jobs_per_member=3, monthly_usd_budget=1.0)
    found = {
        s.reason: s
        for s in standings(
            policy,
            usage(member_last_job_at=NOW - 100, member_jobs_today=3, guild_images_this_month=12),
            NEXT_JOB,
            now=NOW,
            price_per_image=PRICE,
        )
    }
    cooldown = found[RefusalReason.COOLDOWN]
    assert (cooldown.used, cooldown.limit, cooldown.resets_at, cooldown.reached) == (100, 600, NOW + 500, True)
    daily = found[RefusalReason.DAILY_LIMIT]
    assert (daily.used, daily.resets_at, daily.reached) == (3, next_utc_midnight(NOW), True)
    usd = found[RefusalReason.MONTHLY_USD_BUDGET]
    # 12 images are $0.96; the next one makes $1.04, over the dollar.
    assert usd.used == 12 * PRICE and usd.reached and usd.resets_at == next_month_start(NOW)


def test_a_refusal_is_always_the_first_limit_reached():
    policy = GuildPolicy(
        cooldown_seconds=60, daily_jobs_per_member=2, concurrent_jobs_per_member=1, monthly_image_budget=10
    )
    for last, today, active, images in itertools.product((None, NOW - 30, NOW - 90), (0, 2), (0, 1), (0, 9, 10)):
        facts = usage(
            member_last_job_at=last, member_jobs_today=today, member_active_jobs=active, guild_images_this_month=images
        )
        decision = resolve(policy, ANYONE, facts, NEXT_JOB, now=NOW, price_per_image=PRICE)
        reached = [s for s in standings(policy, facts, NEXT_JOB, now=NOW, price_per_image=PRICE) if s.reached]
        if reached:
            first = reached[0]
            assert decision == Refused(first.reason, first.resets_at, first.limit, first.used)
        else:
            assert not isinstance(decision, Refused)
