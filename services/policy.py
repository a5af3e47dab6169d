"""Per-guild usage policy for `/kontext`: pure decisions, no Discord, no storage.

The cog gathers the facts (policy row, who is asking and where, usage counters,
what they asked for) and calls `resolve`. Everything that decides whether a job
runs, and at which `safety_tolerance`, lives here so it can be tested exhaustively.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, NamedTuple

from .i18n import N_, Texts, english

SAFETY_MIN, SAFETY_MAX = 1, 6


@dataclass(frozen=True)
class GuildPolicy:
    """What a guild's moderators set. The defaults are what a new server gets."""

    # Used when the member sets none.
    safety_default: int = 2
    # Highest a member may ask for in ordinary channels.
    safety_maximum: int = 2
    # Highest allowed in age-restricted channels; replaces safety_maximum there.
    safety_nsfw_maximum: int = 4
    # Empty = every channel. A listed channel also allows its threads.
    allowed_channel_ids: frozenset[int] = frozenset()
    required_role_id: int | None = None
    cooldown_seconds: int = 0
    # None = unlimited.
    daily_jobs_per_member: int | None = None
    concurrent_jobs_per_member: int | None = 2
    concurrent_jobs_per_guild: int | None = None
    # A server starts with a budget (250 images is $20 at Kontext Max's price), never with none:
    # anyone may add a public bot, and the operator pays.
    monthly_image_budget: int | None = 250
    monthly_usd_budget: float | None = None
    log_channel_id: int | None = None


@dataclass(frozen=True)
class Requester:
    user_id: int
    role_ids: frozenset[int]
    channel_id: int
    # A thread's parent channel (None outside threads), so allowing a channel allows its threads.
    parent_channel_id: int | None
    # Age-restricted channel; for a thread, the cog passes the parent's flag.
    channel_nsfw: bool


@dataclass(frozen=True)
class Usage:
    """Facts read from storage at request time."""

    member_last_job_at: float | None  # unix seconds
    member_jobs_today: int  # since the current UTC midnight (see day_start)
    member_active_jobs: int
    guild_active_jobs: int
    guild_images_this_month: int  # images billed this UTC calendar month (see month_start)
    all_images_this_month: int = 0  # the same, for every server together


@dataclass(frozen=True)
class OperatorLimits:
    """What the bot's operator sets for all servers together (in the environment)."""

    monthly_usd_budget: float | None = None  # None: no cap across servers


NO_OPERATOR_LIMITS = OperatorLimits()


@dataclass(frozen=True)
class PersonalUse:
    """What the operator allows where no server governs: the member's DM with the bot, group
    DMs and servers that have not added the bot (reached through the member's own install of
    the app). Set in the environment; the operator's monthly budget counts these jobs too."""

    allowed: bool = False
    safety_default: int = 2
    safety_maximum: int = 2
    daily_jobs_per_member: int | None = 10
    concurrent_jobs_per_member: int | None = 1

    def as_policy(self) -> GuildPolicy:
        """The same limits as a policy `resolve` applies: no channel or role rules (no server
        sets any) and no server budget (the operator's is checked instead)."""
        return GuildPolicy(
            safety_default=self.safety_default,
            safety_maximum=self.safety_maximum,
            safety_nsfw_maximum=self.safety_maximum,
            daily_jobs_per_member=self.daily_jobs_per_member,
            concurrent_jobs_per_member=self.concurrent_jobs_per_member,
            concurrent_jobs_per_guild=None,
            monthly_image_budget=None,
        )


@dataclass(frozen=True)
class JobAsk:
    safety_tolerance: int | None  # None = the member set none
    num_images: int


@dataclass(frozen=True)
class Allowed:
    safety_tolerance: int  # what to send to the model
    requested: int | None  # what the member asked for, None if nothing
    # Set only when the member's own request was clamped down ("limited to N by
    # this server's policy"). A default above the maximum is clamped silently.
    limited_to: int | None


class RefusalReason(enum.Enum):
    CHANNEL_NOT_ALLOWED = "channel_not_allowed"
    MISSING_ROLE = "missing_role"
    MEMBER_CONCURRENCY = "member_concurrency"
    GUILD_CONCURRENCY = "guild_concurrency"
    COOLDOWN = "cooldown"
    DAILY_LIMIT = "daily_limit"
    MONTHLY_IMAGE_BUDGET = "monthly_image_budget"
    MONTHLY_USD_BUDGET = "monthly_usd_budget"
    OPERATOR_BUDGET = "operator_budget"
    # Showing an old result again: it was made at a tolerance above what is allowed here.
    SAFETY_ABOVE_MAXIMUM = "safety_above_maximum"


@dataclass(frozen=True)
class Refused:
    reason: RefusalReason
    # When trying again can succeed as far as *this* reason goes; None when waiting
    # does not help (access) or the moment is unknown (concurrency: when a job ends).
    retry_at: float | None
    # The policy value that was hit (seconds, jobs, images or USD), for the reply.
    limit: int | float | None
    # How much of it is in use, for the reply: the jobs running may outnumber a concurrency limit
    # a moderator lowered meanwhile. None for the refusals that count nothing (access, tolerance).
    used: float | None = None


Decision = Allowed | Refused


# --- time keys -------------------------------------------------------------------------


def _utc(now: float) -> datetime:
    return datetime.fromtimestamp(now, tz=UTC)


def next_utc_midnight(now: float) -> float:
    """Start of the next UTC day (strictly after `now`): when daily counters reset."""
    today = _utc(now).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today + timedelta(days=1)).timestamp()


def next_month_start(now: float) -> float:
    """First instant of the next UTC calendar month (strictly after `now`): when budgets reset."""
    d = _utc(now)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def day_start(now: float) -> float:
    """Start of the current UTC day: daily counters count jobs since then."""
    return next_utc_midnight(now) - 86400


def month_start(now: float) -> float:
    """First instant of the current UTC calendar month: budgets count images since then."""
    return _utc(now).replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


# --- decision --------------------------------------------------------------------------


def _clamp_safety(value: int) -> int:
    return max(SAFETY_MIN, min(SAFETY_MAX, value))


def effective_maximum(policy: GuildPolicy, channel_nsfw: bool) -> int:
    """Highest safety_tolerance allowed in this kind of channel.

    Always within SAFETY_MIN..SAFETY_MAX, even for an invalid stored policy, so a
    bad row can never send an out-of-range value to the model.
    """
    raw = policy.safety_nsfw_maximum if channel_nsfw else policy.safety_maximum
    return _clamp_safety(raw)


def _channel_allowed(policy: GuildPolicy, requester: Requester) -> bool:
    allowed = policy.allowed_channel_ids
    if not allowed:
        return True
    return requester.channel_id in allowed or (
        requester.parent_channel_id is not None and requester.parent_channel_id in allowed
    )


def _usd_exceeds(images: int, price_per_image: float, budget: float) -> bool:
    """True if `images` cost more than `budget`, ignoring binary float noise.

    35 * 0.08 is 2.8000000000000003 in floats; without the tolerance a $2.80
    budget would admit only 34 images at $0.08.
    """
    cost = images * price_per_image
    return cost > budget and not math.isclose(cost, budget, rel_tol=1e-9, abs_tol=1e-9)


@dataclass(frozen=True)
class Standing:
    """Where a member stands against one usage limit: what `resolve` checks, and what
    `/kontext-me` shows, from the same numbers, so the two can never disagree."""

    reason: RefusalReason  # what a refusal by this limit says
    used: float  # jobs, images or USD so far; for the cooldown, seconds since the last job
    limit: int | float  # the policy value (jobs, images, USD, seconds)
    # When it frees up: a refusal's retry_at while `reached`, else when the count starts again
    # (None: when a running job ends, or no cooldown is running).
    resets_at: float | None
    reached: bool  # the next job (of the images asked) would be refused by this limit


def standings(
    policy: GuildPolicy,
    usage: Usage,
    ask: JobAsk,
    *,
    now: float,
    price_per_image: float,
    operator: OperatorLimits = NO_OPERATOR_LIMITS,
) -> list[Standing]:
    """Every usage limit that applies, in the order `resolve` reports them (after any set to 0):
    the operator's budget, concurrency (member, then server), cooldown, the daily limit, the
    server's budgets.
    A limit left unset (None, or no cooldown) is not listed."""
    found: list[Standing] = []
    month_end = next_month_start(now)
    usd = operator.monthly_usd_budget
    if usd is not None:
        spent = usage.all_images_this_month * price_per_image
        reached = _usd_exceeds(usage.all_images_this_month + ask.num_images, price_per_image, usd)
        found.append(Standing(RefusalReason.OPERATOR_BUDGET, spent, usd, month_end, reached))
    limit = policy.concurrent_jobs_per_member
    if limit is not None:
        reached = usage.member_active_jobs >= limit
        found.append(Standing(RefusalReason.MEMBER_CONCURRENCY, usage.member_active_jobs, limit, None, reached))
    limit = policy.concurrent_jobs_per_guild
    if limit is not None:
        reached = usage.guild_active_jobs >= limit
        found.append(Standing(RefusalReason.GUILD_CONCURRENCY, usage.guild_active_jobs, limit, None, reached))
    cooldown = policy.cooldown_seconds
    if cooldown > 0:
        last = usage.member_last_job_at
        ready_at = last + cooldown if last is not None else None
        reached = ready_at is not None and now < ready_at
        elapsed = now - last if last is not None else float(cooldown)
        found.append(Standing(RefusalReason.COOLDOWN, elapsed, cooldown, ready_at if reached else None, reached))
    limit = policy.daily_jobs_per_member
    if limit is not None:
        reached = usage.member_jobs_today >= limit
        found.append(
            Standing(RefusalReason.DAILY_LIMIT, usage.member_jobs_today, limit, next_utc_midnight(now), reached)
        )
    images_after = usage.guild_images_this_month + ask.num_images
    limit = policy.monthly_image_budget
    if limit is not None:
        reached = images_after > limit
        found.append(
            Standing(RefusalReason.MONTHLY_IMAGE_BUDGET, usage.guild_images_this_month, limit, month_end, reached)
        )
    usd = policy.monthly_usd_budget
    if usd is not None:
        spent = usage.guild_images_this_month * price_per_image
        reached = _usd_exceeds(images_after, price_per_image, usd)
        found.append(Standing(RefusalReason.MONTHLY_USD_BUDGET, spent, usd, month_end, reached))
    return found


def access_refusal(policy: GuildPolicy, requester: Requester) -> Refused | None:
    """Whether the member may use the bot here at all (channel, then role), whatever it costs:
    what a job checks first, and showing an old result again too (`showing_refusal`)."""
    if not _channel_allowed(policy, requester):
        return Refused(RefusalReason.CHANNEL_NOT_ALLOWED, None, None)
    role = policy.required_role_id
    if role is not None and role not in requester.role_ids:
        return Refused(RefusalReason.MISSING_ROLE, None, None)
    return None


def showing_refusal(policy: GuildPolicy, requester: Requester, made_at: int | None) -> Refused | None:
    """Whether the member may show here again a result made at safety tolerance `made_at`: as a
    job here, access first, then the tolerance, which must be within what a job here could have
    used (the channel's effective maximum), so that a result cannot carry a more permissive
    tolerance out of the place that allowed it. Nothing is spent, so no limit of use applies. A
    result with no tolerance recorded counts as made at the most permissive."""
    refused = access_refusal(policy, requester)
    if refused is not None:
        return refused
    maximum = effective_maximum(policy, requester.channel_nsfw)
    if (SAFETY_MAX if made_at is None else made_at) > maximum:
        return Refused(RefusalReason.SAFETY_ABOVE_MAXIMUM, None, maximum)
    return None


def _check(
    policy: GuildPolicy,
    requester: Requester,
    usage: Usage,
    ask: JobAsk,
    now: float,
    price: float,
    operator: OperatorLimits,
) -> Refused | None:
    refused = access_refusal(policy, requester)
    if refused is not None:
        return refused
    reached = [s for s in standings(policy, usage, ask, now=now, price_per_image=price, operator=operator) if s.reached]
    if not reached:
        return None
    # A limit set to 0 first: waiting for another to free up would only end in this one.
    standing = next((s for s in reached if s.limit == 0), reached[0])
    return Refused(standing.reason, standing.resets_at, standing.limit, standing.used)


def resolve(
    policy: GuildPolicy,
    requester: Requester,
    usage: Usage,
    ask: JobAsk,
    *,
    now: float,
    price_per_image: float,
    operator: OperatorLimits = NO_OPERATOR_LIMITS,
) -> Decision:
    """Decide whether this job may run and at which safety_tolerance.

    Moderators get no bypass: they change the policy instead.

    Checks run in this order and the first failure is reported:

    1. Access (channel, then role). These are not about usage: waiting does not
       help, so they come first, before any reason that would invite a pointless
       retry, and they tell someone who may not use the bot here nothing about
       counters or budgets. Then the operator's budget for all servers, which no
       server's own settings can lift.
    2. Concurrency (member, then guild). A running job also usually means the
       cooldown is active, and "your job is still running" is the truer reason;
       it clears on its own within about a minute.
    3. Cooldown, then the daily limit: the member's own pacing before the
       member's own quota.
    4. Budgets (images, then USD) last: they are guild-wide and say something
       about the whole server, so they are only reported when nothing about the
       member themself stands in the way. The images this job would add count.

    `retry_at` describes the reported reason only; a member on cooldown who has
    also used up the day is told about the cooldown first.

    Safety: a member's request above the channel's effective maximum is clamped
    and reported via `limited_to`. With no request, `safety_default` is used,
    clamped silently to the effective maximum (the member asked for nothing, so
    there is nothing to report as limited).

    Raises ValueError for inputs the cog must never send: a requested tolerance
    outside SAFETY_MIN..SAFETY_MAX (the slash option is constrained to that),
    fewer than one image, or a negative price.
    """
    requested = ask.safety_tolerance
    if requested is not None and not SAFETY_MIN <= requested <= SAFETY_MAX:
        raise ValueError(f"safety_tolerance must be {SAFETY_MIN}..{SAFETY_MAX}, got {requested}")
    if ask.num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {ask.num_images}")
    if price_per_image < 0 or not math.isfinite(price_per_image):
        raise ValueError(f"price_per_image must be a non-negative number, got {price_per_image}")

    refused = _check(policy, requester, usage, ask, now, price_per_image, operator)
    if refused is not None:
        return refused

    maximum = effective_maximum(policy, requester.channel_nsfw)
    if requested is None:
        return Allowed(min(_clamp_safety(policy.safety_default), maximum), None, None)
    if requested > maximum:
        return Allowed(maximum, requested, maximum)
    return Allowed(requested, requested, None)


# --- admin support ---------------------------------------------------------------------


class FieldInfo(NamedTuple):
    label: str
    default: Any


_LABELS: dict[str, str] = {
    "safety_default": N_("Default safety tolerance"),
    "safety_maximum": N_("Maximum safety tolerance"),
    "safety_nsfw_maximum": N_("Maximum safety tolerance in NSFW channels"),
    "allowed_channel_ids": N_("Allowed channels"),
    "required_role_id": N_("Required role"),
    "cooldown_seconds": N_("Cooldown (seconds)"),
    "daily_jobs_per_member": N_("Daily jobs per member"),
    "concurrent_jobs_per_member": N_("Concurrent jobs per member"),
    "concurrent_jobs_per_guild": N_("Concurrent jobs per server"),
    "monthly_image_budget": N_("Monthly image budget"),
    "monthly_usd_budget": N_("Monthly budget (USD)"),
    "log_channel_id": N_("Log channel"),
}

# Field name -> (human label, in English: translate with Texts), default), in declaration order;
# built from the dataclass so it cannot drift from it. Reset a setting with
# dataclasses.replace(p, **{name: info.default}).
POLICY_FIELDS: Mapping[str, FieldInfo] = MappingProxyType(
    {f.name: FieldInfo(_LABELS[f.name], f.default) for f in fields(GuildPolicy)}
)


def validate_policy(policy: GuildPolicy, in_language: Texts | None = None) -> list[str]:
    """Problems with a policy, as moderators read them (in `in_language`, else English); empty
    when it is fine.

    The admin cog shows these instead of saving. `resolve` still behaves sanely on
    an invalid policy (it clamps safety values), so a bad stored row cannot crash it.
    """
    _ = in_language or english()
    problems: list[str] = []
    label = {name: _(info.label) for name, info in POLICY_FIELDS.items()}

    safety_ok = True
    for name in ("safety_default", "safety_maximum", "safety_nsfw_maximum"):
        value = getattr(policy, name)
        if not SAFETY_MIN <= value <= SAFETY_MAX:
            safety_ok = False
            problems.append(
                _(
                    "{setting} must be between {min} and {max} (is {value}).",
                    setting=label[name],
                    min=SAFETY_MIN,
                    max=SAFETY_MAX,
                    value=value,
                )
            )
    if safety_ok:
        if policy.safety_default > policy.safety_maximum:
            problems.append(
                _(
                    "The default safety tolerance ({default}) is above the maximum ({maximum}).",
                    default=policy.safety_default,
                    maximum=policy.safety_maximum,
                )
            )
        if policy.safety_default > policy.safety_nsfw_maximum:
            problems.append(
                _(
                    "The default safety tolerance ({default}) is above the NSFW maximum ({maximum}).",
                    default=policy.safety_default,
                    maximum=policy.safety_nsfw_maximum,
                )
            )

    for name in (
        "cooldown_seconds",
        "daily_jobs_per_member",
        "concurrent_jobs_per_member",
        "concurrent_jobs_per_guild",
    ):
        value = getattr(policy, name)
        if value is not None and value < 0:
            problems.append(_("{setting} must not be negative (is {value}).", setting=label[name], value=value))

    # A zero budget would silently stop the bot; "unlimited" is None.
    if policy.monthly_image_budget is not None and policy.monthly_image_budget <= 0:
        problems.append(
            _(
                "{setting} must be above 0 (is {value}).",
                setting=label["monthly_image_budget"],
                value=policy.monthly_image_budget,
            )
        )
    usd = policy.monthly_usd_budget
    if usd is not None and (not math.isfinite(usd) or usd <= 0):
        problems.append(_("{setting} must be above 0 (is {value}).", setting=label["monthly_usd_budget"], value=usd))

    for name in ("required_role_id", "log_channel_id"):
        value = getattr(policy, name)
        if value is not None and value <= 0:
            problems.append(_("{setting} is not a valid Discord id ({value}).", setting=label[name], value=value))
    bad_ids = sorted(i for i in policy.allowed_channel_ids if i <= 0)
    if bad_ids:
        problems.append(
            _(
                "{setting} contains invalid ids: {ids}.",
                setting=label["allowed_channel_ids"],
                ids=", ".join(map(str, bad_ids)),
            )
        )
    return problems


def policy_to_dict(policy: GuildPolicy) -> dict[str, Any]:
    """JSON-friendly dict: frozensets become sorted lists."""
    out: dict[str, Any] = {}
    for f in fields(GuildPolicy):
        value = getattr(policy, f.name)
        out[f.name] = sorted(value) if isinstance(value, frozenset) else value
    return out


def _to_int(value: Any) -> int:
    # bool is an int subclass but True as a limit is surely a corrupt row.
    if isinstance(value, bool):
        raise ValueError("bool")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())  # snowflakes are often stored as strings
    raise ValueError(f"not an int: {value!r}")


def _to_opt_int(value: Any) -> int | None:
    return None if value is None else _to_int(value)


def _to_opt_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("bool")
    if isinstance(value, (int, float, str)):
        result = float(value)
        if not math.isfinite(result):
            raise ValueError("not finite")
        return result
    raise ValueError(f"not a number: {value!r}")


def _to_ids(value: Any) -> frozenset[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"not a list of ids: {value!r}")
    return frozenset(_to_int(v) for v in value)


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "safety_default": _to_int,
    "safety_maximum": _to_int,
    "safety_nsfw_maximum": _to_int,
    "allowed_channel_ids": _to_ids,
    "required_role_id": _to_opt_int,
    "cooldown_seconds": _to_int,
    "daily_jobs_per_member": _to_opt_int,
    "concurrent_jobs_per_member": _to_opt_int,
    "concurrent_jobs_per_guild": _to_opt_int,
    "monthly_image_budget": _to_opt_int,
    "monthly_usd_budget": _to_opt_float,
    "log_channel_id": _to_opt_int,
}


def policy_from_dict(d: Mapping[str, Any]) -> GuildPolicy:
    """Rebuild a policy from `policy_to_dict` output, tolerant of old or damaged rows.

    Unknown keys are ignored (rows written by a newer or older version), missing
    keys take the default, and a value of the wrong type also falls back to the
    default for that one field, so one bad value cannot take a guild's bot down.
    Ranges are not checked here; that is `validate_policy`'s job.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"policy row must be a mapping, got {type(d).__name__}")
    kwargs: dict[str, Any] = {}
    for name, convert in _CONVERTERS.items():
        if name not in d:
            continue
        try:
            kwargs[name] = convert(d[name])
        except (TypeError, ValueError, OverflowError):
            continue
    return GuildPolicy(**kwargs)


__all__ = [
    "SAFETY_MIN",
    "SAFETY_MAX",
    "GuildPolicy",
    "Requester",
    "Usage",
    "OperatorLimits",
    "PersonalUse",
    "JobAsk",
    "Allowed",
    "Refused",
    "RefusalReason",
    "Decision",
    "Standing",
    "standings",
    "FieldInfo",
    "POLICY_FIELDS",
    "resolve",
    "access_refusal",
    "showing_refusal",
    "effective_maximum",
    "validate_policy",
    "next_utc_midnight",
    "next_month_start",
    "day_start",
    "month_start",
    "policy_to_dict",
    "policy_from_dict",
]
