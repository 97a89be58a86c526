"""``claim-service demo``: a scaled-down release-time burst, end to end, with a summary.

Starts the embedded Valkey and PostgreSQL (unless ``CLAIM_REDIS_URL``/``CLAIM_DATABASE_URL``
are set), runs ``serve`` and ``writer`` as separate processes, creates a benefit through the
admin API, loads a tier snapshot, then lets members race for the stock over HTTP from the
moment it opens, through the benefit's waiting room (``demo_room``): tickets before the
opening, admission at the room's rate, claims with the admission token. Zones and a lounge
pass priced in points (``demo_points``) ride along: V12+ members are credited, then spend
their points during the same burst. The ops dashboard's address is printed at the start.
Exits non-zero if any invariant fails.
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
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.http.auth import mint_token
from claim_service.local import demo_fulfilment, demo_points
from claim_service.local.demo_report import BurstStats, DemoOptions, report, say, verdict
from claim_service.local.demo_room import Room, room_config
from claim_service.local.embedded import EmbeddedServers, free_port
from claim_service.store.connections import create_pg_pool, create_redis
from claim_service.store.migrations import migrate

OPENS_IN_S = 8.0  # members take their tickets in the pre-queue meanwhile
LATE_ARRIVALS = 0.2  # of the members, arriving in the seconds after the opening


@contextlib.contextmanager
def _servers(settings: Settings) -> Iterator[Settings]:
    if settings.redis_url and settings.database_url:
        say(
            f"using configured servers: {settings.redis_url} and PostgreSQL from CLAIM_DATABASE_URL"
        )
        yield settings
        return
    say("starting embedded Valkey and PostgreSQL ...")
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
    settings = replace(settings, port=free_port(), admin_port=free_port())
    with _servers(settings) as live:
        return uvloop.run(_demo(live, options))


async def _demo(settings: Settings, options: DemoOptions) -> int:
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
            say(
                f"ops dashboard (live while the demo runs): {admin_base}/admin/dashboard"
                f"?token={settings.admin_token}"
            )
            stamp = f"{datetime.now():%H%M%S}"
            benefit_id, lounge_id = f"video-{stamp}", f"lounge-{stamp}"
            await demo_points.create_zones(http, admin_base, settings)
            opens = datetime.now(settings.tz) + timedelta(seconds=OPENS_IN_S)
            tiers = await _setup(http, admin_base, settings, benefit_id, opens, options)
            await demo_fulfilment.setup_fulfilment(http, admin_base, settings, benefit_id,
                                                   sim_url, options.codes)  # fmt: skip
            plan = await demo_points.setup_points(http, admin_base, redis, settings, lounge_id,
                                                  opens, tiers, options.seed)  # fmt: skip
            room = Room(http, base, benefit_id, opens)
            stats, lounge = await asyncio.gather(
                _burst(http, base, settings, benefit_id, opens, options, room),
                demo_points.lounge_rush(base, settings, plan, opens, options.seed),
            )
            checks = await report(pool, redis, settings, benefit_id, stats, options)
            checks += await room.report(settings, benefit_id)
            settle_s = await demo_fulfilment.wait_settled(pool, benefit_id)
            checks += await demo_fulfilment.fulfilment_report(
                pool, redis, http, sim_url, settings, benefit_id, settle_s
            )
            checks += await demo_points.points_report(
                pool, redis, http, base, settings, plan, lounge, tiers
            )
        return verdict(checks, logfile)
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
) -> dict[str, int]:
    """Create the video benefit (in 惠生活) and load the period's tiers; returns them."""
    admin = {"Authorization": f"Bearer {settings.admin_token}"}
    benefit = {
        "name": "Video membership, monthly card",
        "zone": demo_points.VIDEO_ZONE,
        "min_tier": 4,
        "quota": [{"min_tier": 4, "per_period": 1}, {"min_tier": 8, "per_period": 2}],
        "stock_per_period": options.stock,
        "release": {"type": "once", "opens_at": opens.isoformat()},
        "waiting_room": room_config(options.stock),
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
    say(
        f"benefit {benefit_id}: {options.stock:,} units, 3 options, opens at "
        f"{opens:%H:%M:%S %Z}; {options.members:,} members loaded, {eligible:,} of them V4+ "
        f"wanting {demand:,} units"
    )
    return {str(t["user_id"]): int(t["tier"]) for t in tiers}


async def _burst(
    http: aiohttp.ClientSession,
    base: str,
    settings: Settings,
    benefit_id: str,
    opens: datetime,
    options: DemoOptions,
    room: Room,
) -> BurstStats:
    stats = BurstStats()
    rng = random.Random(options.seed)
    url = f"{base}/v1/benefits/{benefit_id}/claims"
    order = list(range(options.members))
    rng.shuffle(order)
    option_ids = ("iqiyi", "tencent", "youku")
    done = asyncio.Event()

    async def post(headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        stats.sent += 1
        async with http.post(url, json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    finished = 0

    async def member_session(member: int) -> None:
        user = f"m{member:06d}"
        headers = {"Authorization": "Bearer " + mint_token(settings, user, 600)}
        token = await room.admission(user, headers, rng)
        if token is None:
            return
        attempt = 0
        while True:
            attempt += 1
            body = {
                "request_id": f"{user}-{attempt}",
                "option_id": rng.choice(option_ids),
                "admission_token": token,
            }
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
            left = "?" if stats.stock_left is None else f"{stats.stock_left:,}"
            print(
                f"\r  [{bar:<{width}}] {finished:>6,}/{options.members:,} members  "
                f"tickets {len(room.stats.tickets):>6,}  admitted {room.stats.admitted:>6,}  "
                f"claims {stats.sent:>7,}  accepted {stats.accepted:>6,}  stock left {left:>6}",
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
