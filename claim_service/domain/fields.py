"""Field checks shared by the catalogue's parts (benefits, options, draws)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from claim_service.errors import ValidationError

# \Z, not $: "$" also matches before a trailing newline, and "video\n" is no id.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
TIME_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?\Z")
# An RFC 3339 date-time, offset included (the API's ``format: date-time``); [0-9], not \d,
# which also matches other scripts' digits. The calendar is checked by ``fromisoformat``.
TIMESTAMP_RE = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?)"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})\Z"
)
# Names and SKUs are shown to members and sent to partners; PostgreSQL rejects NUL outright.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_STOCK = 1_000_000_000


class ConflictingFields(ValidationError):
    """Input of the documented shape whose fields contradict each other (a release closing
    before it opens, an option id or a quota tier given twice): no schema can say so, so the
    API answers 422 rather than 400."""


def as_integer(value: Any) -> Any:
    """``value`` as an ``int`` when it is a whole number written ``3.0`` (an integer to JSON
    Schema, a float to the JSON parser); anything else unchanged, for the caller to check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parse_timestamp(text: Any, field: str) -> datetime:
    """An RFC 3339 date-time with its offset (``2026-12-01T10:00:00+08:00``, ``…Z``), years
    0001-9999, no leap second; ``ValidationError`` naming ``field`` otherwise."""
    match = TIMESTAMP_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValidationError(
            f"{field} must be an RFC 3339 timestamp with an offset, e.g. 2026-12-01T10:00:00+08:00",
            field=field,
        )
    date, clock, offset = match.groups()
    try:
        return datetime.fromisoformat(f"{date}T{clock}{'+00:00' if offset in 'Zz' else offset}")
    except ValueError as exc:
        raise ValidationError(f"{field} is not a valid date and time", field=field) from exc


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ValidationError(
            f"{what} must be 1-64 characters of letters, digits, '_', '.', '-'", field=what
        )
    return value
