"""The demo's waiting room: members take tickets before and after the opening, wait for
their admission as the answers tell them (position, estimated wait, refresh hint), claim
with their admission token; then the shuffle is checked against the revealed seed.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp

from claim_service.config import Settings
from claim_service.domain.waiting_room import order
from claim_service.http.auth import mint_token
from claim_service.local.demo_report import say

PREQUEUE_MINUTES = 1
POLL_MIN_S = 0.25
FINAL = ("sold_out", "closed")


def room_config(stock: int) -> dict[str, int]:
    """Admit half the stock a second: the room, not the crowd, sets the pace."""
    return {"prequeue_minutes": PREQUEUE_MINUTES, "admit_per_s": max(stock // 2, 200)}


@dataclass
class RoomStats:
    tickets: dict[str, str] = field(default_factory=dict)  # member -> ticket id
    positions: dict[str, int] = field(default_factory=dict)
    prequeue: int = 0
    admitted: int = 0
    polls: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    waits: list[float] = field(default_factory=list)


class Room:
    """One member's way through the room: ``admission`` returns their token, or None when
    the room closed before them (the reason counted in ``stats.refused``)."""

    def __init__(
        self, http: aiohttp.ClientSession, base: str, benefit_id: str, opens: datetime
    ) -> None:
        self.http = http
        self.url = f"{base}/v1/benefits/{benefit_id}/queue"
        self.opens = opens
        self.stats = RoomStats()

    async def admission(self, user: str, headers: dict[str, str], rng: random.Random) -> str | None:
        async with self.http.post(self.url, headers=headers) as resp:
            ticket = await resp.json()
            if resp.status not in (200, 201):
                self.stats.refused[ticket.get("error", str(resp.status))] += 1
                return None
        self.stats.tickets[user] = ticket["ticket_id"]
        if ticket["status"] == "prequeue":
            self.stats.prequeue += 1
        joined = time.monotonic()
        while True:
            if ticket["position"] is not None:
                self.stats.positions[user] = ticket["position"]
            if ticket["status"] == "admitted":
                self.stats.admitted += 1
                self.stats.waits.append(time.monotonic() - joined)
                return str(ticket["admission_token"])
            if ticket["status"] in FINAL:
                self.stats.refused[ticket["status"]] += 1
                return None
            # As the answer says: the estimated wait when it is short, else the hint.
            wait = ticket["estimated_wait_s"] or 0.0
            pause = min(float(ticket["refresh_after_s"]), max(wait, POLL_MIN_S))
            await asyncio.sleep(pause * (0.9 + rng.random() * 0.2))
            async with self.http.get(self.url, headers=headers) as resp:
                self.stats.polls += 1
                ticket = await resp.json()
                if resp.status != 200:
                    self.stats.refused[ticket.get("error", str(resp.status))] += 1
                    return None

    async def report(self, settings: Settings, benefit_id: str) -> list[tuple[str, bool]]:
        """The room's summary, and its checks: the order re-derived from the revealed seed,
        no claim without an admission, no ticket once sold out."""
        stats = self.stats
        headers = {"Authorization": "Bearer " + mint_token(settings, "demo-auditor", 600)}
        claims_url = self.url.rsplit("/", 1)[0] + "/claims"
        async with self.http.post(
            claims_url, json={"request_id": "no-admission", "option_id": "iqiyi"}, headers=headers
        ) as resp:
            unadmitted = resp.status, (await resp.json()).get("error")
        async with self.http.post(self.url, headers=headers) as resp:
            late = await resp.json()
            late_ticket = resp.status, late.get("error") or late.get("status")
        proof: dict[str, Any] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            async with self.http.get(self.url + "/order", headers=headers) as resp:
                proof = await resp.json()
            if proof.get("seed"):
                break
            await asyncio.sleep(0.5)
        seed = bytes.fromhex(proof.get("seed") or "")
        prequeue = proof.get("prequeue") or []
        place = {t: i for i, t in enumerate([*prequeue, *(proof.get("late") or [])], start=1)}
        waits = sorted(stats.waits) or [0.0]
        say("")
        say(f"== waiting room (benefit {benefit_id}) ==")
        say(f"  tickets                 {len(stats.tickets):>10,}   ({stats.prequeue:,} in the "
            f"pre-queue, shuffled at the opening)")  # fmt: skip
        say(f"  admitted                {stats.admitted:>10,}   (median wait "
            f"{waits[len(waits) // 2]:.1f}s, longest {waits[-1]:.1f}s)")  # fmt: skip
        say(f"  status polls            {stats.polls:>10,}")
        for reason, n in sorted(stats.refused.items()):
            say(f"  told {reason:<18} {n:>10,}   (the room closed before their turn)")
        say(f"  commitment              {proof.get('commitment')}")
        say(f"  seed (revealed)         {proof.get('seed')}")
        return [
            (
                "waiting room: the seed matches its commitment",
                bool(seed) and hashlib.sha256(seed).hexdigest() == proof.get("commitment"),
            ),
            (
                "waiting room: the pre-queue's order re-derived from the revealed seed",
                bool(seed) and order(seed, prequeue) == prequeue,
            ),
            (
                "waiting room: every member's place is the published one",
                all(place.get(stats.tickets[u]) == p for u, p in stats.positions.items()),
            ),
            (
                "waiting room: no claim without an admission",
                unadmitted in ((403, "admission_required"), (410, "sold_out")),
            ),
            (
                # a refund after the sell-out (a failed delivery) puts stock back: the room
                # then opens again, and a newcomer gets a ticket at the back
                "waiting room: closed while sold out (no new ticket), open again on stock back",
                late_ticket == (410, "sold_out") or late_ticket[0] == 201,
            ),
        ]
