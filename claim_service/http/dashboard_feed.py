"""The ops dashboard's numbers: one ``Dashboard`` per worker samples them while someone
watches, and every viewer of that worker is sent the same snapshot, encoded once.

Why one aggregator: a dashboard left open by ten people must not read Redis ten times a
second each. The sampler runs only while a viewer is connected. Each tick (``TICK_S``) it
reads the catalogue's ids, then Redis in one pipelined round trip; every ``PG_EVERY_S`` a
few small PostgreSQL queries (and four for each campaign shown); Prometheus counters from
memory (or from this serve's workers' files). It builds one snapshot, encodes it once and
wakes the viewers. A viewer holds no queue of its own: one that is slow to write skips
straight to the latest snapshot.

Where each number comes from, and so how far it reaches:

- every process (global): stock, option caps and free codes (Redis), claims accepted and
  claims/s (the per-period ``accepted`` counters ``claim.lua`` keeps), writer backlog and lag
  (the streams), fulfilment states, partner orders, card-key pools, campaigns (PostgreSQL);
- this serve (all its workers under ``--workers N``, else this process), since it started:
  decisions by outcome, 503/429 shed counts, and breaker state and drift as far as they are
  reported to this serve's metrics (drift by a ``serve --writer``);
- every fulfil worker: partners' breaker states, as each reports them to Redis
  (``store.partner_health``; the worst fresh one per partner);
- this worker: the claims/s history, sampled only while this worker had a viewer (gaps
  otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import asyncpg
import orjson
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service import metrics
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.rooms import WaitingRooms
from claim_service.domain.catalogue import Benefit
from claim_service.errors import BackendUnavailable
from claim_service.fulfilment.vouchers import pool_levels
from claim_service.http.dashboard_rows import (
    STATES,
    benefit_row,
    campaign_rows,
    counters,
    fulfilment_rows,
    partner_counts,
    phase,
)
from claim_service.store.buckets import stock_counters
from claim_service.store.connections import is_cluster
from claim_service.store.keyspace import BenefitKeys, text
from claim_service.store.partner_health import breaker_states, read_breakers
from claim_service.store.reconcile import free_codes

log = logging.getLogger(__name__)

TICK_S = 1.0
PG_EVERY_S = 3.0  # PostgreSQL-backed numbers (fulfilment, partners, pools) move slower
HISTORY = 300  # claims/s samples kept: five minutes at one a tick
HEARTBEAT_S = 15.0  # a comment on a stream that got no snapshot for this long
MAX_VIEWERS = 64  # dashboard streams per worker; more get 503 too_many_streams
REDIS_ERRORS = (RedisError, BackendUnavailable, OSError)
PG_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    BackendUnavailable,
    OSError,
    TimeoutError,
)

# One row per benefit, option and state of the current periods' claims (``claims_benefit_
# period`` index). A bundle's items are rows of their own: states count deliveries.
FULFILMENT_SQL = """
SELECT c.benefit_id, c.option_id, c.status, count(*) AS n,
       count(*) FILTER (WHERE c.outcome_unknown_since IS NOT NULL) AS unknown
FROM claims c
JOIN unnest($1::text[], $2::text[]) AS cur(benefit_id, period)
  ON c.benefit_id = cur.benefit_id AND c.period = cur.period
GROUP BY 1, 2, 3
"""


def frame(seq: int, snapshot: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying a whole snapshot."""
    return b"id: %d\nevent: snapshot\ndata: %s\n\n" % (seq, orjson.dumps(snapshot))


class Dashboard:
    """One per worker: the latest snapshot, sampled by ``run`` while ``viewers`` > 0."""

    def __init__(
        self,
        engine: ClaimEngine,
        redis: Redis,
        pool: asyncpg.Pool,
        *,
        tick_s: float = TICK_S,
        pg_every_s: float = PG_EVERY_S,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.engine = engine
        self.redis = redis
        self.pool = pool
        self.tick_s = tick_s
        self.pg_every_s = pg_every_s
        self.registry = registry or metrics.registry()
        self._rooms_service = WaitingRooms(engine, redis, pool)
        self._breakers: dict[bytes | str, bytes | str] = {}
        self.scope = "serve" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "process"
        self.viewers = 0
        self.closed = False
        self.seq = 0
        self.frame = b""
        self.rates: deque[tuple[int, float]] = deque(maxlen=HISTORY)
        self._published = asyncio.get_running_loop().create_future()
        self._watched = asyncio.Event()
        self._accepted: dict[tuple[str, str], int] = {}
        self._accepted_at: float | None = None
        self._live: list[dict[str, Any]] = []
        self._rooms: dict[str, Any] = {}
        self._redis_ok = True  # until a read fails (each outage is logged once)
        self._pg: dict[str, Any] = {"fulfilment": {}, "partners": {}, "code_pools": []}
        self._pg["campaigns"] = []
        self._pg_at_ms: int | None = None
        self._pg_read_at = -float("inf")
        self._pg_ok = True

    # -- viewers ---------------------------------------------------------------------------

    def join(self) -> None:
        self.viewers += 1
        self._watched.set()

    def leave(self) -> None:
        self.viewers -= 1
        if self.viewers == 0:
            self._watched.clear()

    async def next_frame(self, sent: int) -> tuple[int, bytes] | None:
        """The latest snapshot if newer than ``sent`` (waiting for one up to
        ``HEARTBEAT_S``); None when none came in time or the dashboard closed."""
        if self.seq == sent and not self.closed:
            await asyncio.wait([self._published], timeout=HEARTBEAT_S)
        if self.seq == sent or self.closed:
            return None
        return self.seq, self.frame

    def close(self) -> None:
        """Shutting down: every stream wakes, sees ``closed`` and ends."""
        self.closed = True
        self._wake_viewers()

    def _wake_viewers(self) -> None:
        published, self._published = self._published, asyncio.get_running_loop().create_future()
        if not published.done():
            published.set_result(None)

    # -- sampling --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Sample every ``tick_s`` while watched, until ``stop``."""
        while not stop.is_set():
            if not self.viewers:
                # A rate across a stretch nobody watched would be averaged over it: start
                # again from the next sample instead (the chart shows the gap).
                self._accepted_at = None
                await _first(stop.wait(), self._watched.wait())
                continue
            started = time.monotonic()
            try:
                self.publish(await self.sample())
            except Exception:  # a bug here must not leave the viewers without numbers for good
                log.exception("dashboard: sampling failed; trying again next tick")
            pause = max(self.tick_s - (time.monotonic() - started), 0.05)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)

    def publish(self, snapshot: dict[str, Any]) -> None:
        self.seq += 1
        self.frame = frame(self.seq, snapshot)
        self._wake_viewers()

    async def sample(self) -> dict[str, Any]:
        """One snapshot. A store that fails keeps its last numbers, flagged as stale."""
        try:
            self._live = await self._read_redis()
            self._rooms = await self._waiting_rooms(self._live)
            self._breakers = await read_breakers(self.redis)
            self._redis_ok = True
            self._count_rate()
        except REDIS_ERRORS as exc:
            if self._redis_ok:
                log.warning("dashboard: Redis not read (%r); showing the last numbers", exc)
            self._redis_ok = False
        if time.monotonic() - self._pg_read_at >= self.pg_every_s:
            self._pg_read_at = time.monotonic()
            try:
                self._pg = await self._read_pg()
                self._pg_at_ms = int(time.time() * 1000)
                self._pg_ok = True
            except PG_ERRORS as exc:
                if self._pg_ok:
                    log.warning("dashboard: PostgreSQL not read (%r); showing the last ones", exc)
                self._pg_ok = False
        return self._snapshot()

    async def _read_redis(self) -> list[dict[str, Any]]:
        """Every benefit's counters for its current period, in one pipelined read."""
        benefits: list[Benefit] = []
        for benefit_id in sorted(await self.engine.benefit_ids()):
            benefit = await self.engine.benefit(benefit_id)
            if benefit is not None:
                benefits.append(benefit)
        clock_ms = self.engine.redis_ms()
        spans = [self.engine.span(b, clock_ms) for b in benefits]
        cluster = is_cluster(self.redis)
        async with self.redis.pipeline(transaction=False) as pipe:
            if not cluster:  # a cluster pipeline takes neither TIME nor scripts
                pipe.time()
            for benefit, span in zip(benefits, spans, strict=True):
                keys = BenefitKeys(benefit.benefit_id)
                if not cluster:
                    await self.engine.scripts.live(keys=[keys.live], args=["check"], client=pipe)
                pipe.hgetall(keys.stock(span.period))
                pipe.xlen(keys.stream)
                pipe.xrange(keys.stream, count=1)
                pipe.hgetall(keys.codes)
            replies = await pipe.execute()
        if cluster:  # each benefit's marker checked on its own primary; the clock as seen
            marks = [
                await self.engine.scripts.live(
                    keys=[BenefitKeys(b.benefit_id).live], args=["check"]
                )
                for b in benefits
            ]
            replies = [None] + [
                x for i, mark in enumerate(marks) for x in (mark, *replies[4 * i : 4 * i + 4])
            ]
            now_ms = self.engine.redis_ms()
        else:
            seconds, micros = replies[0]
            now_ms = int(seconds) * 1000 + int(micros) // 1000
        rows = []
        for i, (benefit, span) in enumerate(zip(benefits, spans, strict=True)):
            marked, stock, backlog, oldest, codes = replies[1 + 5 * i : 6 + 5 * i]
            counters = {text(k): int(v) for k, v in stock.items()}
            if benefit.shards > 1:  # its claims are counted in its buckets
                counters = await stock_counters(
                    self.redis, benefit.benefit_id, benefit.shards, span.period
                )
            buckets = []
            for name, value in codes.items():
                option_id, _, expiry = text(name).partition("|")
                buckets.append((option_id, int(expiry or 0), int(value)))
            lag_ms = None
            if oldest:
                lag_ms = max(now_ms - int(text(oldest[0][0]).partition("-")[0]), 0)
            rows.append(
                benefit_row(
                    benefit,
                    span.period,
                    phase(benefit, span.opens_ms, span.closes_ms, now_ms),
                    bool(marked),
                    counters,
                    free_codes(buckets, now_ms),
                    int(backlog),
                    lag_ms,
                )
            )
        return rows

    async def _waiting_rooms(self, benefits: list[dict[str, Any]]) -> dict[str, Any]:
        """Each benefit's waiting room now (a ``RoomSummary`` of the OpenAPI document), by
        benefit id; a benefit left out has none. One ``room.lua`` call per room, each tick
        (its errors count as Redis's)."""
        found: dict[str, Any] = {}
        for row in benefits:
            benefit = await self.engine.benefit(row["benefit_id"])
            if benefit is None or benefit.waiting_room is None:
                continue
            view, times = await self._rooms_service.look(benefit)
            found[benefit.benefit_id] = WaitingRooms.summary(benefit.benefit_id, view, times)
        return found

    def _count_rate(self) -> None:
        """Claims accepted per second since the last tick, over every benefit and worker."""
        accepted = {(b["benefit_id"], b["period"]): b["accepted"] for b in self._live}
        now = time.monotonic()
        if self._accepted_at is not None and now > self._accepted_at:
            # A benefit or period first seen since the last tick started from zero.
            delta = sum(max(n - self._accepted.get(k, 0), 0) for k, n in accepted.items())
            rate = round(delta / (now - self._accepted_at), 1)
            self.rates.append((int(time.time() * 1000), rate))
        self._accepted, self._accepted_at = accepted, now

    async def _read_pg(self) -> dict[str, Any]:
        current = [(b["benefit_id"], b["period"]) for b in self._live]
        rows = await self.pool.fetch(
            FULFILMENT_SQL, [c[0] for c in current], [c[1] for c in current]
        )
        fulfilment, partners = fulfilment_rows([dict(r) for r in rows], self._live)
        fields = ("benefit_id", "option_id", "loaded", "assigned", "free", "expired")
        pools = [{k: level[k] for k in fields} for level in await pool_levels(self.pool)]
        found = {"fulfilment": fulfilment, "partners": partners, "code_pools": pools}
        return {**found, "campaigns": await campaign_rows(self.pool, self._pg["campaigns"])}

    # -- the snapshot ----------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        metric = counters(self.registry)
        drift = metric["drift"]
        pg = self._pg
        benefits = []
        for row in self._live:
            benefit_id = row["benefit_id"]
            benefits.append(
                {
                    **row,
                    "fulfilment": pg["fulfilment"].get(benefit_id, dict.fromkeys(STATES, 0)),
                    "drift": drift.get(benefit_id),
                    "waiting_room": self._rooms.get(benefit_id),
                }
            )
        lags = [b["lag_ms"] for b in self._live if b["lag_ms"] is not None]
        free_in_redis = {
            (b["benefit_id"], o["option_id"]): o["codes_free"]
            for b in self._live
            for o in b["options"]
            if o["codes_free"] is not None
        }
        partner_ids = sorted({o["partner"] for b in self._live for o in b["options"]} - {None})
        # what the fulfil workers report (see ``partner_health``), else this serve's metrics
        reported = breaker_states(self._breakers, int(time.time() * 1000))
        return {
            "at_ms": int(time.time() * 1000),
            "worker": os.getpid(),
            "viewers": self.viewers,
            "scope": self.scope,
            "sources": {
                "redis": self._redis_ok,
                "postgres": self._pg_ok,
                "postgres_at_ms": self._pg_at_ms,
            },
            "benefits": benefits,
            "writer": {
                "backlog": sum(b["backlog"] for b in self._live),
                "lag_ms": max(lags) if lags else None,
            },
            "claims_per_s": {
                "every_ms": int(self.tick_s * 1000),
                "samples": [list(sample) for sample in self.rates],
            },
            "outcomes": metric["outcomes"],
            "shed": metric["shed"],
            "partners": [
                {
                    "partner_id": partner_id,
                    "breaker": reported.get(partner_id, metric["breakers"].get(partner_id)),
                    **pg["partners"].get(partner_id, partner_counts()),
                }
                for partner_id in partner_ids
            ],
            "code_pools": [
                {**p, "free_in_redis": free_in_redis.get((p["benefit_id"], p["option_id"]))}
                for p in pg["code_pools"]
            ],
            "points_drift": drift.get("*points*"),
            "campaigns": pg["campaigns"],
        }


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Until the first of ``waits`` is done (the others are cancelled)."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
