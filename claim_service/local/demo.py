"""``claim-service demo``: a scaled-down release-time burst, end to end, with a summary.

Starts the embedded Valkey and PostgreSQL (unless ``CLAIM_REDIS_URL``/``CLAIM_DATABASE_URL``
are set), runs ``serve`` and ``writer`` as separate processes, creates a benefit through the
admin API, loads a tier snapshot, then lets members race for the stock over HTTP from the
moment it opens, through the benefit's waiting room (``demo_room``): tickets before the
opening, admission at the room's rate, claims with the admission token. Zones and a lounge
pass priced in points (``demo_points``) ride along: V12+ members are credited, then spend
their points during the same burst. The ops dashboard's address is printed at the start.
``--cluster`` runs it on a local Valkey Cluster with the video benefit sharded
(``demo_cluster``). Exits non-zero if any invariant fails.
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
from claim_service.local import demo_cluster, demo_fulfilment, demo_points
from claim_service.local.demo_burst import burst
from claim_service.local.demo_report import DemoOptions, report, say, verdict
from claim_service.local.demo_room import Room, room_config
from claim_service.local.embedded import EmbeddedServers, free_port
from claim_service.store.connections import close_redis, create_pg_pool, create_redis
from claim_service.store.migrations import migrate

OPENS_IN_S = 8.0  # members take their tickets in the pre-queue meanwhile


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
    servers = demo_cluster.cluster_servers if options.cluster else _servers
    with servers(settings) as live:
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
    fulfil = ["fulfil", "--insecure-dev"]
    procs = [
        _spawn(["serve", "--insecure-dev"], settings, logfile),
        _spawn(["writer"], settings, logfile),
        # On a cluster, fulfil starts once the burst is over (see demo_cluster).
        *([] if options.cluster else [_spawn(fulfil, settings, logfile)]),
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
            if options.cluster:  # an id whose buckets land on every primary
                benefit_id = demo_cluster.spread_id(redis, benefit_id)
            await demo_points.create_zones(http, admin_base, settings)
            opens = datetime.now(settings.tz) + timedelta(seconds=OPENS_IN_S)
            tiers = await _setup(http, admin_base, settings, benefit_id, opens, options)
            if options.cluster:  # no waiting room, no points; fulfil once the burst is over
                checks = await demo_cluster.release(
                    demo_cluster.Stack(http, base, admin_base, sim_url, settings, pool, redis),
                    benefit_id, opens, options,
                    lambda: procs.append(_spawn(fulfil, settings, logfile)),
                )  # fmt: skip
                return verdict(checks, logfile)
            await demo_fulfilment.setup_fulfilment(http, admin_base, settings, benefit_id,
                                                   sim_url, options.codes)  # fmt: skip
            plan = await demo_points.setup_points(http, admin_base, redis, settings, lounge_id,
                                                  opens, tiers, options.seed)  # fmt: skip
            room = Room(http, base, benefit_id, opens)
            stats, lounge = await asyncio.gather(
                burst(http, base, settings, benefit_id, opens, options, room),
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
        await close_redis(redis)
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
    benefit: dict[str, Any] = {
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
    spread = ""
    if options.cluster:
        benefit = demo_cluster.sharded(benefit)
        spread = f" in {demo_cluster.SHARDS} buckets"
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
        f"benefit {benefit_id}: {options.stock:,} units{spread}, {len(benefit['options'])} "
        f"options, opens at {opens:%H:%M:%S %Z}; {options.members:,} members loaded, "
        f"{eligible:,} of them V4+ wanting {demand:,} units"
    )
    return {str(t["user_id"]): int(t["tier"]) for t in tiers}
