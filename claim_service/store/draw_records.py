"""Draws as recorded: each draw's proof, a period's records in order (for ``verify-draws``),
the published results, and the prizes' stock left in Redis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis

from claim_service.domain.catalogue import Benefit
from claim_service.domain.draws import AuditRecord, DrawRecord
from claim_service.store.keyspace import BenefitKeys, text

RECORD_COLUMNS = (
    "claim_id, user_id, request_id, nonce, value, weights, prize_id, owed, streak, seq, "
    "period, created_at"
)


def parse_weights(text_: str) -> tuple[tuple[str, int], ...]:
    """``"prize_id:weight,..."`` as (prize_id, weight) pairs."""
    pairs = []
    for item in text_.split(","):
        name, _, weight = item.rpartition(":")
        pairs.append((name, int(weight)))
    return tuple(pairs)


@dataclass(frozen=True)
class StoredDraw:
    claim_id: str
    record: DrawRecord
    value: int
    owed: bool
    streak: int
    seq: int
    period: str

    def audit_record(self) -> AuditRecord:
        return AuditRecord(self.claim_id, self.record, self.value, self.owed, self.streak, self.seq)

    def to_json(self) -> dict[str, Any]:
        total = sum(w for _, w in self.record.weights)
        return {
            "user_id": self.record.user_id,
            "request_id": self.record.request_id,
            "nonce": self.record.nonce,
            "message": f"{self.record.user_id}:{self.record.request_id}:{self.record.nonce}",
            "value": self.value,
            "weights": [{"prize_id": p, "weight": w} for p, w in self.record.weights],
            "total_weight": total,
            "target": self.value % total if total else None,
            "owed_pity": self.owed,
            "streak": self.streak,
            "seq": self.seq,
            "prize_id": self.record.prize_id,
        }


def _stored(row: Any) -> StoredDraw:
    return StoredDraw(
        row["claim_id"],
        DrawRecord(
            row["user_id"],
            row["request_id"],
            int(row["nonce"]),
            parse_weights(row["weights"]),
            row["prize_id"],
        ),
        int(row["value"]),
        bool(row["owed"]),
        int(row["streak"]),
        int(row["seq"]),
        row["period"],
    )


async def find_draw(pool: asyncpg.Pool, redis: Redis, claim: dict[str, Any]) -> StoredDraw | None:
    """The draw a claim made: its record in PostgreSQL, or its entry still in the stream."""
    row = await pool.fetchrow(
        f"SELECT {RECORD_COLUMNS} FROM draws WHERE claim_id = $1", claim["claim_id"]
    )
    if row is not None:
        return _stored(row)
    keys = BenefitKeys(claim["benefit_id"])
    entry_id = await redis.hget(keys.pending, claim["claim_id"])
    if entry_id is None:
        return None
    entries = await redis.xrange(keys.stream, min=entry_id, max=entry_id)
    if not entries:  # persisted meanwhile
        row = await pool.fetchrow(
            f"SELECT {RECORD_COLUMNS} FROM draws WHERE claim_id = $1", claim["claim_id"]
        )
        return None if row is None else _stored(row)
    fields = {text(k): text(v) for k, v in (entries[0][1] or {}).items()}
    if "dz" not in fields:
        return None
    return StoredDraw(
        fields["c"],
        DrawRecord(
            fields["u"], fields["r"], int(fields["dn"]), parse_weights(fields["dw"]), fields["dz"]
        ),
        int(fields["dv"]),
        fields["dk"] == "1",
        int(fields["ds"]),
        int(fields["dq"]),
        fields["p"],
    )


async def period_draws(pool: asyncpg.Pool, benefit_id: str, period: str) -> list[StoredDraw]:
    """Every recorded draw of the period, in the order they were drawn."""
    rows = await pool.fetch(
        f"""SELECT {RECORD_COLUMNS} FROM draws WHERE benefit_id = $1 AND period = $2
            ORDER BY seq""",
        benefit_id,
        period,
    )
    return [_stored(r) for r in rows]


async def results(pool: asyncpg.Pool, benefit: Benefit, period: str) -> list[dict[str, Any]]:
    """Per prize: draws recorded in the period, and how many of them were refunded (their
    prize went back into stock). No member data."""
    assert benefit.draw is not None
    rows = await pool.fetch(
        """SELECT d.prize_id, count(*) AS drawn,
                  count(*) FILTER (WHERE c.status = 'refunded') AS refunded
           FROM draws d JOIN claims c USING (claim_id)
           WHERE d.benefit_id = $1 AND d.period = $2 GROUP BY 1""",
        benefit.benefit_id,
        period,
    )
    counts = {r["prize_id"]: (int(r["drawn"]), int(r["refunded"])) for r in rows}
    out = []
    for prize in benefit.draw.prizes:
        drawn, refunded = counts.pop(prize.prize_id, (0, 0))
        out.append(
            {"prize_id": prize.prize_id, "name": prize.name, "drawn": drawn, "refunded": refunded}
        )
    for prize_id, (drawn, refunded) in sorted(counts.items()):  # a prize removed since
        out.append({"prize_id": prize_id, "name": prize_id, "drawn": drawn, "refunded": refunded})
    return out


async def prize_levels(
    redis: Redis, benefit: Benefit, period: str, now_ms: int
) -> dict[str, tuple[int, int | None, bool]]:
    """Per prize: (taken this period, left of its own stock or None, whether it can be drawn
    now), the last as ``claim.lua`` decides it: weight above 0, its own stock, its option's
    cap and, for a card-key option, a free unexpired code."""
    assert benefit.draw is not None
    keys = BenefitKeys(benefit.benefit_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.stock(period))
        pipe.hgetall(keys.codes)
        stock_raw, codes_raw = await pipe.execute()
    stock = {text(k): int(v) for k, v in stock_raw.items()}
    free: dict[str, int] = {}
    for field, count in codes_raw.items():
        option_id, _, expiry = text(field).partition("|")
        if not expiry or int(expiry) > now_ms:
            free[option_id] = free.get(option_id, 0) + int(count)
    levels = {}
    for prize in benefit.draw.prizes:
        taken = stock.get("prize:" + prize.prize_id, 0)
        left = None if prize.stock is None else max(prize.stock - taken, 0)
        option = benefit.option(prize.option_id)
        drawable = prize.weight > 0 and (left is None or left > 0) and option is not None
        if option is not None and option.stock_cap is not None:
            drawable = drawable and stock.get("taken:" + option.option_id, 0) < option.stock_cap
        if option is not None and option.kind == "card_key":
            drawable = drawable and free.get(option.option_id, 0) > 0
        levels[prize.prize_id] = (taken, left, drawable)
    return levels
