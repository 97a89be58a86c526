"""Direct charge against the partner simulator: flaky partners, callbacks, exactly once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import asyncpg
import orjson
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.fulfilment.compensation import _refund_in_redis
from claim_service.fulfilment.signing import signed_headers
from claim_service.fulfilment.worker import FulfilmentWorker
from claim_service.local.partner_sim import PartnerSimulator
from claim_service.store.keyspace import BenefitKeys
from claim_service.store.partner_health import breaker_states, read_breakers
from tests.helpers import (
    SECRET,
    admin,
    assert_units_returned_once,
    auth,
    callback_base,
    claim_all,
    drain,
    fast,
    quick,
    run_until_final,
    setup_partner,
)

Client = TestClient[Any, Any]
FINAL = ("fulfilled", "refunded")


async def test_flaky_partner_every_claim_ends_final_and_nothing_is_charged_twice(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(
        sim.config,
        failure_rate=0.3,
        timeout_rate=0.3,
        timeout_delay_s=0.6,
        # Timeouts end fulfilled (the status query finds the charge); rejections are what
        # refunds: ~7% of new orders, so that 120 claims always see some.
        reject_rate=0.15,
        processing_rate=0.3,
        callback_delay_ms=30,
        duplicate_callback_rate=0.6,  # of ~15 processing orders: some are always repeated
        callback_base=callback_base(client),
        partner_id="sim",
    )
    await setup_partner(client, settings, sim, members=120, stock=150)
    claims = await claim_all(client, settings, 120)
    assert len(claims) == 120
    await run_until_final(quick(settings), redis, pool)

    rows = await pool.fetch("SELECT claim_id, status, failure_reason FROM claims")
    statuses = Counter(r["status"] for r in rows)
    assert set(statuses) <= set(FINAL), statuses
    assert statuses["fulfilled"] > 0 and statuses["refunded"] > 0
    stats = sim.stats()
    assert stats["double_charged"] == 0
    assert stats["failures_injected"] > 0 and stats["timeouts_injected"] > 0
    assert stats["duplicate_callbacks"] > 0 and stats["bad_signatures"] == 0
    charged = {o.order_id for o in sim.orders.values() if o.times_charged}
    fulfilled = {r["claim_id"] for r in rows if r["status"] == "fulfilled"}
    assert charged == fulfilled, "exactly the fulfilled claims were charged, once each"
    assert all(r["failure_reason"] for r in rows if r["status"] == "refunded")
    await assert_units_returned_once(settings, redis, pool)


async def test_held_failures_wait_for_ops_then_retry(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, failure_rate=1.0)
    await setup_partner(
        client, settings, sim, members=3, stock=3, on_failure="hold", max_attempts=2
    )
    claims = await claim_all(client, settings, 3)
    # In an outage nobody can tell whether the orders were charged: they wait, not fail.
    await run_until_final(quick(settings), redis, pool, waiting_ok=True)
    rows = await pool.fetch("SELECT status, outcome_unknown_since FROM claims")
    assert {r["status"] for r in rows} == {"fulfilling"}
    assert all(r["outcome_unknown_since"] is not None for r in rows)
    # Back up, the partner says it never received them: now they fail, and are held.
    sim.config = replace(sim.config, failure_rate=0.0)
    await run_until_final(quick(settings), redis, pool)
    rows = await pool.fetch("SELECT status, failure_reason, outcome_unknown_since FROM claims")
    assert {(r["status"], r["failure_reason"]) for r in rows} == {("failed", "order_not_found")}
    assert all(r["outcome_unknown_since"] is None for r in rows)
    assert (sim.stats()["charged"], sim.stats()["orders"]) == (0, 0)
    # Still held: the unit is not back.
    period = periods.current_period(settings.tz)
    assert int(await redis.hget(BenefitKeys("video").stock(period), "taken") or 0) == 3

    sim.config = replace(sim.config, failure_rate=0.0)
    resp = await client.post(f"/admin/v1/claims/{claims[0]}/retry", headers=admin(settings))
    assert resp.status == 200 and (await resp.json())["status"] == "accepted"
    resp = await client.post(f"/admin/v1/claims/{claims[1]}/refund", headers=admin(settings))
    assert resp.status == 200
    await run_until_final(quick(settings), redis, pool)
    status = {r["claim_id"]: r["status"] for r in await pool.fetch("SELECT * FROM claims")}
    assert status[claims[0]] == "fulfilled"
    assert status[claims[1]] == "refunded"
    assert status[claims[2]] == "failed"
    again = await client.post(f"/admin/v1/claims/{claims[1]}/retry", headers=admin(settings))
    assert again.status == 409 and (await again.json())["error"] == "already_refunded"
    twice = await client.post(f"/admin/v1/claims/{claims[1]}/refund", headers=admin(settings))
    assert twice.status == 409
    assert int(await redis.hget(BenefitKeys("video").stock(period), "taken") or 0) == 2
    trail = await (
        await client.get(f"/admin/v1/claims/{claims[0]}", headers=admin(settings))
    ).json()
    reasons = [e["reason"] for e in trail["events"]]
    assert reasons[0] == "claimed" and "ops_retry" in reasons and reasons[-1] == "partner_success"


async def test_circuit_breaker_stops_hammering_and_recovers(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, failure_rate=1.0)
    await setup_partner(client, settings, sim, members=30, stock=30, max_attempts=50)
    await claim_all(client, settings, 30)
    await drain(ClaimWriter(redis, pool, fast(settings)))
    cfg = replace(quick(settings), breaker_threshold=3, breaker_cooldown_ms=400)
    stop = asyncio.Event()
    task = asyncio.create_task(FulfilmentWorker(pool, redis, cfg).run(stop))
    try:
        await asyncio.sleep(0.5)  # the first wave (all 30 sent at once) fails and opens it
        first_wave = sim.stats()["requests"]
        await asyncio.sleep(1.5)
        # 30 claims retried every <=150 ms would be ~300 calls in 1.5 s; open, only probes go.
        assert sim.stats()["requests"] - first_wave <= 6
        # The worker tells watchers (the dashboard) its breaker is open.
        states = breaker_states(await read_breakers(redis), int(time.time() * 1000))
        assert states["sim"] in ("open", "half_open")
        sim.config = replace(sim.config, failure_rate=0.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if await pool.fetchval("SELECT count(*) FROM claims WHERE status = 'fulfilled'") == 30:
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
    assert await pool.fetchval("SELECT count(*) FROM claims WHERE status = 'fulfilled'") == 30
    assert sim.stats()["double_charged"] == 0
    await asyncio.sleep(0.1)  # the last report is sent in the background
    states = breaker_states(await read_breakers(redis), int(time.time() * 1000))
    assert states["sim"] == "closed"


async def _sent_order(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> str:
    sim.config = replace(sim.config, processing_rate=1.0, callback_base=None)
    await setup_partner(client, settings, sim, members=1, stock=1)
    (claim_id,) = await claim_all(client, settings, 1)
    await drain(ClaimWriter(redis, pool, fast(settings)))
    worker = FulfilmentWorker(pool, redis, quick(settings))
    await worker.tick()
    await worker.drain()
    assert await pool.fetchval("SELECT status FROM claims") == "fulfilling"
    return claim_id


async def test_callbacks_are_signed_fresh_and_idempotent(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    claim_id = await _sent_order(client, settings, redis, pool, sim)
    url = "/v1/partners/sim/callbacks"
    body = orjson.dumps({"order_id": claim_id, "status": "success", "partner_ref": "P-1"})

    bad = await client.post(url, data=body, headers=signed_headers("wrong-secret-xxxxxxxx", body))
    assert bad.status == 401 and (await bad.json())["error"] == "unauthorized"
    stale = await client.post(
        url, data=body, headers=signed_headers(SECRET, body, now=time.time() - 301)
    )
    assert stale.status == 401
    future = await client.post(
        url, data=body, headers=signed_headers(SECRET, body, now=time.time() + 400)
    )
    assert future.status == 401
    tampered = signed_headers(SECRET, body)
    other = body.replace(b"success", b"failed")
    assert (await client.post(url, data=other, headers=tampered)).status == 401
    unsigned = await client.post(url, data=body)
    assert unsigned.status == 401
    stranger = await client.post(
        "/v1/partners/nobody/callbacks", data=body, headers=signed_headers(SECRET, body)
    )
    assert stranger.status == 401
    unknown = orjson.dumps({"order_id": "0" * 32, "status": "success"})
    missing = await client.post(url, data=unknown, headers=signed_headers(SECRET, unknown))
    assert missing.status == 404 and (await missing.json())["error"] == "unknown_order"
    assert await pool.fetchval("SELECT status FROM claims") == "fulfilling"

    headers = signed_headers(SECRET, body)
    for _ in range(3):  # a replayed callback is harmless
        ok = await client.post(url, data=body, headers=headers)
        assert ok.status == 200 and (await ok.json())["status"] == "fulfilled"
    assert (
        await pool.fetchval("SELECT count(*) FROM claim_events WHERE to_status = 'fulfilled'") == 1
    )
    late_failure = orjson.dumps({"order_id": claim_id, "status": "failed", "reason": "x"})
    resp = await client.post(url, data=late_failure, headers=signed_headers(SECRET, late_failure))
    assert resp.status == 200 and (await resp.json())["status"] == "fulfilled"
    assert await pool.fetchval("SELECT partner_ref FROM claims") == "P-1"


async def test_failed_callback_refunds_once(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    claim_id = await _sent_order(client, settings, redis, pool, sim)
    body = orjson.dumps({"order_id": claim_id, "status": "failed", "reason": "no_account"})
    for _ in range(2):
        resp = await client.post(
            "/v1/partners/sim/callbacks", data=body, headers=signed_headers(SECRET, body)
        )
        assert resp.status == 200 and (await resp.json())["status"] == "refunded"
    await assert_units_returned_once(settings, redis, pool)
    # The member can claim again with a new request.
    resp = await client.post(
        "/v1/benefits/video/claims",
        headers=auth(settings, "u0"),
        json={"request_id": "second", "option_id": "iqiyi"},
    )
    assert resp.status == 202


async def test_ops_retry_finishes_a_refund_interrupted_by_a_crash(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, reject_rate=1.0)
    await setup_partner(
        client, settings, sim, members=1, stock=1, on_failure="hold", max_attempts=1
    )
    (claim_id,) = await claim_all(client, settings, 1)
    await run_until_final(quick(settings), redis, pool)
    assert await pool.fetchval("SELECT status FROM claims") == "failed"
    # A refund got as far as Redis, then the process died before PostgreSQL committed.
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT c.*, o.kind FROM claims c JOIN benefit_options o
               USING (benefit_id, option_id) WHERE claim_id = $1""",
            claim_id,
        )
    assert row is not None
    assert (await _refund_in_redis(redis, row, ""))[0]
    resp = await client.post(f"/admin/v1/claims/{claim_id}/retry", headers=admin(settings))
    assert resp.status == 409 and (await resp.json())["error"] == "already_refunded"
    assert await pool.fetchval("SELECT status FROM claims") == "refunded"
    await assert_units_returned_once(settings, redis, pool)
