"""Recovery never oversells: claims arriving during a warm, a Redis behind PostgreSQL, and a
request the member already used (which only a Redis that forgot it can accept twice)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.errors import BackendUnavailable
from claim_service.local.embedded import free_port, valkey_binary
from claim_service.store import catalogue_store
from claim_service.store.connections import create_redis
from claim_service.store.keyspace import DEAD_LETTER_STREAM, BenefitKeys, idem_field, text
from claim_service.store.recovery import Recovery
from claim_service.store.tiers import save_tiers
from tests.helpers import benefit_body, drain, fast


async def _benefit(settings: Settings, redis: Redis, pool: asyncpg.Pool, stock: int, n: int):
    period = periods.current_period(settings.tz)
    benefit = parse_benefit("video", benefit_body(stock=stock, quota=1), settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    await save_tiers(pool, redis, period, [(f"u{i}", 5) for i in range(n)])
    return period


async def _assert_within_stock_and_quota(
    pool: asyncpg.Pool, redis: Redis, period: str, stock: int
) -> int:
    rows = await pool.fetch("SELECT user_id FROM claims WHERE status <> 'refunded'")
    assert len(rows) <= stock, f"{len(rows)} claims persisted for a stock of {stock}"
    per_member = Counter(r["user_id"] for r in rows)
    assert max(per_member.values(), default=0) <= 1, "a member holds two claims (quota 1)"
    taken = int(await redis.hget(BenefitKeys("video").stock(period), "taken") or 0)
    assert taken == len(rows), "Redis's counter disagrees with the claims persisted"
    return len(rows)


async def test_claims_arriving_during_warm_never_oversell(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """Redis comes back empty, and claims pour in all the while ``warm`` rebuilds it: none
    may be decided against half-restored counters (the old warm pushed the catalogue and
    tiers first, so claims were taken against zero and then hidden by max(Redis, PG))."""
    stock, members = 40, 2000
    period = await _benefit(settings, redis, pool, stock, members)
    engine = ClaimEngine(redis, settings, pool=pool)
    first = await asyncio.gather(
        *(engine.claim(ClaimRequest("video", f"u{i}", "r", "iqiyi")) for i in range(10))
    )
    assert all(d.code == "ok" for d in first)
    await drain(ClaimWriter(redis, pool, fast(settings)))
    member_ids = itertools.cycle(range(10, members))
    refused: list[BaseException] = []

    async def flood(done: asyncio.Event) -> None:
        while not done.is_set():
            request = ClaimRequest("video", f"u{next(member_ids)}", "r", "iqiyi")
            try:
                await engine.claim(request)
            except BackendUnavailable as exc:  # "being recovered": the client retries
                refused.append(exc)
            await asyncio.sleep(0)

    for _round in range(3):
        await redis.flushall()  # Redis came back empty
        done = asyncio.Event()
        flooders = [asyncio.create_task(flood(done)) for _ in range(16)]
        await asyncio.sleep(0.01)
        await Recovery(pool, redis, settings).ensure_all(force=True, tier_periods=[period])
        await asyncio.sleep(0.05)
        done.set()
        await asyncio.gather(*flooders)
        await drain(ClaimWriter(redis, pool, fast(settings)))
        await _assert_within_stock_and_quota(pool, redis, period, stock)
    assert await _assert_within_stock_and_quota(pool, redis, period, stock) == stock


async def test_a_redis_that_lost_its_counters_is_rebuilt_before_the_next_claim(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """Persisted claims and claims still in the stream both count: a member at quota stays
    at quota, a retry returns its claim, the stock left is exact."""
    period = await _benefit(settings, redis, pool, 10, 20)
    engine = ClaimEngine(redis, settings, pool=pool)
    persisted = await engine.claim(ClaimRequest("video", "u0", "r", "iqiyi"))
    await drain(ClaimWriter(redis, pool, fast(settings)))
    in_stream = await engine.claim(ClaimRequest("video", "u1", "r", "iqiyi"))
    keys = BenefitKeys("video")
    # A stale copy on another server process: counters and idempotency keys gone, the
    # stream (not yet written) kept, and no marker naming this server.
    await redis.delete(keys.stock(period), keys.used(period), keys.idempotency(period), keys.live)

    fresh = ClaimEngine(redis, settings, pool=pool)
    assert (await fresh.claim(ClaimRequest("video", "u0", "other", "iqiyi"))).code == "quota"
    assert (await fresh.claim(ClaimRequest("video", "u1", "other", "iqiyi"))).code == "quota"
    replay = await fresh.claim(ClaimRequest("video", "u1", "r", "iqiyi"))
    assert replay.code == "dup" and replay.claim_id == in_stream.claim_id
    replay = await fresh.claim(ClaimRequest("video", "u0", "r", "iqiyi"))
    assert replay.code == "dup" and replay.claim_id == persisted.claim_id
    new = await fresh.claim(ClaimRequest("video", "u2", "r", "iqiyi"))
    assert new.code == "ok" and new.stock_left == 10 - 3


class _Valkey:
    """A Valkey process of this test's own, so it can be replaced by an older copy."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [str(valkey_binary()), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.data_dir), "--appendonly", "no", "--save", ""]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_valkey(tmp_path: Path):
    server = _Valkey(tmp_path / "valkey")
    server.start()
    yield server
    server.stop()


async def test_redis_replaced_by_a_copy_behind_postgresql_never_oversells(
    settings: Settings, pool: asyncpg.Pool, own_valkey: _Valkey, tmp_path: Path
) -> None:
    """Redis is replaced by an older copy of itself (a restore, a replica that lagged):
    everything claimed since the copy is in PostgreSQL only. The new server must rebuild
    before deciding, so stock and quotas hold."""
    stock, members = 20, 80
    redis = await create_redis(own_valkey.url)
    try:
        period = await _benefit(settings, redis, pool, stock, members)
        engine = ClaimEngine(redis, settings, pool=pool)
        writer = ClaimWriter(redis, pool, fast(settings))
        for i in range(8):
            assert (await engine.claim(ClaimRequest("video", f"u{i}", "r", "iqiyi"))).accepted
        await drain(writer)
        await redis.save()  # the copy: 8 claims
        snapshot = tmp_path / "copy.rdb"
        shutil.copy(own_valkey.data_dir / "dump.rdb", snapshot)
        for i in range(8, 16):  # 8 more, persisted: the copy does not know them
            assert (await engine.claim(ClaimRequest("video", f"u{i}", "r", "iqiyi"))).accepted
        await drain(writer)

        own_valkey.stop()
        shutil.copy(snapshot, own_valkey.data_dir / "dump.rdb")
        own_valkey.start()
        for _ in range(100):  # the pool's old connections fail once, then reconnect
            try:
                await redis.ping()
                break
            except RedisError:
                await asyncio.sleep(0.05)
        # The copy believes 8 were taken and the members u8..u15 never claimed.
        assert int(await redis.hget(BenefitKeys("video").stock(period), "taken") or 0) == 8

        # Everyone tries again, and new members too, all at once.
        results = await asyncio.gather(
            *(
                engine.claim(ClaimRequest("video", f"u{i}", f"again-{i}", "iqiyi"))
                for i in range(members)
            )
        )
        codes = Counter(d.code for d in results)
        assert codes["ok"] == stock - 16, codes
        assert all(results[i].code == "quota" for i in range(16))
        await drain(writer)
        assert await _assert_within_stock_and_quota(pool, redis, period, stock) == stock
    finally:
        await redis.aclose()


async def test_a_redis_restored_in_place_is_found_behind_and_repaired(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """Restored into the same server process (the marker looks valid): the running check
    compares Redis with PostgreSQL, finds it behind and rebuilds it by itself."""
    period = await _benefit(settings, redis, pool, 10, 10)
    engine = ClaimEngine(redis, settings, pool=pool)
    writer = ClaimWriter(redis, pool, fast(settings))
    assert (await engine.claim(ClaimRequest("video", "u0", "r", "iqiyi"))).accepted
    await drain(writer)
    keys = BenefitKeys("video")
    saved: dict[str, bytes] = {}
    for key in (keys.stock(period), keys.used(period)):
        dumped = await redis.dump(key)
        assert isinstance(dumped, bytes)
        saved[key] = dumped
    for i in range(1, 6):
        assert (await engine.claim(ClaimRequest("video", f"u{i}", "r", "iqiyi"))).accepted
    await drain(writer)
    for key, value in saved.items():  # back in time, same process
        await redis.restore(key, 0, value, replace=True)
    assert int(await redis.hget(keys.stock(period), "taken") or 0) == 1

    stop = asyncio.Event()
    watch = asyncio.create_task(Recovery(pool, redis, settings).watch(stop, lag_check_every_s=0.1))
    try:
        for _ in range(100):
            if int(await redis.hget(keys.stock(period), "taken") or 0) == 6:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await watch
    assert int(await redis.hget(keys.stock(period), "taken") or 0) == 6
    assert (await engine.claim(ClaimRequest("video", "u3", "again", "iqiyi"))).code == "quota"


async def test_writer_never_swallows_a_reused_request_id(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """A second claim for a request the member already holds (Redis forgot the first) is
    dead-lettered and reported, and its unit and quota are given back: it used to be counted
    as a duplicate, leaking the unit and leaving the member a claim id that answers 404."""
    period = await _benefit(settings, redis, pool, 10, 5)
    engine = ClaimEngine(redis, settings, pool=pool)
    writer = ClaimWriter(redis, pool, fast(settings))
    original = await engine.claim(ClaimRequest("video", "u1", "r", "iqiyi"))
    await drain(writer)
    keys = BenefitKeys("video")
    await redis.hdel(keys.idempotency(period), idem_field("u1", "r"))
    await redis.hset(keys.used(period), "u1", 0)  # the forgetful copy
    second = await engine.claim(ClaimRequest("video", "u1", "r", "iqiyi"))
    assert second.code == "ok" and second.claim_id != original.claim_id
    assert int(await redis.hget(keys.stock(period), "taken") or 0) == 2

    await drain(writer)
    assert await pool.fetchval("SELECT count(*) FROM claims") == 1
    dead = await redis.xrange(DEAD_LETTER_STREAM) or []
    assert len(dead) == 1
    fields = {text(k): text(v) for k, v in (dead[0][1] or {}).items()}
    assert fields["c"] == second.claim_id and fields["why"] == "request_conflict"
    anomaly = await pool.fetchrow("SELECT kind, claim_id, detail FROM anomalies")
    assert anomaly is not None
    assert anomaly["kind"] == "request_conflict" and anomaly["claim_id"] == second.claim_id
    assert orjson.loads(anomaly["detail"])["original_claim_id"] == original.claim_id
    assert int(await redis.hget(keys.stock(period), "taken") or 0) == 1
    assert int(await redis.hget(keys.used(period), "u1") or 0) == 0
    assert await redis.hlen(keys.pending) == 0


async def test_rows_persisted_during_the_check_are_not_mistaken_for_a_redis_behind(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """Claims keep being accepted and persisted while the check runs (a release): rows that
    reach PostgreSQL during the check were accepted by Redis before they could be written,
    so Redis must not be found behind, and rebuilt mid-release, because of them."""
    await _benefit(settings, redis, pool, 20, 20)
    engine = ClaimEngine(redis, settings, pool=pool)
    for i in range(5):
        assert (await engine.claim(ClaimRequest("video", f"u{i}", "r", "iqiyi"))).accepted
    await drain(ClaimWriter(redis, pool, fast(settings)))
    async with pool.acquire() as writer_conn, writer_conn.transaction():
        # The check's read of PostgreSQL waits behind this transaction.
        await writer_conn.execute("LOCK TABLE claims IN ACCESS EXCLUSIVE MODE")
        check = asyncio.create_task(Recovery(pool, redis, settings).behind())

        async def waiting() -> bool:
            return bool(
                await writer_conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                )
            )

        for _ in range(200):
            if await waiting() or check.done():
                break
            await asyncio.sleep(0.01)
        # Meanwhile five more claims are accepted and persisted (as a writer would).
        for i in range(5, 10):
            assert (await engine.claim(ClaimRequest("video", f"u{i}", "r", "iqiyi"))).accepted
        await writer_conn.execute(
            """CREATE TEMP TABLE more ON COMMIT DROP AS SELECT * FROM claims;
               UPDATE more SET claim_id = claim_id || 'x', request_id = request_id || 'x',
                               user_id = user_id || 'x';
               INSERT INTO claims SELECT * FROM more"""
        )
    assert await check == []
    assert await pool.fetchval("SELECT count(*) FROM claims") == 10
