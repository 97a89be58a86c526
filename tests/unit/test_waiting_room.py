"""The waiting room's order: reproducible from the revealed seed, and arriving early in the
pre-queue gives no advantage (a statistical test over many rooms)."""

from __future__ import annotations

import hashlib
import hmac
import math
import random

from claim_service.domain.waiting_room import order, positions, shuffle_key
from tests.unit.test_draws import chi2_sf

ROOMS = 2_000
TICKETS = 20
P_VALUE = 0.001


def test_the_order_follows_the_documented_steps() -> None:
    seed = bytes(32)
    tickets = [f"{i:032x}" for i in range(5)]
    expected = sorted(
        tickets,
        key=lambda t: int.from_bytes(
            hmac.new(seed, t.encode(), hashlib.sha256).digest()[:6], "big"
        ),
    )
    assert order(seed, tickets, ["late-1", "late-0"]) == [*expected, "late-1", "late-0"]
    assert positions(seed, tickets)[expected[0]] == 1
    assert order(seed, tickets) == order(seed, list(reversed(tickets)))  # arrival is irrelevant
    assert shuffle_key(seed, tickets[0]) < 2**64


def test_early_arrival_gives_no_advantage() -> None:
    """Over 2,000 rooms of 20 pre-queued tickets each, with the ticket that arrived k-th
    counted where it lands: every arrival rank is spread evenly over the positions (a
    chi-square test of the 20 x 20 table at p = 0.001), and the first arrivals' mean
    position is the middle."""
    rng = random.Random(2026)  # fixed: the test gives the same answer every run
    table = [[0] * TICKETS for _ in range(TICKETS)]
    for _ in range(ROOMS):
        seed = rng.randbytes(32)
        arrivals = [rng.randbytes(16).hex() for _ in range(TICKETS)]
        where = positions(seed, arrivals)
        for rank, ticket in enumerate(arrivals):
            table[rank][where[ticket] - 1] += 1
    expected = ROOMS / TICKETS
    statistic = sum((n - expected) ** 2 / expected for row in table for n in row)
    dof = (TICKETS - 1) ** 2
    assert chi2_sf(statistic, dof) > P_VALUE, statistic
    first = sum((p + 1) * n for p, n in enumerate(table[0])) / ROOMS
    spread = math.sqrt((TICKETS**2 - 1) / 12 / ROOMS)
    assert abs(first - (TICKETS + 1) / 2) < 4 * spread, first
