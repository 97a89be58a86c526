"""The waiting room's fair order, as plain functions anyone can reimplement from this
docstring (the room itself, its tickets and admissions, build on them).

**Commitment.** When a benefit's pre-queue opens, a secret seed (32 random bytes) is made
and ``commitment(seed)`` (hex SHA-256, as for draws) is published; the seed is revealed once
the opening has passed, when the pre-queue's order is fixed.

**Tickets.** Each member gets one ticket, whose id is random and published with the room's
order (no member data): ``ticket_id`` is 32 hex characters.

**The shuffle.** A ticket's key is HMAC-SHA256(key = seed, message = UTF-8 of the ticket
id), its first 8 bytes big-endian. The pre-queue (tickets taken before the opening) is ordered
by key, ties by ticket id; positions count from 1. Tickets taken after the opening join the
back in the order they were taken. Arriving early therefore buys nothing but a place in the
pre-queue: where in it is decided by the seed, which nobody knew when they arrived.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from claim_service.domain.draws import commitment

__all__ = ["commitment", "order", "shuffle_key"]

KEY_BYTES = 8


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
