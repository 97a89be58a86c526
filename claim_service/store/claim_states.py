"""Claim state transitions in PostgreSQL, each recorded as an event with a reason.

Every transition is a guarded UPDATE (the row must still be in one of the expected states,
and leased by the expected worker when one is named), so two workers, a late partner
callback and an operator can never move a claim twice. The states and the transitions
allowed between them are ``domain.lifecycle``'s.
"""

from __future__ import annotations

from typing import Any

import orjson

from claim_service.domain.lifecycle import ALLOWED


async def transition(
    conn: Any,
    claim_id: str,
    to: str,
    reason: str,
    *,
    expect: tuple[str, ...],
    owner: str | None = None,
    detail: dict[str, Any] | None = None,
    columns: dict[str, Any] | None = None,
) -> str | None:
    """Move ``claim_id`` to ``to`` if it is in one of ``expect`` (and leased by ``owner``
    when given). Returns the previous status, or ``None`` when the guard did not hold."""
    for state in expect:
        if (state, to) not in ALLOWED:
            raise ValueError(f"transition {state} -> {to} is not allowed")
    sets = ["status = $2", "updated_at = now()"]
    args: list[Any] = [claim_id, to, list(expect)]
    for name, value in (columns or {}).items():
        args.append(value)
        sets.append(f"{name} = ${len(args)}")
    owner_guard = ""
    if owner is not None:
        args.append(owner)
        owner_guard = f" AND lease_owner = ${len(args)}"
    async with conn.transaction():
        previous = await conn.fetchval(
            f"""WITH prev AS (
                    SELECT claim_id, status FROM claims
                    WHERE claim_id = $1 AND status = ANY($3::text[]){owner_guard}
                    FOR UPDATE)
                UPDATE claims c SET {", ".join(sets)}
                FROM prev WHERE c.claim_id = prev.claim_id
                RETURNING prev.status""",
            *args,
        )
        if previous is None:
            return None
        await conn.execute(
            """INSERT INTO claim_events (claim_id, from_status, to_status, reason, detail)
               VALUES ($1, $2, $3, $4, $5::jsonb)""",
            claim_id,
            previous,
            to,
            reason,
            orjson.dumps(detail).decode() if detail else None,
        )
    return str(previous)


async def record_event(
    conn: Any, claim_id: str, status: str, reason: str, detail: dict[str, Any] | None = None
) -> None:
    """An event that does not change the status (a retry scheduled, a late callback...)."""
    await conn.execute(
        """INSERT INTO claim_events (claim_id, from_status, to_status, reason, detail)
           VALUES ($1, $2, $2, $3, $4::jsonb)""",
        claim_id,
        status,
        reason,
        orjson.dumps(detail).decode() if detail else None,
    )


async def events(conn: Any, claim_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT from_status, to_status, reason, detail, created_at FROM claim_events
           WHERE claim_id = $1 ORDER BY id""",
        claim_id,
    )
    return [
        {
            "from": r["from_status"],
            "to": r["to_status"],
            "reason": r["reason"],
            "detail": orjson.loads(r["detail"]) if r["detail"] else None,
            "at": r["created_at"].isoformat(),
        }
        for r in rows
    ]
