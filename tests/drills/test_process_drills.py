"""Drills 1 and 2: ``kill -9`` of an API worker mid-burst, and of the writer mid-batch (then
restarted). Nothing a member was told is lost or doubled, nothing is oversold."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg

from claim_service.config import Settings
from claim_service.local.embedded import EmbeddedValkey
from tests.drills.harness import RecordingClient, audit, claims_of, drained, scale, serve_release
from tests.helpers import spawn, wait_for, workers_of

DURABLE = {"CLAIM_DURABILITY": "local", "CLAIM_WRITER_CLAIM_IDLE_MS": "1000"}


async def test_drill_api_worker_killed_mid_burst(
    settings: Settings,
    pool: asyncpg.Pool,
    valkey: EmbeddedValkey,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    size = scale()
    local = replace(settings, redis_url=valkey.url)
    log = tmp_path / "serve.log"
    serve, ports = await serve_release(local, log, procs, "--workers", "2", "--writer", **DURABLE)
    client = RecordingClient(ports.base, local)
    burst = asyncio.create_task(client.burst(list(claims_of(size.members)), size.concurrency))
    await client.acknowledged_at_least(size.stock // 4)
    victims = sorted(workers_of(serve.pid))
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    await burst

    async def replaced() -> bool:
        workers = workers_of(serve.pid)
        return len(workers) == 2 and victims[0] not in workers

    await wait_for(replaced)
    await drained(valkey.url)
    report = await audit(
        "1 api worker kill -9", client.record, pool, local, valkey.url, stock=size.stock
    )
    assert report.failures == {}, report.line()
    assert client.record.unanswered == 0
    assert report.acknowledged == size.stock, "the burst sold out"


async def test_drill_writer_killed_mid_batch_and_restarted(
    settings: Settings,
    pool: asyncpg.Pool,
    valkey: EmbeddedValkey,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    size = scale()
    local = replace(settings, redis_url=valkey.url)
    writer_env = {**DURABLE, "CLAIM_WRITER_BATCH": "50"}
    writer = spawn(local, ["writer", "--name", "w1"], tmp_path / "writer.log", **writer_env)
    procs.append(writer)
    _, ports = await serve_release(local, tmp_path / "serve.log", procs, **DURABLE)
    client = RecordingClient(ports.base, local)
    # The writer at work first: one claim persisted before the burst.
    async with aiohttp.ClientSession() as http:
        assert await client.claim(http, "u0", "a") == 202

    async def persisting() -> bool:
        return int(await pool.fetchval("SELECT count(*) FROM claims")) > 0

    await wait_for(persisting)
    burst = asyncio.create_task(client.burst(list(claims_of(size.members)), size.concurrency))
    await client.acknowledged_at_least(size.stock // 4)
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    killed_at_rows = int(await pool.fetchval("SELECT count(*) FROM claims"))
    await burst  # the rest of the burst is acknowledged with no writer running
    restarted = spawn(local, ["writer", "--name", "w1"], tmp_path / "writer.log", **writer_env)
    procs.append(restarted)
    await drained(valkey.url)
    report = await audit(
        "2 writer kill -9 + restart", client.record, pool, local, valkey.url, stock=size.stock
    )
    report.notes["rows_at_kill"] = killed_at_rows
    assert report.failures == {}, report.line()
    assert killed_at_rows < report.acknowledged, "the writer was killed before the end"
    assert report.rows == report.acknowledged == size.stock
