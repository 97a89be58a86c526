"""A claim reads the same wherever it is: in the Redis hand-off or in PostgreSQL."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from tests.helpers import admin, auth, benefit_body, drain, fast

Client = TestClient[Any, Any]
# ISO 8601 in the service time zone (Asia/Shanghai in the tests), to the millisecond
SERVICE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+08:00\Z")


async def test_created_at_reads_the_same_before_and_after_the_writer(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    assert settings.timezone == "Asia/Shanghai"
    resp = await client.put(
        "/admin/v1/benefits/video", json=benefit_body(), headers=admin(settings)
    )
    assert resp.status == 201
    period = periods.current_period(settings.tz)
    resp = await client.put(
        f"/admin/v1/tiers/{period}", json=[{"user_id": "m1", "tier": 5}], headers=admin(settings)
    )
    assert resp.status == 200
    member = auth(settings, "m1")
    resp = await client.post(
        "/v1/benefits/video/claims",
        json={"request_id": "r", "option_id": "iqiyi"},
        headers=member,
    )
    assert resp.status == 202
    accepted = await resp.json()
    created_at = accepted["created_at"]
    assert SERVICE_TIME.match(created_at), created_at

    # Still in the Redis hand-off
    pending = await (await client.get(f"/v1/claims/{accepted['claim_id']}", headers=member)).json()
    assert pending["created_at"] == created_at
    assert not await pool.fetchval("SELECT count(*) FROM claims")

    # In PostgreSQL now
    await drain(ClaimWriter(redis, pool, fast(settings)))
    assert await pool.fetchval("SELECT count(*) FROM claims") == 1
    stored = await (await client.get(f"/v1/claims/{accepted['claim_id']}", headers=member)).json()
    assert stored["created_at"] == created_at
    assert SERVICE_TIME.match(stored["updated_at"]), stored
    (listed,) = (await (await client.get("/v1/me/claims", headers=member)).json())["claims"]
    assert listed["created_at"] == created_at
    ops = await client.get(f"/admin/v1/claims/{accepted['claim_id']}", headers=admin(settings))
    assert (await ops.json())["created_at"] == created_at
