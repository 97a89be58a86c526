"""The core guarantees on a Redis Cluster: the same tests as against one Redis, run with
the service connected through ``redis+cluster://`` (the concurrency tests and the claim
state machine run on both as ``[cluster]`` variants of their own)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from typing import Any, cast

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.durability import check_server
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.errors import BackendUnavailable, ConfigError
from claim_service.http.dashboard import DASHBOARD
from claim_service.store import catalogue_store
from claim_service.store.keyspace import BenefitKeys
from claim_service.store.tiers import save_tiers
from tests.helpers import benefit_body, drain, fast
from tests.integration import test_dashboard as td
from tests.integration import test_warm, test_writer

Client = TestClient[Any, Any]


async def test_the_writer_persists_each_claim_once(
    cluster_settings: Settings, cluster_redis: Redis, pool: asyncpg.Pool
) -> None:
    await test_writer.test_writer_persists_each_claim_once(cluster_settings, cluster_redis, pool)


async def test_warm_after_redis_data_loss(
    cluster_settings: Settings, cluster_redis: Redis, pool: asyncpg.Pool
) -> None:
    await test_warm.test_warm_after_redis_data_loss(cluster_settings, cluster_redis, pool)


async def test_benefits_on_every_primary_are_claimed_and_persisted(
    cluster_settings: Settings, cluster_redis: Redis, pool: asyncpg.Pool
) -> None:
    """Benefits whose keys sit on different primaries: each decides its own claims in its
    slot (tiers passed from the snapshot's slot), and one writer persists every stream."""
    ids = [f"b{i}" for i in range(6)]
    cluster = cast(RedisCluster, cluster_redis)
    nodes = {str(cluster.get_node_from_key(BenefitKeys(b).stream)) for b in ids}
    assert len(nodes) == 3, "the benefits are spread over the three primaries"
    period = periods.current_period(cluster_settings.tz)
    for benefit_id in ids:
        benefit = parse_benefit(benefit_id, benefit_body(stock=20, quota=1), cluster_settings.tz)
        saved = await catalogue_store.save_benefit(pool, benefit)
        await catalogue_store.push_benefit(cluster_redis, saved)
    await save_tiers(pool, cluster_redis, period, [(f"m{i}", 5) for i in range(30)] + [("low", 1)])
    engine = ClaimEngine(cluster_redis, cluster_settings, pool=pool)
    requests = [ClaimRequest(b, f"m{i}", "r", "iqiyi") for b in ids for i in range(30)]
    requests += [ClaimRequest(b, "low", "r", "iqiyi") for b in ids]
    decisions = await asyncio.gather(*(engine.claim(r) for r in requests))
    codes = Counter((r.benefit_id, d.code) for r, d in zip(requests, decisions, strict=True))
    for benefit_id in ids:
        assert codes[(benefit_id, "ok")] == 20
        assert codes[(benefit_id, "sold_out")] == 10
        assert codes[(benefit_id, "tier")] == 1
    await drain(ClaimWriter(cluster_redis, pool, fast(cluster_settings)))
    rows = await pool.fetch("SELECT benefit_id, count(*) AS n FROM claims GROUP BY 1")
    assert {r["benefit_id"]: r["n"] for r in rows} == dict.fromkeys(ids, 20)
    for benefit_id in ids:
        assert await cluster_redis.xlen(BenefitKeys(benefit_id).stream) == 0


async def test_what_a_cluster_cannot_serve_yet_is_refused_clearly(
    cluster_settings: Settings, cluster_redis: Redis, pool: asyncpg.Pool
) -> None:
    body = {**benefit_body(stock=5), "price_points": 1}
    saved = await catalogue_store.save_benefit(
        pool, parse_benefit("priced", body, cluster_settings.tz)
    )
    await catalogue_store.push_benefit(cluster_redis, saved)
    engine = ClaimEngine(cluster_redis, cluster_settings, pool=pool)
    with pytest.raises(BackendUnavailable, match="priced in points"):
        await engine.claim(ClaimRequest("priced", "m1", "r", "iqiyi"))
    # Every primary must honour a durability mode: these have no AOF.
    with pytest.raises(ConfigError, match="appendonly no"):
        await check_server(cluster_redis, replace(cluster_settings, durability="local"))


async def test_the_dashboard_follows_a_release_on_a_cluster(
    cluster_client: Client, cluster_settings: Settings
) -> None:
    board = cluster_client.admin_app  # type: ignore[attr-defined]
    board[DASHBOARD].tick_s = board[DASHBOARD].pg_every_s = 0.25
    await td.release(cluster_client, cluster_settings)
    async with td.watching(cluster_client, cluster_settings) as feed:
        await feed.until(lambda s: any(b["benefit_id"] == td.BENEFIT for b in s["benefits"]))
        statuses = await asyncio.gather(
            *(td.claim(cluster_client, cluster_settings, f"u{i}", "r") for i in range(td.MEMBERS))
        )
        assert sorted(statuses) == [202] * td.STOCK + [410] * (td.MEMBERS - td.STOCK)
        after = await feed.until(lambda s: td.benefit(s)["left"] == 0)
        row = td.benefit(after)
        assert (row["accepted"], row["taken"], row["phase"]) == (td.STOCK, td.STOCK, "sold_out")
        assert row["live"] and row["backlog"] == td.STOCK
