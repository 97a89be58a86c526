"""Redis restarted with an empty dataset is rebuilt from PostgreSQL without resetting stock."""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.http.service import create_app
from claim_service.store import catalogue_store
from claim_service.store.keyspace import BenefitKeys
from claim_service.store.recovery import Recovery
from claim_service.store.tiers import save_tiers
from tests.helpers import auth, benefit_body, drain, fast


async def test_warm_after_redis_data_loss(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    period = periods.current_period(settings.tz)
    benefit = parse_benefit("video", _body(stock=10), settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    await catalogue_store.add_stock(pool, redis, "video", period, 5, "extra batch")
    await save_tiers(pool, redis, period, [(f"u{i}", 5) for i in range(20)] + [("low", 2)])
    engine = ClaimEngine(redis, settings, pool=pool)
    first = await asyncio.gather(
        *(engine.claim(ClaimRequest("video", f"u{i}", "r1", "iqiyi")) for i in range(6))
    )
    assert all(d.code == "ok" for d in first)
    await drain(ClaimWriter(redis, pool, fast(settings)))
    assert await pool.fetchval("SELECT count(*) FROM claims") == 6

    await redis.flushall()  # Redis came back empty
    report = await Recovery(pool, redis, settings).ensure_all(force=True, tier_periods=[period])
    assert report.benefits == 1 and report.tiers == 21

    engine = ClaimEngine(redis, settings, pool=pool)
    replay = await engine.claim(ClaimRequest("video", "u0", "r1", "iqiyi"))
    assert replay.code == "dup" and replay.claim_id == first[0].claim_id
    again = await engine.claim(ClaimRequest("video", "u0", "r2", "iqiyi"))
    assert again.code == "quota"
    low = await engine.claim(ClaimRequest("video", "low", "r1", "iqiyi"))
    assert low.code == "tier"
    fresh = await engine.claim(ClaimRequest("video", "u10", "r1", "iqiyi"))
    assert fresh.code == "ok"
    assert fresh.stock_left == 10 + 5 - 6 - 1, "stock already taken was not given back"
    stock = await redis.hgetall(BenefitKeys("video").stock(period))
    assert int(stock[b"added"]) == 5 and int(stock[b"taken:iqiyi"]) == 7


async def test_warm_never_lowers_live_counters(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """Claims accepted in Redis but not yet written must not be forgotten by a warm."""
    period = periods.current_period(settings.tz)
    benefit = parse_benefit("video", _body(stock=10), settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    await save_tiers(pool, redis, period, [(f"u{i}", 5) for i in range(5)])
    engine = ClaimEngine(redis, settings, pool=pool)
    for i in range(4):
        assert (await engine.claim(ClaimRequest("video", f"u{i}", "r", "iqiyi"))).accepted
    # Nothing written to PostgreSQL yet; warming must keep Redis's higher counts.
    await Recovery(pool, redis, settings).ensure_all(force=True, tier_periods=[period])
    decision = await engine.claim(ClaimRequest("video", "u4", "r", "iqiyi"))
    assert decision.stock_left == 10 - 5
    assert (await engine.claim(ClaimRequest("video", "u0", "x", "iqiyi"))).code == "quota"


def _body(stock: int) -> dict[str, object]:
    return benefit_body(stock=stock)


async def test_serve_warms_an_empty_redis_on_start_up(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    period = periods.current_period(settings.tz)
    benefit = parse_benefit("video", _body(stock=3), settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    await save_tiers(pool, redis, period, [("u1", 5), ("u2", 5)])
    first = await ClaimEngine(redis, settings, pool=pool).claim(
        ClaimRequest("video", "u1", "r", "iqiyi")
    )
    await drain(ClaimWriter(redis, pool, fast(settings)))
    await redis.flushall()

    async with TestClient(TestServer(create_app(settings))) as client:
        resp = await client.post(
            "/v1/benefits/video/claims",
            headers=auth(settings, "u1"),
            json={"request_id": "r", "option_id": "iqiyi"},
        )
        assert resp.status == 200 and (await resp.json())["claim_id"] == first.claim_id
        resp = await client.post(
            "/v1/benefits/video/claims",
            headers=auth(settings, "u2"),
            json={"request_id": "r", "option_id": "iqiyi"},
        )
        assert resp.status == 202 and (await resp.json())["stock_left"] == 1
