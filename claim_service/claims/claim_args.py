"""The arguments of one ``claim.lua`` call (see the script's header for their layout)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest, Span
from claim_service.domain.catalogue import Benefit
from claim_service.store.bank_events import occurred
from claim_service.store.campaign_rewards import released
from claim_service.store.keyspace import PERIOD_KEY_TTL_S, tiers_key

# (request, the options it asks for, its new claim id, a draw's value)
Item = tuple[ClaimRequest, str, str, int | None]


async def claim_argv(
    redis: Redis, benefit: Benefit, span: Span, items: Sequence[Item], *, cluster: bool
) -> list[Any]:
    """ARGV for deciding ``items`` on ``benefit`` over ``span``. Reads what the script needs
    from outside the benefit's slot: the members' latest event of the benefit's eligibility
    type and, on a cluster (where the tier snapshot is in another slot), their tiers."""
    users = [request.user_id for request, *_ in items]
    events: list[int | None] = [None] * len(items)
    if benefit.eligibility is not None and benefit.eligibility.held:
        events = await released(redis, benefit.benefit_id, users)
    elif benefit.eligibility is not None:
        events = await occurred(redis, benefit.eligibility.event, users)
    argv: list[Any] = [
        benefit.version,
        span.period,
        span.start_ms,
        span.end_ms,
        span.opens_ms,
        span.closes_ms,
        PERIOD_KEY_TTL_S,
        len(items),
    ]
    for (request, options, claim_id, value), event_ms in zip(items, events, strict=True):
        argv += [
            request.user_id,
            request.request_id,
            options,
            claim_id,
            request.account,
            "" if value is None else value,
            "" if event_ms is None else event_ms,
        ]
    if cluster:
        tiers = await redis.hmget(tiers_key(span.tiers_period), users)
        argv += [0 if t is None else int(t) for t in tiers]
    return argv
