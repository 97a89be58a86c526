"""The demo's burst: members open the app over the seconds around the opening (most before
it, a fifth just after), go through the waiting room when the benefit has one, and claim over
HTTP, some resending the same request as an app that timed out would; with a progress bar.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from datetime import datetime
from typing import Any

import aiohttp

from claim_service.config import Settings
from claim_service.http.auth import mint_token
from claim_service.local.demo_report import BurstStats, DemoOptions, say
from claim_service.local.demo_room import Room

LATE_ARRIVALS = 0.2  # of the members, arriving in the seconds after the opening
OPTION_IDS = ("iqiyi", "tencent", "youku")


async def burst(
    http: aiohttp.ClientSession,
    base: str,
    settings: Settings,
    benefit_id: str,
    opens: datetime,
    options: DemoOptions,
    room: Room | None,
    option_ids: tuple[str, ...] = OPTION_IDS,
) -> BurstStats:
    """Every member's session; ``room`` None: they claim without an admission token."""
    stats = BurstStats()
    rng = random.Random(options.seed)
    url = f"{base}/v1/benefits/{benefit_id}/claims"
    order = list(range(options.members))
    rng.shuffle(order)
    done = asyncio.Event()

    async def post(headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        stats.sent += 1
        async with http.post(url, json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    finished = 0

    async def member_session(member: int) -> None:
        user = f"m{member:06d}"
        headers = {"Authorization": "Bearer " + mint_token(settings, user, 600)}
        token = await room.admission(user, headers, rng) if room is not None else None
        if room is not None and token is None:
            return
        attempt = 0
        while True:
            attempt += 1
            body = {"request_id": f"{user}-{attempt}", "option_id": rng.choice(option_ids)}
            if token is not None:
                body["admission_token"] = token
            status, reply = await post(headers, body)
            code = reply.get("error", "accepted")
            if status == 425:  # early: wait for the opening like a real app would
                stats.outcomes["not_open"] += 1
                await asyncio.sleep(max(opens.timestamp() - time.time(), 0) + rng.random() * 0.2)
                attempt -= 1
                continue
            stats.outcomes[code] += 1
            stats.answers[user] += 1
            if code == "sold_out" and stats.sold_out_at is None:
                stats.sold_out_at = time.monotonic()
                stats.first_sold_out_ms = time.time() * 1000
            if "stock_left" in reply:
                left = int(reply["stock_left"])
                stats.stock_left = left if stats.stock_left is None else min(stats.stock_left, left)
            if status != 202:
                return
            stats.accepted += 1
            stats.claims_by_member[user] += 1
            if reply.get("created_at"):  # the deciding server's clock, to the millisecond
                decided = datetime.fromisoformat(reply["created_at"]).timestamp() * 1000
                stats.last_accepted_ms = max(stats.last_accepted_ms or 0.0, decided)
            if rng.random() < options.retries:  # the app timed out and resends the same request
                status, again = await post(headers, body)
                stats.replayed += 1
                stats.answers[user] += 1
                if status not in (200, 202) or again.get("claim_id") != reply["claim_id"]:
                    stats.replay_mismatch += 1

    async def arrive(member: int, at: float) -> None:
        """A member opens the app at ``at`` (most before the opening, some after)."""
        nonlocal finished
        await asyncio.sleep(max(at - time.time(), 0))
        try:
            await member_session(member)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            stats.outcomes["client_error"] += 1
        finally:
            finished += 1

    async def progress() -> None:
        width = 30
        tty = sys.stderr.isatty()
        while not done.is_set():
            frac = finished / max(options.members, 1)
            bar = "#" * int(frac * width)
            if room is not None:
                left = "?" if stats.stock_left is None else f"{stats.stock_left:,}"
                line = (
                    f"tickets {len(room.stats.tickets):>6,}  admitted {room.stats.admitted:>6,}  "
                    f"claims {stats.sent:>7,}  accepted {stats.accepted:>6,}  stock left {left:>6}"
                )
            else:  # a reply's stock_left is its bucket's when the stock is sharded
                line = (
                    f"claims {stats.sent:>7,}  accepted {stats.accepted:>6,}  "
                    f"sold_out {stats.outcomes['sold_out']:>6,}"
                )
            print(
                f"\r  [{bar:<{width}}] {finished:>6,}/{options.members:,} members  {line}",
                end="" if tty else "\n",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(0.2 if tty else 2.0)

    ticker = asyncio.create_task(progress())
    # Members open the app from now on: most in the pre-queue, some after the opening.
    now, opening = time.time(), opens.timestamp()
    arrivals = [
        opening + rng.random() * 2.0
        if rng.random() < LATE_ARRIVALS
        else now + rng.random() * max(opening - now - 1.0, 0.5)
        for _ in order
    ]
    stats.opened_at = time.monotonic() + max(opening - time.time(), 0)
    started = time.monotonic()
    await asyncio.gather(*(arrive(m, at) for m, at in zip(order, arrivals, strict=True)))
    stats.finished_at = time.monotonic()
    done.set()
    await ticker
    print(file=sys.stderr)
    say(f"burst finished in {stats.finished_at - started:.1f}s")
    return stats
