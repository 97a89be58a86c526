"""How the writer turns stream entries into claim rows (and the debit entries of claims
priced in points), in one transaction per batch."""

from __future__ import annotations

from typing import Any

import asyncpg

from claim_service.store.points_ledger import Debit, record_debits

FIELDS = ("c", "r", "u", "b", "o", "p", "t", "a", "ts")  # plus "x": a card-key code bucket,
# and for a claim priced in points "pp" (its price) and "pl" (the lots it took them from)

# One statement: the rows and their first event, both only for entries not seen before. A
# conflict on anything but claim_id (the member's request_id) fails the statement: those are
# filtered out first (see ``ClaimWriter._request_conflicts``), and a race with another writer
# retries.
INSERT_SQL = """
WITH inserted AS (
    INSERT INTO claims (claim_id, request_id, user_id, benefit_id, option_id, period, tier,
                        account, created_at, code_expiry_ms)
    SELECT c, r, u, b, o, p, t, nullif(a, ''), to_timestamp(ts / 1000.0), x
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::int[], $8::text[], $9::bigint[], $10::bigint[])
         AS x(c, r, u, b, o, p, t, a, ts, x)
    ON CONFLICT (claim_id) DO NOTHING
    RETURNING claim_id, created_at
)
INSERT INTO claim_events (claim_id, from_status, to_status, reason, created_at)
SELECT claim_id, NULL, 'accepted', 'claimed', created_at FROM inserted
"""

# Entries whose request the member already holds under another claim id.
CONFLICTS_SQL = """
SELECT x.c, k.claim_id AS original
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS x(c, r, u, b, p)
JOIN claims k ON k.benefit_id = x.b AND k.period = x.p AND k.user_id = x.u
             AND k.request_id = x.r
WHERE k.claim_id <> x.c
"""


def claim_row(fields: dict[bytes, bytes]) -> list[Any] | None:
    """The claims row of a stream entry (None when malformed): claim_id, request_id, user_id,
    benefit_id, option_id, period, tier, account, created_ms, code expiry."""
    try:
        values = [fields[f.encode()].decode() for f in FIELDS]
        expiry = fields.get(b"x", b"").decode()
        int(fields.get(b"pp", b"0"))
        fields.get(b"pl", b"").decode()
        return [
            *values[:6],
            int(values[6]),
            values[7],
            int(values[8]),
            int(expiry) if expiry else None,
        ]
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def _debit(fields: dict[bytes, bytes], row: list[Any]) -> Debit | None:
    price = int(fields.get(b"pp", b"0"))
    if price <= 0:
        return None
    return Debit(
        claim_id=row[0],
        user_id=row[2],
        price=price,
        taken=fields.get(b"pl", b"").decode(),
        created_ms=row[8],
        reason=f"claim of {row[3]}/{row[4]}",
    )


async def insert_claims(
    pool: asyncpg.Pool, entries: list[tuple[dict[bytes, bytes], list[Any]]]
) -> int:
    """Insert the rows (and debits) not seen before; returns how many rows were new."""
    columns: list[list[Any]] = [[] for _ in range(len(FIELDS) + 1)]
    debits = []
    for fields, row in entries:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
        debit = _debit(fields, row)
        if debit is not None:
            debits.append(debit)
    if not debits:
        status = await pool.execute(INSERT_SQL, *columns)
        return int(status.split()[-1])
    async with pool.acquire() as conn, conn.transaction():
        status = await conn.execute(INSERT_SQL, *columns)
        await record_debits(conn, debits)
    return int(status.split()[-1])
