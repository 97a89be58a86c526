"""Direct charge: signed orders to partners, resent safely, and the status query that
settles an order whose outcome we never learnt.

A timeout, a connection error, a 5xx or an unreadable answer says nothing about whether the
partner charged: once the resends are spent, the order's fate is asked with the partner's
status query, and only its word that nothing was charged lets a claim fail and be refunded.
Without an answer the claim keeps waiting (``outcome_unknown_since``) and is asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service import metrics
from claim_service.config import Settings
from claim_service.domain.lifecycle import FULFILLING
from claim_service.fulfilment.leases import Leases
from claim_service.fulfilment.outcomes import order_detail, settle_success
from claim_service.fulfilment.partners import (
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
from claim_service.store.claim_states import transition
from claim_service.store.partner_health import REPORT_EVERY_S, report_breaker
from claim_service.store.vault import Vault

log = logging.getLogger(__name__)

UNCONFIGURED_PARTNER_RETRY_S = 30.0


class DirectCharge(Leases):
    """Sends a leased claim's order, or asks what became of it."""

    def __init__(self, pool: asyncpg.Pool, redis: Redis, settings: Settings, name: str) -> None:
        super().__init__(pool, redis, settings, name)
        self.vault = Vault(settings.codes_key)
        self.partners = PartnerDirectory(pool, self.vault)
        self.breakers: dict[str, CircuitBreaker] = {}
        self._reported: dict[str, tuple[str, float]] = {}  # partner -> state, when told
        self._reports: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

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
            self._report(partner_id, breaker.state)
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
        detail = order_detail(partner_id, result)
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
        detail = {**order_detail(partner_id, result), "status_query": True, "attempt": attempts}
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
        self._report(partner_id, breaker.state)

    def _report(self, partner_id: str, state: str) -> None:
        """Tell watchers (the dashboard) the breaker's state: on a change, and every few
        seconds while calls go on, in the background (a Redis error only delays it)."""
        last = self._reported.get(partner_id)
        now = time.monotonic()
        if last is not None and last[0] == state and now - last[1] < REPORT_EVERY_S:
            return
        self._reported[partner_id] = (state, now)

        async def send() -> None:
            with contextlib.suppress(RedisError, OSError):
                await report_breaker(self.redis, partner_id, self.name, state)

        task = asyncio.get_running_loop().create_task(send())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session
