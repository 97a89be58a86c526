"""Unknown partner outcomes: a timeout or an outage is never taken for a failure.

A timed-out order may well have been charged. Only the partner's status query saying
``failed`` or ``not_found`` lets a claim fail and be refunded; silence keeps it waiting,
visibly; a success reported after a refund is an anomaly for ops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.fulfilment.compensation import _refund_in_redis, sweep_refunds
from claim_service.fulfilment.partners import order_body
from claim_service.fulfilment.signing import IDEMPOTENCY_HEADER, signed_headers
from claim_service.fulfilment.worker import FulfilmentWorker
from claim_service.local.partner_sim import PartnerSimulator
from claim_service.store.keyspace import BenefitKeys
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


async def claim_again(client: Client, settings: Settings, i: int) -> tuple[int, dict[str, Any]]:
    resp = await client.post(
        "/v1/benefits/video/claims",
        headers=auth(settings, f"u{i}"),
        json={"request_id": "again", "option_id": "iqiyi", "account": f"1380000{i:04d}"},
    )
    return resp.status, await resp.json()


async def claim_view(client: Client, settings: Settings, claim_id: str) -> dict[str, Any]:
    resp = await client.get(f"/admin/v1/claims/{claim_id}", headers=admin(settings))
    assert resp.status == 200
    view: dict[str, Any] = await resp.json()
    return view


async def anomalies(client: Client, settings: Settings) -> dict[str, Any]:
    resp = await client.get("/admin/v1/anomalies", headers=admin(settings))
    assert resp.status == 200
    listed: dict[str, Any] = await resp.json()
    return listed


async def callback(client: Client, claim_id: str, status: str, ref: str = "LATE-1") -> str:
    body = orjson.dumps({"order_id": claim_id, "status": status, "partner_ref": ref})
    resp = await client.post(
        "/v1/partners/sim/callbacks", data=body, headers=signed_headers(SECRET, body)
    )
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["status"])


async def units_taken(settings: Settings, redis: Redis) -> int:
    period = periods.current_period(settings.tz)
    return int(await redis.hget(BenefitKeys("video").stock(period), "taken") or 0)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def one_round(worker: FulfilmentWorker) -> None:
    """Let ``worker`` lease the claim as soon as it is due, and finish with it."""

    async def leased() -> bool:
        return await worker.tick() > 0

    await eventually(leased)
    await worker.drain()


async def assert_no_refunded_claim_was_charged(pool: asyncpg.Pool, sim: PartnerSimulator) -> None:
    refunded = {
        r["claim_id"]
        for r in await pool.fetch("SELECT claim_id FROM claims WHERE status = 'refunded'")
    }
    charged = {o.order_id for o in sim.orders.values() if o.times_charged}
    assert not refunded & charged, "a claim was refunded although the partner charged it"
    assert sim.stats()["double_charged"] == 0


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
async def test_timed_out_orders_are_never_refunded_when_charged_nor_charged_beyond_quota(
    client: Client,
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    sim: PartnerSimulator,
    max_attempts: int,
) -> None:
    # Every order the partner takes is charged, then its answer comes too late; 30% of the
    # requests (orders and status queries alike) meet a 500 and nothing is recorded.
    sim.config = replace(sim.config, timeout_rate=1.0, timeout_delay_s=0.4, failure_rate=0.3)
    members = 40
    await setup_partner(
        client,
        settings,
        sim,
        members=members,
        stock=2 * members,
        max_attempts=max_attempts,
        timeout_s=0.1,
    )
    assert len(await claim_all(client, settings, members)) == members
    await run_until_final(quick(settings), redis, pool)
    await assert_no_refunded_claim_was_charged(pool, sim)
    assert sim.stats()["timeouts_injected"] > 0

    # Each member claims again once the first claim settled (quota 1 per period).
    first = {r["user_id"]: r["status"] for r in await pool.fetch("SELECT * FROM claims")}
    again = await asyncio.gather(*(claim_again(client, settings, i) for i in range(members)))
    for i, (status, body) in enumerate(again):
        if first[f"u{i}"] == "fulfilled":
            assert (status, body["error"]) == (409, "quota_exceeded")
        else:  # the partner never got it: the unit and quota came back
            assert status == 202
    await run_until_final(quick(settings), redis, pool)
    await assert_no_refunded_claim_was_charged(pool, sim)
    charges = Counter[str]()
    for order in sim.orders.values():
        charges[order.account] += order.times_charged
    assert max(charges.values()) == 1, "no member charged beyond the quota"
    await assert_units_returned_once(settings, redis, pool)


async def test_reported_case_timed_out_charge_is_kept_and_the_member_cannot_claim_twice(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, timeout_rate=1.0, timeout_delay_s=0.5)
    await setup_partner(client, settings, sim, members=1, stock=5, max_attempts=1, timeout_s=0.1)
    (claim_id,) = await claim_all(client, settings, 1)
    await run_until_final(quick(settings), redis, pool)

    assert (await claim_view(client, settings, claim_id))["status"] == "fulfilled"
    status, body = await claim_again(client, settings, 0)
    assert (status, body["error"]) == (409, "quota_exceeded")
    assert (sim.stats()["charged"], sim.stats()["double_charged"]) == (1, 0)
    assert await units_taken(settings, redis) == 1


async def test_silent_partner_keeps_the_claim_waiting_visibly_until_it_answers(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, timeout_rate=1.0, timeout_delay_s=0.5)
    await setup_partner(client, settings, sim, members=1, stock=1, max_attempts=1, timeout_s=0.1)
    (claim_id,) = await claim_all(client, settings, 1)
    await drain(ClaimWriter(redis, pool, fast(settings)))
    worker = FulfilmentWorker(pool, redis, quick(settings))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        # The partner charges the order, then goes down before anyone asks about it.
        async def order_taken() -> bool:
            return claim_id in sim.orders

        await eventually(order_taken)
        sim.config = replace(sim.config, failure_rate=1.0)

        async def asked_three_times_or_settled() -> bool:
            unanswered = sim.stats()["failures_injected"]
            return (
                unanswered >= 3 or await pool.fetchval("SELECT status FROM claims") != "fulfilling"
            )

        await eventually(asked_three_times_or_settled)
        view = await claim_view(client, settings, claim_id)
        reasons = [e["reason"] for e in view["events"]]
        assert view["status"] == "fulfilling"
        assert reasons.count("outcome_unknown") == 1
        assert not any(e["to"] in ("failed", "refunded") for e in view["events"])
        assert await pool.fetchval("SELECT outcome_unknown_since IS NOT NULL FROM claims")
        assert await units_taken(settings, redis) == 1
        assert await worker.count_unknown_outcomes() == 1
        assert REGISTRY.get_sample_value("claim_outcome_unknown") == 1

        # The partner is back: asked again, it says the order was charged.
        sim.config = replace(sim.config, failure_rate=0.0)

        async def fulfilled() -> bool:
            return bool(await pool.fetchval("SELECT status FROM claims") == "fulfilled")

        await eventually(fulfilled)
    finally:
        stop.set()
        await task
    assert await pool.fetchval("SELECT outcome_unknown_since FROM claims") is None
    assert await worker.count_unknown_outcomes() == 0
    assert REGISTRY.get_sample_value("claim_outcome_unknown") == 0
    assert sim.orders[claim_id].times_charged == 1
    assert sim.stats()["duplicates_received"] == 0, "never resent after its attempts were spent"
    assert await units_taken(settings, redis) == 1


async def test_order_the_partner_never_received_is_refunded_exactly_once(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, failure_rate=1.0)
    await setup_partner(client, settings, sim, members=1, stock=1, max_attempts=2)
    (claim_id,) = await claim_all(client, settings, 1)
    await drain(ClaimWriter(redis, pool, fast(settings)))
    worker = FulfilmentWorker(pool, redis, quick(settings))
    await one_round(worker)  # 500
    await one_round(worker)  # 500 again: the attempts are spent
    assert await pool.fetchval("SELECT status FROM claims") == "fulfilling"
    sim.config = replace(sim.config, failure_rate=0.0)
    await one_round(worker)  # the status query: not_found
    for _ in range(3):  # later sweeps find nothing more to refund
        await sweep_refunds(pool, redis)

    view = await claim_view(client, settings, claim_id)
    assert (view["status"], view["failure_reason"]) == ("refunded", "order_not_found")
    assert [e["to"] for e in view["events"]].count("refunded") == 1
    assert (sim.stats()["requests"], sim.stats()["orders"]) == (2, 0)
    await assert_units_returned_once(settings, redis, pool)
    assert await units_taken(settings, redis) == 0
    assert (await claim_again(client, settings, 0))[0] == 202


async def test_lowered_max_attempts_sends_a_waiting_claim_to_the_status_query_not_a_resend(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, timeout_rate=1.0, timeout_delay_s=0.5)
    await setup_partner(client, settings, sim, members=1, stock=1, max_attempts=5, timeout_s=0.1)
    (claim_id,) = await claim_all(client, settings, 1)
    await drain(ClaimWriter(redis, pool, fast(settings)))
    await one_round(FulfilmentWorker(pool, redis, quick(settings)))  # charged, timed out
    # Ops lower max_attempts below the sends already made; the partner is healthy again.
    partner = await (await client.get("/admin/v1/partners/sim", headers=admin(settings))).json()
    partner.update(secret=SECRET, max_attempts=1)
    resp = await client.put("/admin/v1/partners/sim", json=partner, headers=admin(settings))
    assert resp.status == 200
    sim.config = replace(sim.config, timeout_rate=0.0)
    await one_round(FulfilmentWorker(pool, redis, quick(settings)))

    view = await claim_view(client, settings, claim_id)
    assert view["status"] == "fulfilled"
    assert "partner_status_success" in [e["reason"] for e in view["events"]]
    assert (sim.stats()["requests"], sim.stats()["duplicates_received"]) == (1, 0)


async def test_order_the_partner_reports_failed_when_asked_is_refunded(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, failure_rate=1.0)
    await setup_partner(client, settings, sim, members=1, stock=1, max_attempts=1)
    (claim_id,) = await claim_all(client, settings, 1)
    await drain(ClaimWriter(redis, pool, fast(settings)))
    worker = FulfilmentWorker(pool, redis, quick(settings))
    await one_round(worker)  # a 500 from the partner's gateway: attempts spent
    # Its backend had received the order nonetheless, and turned it down.
    sim.config = replace(sim.config, failure_rate=0.0, reject_rate=1.0)
    row = await pool.fetchrow("SELECT * FROM claims")
    assert row is not None
    body = order_body(claim_id, "IQY", row["account"], row["created_at"].isoformat())
    headers = {**signed_headers(SECRET, body), IDEMPOTENCY_HEADER: claim_id}
    assert sim.url is not None
    async with client.session.post(f"{sim.url}/orders", data=body, headers=headers) as resp:
        assert (await resp.json())["status"] == "failed"
    await one_round(worker)  # the status query: failed

    view = await claim_view(client, settings, claim_id)
    assert (view["status"], view["failure_reason"]) == ("refunded", "account_not_found")
    assert sim.stats()["charged"] == 0
    await assert_units_returned_once(settings, redis, pool)


async def test_success_reported_after_the_refund_is_one_anomaly_however_often_it_comes(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, reject_rate=1.0)
    await setup_partner(client, settings, sim, members=1, stock=1)
    (claim_id,) = await claim_all(client, settings, 1)
    await run_until_final(quick(settings), redis, pool)
    assert (await anomalies(client, settings))["total"] == 0

    for _ in range(3):
        assert await callback(client, claim_id, "success") == "refunded"
    listed = await anomalies(client, settings)
    assert listed["counts"] == {"late_partner_success": 1}
    assert [a["claim_id"] for a in listed["anomalies"]] == [claim_id]
    reasons = [e["reason"] for e in (await claim_view(client, settings, claim_id))["events"]]
    assert reasons.count("late_partner_success") == 1
    await assert_units_returned_once(settings, redis, pool)


async def test_success_for_a_failed_claim_not_yet_refunded_fulfils_it(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, reject_rate=1.0)
    await setup_partner(client, settings, sim, members=1, stock=1, on_failure="hold")
    (claim_id,) = await claim_all(client, settings, 1)
    await run_until_final(quick(settings), redis, pool)
    assert await pool.fetchval("SELECT status FROM claims") == "failed"

    assert await callback(client, claim_id, "success") == "fulfilled"
    assert await callback(client, claim_id, "success") == "fulfilled"
    resp = await client.post(f"/admin/v1/claims/{claim_id}/refund", headers=admin(settings))
    assert resp.status == 409 and (await resp.json())["error"] == "not_failed"
    view = await claim_view(client, settings, claim_id)
    assert (view["status"], view["partner_ref"], view["failure_reason"]) == (
        "fulfilled",
        "LATE-1",
        None,
    )
    assert (await anomalies(client, settings))["total"] == 0
    assert await units_taken(settings, redis) == 1


async def test_success_racing_the_refund_sweep_fulfils_or_is_an_anomaly_never_both(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, reject_rate=1.0)
    await setup_partner(client, settings, sim, members=30, stock=30, on_failure="hold")
    claims = await claim_all(client, settings, 30)
    await run_until_final(quick(settings), redis, pool)
    # Ops switch the benefit to automatic refunds while the partner's late successes arrive.
    body = await (await client.get("/admin/v1/benefits/video", headers=admin(settings))).json()
    body["on_failure"] = "refund"
    body.pop("stock", None)
    resp = await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    assert resp.status == 200
    await asyncio.gather(
        sweep_refunds(pool, redis),
        sweep_refunds(pool, redis),
        *(callback(client, claim_id, "success") for claim_id in claims),
    )

    status = {r["claim_id"]: r["status"] for r in await pool.fetch("SELECT * FROM claims")}
    assert set(status.values()) <= {"fulfilled", "refunded"}
    refunded = {c for c, s in status.items() if s == "refunded"}
    listed = await anomalies(client, settings)
    assert {a["claim_id"] for a in listed["anomalies"]} == refunded
    await assert_units_returned_once(settings, redis, pool)
    assert await units_taken(settings, redis) == 30 - len(refunded)


async def test_success_after_a_refund_interrupted_by_a_crash_lets_the_refund_stand(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, sim: PartnerSimulator
) -> None:
    sim.config = replace(sim.config, reject_rate=1.0)
    await setup_partner(client, settings, sim, members=1, stock=1, on_failure="hold")
    (claim_id,) = await claim_all(client, settings, 1)
    await run_until_final(quick(settings), redis, pool)
    # A refund got as far as Redis (unit and quota back), then the process died.
    row = await pool.fetchrow(
        """SELECT c.*, o.kind FROM claims c JOIN benefit_options o
           USING (benefit_id, option_id) WHERE claim_id = $1""",
        claim_id,
    )
    assert row is not None and (await _refund_in_redis(redis, row, ""))[0]

    assert await callback(client, claim_id, "success") == "refunded"
    assert (await anomalies(client, settings))["counts"] == {"late_partner_success": 1}
    await assert_units_returned_once(settings, redis, pool)


async def test_worker_and_callbacks_reporting_the_same_success_log_no_error(
    client: Client,
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    sim: PartnerSimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Processing orders complete within milliseconds and are reported up to three times at
    # once, while the worker keeps asking (409 with the current status) without pause.
    sim.config = replace(
        sim.config,
        processing_rate=1.0,
        callback_delay_ms=5,
        duplicate_callback_rate=1.0,
        callback_base=callback_base(client),
    )
    await setup_partner(client, settings, sim, members=40, stock=40)
    claims = await claim_all(client, settings, 40)
    caplog.set_level(logging.INFO)
    await run_until_final(replace(quick(settings), fulfil_processing_recheck_s=0), redis, pool)

    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("claim_service")
    ]
    assert errors == []
    assert sim.stats()["duplicate_callbacks"] > 0
    assert (await anomalies(client, settings))["total"] == 0
    rows = await pool.fetch("SELECT status FROM claims")
    assert [r["status"] for r in rows] == ["fulfilled"] * len(claims)
    fulfilments = await pool.fetchval(
        "SELECT count(*) FROM claim_events WHERE to_status = 'fulfilled'"
    )
    assert fulfilments == len(claims), "each claim fulfilled once"
    assert (sim.stats()["charged"], sim.stats()["double_charged"]) == (len(claims), 0)
