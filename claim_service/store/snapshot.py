"""A benefit's claims as recovery sees them: the persisted rows and the stream entries not yet
persisted, united by claim id, and what Redis's counters must say about them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Snapshot:
    claims: list[ClaimRecord]
    added: int
    codes: Counter[tuple[str, int]]
    unpersisted: int
    period: str

    @property
    def claims_in_period(self) -> int:
        return sum(1 for c in self.claims if c.period == self.period)


def idem_pairs(claims: Iterable[ClaimRecord]) -> list[tuple[str, Any]]:
    return [
        (
            idem_field(c.user_id, c.request_id),
            f"{c.claim_id}|{c.option_id}|{c.tier}|{c.created_ms}",
        )
        for c in claims
    ]


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
        )
    except (KeyError, ValueError):
        return None  # malformed: the writer dead-letters it
