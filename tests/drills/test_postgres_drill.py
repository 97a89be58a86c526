"""Drill 5: PostgreSQL stopped mid-burst (30 s in the full form), then started again. Claims
keep being accepted meanwhile (Redis decides them, the stream holds them), and the writer
drains the backlog by itself once PostgreSQL is back."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from claim_service.config import Settings
from claim_service.local.embedded import EmbeddedPostgres, EmbeddedValkey
from claim_service.store.connections import create_pg_pool
from claim_service.store.migrations import migrate
from tests.drills.harness import RecordingClient, audit, claims_of, drained, scale, serve_release


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "postgres", ephemeral=True)
    server.start()
    yield server
    server.stop()


async def test_drill_postgres_down_mid_burst(
    settings: Settings,
    valkey: EmbeddedValkey,
    postgres: EmbeddedPostgres,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    size = scale()
    conn = await asyncpg.connect(postgres.url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    local = replace(settings, redis_url=valkey.url, database_url=postgres.url)
    env = {"CLAIM_DURABILITY": "local"}
    _, ports = await serve_release(local, tmp_path / "serve.log", procs, "--writer", **env)
    client = RecordingClient(ports.base, local)
    burst = asyncio.create_task(client.burst(list(claims_of(size.members)), size.concurrency))
    await client.acknowledged_at_least(size.stock // 5)
    postgres.stop()
    down = time.monotonic()
    await asyncio.sleep(size.pg_outage_s)
    acknowledged_during = len(client.record.acks)
    postgres.start()  # same port and data directory
    up = time.monotonic()
    await burst
    await drained(valkey.url, within=60 + size.pg_outage_s)
    pool = await create_pg_pool(postgres.url, max_size=4)
    try:
        report = await audit(
            "5 postgres down mid-burst", client.record, pool, local, valkey.url, stock=size.stock
        )
    finally:
        await pool.close()
    during = client.record.statuses(down, up)
    report.notes["answered_while_down"] = dict(during)
    assert report.failures == {}, report.line()
    assert during[202] > 0, "claims were accepted while PostgreSQL was down"
    assert acknowledged_during > size.stock // 5
    assert report.rows == report.acknowledged == size.stock
