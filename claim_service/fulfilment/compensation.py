"""Compensation: a failed claim gives its stock unit, the member's quota and the points it
cost back, once. Each option of a bundle is refunded on its own (its option's unit, code and
points); the bundle's unit and quota come back with the last of them. A draw gives its
prize's unit back too.

The Redis side (``refund.lua``) is guarded by a per-period set of refunded claim ids and the
PostgreSQL side by the ``failed -> refunded`` transition, taken while the claim row is locked;
a crash between the two is finished by the next sweep without a second refund. While a
benefit's counters are being recovered the refund waits (the claim stays ``failed`` and the
next sweep refunds it), so recovery never races a refund. The points go back to the lots
they came from: in Redis in the same ``refund.lua`` step, in the ledger as a ``refund``
entry (reference ``refund:<claim_id>``) in the transaction that marks the claim refunded;
points whose lot expired meanwhile are written off at once (an ``expire`` entry).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from claim_service.domain.lifecycle import ACCEPTED, FAILED, REFUNDED
from claim_service.errors import BackendUnavailable, ConflictError, NotFoundError
from claim_service.metrics import REFUNDS
from claim_service.store.buckets import keys_of_member
from claim_service.store.claim_states import transition
from claim_service.store.connections import is_cluster
from claim_service.store.keyspace import PERIOD_KEY_TTL_S, Scripts, text
from claim_service.store.points_ledger import claim_taken, record_refund
from claim_service.store.stock_events import announce

log = logging.getLogger(__name__)

SWEEP_LIMIT = 200


async def _locked_claim(conn: Any, claim_id: str) -> Any:
    return await conn.fetchrow(
        """SELECT c.claim_id, c.user_id, c.benefit_id, c.option_id, c.period, c.status,
                  c.code_id, c.failure_reason, c.code_expiry_ms, o.kind, c.bundle_id,
                  c.bundle_size, d.prize_id
           FROM claims c LEFT JOIN benefit_options o
                ON o.benefit_id = c.benefit_id AND o.option_id = c.option_id
                LEFT JOIN draws d ON d.claim_id = c.claim_id
           WHERE c.claim_id = $1 FOR UPDATE OF c""",
        claim_id,
    )


class _Recovering(Exception):
    """The benefit's counters are being recovered: the refund must wait."""


async def _refund_in_redis(redis: Redis, row: asyncpg.Record, points: str) -> tuple[bool, str]:
    """Whether this call returned the unit (False: it had been returned before), and the
    points it could not return because their lot had expired (``lot:amount,...``)."""
    keys = await keys_of_member(redis, row["benefit_id"], row["user_id"])
    # The reserved code goes back to the pool unless there was none to reserve.
    give_code = (
        row["kind"] == "card_key"
        and row["code_id"] is None
        and (row["failure_reason"] != "no_code")
    )
    reply = await Scripts(redis).refund(
        keys=keys.refund_keys(row["period"], cluster=is_cluster(redis)),
        args=[
            row["claim_id"],
            row["user_id"],
            row["option_id"],
            "1" if give_code else "0",
            PERIOD_KEY_TTL_S,
            row["code_expiry_ms"] or 0,
            points,
            row["bundle_id"] or "",
            row["bundle_size"],
            row.get("prize_id") or "",
        ],
    )
    done = int(reply[0])
    if done < 0:
        raise _Recovering
    if done:
        await announce(redis, row["benefit_id"])
    return bool(done), text(reply[1])


async def refund(pool: asyncpg.Pool, redis: Redis, claim_id: str) -> bool:
    """Return a failed claim's unit and quota; True when this call did it (False also while
    the benefit is being recovered: the claim stays ``failed`` and a later sweep refunds it)."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            row = await _locked_claim(conn, claim_id)
            if row is None or row["status"] != FAILED:
                return False
            fresh, dropped = await _refund_in_redis(redis, row, await claim_taken(conn, claim_id))
            await record_refund(conn, claim_id, dropped)
            await transition(
                conn,
                claim_id,
                REFUNDED,
                "unit_and_quota_returned",
                expect=(FAILED,),
                detail={"redis": "refunded" if fresh else "already"},
            )
    except _Recovering:
        log.info("refund of claim %s waits for its benefit's recovery", claim_id)
        return False
    REFUNDS.inc()
    log.info("claim %s refunded", claim_id)
    return True


async def sweep_refunds(pool: asyncpg.Pool, redis: Redis, limit: int = SWEEP_LIMIT) -> int:
    """Refund failed claims of benefits whose policy is ``refund`` (crash recovery too)."""
    rows = await pool.fetch(
        """SELECT c.claim_id FROM claims c JOIN benefits b USING (benefit_id)
           WHERE c.status = 'failed' AND b.on_failure = 'refund' LIMIT $1""",
        limit,
    )
    done = 0
    for row in rows:
        done += await refund(pool, redis, row["claim_id"])
    return done


async def ops_retry(pool: asyncpg.Pool, redis: Redis, claim_id: str) -> str:
    """Send a failed (held) claim through fulfilment again. Returns the new status."""
    if await _finish_interrupted_refund(pool, redis, claim_id):
        raise ConflictError("already_refunded", "the claim's unit was returned; it is final")
    async with pool.acquire() as conn, conn.transaction():
        row = await _locked_claim(conn, claim_id)
        if row is None:
            raise NotFoundError("unknown_claim", f"no claim {claim_id!r}")
        if row["status"] == REFUNDED:
            raise ConflictError("already_refunded", "the claim's unit was returned; it is final")
        if row["status"] != FAILED:
            raise ConflictError("not_failed", f"the claim is {row['status']}, not failed")
        await transition(
            conn,
            claim_id,
            ACCEPTED,
            "ops_retry",
            expect=(FAILED,),
            columns={
                "attempts": 0,
                "failure_reason": None,
                "lease_owner": None,
                "lease_until": None,
                "next_attempt_at": datetime.now(UTC),
            },
        )
    return ACCEPTED


async def _finish_interrupted_refund(pool: asyncpg.Pool, redis: Redis, claim_id: str) -> bool:
    """A refund that reached Redis but not PostgreSQL (a crash in between) is completed
    rather than letting the claim be delivered too. True when the claim is now refunded."""
    row = await pool.fetchrow(
        "SELECT benefit_id, user_id, period, status FROM claims WHERE claim_id = $1", claim_id
    )
    if row is None or row["status"] != FAILED:
        return False
    keys = await keys_of_member(redis, row["benefit_id"], row["user_id"])
    if not await redis.sismember(keys.refunded(row["period"]), claim_id):
        return False
    return await refund(pool, redis, claim_id)  # the Redis side is a no-op by then


async def ops_refund(pool: asyncpg.Pool, redis: Redis, claim_id: str) -> str:
    """Refund a held failed claim on an operator's word."""
    async with pool.acquire() as conn:
        status = await conn.fetchval("SELECT status FROM claims WHERE claim_id = $1", claim_id)
    if status is None:
        raise NotFoundError("unknown_claim", f"no claim {claim_id!r}")
    if status != FAILED:
        raise ConflictError("not_failed", f"the claim is {status}, not failed")
    if not await refund(pool, redis, claim_id):
        status = await pool.fetchval("SELECT status FROM claims WHERE claim_id = $1", claim_id)
        if status != REFUNDED:
            raise BackendUnavailable("the benefit's counters are being recovered; retry")
    return REFUNDED
