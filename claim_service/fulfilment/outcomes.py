"""A partner's word on an order (its answer, a status query, a callback), settled under the
claim's row lock: a success fulfils an open claim (or a failed one not yet refunded), is
harmless when repeated, and is a ``late_partner_success`` anomaly for a refunded one."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from redis.asyncio import Redis

from claim_service import metrics
from claim_service.domain.lifecycle import FAILED, FULFILLED, OPEN_STATES, REFUNDED
from claim_service.errors import NotFoundError
from claim_service.fulfilment.compensation import refund
from claim_service.fulfilment.partners import OrderResult
from claim_service.store.anomalies import LATE_PARTNER_SUCCESS, record_anomaly
from claim_service.store.buckets import keys_of_member
from claim_service.store.claim_states import record_event, transition

log = logging.getLogger(__name__)

LOCK_ORDER_SQL = """
SELECT c.claim_id, c.status, c.benefit_id, c.user_id, c.period, o.partner, b.on_failure
FROM claims c
LEFT JOIN benefit_options o ON o.benefit_id = c.benefit_id AND o.option_id = c.option_id
LEFT JOIN benefits b ON b.benefit_id = c.benefit_id
WHERE c.claim_id = $1
FOR UPDATE OF c
"""


def order_detail(partner_id: str, result: OrderResult) -> dict[str, Any]:
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
            keys = await keys_of_member(redis, row["benefit_id"], row["user_id"])
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
