"""The promises at the edges of time and input: month ends decided by Redis's clock, retries
across a period boundary, one-off releases spanning months, second-precise closing times,
non-ASCII member ids, expiring redemption codes, unknown benefit ids."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.store import catalogue_store
from claim_service.store.keyspace import CATALOGUE_NEGATIVE_MAX, BenefitKeys
from claim_service.store.recovery import Recovery
from claim_service.store.tiers import save_tiers
from tests.helpers import admin, auth, benefit_body, direct, drain, fast, settle

Client = TestClient[Any, Any]


def before_month_end(settings: Settings, seconds: float) -> tuple[periods.Calendar, str, str]:
    """A calendar standing ``seconds`` before the end of this month, and the two months."""
    tz = settings.tz
    period = periods.current_period(tz)
    following = periods.next_period(period)
    end_ms = periods.to_ms(periods.period_start(following, tz))
    shift = end_ms - int(time.time() * 1000) - int(seconds * 1000)
    return periods.Calendar(tz, shift), period, following


async def monthly_benefit(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    months: tuple[str, ...],
    *,
    release: dict[str, Any] | None = None,
    stock: int = 10,
) -> None:
    body = benefit_body(stock=stock, quota=1)
    body["release"] = release or {"type": "monthly", "day": 1, "time": "00:00"}
    benefit = parse_benefit("video", body, settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    for month in months:
        await save_tiers(pool, redis, month, [(f"u{i}", 5) for i in range(5)])


async def taken(redis: Redis, period: str) -> int:
    return int(await redis.hget(BenefitKeys("video").stock(period), "taken") or 0)


async def test_a_claim_decided_after_midnight_counts_in_the_new_month(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """The API's clock is behind Redis's: it proposes the old month, Redis's clock (which
    decides) says the new one has begun, and the claim counts there."""
    calendar, old, new = before_month_end(settings, 0.5)
    await monthly_benefit(settings, redis, pool, (old, new))
    engine = ClaimEngine(redis, settings, pool=pool, calendar=calendar)
    before = await engine.claim(ClaimRequest("video", "u1", "r", "iqiyi"))
    assert before.code == "ok" and before.period == old
    await asyncio.sleep(0.7)
    engine.clock_offset_ms -= 5_000  # our clock now lags Redis's by five seconds
    after = await engine.claim(ClaimRequest("video", "u2", "r", "iqiyi"))
    assert after.code == "ok" and after.period == new
    assert (await taken(redis, old), await taken(redis, new)) == (1, 1)
    await drain(ClaimWriter(redis, pool, fast(settings)))
    rows = {r["user_id"]: r["period"] for r in await pool.fetch("SELECT * FROM claims")}
    assert rows == {"u1": old, "u2": new}


async def test_a_retry_after_midnight_returns_the_original_claim(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    calendar, old, new = before_month_end(settings, 0.4)
    await monthly_benefit(settings, redis, pool, (old, new))
    engine = ClaimEngine(redis, settings, pool=pool, calendar=calendar)
    first = await engine.claim(ClaimRequest("video", "u1", "r", "iqiyi"))
    assert first.code == "ok" and first.period == old
    await asyncio.sleep(0.6)
    retry = await engine.claim(ClaimRequest("video", "u1", "r", "iqiyi"))
    assert retry.code == "dup" and retry.claim_id == first.claim_id
    assert await taken(redis, new) == 0, "a retry took a unit of the new month"
    # After a rebuild too (the previous month's keys come from PostgreSQL).
    await drain(ClaimWriter(redis, pool, fast(settings)))
    await Recovery(pool, redis, settings, calendar).ensure_benefit("video", force=True)
    await redis.delete(BenefitKeys("video").idempotency(old))
    await Recovery(pool, redis, settings, calendar).ensure_benefit("video", force=True)
    again = await engine.claim(ClaimRequest("video", "u1", "r", "iqiyi"))
    assert again.code == "dup" and again.claim_id == first.claim_id
    # The new month is a new quota: a new request is accepted.
    fresh = await engine.claim(ClaimRequest("video", "u1", "r2", "iqiyi"))
    assert fresh.code == "ok" and fresh.period == new


async def test_a_one_off_release_spanning_month_end_keeps_one_stock_and_quota(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    calendar, old, new = before_month_end(settings, 0.4)
    opens = calendar.now() - timedelta(minutes=5)
    release = {"type": "once", "opens_at": opens.isoformat()}
    await monthly_benefit(settings, redis, pool, (old, new), release=release, stock=2)
    engine = ClaimEngine(redis, settings, pool=pool, calendar=calendar)
    assert (await engine.claim(ClaimRequest("video", "u1", "r", "iqiyi"))).code == "ok"
    await asyncio.sleep(0.6)
    assert calendar.period_at(int(time.time() * 1000)) == new
    after = [
        await engine.claim(ClaimRequest("video", user, "r2", "iqiyi")) for user in ("u1", "u2")
    ]
    assert [d.code for d in after] == ["quota", "ok"]
    assert {d.period for d in after} == {old}
    last = await engine.claim(ClaimRequest("video", "u3", "r", "iqiyi"))
    assert last.code == "sold_out", "the stock was reset at midnight"


async def test_closing_time_is_precise_to_the_second(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    calendar, old, _ = before_month_end(settings, 1.5)
    release = {"type": "monthly", "day": 1, "close_day": 31, "close_time": "23:59:59"}
    await monthly_benefit(settings, redis, pool, (old,), release=release)
    engine = ClaimEngine(redis, settings, pool=pool, calendar=calendar)
    assert (await engine.claim(ClaimRequest("video", "u1", "r", "iqiyi"))).code == "ok"
    await asyncio.sleep(0.8)
    closed = await engine.claim(ClaimRequest("video", "u2", "r", "iqiyi"))
    assert closed.code == "closed" and closed.period == old


async def test_a_non_ascii_member_id_keeps_its_claim_across_a_rebuild(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """The idempotency key is one definition everywhere (UTF-8 bytes, as Lua counts): after a
    rebuild from PostgreSQL a retry finds the claim instead of taking a second unit."""
    member = "会员-张三"
    period = periods.current_period(settings.tz)
    resp = await client.put(
        "/admin/v1/benefits/video", json=benefit_body(stock=5, quota=2), headers=admin(settings)
    )
    assert resp.status == 201
    await save_tiers(pool, redis, period, [(member, 9)])
    body = {"request_id": "once", "option_id": "iqiyi"}
    first = await client.post(
        "/v1/benefits/video/claims", json=body, headers=auth(settings, member)
    )
    assert first.status == 202
    claim_id = (await first.json())["claim_id"]
    await drain(ClaimWriter(redis, pool, fast(settings)))
    await Recovery(pool, redis, settings).ensure_all(force=True)
    retry = await client.post(
        "/v1/benefits/video/claims", json=body, headers=auth(settings, member)
    )
    assert retry.status == 200 and (await retry.json())["claim_id"] == claim_id
    assert await taken(redis, period) == 1


async def _code_benefit(client: Client, settings: Settings, codes: list[dict[str, Any]]) -> None:
    body = benefit_body(
        stock=100, quota=1, options=[{"option_id": "youku", "kind": "card_key"}, direct("x")]
    )
    assert (
        await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    ).status == 201
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"u{i}", "tier": 5} for i in range(20)]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))
    assert resp.status == 200
    resp = await client.post(
        "/admin/v1/benefits/video/options/youku/codes", json=codes, headers=admin(settings)
    )
    assert resp.status == 200, await resp.text()


async def _claim_code(client: Client, settings: Settings, user: str) -> tuple[int, str | None]:
    resp = await client.post(
        "/v1/benefits/video/claims",
        headers=auth(settings, user),
        json={"request_id": "r", "option_id": "youku"},
    )
    return resp.status, (await resp.json()).get("error")


async def test_expired_codes_are_not_sold(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """Codes that expired after loading answer sold_out up front (they used to be accepted,
    then failed for want of a code and refunded); the soonest-expiring go first."""
    soon = (datetime.now().astimezone() + timedelta(seconds=1.5)).isoformat()
    later = (datetime.now().astimezone() + timedelta(days=30)).isoformat()
    codes = [{"code": "SOON-1", "expires_at": soon}, {"code": "SOON-2", "expires_at": soon}]
    codes.append({"code": "LATER-1", "expires_at": later})
    await _code_benefit(client, settings, codes)
    assert await _claim_code(client, settings, "u1") == (202, None)
    await settle(settings, redis, pool)
    await asyncio.sleep(1.7)  # SOON-2 has expired unclaimed
    assert await _claim_code(client, settings, "u2") == (202, None)
    assert await _claim_code(client, settings, "u3") == (410, "sold_out")
    await settle(settings, redis, pool)
    # Soonest expiry first: u1 got a SOON code, u2 the one that was still valid.
    delivered = {
        r["user_id"]: r["code"]
        for r in await pool.fetch(
            """SELECT c.user_id, v.expires_at > now() + interval '1 day' AS code
               FROM claims c JOIN voucher_codes v ON v.claim_id = c.claim_id
               WHERE c.status = 'fulfilled'"""
        )
    }
    assert delivered == {"u1": False, "u2": True}


async def test_code_counts_survive_a_rebuild(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """Free codes = unassigned unexpired codes minus claims still waiting for one, whether
    persisted or still in the stream."""
    await _code_benefit(client, settings, [{"code": f"C-{i}"} for i in range(4)])
    assert await _claim_code(client, settings, "u1") == (202, None)
    await drain(ClaimWriter(redis, pool, fast(settings)))  # persisted, no code yet
    assert await _claim_code(client, settings, "u2") == (202, None)  # still in the stream
    await Recovery(pool, redis, settings).ensure_all(force=True)
    replies = [await _claim_code(client, settings, f"u{i}") for i in range(3, 6)]
    assert replies == [(202, None), (202, None), (410, "sold_out")]


async def test_unknown_benefit_ids_are_remembered_boundedly(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    engine = ClaimEngine(redis, settings, pool=pool)
    await Recovery(pool, redis, settings).ensure_all()
    for i in range(CATALOGUE_NEGATIVE_MAX * 3):
        assert await engine.benefit(f"nope-{i}") is None
    assert engine.catalogue.unknown_remembered <= CATALOGUE_NEGATIVE_MAX
