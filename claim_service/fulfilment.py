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
import os
import secrets
import socket
import time
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service import metrics
from claim_service.compensation import refund, sweep_refunds
from claim_service.config import Settings
from claim_service.errors import NotFoundError
from claim_service.lifecycle import (
    FAILED,
    FULFILLED,
    FULFILLING,
    OPEN_STATES,
    record_event,
    transition,
)
from claim_service.partners import (
    CircuitBreaker,
    Outcome,
    PartnerDirectory,
    backoff_s,
    order_body,
    send_order,
)
from claim_service.vault import Vault
from claim_service.vouchers import assign_code, publish_pool_levels
from claim_service.writer import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 1.0
POOL_CHECK_EVERY_S = 10.0
UNCONFIGURED_PARTNER_RETRY_S = 30.0
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


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class FulfilmentWorker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        settings: Settings,
        *,
        name: str | None = None,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.settings = settings
        self.name = name or worker_name()
        self.vault = Vault(settings.codes_key)
        self.partners = PartnerDirectory(pool, self.vault)
        self.breakers: dict[str, CircuitBreaker] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._swept_at = 0.0
        self._pool_checked_at = 0.0
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
                    await conn.remove_listener(NOTIFY_CHANNEL, callback)
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
            await conn.add_listener(NOTIFY_CHANNEL, callback)
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

    async def _direct_charge(self, claim: dict[str, Any]) -> None:
        claim_id = claim["claim_id"]
        partner_id = claim["partner"]
        partner = await self.partners.get(partner_id) if partner_id else None
        if partner is None:
            await self._defer(claim, UNCONFIGURED_PARTNER_RETRY_S)
            log.warning("claim %s waits: partner %r is not configured", claim_id, partner_id)
            return
        breaker = self.breakers.setdefault(
            partner_id,
            CircuitBreaker(
                self.settings.breaker_threshold, self.settings.breaker_cooldown_ms / 1000
            ),
        )
        if not breaker.allow():
            metrics.PARTNER_CIRCUIT.labels(partner_id).set(1)
            await self._defer(claim, breaker.retry_in())
            return
        if claim["status"] != FULFILLING:
            async with self.pool.acquire() as conn:
                moved = await transition(
                    conn,
                    claim_id,
                    FULFILLING,
                    "order_sent",
                    expect=(claim["status"],),
                    owner=self.name,
                    detail={"partner": partner_id},
                )
            if moved is None:
                return
        created = claim["created_at"]
        body = order_body(
            claim_id,
            claim["sku"] or "",
            claim["account"] or claim["user_id"],
            created.isoformat() if isinstance(created, datetime) else str(created),
        )
        async with self.partners.semaphores[partner_id]:
            result = await send_order(self._client(), partner, claim_id, body)
        breaker.record(result.outcome is not Outcome.TRANSIENT)
        metrics.PARTNER_CIRCUIT.labels(partner_id).set(1 if breaker.state == "open" else 0)
        metrics.PARTNER_CALLS.labels(partner_id, result.outcome.value).inc()
        detail = {
            "partner": partner_id,
            "http_status": result.http_status,
            "reason": result.reason,
            "partner_ref": result.partner_ref,
        }
        if result.outcome is Outcome.SUCCESS:
            async with self.pool.acquire() as conn:
                moved = await transition(
                    conn,
                    claim_id,
                    FULFILLED,
                    "partner_success",
                    expect=(FULFILLING,),
                    detail=detail,
                    columns={
                        "partner_ref": result.partner_ref,
                        "lease_owner": None,
                        "lease_until": None,
                    },
                )
            if moved:
                metrics.FULFILMENT.labels("direct_charge", FULFILLED).inc()
        elif result.outcome is Outcome.PROCESSING:
            await self._defer(
                claim,
                self.settings.fulfil_processing_recheck_s,
                event=("partner_processing", detail),
            )
        elif result.outcome in (Outcome.FAILED, Outcome.REJECTED):
            await self._fail(claim, result.reason or result.outcome.value, detail)
        else:
            attempts = claim["attempts"] + 1
            if attempts >= partner.max_attempts:
                await self._fail(claim, "retries_exhausted", detail)
                return
            delay = backoff_s(
                attempts, self.settings.retry_base_ms / 1000, self.settings.retry_max_ms / 1000
            )
            await self._defer(
                claim,
                delay,
                attempts=attempts,
                event=(
                    "retry_scheduled",
                    {**detail, "attempt": attempts, "retry_in_s": round(delay, 3)},
                ),
            )

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _defer(
        self,
        claim: dict[str, Any],
        delay_s: float,
        *,
        attempts: int | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval(
                """UPDATE claims SET next_attempt_at = now() + make_interval(secs => $3),
                       attempts = coalesce($4, attempts), lease_owner = NULL,
                       lease_until = NULL, updated_at = now()
                   WHERE claim_id = $1 AND lease_owner = $2
                     AND status IN ('accepted', 'fulfilling')
                   RETURNING status""",
                claim["claim_id"],
                self.name,
                float(delay_s),
                attempts,
            )
            if status is not None and event is not None:
                await record_event(conn, claim["claim_id"], status, event[0], event[1])

    async def _fail(
        self, claim: dict[str, Any], reason: str, detail: dict[str, Any] | None = None
    ) -> None:
        async with self.pool.acquire() as conn:
            moved = await transition(
                conn,
                claim["claim_id"],
                FAILED,
                reason,
                expect=OPEN_STATES,
                owner=self.name,
                detail=detail,
                columns={"failure_reason": reason[:200], "lease_owner": None},
            )
        if moved:
            metrics.FULFILMENT.labels(claim["kind"] or "unknown", FAILED).inc()
            await self._compensate(claim)

    async def _compensate(self, claim: dict[str, Any]) -> None:
        if claim.get("on_failure", "refund") == "refund":
            await refund(self.pool, self.redis, claim["claim_id"])
        else:
            log.warning("claim %s failed and is held for a manual retry", claim["claim_id"])


async def apply_callback(
    pool: asyncpg.Pool,
    redis: Redis,
    partner_id: str,
    order_id: str,
    status: str,
    partner_ref: str | None,
    reason: str | None,
) -> str:
    """A partner's late answer for an order; repeats are harmless. Returns the claim status."""
    row = await pool.fetchrow(
        """SELECT c.status, o.partner, b.on_failure FROM claims c
           LEFT JOIN benefit_options o ON o.benefit_id = c.benefit_id
                AND o.option_id = c.option_id
           LEFT JOIN benefits b ON b.benefit_id = c.benefit_id
           WHERE c.claim_id = $1""",
        order_id,
    )
    if row is None or row["partner"] != partner_id:
        raise NotFoundError("unknown_order", f"no order {order_id!r} for this partner")
    detail = {"partner": partner_id, "partner_ref": partner_ref, "reason": reason}
    async with pool.acquire() as conn:
        if status == "success":
            moved = await transition(
                conn,
                order_id,
                FULFILLED,
                "partner_callback_success",
                expect=OPEN_STATES,
                detail=detail,
                columns={"partner_ref": partner_ref, "lease_owner": None, "lease_until": None},
            )
            if moved:
                metrics.FULFILMENT.labels("direct_charge", FULFILLED).inc()
            elif row["status"] not in (FULFILLED,):
                # The partner delivered after we gave up: ops must look at this one.
                await record_event(conn, order_id, row["status"], "late_partner_success", detail)
                log.error(
                    "order %s: partner %s reports success but the claim is %s",
                    order_id,
                    partner_id,
                    row["status"],
                )
        elif status == "failed":
            moved = await transition(
                conn,
                order_id,
                FAILED,
                "partner_callback_failed",
                expect=OPEN_STATES,
                detail=detail,
                columns={"failure_reason": (reason or "partner_failed")[:200], "lease_owner": None},
            )
            if moved:
                metrics.FULFILMENT.labels("direct_charge", FAILED).inc()
                if row["on_failure"] == "refund":
                    await refund(pool, redis, order_id)
    current = await pool.fetchval("SELECT status FROM claims WHERE claim_id = $1", order_id)
    return str(current)
