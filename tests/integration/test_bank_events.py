"""The bank's event intake (``POST /v1/events``, signed) and benefits that need an event:
a new-customer gift claimable only within N days of the member's account opening."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.fulfilment.signing import signed_headers
from claim_service.store.keyspace import BenefitKeys, events_key, events_live_key
from claim_service.store.recovery import Recovery
from tests.conftest import service_client
from tests.helpers import admin, auth, benefit_body, direct

Client = TestClient[Any, Any]
SECRET = "events-secret-for-tests-0123456789"


@pytest.fixture
async def bank(settings: Settings, redis: Redis, pool: asyncpg.Pool) -> AsyncIterator[Client]:
    async with service_client(replace(settings, events_secret=SECRET), redis, pool) as client:
        yield client


def event(event_id: str, user_id: str, days_ago: float, kind: str = "account_opened") -> bytes:
    occurred = datetime.now().astimezone() - timedelta(days=days_ago)
    body = {
        "event_id": event_id,
        "type": kind,
        "user_id": user_id,
        "occurred_at": occurred.isoformat(),
        "attrs": {"branch": "0371", "channel": "app"},
    }
    return orjson.dumps(body)


async def send(client: Client, body: bytes, secret: str = SECRET, now: float | None = None) -> Any:
    return await client.post("/v1/events", data=body, headers=signed_headers(secret, body, now))


async def test_events_are_stored_once_and_replays_change_nothing(
    bank: Client, pool: asyncpg.Pool, redis: Redis, settings: Settings
) -> None:
    body = event("ev-1", "m1", 3)
    first = await send(bank, body)
    assert first.status == 201, await first.text()
    assert (await first.json())["replayed"] is False
    again = await send(bank, body)
    assert again.status == 200 and (await again.json())["replayed"] is True
    other = await send(bank, event("ev-1", "m2", 3))
    assert other.status == 409 and (await other.json())["error"] == "event_id_reused"
    assert await pool.fetchval("SELECT count(*) FROM bank_events") == 1
    stored = await pool.fetchrow("SELECT user_id, type, attrs FROM bank_events")
    assert stored is not None
    assert stored["user_id"] == "m1" and orjson.loads(stored["attrs"])["branch"] == "0371"
    mirrored = await redis.hget(events_key("account_opened"), "m1")
    assert mirrored is not None
    assert abs(int(mirrored) - (time.time() - 3 * 86400) * 1000) < 60_000
    # An older account_opened of the same member never lowers the mirror, and a rebuild
    # from PostgreSQL (sub-millisecond times included) gives back the very same value.
    assert (await send(bank, event("ev-0", "m1", 40))).status == 201
    assert await redis.hget(events_key("account_opened"), "m1") == mirrored
    await redis.delete(events_key("account_opened"))
    await Recovery(pool, redis, settings).ensure_events("account_opened", force=True)
    assert await redis.hget(events_key("account_opened"), "m1") == mirrored


@pytest.mark.parametrize(
    ("mangle", "status"),
    [
        ("secret", 401),
        ("stale", 401),
        ("unsigned", 401),
        ("type", 400),
        ("future", 422),
        ("attrs", 400),
    ],
)
async def test_unsigned_stale_or_malformed_events_are_refused(
    bank: Client, pool: asyncpg.Pool, mangle: str, status: int
) -> None:
    body = event("ev-x", "m1", 1)
    if mangle == "secret":
        resp = await send(bank, body, secret="not-the-secret-0123456789")
    elif mangle == "stale":
        resp = await send(bank, body, now=time.time() - 600)
    elif mangle == "unsigned":
        resp = await bank.post("/v1/events", data=body)
    else:
        data = orjson.loads(body)
        if mangle == "type":
            data["type"] = "lottery_won"
        elif mangle == "future":
            data["occurred_at"] = (datetime.now().astimezone() + timedelta(days=1)).isoformat()
        else:
            data["attrs"] = {"Bad Key": 1}
        resp = await send(bank, orjson.dumps(data))
    assert resp.status == status, await resp.text()
    assert await pool.fetchval("SELECT count(*) FROM bank_events") == 0


async def test_intake_is_off_without_a_secret(client: Client) -> None:
    body = event("ev-1", "m1", 1)
    resp = await client.post("/v1/events", data=body, headers=signed_headers(SECRET, body))
    assert resp.status == 503


async def gift(client: Client, settings: Settings, members: dict[str, int]) -> None:
    body = {
        **benefit_body(stock=100, min_tier=0, quota=1, options=[direct("gift")]),
        "eligibility": {"event": "account_opened", "within_days": 30},
    }
    resp = await client.put("/admin/v1/benefits/newcomer", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["eligibility"] == {"event": "account_opened", "within_days": 30}
    period = periods.current_period(settings.tz)
    rows = [{"user_id": u, "tier": t} for u, t in members.items()]
    assert (
        await client.put(f"/admin/v1/tiers/{period}", json=rows, headers=admin(settings))
    ).status == 200


async def claim(client: Client, settings: Settings, user: str, request_id: str = "r") -> Any:
    return await client.post(
        "/v1/benefits/newcomer/claims",
        headers=auth(settings, user),
        json={"request_id": request_id, "option_id": "gift"},
    )


async def test_a_new_customer_gift_follows_the_age_of_the_account(
    bank: Client, settings: Settings
) -> None:
    await gift(bank, settings, {"new": 1, "old": 1, "none": 1, "late": 1})
    for event_id, user, days in (("e1", "new", 29), ("e2", "old", 31), ("e3", "late", 45)):
        assert (await send(bank, event(event_id, user, days))).status == 201
    assert (await send(bank, event("e4", "none", 1, kind="wallet_opened"))).status == 201
    accepted = await claim(bank, settings, "new")
    assert accepted.status == 202, await accepted.text()
    for user in ("old", "none", "late"):
        refused = await claim(bank, settings, user)
        assert refused.status == 403
        body = await refused.json()
        assert body["error"] == "not_eligible"
        assert body["eligibility"] == {"event": "account_opened", "within_days": 30}
    # The bank reports a newer account opening for "late": the same member may claim now.
    assert (await send(bank, event("e5", "late", 0.5))).status == 201
    assert (await claim(bank, settings, "late", "r2")).status == 202
    listing = await (await bank.get("/v1/benefits", headers=auth(settings, "new"))).json()
    assert [b["benefit_id"] for b in listing["benefits"]] == ["newcomer"]


async def test_the_event_mirror_comes_back_after_redis_lost_it(
    bank: Client, settings: Settings, redis: Redis
) -> None:
    await gift(bank, settings, {"new": 1})
    assert (await send(bank, event("e1", "new", 2))).status == 201
    # The server restarted empty, say: the mirror, its marker and the benefit's are gone.
    await redis.delete(
        events_key("account_opened"),
        events_live_key("account_opened"),
        BenefitKeys("newcomer").live,
    )
    resp = await claim(bank, settings, "new")
    assert resp.status == 202, await resp.text()
