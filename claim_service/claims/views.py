"""What a member sees of the catalogue: each benefit with eligibility, quota, stock and
opening, as of now on the release calendar, grouped by zone, the points they can spend (a
benefit none of whose options they can afford says ``insufficient_points``) and what their
next tier unlocks (read from Redis, never deciding anything)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from claim_service.claims.engine import ClaimEngine
from claim_service.domain import periods
from claim_service.domain.catalogue import Benefit
from claim_service.domain.points import parse_lots, spendable_points
from claim_service.domain.zones import Zone, next_tier
from claim_service.errors import BackendUnavailable
from claim_service.store.buckets import member_bucket
from claim_service.store.keyspace import POINTS_KEY, ZONES_KEY, BenefitKeys, bucket_keys, tiers_key
from claim_service.store.zones_store import load_zones, zones_from_mirror


@dataclass(frozen=True)
class _Catalogue:
    tier: int
    points: int  # what the member can spend now
    benefits: list[Benefit]
    views: list[dict[str, Any]]
    zones_mirror: dict[Any, Any]  # HGETALL of the zones mirror


async def member_listing(engine: ClaimEngine, pool: asyncpg.Pool, user_id: str) -> dict[str, Any]:
    """The body of ``GET /v1/benefits``: every benefit as the member sees it now
    (``benefits``: eligibility, quota, stock, opening), the same views grouped by zone
    (``zones``), the member's ``tier`` and what their next tier unlocks (``next_tier``)."""
    found = await _read(engine, user_id)
    zones = zones_from_mirror(found.zones_mirror)
    if zones is None:  # Redis lost the mirror: PostgreSQL has the zones
        zones = await load_zones(engine.redis, pool)
    return {
        "benefits": found.views,
        "tier": found.tier,
        "points": found.points,
        "zones": group_by_zone(found.views, zones, found.tier),
        "next_tier": next_tier(found.tier, zones, found.benefits),
    }


def group_by_zone(
    views: list[dict[str, Any]], zones: list[Zone], tier: int
) -> list[dict[str, Any]]:
    """Every zone in ``zones``' order with its benefits' views, then the benefits of no
    (known) zone in a group of ``zone_id`` null, left out when empty."""
    members: dict[str, list[dict[str, Any]]] = {z.zone_id: [] for z in zones}
    ungrouped: list[dict[str, Any]] = []
    for view in views:
        members.get(view["zone"], ungrouped).append(view)
    groups = [
        {**z.to_json(), "unlocked": tier >= z.min_tier, "benefits": members[z.zone_id]}
        for z in zones
    ]
    if ungrouped:
        groups.append(
            {
                "zone_id": None,
                "name": None,
                "min_tier": None,
                "position": None,
                "unlocked": True,
                "benefits": ungrouped,
            }
        )
    return groups


async def _read(engine: ClaimEngine, user_id: str) -> _Catalogue:
    now = engine.now()
    ids = await engine.benefit_ids()
    benefits: list[Benefit] = []
    try:
        async with engine.redis.pipeline(transaction=False) as pipe:
            for bid in ids:
                pipe.hget(BenefitKeys(bid).config, "version")
            versions = await pipe.execute()
        for bid, version in zip(ids, versions, strict=True):
            if version is None:
                continue
            # The parsed benefit is reused while its version stands: no JSON per request.
            benefit = engine.catalogue.cached(bid)
            if benefit is None or benefit.version != int(version):
                benefit = await engine.benefit(bid, refresh=True)
            if benefit is not None:
                benefits.append(benefit)
        async with engine.redis.pipeline(transaction=False) as pipe:
            pipe.hget(tiers_key(periods.period_of(now, engine.tz)), user_id)
            for benefit in benefits:
                period = benefit.release.period_at(now, engine.tz)
                keys = BenefitKeys(benefit.benefit_id)
                pipe.hmget(keys.stock(period), ["added", "taken"])
                mine = member_bucket(benefit.benefit_id, benefit.shards, user_id)
                pipe.hget(mine.used(period), user_id)
                for bucket in _buckets(benefit):  # a sharded benefit's claims are there
                    pipe.hget(bucket.stock(period), "taken")
            pipe.hget(POINTS_KEY, user_id)
            pipe.hgetall(ZONES_KEY)  # in the same round trip: zones cost no extra one
            results = await pipe.execute()
    except RedisError as exc:
        raise BackendUnavailable("Redis is unavailable") from exc
    zones_mirror = results.pop()
    points = spendable_points(parse_lots(results.pop()), engine.redis_ms())
    tier = int(results[0]) if results[0] is not None else 0
    views = []
    replies = iter(results[1:])
    for benefit in benefits:
        (added, taken), used = next(replies), next(replies)
        taken = int(taken or 0) + sum(int(next(replies) or 0) for _ in _buckets(benefit))
        period = benefit.release.period_at(now, engine.tz)
        stock_left = benefit.stock_per_period + int(added or 0) - taken
        views.append(
            _view(engine, benefit, period, now, tier, int(used or 0), max(stock_left, 0), points)
        )
    return _Catalogue(tier, points, benefits, views, zones_mirror)


def _buckets(benefit: Benefit) -> tuple[BenefitKeys, ...]:
    return bucket_keys(benefit.benefit_id, benefit.shards) if benefit.shards > 1 else ()


def _view(
    engine: ClaimEngine,
    benefit: Benefit,
    period: str,
    now: datetime,
    tier: int,
    used: int,
    left: int,
    points: int,
) -> dict[str, Any]:
    opens, closes = engine.window(benefit, period)
    allowed = benefit.quota_for(tier)
    reason = None
    if tier < benefit.min_tier:
        reason = "tier_too_low"
    elif used >= allowed:
        reason = "quota_exceeded"
    elif benefit.paused:
        reason = "paused"
    elif now < opens:
        reason = "not_open"
    elif closes is not None and now >= closes:
        reason = "closed"
    elif left <= 0:
        reason = "sold_out"
    elif min(benefit.price_of(o.option_id) for o in benefit.options) > points:
        reason = "insufficient_points"
    next_open = engine.next_opening(benefit, now)
    return {
        "benefit_id": benefit.benefit_id,
        "name": benefit.name,
        "min_tier": benefit.min_tier,
        "zone": benefit.zone,
        "price_points": benefit.price_points,
        "period": period,
        "options": [
            {
                "option_id": o.option_id,
                "name": o.name,
                "kind": o.kind,
                "price_points": benefit.price_of(o.option_id),
            }
            for o in benefit.options
        ],
        "choose": benefit.choose,
        "draw": benefit.draw.type if benefit.draw else None,
        "waiting_room": benefit.waiting_room.to_json() if benefit.waiting_room else None,
        "can_claim": reason is None,
        "reason": reason,
        "tier": tier,
        "quota": {"used": used, "allowed": allowed},
        "stock_left": left,
        "paused": benefit.paused,
        "opens_at": next_open.isoformat() if next_open else None,
        "closes_at": closes.isoformat() if closes else None,
    }
