"""Redis Sentinel: ``serve`` given a ``redis+sentinel://`` URL follows a promoted master by
itself, answers 503 quickly while there is none, and keeps stock and quotas across the
failover. Real processes: a master, two replicas and three sentinels started by the test.
And a Redis that hangs is a 503 within ``CLAIM_REDIS_TIMEOUT_MS``, never a hung request."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from claim_service.config import Settings, url_is_local
from claim_service.domain import periods
from claim_service.errors import ConfigError
from claim_service.local.embedded import EmbeddedValkey
from claim_service.local.embedded_sentinel import EmbeddedSentinelSet
from claim_service.store.connections import (
    SentinelAddress,
    create_redis,
    parse_sentinel_url,
    redact,
)
from claim_service.store.keyspace import BenefitKeys
from tests.helpers import admin, auth, benefit_body, spawn_serve, wait_for, wait_ready

STOCK = 120
MEMBERS = 300
REDIS_TIMEOUT_MS = 1000
IN_FLIGHT = 16


@dataclass
class Answer:
    user: str
    sent: float  # monotonic
    elapsed: float
    status: int
    body: dict[str, Any]


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[EmbeddedSentinelSet]:
    with EmbeddedSentinelSet(tmp_path / "topology", replicas=2, sentinels=3) as servers:
        yield servers


async def claim(http: aiohttp.ClientSession, base: str, settings: Settings, user: str) -> Answer:
    sent = time.monotonic()
    async with http.post(
        f"{base}/v1/benefits/video/claims",
        json={"request_id": f"r-{user}", "option_id": "iqiyi"},
        headers=auth(settings, user),
    ) as resp:
        body = await resp.json()
        return Answer(user, sent, time.monotonic() - sent, resp.status, body)


async def claim_until_answered(
    http: aiohttp.ClientSession, base: str, settings: Settings, user: str, log: list[Answer]
) -> None:
    """Claim, retrying the same request_id after each 503, until a final answer."""
    while True:
        answer = await claim(http, base, settings, user)
        log.append(answer)
        if answer.status != 503:
            return
        await asyncio.sleep(0.1)


async def test_claims_follow_a_promoted_master_without_overselling(
    settings: Settings,
    pool: asyncpg.Pool,
    topology: EmbeddedSentinelSet,
    procs: list[Any],
    tmp_path: Path,
) -> None:
    env = {
        "CLAIM_REDIS_URL": topology.url,
        "CLAIM_DURABILITY": "replica",
        "CLAIM_DURABILITY_REPLICAS": "1",
        "CLAIM_DURABILITY_TIMEOUT_MS": "500",
        "CLAIM_REDIS_TIMEOUT_MS": str(REDIS_TIMEOUT_MS),
    }
    proc, ports = spawn_serve(settings, tmp_path / "serve.log", "--writer", **env)
    procs.append(proc)
    log: list[Answer] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await wait_ready(http, ports.base, ports.admin)
        await open_benefit(http, ports.admin, settings)
        first = [f"u{i}" for i in range(40)]
        await asyncio.gather(*(claim_until_answered(http, ports.base, settings, u, log)
                               for u in first))  # fmt: skip
        assert Counter(a.status for a in log) == Counter({202: 40})

        old_master = topology.master_port()
        killed_at = time.monotonic()
        node = topology.node(old_master)
        assert node.proc is not None
        node.proc.kill()  # kill -9: no goodbye to its replicas or clients

        pending = iter(f"u{i}" for i in range(40, MEMBERS))

        async def member_after_member() -> None:
            for user in pending:
                await claim_until_answered(http, ports.base, settings, user, log)

        await asyncio.gather(*(member_after_member() for _ in range(IN_FLIGHT)))

    assert proc.poll() is None, "serve kept running through the failover"
    assert topology.master_port() != old_master, "a replica was promoted"
    after = [a for a in log if a.sent >= killed_at]
    unavailable = [a for a in after if a.status == 503]
    assert unavailable, "claims were refused while there was no master"
    slowest = max(a.elapsed for a in unavailable)
    assert slowest < REDIS_TIMEOUT_MS / 1000 + 1.5, f"a 503 took {slowest:.2f}s"
    resumed = min(a.sent + a.elapsed for a in after if a.status in (200, 202))
    assert resumed - killed_at < 15, f"claims resumed {resumed - killed_at:.1f}s after the kill"

    # Every member ended with an answer; the accepted ones are exactly the stock, once each.
    finals = {a.user: a for a in log if a.status != 503}
    assert len(finals) == MEMBERS
    assert {a.status for a in finals.values()} <= {200, 202, 410}
    accepted = {u: a.body["claim_id"] for u, a in finals.items() if a.status in (200, 202)}
    assert len(accepted) == STOCK, Counter(a.status for a in finals.values())

    # No acknowledged claim was lost with the old master, none oversold, no member twice.
    async def persisted() -> bool:
        return bool(await pool.fetchval("SELECT count(*) FROM claims") >= STOCK)

    await wait_for(persisted, within=30)
    rows = await pool.fetch("SELECT user_id, claim_id FROM claims WHERE benefit_id = 'video'")
    assert {r["user_id"]: r["claim_id"] for r in rows} == accepted
    assert len(rows) == STOCK
    redis = await create_redis(topology.url)
    try:
        stock = BenefitKeys("video").stock(periods.current_period(settings.tz))
        assert int(await redis.hget(stock, "taken") or 0) == STOCK
    finally:
        await redis.aclose(close_connection_pool=True)


async def open_benefit(http: aiohttp.ClientSession, admin_base: str, settings: Settings) -> None:
    async with http.put(
        f"{admin_base}/admin/v1/benefits/video",
        headers=admin(settings),
        json=benefit_body(stock=STOCK, quota=1),
    ) as resp:
        assert resp.status == 201, await resp.text()
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"u{i}", "tier": 5} for i in range(MEMBERS)]
    async with http.put(
        f"{admin_base}/admin/v1/tiers/{period}", headers=admin(settings), json=tiers
    ) as resp:
        assert resp.status == 200, await resp.text()


async def test_a_hung_redis_is_a_503_within_the_timeout_not_a_hang(
    settings: Settings, pool: asyncpg.Pool, procs: list[Any], tmp_path: Path
) -> None:
    """Connections to a server that stopped answering (SIGSTOP: they stay open) are given up
    after CLAIM_REDIS_TIMEOUT_MS; claims are accepted again once it answers."""
    server = EmbeddedValkey(tmp_path / "valkey", ephemeral=True)
    server.start()
    try:
        assert server.proc is not None
        env = {"CLAIM_REDIS_URL": server.url, "CLAIM_REDIS_TIMEOUT_MS": "400"}
        proc, ports = spawn_serve(settings, tmp_path / "serve.log", **env)
        procs.append(proc)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await wait_ready(http, ports.base, ports.admin)
            await open_benefit(http, ports.admin, settings)
            assert (await claim(http, ports.base, settings, "u0")).status == 202
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                answers = await asyncio.gather(
                    *(claim(http, ports.base, settings, f"u{i}") for i in range(1, 21))
                )
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            assert {a.status for a in answers} == {503}
            slowest = max(a.elapsed for a in answers)
            assert slowest < 0.4 + 1.0, f"a claim took {slowest:.2f}s with Redis hung"
            # Each may have been decided once the server woke up: the retry says which.
            log: list[Answer] = []
            await asyncio.gather(
                *(claim_until_answered(http, ports.base, settings, a.user, log) for a in answers)
            )
            finals = [a for a in log if a.status != 503]
            assert {a.status for a in finals} <= {200, 202} and len(finals) == 20
            assert len({a.body["claim_id"] for a in finals}) == 20
    finally:
        server.stop()


def test_sentinel_urls_are_parsed_and_redacted() -> None:
    parsed = parse_sentinel_url("redis+sentinel://:s3cret@10.0.0.1:26379,[::1],h3:26380/claims/2")
    assert parsed == SentinelAddress(
        (("10.0.0.1", 26379), ("::1", 26379), ("h3", 26380)), "claims", 2, None, "s3cret"
    )
    assert parse_sentinel_url("redis+sentinel://ops:p%40ss@h:1/m") == SentinelAddress(
        (("h", 1),), "m", 0, "ops", "p@ss"
    )
    for bad in (
        "redis+sentinel://h:1",
        "redis+sentinel:///m",
        "redis+sentinel://h:x/m",
        "redis+sentinel://h:1/m/db",
        "redis+sentinel://h:1/m?ssl=1",
    ):
        with pytest.raises(ConfigError):
            parse_sentinel_url(bad)
    assert redact("redis+sentinel://:s3cret@h:1/m") == "redis+sentinel://:***@h:1/m"
    assert redact("redis://user:pw@h:6379/0") == "redis://user:***@h:6379/0"
    assert url_is_local("redis+sentinel://127.0.0.1:1,localhost:2/m")
    assert not url_is_local("redis+sentinel://127.0.0.1:1,10.0.0.5:2/m")
