"""The demo's fulfilment half: a flaky partner simulator, a card-key pool, and the results."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.store.buckets import stock_counters

PARTNER_ID = "videohub"
PARTNER_SECRET = "demo-partner-secret-0123456789"
SETTLE_TIMEOUT_S = 120.0

# The simulated partner misbehaves the way real ones do.
SIM_ARGS = [
    "--partner-id", PARTNER_ID, "--secret", PARTNER_SECRET, "--seed", "10",
    "--latency-ms", "20", "--failure-rate", "0.1", "--timeout-rate", "0.03",
    "--timeout-delay-s", "2.5", "--reject-rate", "0.01", "--processing-rate", "0.3",
    "--callback-delay-ms", "300", "--duplicate-callback-rate", "0.2",
]  # fmt: skip


def sim_args(port: int, api_base: str) -> list[str]:
    return ["partner-sim", "--port", str(port), "--callback-base", api_base, *SIM_ARGS]


async def setup_fulfilment(
    http: aiohttp.ClientSession,
    admin_base: str,
    settings: Settings,
    benefit_id: str,
    sim_url: str,
    codes: int | None,
) -> None:
    """The simulated partner, and ``codes`` Youku codes (None: no card-key option)."""
    admin = {"Authorization": f"Bearer {settings.admin_token}"}
    partner = {"base_url": sim_url, "secret": PARTNER_SECRET, "timeout_s": 1.0,
               "max_in_flight": 64, "max_attempts": 12}  # fmt: skip
    async with http.put(f"{admin_base}/admin/v1/partners/{PARTNER_ID}", json=partner,
                        headers=admin) as resp:  # fmt: skip
        resp.raise_for_status()
    batch, count = 5000, codes or 0
    for start in range(0, count, batch):
        chunk = [{"code": f"YK-{benefit_id}-{i:07d}", "secret": f"{(i * 7919) % 1000000:06d}"}
                 for i in range(start, min(start + batch, count))]  # fmt: skip
        async with http.post(f"{admin_base}/admin/v1/benefits/{benefit_id}/options/youku/codes",
                             json=chunk, headers=admin) as resp:  # fmt: skip
            resp.raise_for_status()
    loaded = "" if codes is None else f"; {codes:,} Youku codes loaded, encrypted"
    print(f"partner {PARTNER_ID} (simulated: 10% errors, 3% timeouts, 30% answered later "
          f"by callback, 20% duplicate callbacks){loaded}", flush=True)  # fmt: skip


async def wait_settled(pool: asyncpg.Pool, benefit_id: str) -> float:
    """Wait until every claim is final; returns how long it took."""
    started = time.monotonic()
    tty = sys.stderr.isatty()
    while time.monotonic() - started < SETTLE_TIMEOUT_S:
        counts = {r["status"]: r["n"] for r in await pool.fetch(
            "SELECT status, count(*) AS n FROM claims WHERE benefit_id = $1 GROUP BY 1",
            benefit_id)}  # fmt: skip
        open_ = counts.get("accepted", 0) + counts.get("fulfilling", 0) + counts.get("failed", 0)
        line = "  fulfilment: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr,
              flush=True)  # fmt: skip
        if open_ == 0:
            break
        await asyncio.sleep(0.25 if tty else 2.0)
    print(file=sys.stderr)
    return time.monotonic() - started


async def fulfilment_report(
    pool: asyncpg.Pool,
    redis: Redis,
    http: aiohttp.ClientSession,
    sim_url: str,
    settings: Settings,
    benefit_id: str,
    settle_s: float,
    shards: int = 1,
) -> list[tuple[str, bool]]:
    """Print fulfilment results; return the fulfilment invariants."""
    by_kind = await pool.fetch(
        """SELECT o.kind, c.status, count(*) AS n FROM claims c
           JOIN benefit_options o USING (benefit_id, option_id)
           WHERE c.benefit_id = $1 GROUP BY 1, 2 ORDER BY 1, 2""",
        benefit_id,
    )
    reasons = await pool.fetch(
        """SELECT failure_reason, count(*) AS n FROM claims
           WHERE benefit_id = $1 AND status = 'refunded' GROUP BY 1 ORDER BY 2 DESC""",
        benefit_id,
    )
    latency = await pool.fetchrow(
        """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99
           FROM (SELECT extract(epoch FROM e.created_at - c.created_at) AS s
                 FROM claims c JOIN claim_events e USING (claim_id)
                 JOIN benefit_options o USING (benefit_id, option_id)
                 WHERE c.benefit_id = $1 AND o.kind = 'card_key'
                   AND e.to_status = 'fulfilled') x""",
        benefit_id,
    )
    codes_given = await pool.fetchval(
        "SELECT count(*) FROM voucher_codes WHERE benefit_id = $1 AND claim_id IS NOT NULL",
        benefit_id,
    )
    card_fulfilled = await pool.fetchval(
        """SELECT count(*) FROM claims c JOIN benefit_options o USING (benefit_id, option_id)
           WHERE c.benefit_id = $1 AND o.kind = 'card_key' AND c.status = 'fulfilled'""",
        benefit_id,
    )
    direct_fulfilled = {r["claim_id"] for r in await pool.fetch(
        """SELECT c.claim_id FROM claims c JOIN benefit_options o USING (benefit_id, option_id)
           WHERE c.benefit_id = $1 AND o.kind = 'direct_charge' AND c.status = 'fulfilled'""",
        benefit_id)}  # fmt: skip
    open_claims = await pool.fetchval(
        """SELECT count(*) FROM claims WHERE benefit_id = $1
           AND status IN ('accepted', 'fulfilling', 'failed')""",
        benefit_id,
    )
    live = await pool.fetchval(
        "SELECT count(*) FROM claims WHERE benefit_id = $1 AND status <> 'refunded'", benefit_id
    )
    period = periods.current_period(settings.tz)
    taken = (await stock_counters(redis, benefit_id, shards, period)).get("taken", 0)
    async with http.get(f"{sim_url}/stats") as resp:
        sim: dict[str, Any] = await resp.json()

    print(f"== fulfilment (all claims final {settle_s:.1f}s after the burst) ==")
    for row in by_kind:
        print(f"  {row['kind']:<14} {row['status']:<10} {row['n']:>8,}")
    for row in reasons:
        print(f"  refunded because {row['failure_reason']:<22} {row['n']:>6,}")
    if latency and latency["p50"] is not None:
        print(f"  card-key code in the member's hands: p50 {latency['p50']:.2f}s, "
              f"p99 {latency['p99']:.2f}s after the claim")  # fmt: skip
    print(f"  partner: {sim['requests']:,} order requests, {sim['charged']:,} charged, "
          f"{sim['double_charged']} charged twice, {sim['duplicates_received']:,} resends "
          f"answered 409, {sim['callbacks_sent']:,} callbacks "
          f"({sim['duplicate_callbacks']:,} duplicates)")  # fmt: skip
    return [
        ("every claim reached a final state", open_claims == 0),
        ("no order charged twice at the partner", sim["double_charged"] == 0),
        ("partner charged exactly the fulfilled direct-charge claims",
         sim["charged"] == len(direct_fulfilled)),
        ("each code went to exactly one claim", codes_given == card_fulfilled),
        ("refunded units and quotas returned exactly once", taken == live),
    ]  # fmt: skip
