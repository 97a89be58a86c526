"""Periods: calendar months in the service's time zone, written ``YYYY-MM``."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from claim_service.errors import ValidationError

PERIOD_RE = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])\Z")


def period_of(moment: datetime, tz: ZoneInfo) -> str:
    try:
        local = moment.astimezone(tz)
    except OverflowError:  # year 1 or 9999 seen from another zone: keep its own date
        local = moment
    return f"{local.year:04d}-{local.month:02d}"


def current_period(tz: ZoneInfo) -> str:
    return period_of(datetime.now(tz), tz)


def parse_period(text: str) -> tuple[int, int]:
    match = PERIOD_RE.match(text)
    if not match:
        raise ValidationError("period must be written YYYY-MM", field="period")
    return int(match.group(1)), int(match.group(2))


def period_start(period: str, tz: ZoneInfo) -> datetime:
    year, month = parse_period(period)
    return datetime(year, month, 1, tzinfo=tz)


def next_period(period: str) -> str:
    year, month = parse_period(period)
    return f"{year + month // 12:04d}-{month % 12 + 1:02d}"


def previous_period(period: str) -> str:
    year, month = parse_period(period)
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


def days_in_period(period: str) -> int:
    year, month = parse_period(period)
    start = datetime(year, month, 1)
    nxt = datetime(year + month // 12, month % 12 + 1, 1)
    return (nxt - start).days


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz)


def local_day_time(period: str, day: int, second_of_day: int, tz: ZoneInfo) -> datetime:
    """Day ``day`` (clamped to the month's length) at ``second_of_day`` local time."""
    year, month = parse_period(period)
    day = min(day, days_in_period(period))
    naive = datetime(year, month, day) + timedelta(seconds=second_of_day)
    return naive.replace(tzinfo=tz)


@dataclass(frozen=True)
class Calendar:
    """Where the monthly periods fall on the servers' clock.

    The decision itself is taken by Redis's clock inside ``claim.lua``; the calendar only
    turns its instants into periods and bounds. ``shift_ms`` moves the calendar relative to
    that clock, so a test can stand a second before a month end without waiting for one.
    """

    tz: ZoneInfo
    shift_ms: int = 0

    def period_at(self, ms: int) -> str:
        return period_of(from_ms(ms + self.shift_ms, self.tz), self.tz)

    def bounds_ms(self, period: str) -> tuple[int, int]:
        """``[start, end)`` of ``period`` on the servers' clock, in unix ms."""
        start = to_ms(period_start(period, self.tz))
        end = to_ms(period_start(next_period(period), self.tz))
        return start - self.shift_ms, end - self.shift_ms

    def real_ms(self, moment: datetime) -> int:
        """A calendar instant on the servers' clock."""
        return to_ms(moment) - self.shift_ms

    def now(self) -> datetime:
        return from_ms(int(time.time() * 1000) + self.shift_ms, self.tz)
