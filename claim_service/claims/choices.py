"""What a claim asks ``claim.lua`` to take, checked against the benefit: one option, a
bundle's options (``choose: k``), or nothing for a draw; and how a decision's reply says
what was taken."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from claim_service.claims.decisions import ACCEPTED, ClaimDecision, ClaimRequest, DrawResult, Span
from claim_service.domain import periods
from claim_service.domain.catalogue import ID_RE, Benefit
from claim_service.errors import NotFoundError, ValidationError
from claim_service.store.keyspace import text


def requested_options(benefit: Benefit, request: ClaimRequest) -> str:
    """What ``claim.lua`` is asked to take: one option id, a bundle's ids joined by ","
    or, for a draw, nothing (the prize decides)."""
    chosen = request.option_ids
    if request.option_id is not None:
        if chosen:
            raise ValidationError("give option_id or option_ids, not both", field="option_ids")
        chosen = (request.option_id,)
    if benefit.draw is not None:
        if chosen:
            raise ValidationError("a draw benefit draws its prize: no option_id", field="option_id")
        return ""
    if not chosen:
        if len(benefit.options) != 1:
            choices = ", ".join(o.option_id for o in benefit.options)
            raise ValidationError(
                f"option_id is required for this benefit (one of: {choices})",
                field="option_id",
            )
        return benefit.options[0].option_id
    if len(chosen) > benefit.choose:
        raise ValidationError(
            f"this benefit takes at most {benefit.choose} option(s) per claim",
            field="option_ids",
        )
    if len(set(chosen)) != len(chosen):
        raise ValidationError("option_ids must be distinct", field="option_ids")
    for option_id in chosen:
        if not isinstance(option_id, str) or not ID_RE.match(option_id):
            raise NotFoundError("unknown_option", f"benefit has no option {option_id!r}")
    return ",".join(chosen)


def taken_of(
    code: str, taken: str, detail: str, value: int | None
) -> tuple[str, tuple[str, ...], DrawResult | None]:
    """(option_id, options, draw) from ``claim.lua``'s options and detail values: the option
    taken or refused (a bundle's first), every option taken, and a draw's result."""
    option_ids, _, prize_id = taken.partition("/")
    options = tuple(option_ids.split(",")) if code in ACCEPTED else ()
    draw = None
    if detail:  # a draw decided now: "prize_id|weights|owed|streak|seq"
        prize_id, weights, owed, streak, seq = detail.split("|")
        pairs = tuple(
            (name, int(weight))
            for name, _, weight in (w.rpartition(":") for w in weights.split(","))
        )
        draw = DrawResult(prize_id, 0, value, pairs, owed == "1", int(streak), int(seq))
    elif prize_id and code in ACCEPTED:
        draw = DrawResult(prize_id)
    return option_ids.split(",")[0], options, draw


def price_of(benefit: Benefit, options: str) -> int:
    """The points a claim of ``options`` costs."""
    if benefit.draw is not None:
        return benefit.price_points
    return sum(benefit.price_of(o) for o in options.split(",") if o)


def decision_of(
    benefit: Benefit,
    span: Span,
    requested: str,
    value: int | None,
    row: list[Any],
    tz: ZoneInfo,
    next_opening: Callable[[Benefit], datetime | None],
) -> ClaimDecision:
    """One claim's decision from its ``claim.lua`` reply row (``requested``: the options it
    asked for, ``value``: a draw's value)."""
    code, claim_id, taken = text(row[0]), text(row[1]), text(row[2])
    stock_left, tier, extra = int(row[3]), int(row[4]), int(row[5])
    option_id, options, draw = taken_of(code, taken, text(row[6]), value)
    needs = None
    if benefit.eligibility is not None:
        needs = (benefit.eligibility.event, benefit.eligibility.within_days)
    created = periods.from_ms(extra, tz) if code in ACCEPTED else None
    opens_at = None
    if code == "not_open":
        opens_at = span.opens
    elif code == "closed":
        opens_at = next_opening(benefit)
    return ClaimDecision(
        code=code,
        benefit_id=benefit.benefit_id,
        option_id=option_id,
        period=span.period,
        stock_left=max(stock_left, 0),
        tier=tier,
        claim_id=claim_id or None,
        created_at=created,
        used=extra if code == "quota" else 0,
        quota=benefit.quota_for(tier),
        balance=extra if code == "points" else 0,
        price=price_of(benefit, requested),
        opens_at=opens_at,
        options=options,
        draw=draw,
        needs=needs if code == "not_eligible" else None,
    )
