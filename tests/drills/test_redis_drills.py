"""Drills 3 and 6: Redis ``kill -9`` and restarted from its append-only file, and Redis
unreachable (frozen: connections stay open, nothing answers). Claims are answered ``503``
within ``CLAIM_REDIS_TIMEOUT_MS`` meanwhile, never hang, and are accepted again by
themselves once Redis is back; nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import asyncpg

from claim_service.config import Settings
from claim_service.local.embedded import EmbeddedValkey
from tests.drills.harness import RecordingClient, audit, claims_of, drained, scale, serve_release

REDIS_TIMEOUT_MS = 500
ENV = {
    "CLAIM_DURABILITY": "local",
    "CLAIM_REDIS_TIMEOUT_MS": str(REDIS_TIMEOUT_MS),
    "CLAIM_DURABILITY_TIMEOUT_MS": "250",
    "CLAIM_WRITER_CLAIM_IDLE_MS": "1000",
}


async def start(
    settings: Settings, valkey: EmbeddedValkey, procs: list[subprocess.Popen[bytes]], log: Path
) -> tuple[Settings, RecordingClient]:
    local = replace(settings, redis_url=valkey.url)
    _, ports = await serve_release(local, log, procs, "--writer", **ENV)
    return local, RecordingClient(ports.base, local, retry_pause_s=0.1)


async def test_drill_redis_killed_and_restarted_from_its_aof(
    settings: Settings,
    pool: asyncpg.Pool,
    valkey: EmbeddedValkey,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    size = scale()
    local, client = await start(settings, valkey, procs, tmp_path / "serve.log")
    burst = asyncio.create_task(client.burst(list(claims_of(size.members)), size.concurrency))
    await client.acknowledged_at_least(size.stock // 4)
    assert valkey.proc is not None
    valkey.proc.kill()
    valkey.proc.wait(10)
    acknowledged_before = len(client.record.acks)
    down = time.monotonic()
    await asyncio.sleep(size.redis_outage_s)
    valkey.start()  # same port and directory: it loads its AOF
    up = time.monotonic()
    await burst
    await drained(valkey.url)
    report = await audit(
        "3 redis kill -9 + AOF restart", client.record, pool, local, valkey.url, stock=size.stock
    )
    during = client.record.statuses(down, up)
    report.notes["answered_while_down"] = dict(during)
    assert report.failures == {}, report.line()
    assert set(during) <= {503}, "no claim is decided without Redis"
    assert report.acknowledged == size.stock > acknowledged_before, "claims resumed: sold out"


async def test_drill_redis_unreachable_is_503_fast_and_recovers(
    settings: Settings,
    pool: asyncpg.Pool,
    valkey: EmbeddedValkey,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    size = scale()
    local, client = await start(settings, valkey, procs, tmp_path / "serve.log")
    burst = asyncio.create_task(client.burst(list(claims_of(size.members)), size.concurrency))
    await client.acknowledged_at_least(size.stock // 4)
    assert valkey.proc is not None
    os.kill(valkey.proc.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        await asyncio.sleep(size.redis_outage_s)
    finally:
        os.kill(valkey.proc.pid, signal.SIGCONT)
    thawed = time.monotonic()
    await burst
    await drained(valkey.url)
    report = await audit(
        "6 redis unreachable", client.record, pool, local, valkey.url, stock=size.stock
    )
    # Requests sent while Redis was frozen, by the time they were answered.
    blind = [a for a in client.record.answers if frozen <= a.at and a.at + a.elapsed < thawed]
    slowest = max(a.elapsed for a in blind)
    report.notes["503_while_unreachable"] = sum(1 for a in blind if a.status == 503)
    report.notes["slowest_s"] = round(slowest, 3)
    resumed = [a.at for a in client.record.answers if a.at >= thawed and a.status == 202]
    report.notes["accepting_again_after_s"] = round(min(resumed) - thawed, 3)
    assert report.failures == {}, report.line()
    assert blind and {a.status for a in blind} == {503}
    # The timeout, plus the time a request already in flight had spent waiting for a batch.
    assert slowest < 2 * REDIS_TIMEOUT_MS / 1000 + 0.5, f"a claim took {slowest:.2f}s"
    assert min(resumed) - thawed < 5.0, "claims accepted again within seconds"
    assert report.acknowledged == size.stock
