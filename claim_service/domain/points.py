"""Points (积点): crediting rules, lots and the ops input that moves points.

A member's points come in **lots**: each credit (or positive adjustment) is one, with an
expiry. Spending takes from the lots that expire first; a refund puts points back into the
lots they came from; what is left of a lot when it expires is written off. The ledger in
PostgreSQL is the truth (``store.points_ledger``); Redis mirrors each member's lots so that
``claim.lua`` can take points in the same atomic step as stock and quota
(``store.points_mirror``). Both sides write lots as ``lot:remaining:expiry_ms`` (expiry 0:
never).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from claim_service.domain import periods
from claim_service.domain.catalogue import (
    CONTROL_RE,
    MAX_TIER,
    ConflictingFields,
    as_integer,
    parse_timestamp,
)
from claim_service.errors import ValidationError

MAX_POINTS = 1_000_000  # one credit, adjustment or price
MAX_RULES = 100
MAX_EXPIRY_PERIODS = 1200
MAX_REASON = 200
REFERENCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}\Z")
NEVER = 0


@dataclass(frozen=True)
class CreditRule:
    """From ``min_tier`` up (to the next rule's tier): ``points`` per period, each period's
    lot expiring ``expires_after_periods`` periods after the one it was credited for."""

    min_tier: int
    points: int
    expires_after_periods: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "min_tier": self.min_tier,
            "points": self.points,
            "expires_after_periods": self.expires_after_periods,
        }


def rule_for(rules: tuple[CreditRule, ...], tier: int) -> CreditRule | None:
    """The rule for a member of ``tier``: the one with the highest ``min_tier`` at or below
    it; None when none applies or it credits nothing."""
    found = None
    for rule in sorted(rules, key=lambda r: r.min_tier):
        if tier >= rule.min_tier:
            found = rule
    return found if found is not None and found.points > 0 else None


def lot_expiry(period: str, rule: CreditRule, tz: ZoneInfo) -> datetime | None:
    """When a lot credited for ``period`` expires: the start of the period
    ``expires_after_periods`` later (12 for a December credit: the next December's first
    instant), or never."""
    if rule.expires_after_periods is None:
        return None
    later = period
    for _ in range(rule.expires_after_periods):
        later = periods.next_period(later)
    return clamp_expiry(periods.period_start(later, tz))


def _whole(data: dict[str, Any], name: str, lo: int, hi: int, where: str) -> int:
    value = as_integer(data.get(name))
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(f"{where}{name} must be an integer in {lo}..{hi}", field=where + name)
    return value


def parse_rules(data: Any) -> tuple[CreditRule, ...]:
    """``{"rules": [{"min_tier", "points", "expires_after_periods"}]}`` (or the bare list)."""
    if isinstance(data, dict):
        data = data.get("rules")
    if not isinstance(data, list) or len(data) > MAX_RULES:
        raise ValidationError(
            f'rules must be a list of at most {MAX_RULES} {{"min_tier", "points", '
            '"expires_after_periods"}',
            field="rules",
        )
    rules = []
    for i, item in enumerate(data):
        where = f"rules[{i}]."
        if not isinstance(item, dict):
            raise ValidationError(f"rules[{i}] must be an object", field=f"rules[{i}]")
        expires = item.get("expires_after_periods")
        rules.append(
            CreditRule(
                _whole(item, "min_tier", 0, MAX_TIER, where),
                _whole(item, "points", 0, MAX_POINTS, where),
                None
                if expires is None
                else _whole(item, "expires_after_periods", 1, MAX_EXPIRY_PERIODS, where),
            )
        )
    if len({r.min_tier for r in rules}) != len(rules):
        raise ConflictingFields("two rules share a min_tier", field="rules")
    return tuple(sorted(rules, key=lambda r: r.min_tier))


# Expiries are kept between these instants (an earlier one has passed anyway; a later one is
# as good as never, and the Lua scripts write instants as numbers of at most 14 digits).
EARLIEST_EXPIRY = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_EXPIRY = datetime(3000, 1, 1, tzinfo=UTC)


def clamp_expiry(moment: datetime) -> datetime:
    """``moment`` within [EARLIEST_EXPIRY, LATEST_EXPIRY], to the millisecond (Redis's clock
    keeps no finer instant)."""
    if moment <= EARLIEST_EXPIRY:
        return EARLIEST_EXPIRY
    if moment >= LATEST_EXPIRY:
        return LATEST_EXPIRY
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class Adjustment:
    amount: int
    reason: str
    reference: str
    expires_at: datetime | None


def check_reference(value: Any) -> str:
    if not isinstance(value, str) or not REFERENCE_RE.match(value):
        raise ValidationError(
            "reference must be 1-128 characters of letters, digits and _ . : / -",
            field="reference",
        )
    return value


def check_reason(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REASON or CONTROL_RE.search(value):
        raise ValidationError(
            f"reason must be a string of 1..{MAX_REASON} characters, no control characters",
            field="reason",
        )
    return value


def parse_adjustment(data: dict[str, Any]) -> Adjustment:
    """``{"amount": ±N, "reason", "reference", "expires_at"?}``; ``expires_at`` only for a
    positive amount (the new lot's expiry; default: never)."""
    amount = _whole(data, "amount", -MAX_POINTS, MAX_POINTS, "")
    if amount == 0:
        raise ValidationError("amount must not be 0", field="amount")
    reason = check_reason(data.get("reason"))
    reference = check_reference(data.get("reference"))
    expires_at = None
    if data.get("expires_at") is not None:
        if amount < 0:
            raise ConflictingFields(
                "expires_at is for a positive amount (a new lot)", field="expires_at"
            )
        expires_at = clamp_expiry(parse_timestamp(data["expires_at"], "expires_at"))
    return Adjustment(amount, reason, reference, expires_at)


@dataclass
class Lot:
    lot_id: int
    remaining: int
    expires_ms: int  # NEVER (0): does not expire

    def spendable(self, now_ms: int) -> bool:
        return self.expires_ms == NEVER or self.expires_ms > now_ms

    def encode(self) -> str:
        return f"{self.lot_id}:{self.remaining}:{self.expires_ms}"


def fefo_key(lot: Lot) -> tuple[float, int]:
    """First expiring first; lots that never expire last; then the older lot."""
    return (float("inf") if lot.expires_ms == NEVER else lot.expires_ms, lot.lot_id)


def parse_lots(raw: str | bytes | None) -> list[Lot]:
    """``lot:remaining:expiry_ms,...`` as written by the Lua scripts."""
    if raw is None:
        return []
    text = raw.decode() if isinstance(raw, bytes) else raw
    lots = []
    for part in text.split(","):
        if part:
            lot_id, remaining, expires = part.split(":")
            lots.append(Lot(int(lot_id), int(remaining), int(expires)))
    return lots


def encode_lots(lots: list[Lot]) -> str:
    return ",".join(lot.encode() for lot in sorted(lots, key=fefo_key))


def spendable_points(lots: list[Lot], now_ms: int) -> int:
    return sum(lot.remaining for lot in lots if lot.spendable(now_ms))


def parse_taken(spec: str | bytes | None) -> list[tuple[int, int, int]]:
    """What a claim or a hold took: ``lot:amount:expiry_ms,...`` -> (lot, amount, expiry)."""
    return [(lot.lot_id, lot.remaining, lot.expires_ms) for lot in parse_lots(spec)]


def encode_taken(taken: list[tuple[int, int, int]]) -> str:
    return ",".join(f"{lot}:{amount}:{expires}" for lot, amount, expires in taken)
