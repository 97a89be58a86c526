"""Events from the bank's core systems, and benefits that need one (new-customer gifts).

``POST /v1/events`` brings ``{"event_id", "type", "user_id", "occurred_at", "attrs"}``: an
account opened, a digital-RMB wallet, a pension account, a card activated, its first swipe,
a wealth task done, an account closed. A benefit may require a recent one:
``"eligibility": {"event": TYPE, "within_days": N}`` lets only members with an event of that
type in the last N days (by Redis's clock, at the claim) claim it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from claim_service.domain.fields import CONTROL_RE, as_integer, check_id, parse_timestamp
from claim_service.errors import ValidationError

EVENT_TYPES = (
    "account_opened",
    "wallet_opened",
    "pension_opened",
    "card_activated",
    "first_swipe",
    "wealth_task_done",
    "account_closed",
)
# Not a bank event: a benefit whose eligibility names it is claimable by the members a
# campaign rewarded with it (``campaigns``), once the reward's cool-off is over.
REWARD_EVENT = "campaign_reward"
MAX_WITHIN_DAYS = 3660
MAX_ATTRS = 32
MAX_ATTR_CHARS = 256
ATTR_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
DAY_MS = 86_400_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class BankEvent:
    event_id: str
    type: str
    user_id: str
    occurred_at: datetime
    attrs: dict[str, str | int | bool]

    @property
    def occurred_ms(self) -> int:
        """Unix ms, rounded down exactly (as the mirror's rebuild from PostgreSQL does)."""
        return (self.occurred_at - EPOCH) // timedelta(milliseconds=1)

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "user_id": self.user_id,
            "occurred_at": self.occurred_at.isoformat(),
            "attrs": self.attrs,
        }


@dataclass(frozen=True)
class Eligibility:
    """Only members with an event of ``event`` in the last ``within_days`` days may claim;
    for ``campaign_reward``, members a campaign rewarded with the benefit, from the end of
    the reward's cool-off for ``within_days`` days."""

    event: str
    within_days: int

    @property
    def held(self) -> bool:
        """The member's time is when a hold ends: not claimable before it."""
        return self.event == REWARD_EVENT

    @property
    def within_ms(self) -> int:
        return self.within_days * DAY_MS

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, "within_days": self.within_days}


def _event_type(value: Any, field: str) -> str:
    if value not in EVENT_TYPES:
        raise ValidationError(f"{field} must be one of {', '.join(EVENT_TYPES)}", field=field)
    return str(value)


def parse_event(data: Any) -> BankEvent:
    """Validate an event body; raises ``ValidationError`` naming the field."""
    if not isinstance(data, dict):
        raise ValidationError("the event must be a JSON object")
    event_id = check_id(data.get("event_id"), "event_id")
    user_id = data.get("user_id")
    if not isinstance(user_id, str) or not 0 < len(user_id) <= 128 or CONTROL_RE.search(user_id):
        raise ValidationError(
            "user_id must be a string of 1..128 characters, no control characters",
            field="user_id",
        )
    attrs = data.get("attrs", {})
    if attrs is None:
        attrs = {}
    if not isinstance(attrs, dict) or len(attrs) > MAX_ATTRS:
        raise ValidationError(f"attrs must be an object of at most {MAX_ATTRS} keys", field="attrs")
    attrs = dict(attrs)
    for name, value in attrs.items():
        where = f"attrs.{name}" if isinstance(name, str) and ATTR_NAME_RE.match(name) else "attrs"
        if where == "attrs":
            raise ValidationError("attrs keys must be snake_case names", field="attrs")
        value = attrs[name] = as_integer(value)  # 12.0 is an integer in JSON
        if isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**53):
            continue
        if not isinstance(value, str) or len(value) > MAX_ATTR_CHARS or CONTROL_RE.search(value):
            raise ValidationError(
                f"{where} must be a string of at most {MAX_ATTR_CHARS} characters, an integer "
                "or a boolean",
                field=where,
            )
    return BankEvent(
        event_id=event_id,
        type=_event_type(data.get("type"), "type"),
        user_id=user_id,
        occurred_at=parse_timestamp(data.get("occurred_at"), "occurred_at"),
        attrs=attrs,
    )


def parse_eligibility(data: Any) -> Eligibility | None:
    """A benefit's ``eligibility`` (None when absent)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValidationError("eligibility must be an object", field="eligibility")
    days = as_integer(data.get("within_days"))
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_WITHIN_DAYS:
        raise ValidationError(
            f"eligibility.within_days must be an integer in 1..{MAX_WITHIN_DAYS}",
            field="eligibility.within_days",
        )
    event = data.get("event")
    if event == REWARD_EVENT:
        return Eligibility(REWARD_EVENT, days)
    return Eligibility(_event_type(event, "eligibility.event"), days)
