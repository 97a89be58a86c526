"""``claim-service demo``: a scaled-down release-time burst, end to end, with a summary.

Starts the embedded Valkey and PostgreSQL (unless ``CLAIM_REDIS_URL``/``CLAIM_DATABASE_URL``
are set), runs ``serve`` and ``writer`` as separate processes, creates a benefit through the
admin API, loads a tier snapshot, then lets members race for the stock over HTTP from the
moment it opens. Exits non-zero if any invariant fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis

from claim_service import demo_fulfilment, periods
from claim_service.auth import mint_token
from claim_service.config import Settings
from claim_service.embedded import EmbeddedServers, free_port
from claim_service.keyspace import BenefitKeys

OPENS_IN_S = 3.0
DRAIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DemoOptions:
    stock: int = 8000
    members: int = 20000
    concurrency: int = 200
    retries: float = 0.1
    codes: int = 2500
    seed: int = 10


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


def _say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _servers(settings: Settings) -> Iterator[Settings]:
    if settings.redis_url and settings.database_url:
        _say(
            f"using configured servers: {settings.redis_url} and PostgreSQL from CLAIM_DATABASE_URL"
        )
        yield settings
        return
    _say("starting embedded Valkey and PostgreSQL ...")
    with EmbeddedServers() as servers:
        yield settings.with_urls(servers.redis_url, servers.database_url)


def _spawn(args: list[str], settings: Settings, logfile: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "CLAIM_REDIS_URL": settings.redis_url or "",
            "CLAIM_DATABASE_URL": settings.database_url or "",
            "CLAIM_PORT": str(settings.port),
            "CLAIM_HOST": "127.0.0.1",
            "CLAIM_ADMIN_PORT": str(settings.admin_port),
            "CLAIM_ADMIN_HOST": "127.0.0.1",
            "CLAIM_JWT_SECRET": settings.jwt_secret,
            "CLAIM_ADMIN_TOKEN": settings.admin_token,
            "CLAIM_TIMEZONE": settings.timezone,
        }
    )
    out = logfile.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "claim_service", *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def run_demo(settings: Settings, options: DemoOptions) -> int:
    import uvloop

    settings = replace(settings, port=free_port(), admin_port=free_port())
    with _servers(settings) as live:
        return uvloop.run(_demo(live, options))


async def _demo(settings: Settings, options: DemoOptions) -> int:
    from claim_service.connections import create_pg_pool, create_redis, migrate

    assert settings.database_url
    pool = await create_pg_pool(settings.database_url, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    logfile = Path(tempfile.gettempdir()) / "claim-service-demo.log"
    logfile.unlink(missing_ok=True)
    base = f"http://127.0.0.1:{settings.port}"
    admin_base = f"http://127.0.0.1:{settings.admin_port}"
    sim_url = f"http://127.0.0.1:{free_port()}"
    # A throw-away stack on this machine: the public development secrets are fine here.
    procs = [
        _spawn(["serve", "--insecure-dev"], settings, logfile),
        _spawn(["writer"], settings, logfile),
        _spawn(["fulfil", "--insecure-dev"], settings, logfile),
        _spawn(demo_fulfilment.sim_args(int(sim_url.rsplit(":", 1)[1]), base), settings,
               logfile),
    ]  # fmt: skip
    assert settings.redis_url
    redis = await create_redis(settings.redis_url)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=options.concurrency)
        ) as http:
            await _wait_ready(http, base + "/readyz", procs, logfile)
            await _wait_ready(http, sim_url + "/stats", procs, logfile)
            benefit_id = f"video-{datetime.now():%H%M%S}"
            opens = datetime.now(settings.tz) + timedelta(seconds=OPENS_IN_S)
            await _setup(http, admin_base, settings, benefit_id, opens, options)
            await demo_fulfilment.setup_fulfilment(http, admin_base, settings, benefit_id,
                                                   sim_url, options.codes)  # fmt: skip
            stats = await _burst(http, base, settings, benefit_id, opens, options)
            checks = await _report(pool, redis, settings, benefit_id, stats, options)
            settle_s = await demo_fulfilment.wait_settled(pool, benefit_id)
            checks += await demo_fulfilment.fulfilment_report(
                pool, redis, http, sim_url, settings, benefit_id, settle_s
            )
        return _verdict(checks, logfile)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        await redis.aclose()
        await pool.close()


def _verdict(checks: list[tuple[str, bool]], logfile: Path) -> int:
    _say("== invariants ==")
    for name, ok in checks:
        _say(f"  [{'ok' if ok else 'FAIL'}] {name}")
    failed = [name for name, ok in checks if not ok]
    _say("all invariants hold" if not failed else f"{len(failed)} invariant(s) FAILED")
    _say(f"(server, writer, fulfilment and partner logs: {logfile})")
    return 0 if not failed else 1


async def _wait_ready(
    http: aiohttp.ClientSession, url: str, procs: list[subprocess.Popen[bytes]], logfile: Path
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            raise RuntimeError(f"a demo process exited early; see {logfile}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


def tier_of(member: int, seed: int) -> int:
    """Tiers V1..V16, with most members in the middle tiers as in a real book."""
    rng = random.Random(seed * 1_000_003 + member)
    return max(1, min(16, round(rng.gauss(6.5, 3.5))))


async def _setup(
    http: aiohttp.ClientSession,
    admin_base: str,
    settings: Settings,
    benefit_id: str,
    opens: datetime,
    options: DemoOptions,
) -> None:
    admin = {"Authorization": f"Bearer {settings.admin_token}"}
    benefit = {
        "name": "Video membership, monthly card",
        "min_tier": 4,
        "quota": [{"min_tier": 4, "per_period": 1}, {"min_tier": 8, "per_period": 2}],
        "stock_per_period": options.stock,
        "release": {"type": "once", "opens_at": opens.isoformat()},
        "options": [
            {
                "option_id": "iqiyi",
                "name": "iQiyi VIP",
                "kind": "direct_charge",
                "partner": demo_fulfilment.PARTNER_ID,
                "sku": "IQY-MONTH",
            },
            {
                "option_id": "tencent",
                "name": "Tencent Video VIP",
                "kind": "direct_charge",
                "partner": demo_fulfilment.PARTNER_ID,
                "sku": "TX-MONTH",
            },
            {"option_id": "youku", "name": "Youku VIP", "kind": "card_key"},
        ],
    }
    async with http.put(
        f"{admin_base}/admin/v1/benefits/{benefit_id}", json=benefit, headers=admin
    ) as resp:
        resp.raise_for_status()
    period = periods.current_period(settings.tz)
    tiers: list[dict[str, Any]] = [
        {"user_id": f"m{i:06d}", "tier": tier_of(i, options.seed)} for i in range(options.members)
    ]
    for start in range(0, len(tiers), 5000):
        async with http.put(
            f"{admin_base}/admin/v1/tiers/{period}",
            json=tiers[start : start + 5000],
            headers=admin,
        ) as resp:
            resp.raise_for_status()
    levels = [int(t["tier"]) for t in tiers]
    eligible = sum(1 for t in levels if t >= 4)
    demand = sum(2 if t >= 8 else 1 for t in levels if t >= 4)
    _say(
        f"benefit {benefit_id}: {options.stock:,} units, 3 options, opens at "
        f"{opens:%H:%M:%S %Z}; {options.members:,} members loaded, {eligible:,} of them V4+ "
        f"wanting {demand:,} units"
    )


async def _burst(
    http: aiohttp.ClientSession,
    base: str,
    settings: Settings,
    benefit_id: str,
    opens: datetime,
    options: DemoOptions,
) -> BurstStats:
    stats = BurstStats()
    rng = random.Random(options.seed)
    url = f"{base}/v1/benefits/{benefit_id}/claims"
    queue: asyncio.Queue[int] = asyncio.Queue()
    order = list(range(options.members))
    rng.shuffle(order)
    for member in order:
        queue.put_nowait(member)
    option_ids = ("iqiyi", "tencent", "youku")
    done = asyncio.Event()

    async def post(headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        stats.sent += 1
        async with http.post(url, json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    async def member_session(member: int) -> None:
        user = f"m{member:06d}"
        headers = {"Authorization": "Bearer " + mint_token(settings, user, 600)}
        attempt = 0
        while True:
            attempt += 1
            body = {"request_id": f"{user}-{attempt}", "option_id": rng.choice(option_ids)}
            status, reply = await post(headers, body)
            code = reply.get("error", "accepted")
            if status == 425:  # early: wait for the opening like a real app would
                stats.outcomes["not_open"] += 1
                await asyncio.sleep(max(opens.timestamp() - time.time(), 0) + rng.random() * 0.2)
                attempt -= 1
                continue
            stats.outcomes[code] += 1
            if code == "sold_out" and stats.sold_out_at is None:
                stats.sold_out_at = time.monotonic()
            if "stock_left" in reply:
                left = int(reply["stock_left"])
                stats.stock_left = left if stats.stock_left is None else min(stats.stock_left, left)
            if status != 202:
                return
            stats.accepted += 1
            stats.claims_by_member[user] += 1
            if rng.random() < options.retries:  # the app timed out and resends the same request
                status, again = await post(headers, body)
                stats.replayed += 1
                if status not in (200, 202) or again.get("claim_id") != reply["claim_id"]:
                    stats.replay_mismatch += 1

    async def worker() -> None:
        while not queue.empty():
            member = queue.get_nowait()
            try:
                await member_session(member)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                stats.outcomes["client_error"] += 1

    async def progress() -> None:
        width = 30
        tty = sys.stderr.isatty()
        while not done.is_set():
            remaining = queue.qsize()
            frac = 1 - remaining / max(options.members, 1)
            bar = "#" * int(frac * width)
            left = "?" if stats.stock_left is None else f"{stats.stock_left:,}"
            print(
                f"\r  [{bar:<{width}}] {options.members - remaining:>6,}/{options.members:,} "
                f"members  requests {stats.sent:>7,}  accepted {stats.accepted:>6,}  "
                f"stock left {left:>6}",
                end="" if tty else "\n",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(0.2 if tty else 2.0)

    ticker = asyncio.create_task(progress())
    # Clients start hammering a second before the opening, as they do in real life.
    await asyncio.sleep(max(opens.timestamp() - time.time() - 1.0, 0))
    stats.opened_at = time.monotonic() + max(opens.timestamp() - time.time(), 0)
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(options.concurrency)))
    stats.finished_at = time.monotonic()
    done.set()
    await ticker
    print(file=sys.stderr)
    _say(f"burst finished in {stats.finished_at - started:.1f}s")
    return stats


async def _report(
    pool: asyncpg.Pool,
    redis: Redis,
    settings: Settings,
    benefit_id: str,
    stats: BurstStats,
    options: DemoOptions,
) -> list[tuple[str, bool]]:
    period = periods.current_period(settings.tz)
    # Units held right now: what Redis counts as taken (refunds give units back).
    taken = int(await redis.hget(BenefitKeys(benefit_id).stock(period), "taken") or 0)
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

    _say("")
    _say(f"== release summary ({period}, benefit {benefit_id}) ==")
    _say(f"  members                 {options.members:>10,}")
    _say(f"  requests sent           {stats.sent:>10,}   ({stats.sent / elapsed:,.0f}/s)")
    _say(
        f"  accepted                {stats.accepted:>10,}   "
        f"({stats.accepted / elapsed:,.0f} claims/s)"
    )
    _say(f"  retries replayed        {stats.replayed:>10,}   (same claim returned, no unit taken)")
    for code, n in sorted(stats.outcomes.items(), key=lambda kv: -kv[1]):
        if code == "not_open":
            _say(f"  early, told not_open    {n:>10,}   (retried at the opening)")
        elif code != "accepted":
            _say(f"  rejected {code:<15} {n:>10,}")
    _say("  time to sell out        " + (f"{sell_out:>9.2f}s" if sell_out else "   not sold out"))
    _say(
        f"  rows in PostgreSQL      {rows:>10,}   (all persisted {persisted_in:.1f}s after the "
        "burst)"
    )
    _say(
        "  by option               " + ", ".join(f"{r['option_id']} {r['n']:,}" for r in by_option)
    )

    refunded = int(
        await pool.fetchval(
            "SELECT count(*) FROM claims WHERE benefit_id = $1 AND status = 'refunded'", benefit_id
        )
    )
    if refunded:
        _say(
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
