"""The fulfilment worker: delivers persisted claims by card-key or direct charge.

Claims are leased with ``FOR UPDATE SKIP LOCKED`` and a lease deadline, so several workers
never work the same claim and a dead worker's claims are picked up once its lease runs out.
Direct-charge orders carry ``Idempotency-Key: <claim_id>``, so resending after a crash or a
timeout cannot charge twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service import metrics
from claim_service.config import Settings, instance_name
from claim_service.domain.lifecycle import FAILED, FULFILLED, OPEN_STATES
from claim_service.fulfilment.compensation import sweep_refunds
from claim_service.fulfilment.direct_charge import DirectCharge
from claim_service.fulfilment.vouchers import assign_code, publish_pool_levels
from claim_service.store.claim_states import transition
from claim_service.store.keyspace import CLAIMS_WRITTEN_CHANNEL

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 1.0
POOL_CHECK_EVERY_S = 10.0
OUTCOME_COUNT_EVERY_S = 5.0
STOP_GRACE_S = 10.0

LEASE_SQL = """
WITH due AS (
    SELECT c.claim_id, o.kind, o.partner, o.sku, b.on_failure
    FROM claims c
    LEFT JOIN benefit_options o ON o.benefit_id = c.benefit_id AND o.option_id = c.option_id
    LEFT JOIN benefits b ON b.benefit_id = c.benefit_id
    WHERE c.status IN ('accepted', 'fulfilling') AND c.next_attempt_at <= now()
      AND (c.lease_until IS NULL OR c.lease_until < now())
    ORDER BY c.next_attempt_at
    LIMIT $2
    FOR UPDATE OF c SKIP LOCKED
)
UPDATE claims c SET lease_owner = $1, lease_until = now() + make_interval(secs => $3)
FROM due WHERE c.claim_id = due.claim_id
RETURNING c.claim_id, c.user_id, c.benefit_id, c.option_id, c.period, c.status, c.attempts,
          c.account, c.created_at, due.kind, due.partner, due.sku, due.on_failure
"""


async def _set_when(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


class _LostLease(Exception):
    """Another actor moved the claim meanwhile; roll back what this worker did."""


class FulfilmentWorker(DirectCharge):
    """One fulfil process's loop: leases due claims and delivers them (card-key here,
    direct charge in ``DirectCharge``). ``run`` returns when ``stop`` is set."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        settings: Settings,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(pool, redis, settings, name or instance_name())
        self._tasks: set[asyncio.Task[None]] = set()
        self._swept_at = 0.0
        self._pool_checked_at = 0.0
        self._outcomes_counted_at = 0.0
        self._unknown_reported = 0
        self.handled = 0

    # -- loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info("fulfilment worker %s started", self.name)
        self._session = aiohttp.ClientSession()
        wake = asyncio.Event()
        stopper = asyncio.create_task(_set_when(stop, wake))
        await self._release_own_leases()
        listener = await self._listen(wake)
        try:
            while not stop.is_set():
                wake.clear()
                try:
                    leased = await self.tick()
                except (asyncpg.PostgresError, asyncpg.InterfaceError, RedisError, OSError) as exc:
                    log.warning("fulfilment tick failed (%s: %s)", type(exc).__name__, exc)
                    leased = 0
                if leased == 0:
                    # Woken at once by the writer's notification; the poll is the fallback.
                    try:
                        await asyncio.wait_for(wake.wait(), self.settings.fulfil_poll_ms / 1000)
                    except TimeoutError:
                        pass
        finally:
            stopper.cancel()
            if listener is not None:
                conn, callback = listener
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await conn.remove_listener(CLAIMS_WRITTEN_CHANNEL, callback)
                await self.pool.release(conn)
            await self._finish()
        log.info("fulfilment worker %s stopped after %d claims", self.name, self.handled)

    async def _release_own_leases(self) -> None:
        """Leases held under our name are from a previous life of this worker (restarted with
        the same ``--name``): take them back now rather than when they time out."""
        try:
            status = await self.pool.execute(
                """UPDATE claims SET lease_owner = NULL, lease_until = NULL
                   WHERE lease_owner = $1 AND status IN ('accepted', 'fulfilling')""",
                self.name,
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("could not release earlier leases (%s)", exc)
            return
        if status != "UPDATE 0":
            log.info("worker %s resumes its earlier leases (%s)", self.name, status)

    async def _listen(self, wake: asyncio.Event) -> Any:
        """A connection LISTENing for the writer's ``claims_written`` notifications."""

        def callback(*_: object) -> None:
            wake.set()

        try:
            conn = await self.pool.acquire()
            await conn.add_listener(CLAIMS_WRITTEN_CHANNEL, callback)
            return conn, callback
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("not listening for new claims (%s); polling only", exc)
            return None

    async def _finish(self) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_GRACE_S)
            for task in pending:  # their leases expire and another worker resumes them
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def tick(self) -> int:
        """Lease due claims and start working them; returns how many were leased."""
        now = time.monotonic()
        if now - self._swept_at >= SWEEP_EVERY_S:
            self._swept_at = now
            await sweep_refunds(self.pool, self.redis)
        if now - self._pool_checked_at >= POOL_CHECK_EVERY_S:
            self._pool_checked_at = now
            await self.check_pools()
        if now - self._outcomes_counted_at >= OUTCOME_COUNT_EVERY_S:
            self._outcomes_counted_at = now
            await self.count_unknown_outcomes()
        room = self.settings.fulfil_concurrency - len(self._tasks)
        if room <= 0:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            return 1
        rows = await self.pool.fetch(
            LEASE_SQL,
            self.name,
            min(room, self.settings.fulfil_batch),
            float(self.settings.fulfil_lease_s),
        )
        for row in rows:
            task = asyncio.create_task(self._handle(dict(row)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(rows)

    async def drain(self) -> None:
        """Wait for the claims already started (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def check_pools(self) -> None:
        for level in await publish_pool_levels(self.pool, self.settings.codes_low_watermark):
            log.warning(
                "card-key pool %s/%s is low: %d free code(s) (watermark %d)",
                level["benefit_id"],
                level["option_id"],
                level["free"],
                self.settings.codes_low_watermark,
            )

    async def count_unknown_outcomes(self) -> int:
        """Publish how many claims wait to learn whether their order was charged."""
        row = await self.pool.fetchrow(
            """SELECT count(*) AS n, min(outcome_unknown_since) AS oldest FROM claims
               WHERE outcome_unknown_since IS NOT NULL"""
        )
        count = int(row["n"]) if row is not None else 0
        metrics.OUTCOME_UNKNOWN.set(count)
        if count and count != self._unknown_reported and row is not None:
            log.warning(
                "%d claim(s) wait for their partner to say whether it charged (oldest since %s)",
                count,
                row["oldest"].isoformat(),
            )
        self._unknown_reported = count
        return count

    # -- one claim -----------------------------------------------------------------------

    async def _handle(self, claim: dict[str, Any]) -> None:
        try:
            if claim["kind"] is None:
                await self._fail(claim, "option_removed")
            elif claim["kind"] == "card_key":
                await self._card_key(claim)
            else:
                await self._direct_charge(claim)
            self.handled += 1
        except (asyncpg.PostgresError, asyncpg.InterfaceError, RedisError, OSError) as exc:
            # The lease runs out and the claim is tried again; nothing is half-applied.
            log.warning("claim %s: %s: %s", claim["claim_id"], type(exc).__name__, exc)
        except Exception:
            log.exception("claim %s: unexpected error", claim["claim_id"])

    async def _card_key(self, claim: dict[str, Any]) -> None:
        claim_id = claim["claim_id"]
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                code_id = await assign_code(conn, claim_id, claim["benefit_id"], claim["option_id"])
                if code_id is None:
                    moved = await transition(
                        conn,
                        claim_id,
                        FAILED,
                        "no_code",
                        expect=OPEN_STATES,
                        owner=self.name,
                        columns={"failure_reason": "no_code", "lease_owner": None},
                    )
                else:
                    moved = await transition(
                        conn,
                        claim_id,
                        FULFILLED,
                        "code_assigned",
                        expect=OPEN_STATES,
                        owner=self.name,
                        columns={"code_id": code_id, "lease_owner": None, "lease_until": None},
                    )
                if moved is None:
                    raise _LostLease
        except _LostLease:
            return
        if code_id is None:
            metrics.FULFILMENT.labels("card_key", FAILED).inc()
            await self._compensate(claim)
        else:
            metrics.FULFILMENT.labels("card_key", FULFILLED).inc()
