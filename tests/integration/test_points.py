"""Points over HTTP: crediting by tier once, spending in the claim's own atomic step,
refunds to the lots they came from, expiry, adjustments, and the mirror matching the ledger."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.lifecycle import FAILED
from claim_service.fulfilment.compensation import refund
from claim_service.store.claim_states import transition
from claim_service.store.keyspace import POINTS_KEY, POINTS_LIVE_KEY, Scripts, text
from claim_service.store.points_mirror import ensure_points, points_drift
from tests.helpers import admin, auth, benefit_body, direct, drain, fast

Client = TestClient[Any, Any]


def priced_body(price: int, *, stock: int = 1000, quota: int = 50) -> dict[str, Any]:
    body = benefit_body(stock=stock, min_tier=12, quota=[{"min_tier": 12, "per_period": quota}])
    body["options"] = [direct("lounge"), direct("golf", price_points=price + 1)]
    body["price_points"] = price
    return body


async def setup(client: Client, settings: Settings, members: dict[str, int]) -> str:
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": u, "tier": t} for u, t in members.items()]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))
    assert resp.status == 200, await resp.text()
    rules = {"rules": [{"min_tier": 12, "points": 1, "expires_after_periods": 12}]}
    resp = await client.put("/admin/v1/points/rules", json=rules, headers=admin(settings))
    assert resp.status == 200, await resp.text()
    resp = await client.put(
        "/admin/v1/benefits/lounge", json=priced_body(1), headers=admin(settings)
    )
    assert resp.status == 201, await resp.text()
    return period


async def give(client: Client, settings: Settings, user: str, amount: int, ref: str) -> Any:
    resp = await client.post(
        f"/admin/v1/points/{user}/adjust",
        json={"amount": amount, "reason": "goodwill", "reference": ref},
        headers=admin(settings),
    )
    return resp.status, await resp.json()


async def my_points(client: Client, settings: Settings, user: str) -> dict[str, Any]:
    resp = await client.get("/v1/me/points", headers=auth(settings, user))
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def test_credit_points_credits_each_eligible_member_once_and_shows_the_lot(
    client: Client, settings: Settings
) -> None:
    period = await setup(client, settings, {"vip": 12, "top": 14, "low": 4})
    first = await client.post(
        "/admin/v1/points/credit", json={"period": period}, headers=admin(settings)
    )
    assert first.status == 200
    report = await first.json()
    assert (report["members"], report["eligible"], report["credited"]) == (3, 2, 2)
    assert (report["points"], report["mirrored"]) == (2, 2)
    again = await (
        await client.post(
            "/admin/v1/points/credit", json={"period": period}, headers=admin(settings)
        )
    ).json()
    assert (again["credited"], again["already_credited"], again["points"]) == (0, 2, 0)

    view = await my_points(client, settings, "vip")
    assert (view["balance"], view["available"]) == (1, 1)
    [lot] = view["lots"]
    later = period
    for _ in range(12):
        later = periods.next_period(later)
    expires = periods.period_start(later, settings.tz)
    assert datetime.fromisoformat(lot["expires_at"]) == expires
    assert view["next_expiry"] == {"expires_at": lot["expires_at"], "points": 1}
    assert [e["kind"] for e in view["entries"]] == ["credit"]
    low = await my_points(client, settings, "low")
    assert (low["balance"], low["lots"]) == (0, [])


async def test_twenty_concurrent_claims_with_three_points_take_exactly_three(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await setup(client, settings, {"vip": 12})
    status, _ = await give(client, settings, "vip", 3, "welcome-vip")
    assert status == 201

    async def claim(i: int) -> tuple[int, dict[str, Any]]:
        resp = await client.post(
            "/v1/benefits/lounge/claims",
            json={"request_id": f"r{i}", "option_id": "lounge"},
            headers=auth(settings, "vip"),
        )
        return resp.status, await resp.json()

    answers = await asyncio.gather(*(claim(i) for i in range(20)))
    assert Counter(s for s, _ in answers) == {202: 3, 402: 17}
    refused = [b for s, b in answers if s == 402]
    assert all(b["error"] == "insufficient_points" for b in refused)
    assert all((b["balance"], b["price"]) == (0, 1) for b in refused)

    writer = ClaimWriter(redis, pool, fast(settings))
    await drain(writer)
    debits = await pool.fetch(
        "SELECT claim_id, amount FROM points_entries WHERE kind = 'debit' ORDER BY claim_id"
    )
    accepted = sorted(b["claim_id"] for s, b in answers if s == 202)
    assert [(r["claim_id"], r["amount"]) for r in debits] == [(c, -1) for c in accepted]
    view = await my_points(client, settings, "vip")
    assert (view["balance"], view["available"]) == (0, 0)
    assert await points_drift(pool, redis) == []


async def test_option_price_overrides_the_benefit_and_too_few_points_is_402(
    client: Client, settings: Settings
) -> None:
    await setup(client, settings, {"vip": 12})
    await give(client, settings, "vip", 1, "one")
    resp = await client.post(
        "/v1/benefits/lounge/claims",
        json={"request_id": "g", "option_id": "golf"},
        headers=auth(settings, "vip"),
    )
    assert resp.status == 402
    body = await resp.json()
    assert (body["error"], body["balance"], body["price"]) == ("insufficient_points", 1, 2)
    view = await my_points(client, settings, "vip")
    assert view["available"] == 1  # a refusal takes nothing


async def test_a_refund_returns_points_to_their_lots_once(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await setup(client, settings, {"vip": 12})
    soon = (datetime.now().astimezone() + timedelta(days=3)).isoformat()
    await give(client, settings, "vip", 1, "early")  # never expires
    resp = await client.post(
        "/admin/v1/points/vip/adjust",
        json={"amount": 2, "reason": "promo", "reference": "promo", "expires_at": soon},
        headers=admin(settings),
    )
    assert resp.status == 201, await resp.text()
    resp = await client.post(
        "/v1/benefits/lounge/claims",
        json={"request_id": "g", "option_id": "golf"},
        headers=auth(settings, "vip"),
    )
    assert resp.status == 202, await resp.text()
    claim_id = (await resp.json())["claim_id"]
    await drain(ClaimWriter(redis, pool, fast(settings)))
    # First expiring first: both points of the lot expiring in three days.
    taken = await pool.fetch(
        """SELECT e.reference, a.amount FROM points_allocations a
           JOIN points_entries e ON e.entry_id = a.lot_id
           JOIN points_entries d ON d.entry_id = a.entry_id WHERE d.kind = 'debit'"""
    )
    assert [(r["reference"], r["amount"]) for r in taken] == [("adjust:promo", -2)]
    async with pool.acquire() as conn:
        await transition(conn, claim_id, FAILED, "test", expect=("accepted",))
    assert await refund(pool, redis, claim_id)
    assert not await refund(pool, redis, claim_id)
    rows = await pool.fetch(
        "SELECT kind, amount FROM points_entries WHERE claim_id = $1 ORDER BY entry_id", claim_id
    )
    assert [(r["kind"], r["amount"]) for r in rows] == [("debit", -2), ("refund", 2)]
    view = await my_points(client, settings, "vip")
    assert (view["balance"], view["available"]) == (3, 3)
    assert {lot["remaining"] for lot in view["lots"]} == {1, 2}
    assert await points_drift(pool, redis) == []


async def test_expired_lots_are_spent_no_more_and_written_off(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await setup(client, settings, {"vip": 12})
    at = datetime.now().astimezone() + timedelta(seconds=1.5)
    resp = await client.post(
        "/admin/v1/points/vip/adjust",
        json={"amount": 2, "reason": "flash", "reference": "flash", "expires_at": at.isoformat()},
        headers=admin(settings),
    )
    assert resp.status == 201, await resp.text()
    await give(client, settings, "vip", 1, "keep")
    assert (await my_points(client, settings, "vip"))["next_expiry"]["points"] == 2
    await asyncio.sleep(max((at - datetime.now().astimezone()).total_seconds(), 0) + 0.2)
    resp = await client.post(
        "/v1/benefits/lounge/claims",
        json={"request_id": "g", "option_id": "golf"},
        headers=auth(settings, "vip"),
    )
    assert resp.status == 402 and (await resp.json())["balance"] == 1
    expired = await (await client.post("/admin/v1/points/expire", headers=admin(settings))).json()
    assert expired == {"expired": 2}
    again = await (await client.post("/admin/v1/points/expire", headers=admin(settings))).json()
    assert again == {"expired": 0}
    view = await my_points(client, settings, "vip")
    assert (view["balance"], view["available"]) == (1, 1)
    assert view["entries"][0]["kind"] == "expire" and view["entries"][0]["amount"] == -2
    assert view["next_expiry"] is None


async def test_adjustments_are_idempotent_by_reference_and_never_overdraw(
    client: Client, settings: Settings
) -> None:
    await setup(client, settings, {"vip": 12})
    assert (await give(client, settings, "vip", 5, "a1"))[0] == 201
    status, body = await give(client, settings, "vip", 5, "a1")
    assert status == 200 and body["replayed"] is True
    status, body = await give(client, settings, "vip", 4, "a1")
    assert status == 409 and body["error"] == "reference_conflict"
    status, body = await give(client, settings, "vip", -7, "take")
    assert status == 402 and (body["balance"], body["price"]) == (5, 7)
    assert (await give(client, settings, "vip", -3, "take"))[0] == 201
    assert (await give(client, settings, "vip", -3, "take"))[0] == 200
    view = await my_points(client, settings, "vip")
    assert (view["balance"], view["available"]) == (2, 2)
    ops = await client.get("/admin/v1/points/vip", headers=admin(settings))
    assert (await ops.json())["balance"] == 2


async def test_the_mirror_is_rebuilt_from_the_ledger_and_unrecorded_claims(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await setup(client, settings, {f"m{i}": 12 for i in range(10)})
    for i in range(10):
        await give(client, settings, f"m{i}", 2, f"g{i}")
    for i in range(10):
        resp = await client.post(
            "/v1/benefits/lounge/claims",
            json={"request_id": "x", "option_id": "lounge"},
            headers=auth(settings, f"m{i}"),
        )
        assert resp.status == 202
    writer = ClaimWriter(redis, pool, replace(fast(settings), writer_batch=4))
    await writer.step()  # some claims recorded, the rest still only in the stream
    before = await redis.hgetall(POINTS_KEY)
    assert len(before) == 10
    assert await ensure_points(pool, redis, force=True)
    assert await redis.hgetall(POINTS_KEY) == before
    await drain(writer)
    assert await points_drift(pool, redis) == []
    totals = await (await client.get("/admin/v1/points", headers=admin(settings))).json()
    assert (totals["adjusted"], totals["spent"], totals["outstanding"]) == (20, 10, 10)


async def test_points_refunded_to_a_lot_that_expired_meanwhile_are_written_off(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await setup(client, settings, {"vip": 12})
    at = datetime.now().astimezone() + timedelta(seconds=1.0)
    resp = await client.post(
        "/admin/v1/points/vip/adjust",
        json={"amount": 1, "reason": "flash", "reference": "flash", "expires_at": at.isoformat()},
        headers=admin(settings),
    )
    assert resp.status == 201
    await give(client, settings, "vip", 1, "keep")  # never expires: taken second
    resp = await client.post(
        "/v1/benefits/lounge/claims",
        json={"request_id": "a", "option_id": "lounge"},
        headers=auth(settings, "vip"),
    )
    assert resp.status == 202
    claim_id = (await resp.json())["claim_id"]
    await drain(ClaimWriter(redis, pool, fast(settings)))
    async with pool.acquire() as conn:
        await transition(conn, claim_id, FAILED, "test", expect=("accepted",))
    await asyncio.sleep(max((at - datetime.now().astimezone()).total_seconds(), 0) + 0.2)
    assert await refund(pool, redis, claim_id)
    rows = await pool.fetch(
        "SELECT kind, amount, reference FROM points_entries WHERE user_id = 'vip' ORDER BY entry_id"
    )
    assert [(r["kind"], r["amount"]) for r in rows][-3:] == [
        ("debit", -1),
        ("refund", 1),
        ("expire", -1),
    ]
    view = await my_points(client, settings, "vip")
    assert (view["balance"], view["available"]) == (1, 1)
    assert [lot["remaining"] for lot in view["lots"]] == [1]
    assert await points_drift(pool, redis) == []
    assert (
        await (await client.post("/admin/v1/points/expire", headers=admin(settings))).json()
    ) == {"expired": 0}


async def test_the_catalogue_shows_the_points_a_member_can_spend(
    client: Client, settings: Settings
) -> None:
    await setup(client, settings, {"vip": 12})

    async def listing() -> tuple[int, dict[str, Any]]:
        resp = await client.get("/v1/benefits", headers=auth(settings, "vip"))
        body = await resp.json()
        [lounge] = [b for b in body["benefits"] if b["benefit_id"] == "lounge"]
        return body["points"], lounge

    points, lounge = await listing()
    assert (points, lounge["can_claim"], lounge["reason"]) == (0, False, "insufficient_points")
    assert [o["price_points"] for o in lounge["options"]] == [1, 2]
    await give(client, settings, "vip", 1, "one")
    points, lounge = await listing()
    assert (points, lounge["can_claim"], lounge["reason"]) == (1, True, None)


async def test_a_mirror_redis_cannot_vouch_for_is_rebuilt_before_a_priced_claim(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await setup(client, settings, {"vip": 12})
    await give(client, settings, "vip", 1, "one")
    # A mirror that says more than the ledger: drift while live, and once Redis cannot vouch
    # for it (a restart, a failover), never spent: it is rebuilt first.
    lots = text(await redis.hget(POINTS_KEY, "vip"))
    await redis.hset(POINTS_KEY, "vip", lots.replace(":1:", ":5:"))
    [drift] = await points_drift(pool, redis)
    assert drift.user_id == "vip" and drift.expected.endswith(":1:0")
    await Scripts(redis).live(keys=[POINTS_LIVE_KEY], args=["clear"])

    async def claim(request_id: str) -> int:
        resp = await client.post(
            "/v1/benefits/lounge/claims",
            json={"request_id": request_id, "option_id": "lounge"},
            headers=auth(settings, "vip"),
        )
        return resp.status

    assert [await claim("a"), await claim("b")] == [202, 402]
    assert await points_drift(pool, redis) == []
