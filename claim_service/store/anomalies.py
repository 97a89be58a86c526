"""Anomalies: things that broke a promise or nearly did, kept for ops to list and count.

Each is recorded once per ``(kind, claim_id)``; a repeat (a partner resending the same late
callback) is not a second anomaly. Kinds:

- ``late_partner_success``: a partner reports success for an order we already refunded.
- ``request_conflict``: an accepted claim whose ``request_id`` was already used by another
  claim of the member; the entry was dead-lettered and its unit and quota returned.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import orjson

from claim_service.metrics import ANOMALIES

log = logging.getLogger(__name__)

LATE_PARTNER_SUCCESS = "late_partner_success"
REQUEST_CONFLICT = "request_conflict"
MAX_LIST = 1000


async def record_anomaly(
    conn: Any,
    kind: str,
    claim_id: str,
    benefit_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> bool:
    """Record an anomaly once; True when it is new. ``conn`` is a pool or a connection."""
    inserted = await conn.fetchval(
        """INSERT INTO anomalies (kind, claim_id, benefit_id, detail)
           VALUES ($1, $2, $3, $4::jsonb)
           ON CONFLICT (kind, claim_id) DO NOTHING RETURNING id""",
        kind,
        claim_id,
        benefit_id,
        orjson.dumps(detail).decode() if detail else None,
    )
    if inserted is None:
        return False
    ANOMALIES.labels(kind).inc()
    log.error("anomaly %s on claim %s: %s", kind, claim_id, detail or {})
    return True


async def list_anomalies(
    pool: asyncpg.Pool, kind: str | None = None, limit: int = 100
) -> dict[str, Any]:
    """Counts by kind and the newest ``limit`` anomalies (of ``kind`` when given)."""
    counts = {
        r["kind"]: r["n"]
        for r in await pool.fetch("SELECT kind, count(*) AS n FROM anomalies GROUP BY kind")
    }
    rows = await pool.fetch(
        """SELECT kind, claim_id, benefit_id, detail, created_at FROM anomalies
           WHERE $1::text IS NULL OR kind = $1 ORDER BY id DESC LIMIT $2""",
        kind,
        min(max(limit, 1), MAX_LIST),
    )
    return {
        "counts": counts,
        "total": sum(counts.values()),
        "anomalies": [
            {
                "kind": r["kind"],
                "claim_id": r["claim_id"],
                "benefit_id": r["benefit_id"],
                "detail": orjson.loads(r["detail"]) if r["detail"] else None,
                "created_at": r["created_at"].isoformat(),
            }
            for r in rows
        ],
    }
