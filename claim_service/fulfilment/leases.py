"""Holding a claim's lease: giving it back until later, or failing the claim (and giving
its unit back when the benefit says ``refund``)."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from redis.asyncio import Redis

from claim_service import metrics
from claim_service.config import Settings
from claim_service.domain.lifecycle import FAILED, OPEN_STATES
from claim_service.fulfilment.compensation import refund
from claim_service.store.claim_states import record_event, transition

log = logging.getLogger(__name__)

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


class Leases:
    """What a worker does with the claims it leased, under its ``name``."""

    def __init__(self, pool: asyncpg.Pool, redis: Redis, settings: Settings, name: str) -> None:
        self.pool = pool
        self.redis = redis
        self.settings = settings
        self.name = name

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
