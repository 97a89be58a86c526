"""The demo's options, what its burst saw, and the summary with the invariants it checks."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.store.buckets import stock_counters

DRAIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DemoOptions:
    stock: int = 8000
    members: int = 20000
    concurrency: int = 200
    retries: float = 0.1
    codes: int = 2500
    seed: int = 10
    cluster: bool = False  # on a local Valkey Cluster, the video benefit sharded (demo_cluster)


@dataclass
class BurstStats:
    sent: int = 0
    accepted: int = 0
    replayed: int = 0
    replay_mismatch: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    opened_at: float = 0.0
    sold_out_at: float | None = None
    finished_at: float = 0.0
    stock_left: int | None = None
    claims_by_member: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)  # claims answered, by member
    first_sold_out_ms: float | None = None  # when the first sold_out came back (our clock)
    last_accepted_ms: float | None = None  # the latest created_at of an accepted claim


def say(text: str) -> None:
    print(text, flush=True)


def verdict(checks: list[tuple[str, bool]], logfile: Path) -> int:
    say("== invariants ==")
    for name, ok in checks:
        say(f"  [{'ok' if ok else 'FAIL'}] {name}")
    failed = [name for name, ok in checks if not ok]
    say("all invariants hold" if not failed else f"{len(failed)} invariant(s) FAILED")
    say(f"(server, writer, fulfilment and partner logs: {logfile})")
    return 0 if not failed else 1


async def report(
    pool: asyncpg.Pool,
    redis: Redis,
    settings: Settings,
    benefit_id: str,
    stats: BurstStats,
    options: DemoOptions,
    shards: int = 1,
) -> list[tuple[str, bool]]:
    period = periods.current_period(settings.tz)
    # Units held right now: what Redis counts as taken (refunds give units back).
    taken = (await stock_counters(redis, benefit_id, shards, period)).get("taken", 0)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    rows = 0
    while time.monotonic() < deadline:
        rows = int(
            await pool.fetchval("SELECT count(*) FROM claims WHERE benefit_id = $1", benefit_id)
        )
        if rows >= stats.accepted:
            break
        await asyncio.sleep(0.2)
    persisted_in = time.monotonic() - stats.finished_at
    over_quota = int(
        await pool.fetchval(
            """SELECT count(*) FROM (
               SELECT c.user_id, count(*) AS n, max(t.tier) AS tier FROM claims c
               JOIN tiers t ON t.period = c.period AND t.user_id = c.user_id
               WHERE c.benefit_id = $1 AND c.status <> 'refunded' GROUP BY c.user_id) x
           WHERE n > CASE WHEN tier >= 8 THEN 2 WHEN tier >= 4 THEN 1 ELSE 0 END""",
            benefit_id,
        )
    )
    below_tier = int(
        await pool.fetchval(
            """SELECT count(*) FROM claims c LEFT JOIN tiers t
               ON t.period = c.period AND t.user_id = c.user_id
           WHERE c.benefit_id = $1 AND coalesce(t.tier, 0) < 4""",
            benefit_id,
        )
    )
    duplicates = int(
        await pool.fetchval(
            """SELECT count(*) - count(DISTINCT (user_id, request_id)) FROM claims
           WHERE benefit_id = $1""",
            benefit_id,
        )
    )
    by_option = await pool.fetch(
        "SELECT option_id, count(*) AS n FROM claims WHERE benefit_id = $1 GROUP BY 1 ORDER BY 1",
        benefit_id,
    )
    sell_out = (stats.sold_out_at - stats.opened_at) if stats.sold_out_at else None
    elapsed = max(stats.finished_at - stats.opened_at, 1e-6)

    say("")
    say(f"== release summary ({period}, benefit {benefit_id}) ==")
    say(f"  members                 {options.members:>10,}")
    say(f"  requests sent           {stats.sent:>10,}   ({stats.sent / elapsed:,.0f}/s)")
    say(
        f"  accepted                {stats.accepted:>10,}   "
        f"({stats.accepted / elapsed:,.0f} claims/s)"
    )
    say(f"  retries replayed        {stats.replayed:>10,}   (same claim returned, no unit taken)")
    for code, n in sorted(stats.outcomes.items(), key=lambda kv: -kv[1]):
        if code == "not_open":
            say(f"  early, told not_open    {n:>10,}   (retried at the opening)")
        elif code != "accepted":
            say(f"  rejected {code:<15} {n:>10,}")
    say("  time to sell out        " + (f"{sell_out:>9.2f}s" if sell_out else "   not sold out"))
    say(
        f"  rows in PostgreSQL      {rows:>10,}   (all persisted {persisted_in:.1f}s after the "
        "burst)"
    )
    say("  by option               " + ", ".join(f"{r['option_id']} {r['n']:,}" for r in by_option))

    refunded = int(
        await pool.fetchval(
            "SELECT count(*) FROM claims WHERE benefit_id = $1 AND status = 'refunded'", benefit_id
        )
    )
    if refunded:
        say(
            f"  refunded in the burst    {refunded:>9,}   (failed deliveries; their units "
            "went back on sale)"
        )
    checks = [
        ("units taken never exceed stock", taken <= options.stock),
        (
            "no undersell: stock reached exactly 0 while demand lasted",
            stats.stock_left == 0 or stats.outcomes["sold_out"] == 0,
        ),
        ("no member over the quota of their tier", over_quota == 0),
        ("no claim below min_tier", below_tier == 0),
        ("retries returned the original claim", stats.replay_mismatch == 0),
        ("rows in PostgreSQL == accepted", rows == stats.accepted),
        ("no request persisted twice", duplicates == 0),
        ("no transport errors", stats.outcomes["client_error"] == 0),
    ]
    return checks
