"""Claims answered without Redis (before opening, once sold out) and claims refused to protect
the service (in-flight bound, rate limits). Behaviour only: which answer, from where (Redis's
own command counts), and that the service reopens when stock comes back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.http.app import ENGINE, LIMITS
from claim_service.http.server import Guard
from claim_service.http.service import create_apps
from claim_service.store.keyspace import BenefitKeys
from tests.helpers import (
    ServiceClient,
    admin,
    auth,
    benefit_body,
    command_calls,
    drain,
    fast,
    wait_for,
)

Client = TestClient[Any, Any]


async def setup(
    client: Client, settings: Settings, *, stock: int, tiers: dict[str, int], **kwargs: Any
) -> None:
    body = benefit_body(stock=stock, quota=1, **kwargs)
    resp = await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    period = periods.current_period(settings.tz)
    rows = [{"user_id": u, "tier": t} for u, t in tiers.items()]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=rows, headers=admin(settings))
    assert resp.status == 200, await resp.text()


async def claim(
    client: Client, settings: Settings, user: str, request_id: str
) -> tuple[int, dict[str, Any]]:
    resp = await client.post(
        "/v1/benefits/video/claims",
        json={"request_id": request_id, "option_id": "iqiyi"},
        headers=auth(settings, user),
    )
    return resp.status, dict(await resp.json())


async def gate_answering(client: Client) -> None:
    engine = client.app[ENGINE]

    async def answering() -> bool:
        return bool(engine.gate.answering == 1)

    await wait_for(answering, within=5)


async def evalsha_calls(redis: Redis) -> int:
    return (await command_calls(redis))["evalsha"]


async def test_sold_out_is_answered_locally_and_reopens_on_a_top_up(
    client: Client, settings: Settings, redis: Redis
) -> None:
    await setup(client, settings, stock=1, tiers={"u1": 5, "u2": 5, "u3": 5, "low": 1})
    assert (await claim(client, settings, "u1", "a"))[0] == 202
    status, body = await claim(client, settings, "u2", "a")  # Redis says sold out
    assert status == 410 and body["error"] == "sold_out", body
    await gate_answering(client)

    before = await evalsha_calls(redis)
    for i in range(5):
        status, body = await claim(client, settings, "u2", f"again-{i}")
        assert (status, body["error"], body["stock_left"]) == (410, "sold_out", 0), body
    assert await evalsha_calls(redis) == before, "answered without Redis"

    # Whatever the gate cannot be sure of still goes to Redis, which answers exactly:
    # a retry of the accepted claim gets it back, a member at quota is told so, a member
    # below the tier is told that (the first time this worker hears of them).
    status, body = await claim(client, settings, "u1", "a")
    assert status == 200 and body["replayed"] is True, body
    assert (await claim(client, settings, "u1", "b"))[1]["error"] == "quota_exceeded"
    assert (await claim(client, settings, "low", "a"))[1]["error"] == "tier_too_low"
    assert await evalsha_calls(redis) == before + 3

    resp = await client.post(
        "/admin/v1/benefits/video/stock", json={"amount": 1}, headers=admin(settings)
    )
    assert resp.status == 200, await resp.text()
    assert (await claim(client, settings, "u2", "after-top-up"))[0] == 202


async def test_sold_out_reopens_when_a_unit_is_refunded(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await setup(client, settings, stock=1, tiers={"u1": 5, "u2": 5})
    status, body = await claim(client, settings, "u1", "a")
    assert status == 202
    assert (await claim(client, settings, "u2", "a"))[0] == 410
    await gate_answering(client)
    assert (await claim(client, settings, "u2", "b"))[0] == 410
    await drain(ClaimWriter(redis, pool, fast(settings)))
    # Its delivery failed for good (what a partner's refusal leaves behind); ops refund it.
    await pool.execute(
        "UPDATE claims SET status = 'failed', failure_reason = 'rejected' WHERE claim_id = $1",
        body["claim_id"],
    )
    resp = await client.post(
        f"/admin/v1/claims/{body['claim_id']}/refund", json={}, headers=admin(settings)
    )
    assert resp.status == 200, await resp.text()
    assert (await claim(client, settings, "u2", "c"))[0] == 202


async def test_a_change_nobody_announced_reopens_within_the_recheck(
    client: Client, settings: Settings, redis: Redis
) -> None:
    """An announcement can be lost (pub/sub is not durable): the gate re-checks the
    counters by itself and stops answering locally once they changed."""
    await setup(client, settings, stock=1, tiers={"u1": 5, "u2": 5})
    assert (await claim(client, settings, "u1", "a"))[0] == 202
    assert (await claim(client, settings, "u2", "a"))[0] == 410
    await gate_answering(client)
    stock = BenefitKeys("video").stock(periods.current_period(settings.tz))
    await redis.hincrby(stock, "added", 1)  # behind everyone's back: no announcement
    engine = client.app[ENGINE]

    async def forgotten() -> bool:
        return bool(engine.gate.answering == 0)

    await wait_for(forgotten, within=5)
    assert (await claim(client, settings, "u2", "b"))[0] == 202


async def test_before_opening_is_answered_locally_except_retries(
    client: Client, settings: Settings, redis: Redis
) -> None:
    await setup(client, settings, stock=5, tiers={"u1": 5, "u2": 5}, opens_in_s=3600)
    status, body = await claim(client, settings, "u1", "a")
    assert status == 425 and body["error"] == "not_open" and body["opens_at"], body
    await gate_answering(client)
    before = await evalsha_calls(redis)
    for user in ("u1", "u2", "nobody"):
        status, local = await claim(client, settings, user, "b")
        assert status == 425 and local["opens_at"] == body["opens_at"], local
    assert await evalsha_calls(redis) == before
    # Paused: only Redis knows whether it still is.
    assert (await client.post("/admin/v1/benefits/video/pause", headers=admin(settings))).ok
    assert (await claim(client, settings, "u2", "c"))[1]["error"] == "paused"


async def test_each_request_of_a_batch_gets_its_own_answer(
    client: Client, settings: Settings
) -> None:
    tiers = {f"u{i}": 5 for i in range(30)} | {f"low{i}": 1 for i in range(10)}
    await setup(client, settings, stock=20, tiers=tiers)
    users = list(tiers)
    results = await asyncio.gather(*(claim(client, settings, u, "r") for u in users))
    answers = dict(zip(users, results, strict=True))
    accepted = {u for u, (status, _) in answers.items() if status == 202}
    assert len(accepted) == 20
    assert len({answers[u][1]["claim_id"] for u in accepted}) == 20
    for user, (status, body) in answers.items():
        if user.startswith("low"):
            assert (status, body["error"]) == (403, "tier_too_low"), (user, body)
        elif user not in accepted:
            assert (status, body["error"]) == (410, "sold_out"), (user, body)
    # Everyone again at once with a new request: each hears about their own situation.
    results = await asyncio.gather(*(claim(client, settings, u, "again") for u in users))
    again = dict(zip(users, results, strict=True))
    for user, (_, body) in again.items():
        expected = (
            "tier_too_low"
            if user.startswith("low")
            else "quota_exceeded"
            if user in accepted
            else "sold_out"
        )
        assert body["error"] == expected, (user, body)


async def with_limits(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, **limits: Any
) -> ServiceClient:
    local = replace(settings, **limits)
    member, admin_app = create_apps(local, pools=(redis, pool))
    return ServiceClient(member, admin_app, Guard.for_process(local))


async def test_members_past_their_rate_get_429_with_retry_after(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    async with await with_limits(
        settings, redis, pool, rate_member_per_s=1.0, rate_member_burst=3.0
    ) as client:
        await setup(client, settings, stock=10, tiers={"u1": 5, "u2": 5})
        statuses = [(await claim(client, settings, "u1", f"r{i}"))[0] for i in range(5)]
        assert statuses[:3] == [202, 409, 409] and statuses[3:] == [429, 429], statuses
        resp = await client.post(
            "/v1/benefits/video/claims",
            json={"request_id": "r9", "option_id": "iqiyi"},
            headers=auth(settings, "u1"),
        )
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json())["error"] == "rate_limited"
        assert (await claim(client, settings, "u2", "r"))[0] == 202, "others are not limited"


async def test_addresses_past_their_rate_get_429(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    async with await with_limits(
        settings, redis, pool, rate_ip_per_s=1.0, rate_ip_burst=2.0
    ) as client:
        await setup(client, settings, stock=10, tiers={f"u{i}": 5 for i in range(4)})
        statuses = [(await claim(client, settings, f"u{i}", "r"))[0] for i in range(4)]
        assert statuses == [202, 202, 429, 429], statuses


async def test_claims_past_the_in_flight_bound_get_503_at_once(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    async with await with_limits(settings, redis, pool, max_in_flight=2) as client:
        await setup(client, settings, stock=10, tiers={f"u{i}": 5 for i in range(4)})
        limits = client.app[LIMITS]
        limits.in_flight = 2  # two claims waiting on Redis
        resp = await client.post(
            "/v1/benefits/video/claims",
            json={"request_id": "r", "option_id": "iqiyi"},
            headers=auth(settings, "u0"),
        )
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"] == "overloaded"
        limits.in_flight = 1
        assert (await claim(client, settings, "u0", "r"))[0] == 202
        assert limits.in_flight == 1, "a decided claim leaves the count as it found it"


def hold_the_cpu(seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


async def test_a_lagging_loop_sheds_new_claims_with_503(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    async with await with_limits(settings, redis, pool, shed_lag_ms=100) as client:
        await setup(client, settings, stock=10, tiers={f"u{i}": 5 for i in range(4)})
        limits = client.app[LIMITS]
        hold_the_cpu(0.3)  # the worker busy answering others: its timers fire late
        await asyncio.sleep(0.05)
        assert limits.full
        status, body = await claim(client, settings, "u0", "r")
        assert (status, body["error"]) == (503, "overloaded"), body

        async def caught_up() -> bool:
            return not limits.full

        await wait_for(caught_up, within=5)
        assert (await claim(client, settings, "u0", "r"))[0] == 202
