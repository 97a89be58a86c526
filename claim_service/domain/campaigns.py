"""Referral and team-up campaigns: member-gets-member gifts and three-person team-ups.

A campaign (``PUT /admin/v1/campaigns/{id}``) gives each member a code. A new customer whose
``account_opened`` event carries it (``attrs.referral_code``), or who registers it late
within ``late_registration_days`` of opening, is attributed to the code's member, once per
campaign. An attributed invitee qualifies with a ``qualify_event`` between its opening and
the campaign's end.

- ``referral``: a referrer with ``invitees_required`` qualified invitees earns ``reward``,
  and the reward of each of ``tiers`` at its ``count``.
- ``team``: the code is a team's; ``invitees_required`` new customers join it until it is
  full, and when the opener and every member qualified before the team expires
  (``team_ttl_seconds`` after it opened) each of them earns ``reward``.

A reward is a benefit the member may then claim (its ``eligibility`` names
``campaign_reward``: the claim goes through the same atomic path, first come, first served,
stock-limited) or points credited once through the ledger. It is held ``cool_off_days``
after the last qualifying event counted; an invitee's ``account_closed`` arriving in that
time revokes the invitee and the rewards it held up. ``budget`` (rewards) and
``points_budget`` are never exceeded: a reward beyond them is ``over_budget``, never granted.
"""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from claim_service.domain.bank_events import EVENT_TYPES, REWARD_EVENT
from claim_service.domain.fields import CONTROL_RE, ConflictingFields, as_integer, check_id
from claim_service.domain.fields import parse_timestamp as _timestamp
from claim_service.errors import ValidationError

__all__ = ["REWARD_EVENT"]  # a reward benefit's eligibility event, from ``bank_events``

CAMPAIGN_TYPES = ("referral", "team")
QUALIFY_EVENTS = tuple(t for t in EVENT_TYPES if t not in ("account_opened", "account_closed"))
FINGERPRINT_ATTRS = ("phone_hash", "device_hash")
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L: read aloud, typed by hand
CODE_LENGTH = 8
CODE_RE = re.compile(rf"^[{CODE_ALPHABET}]{{{CODE_LENGTH}}}\Z")
MAX_INVITEES = 1_000
MAX_TIERS = 20
MAX_DAYS = 365
MAX_BUDGET = 1_000_000_000
MAX_POINTS = 10_000_000
MAX_TEAM_TTL_S = 90 * 86_400
DEFAULT_TEAM_TTL_S = 7 * 86_400
MAX_NAME = 128
MAX_FINGERPRINT = 128
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9998, 12, 31, tzinfo=UTC)


@dataclass(frozen=True)
class Reward:
    """A benefit the member may then claim, or points credited to them."""

    benefit_id: str | None = None
    points: int = 0

    @property
    def kind(self) -> str:
        return "benefit" if self.benefit_id is not None else "points"

    def to_json(self) -> dict[str, Any]:
        return {"benefit_id": self.benefit_id} if self.benefit_id else {"points": self.points}


@dataclass(frozen=True)
class Tier:
    count: int
    reward: Reward

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "reward": self.reward.to_json()}


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    type: str
    starts_at: datetime
    ends_at: datetime
    qualify_event: str
    invitees_required: int
    reward: Reward
    budget: int
    name: str = ""
    tiers: tuple[Tier, ...] = ()
    points_budget: int | None = None
    late_registration_days: int = 0
    cool_off_days: int = 0
    max_invitees_per_day: int | None = None
    max_invitees: int | None = None
    team_ttl_seconds: int = DEFAULT_TEAM_TTL_S
    paused: bool = False
    version: int = 0

    def levels(self) -> list[tuple[int, Reward]]:
        """The (count, reward) pairs a referrer earns, by count; a team's one gift."""
        return [(self.invitees_required, self.reward), *((t.count, t.reward) for t in self.tiers)]

    def reward_benefits(self) -> set[str]:
        return {r.benefit_id for _, r in self.levels() if r.benefit_id is not None}

    def is_open(self, moment: datetime) -> bool:
        return not self.paused and self.starts_at <= moment < self.ends_at

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "campaign_id": self.campaign_id,
            "type": self.type,
            "name": self.name,
            "starts_at": self.starts_at.isoformat(),
            "ends_at": self.ends_at.isoformat(),
            "qualify_event": self.qualify_event,
            "invitees_required": self.invitees_required,
            "reward": self.reward.to_json(),
            "tiers": [t.to_json() for t in self.tiers],
            "budget": self.budget,
            "points_budget": self.points_budget,
            "late_registration_days": self.late_registration_days,
            "cool_off_days": self.cool_off_days,
            "max_invitees_per_day": self.max_invitees_per_day,
            "max_invitees": self.max_invitees,
            "paused": self.paused,
            "version": self.version,
        }
        if self.type == "team":
            out["team_ttl_seconds"] = self.team_ttl_seconds
        return out


def _whole(data: dict[str, Any], name: str, lo: int, hi: int, *, default: Any = ...) -> Any:
    value = as_integer(data.get(name))
    if value is None and default is not ...:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(f"{name} must be an integer in {lo}..{hi}", field=name)
    return value


def parse_reward(data: Any, field: str) -> Reward:
    """``{"benefit_id": B}`` or ``{"points": N}``."""
    if not isinstance(data, dict) or len(data) != 1 or not {"benefit_id", "points"} & set(data):
        raise ValidationError(
            f'{field} must be {{"benefit_id": ID}} or {{"points": N}}', field=field
        )
    if "benefit_id" in data:
        return Reward(benefit_id=check_id(data["benefit_id"], f"{field}.benefit_id"))
    points = as_integer(data["points"])
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= MAX_POINTS:
        raise ValidationError(
            f"{field}.points must be an integer in 1..{MAX_POINTS}", field=f"{field}.points"
        )
    return Reward(points=points)


def _tiers(data: Any, kind: str, required: int) -> tuple[Tier, ...]:
    if data is None:
        return ()
    if not isinstance(data, list) or len(data) > MAX_TIERS:
        raise ValidationError(f"tiers must be a list of at most {MAX_TIERS}", field="tiers")
    tiers = []
    for i, item in enumerate(data):
        where = f"tiers[{i}]"
        if not isinstance(item, dict):
            raise ValidationError(f"{where} must be an object", field=where)
        count = as_integer(item.get("count"))
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_INVITEES:
            raise ValidationError(
                f"{where}.count must be an integer in 1..{MAX_INVITEES}", field=f"{where}.count"
            )
        tiers.append(Tier(count, parse_reward(item.get("reward"), f"{where}.reward")))
    if tiers and kind == "team":
        raise ConflictingFields("a team-up has one gift: tiers are for referrals", field="tiers")
    counts = [required, *(t.count for t in tiers)]
    if any(b <= a for a, b in itertools.pairwise(counts)):
        raise ConflictingFields(
            "tier counts must rise above invitees_required, each above the last", field="tiers"
        )
    return tuple(tiers)


def parse_campaign(campaign_id: str, data: Any) -> Campaign:
    """Validate a campaign body; raises ``ValidationError`` (400) naming the field, or
    ``ConflictingFields`` (422) for fields that contradict."""
    campaign_id = check_id(campaign_id, "campaign_id")
    if not isinstance(data, dict):
        raise ValidationError("the campaign must be a JSON object")
    kind = data.get("type")
    if kind not in CAMPAIGN_TYPES:
        raise ValidationError("type must be referral or team", field="type")
    name = data.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME or CONTROL_RE.search(name):
        raise ValidationError(
            f"name must be a string of at most {MAX_NAME} characters", field="name"
        )
    starts_at = _timestamp(data.get("starts_at"), "starts_at")
    ends_at = _timestamp(data.get("ends_at"), "ends_at")
    if ends_at <= starts_at:
        raise ConflictingFields("ends_at must be after starts_at", field="ends_at")
    for where, moment in (("starts_at", starts_at), ("ends_at", ends_at)):
        if not EARLIEST <= moment <= LATEST:  # PostgreSQL stores it, with a late window
            raise ConflictingFields(f"{where} must be in the years 1970..9998", field=where)
    qualify = data.get("qualify_event")
    if qualify not in QUALIFY_EVENTS:
        raise ValidationError(
            f"qualify_event must be one of {', '.join(QUALIFY_EVENTS)}", field="qualify_event"
        )
    required = _whole(data, "invitees_required", 1, MAX_INVITEES)
    points_budget = _whole(data, "points_budget", 1, MAX_BUDGET * 1000, default=None)
    paused = data.get("paused", False)
    if not isinstance(paused, bool):
        raise ValidationError("paused must be a boolean", field="paused")
    if kind == "referral" and data.get("team_ttl_seconds") is not None:
        raise ConflictingFields("team_ttl_seconds is for team-ups", field="team_ttl_seconds")
    campaign = Campaign(
        campaign_id=campaign_id,
        type=str(kind),
        name=name,
        starts_at=starts_at,
        ends_at=ends_at,
        qualify_event=str(qualify),
        invitees_required=required,
        reward=parse_reward(data.get("reward"), "reward"),
        tiers=_tiers(data.get("tiers"), str(kind), required),
        budget=_whole(data, "budget", 1, MAX_BUDGET),
        points_budget=points_budget,
        late_registration_days=_whole(data, "late_registration_days", 0, MAX_DAYS, default=0),
        cool_off_days=_whole(data, "cool_off_days", 0, MAX_DAYS, default=0),
        max_invitees_per_day=_whole(data, "max_invitees_per_day", 1, MAX_INVITEES, default=None),
        max_invitees=_whole(data, "max_invitees", 1, MAX_INVITEES, default=None),
        team_ttl_seconds=_whole(
            data, "team_ttl_seconds", 1, MAX_TEAM_TTL_S, default=DEFAULT_TEAM_TTL_S
        ),
        paused=paused,
    )
    if points_budget is not None and not any(r.points for _, r in campaign.levels()):
        raise ConflictingFields("points_budget needs a reward in points", field="points_budget")
    return campaign


def from_record(campaign_id: str, definition: dict[str, Any], version: int) -> Campaign:
    """A campaign as stored (its definition was validated on the way in)."""
    campaign = parse_campaign(campaign_id, definition)
    return Campaign(**{**campaign.__dict__, "version": version})


def new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalise_code(value: Any, field: str = "referral_code") -> str:
    """A code as members type it (any case, spaces and dashes ignored)."""
    if not isinstance(value, str) or len(value) > 64:
        raise ValidationError(f"{field} must be a referral code", field=field)
    code = re.sub(r"[\s-]", "", value).upper()
    if not CODE_RE.match(code):
        raise ValidationError(f"{field} must be a referral code", field=field)
    return code


def fingerprints(attrs: dict[str, Any]) -> list[str]:
    """The phone and device fingerprint hashes an event or a request carries."""
    return sorted(
        f"{name}:{attrs[name]}"
        for name in FINGERPRINT_ATTRS
        if isinstance(attrs.get(name), str) and attrs[name]
    )


def parse_fingerprints(data: Any) -> list[str]:
    """Optional ``{"phone_hash", "device_hash"}`` of a code request."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ValidationError("the body must be a JSON object")
    for name in FINGERPRINT_ATTRS:
        value = data.get(name)
        if value is not None and (
            not isinstance(value, str)
            or not 0 < len(value) <= MAX_FINGERPRINT
            or CONTROL_RE.search(value)
        ):
            raise ValidationError(
                f"{name} must be a string of 1..{MAX_FINGERPRINT} characters", field=name
            )
    return fingerprints(data)


def mask(user_id: str) -> str:
    """A member id as another member may see it: ``ab***yz``."""
    if len(user_id) <= 4:
        return user_id[:1] + "***"
    return f"{user_id[:2]}***{user_id[-2:]}"
