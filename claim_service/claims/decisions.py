"""A claim request and what was decided for it: by ``claim.lua``, or by the local gate
when Redis could not have answered otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

ACCEPTED = ("ok", "dup")


@dataclass(frozen=True)
class ClaimRequest:
    benefit_id: str
    user_id: str
    request_id: str
    option_id: str | None = None
    account: str = ""


@dataclass(frozen=True)
class ClaimDecision:
    """What ``claim.lua`` decided for one request.

    ``code`` is ``ok`` (accepted now), ``dup`` (the same request accepted earlier) or a
    rejection: ``paused``, ``not_open``, ``closed``, ``unknown_option``, ``tier``, ``quota``,
    ``sold_out``, ``option_sold_out``, ``points`` (the member cannot spend ``price`` points:
    ``balance`` is what they can spend).
    """

    code: str
    benefit_id: str
    option_id: str
    period: str
    stock_left: int
    tier: int
    claim_id: str | None = None
    created_at: datetime | None = None
    used: int = 0
    quota: int = 0
    opens_at: datetime | None = None
    balance: int = 0
    price: int = 0
    local: bool = False  # answered by the gate when submitted, ahead of any batch in flight

    @property
    def accepted(self) -> bool:
        return self.code in ACCEPTED


@dataclass(frozen=True)
class Span:
    """The period a batch is proposed for, its bounds and its release window (unix ms)."""

    period: str
    previous: str | None
    tiers_period: str
    start_ms: int
    end_ms: int
    opens: datetime
    opens_ms: int
    closes_ms: int
