"""A PostgreSQL that stops answering (frozen: connections open, no replies) makes what reads
it a 503 within ``CLAIM_PG_TIMEOUT_MS``, while claims, which never wait for it, go on."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from claim_service.config import Settings
from claim_service.local.embedded import EmbeddedPostgres, EmbeddedValkey
from claim_service.store.migrations import migrate
from tests.helpers import auth, open_video, spawn_serve, wait_ready

PG_TIMEOUT_MS = 500


def signal_all(postmaster: int, signum: int) -> None:
    """``signum`` to PostgreSQL's postmaster and every backend (each in a session of its
    own: a process-group signal would miss them)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == postmaster:
            os.kill(int(entry.name), signum)
    os.kill(postmaster, signum)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[EmbeddedValkey, EmbeddedPostgres]]:
    valkey = EmbeddedValkey(tmp_path / "valkey", ephemeral=True)
    postgres = EmbeddedPostgres(tmp_path / "postgres", ephemeral=True)
    valkey.start()
    try:
        postgres.start()
        try:
            yield valkey, postgres
        finally:
            if postgres.proc is not None:
                signal_all(postgres.proc.pid, signal.SIGCONT)
            postgres.stop()
    finally:
        valkey.stop()


async def test_a_hung_database_is_a_503_within_the_timeout(
    settings: Settings,
    servers: tuple[EmbeddedValkey, EmbeddedPostgres],
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    valkey, postgres = servers
    conn = await asyncpg.connect(postgres.url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    local = replace(settings, redis_url=valkey.url, database_url=postgres.url)
    env = {"CLAIM_PG_TIMEOUT_MS": str(PG_TIMEOUT_MS)}
    serve, ports = spawn_serve(local, tmp_path / "serve.log", **env)
    procs.append(serve)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await wait_ready(http, ports.base, ports.admin)
        await open_video(http, local, ports)

        async def claim(user: str) -> int:
            async with http.post(
                f"{ports.base}/v1/benefits/video/claims",
                json={"request_id": "r", "option_id": "iqiyi"},
                headers=auth(local, user),
            ) as resp:
                return resp.status

        async def my_claims(user: str) -> tuple[int, float]:
            started = time.monotonic()
            async with http.get(f"{ports.base}/v1/me/claims", headers=auth(local, user)) as resp:
                await resp.read()
                return resp.status, time.monotonic() - started

        assert await claim("m0") == 202  # the benefit's counters are live in Redis
        assert postgres.proc is not None
        signal_all(postgres.proc.pid, signal.SIGSTOP)
        try:
            reads = await asyncio.gather(*(my_claims(f"m{i}") for i in range(12)))
            claimed = await claim("m1")
        finally:
            signal_all(postgres.proc.pid, signal.SIGCONT)
        assert {status for status, _ in reads} == {503}, reads
        slowest = max(elapsed for _, elapsed in reads)
        # Twelve reads share a pool of ten connections: at worst two timeouts in a row.
        assert slowest < 2 * PG_TIMEOUT_MS / 1000 + 1.0, f"a read took {slowest:.2f}s"
        assert claimed == 202, "claims do not wait for PostgreSQL"
        assert (await my_claims("m1"))[0] == 200
