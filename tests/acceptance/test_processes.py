"""The real commands as separate processes: a killed writer, a multi-worker server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from claim_service import catalogue_store, periods
from claim_service.auth import mint_token
from claim_service.catalogue import parse_benefit
from claim_service.config import Settings
from claim_service.embedded import free_port
from claim_service.engine import ClaimEngine, ClaimRequest
from claim_service.keyspace import WRITER_GROUP, BenefitKeys
from claim_service.tiers import save_tiers
from tests.conftest import admin, benefit_body


def spawn(settings: Settings, args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    full_env = {
        **os.environ,
        "CLAIM_REDIS_URL": settings.redis_url or "",
        "CLAIM_DATABASE_URL": settings.database_url or "",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "claim_service", *args],
        env=full_env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], within: float = 30.0, every: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(every)
    raise AssertionError("condition not reached in time")


async def accepted_backlog(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, total: int
) -> None:
    """``total`` claims accepted in Redis and waiting in the stream for a writer."""
    period = periods.current_period(settings.tz)
    benefit = parse_benefit("video", benefit_body(stock=total, quota=1), settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    await save_tiers(pool, redis, period, [(f"u{i}", 5) for i in range(total)])
    engine = ClaimEngine(redis, settings)
    for start in range(0, total, 1000):
        decisions = await asyncio.gather(
            *(
                engine.claim(ClaimRequest("video", f"u{i}", "r", "iqiyi"))
                for i in range(start, min(start + 1000, total))
            )
        )
        assert all(d.code == "ok" for d in decisions)
    assert await redis.xlen(BenefitKeys("video").stream) == total


async def test_writer_killed_mid_batch_loses_and_duplicates_nothing(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    total = 20_000
    await accepted_backlog(settings, redis, pool, total)
    stream = BenefitKeys("video").stream

    env = {"CLAIM_WRITER_BATCH": "1500", "CLAIM_WRITER_CLAIM_IDLE_MS": "300"}
    log = tmp_path / "writer.log"

    async def rows() -> int:
        return int(await pool.fetchval("SELECT count(*) FROM claims"))

    kills = killed_mid_batch = 0
    for threshold in (1, total // 4, total // 2):
        writer = spawn(settings, ["writer"], log, **env)
        procs.append(writer)

        async def past(threshold: int = threshold) -> bool:
            return await rows() >= threshold

        await wait_for(past)
        # Let it get into its next batch, then kill it without any chance to clean up.
        await asyncio.sleep(0.01)
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        kills += 1
        if (await redis.xpending(stream, WRITER_GROUP))["pending"] > 0:
            killed_mid_batch += 1
    assert await rows() < total, "the writer finished before it could be killed"
    assert killed_mid_batch > 0, "at least one kill hit a batch in flight"

    procs.append(spawn(settings, ["writer"], log, **env))

    async def complete() -> bool:
        return await rows() >= total and await redis.xlen(stream) == 0

    await wait_for(complete, within=60)
    assert kills == 3
    assert await rows() == total
    assert await pool.fetchval("SELECT count(DISTINCT claim_id) FROM claims") == total
    assert await pool.fetchval("SELECT count(DISTINCT user_id) FROM claims") == total
    assert (await redis.xpending(stream, WRITER_GROUP))["pending"] == 0


async def test_multi_worker_server_burst(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    procs.append(spawn(settings, ["serve", "--workers", "2", "--port", str(port)], log))
    procs.append(spawn(settings, ["writer"], log, CLAIM_WRITER_BLOCK_MS="100"))
    base = f"http://127.0.0.1:{port}"
    stock = 500
    tiers = {f"m{i}": (3 if i % 5 == 0 else 5 if i % 5 < 3 else 9) for i in range(1200)}
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            try:
                async with http.get(base + "/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready)
        async with http.put(
            f"{base}/admin/v1/benefits/video",
            headers=admin(settings),
            json=benefit_body(stock=stock),
        ) as resp:
            assert resp.status == 201
        period = periods.current_period(settings.tz)
        snapshot = [{"user_id": u, "tier": t} for u, t in tiers.items()]
        async with http.put(
            f"{base}/admin/v1/tiers/{period}", headers=admin(settings), json=snapshot
        ) as resp:
            assert resp.status == 200
        codes: Counter[str] = Counter()
        accepted: Counter[str] = Counter()
        sem = asyncio.Semaphore(150)

        async def member(user: str) -> None:
            headers = {"Authorization": "Bearer " + mint_token(settings, user)}
            for attempt in range(3):
                async with (
                    sem,
                    http.post(
                        f"{base}/v1/benefits/video/claims",
                        headers=headers,
                        json={"request_id": f"r{attempt}", "option_id": "tencent"},
                    ) as resp,
                ):
                    body = await resp.json()
                codes[body.get("error", "accepted")] += 1
                if resp.status == 202:
                    accepted[user] += 1

        await asyncio.gather(*(member(u) for u in tiers))

    assert sum(accepted.values()) == stock
    assert codes["tier_too_low"] > 0 and codes["sold_out"] > 0 and codes["quota_exceeded"] > 0
    for user, n in accepted.items():
        assert tiers[user] >= 4 and n <= (2 if tiers[user] >= 8 else 1)

    async def persisted() -> bool:
        return int(await pool.fetchval("SELECT count(*) FROM claims")) == stock

    await wait_for(persisted, within=20)


def test_servers_do_not_outlive_a_killed_parent() -> None:
    script = (
        "from claim_service.embedded import EmbeddedServers\n"
        "import time\n"
        "s = EmbeddedServers(ephemeral=True).start()\n"
        "print(s.valkey.proc.pid, s.postgres.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 15
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if _running(pid)]
        time.sleep(0.1)
    assert alive == [], "a server outlived the process that started it"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "zombie" not in status.read()
    except FileNotFoundError:
        return False


async def test_a_named_writer_restarted_resumes_its_own_pending_entries_at_once(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    total = 3000
    await accepted_backlog(settings, redis, pool, total)
    stream = BenefitKeys("video").stream
    from claim_service.writer import ensure_group

    await ensure_group(redis, stream)
    # The named writer "died" holding 1,000 delivered but unwritten entries.
    await redis.xreadgroup(WRITER_GROUP, "writer-a", {stream: ">"}, count=1000)
    assert (await redis.xpending(stream, WRITER_GROUP))["pending"] == 1000
    # Restarted under its name, it writes them at once, though the takeover idle time
    # (an hour here) would keep a differently named writer waiting.
    procs.append(
        spawn(
            settings,
            ["writer", "--name", "writer-a"],
            tmp_path / "w.log",
            CLAIM_WRITER_CLAIM_IDLE_MS="3600000",
        )
    )

    async def done() -> bool:
        return int(await pool.fetchval("SELECT count(*) FROM claims")) == total

    await wait_for(done, within=30)
    assert (await redis.xpending(stream, WRITER_GROUP))["pending"] == 0
