"""The waiting room's fair order, as plain functions anyone can reimplement from this
docstring (the room itself, its tickets and admissions, build on them).

**Commitment.** When a benefit's pre-queue opens, a secret seed (32 random bytes) is made
and ``commitment(seed)`` (hex SHA-256, as for draws) is published; the seed is revealed once
the opening has passed, when the pre-queue's order is fixed.

**Tickets.** Each member gets one ticket, whose id is random and published with the room's
order (no member data): ``ticket_id`` is 32 hex characters.

**The shuffle.** A ticket's key is HMAC-SHA256(key = seed, message = UTF-8 of the ticket
id), its first 6 bytes big-endian (a whole number below 2**48, which a Redis sorted set
holds exactly). The pre-queue (tickets taken before the opening, by the Redis server's
clock) is ordered by key, ties by ticket id; positions count from 1. Tickets taken after the
opening join the back in the order they were taken. Arriving early therefore buys nothing but
a place in the pre-queue: where in it is decided by the seed, which nobody knew when they
arrived.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from claim_service.domain.draws import commitment
from claim_service.domain.fields import as_integer
from claim_service.errors import ValidationError

__all__ = ["WaitingRoom", "commitment", "order", "parse_waiting_room", "shuffle_key"]

KEY_BYTES = 6
LATE = 2**48  # late arrivals' place in the sorted set: after every pre-queue key
PREQUEUE_MINUTES_MAX = 24 * 60
ADMIT_PER_S_MAX = 100_000


def shuffle_key(seed: bytes, ticket_id: str) -> int:
    digest = hmac.new(seed, ticket_id.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:KEY_BYTES], "big")


def order(seed: bytes, prequeue: Sequence[str], late: Sequence[str] = ()) -> list[str]:
    """Ticket ids in queue order: the pre-queue shuffled by ``shuffle_key``, then the late
    arrivals as they came."""
    shuffled = sorted(prequeue, key=lambda t: (shuffle_key(seed, t), t))
    return [*shuffled, *late]


def positions(seed: bytes, prequeue: Sequence[str], late: Sequence[str] = ()) -> dict[str, int]:
    """Each ticket's position (1 = first admitted)."""
    return {ticket: i for i, ticket in enumerate(order(seed, prequeue, late), start=1)}


@dataclass(frozen=True)
class WaitingRoom:
    """A benefit's room: tickets from ``prequeue_minutes`` before each opening, admitted
    ``admit_per_s`` a second from the opening on while stock is left."""

    prequeue_minutes: int
    admit_per_s: int

    @property
    def prequeue_ms(self) -> int:
        return self.prequeue_minutes * 60_000

    def to_json(self) -> dict[str, Any]:
        return {"prequeue_minutes": self.prequeue_minutes, "admit_per_s": self.admit_per_s}


def parse_waiting_room(data: Any) -> WaitingRoom:
    if not isinstance(data, dict):
        raise ValidationError("waiting_room must be an object", field="waiting_room")
    found = {}
    for name, lo, hi in (
        ("prequeue_minutes", 1, PREQUEUE_MINUTES_MAX),
        ("admit_per_s", 1, ADMIT_PER_S_MAX),
    ):
        field = f"waiting_room.{name}"
        value = as_integer(data.get(name))
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValidationError(f"{field} must be an integer in {lo}..{hi}", field=field)
        found[name] = value
    return WaitingRoom(found["prequeue_minutes"], found["admit_per_s"])


def estimated_wait_s(ahead: int, admit_per_s: int) -> float:
    """Seconds until ``ahead`` more members are admitted at the room's rate (stock allowing)."""
    return round(max(ahead, 0) / admit_per_s, 1)
