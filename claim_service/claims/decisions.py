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
    option_ids: tuple[str, ...] = ()  # a bundle's chosen options (instead of option_id)


@dataclass(frozen=True)
class DrawResult:
    """The prize a draw gave and, for a draw decided now, the proof's parts: the value, the
    candidates and weights in force, whether the pity rule chose the candidates, the member's
    streak after it and the draw's number in the period (a replayed request has the prize
    only: its proof is on the claim)."""

    prize_id: str
    nonce: int = 0
    value: int | None = None
    weights: tuple[tuple[str, int], ...] = ()
    owed: bool = False
    streak: int = 0
    seq: int = 0


@dataclass(frozen=True)
class ClaimDecision:
    """What ``claim.lua`` decided for one request.

    ``code`` is ``ok`` (accepted now), ``dup`` (the same request accepted earlier) or a
    rejection: ``paused``, ``not_open``, ``closed``, ``unknown_option``, ``tier``,
    ``not_eligible`` (no recent event of the benefit's ``eligibility``), ``quota``,
    ``sold_out``, ``option_sold_out``, ``points`` (the member cannot spend ``price`` points:
    ``balance`` is what they can spend). ``option_id`` is the option taken (a bundle's first)
    or refused; ``options`` every option taken; ``draw`` the prize a draw gave.
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
    needs: tuple[str, int] | None = None  # not_eligible: the event and the days it may be old
    price: int = 0
    local: bool = False  # answered by the gate when submitted, ahead of any batch in flight
    options: tuple[str, ...] = ()  # what an accepted claim took (a bundle: several)
    draw: DrawResult | None = None

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
