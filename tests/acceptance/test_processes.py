"""The real commands as separate processes: a killed writer, a multi-worker server that
supervises its workers and merges their metrics."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ensure_group
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.http.auth import mint_token
from claim_service.local.embedded import free_port
from claim_service.store import catalogue_store
from claim_service.store.keyspace import WRITER_GROUP, BenefitKeys
from claim_service.store.tiers import save_tiers
from tests.helpers import (
    Listeners,
    admin,
    benefit_body,
    open_video,
    spawn,
    spawn_serve,
    wait_for,
    wait_ready,
    workers_of,
)


async def accepted_backlog(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, total: int
) -> None:
    """``total`` claims accepted in Redis and waiting in the stream for a writer."""
    period = periods.current_period(settings.tz)
    benefit = parse_benefit("video", benefit_body(stock=total, quota=1), settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    await save_tiers(pool, redis, period, [(f"u{i}", 5) for i in range(total)])
    engine = ClaimEngine(redis, settings, pool=pool)
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
    log = tmp_path / "serve.log"
    server, ports = spawn_serve(settings, log, "--workers", "2")
    procs.append(server)
    procs.append(spawn(settings, ["writer"], log, CLAIM_WRITER_BLOCK_MS="100"))
    base = ports.base
    stock = 500
    tiers = {f"m{i}": (3 if i % 5 == 0 else 5 if i % 5 < 3 else 9) for i in range(1200)}
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, base, ports.admin)
        async with http.put(
            f"{ports.admin}/admin/v1/benefits/video",
            headers=admin(settings),
            json=benefit_body(stock=stock),
        ) as resp:
            assert resp.status == 201
        period = periods.current_period(settings.tz)
        snapshot = [{"user_id": u, "tier": t} for u, t in tiers.items()]
        async with http.put(
            f"{ports.admin}/admin/v1/tiers/{period}", headers=admin(settings), json=snapshot
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
        "from claim_service.local.embedded import EmbeddedServers\n"
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


# -- serve --workers N: one set of books, supervised workers --------------------------------


def metric(scrape: str, name: str, labels: str = "") -> float:
    """A sample's value in a Prometheus text scrape (0 when absent)."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in scrape.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


async def claim_each_on_a_new_connection(
    settings: Settings, ports: Listeners, members: range
) -> None:
    """One claim per member, each on its own connection: ``SO_REUSEPORT`` spreads
    connections, not requests, over the workers."""
    fresh = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=fresh) as http:
        for i in members:
            async with http.post(
                f"{ports.base}/v1/benefits/video/claims",
                headers={"Authorization": "Bearer " + mint_token(settings, f"m{i}")},
                json={"request_id": "r", "option_id": "iqiyi"},
            ) as resp:
                assert resp.status == 202, await resp.text()


async def scrape(ports: Listeners) -> str:
    """``/metrics`` on a new connection (so any worker may answer it)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.get(ports.admin + "/metrics") as resp,
    ):
        assert resp.status == 200
        return await resp.text()


async def test_one_scrape_counts_the_claims_of_every_worker(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    server, ports = spawn_serve(settings, tmp_path / "serve.log", "--workers", "2")
    procs.append(server)
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, ports.base, ports.admin)
        await open_video(http, settings, ports)
    await claim_each_on_a_new_connection(settings, ports, range(40))
    # Whichever worker answers the scrape, it reports both workers' claims.
    for _ in range(8):
        assert metric(await scrape(ports), "claim_decisions_total", 'outcome="ok"') == 40


async def test_workers_do_not_outlive_a_killed_serve(
    settings: Settings, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    server, ports = spawn_serve(settings, tmp_path / "serve.log", "--workers", "2")
    procs.append(server)
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, ports.base, ports.admin)
    workers = workers_of(server.pid)
    assert len(workers) == 2
    server.send_signal(signal.SIGKILL)
    server.wait(10)

    async def gone() -> bool:
        return not any(_running(pid) for pid in workers)

    await wait_for(gone, within=20)  # no worker outlives the serve process that started it
    for port in (ports.port, ports.admin_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_a_dead_worker_is_restarted_and_its_counts_kept(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    log = tmp_path / "serve.log"
    server, ports = spawn_serve(settings, log, "--workers", "2")
    procs.append(server)
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, ports.base, ports.admin)
        await open_video(http, settings, ports)
    await claim_each_on_a_new_connection(settings, ports, range(20))
    first = workers_of(server.pid)
    assert len(first) == 2
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        now = workers_of(server.pid)
        return len(now) == 2 and victim not in now

    await wait_for(replaced, within=30)
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, ports.base, ports.admin)
    await claim_each_on_a_new_connection(settings, ports, range(20, 40))
    assert metric(await scrape(ports), "claim_decisions_total", 'outcome="ok"') == 40
    assert re.search(rf"worker \d \(pid {victim}\) exited .*; restarting it", log.read_text())
    assert server.poll() is None


def test_a_worker_that_keeps_dying_at_start_up_is_given_up(
    settings: Settings, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # The admin port is taken by a socket that does not share it: every worker fails to
    # listen, as with any setting that can never work.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        log = tmp_path / "serve.log"
        ports = ["--port", str(free_port()), "--admin-port", str(taken.getsockname()[1])]
        server = spawn(settings, ["serve", "--insecure-dev", "--workers", "2", *ports], log)
        procs.append(server)
        assert server.wait(90) == 1
    text = log.read_text()
    assert "giving up" in text
    assert len(re.findall(r"restarting it in", text)) >= 3
