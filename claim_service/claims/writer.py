"""The writer: moves accepted claims from the Redis Streams into PostgreSQL.

Each benefit's stream is read through the consumer group ``writers``. A batch is inserted in
one statement with ``ON CONFLICT (claim_id) DO NOTHING`` (a replayed entry never makes a
second row) and acknowledged only after the commit. Entries left pending by a dead writer are
taken over with XAUTOCLAIM once they have been idle for ``writer_claim_idle_ms``; several
writers may run at once.

An entry whose ``request_id`` the member already used for another claim (which only a Redis
that forgot the first one can produce) is never swallowed as a duplicate: it is moved to the
dead-letter stream, recorded as a ``request_conflict`` anomaly, and its unit and quota are
given back.

Every ``reconcile_every_s`` a writer also compares Redis's counters with PostgreSQL and the
stream (``store.reconcile``): drift is logged and exported as ``claim_drift``, not repaired.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from claim_service.claims.persist import CONFLICTS_SQL, claim_row, insert_claims
from claim_service.config import Settings, instance_name
from claim_service.errors import BackendUnavailable
from claim_service.store.anomalies import REQUEST_CONFLICT, record_anomaly
from claim_service.store.buckets import keys_of_member, stream_owners
from claim_service.store.campaign_rewards import release_due
from claim_service.store.connections import is_cluster
from claim_service.store.keyspace import (
    CLAIMS_WRITTEN_CHANNEL,
    DEAD_LETTER_STREAM,
    PERIOD_KEY_TTL_S,
    WRITER_GROUP,
    BenefitKeys,
    Scripts,
    benefit_id_from_stream,
    text,
)
from claim_service.store.points_ledger import expire_due
from claim_service.store.reconcile import Reconciler
from claim_service.store.stock_events import announce

log = logging.getLogger(__name__)

STREAM_REFRESH_S = 2.0
RECLAIM_EVERY_S = 1.0
RETRY_BACKOFF_MAX_S = 5.0
Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass
class WriterStats:
    read: int = 0
    inserted: int = 0
    duplicates: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    conflicts: int = 0
    batches: int = 0
    errors: int = 0


class ClaimWriter:
    """One writer process's loop. ``run`` returns when ``stop`` is set."""

    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        consumer: str | None = None,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.settings = settings
        self.consumer = consumer or instance_name()
        self.stats = WriterStats()
        self._streams: list[str] = []
        self._streams_at = 0.0
        self._reclaimed_at = 0.0
        self._own_backlog = True  # re-read our own pending entries first

    async def run(self, stop: asyncio.Event) -> None:
        log.info("writer %s started", self.consumer)
        checks = []
        if self.settings.reconcile_every_s > 0:  # drift is logged and exported, not repaired
            drift = Reconciler(self.pool, self.redis, self.settings)
            checks.append(asyncio.create_task(drift.watch(stop, self.settings.reconcile_every_s)))
        if self.settings.points_expire_every_s > 0:  # expired points lots written off
            expire = partial(expire_due, self.pool, self.redis)
            every = self.settings.points_expire_every_s
            checks.append(asyncio.create_task(self._every(stop, every, "points expiry", expire)))
        if self.settings.rewards_release_every_s > 0:  # campaign rewards out of their cool-off
            release = partial(release_due, self.pool, self.redis)
            every = self.settings.rewards_release_every_s
            checks.append(
                asyncio.create_task(self._every(stop, every, "campaign reward release", release))
            )
        try:
            await self._run(stop)
        finally:
            for check in checks:
                check.cancel()
            await asyncio.gather(*checks, return_exceptions=True)
        log.info("writer %s stopped: %s", self.consumer, self.stats)

    async def _every(
        self, stop: asyncio.Event, every_s: float, what: str, job: Callable[[], Awaitable[Any]]
    ) -> None:
        """Run ``job`` every ``every_s`` until ``stop``; a backend's failure is logged and
        the next turn tries again."""
        while not stop.is_set():
            try:
                await job()
            except (
                RedisError,
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                BackendUnavailable,
            ) as exc:
                log.warning("%s failed (%s: %s)", what, type(exc).__name__, exc)
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                await self.step()
                backoff = 0.1
            except (
                RedisError,
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                BackendUnavailable,
            ) as exc:
                # Nothing is acknowledged on failure: the entries stay pending and are
                # read again from our own backlog once the backend is back.
                self.stats.errors += 1
                self._own_backlog = True
                log.warning(
                    "writer step failed (%s: %s); retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                try:
                    await asyncio.wait_for(stop.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, RETRY_BACKOFF_MAX_S)

    async def step(self) -> int:
        """Read one round of entries and persist them; returns how many were handled."""
        streams = await self._refresh_streams()
        if not streams:
            await asyncio.sleep(self.settings.writer_block_ms / 1000)
            return 0
        handled = 0
        if self._own_backlog:
            handled += await self._read_and_write(streams, "0", block=None)
            if handled == 0:
                self._own_backlog = False
            return handled
        now = time.monotonic()
        if now - self._reclaimed_at >= RECLAIM_EVERY_S:
            self._reclaimed_at = now
            handled += await self._reclaim(streams)
        handled += await self._read_and_write(streams, ">", block=self.settings.writer_block_ms)
        return handled

    async def _refresh_streams(self) -> list[str]:
        now = time.monotonic()
        if now - self._streams_at < STREAM_REFRESH_S and self._streams:
            return self._streams
        streams = [BenefitKeys(owner).stream for owner in await stream_owners(self.redis)]
        for stream in set(streams) - set(self._streams):
            await ensure_group(self.redis, stream)
        self._streams, self._streams_at = streams, now
        return streams

    async def _read_and_write(self, streams: list[str], cursor: str, block: int | None) -> int:
        if is_cluster(self.redis) and len(streams) > 1:
            # A cluster reads one slot per command: each benefit's stream on its own, none
            # of them blocking, then a pause as long as the block when all were empty.
            handled = 0
            for one in streams:
                handled += await self._read_and_write([one], cursor, None)
            if handled == 0 and block:
                await asyncio.sleep(block / 1000)
            return handled
        try:
            reply = await self.redis.xreadgroup(
                WRITER_GROUP,
                self.consumer,
                {s: cursor for s in streams},
                count=self.settings.writer_batch,
                block=block,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost the streams (restarted empty, or replaced): create them again.
            log.warning("writer %s: consumer group missing; creating it again", self.consumer)
            for name in streams:
                await ensure_group(self.redis, name)
            return 0
        handled = 0
        for stream, entries in cast(list[tuple[bytes, list[Entry]]], reply or []):
            entries = [e for e in entries if e[1]]  # deleted entries come back empty
            if entries:
                await self.write(text(stream), entries)
                handled += len(entries)
        return handled

    async def _reclaim(self, streams: list[str]) -> int:
        handled = 0
        for stream in streams:
            start = "0-0"
            while True:
                reply = await self.redis.xautoclaim(
                    stream,
                    WRITER_GROUP,
                    self.consumer,
                    min_idle_time=self.settings.writer_claim_idle_ms,
                    start_id=start,
                    count=self.settings.writer_batch,
                )
                start = text(reply[0])
                entries = [e for e in reply[1] if e and e[1]]
                if entries:
                    self.stats.reclaimed += len(entries)
                    log.info(
                        "writer %s took over %d idle entries of %s",
                        self.consumer,
                        len(entries),
                        stream,
                    )
                    await self.write(stream, entries)
                    handled += len(entries)
                if start == "0-0":
                    break
        return handled

    async def write(self, stream: str, entries: list[Entry]) -> None:
        """Insert ``entries`` in one statement, then XACK, XDEL and clear the pending index."""
        good: list[tuple[bytes, dict[bytes, bytes], list[Any]]] = []
        bad: list[tuple[Entry, str]] = []
        for entry_id, fields in entries:
            row = claim_row(fields)
            if row is None:
                bad.append(((entry_id, fields), "malformed"))
                continue
            good.append((entry_id, fields, row))
        conflicts = await self._request_conflicts([g[2] for g in good])
        kept = []
        for entry_id, fields, row in good:
            if row[0] in conflicts:
                await self._give_back(row, fields, conflicts[row[0]])
                bad.append(((entry_id, fields), "request_conflict"))
            else:
                kept.append((entry_id, fields, row))
        if kept:
            inserted = await insert_claims(self.pool, [(f, row) for _, f, row in kept])
            if inserted:
                await self.pool.execute(f"NOTIFY {CLAIMS_WRITTEN_CHANNEL}")
            self.stats.inserted += inserted
            self.stats.duplicates += len(kept) - inserted
        self.stats.read += len(entries)
        self.stats.batches += 1
        async with self.redis.pipeline(transaction=False) as pipe:
            for (entry_id, fields), why in bad:
                if why == "malformed":
                    log.error(
                        "malformed claim entry %s in %s moved to %s",
                        entry_id,
                        stream,
                        DEAD_LETTER_STREAM,
                    )
                dead = {b"stream": stream.encode(), b"why": why.encode(), **fields}
                pipe.xadd(DEAD_LETTER_STREAM, dead)  # type: ignore[arg-type]
            ids = [entry_id for entry_id, _, _ in kept] + [e[0] for e, _ in bad]
            pipe.xack(stream, WRITER_GROUP, *ids)
            pipe.xdel(stream, *ids)
            claim_ids = [row[0] for _, _, row in kept] + [
                e[1][b"c"].decode() for e, why in bad if why == "request_conflict"
            ]
            if claim_ids:
                pipe.hdel(_pending_key(stream), *claim_ids)
            await pipe.execute()
        self.stats.dead_lettered += len(bad)

    async def _request_conflicts(self, rows: list[list[Any]]) -> dict[str, str]:
        """claim_id -> the claim the member already holds for the same request_id, for every
        row that repeats a request (persisted, or earlier in this batch)."""
        if not rows:
            return {}
        found: dict[str, str] = {
            r["c"]: r["original"]
            for r in await self.pool.fetch(
                CONFLICTS_SQL,
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
                [r[5] for r in rows],
                [r[10] or r[0] for r in rows],
            )
        }
        first: dict[tuple[str, str, str, str], str] = {}
        for row in rows:
            request = (row[3], row[5], row[2], row[1])
            group = row[10] or row[0]  # the options of one bundle share their request
            earlier = first.setdefault(request, group)
            if earlier != group:
                found.setdefault(row[0], earlier)
        return found

    async def _give_back(self, row: list[Any], fields: dict[bytes, bytes], original: str) -> None:
        """A claim that repeats a request takes nothing: its unit, quota, code and points go
        back (the ledger never recorded its points: nothing to refund there)."""
        claim_id, request_id, user_id, benefit_id, option_id, period = row[:6]
        keys = await keys_of_member(self.redis, benefit_id, user_id)
        done = await Scripts(self.redis).refund(
            keys=keys.refund_keys(period, cluster=is_cluster(self.redis)),
            args=[
                claim_id,
                user_id,
                option_id,
                "0" if row[9] is None else "1",
                PERIOD_KEY_TTL_S,
                row[9] or 0,
                fields.get(b"pl", b"").decode(),
                row[10] or "",
                row[12],
                fields.get(b"dz", b"").decode(),
            ],
        )
        if int(done[0]) < 0:  # counters being recovered: keep the entry and try again later
            raise BackendUnavailable(f"benefit {benefit_id} is being recovered")
        if int(done[0]):
            await announce(self.redis, benefit_id)
        self.stats.conflicts += 1
        await record_anomaly(
            self.pool,
            REQUEST_CONFLICT,
            claim_id,
            benefit_id,
            {
                "original_claim_id": original,
                "user_id": user_id,
                "request_id": request_id,
                "period": period,
            },
        )


def _pending_key(stream: str) -> str:
    return BenefitKeys(benefit_id_from_stream(stream)).pending


async def ensure_group(redis: Redis, stream: str) -> None:
    try:
        await redis.xgroup_create(stream, WRITER_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def backlog(redis: Redis) -> int:
    """Entries accepted but not yet acknowledged by a writer, over all benefits."""
    total = 0
    for owner in await stream_owners(redis):
        stream = BenefitKeys(owner).stream
        try:
            total += int(await redis.xlen(stream))
        except ResponseError:
            continue
    return total
