"""Many concurrent clients over HTTP, and several engines sharing one Redis; each test runs
against one Valkey and, as ``[cluster]``, against a local Valkey Cluster."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.store import catalogue_store
from claim_service.store.connections import create_redis
from claim_service.store.keyspace import BenefitKeys
from claim_service.store.tiers import save_tiers
from tests.helpers import admin, auth, benefit_body

Client = TestClient[Any, Any]


async def test_concurrent_http_burst_never_oversells(
    backend_client: Client, backend_settings: Settings
) -> None:
    client, settings = backend_client, backend_settings
    stock = 150
    members = {f"u{i}": random.Random(i).choice([2, 4, 6, 8, 12]) for i in range(400)}
    resp = await client.put(
        "/admin/v1/benefits/video", json=benefit_body(stock=stock), headers=admin(settings)
    )
    assert resp.status == 201
    period = periods.current_period(settings.tz)
    body = [{"user_id": u, "tier": t} for u, t in members.items()]
    assert (
        await client.put(f"/admin/v1/tiers/{period}", json=body, headers=admin(settings))
    ).status == 200
    accepted: dict[str, list[str]] = {}
    statuses: Counter[int] = Counter()

    async def member(user: str) -> None:
        headers = auth(settings, user)
        for attempt in range(3):  # each member tries three times, each try sent twice
            replies = []
            for _ in range(2):
                r = await client.post(
                    "/v1/benefits/video/claims",
                    headers=headers,
                    json={"request_id": f"{user}-{attempt}", "option_id": "iqiyi"},
                )
                replies.append((r.status, await r.json()))
                statuses[r.status] += 1
            (s1, b1), (s2, b2) = replies
            if s1 == 202:
                assert s2 == 200 and b2["claim_id"] == b1["claim_id"]
                accepted.setdefault(user, []).append(b1["claim_id"])

    await asyncio.gather(*(member(u) for u in members))
    total = sum(len(v) for v in accepted.values())
    demand = sum(3 if t >= 8 else 1 for t in members.values() if t >= 4)
    assert demand > stock
    assert total == stock, "demand exceeded stock, so the stock must reach exactly 0"
    for user, claims in accepted.items():
        tier = members[user]
        assert tier >= 4
        assert len(claims) <= (2 if tier >= 8 else 1)
    assert statuses[500] == 0


async def test_engines_in_separate_clients_share_stock_exactly(
    backend_settings: Settings, backend_redis: Redis, pool: asyncpg.Pool
) -> None:
    """Four engines with their own connections (as four worker processes would have)."""
    settings, redis = backend_settings, backend_redis
    stock = 300
    benefit = parse_benefit("video", benefit_body(stock=stock, quota=5), settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    period = periods.current_period(settings.tz)
    await save_tiers(pool, redis, period, [(f"u{i}", 9) for i in range(200)])
    assert settings.redis_url
    clients = [await create_redis(settings.redis_url) for _ in range(4)]
    try:
        engines = [ClaimEngine(c, settings, pool=pool) for c in clients]
        requests = [
            ClaimRequest("video", f"u{i % 200}", f"r{i}", "iqiyi" if i % 2 else "tencent")
            for i in range(1200)
        ]
        decisions = await asyncio.gather(*(engines[i % 4].claim(r) for i, r in enumerate(requests)))
    finally:
        for c in clients:
            await c.aclose()
    ok = [d for d in decisions if d.accepted]
    assert len(ok) == stock
    assert len({d.claim_id for d in ok}) == stock
    per_member = Counter(r.user_id for r, d in zip(requests, decisions, strict=True) if d.accepted)
    assert max(per_member.values()) <= 5
    codes = Counter(d.code for d in decisions)
    assert codes["sold_out"] + codes["quota"] == 1200 - stock
    taken = await redis.hget(BenefitKeys("video").stock(period), "taken")
    assert taken is not None and int(taken) == stock
    assert await redis.xlen(BenefitKeys("video").stream) == stock
    assert sum(e.batches for e in engines) < len(requests), "claims were coalesced into batches"
