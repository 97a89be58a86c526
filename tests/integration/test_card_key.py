"""Card-key pools: encrypted codes, one per claim ever, stock bounded by the codes loaded."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.fulfilment.worker import FulfilmentWorker
from tests.helpers import CODES, admin, auth, claim_codes, settle, setup_codes

Client = TestClient[Any, Any]


async def test_claims_never_exceed_codes_and_each_code_goes_once(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await setup_codes(client, settings, stock=100, codes=40)
    replies = await claim_codes(client, settings, range(60))
    accepted = [r for r in replies if r["http"] == 202]
    assert len(accepted) == 40, "a card-key option accepts no more claims than it has codes"
    assert {r["error"] for r in replies if r["http"] != 202} == {"sold_out"}
    await settle(settings, redis, pool)
    statuses = await pool.fetch("SELECT status, code_id FROM claims")
    assert {r["status"] for r in statuses} == {"fulfilled"}
    assert len({r["code_id"] for r in statuses}) == 40
    assert (
        await pool.fetchval("SELECT count(*) FROM voucher_codes WHERE claim_id IS NOT NULL") == 40
    )
    seen = set()
    for reply in accepted:
        user = f"u{replies.index(reply)}"
        resp = await client.get(f"/v1/claims/{reply['claim_id']}", headers=auth(settings, user))
        body = await resp.json()
        assert body["status"] == "fulfilled"
        seen.add(body["voucher"]["code"])
        assert body["voucher"]["secret"].startswith("pin-")
    assert seen == set(CODES[:40])


async def test_codes_are_unreadable_in_the_database(
    client: Client, settings: Settings, pool: asyncpg.Pool
) -> None:
    await setup_codes(client, settings, codes=10)
    rows = await pool.fetch("SELECT code_enc, secret_enc, code_hash FROM voucher_codes")
    dump = b"".join(
        bytes(r["code_enc"]) + bytes(r["secret_enc"]) + bytes(r["code_hash"]) for r in rows
    )
    for code in CODES[:10]:
        assert code.encode() not in dump
        assert b"SECRETCODE" not in dump and b"pin-" not in dump
    text_dump = await pool.fetchval(
        "SELECT string_agg(encode(code_enc, 'escape'), '') FROM voucher_codes"
    )
    assert "SECRETCODE" not in text_dump


async def test_reloading_the_same_codes_adds_nothing(client: Client, settings: Settings) -> None:
    await setup_codes(client, settings, codes=10)
    resp = await client.post(
        "/admin/v1/benefits/video/options/youku/codes", json=CODES[:15], headers=admin(settings)
    )
    report = await resp.json()
    assert report["loaded"] == 5 and report["duplicates"] == 10 and report["pool"]["free"] == 15
    replies = await claim_codes(client, settings, range(20))
    assert sum(r["http"] == 202 for r in replies) == 15


async def test_voucher_is_shown_to_its_owner_only(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await setup_codes(client, settings, codes=1)
    (reply,) = await claim_codes(client, settings, range(1))
    await settle(settings, redis, pool)
    other = await client.get(f"/v1/claims/{reply['claim_id']}", headers=auth(settings, "u1"))
    assert other.status == 404
    ops = await client.get(f"/admin/v1/claims/{reply['claim_id']}", headers=admin(settings))
    body = await ops.json()
    assert "voucher" not in body and body["has_voucher"] is True
    assert [e["to"] for e in body["events"]] == ["accepted", "fulfilled"]


async def test_low_pool_is_reported(
    client: Client,
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await setup_codes(client, settings, codes=8)
    resp = await client.get("/admin/v1/benefits/video/codes", headers=admin(settings))
    (level,) = (await resp.json())["pools"]
    assert level["free"] == 8 and level["low"] is True  # default watermark is 100
    gauge = 'claim_codes_low{benefit="video",option="youku"}'
    assert f"{gauge} 1.0" in await (await client.get("/metrics")).text()
    assert (
        'claim_codes_free{benefit="video",option="youku"} 8.0'
        in await (await client.get("/metrics")).text()
    )
    worker = FulfilmentWorker(pool, redis, replace(settings, codes_low_watermark=10))
    with caplog.at_level(logging.WARNING, logger="claim_service.fulfilment"):
        await worker.check_pools()
    assert "card-key pool video/youku is low: 8 free code(s)" in caplog.text
    more = [f"MORE-{i}" for i in range(100)]
    await client.post(
        "/admin/v1/benefits/video/options/youku/codes", json=more, headers=admin(settings)
    )
    assert f"{gauge} 0.0" in await (await client.get("/metrics")).text()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="claim_service.fulfilment"):
        await worker.check_pools()
    assert "is low" not in caplog.text


async def test_expired_codes_fail_and_refund(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await setup_codes(client, settings, codes=0)
    soon = [{"code": "EXP-1", "expires_at": "2000-01-01T00:00:00+00:00"}, {"code": "OK-1"}]
    resp = await client.post(
        "/admin/v1/benefits/video/options/youku/codes", json=soon, headers=admin(settings)
    )
    report = await resp.json()
    assert report["expired"] == 1 and report["pool"]["free"] == 1
    replies = await claim_codes(client, settings, range(3))
    assert sum(r["http"] == 202 for r in replies) == 1
    # The one code expires behind our back: the claim fails and its unit comes back.
    await pool.execute("UPDATE voucher_codes SET expires_at = now() - interval '1 s'")
    await settle(settings, redis, pool)
    assert await pool.fetchval("SELECT status FROM claims") == "refunded"
    period = periods.current_period(settings.tz)
    stock = await redis.hgetall(f"claim:{{b:video}}:stock:{period}")
    assert int(stock[b"taken"]) == 0
