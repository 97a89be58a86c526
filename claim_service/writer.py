"""The writer: moves accepted claims from the Redis Streams into PostgreSQL.

Each benefit's stream is read through the consumer group ``writers``. A batch is inserted in
one statement with ``ON CONFLICT DO NOTHING`` (a replayed entry never makes a second row) and
acknowledged only after the commit. Entries left pending by a dead writer are taken over with
XAUTOCLAIM once they have been idle for ``writer_claim_idle_ms``; several writers may run at
once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from claim_service.config import Settings
from claim_service.keyspace import (
    CATALOGUE_KEY,
    PREFIX,
    WRITER_GROUP,
    BenefitKeys,
    benefit_id_from_stream,
    text,
)

log = logging.getLogger(__name__)

DEAD_LETTER_STREAM = f"{PREFIX}:deadletter"
STREAM_REFRESH_S = 2.0
RECLAIM_EVERY_S = 1.0
RETRY_BACKOFF_MAX_S = 5.0
FIELDS = ("c", "r", "u", "b", "o", "p", "t", "a", "ts")
NOTIFY_CHANNEL = "claims_written"  # wakes fulfilment workers (see fulfilment.py)

# One statement: the rows and their first event, both only for entries not seen before.
INSERT_SQL = """
WITH inserted AS (
    INSERT INTO claims (claim_id, request_id, user_id, benefit_id, option_id, period, tier,
                        account, created_at)
    SELECT c, r, u, b, o, p, t, nullif(a, ''), to_timestamp(ts / 1000.0)
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::int[], $8::text[], $9::bigint[]) AS x(c, r, u, b, o, p, t, a, ts)
    ON CONFLICT DO NOTHING
    RETURNING claim_id, created_at
)
INSERT INTO claim_events (claim_id, from_status, to_status, reason, created_at)
SELECT claim_id, NULL, 'accepted', 'claimed', created_at FROM inserted
"""

Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass
class WriterStats:
    read: int = 0
    inserted: int = 0
    duplicates: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    errors: int = 0


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


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
        self.consumer = consumer or consumer_name()
        self.stats = WriterStats()
        self._streams: list[str] = []
        self._streams_at = 0.0
        self._reclaimed_at = 0.0
        self._own_backlog = True  # re-read our own pending entries first

    async def run(self, stop: asyncio.Event) -> None:
        log.info("writer %s started", self.consumer)
        backoff = 0.1
        while not stop.is_set():
            try:
                await self.step()
                backoff = 0.1
            except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
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
        log.info("writer %s stopped: %s", self.consumer, self.stats)

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
        ids = sorted(text(m) for m in await self.redis.smembers(CATALOGUE_KEY))
        streams = [BenefitKeys(bid).stream for bid in ids]
        for stream in set(streams) - set(self._streams):
            await ensure_group(self.redis, stream)
        self._streams, self._streams_at = streams, now
        return streams

    async def _read_and_write(self, streams: list[str], cursor: str, block: int | None) -> int:
        reply = await self.redis.xreadgroup(
            WRITER_GROUP,
            self.consumer,
            {s: cursor for s in streams},
            count=self.settings.writer_batch,
            block=block,
        )
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
        columns: list[list[Any]] = [[] for _ in FIELDS]
        good_ids: list[bytes] = []
        bad: list[Entry] = []
        claim_ids: list[str] = []
        for entry_id, fields in entries:
            try:
                values = [fields[f.encode()].decode() for f in FIELDS]
                row: list[Any] = [*values[:6], int(values[6]), values[7], int(values[8])]
            except (KeyError, ValueError, UnicodeDecodeError):
                bad.append((entry_id, fields))
                continue
            for column, value in zip(columns, row, strict=True):
                column.append(value)
            good_ids.append(entry_id)
            claim_ids.append(row[0])
        if good_ids:
            status = await self.pool.execute(INSERT_SQL, *columns)
            inserted = int(status.split()[-1])
            if inserted:
                await self.pool.execute(f"NOTIFY {NOTIFY_CHANNEL}")
            self.stats.inserted += inserted
            self.stats.duplicates += len(good_ids) - inserted
        self.stats.read += len(entries)
        self.stats.batches += 1
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, fields in bad:
                log.error(
                    "malformed claim entry %s in %s moved to %s",
                    entry_id,
                    stream,
                    DEAD_LETTER_STREAM,
                )
                pipe.xadd(DEAD_LETTER_STREAM, {b"stream": stream.encode(), **fields})  # type: ignore[dict-item]
            ids = good_ids + [e[0] for e in bad]
            pipe.xack(stream, WRITER_GROUP, *ids)
            pipe.xdel(stream, *ids)
            if claim_ids:
                pipe.hdel(_pending_key(stream), *claim_ids)
            await pipe.execute()
        self.stats.dead_lettered += len(bad)


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
    for member in await redis.smembers(CATALOGUE_KEY):
        stream = BenefitKeys(text(member)).stream
        try:
            total += int(await redis.xlen(stream))
        except ResponseError:
            continue
    return total
