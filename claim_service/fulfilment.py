"""The fulfilment worker: delivers persisted claims by card-key or direct charge.

Claims are leased with ``FOR UPDATE SKIP LOCKED`` and a lease deadline, so several workers
never work the same claim and a dead worker's claims are picked up once its lease runs out.
Direct-charge orders carry ``Idempotency-Key: <claim_id>``, so resending after a crash or a
timeout cannot charge twice.

A timeout, a connection error, a 5xx or an unreadable answer says nothing about whether the
partner charged: once the resends are spent, the order's fate is asked with the partner's
status query, and only its word that nothing was charged lets a claim fail and be refunded.
Without an answer the claim keeps waiting (``outcome_unknown_since``) and is asked again.
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
from claim_service.anomalies import LATE_PARTNER_SUCCESS, record_anomaly
from claim_service.compensation import refund, sweep_refunds
from claim_service.config import Settings
from claim_service.errors import NotFoundError
from claim_service.keyspace import BenefitKeys
from claim_service.lifecycle import (
    FAILED,
    FULFILLED,
    FULFILLING,
    OPEN_STATES,
    REFUNDED,
    record_event,
    transition,
)
from claim_service.partners import (
    CircuitBreaker,
    OrderResult,
    Outcome,
    Partner,
    PartnerDirectory,
    backoff_s,
    order_body,
    query_order,
    send_order,
)
from claim_service.vault import Vault
from claim_service.vouchers import assign_code, publish_pool_levels
from claim_service.writer import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 1.0
POOL_CHECK_EVERY_S = 10.0
OUTCOME_COUNT_EVERY_S = 5.0
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

# $5: true marks the outcome unknown (kept from the first time), false clears it, null keeps it.
DEFER_SQL = """
UPDATE claims c SET next_attempt_at = now() + make_interval(secs => $3),
    attempts = coalesce($4, c.attempts), lease_owner = NULL, lease_until = NULL,
    outcome_unknown_since = CASE WHEN $5::boolean THEN coalesce(c.outcome_unknown_since, now())
                                 WHEN NOT $5::boolean THEN NULL
                                 ELSE c.outcome_unknown_since END,
    updated_at = now()
FROM (SELECT claim_id, outcome_unknown_since FROM claims
      WHERE claim_id = $1 AND lease_owner = $2 AND status IN ('accepted', 'fulfilling')
      FOR UPDATE) prev
WHERE c.claim_id = prev.claim_id
RETURNING c.status,
          prev.outcome_unknown_since IS NULL AND c.outcome_unknown_since IS NOT NULL AS newly
"""

LOCK_ORDER_SQL = """
SELECT c.claim_id, c.status, c.benefit_id, c.period, o.partner, b.on_failure FROM claims c
LEFT JOIN benefit_options o ON o.benefit_id = c.benefit_id AND o.option_id = c.option_id
LEFT JOIN benefits b ON b.benefit_id = c.benefit_id
WHERE c.claim_id = $1
FOR UPDATE OF c
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
        if claim["status"] == FULFILLING and claim["attempts"] >= partner.max_attempts:
            # The order went out and its resends are spent (or ops lowered max_attempts, or
            # a worker died before settling it): never resend blind, ask what became of it.
            await self._resolve(claim, partner, breaker)
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
        self._record_call(breaker, partner_id, result)
        metrics.PARTNER_CALLS.labels(partner_id, result.outcome.value).inc()
        detail = _detail(partner_id, result)
        if result.outcome is Outcome.SUCCESS:
            await settle_success(
                self.pool, self.redis, claim_id, "partner_success", result.partner_ref, detail
            )
        elif result.outcome is Outcome.PROCESSING:
            await self._defer(
                claim,
                self.settings.fulfil_processing_recheck_s,
                event=("partner_processing", detail),
                outcome_unknown=False,
            )
        elif result.outcome in (Outcome.FAILED, Outcome.REJECTED):
            await self._fail(claim, result.reason or result.outcome.value, detail)
        else:
            # Maybe charged: resend (the Idempotency-Key makes that safe) while attempts
            # last; once they are spent, the next lease asks with a status query. Waiting a
            # backoff first lets a request still in flight at the partner land before we ask.
            attempts = claim["attempts"] + 1
            delay = backoff_s(
                attempts, self.settings.retry_base_ms / 1000, self.settings.retry_max_ms / 1000
            )
            spent = attempts >= partner.max_attempts
            await self._defer(
                claim,
                delay,
                attempts=attempts,
                event=(
                    "retries_exhausted" if spent else "retry_scheduled",
                    {**detail, "attempt": attempts, "next_in_s": round(delay, 3)},
                ),
            )

    async def _resolve(
        self, claim: dict[str, Any], partner: Partner, breaker: CircuitBreaker
    ) -> None:
        """Ask the partner what became of an order whose outcome we never learnt. Only its
        word that nothing was charged (``failed``, ``not_found``) lets the claim fail."""
        claim_id, partner_id = claim["claim_id"], partner.partner_id
        async with self.partners.semaphores[partner_id]:
            result = await query_order(self._client(), partner, claim_id)
        self._record_call(breaker, partner_id, result)
        metrics.PARTNER_STATUS_QUERIES.labels(partner_id, result.outcome.value).inc()
        attempts = claim["attempts"] + 1
        detail = {**_detail(partner_id, result), "status_query": True, "attempt": attempts}
        if result.outcome is Outcome.SUCCESS:
            await settle_success(
                self.pool,
                self.redis,
                claim_id,
                "partner_status_success",
                result.partner_ref,
                detail,
            )
        elif result.outcome is Outcome.PROCESSING:
            await self._defer(
                claim,
                self.settings.fulfil_processing_recheck_s,
                attempts=attempts,
                event=("partner_processing", detail),
                outcome_unknown=False,
            )
        elif result.outcome is Outcome.FAILED:
            await self._fail(claim, result.reason or "partner_failed", detail)
        elif result.outcome is Outcome.NOT_FOUND:
            await self._fail(claim, "order_not_found", detail)
        else:
            # Silence: the order may have been charged. Keep the unit taken, never resend,
            # never refund blind; ask again later, backing off.
            delay = backoff_s(
                max(attempts - partner.max_attempts, 1),
                self.settings.retry_base_ms / 1000,
                self.settings.retry_max_ms / 1000,
            )
            await self._defer(
                claim,
                delay,
                attempts=attempts,
                event=("outcome_unknown", {**detail, "next_in_s": round(delay, 3)}),
                outcome_unknown=True,
            )

    def _record_call(self, breaker: CircuitBreaker, partner_id: str, result: OrderResult) -> None:
        breaker.record(result.outcome is not Outcome.UNKNOWN)
        metrics.PARTNER_CIRCUIT.labels(partner_id).set(1 if breaker.state == "open" else 0)

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
        outcome_unknown: bool | None = None,
    ) -> None:
        """Give the lease back until ``delay_s`` from now. ``outcome_unknown`` True marks the
        order's outcome unknown (its event is recorded only when it becomes so), False
        clears the mark, None leaves it."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                DEFER_SQL,
                claim["claim_id"],
                self.name,
                float(delay_s),
                attempts,
                outcome_unknown,
            )
            if row is None or event is None or (outcome_unknown and not row["newly"]):
                return
            await record_event(conn, claim["claim_id"], row["status"], event[0], event[1])
        if outcome_unknown:
            log.warning(
                "claim %s: partner %s does not say whether it charged the order; asking again",
                claim["claim_id"],
                claim["partner"],
            )

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
                columns={
                    "failure_reason": reason[:200],
                    "lease_owner": None,
                    "outcome_unknown_since": None,
                },
            )
        if moved:
            metrics.FULFILMENT.labels(claim["kind"] or "unknown", FAILED).inc()
            await self._compensate(claim)

    async def _compensate(self, claim: dict[str, Any]) -> None:
        if claim.get("on_failure", "refund") == "refund":
            await refund(self.pool, self.redis, claim["claim_id"])
        else:
            log.warning("claim %s failed and is held for a manual retry", claim["claim_id"])


def _detail(partner_id: str, result: OrderResult) -> dict[str, Any]:
    return {
        "partner": partner_id,
        "http_status": result.http_status,
        "reason": result.reason,
        "partner_ref": result.partner_ref,
    }


async def _locked_order(conn: Any, claim_id: str, partner_id: str | None) -> Any:
    row = await conn.fetchrow(LOCK_ORDER_SQL, claim_id)
    if row is None or (partner_id is not None and row["partner"] != partner_id):
        raise NotFoundError("unknown_order", f"no order {claim_id!r} for this partner")
    return row


async def settle_success(
    pool: asyncpg.Pool,
    redis: Redis,
    claim_id: str,
    reason: str,
    partner_ref: str | None,
    detail: dict[str, Any],
    *,
    partner_id: str | None = None,
) -> str:
    """Record a partner's word that it charged ``claim_id``'s order; returns the status.

    Decided under the claim's row lock, so a concurrent worker, a repeated callback and the
    refund sweep are serialised with it: an open claim, or one that failed but was not
    refunded yet, is fulfilled; one already fulfilled is left alone (a repeat, or another
    success that won); one already refunded is a ``late_partner_success`` anomaly. With
    ``partner_id``, an order of another partner is unknown (``NotFoundError``).
    """
    interrupted_refund = False
    async with pool.acquire() as conn, conn.transaction():
        row = await _locked_order(conn, claim_id, partner_id)
        status = row["status"]
        if status == FAILED:
            # refund() returns the unit in Redis, then commits; a crash in between leaves
            # a failed claim whose unit is already back: that refund stands.
            keys = BenefitKeys(row["benefit_id"])
            interrupted_refund = bool(await redis.sismember(keys.refunded(row["period"]), claim_id))
        if status == FULFILLED:
            log.debug("order %s: success reported again (already fulfilled)", claim_id)
            return FULFILLED
        if status in (*OPEN_STATES, FAILED) and not interrupted_refund:
            await transition(
                conn,
                claim_id,
                FULFILLED,
                reason,
                expect=(status,),
                detail=detail,
                columns={
                    "partner_ref": partner_ref,
                    "failure_reason": None,
                    "lease_owner": None,
                    "lease_until": None,
                    "outcome_unknown_since": None,
                },
            )
        else:
            # The partner delivered after we gave the unit and quota back: ops must look.
            if await record_anomaly(
                conn, LATE_PARTNER_SUCCESS, claim_id, row["benefit_id"], {**detail, "via": reason}
            ):
                await record_event(conn, claim_id, status, "late_partner_success", detail)
    if interrupted_refund:
        await refund(pool, redis, claim_id)
        return REFUNDED
    if status == REFUNDED:
        return REFUNDED
    metrics.FULFILMENT.labels("direct_charge", FULFILLED).inc()
    return FULFILLED


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
    detail = {"partner": partner_id, "partner_ref": partner_ref, "reason": reason}
    if status == "success":
        return await settle_success(
            pool,
            redis,
            order_id,
            "partner_callback_success",
            partner_ref,
            detail,
            partner_id=partner_id,
        )
    failed = False
    async with pool.acquire() as conn, conn.transaction():
        row = await _locked_order(conn, order_id, partner_id)
        current = str(row["status"])
        if status == "failed" and current in OPEN_STATES:
            await transition(
                conn,
                order_id,
                FAILED,
                "partner_callback_failed",
                expect=(current,),
                detail=detail,
                columns={
                    "failure_reason": (reason or "partner_failed")[:200],
                    "lease_owner": None,
                    "outcome_unknown_since": None,
                },
            )
            failed, current = True, FAILED
    if failed:
        metrics.FULFILMENT.labels("direct_charge", FAILED).inc()
        if row["on_failure"] == "refund" and await refund(pool, redis, order_id):
            current = REFUNDED
    return current
