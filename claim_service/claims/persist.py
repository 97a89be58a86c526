"""How the writer turns stream entries into claim rows (with the debit entries of claims
priced in points and the records of draws), in one transaction per batch."""

from __future__ import annotations

from typing import Any

import asyncpg

from claim_service.store.points_ledger import Debit, record_debits

FIELDS = ("c", "r", "u", "b", "o", "p", "t", "a", "ts")  # plus "x": a card-key code bucket,
# for a claim priced in points "pp" (its price) and "pl" (the lots it took them from), for an
# option of a bundle "g" (the bundle's claim id), "gi" (its index) and "gn" (the bundle's
# size), and for a draw "dz" (prize), "dv" (value), "dn" (nonce), "dw" (weights in force),
# "dk" (owed the pity prize), "ds" (the member's streak after it) and "dq" (its number)
ROW_WIDTH = 13

# One statement: the rows and their first event, both only for entries not seen before. A
# conflict on anything but claim_id (the member's request_id) fails the statement: those are
# filtered out first (see ``ClaimWriter._request_conflicts``), and a race with another writer
# retries.
INSERT_SQL = """
WITH inserted AS (
    INSERT INTO claims (claim_id, request_id, user_id, benefit_id, option_id, period, tier,
                        account, created_at, code_expiry_ms, bundle_id, bundle_item, bundle_size)
    SELECT c, r, u, b, o, p, t, nullif(a, ''), to_timestamp(ts / 1000.0), x, g, gi, gn
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::int[], $8::text[], $9::bigint[], $10::bigint[], $11::text[], $12::int[],
                $13::int[])
         AS x(c, r, u, b, o, p, t, a, ts, x, g, gi, gn)
    ON CONFLICT (claim_id) DO NOTHING
    RETURNING claim_id, created_at
)
INSERT INTO claim_events (claim_id, from_status, to_status, reason, created_at)
SELECT claim_id, NULL, 'accepted', 'claimed', created_at FROM inserted
"""

# Entries whose request the member already holds under another claim id (the options of
# one bundle share their request: they are told apart by the bundle's claim id, $6).
CONFLICTS_SQL = """
SELECT x.c, k.claim_id AS original
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
     AS x(c, r, u, b, p, g)
JOIN claims k ON k.benefit_id = x.b AND k.period = x.p AND k.user_id = x.u
             AND k.request_id = x.r AND k.bundle_item = 0
WHERE coalesce(k.bundle_id, k.claim_id) <> x.g
"""

DRAWS_SQL = """
INSERT INTO draws (claim_id, benefit_id, period, user_id, request_id, nonce, value, weights,
                   prize_id, owed, streak, seq, created_at)
SELECT c, b, p, u, r, n, v, w, z, k, s, q, to_timestamp(ts / 1000.0)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
            $7::bigint[], $8::text[], $9::text[], $10::bool[], $11::int[], $12::bigint[],
            $13::bigint[]) AS x(c, b, p, u, r, n, v, w, z, k, s, q, ts)
ON CONFLICT (claim_id) DO NOTHING
"""


def claim_row(fields: dict[bytes, bytes]) -> list[Any] | None:
    """The claims row of a stream entry (None when malformed): claim_id, request_id, user_id,
    benefit_id, option_id, period, tier, account, created_ms, code expiry, bundle id (None:
    not a bundle), index in the bundle, bundle size."""
    try:
        values = [fields[f.encode()].decode() for f in FIELDS]
        expiry = fields.get(b"x", b"").decode()
        int(fields.get(b"pp", b"0"))
        fields.get(b"pl", b"").decode()
        bundle = fields.get(b"g", b"").decode() or None
        if b"dz" in fields and draw_record(fields, values[0]) is None:
            return None
        return [
            *values[:6],
            int(values[6]),
            values[7],
            int(values[8]),
            int(expiry) if expiry else None,
            bundle,
            int(fields.get(b"gi", b"0")),
            int(fields.get(b"gn", b"1")),
        ]
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def draw_record(fields: dict[bytes, bytes], claim_id: str) -> tuple[Any, ...] | None:
    """The draws row of a draw's stream entry (None when it is not a draw, or malformed)."""
    if b"dz" not in fields:
        return None
    try:
        return (
            claim_id,
            fields[b"b"].decode(),
            fields[b"p"].decode(),
            fields[b"u"].decode(),
            fields[b"r"].decode(),
            int(fields[b"dn"]),
            int(fields[b"dv"]),
            fields[b"dw"].decode(),
            fields[b"dz"].decode(),
            fields[b"dk"] == b"1",
            int(fields[b"ds"]),
            int(fields[b"dq"]),
            int(fields[b"ts"]),
        )
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
    """Insert the rows (with debits and draw records) not seen before; returns how many rows
    were new."""
    columns: list[list[Any]] = [[] for _ in range(ROW_WIDTH)]
    debits = []
    draws: list[tuple[Any, ...]] = []
    for fields, row in entries:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
        debit = _debit(fields, row)
        if debit is not None:
            debits.append(debit)
        draw = draw_record(fields, row[0])
        if draw is not None:
            draws.append(draw)
    if not debits and not draws:
        status = await pool.execute(INSERT_SQL, *columns)
        return int(status.split()[-1])
    async with pool.acquire() as conn, conn.transaction():
        status = await conn.execute(INSERT_SQL, *columns)
        if draws:
            await conn.execute(DRAWS_SQL, *[list(c) for c in zip(*draws, strict=True)])
        await record_debits(conn, debits)
    return int(status.split()[-1])
