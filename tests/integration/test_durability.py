"""``CLAIM_DURABILITY``: claims answered only once Redis holds them durably, against real
servers with an AOF (``local``) and a real replica (``replica``), and start-up refused where the
server cannot honour the mode."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.durability import ServerFacts, check_server, durability_problems
from claim_service.claims.engine import ClaimEngine
from claim_service.config import Settings
from claim_service.errors import BackendUnavailable, ConfigError
from claim_service.local.embedded import EmbeddedValkey
from claim_service.store.connections import create_redis
from claim_service.store.keyspace import BenefitKeys
from tests.helpers import (
    Client,
    auth,
    command_calls,
    durable_service,
    setup_open_benefit,
    spawn_serve,
    stream_claim_ids,
    wait_for,
)

TIMEOUT_MS = 300


@pytest.fixture(scope="module")
def aof_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    """A server that fsyncs its AOF on every write: what ``local`` needs."""
    server = EmbeddedValkey(tmp_path_factory.mktemp("aof"), appendfsync="always")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicated(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedValkey, EmbeddedValkey]]:
    """A master (AOF fsynced always) and one replica following it."""
    root = tmp_path_factory.mktemp("replicated")
    prompt = ("--repl-diskless-sync-delay", "0")  # sync the replica at once
    master = EmbeddedValkey(root / "master", appendfsync="always", extra=prompt)
    master.start()
    replica = EmbeddedValkey(root / "replica", replica_of=master.port)
    try:
        replica.start()
        deadline = time.monotonic() + 30
        while online_replicas(master.port) < 1:
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        yield master, replica
    finally:
        replica.stop()
        master.stop()


def online_replicas(port: int) -> int:
    with redis_sync.Redis(port=port) as client:
        info = client.info("replication")
    return sum(1 for v in info.values() if isinstance(v, dict) and v.get("state") == "online")


@asynccontextmanager
async def engine_on(
    settings: Settings, pool: asyncpg.Pool, url: str, **overrides: Any
) -> AsyncIterator[tuple[ClaimEngine, Redis]]:
    """An engine on the server at ``url`` (flushed), benefit ``video`` open to u0..u199."""
    redis = await create_redis(url)
    try:
        await redis.flushall()
        local = replace(settings, redis_url=url, **overrides)
        await setup_open_benefit(local, redis, pool, stock=100, members=200)
        yield ClaimEngine(redis, local, pool=pool), redis
    finally:
        await redis.aclose()


def requests(users: range, request_id: str = "r") -> list[ClaimRequest]:
    return [ClaimRequest("video", f"u{i}", request_id, "iqiyi") for i in users]


async def claim(client: Client, settings: Settings, user: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post(
        "/v1/benefits/video/claims",
        json={"request_id": "r", "option_id": "iqiyi"},
        headers=auth(settings, user),
    )
    return resp.status, dict(await resp.json())


# -- local -----------------------------------------------------------------------------------


async def test_local_waits_for_the_aof_once_per_batch_and_only_for_accepted_claims(
    settings: Settings, pool: asyncpg.Pool, aof_server: EmbeddedValkey
) -> None:
    async with engine_on(settings, pool, aof_server.url, durability="local") as (engine, redis):
        await engine.claim(requests(range(1))[0])  # recovers the benefit on this server
        before, batches = await command_calls(redis), engine.batches
        decisions = await asyncio.gather(*(engine.claim(r) for r in requests(range(1, 65))))
        assert {d.code for d in decisions} == {"ok"}
        after = await command_calls(redis)
        # One batch, one WAITAOF: the fsync that covers the batch serves all 64 claims.
        assert engine.batches - batches == 1
        assert after["waitaof"] - before["waitaof"] == 1
        assert after["wait"] == before["wait"] == 0, "local asks no replica"

        # Rejections only: nothing to make durable, no wait.
        rejected = await asyncio.gather(*(engine.claim(r) for r in requests(range(1, 65), "r2")))
        assert {d.code for d in rejected} == {"quota"}
        assert (await command_calls(redis))["waitaof"] == after["waitaof"]

        # Replays only wrote nothing on their connection: the idempotency key is touched
        # first, so that the wait also covers the original write (made on another one).
        replays = await asyncio.gather(*(engine.claim(r) for r in requests(range(1, 65))))
        assert {d.code for d in replays} == {"dup"}
        assert [d.claim_id for d in replays] == [d.claim_id for d in decisions]
        final = await command_calls(redis)
        assert final["waitaof"] == after["waitaof"] + 1
        assert final["expire"] == after["expire"] + 1


async def test_none_keeps_answering_without_waiting(
    settings: Settings, pool: asyncpg.Pool, aof_server: EmbeddedValkey
) -> None:
    async with engine_on(settings, pool, aof_server.url) as (engine, redis):
        assert settings.durability == "none"
        before = await command_calls(redis)
        decisions = await asyncio.gather(*(engine.claim(r) for r in requests(range(10))))
        assert {d.code for d in decisions} == {"ok"}
        assert (await command_calls(redis))["waitaof"] == before["waitaof"]


async def test_local_answers_503_while_the_aof_is_off_and_the_retry_returns_the_claim(
    settings: Settings, pool: asyncpg.Pool, aof_server: EmbeddedValkey
) -> None:
    """The answer waits for the server's word that the batch is on disk: with the AOF
    switched off under the running service it never comes, and the claim is a 503."""
    async with engine_on(settings, pool, aof_server.url, durability="local") as (engine, redis):
        await engine.claim(requests(range(1))[0])
        await redis.config_set("appendonly", "no")
        try:
            with pytest.raises(BackendUnavailable, match="retry with the same request_id"):
                await engine.claim(requests(range(5, 6))[0])
            with pytest.raises(BackendUnavailable):  # a replay is not confirmed either
                await engine.claim(requests(range(5, 6))[0])
        finally:
            await redis.config_set("appendonly", "yes")

        async def replayed() -> bool:
            try:
                return (await engine.claim(requests(range(5, 6))[0])).code == "dup"
            except BackendUnavailable:  # the AOF is being rewritten after switching it on
                return False

        await wait_for(replayed, within=10)
        decision = await engine.claim(requests(range(5, 6))[0])
        assert decision.claim_id in await stream_claim_ids(redis, "u5")
        period = decision.period
        assert int(await redis.hget(BenefitKeys("video").used(period), "u5") or 0) == 1


# -- replica ---------------------------------------------------------------------------------


async def test_replica_paused_claims_answer_503_within_the_timeout_then_the_same_claim(
    settings: Settings,
    pool: asyncpg.Pool,
    replicated: tuple[EmbeddedValkey, EmbeddedValkey],
) -> None:
    master, replica = replicated
    overrides = {"durability": "replica", "durability_timeout_ms": TIMEOUT_MS}
    async with durable_service(settings, pool, master.url, **overrides) as (client, redis):
        status, first = await claim(client, settings, "u1")
        assert status == 202, first
        assert replica.proc is not None
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            status, body = await claim(client, settings, "u2")
            elapsed = time.monotonic() - started
            assert status == 503 and body["error"] == "unavailable", body
            assert TIMEOUT_MS / 1000 <= elapsed < TIMEOUT_MS / 1000 + 1.0
            # A retry finds the claim taken, yet it is not durable either: 503 again.
            status, body = await claim(client, settings, "u2")
            assert status == 503, body
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        status, again = await claim(client, settings, "u2")
        assert status == 200 and again["replayed"] is True, again
        assert await stream_claim_ids(redis, "u2") == [again["claim_id"]]
        assert int(await redis.hget(BenefitKeys("video").used(again["period"]), "u2") or 0) == 1
        taken = await redis.hget(BenefitKeys("video").stock(again["period"]), "taken")
        assert int(taken or 0) == 2


async def test_replica_mode_and_local_refused_where_the_server_cannot_honour_them(
    settings: Settings, redis: Redis, aof_server: EmbeddedValkey
) -> None:
    with pytest.raises(ConfigError, match="AOF is off"):  # the shared test server has none
        await check_server(redis, replace(settings, durability="local"))
    own = await create_redis(aof_server.url)
    try:
        assert await check_server(own, replace(settings, durability="local")) == []
        with pytest.raises(ConfigError, match="0 replica"):
            await check_server(own, replace(settings, durability="replica"))
    finally:
        await own.aclose()


async def test_local_refuses_everysec_and_reads_info_where_config_is_disabled(
    settings: Settings, tmp_path: Path
) -> None:
    local = replace(settings, durability="local")
    no_config = ("--rename-command", "CONFIG", "")
    servers = {
        "everysec": EmbeddedValkey(tmp_path / "everysec"),
        "hidden_on": EmbeddedValkey(tmp_path / "on", extra=no_config),
        "hidden_off": EmbeddedValkey(tmp_path / "off", ephemeral=True, extra=no_config),
    }
    try:
        for server in servers.values():
            server.start()
        clients = {name: await create_redis(s.url) for name, s in servers.items()}
        with pytest.raises(ConfigError, match="'everysec', not 'always'"):
            await check_server(clients["everysec"], local)
        warnings = await check_server(clients["hidden_on"], local)
        assert len(warnings) == 1 and "appendfsync" in warnings[0]
        with pytest.raises(ConfigError, match="AOF is off"):
            await check_server(clients["hidden_off"], local)
        for client in clients.values():
            await client.aclose()
    finally:
        for server in servers.values():
            server.stop()


def test_servers_without_waitaof_or_replicas_are_refused() -> None:
    old = ServerFacts("redis", (7, 0, 15), "master", True, "always", 2)
    refusals, _ = durability_problems("local", 1, old)
    assert refusals == ["redis 7.0.15 has no WAITAOF (Redis 7.2 or later, or Valkey, is needed)"]
    fine = replace(old, version=(7, 2, 4))
    assert durability_problems("replica", 2, fine) == ([], [])
    refusals, _ = durability_problems("replica", 3, fine)
    assert refusals == ["2 replica(s) online, CLAIM_DURABILITY_REPLICAS=3"]
    replica = replace(fine, role="slave")
    assert "names a slave, not a master" in durability_problems("local", 1, replica)[0][0]
    assert durability_problems("none", 1, replace(fine, aof_enabled=False)) == ([], [])


def test_durability_settings_are_validated() -> None:
    env = {"CLAIM_DURABILITY": "replica", "CLAIM_DURABILITY_REPLICAS": "2"}
    settings = Settings.from_env(env)
    assert (settings.durability, settings.durability_replicas) == ("replica", 2)
    assert (settings.durability_timeout_ms, settings.redis_timeout_ms) == (500, 1000)
    for bad, message in (
        ({"CLAIM_DURABILITY": "disk"}, "CLAIM_DURABILITY must be one of"),
        ({"CLAIM_DURABILITY_REPLICAS": "0"}, "at least 1"),
        ({"CLAIM_DURABILITY_TIMEOUT_MS": "0"}, "CLAIM_DURABILITY_TIMEOUT_MS"),
        ({"CLAIM_REDIS_TIMEOUT_MS": "5"}, "CLAIM_REDIS_TIMEOUT_MS"),
        (
            {"CLAIM_DURABILITY": "local", "CLAIM_REDIS_TIMEOUT_MS": "500"},
            "must exceed CLAIM_DURABILITY_TIMEOUT_MS",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            Settings.from_env(bad)


def test_serve_refuses_to_start_in_a_mode_the_server_cannot_honour(
    settings: Settings, tmp_path: Path, procs: list[Any]
) -> None:
    log = tmp_path / "serve.log"
    proc, _ = spawn_serve(settings, log, CLAIM_DURABILITY="local")
    procs.append(proc)
    assert proc.wait(60) == 2
    output = log.read_text()
    assert "CLAIM_DURABILITY=local cannot be honoured by this Redis" in output
    assert "the server's AOF is off (appendonly no)" in output
    assert "Traceback" not in output
