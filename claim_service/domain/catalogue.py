"""Benefits and their options: validation of the ops-facing JSON and release windows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from claim_service.domain import periods
from claim_service.domain.bank_events import Eligibility, parse_eligibility
from claim_service.domain.draws import Draw, parse_draw
from claim_service.domain.fields import (
    CONTROL_RE,
    ID_RE,
    MAX_STOCK,
    TIME_RE,
    TIMESTAMP_RE,
    ConflictingFields,
    as_integer,
    check_id,
    parse_timestamp,
)
from claim_service.domain.shards import parse_shards
from claim_service.domain.waiting_room import WaitingRoom, parse_waiting_room
from claim_service.errors import ValidationError

__all__ = [
    "CONTROL_RE",
    "ID_RE",
    "MAX_STOCK",
    "TIMESTAMP_RE",
    "ConflictingFields",
    "as_integer",
    "check_id",
    "parse_timestamp",
]

KINDS = ("direct_charge", "card_key")
ON_FAILURE = ("refund", "hold")
MAX_TIER = 99
MAX_OPTIONS = 64
MAX_QUOTA = 1000
MAX_PRICE_POINTS = 1_000_000
MAX_CHOOSE = 16


@dataclass(frozen=True)
class QuotaStep:
    min_tier: int
    per_period: int


@dataclass(frozen=True)
class Option:
    option_id: str
    name: str
    kind: str
    partner: str | None = None
    sku: str | None = None
    stock_cap: int | None = None
    price_points: int | None = None  # None: the benefit's price

    def to_json(self) -> dict[str, Any]:
        return {
            "option_id": self.option_id,
            "name": self.name,
            "kind": self.kind,
            "partner": self.partner,
            "sku": self.sku,
            "stock_cap": self.stock_cap,
            "price_points": self.price_points,
        }


def _clock(second_of_day: int) -> str:
    hours, rest = divmod(second_of_day, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}" + (f":{seconds:02d}" if seconds else "")


@dataclass(frozen=True)
class Release:
    """Monthly (``day`` + local ``time``) or a one-off opening instant.

    A monthly release has a stock and quotas per calendar month. A one-off release has one
    period for its whole window, the month it opens in, so a window that spans a month end
    keeps one stock and one quota per member throughout. Either way a member's tier is the
    one of the month the claim is decided in.
    """

    type: str
    day: int = 0
    second: int = 0
    close_day: int | None = None
    close_second: int = 0
    opens_at: datetime | None = None
    closes_at: datetime | None = None

    def window(self, period: str, tz: ZoneInfo) -> tuple[datetime, datetime | None]:
        """When claims for ``period`` open and close (``None``: at the end of the period)."""
        if self.type == "monthly":
            opens = periods.local_day_time(period, self.day, self.second, tz)
            closes = None
            if self.close_day is not None:
                closes = periods.local_day_time(period, self.close_day, self.close_second, tz)
            return opens, closes
        assert self.opens_at is not None
        return self.opens_at, self.closes_at

    @property
    def fixed_period(self) -> bool:
        return self.type == "once"

    def period_at(self, moment: datetime, tz: ZoneInfo) -> str:
        """The period a claim decided at ``moment`` counts against."""
        if self.type == "once":
            assert self.opens_at is not None
            return periods.period_of(self.opens_at, tz)
        return periods.period_of(moment, tz)

    def to_json(self) -> dict[str, Any]:
        if self.type == "monthly":
            out: dict[str, Any] = {"type": "monthly", "day": self.day, "time": _clock(self.second)}
            if self.close_day is not None:
                out["close_day"] = self.close_day
                out["close_time"] = _clock(self.close_second)
            return out
        assert self.opens_at is not None
        return {
            "type": "once",
            "opens_at": self.opens_at.isoformat(),
            "closes_at": self.closes_at.isoformat() if self.closes_at else None,
        }


@dataclass(frozen=True)
class Benefit:
    benefit_id: str
    name: str
    min_tier: int
    quota: tuple[QuotaStep, ...]
    stock_per_period: int
    release: Release
    options: tuple[Option, ...]
    paused: bool = False
    version: int = 0
    on_failure: str = "refund"
    zone: str | None = None
    price_points: int = 0  # points a claim costs (0: free); an option may set its own
    choose: int = 1  # options a claim may take at once (a bundle when above 1)
    draw: Draw | None = None  # the prize is drawn (see ``draws``)
    waiting_room: WaitingRoom | None = None  # claims need an admission (see ``waiting_room``)
    shards: int = 1  # stock buckets on separate Redis slots (see ``shards``)
    eligibility: Eligibility | None = None  # members need a recent event (``bank_events``)

    def option(self, option_id: str) -> Option | None:
        for option in self.options:
            if option.option_id == option_id:
                return option
        return None

    def quota_for(self, tier: int) -> int:
        """Claims allowed per period at ``tier`` (0 when below ``min_tier``)."""
        if tier < self.min_tier:
            return 0
        allowed = 0
        for step in self.quota:
            if tier >= step.min_tier:
                allowed = step.per_period
        return allowed

    def price_of(self, option_id: str) -> int:
        """Points a claim of ``option_id`` costs (0: free)."""
        option = self.option(option_id)
        if option is not None and option.price_points is not None:
            return option.price_points
        return self.price_points

    @property
    def priced(self) -> bool:
        """Whether any option costs points."""
        return any(self.price_of(o.option_id) > 0 for o in self.options)

    def to_json(self) -> dict[str, Any]:
        return {
            "benefit_id": self.benefit_id,
            "name": self.name,
            "zone": self.zone,
            "price_points": self.price_points,
            "min_tier": self.min_tier,
            "quota": [{"min_tier": s.min_tier, "per_period": s.per_period} for s in self.quota],
            "stock_per_period": self.stock_per_period,
            "release": self.release.to_json(),
            "paused": self.paused,
            "on_failure": self.on_failure,
            "version": self.version,
            "options": [o.to_json() for o in self.options],
            "choose": self.choose,
            "draw": self.draw.to_json() if self.draw else None,
            "waiting_room": self.waiting_room.to_json() if self.waiting_room else None,
            "shards": self.shards,
            "eligibility": self.eligibility.to_json() if self.eligibility else None,
        }


def _int(data: dict[str, Any], name: str, lo: int, hi: int, where: str = "") -> int:
    """``data[name]``; errors name the field as ``where + name`` (``options[2].stock_cap``)."""
    field = where + name
    value = as_integer(data.get(name))
    if value is None:
        raise ValidationError(f"{field} is required", field=field)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(f"{field} must be an integer in {lo}..{hi}", field=field)
    return value


def _str(data: dict[str, Any], name: str, max_len: int, where: str = "") -> str | None:
    field = where + name
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_len or CONTROL_RE.search(value):
        raise ValidationError(
            f"{field} must be a string of 1..{max_len} characters, no control characters",
            field=field,
        )
    return value


def _second_of_day(text: Any, name: str) -> int:
    match = TIME_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValidationError(f"{name} must be HH:MM or HH:MM:SS", field=name)
    return int(match.group(1)) * 3600 + int(match.group(2)) * 60 + int(match.group(3) or 0)


def parse_release(data: Any, tz: ZoneInfo) -> Release:
    if not isinstance(data, dict):
        raise ValidationError("release must be an object", field="release")
    kind = data.get("type")
    if kind == "monthly":
        day = _int(data, "day", 1, 31, "release.")
        second = _second_of_day(data.get("time", "00:00"), "release.time")
        close_day = data.get("close_day")
        close_second = 0
        if close_day is not None:
            close_day = _int(data, "close_day", 1, 31, "release.")
            close_second = _second_of_day(data.get("close_time", "00:00"), "release.close_time")
            if (close_day, close_second) <= (day, second):
                raise ConflictingFields("release must close after it opens", field="release")
        return Release(
            "monthly", day=day, second=second, close_day=close_day, close_second=close_second
        )
    if kind == "once":
        opens = parse_timestamp(data.get("opens_at"), "release.opens_at")
        closes = None
        if data.get("closes_at") is not None:
            closes = parse_timestamp(data["closes_at"], "release.closes_at")
            if closes <= opens:
                raise ConflictingFields("release must close after it opens", field="release")
        return Release("once", opens_at=opens, closes_at=closes)
    raise ValidationError("release.type must be 'monthly' or 'once'", field="release.type")


def parse_quota(data: Any, min_tier: int) -> tuple[QuotaStep, ...]:
    data = as_integer(data)
    if isinstance(data, int) and not isinstance(data, bool):
        return (QuotaStep(min_tier, _int({"quota": data}, "quota", 0, MAX_QUOTA)),)
    if not isinstance(data, list) or not data:
        raise ValidationError(
            "quota must be an integer or a non-empty list of {min_tier, per_period}", field="quota"
        )
    steps = []
    for i, item in enumerate(data):
        where = f"quota[{i}]"
        if not isinstance(item, dict):
            raise ValidationError(f"{where} must be an object", field=where)
        steps.append(
            QuotaStep(
                _int(item, "min_tier", 0, MAX_TIER, where + "."),
                _int(item, "per_period", 0, MAX_QUOTA, where + "."),
            )
        )
    steps.sort(key=lambda s: s.min_tier)
    if len({s.min_tier for s in steps}) != len(steps):
        raise ConflictingFields("quota has two entries for the same min_tier", field="quota")
    return tuple(steps)


def parse_option(data: Any, index: int = 0) -> Option:
    where = f"options[{index}]"
    if not isinstance(data, dict):
        raise ValidationError(f"{where} must be an object", field=where)
    option_id = check_id(data.get("option_id"), f"{where}.option_id")
    kind = data.get("kind", "direct_charge")
    if kind not in KINDS:
        raise ValidationError(
            f"{where}.kind must be one of {', '.join(KINDS)}", field=f"{where}.kind"
        )
    partner = _str(data, "partner", 64, where + ".")
    if partner is not None:
        check_id(partner, f"{where}.partner")
    sku = _str(data, "sku", 128, where + ".")
    if kind == "direct_charge" and (partner is None or sku is None):
        missing = f"{where}.partner" if partner is None else f"{where}.sku"
        raise ValidationError("a direct_charge option needs partner and sku", field=missing)
    cap = data.get("stock_cap")
    if cap is not None:
        cap = _int(data, "stock_cap", 0, MAX_STOCK, where + ".")
    name = _str(data, "name", 200, where + ".") or option_id
    price = data.get("price_points")
    if price is not None:
        price = _int(data, "price_points", 0, MAX_PRICE_POINTS, where + ".")
    return Option(option_id, name, kind, partner, sku, cap, price)


def parse_benefit(benefit_id: str, data: Any, tz: ZoneInfo, version: int = 0) -> Benefit:
    """Validate the admin JSON for a benefit; raises ``ValidationError`` with a clear message."""
    check_id(benefit_id, "benefit_id")
    if not isinstance(data, dict):
        raise ValidationError("benefit must be a JSON object")
    min_tier = _int(data, "min_tier", 0, MAX_TIER)
    options_data = data.get("options")
    if not isinstance(options_data, list) or not 0 < len(options_data) <= MAX_OPTIONS:
        raise ValidationError(f"options must be a list of 1..{MAX_OPTIONS}", field="options")
    options = tuple(parse_option(o, i) for i, o in enumerate(options_data))
    if len({o.option_id for o in options}) != len(options):
        raise ConflictingFields("option ids must be unique", field="options")
    paused = data.get("paused", False)
    if not isinstance(paused, bool):
        raise ValidationError("paused must be a boolean", field="paused")
    on_failure = data.get("on_failure", "refund")
    if on_failure not in ON_FAILURE:
        raise ValidationError("on_failure must be 'refund' or 'hold'", field="on_failure")
    zone = data.get("zone")
    if zone is not None:
        zone = check_id(zone, "zone")
    price = 0
    if data.get("price_points") is not None:
        price = _int(data, "price_points", 0, MAX_PRICE_POINTS)
    choose = 1
    if data.get("choose") is not None:
        choose = _int(data, "choose", 1, MAX_CHOOSE)
        if choose > len(options):
            raise ConflictingFields("choose is more than the benefit's options", field="choose")
    release = parse_release(data.get("release"), tz)
    draw = None
    if data.get("draw") is not None:
        draw = parse_draw(data["draw"], [o.option_id for o in options])
        if choose > 1:
            raise ConflictingFields("a draw benefit takes one prize per claim", field="choose")
        if release.type == "once" and release.closes_at is None:
            raise ConflictingFields(
                "a draw needs a release that closes (its seed is revealed then)",
                field="release.closes_at",
            )
        if any(o.price_points is not None for o in options):
            raise ConflictingFields(
                "a draw costs the benefit's price_points, not an option's",
                field="options",
            )
    room = None
    if data.get("waiting_room") is not None:
        room = parse_waiting_room(data["waiting_room"])
    shards = parse_shards(
        data,
        unsupported={
            "a draw": draw is not None,
            "a waiting room": room is not None,
            "a points price": price > 0 or any(o.price_points for o in options),
            "card_key options": any(o.kind == "card_key" for o in options),
            "an option's stock_cap": any(o.stock_cap is not None for o in options),
        },
    )
    return Benefit(
        benefit_id=benefit_id,
        name=_str(data, "name", 200) or benefit_id,
        min_tier=min_tier,
        quota=parse_quota(data.get("quota", 1), min_tier),
        stock_per_period=_int(data, "stock_per_period", 0, MAX_STOCK),
        release=release,
        options=options,
        paused=paused,
        version=version,
        on_failure=on_failure,
        zone=zone,
        price_points=price,
        choose=choose,
        draw=draw,
        waiting_room=room,
        shards=shards,
        eligibility=parse_eligibility(data.get("eligibility")),
    )
