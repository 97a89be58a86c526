"""The commands other than ``serve``: workers, migrations, recovery, loading, tooling."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from claim_service.claims.writer import ClaimWriter
from claim_service.cli.runtime import (
    METRICS_HOST,
    refuse_dev_secrets,
    run_async,
    stop_event,
    warn_dev_defaults,
    with_pools,
)
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.draws import audit
from claim_service.fulfilment.vouchers import load_codes, pool_levels, read_code_csv
from claim_service.fulfilment.worker import FulfilmentWorker
from claim_service.http.auth import mint_token
from claim_service.http.server import file_limit
from claim_service.local.demo import run_demo
from claim_service.local.demo_report import DemoOptions
from claim_service.local.embedded import EmbeddedServers
from claim_service.store.catalogue_store import load_benefit
from claim_service.store.connections import create_pg_pool
from claim_service.store.draw_records import period_draws
from claim_service.store.draw_seeds import DrawSeeds
from claim_service.store.migrations import migrate
from claim_service.store.points_credit import CreditReport, credit_period
from claim_service.store.points_ledger import expire_due
from claim_service.store.points_mirror import ensure_points, points_drift
from claim_service.store.reconcile import Reconciler
from claim_service.store.recovery import Recovery
from claim_service.store.tiers import check_user_id, load_tier_csv
from claim_service.store.vault import Vault


def cmd_migrate(settings: Settings, args: argparse.Namespace, *, out: Any = None) -> int:
    async def main() -> int:
        _, database_url = settings.require_urls()
        pool = await create_pg_pool(database_url, max_size=1)
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
        finally:
            await pool.close()
        summary = ", ".join(applied)
        print(
            f"applied {len(applied)} migration(s)" + (f": {summary}" if applied else ""),
            file=out or sys.stdout,
        )
        return 0

    return run_async(main())


def cmd_warm(settings: Settings, args: argparse.Namespace) -> int:
    async def body(redis: Any, pool: Any) -> int:
        wanted = args.period or [periods.current_period(settings.tz)]
        for period in wanted:
            periods.parse_period(period)
        started = time.monotonic()
        report = await Recovery(pool, redis, settings).ensure_all(force=True, tier_periods=wanted)
        print(
            f"warmed Redis from PostgreSQL in {time.monotonic() - started:.1f}s: "
            f"{report.benefits} benefit(s) rebuilt, {report.tiers} tier row(s) for "
            f"{', '.join(wanted)}"
        )
        return 0

    return run_async(with_pools(settings, body))


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """Print every drift between Redis and the truth; with ``--fix`` rebuild the benefits
    that drifted. Exit 1 while drift is left, else 0."""
    if args.period:
        periods.parse_period(args.period)

    async def body(redis: Any, pool: Any) -> int:
        reconciler = Reconciler(pool, redis, settings)
        benefits = await reconciler.benefits()
        found = left = drifted = skipped = 0
        for benefit in benefits:
            check = await reconciler.check(benefit, args.period)
            for drift in check.drift:
                print(drift.describe())
            found += len(check.drift)
            drifted += bool(check.drift)
            if args.fix and (check.drift or not check.live):
                check = await reconciler.fix(benefit, args.period)
                print(
                    f"{benefit.benefit_id}: rebuilt from PostgreSQL and the stream; "
                    f"{len(check.drift)} drift(s) left"
                )
                for drift in check.drift:
                    print(f"  still: {drift.describe()}")
            if not check.live:
                skipped += 1
                print(
                    f"{benefit.benefit_id}: not live on this Redis server, not compared "
                    "(rebuilt before it decides a claim; --fix rebuilds it now)"
                )
            left += len(check.drift)
        points = await points_drift(pool, redis)
        for point_drift in points:
            print(point_drift.describe())
        in_points = len(points)
        if points and args.fix:
            await ensure_points(pool, redis, force=True)
            points = await points_drift(pool, redis)
            print(f"points mirror: rebuilt from the ledger; {len(points)} drift(s) left")
        found += in_points
        left += len(points)
        summary = f"{len(benefits)} benefit(s) and the points mirror compared"
        summary += f", {skipped} not live" if skipped else ""
        if not found:
            summary += ": no drift"
        else:
            summary += f": {found - in_points} drift(s) in {drifted} benefit(s)"
            summary += f", {in_points} in the points mirror" if in_points else ""
            summary += f"; {left} left after --fix" if args.fix else "; --fix repairs them"
        print(summary)
        return 1 if left else 0

    return run_async(with_pools(settings, body))


def cmd_load_tiers(settings: Settings, args: argparse.Namespace) -> int:
    periods.parse_period(args.period)

    async def body(redis: Any, pool: Any) -> int:
        started = time.monotonic()

        def progress(n: int) -> None:
            rate = n / max(time.monotonic() - started, 1e-6)
            print(f"\r  loaded {n:,} rows ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)

        total = await load_tier_csv(pool, redis, Path(args.file), args.period, progress)
        print(file=sys.stderr)
        print(f"loaded {total:,} tier rows for {args.period} in {time.monotonic() - started:.1f}s")
        return 0

    return run_async(with_pools(settings, body))


def cmd_credit_points(settings: Settings, args: argparse.Namespace) -> int:
    """Credit every eligible member of the period's tier snapshot, once (a re-run credits
    nothing more); progress on stderr, a summary on stdout."""
    period = args.period or periods.current_period(settings.tz)
    periods.parse_period(period)

    async def body(redis: Any, pool: Any) -> int:
        started = time.monotonic()

        def progress(report: CreditReport) -> None:
            done = min(report.walked, report.members)
            share = f"{done / report.members:6.1%}" if report.members else ""
            bar = "#" * int(30 * done / max(report.members, 1))
            print(
                f"\r  [{bar:<30}] {share} {report.credited:,} credited, {report.already:,} already",
                end="",
                file=sys.stderr,
                flush=True,
            )

        report = await credit_period(pool, redis, period, settings.tz, progress)
        print(file=sys.stderr)
        print(
            f"credited {report.points:,} point(s) to {report.credited:,} member(s) for {period} "
            f"in {time.monotonic() - started:.1f}s; {report.already:,} credited before, "
            f"{report.members - report.eligible:,} of {report.members:,} in the tier snapshot "
            f"not eligible; {report.mirrored:,} lot(s) added to the Redis mirror"
        )
        return 0

    return run_async(with_pools(settings, body))


def cmd_expire_points(settings: Settings, args: argparse.Namespace) -> int:
    async def body(redis: Any, pool: Any) -> int:
        expired = await expire_due(pool, redis)
        print(f"expired {expired:,} point(s) left in lots past their expiry")
        return 0

    return run_async(with_pools(settings, body))


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    print(mint_token(settings, check_user_id(args.user_id), args.ttl))
    return 0


def cmd_writer(settings: Settings, args: argparse.Namespace) -> int:
    async def body(redis: Any, pool: Any) -> int:
        writer = ClaimWriter(redis, pool, settings, consumer=args.name)
        await writer.run(stop_event())
        return 0

    return run_async(with_pools(settings, body))


def cmd_fulfil(settings: Settings, args: argparse.Namespace) -> int:
    settings.require_urls()
    # fulfil decrypts codes and partner secrets: only the codes key matters to it.
    dev_secrets = [name for name in settings.dev_defaults() if name == "CLAIM_CODES_KEY"]
    refuse_dev_secrets(dev_secrets, settings.exposure([METRICS_HOST]), args.insecure_dev)
    warn_dev_defaults(settings)
    file_limit()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=METRICS_HOST)

    async def body(redis: Any, pool: Any) -> int:
        stop = stop_event()
        # Refunds wait while a benefit is being recovered: make sure something recovers it.
        watch = asyncio.create_task(Recovery(pool, redis, settings).watch(stop))
        try:
            await FulfilmentWorker(pool, redis, settings, name=args.name).run(stop)
        finally:
            stop.set()
            await watch
        return 0

    return run_async(with_pools(settings, body, pg_size=10))


def cmd_load_codes(settings: Settings, args: argparse.Namespace) -> int:
    async def body(redis: Any, pool: Any) -> int:
        report = await load_codes(
            pool,
            redis,
            Vault(settings.codes_key),
            args.benefit,
            args.option,
            read_code_csv(Path(args.file), settings.tz),
        )
        levels = [
            lv for lv in await pool_levels(pool, args.benefit) if lv["option_id"] == args.option
        ]
        free = levels[0]["free"] if levels else 0
        print(
            f"loaded {report.loaded:,} code(s) for {args.benefit}/{args.option} "
            f"({report.duplicates:,} duplicate(s) skipped, {report.expired:,} already "
            f"expired); {free:,} free in the pool"
        )
        return 0

    return run_async(with_pools(settings, body))


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    servers = EmbeddedServers(Path(args.data_dir) if args.data_dir else settings.data_dir)
    with servers:
        local = settings.with_urls(servers.redis_url, servers.database_url)
        # stdout carries only the export line, for people and scripts to copy.
        cmd_migrate(local, args, out=sys.stderr)
        print(
            f"export CLAIM_REDIS_URL={servers.redis_url} CLAIM_DATABASE_URL={servers.database_url}",
            flush=True,
        )
        print("servers are up; press Ctrl-C to stop them", file=sys.stderr, flush=True)
        stop = {"now": False}

        def on_signal(signum: int, _frame: Any) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["now"]:
            if servers.valkey.proc and servers.valkey.proc.poll() is not None:
                print("valkey-server exited", file=sys.stderr)
                return 1
            if servers.postgres.proc and servers.postgres.proc.poll() is not None:
                print("postgres exited", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print("stopping servers", file=sys.stderr)
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    options = DemoOptions(
        stock=args.stock,
        members=args.members,
        concurrency=args.concurrency,
        retries=args.retries,
        codes=args.codes,
        cluster=args.cluster,
    )
    return run_demo(settings, options)


def cmd_verify_draws(settings: Settings, args: argparse.Namespace) -> int:
    """Recompute every recorded draw of a period from its seed; exit 1 on any mismatch."""
    periods.parse_period(args.period)

    async def body(redis: Any, pool: Any) -> int:
        benefit = await load_benefit(pool, settings.tz, args.benefit_id)
        stored = await pool.fetchval(
            "SELECT commitment FROM draw_seeds WHERE benefit_id = $1 AND period = $2",
            benefit.benefit_id,
            args.period,
        )
        if stored is None:
            print(f"no seed was made for {benefit.benefit_id} in {args.period}: no draws")
            return 1
        if args.seed:
            try:
                seed = bytes.fromhex(args.seed)
            except ValueError:
                print("--seed must be hexadecimal", file=sys.stderr)
                return 2
        else:
            seed = await DrawSeeds(pool, settings.codes_key).seed(benefit.benefit_id, args.period)
        records = await period_draws(pool, benefit.benefit_id, args.period)
        found = audit(seed, stored, [r.audit_record() for r in records], benefit.draw)
        for mismatch in found:
            print(f"MISMATCH {mismatch.claim_id or '-'}: {mismatch.what}")
        wrong = len({m.claim_id for m in found if m.claim_id})
        print(
            f"verified {len(records):,} draw(s) of {benefit.benefit_id} in {args.period} "
            f"against commitment {stored}: {len(found)} mismatch(es) "
            f"in {wrong} record(s)"
        )
        return 1 if found else 0

    return run_async(with_pools(settings, body))
