"""A benefit's claims as recovery and reconciliation see them: the persisted rows and the
stream entries not yet persisted, united by claim id, and what Redis's counters must say
about them (``Snapshot.expected_counters``: recovery writes it, ``reconcile`` compares
Redis with it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from claim_service.store.keyspace import idem_field, text

STREAM_CHUNK = 10_000


@dataclass
class ClaimRecord:
    claim_id: str
    user_id: str
    request_id: str
    option_id: str
    period: str
    tier: int
    created_ms: int
    status: str
    code_expiry_ms: int | None
    bundle_id: str | None = None  # the bundle's claim id (an option of a bundle)
    bundle_item: int = 0
    prize_id: str | None = None  # a draw's prize
    streak: int = 0  # a draw's: the member's draws in a row without a pity prize, after it
    seq: int = 0  # a draw's number in the period

    @property
    def group(self) -> str:
        """The claim the member was answered: a bundle's options share it."""
        return self.bundle_id or self.claim_id


@dataclass
class Counters:
    """What Redis must hold for one benefit: the period's counters, and the free codes."""

    stock: dict[str, int]  # taken, taken:<option_id>, prize:<prize_id>, accepted, added
    used: dict[str, int]  # member -> units held this period
    idem: list[tuple[str, str]]  # idempotency field -> "claim_id|option_id|tier|created_ms"
    refunded: list[str]  # claim ids refunded this period
    codes: dict[tuple[str, int], int]  # (option_id, expiry_ms or 0) -> free codes
    previous_idem: list[tuple[str, str]]  # the previous period's idempotency keys
    pity: dict[str, int]  # member -> draws in a row without a pity prize (this period)


@dataclass
class Snapshot:
    claims: list[ClaimRecord]
    added: int
    codes: Counter[tuple[str, int]]
    unpersisted: int
    period: str
    previous: str | None = None

    @property
    def claims_in_period(self) -> int:
        return len({c.group for c in self.claims if c.period == self.period})

    def expected_counters(self) -> Counters:
        """The exact counters these claims make: a refunded claim keeps its idempotency key
        (a retry still finds it) but holds no unit, quota or code. A bundle holds its unit
        and the member's quota while any of its options is not refunded."""
        current = [c for c in self.claims if c.period == self.period]
        live = [c for c in current if c.status != "refunded"]
        live_groups = {c.group: c.user_id for c in live}
        stock: Counter[str] = Counter(
            {"taken": len(live_groups), "accepted": len({c.group for c in current})}
        )
        for claim in live:
            stock["taken:" + claim.option_id] += 1
            if claim.prize_id is not None:
                stock["prize:" + claim.prize_id] += 1
        latest: dict[str, ClaimRecord] = {}
        for claim in current:
            held = latest.get(claim.user_id)
            if claim.prize_id is not None and (held is None or claim.seq > held.seq):
                latest[claim.user_id] = claim
        earlier = [c for c in self.claims if self.previous and c.period == self.previous]
        return Counters(
            stock={**stock, "added": self.added},
            used=dict(Counter(live_groups.values())),
            idem=idem_pairs(current),
            refunded=[c.claim_id for c in current if c.status == "refunded"],
            codes={bucket: max(count, 0) for bucket, count in self.codes.items()},
            previous_idem=idem_pairs(earlier),
            pity={user: claim.streak for user, claim in latest.items()},
        )


def idem_pairs(claims: Iterable[ClaimRecord]) -> list[tuple[str, str]]:
    """The idempotency keys of these claims, one per claim answered (a bundle's: its
    options joined by "," in order; a draw's: "option_id/prize_id")."""
    groups: dict[str, list[ClaimRecord]] = {}
    for claim in claims:
        groups.setdefault(claim.group, []).append(claim)
    pairs = []
    for group, items in groups.items():
        items.sort(key=lambda c: c.bundle_item)
        first = items[0]
        taken = ",".join(c.option_id for c in items)
        if first.prize_id is not None:
            taken = f"{first.option_id}/{first.prize_id}"
        pairs.append(
            (
                idem_field(first.user_id, first.request_id),
                f"{group}|{taken}|{first.tier}|{first.created_ms}",
            )
        )
    return pairs


async def stream_claims(redis: Redis, stream: str) -> list[ClaimRecord]:
    """Every claim still in the benefit's stream (accepted, maybe not yet persisted)."""
    found: list[ClaimRecord] = []
    start = "-"
    while True:
        entries = await redis.xrange(stream, min=start, max="+", count=STREAM_CHUNK) or []
        for _entry_id, fields in entries:
            claim = entry_claim({text(k): text(v) for k, v in (fields or {}).items()})
            if claim is not None:
                found.append(claim)
        if len(entries) < STREAM_CHUNK:
            return found
        start = "(" + text(entries[-1][0])


def entry_claim(fields: dict[str, str]) -> ClaimRecord | None:
    try:
        expiry = fields.get("x", "")
        return ClaimRecord(
            fields["c"],
            fields["u"],
            fields["r"],
            fields["o"],
            fields["p"],
            int(fields["t"]),
            int(fields["ts"]),
            "accepted",
            int(expiry) if expiry else None,
            fields.get("g") or None,
            int(fields.get("gi", "0")),
            fields.get("dz") or None,
            int(fields.get("ds", "0")),
            int(fields.get("dq", "0")),
        )
    except (KeyError, ValueError):
        return None  # malformed: the writer dead-letters it


async def read_snapshot(
    pool: asyncpg.Pool,
    benefit_id: str,
    period: str,
    previous: str | None,
    in_stream: list[ClaimRecord],
) -> Snapshot:
    """One PostgreSQL snapshot of the benefit's claims (of ``period`` and ``previous``),
    top-ups and free codes, united with ``in_stream`` (read *before*, so that an entry
    persisted in between is seen twice and counted once, never missed)."""
    periods_wanted = [period] if previous is None else [period, previous]
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        rows = await conn.fetch(
            """SELECT c.claim_id, c.user_id, c.request_id, c.option_id, c.period, c.tier,
                      c.status, (extract(epoch FROM c.created_at) * 1000)::bigint AS created_ms,
                      c.code_expiry_ms, c.bundle_id, c.bundle_item, d.prize_id, d.streak, d.seq
               FROM claims c LEFT JOIN draws d USING (claim_id)
               WHERE c.benefit_id = $1 AND c.period = ANY($2::text[])""",
            benefit_id,
            periods_wanted,
        )
        persisted = {
            r["claim_id"]
            for r in await conn.fetch(
                "SELECT claim_id FROM claims WHERE claim_id = ANY($1::text[])",
                [c.claim_id for c in in_stream],
            )
        }
        added = await conn.fetchval(
            """SELECT coalesce(sum(amount), 0) FROM stock_additions
               WHERE benefit_id = $1 AND period = $2""",
            benefit_id,
            period,
        )
        free = await conn.fetch(
            """SELECT option_id,
                      coalesce((extract(epoch FROM expires_at) * 1000)::bigint, 0) AS expiry,
                      count(*) AS n
               FROM voucher_codes
               WHERE benefit_id = $1 AND claim_id IS NULL
                 AND (expires_at IS NULL OR expires_at > now())
               GROUP BY 1, 2""",
            benefit_id,
        )
        waiting = await conn.fetch(
            """SELECT c.option_id, coalesce(c.code_expiry_ms, 0) AS expiry, count(*) AS n
               FROM claims c JOIN benefit_options o USING (benefit_id, option_id)
               WHERE c.benefit_id = $1 AND o.kind = 'card_key' AND c.code_id IS NULL
                 AND c.status IN ('accepted', 'fulfilling')
               GROUP BY 1, 2""",
            benefit_id,
        )
    claims = {
        r["claim_id"]: ClaimRecord(
            r["claim_id"],
            r["user_id"],
            r["request_id"],
            r["option_id"],
            r["period"],
            r["tier"],
            r["created_ms"],
            r["status"],
            r["code_expiry_ms"],
            r["bundle_id"],
            r["bundle_item"],
            r["prize_id"],
            r["streak"] or 0,
            r["seq"] or 0,
        )
        for r in rows
    }
    unpersisted = [c for c in in_stream if c.claim_id not in persisted]
    for claim in unpersisted:
        if claim.period in periods_wanted:
            claims.setdefault(claim.claim_id, claim)
    codes: Counter[tuple[str, int]] = Counter()
    for r in free:
        codes[(r["option_id"], r["expiry"])] += r["n"]
    for r in waiting:  # reserved by a persisted claim that has no code yet
        codes[(r["option_id"], r["expiry"])] -= r["n"]
    for claim in unpersisted:
        if claim.code_expiry_ms is not None:
            codes[(claim.option_id, claim.code_expiry_ms)] -= 1
    return Snapshot(list(claims.values()), int(added), codes, len(unpersisted), period, previous)
