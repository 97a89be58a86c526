"""``claim-service``: the one module that wires everything together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import uvloop

from claim_service import __version__, periods
from claim_service.config import Settings
from claim_service.errors import ClaimServiceError

log = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def run_async(main: Coroutine[Any, Any, int]) -> int:
    return uvloop.run(main)


def stop_event() -> asyncio.Event:
    """An event set by SIGINT/SIGTERM (first signal: graceful; second: immediate exit)."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if event.is_set():
            raise SystemExit(130)
        log.info("stopping (signal received); send again to exit at once")
        event.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    return event


async def with_pools(
    settings: Settings, body: Callable[[Any, Any], Awaitable[int]], *, pg_size: int = 5
) -> int:
    from claim_service.connections import create_pg_pool, create_redis

    redis_url, database_url = settings.require_urls()
    redis = await create_redis(redis_url)
    try:
        pool = await create_pg_pool(database_url, max_size=pg_size)
        try:
            return await body(redis, pool)
        finally:
            await pool.close()
    finally:
        await redis.aclose()


# -- commands ----------------------------------------------------------------------------


def cmd_migrate(settings: Settings, args: argparse.Namespace, *, out: Any = None) -> int:
    async def main() -> int:
        from claim_service.connections import create_pg_pool, migrate

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
        from claim_service.catalogue_store import warm

        wanted = args.period or [periods.current_period(settings.tz)]
        for period in wanted:
            periods.parse_period(period)
        started = time.monotonic()
        report = await warm(pool, redis, settings.tz, wanted)
        print(
            f"warmed Redis from PostgreSQL in {time.monotonic() - started:.1f}s: "
            f"{report.benefits_pushed} benefit(s), {report.tiers_loaded} tier row(s), "
            f"{report.counters_restored} counter(s) restored for {', '.join(report.periods)}"
        )
        return 0

    return run_async(with_pools(settings, body))


def cmd_load_tiers(settings: Settings, args: argparse.Namespace) -> int:
    periods.parse_period(args.period)

    async def body(redis: Any, pool: Any) -> int:
        from claim_service.tiers import load_tier_csv

        started = time.monotonic()

        def progress(n: int) -> None:
            rate = n / max(time.monotonic() - started, 1e-6)
            print(f"\r  loaded {n:,} rows ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)

        total = await load_tier_csv(pool, redis, Path(args.file), args.period, progress)
        print(file=sys.stderr)
        print(f"loaded {total:,} tier rows for {args.period} in {time.monotonic() - started:.1f}s")
        return 0

    return run_async(with_pools(settings, body))


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from claim_service.auth import mint_token
    from claim_service.tiers import check_user_id

    print(mint_token(settings, check_user_id(args.user_id), args.ttl))
    return 0


def cmd_writer(settings: Settings, args: argparse.Namespace) -> int:
    async def body(redis: Any, pool: Any) -> int:
        from claim_service.writer import ClaimWriter

        writer = ClaimWriter(redis, pool, settings, consumer=args.name)
        await writer.run(stop_event())
        return 0

    return run_async(with_pools(settings, body))


def cmd_fulfil(settings: Settings, args: argparse.Namespace) -> int:
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr="127.0.0.1")

    warn_dev_defaults(settings)

    async def body(redis: Any, pool: Any) -> int:
        from claim_service.fulfilment import FulfilmentWorker

        await FulfilmentWorker(pool, redis, settings, name=args.name).run(stop_event())
        return 0

    return run_async(with_pools(settings, body, pg_size=10))


def cmd_load_codes(settings: Settings, args: argparse.Namespace) -> int:
    async def body(redis: Any, pool: Any) -> int:
        from claim_service.vault import Vault
        from claim_service.vouchers import load_codes, pool_levels, read_code_csv

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


def _serve_one(settings: Settings, with_writer: bool, reuse_port: bool) -> None:
    from aiohttp import web

    from claim_service.web import create_app

    configure_logging(settings)
    app = create_app(settings)
    if with_writer:
        from claim_service.web import PG, REDIS
        from claim_service.writer import ClaimWriter

        async def writer_task(app: web.Application) -> Any:
            stop = asyncio.Event()
            writer = ClaimWriter(app[REDIS], app[PG], settings)
            task = asyncio.create_task(writer.run(stop), name="claim-writer")
            yield
            stop.set()
            await task

        app.cleanup_ctx.append(writer_task)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        reuse_port=reuse_port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
        shutdown_timeout=10,
    )


def warn_dev_defaults(settings: Settings) -> None:
    for name in settings.dev_defaults():
        log.warning("%s is the public development default; set it before going live", name)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    settings.require_urls()
    warn_dev_defaults(settings)
    print(
        f"claim-service {__version__} listening on http://{settings.host}:{settings.port} "
        f"with {settings.workers} worker(s)",
        flush=True,
    )
    if settings.workers == 1:
        _serve_one(settings, args.writer, reuse_port=False)
        return 0
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_serve_one, args=(settings, args.writer, True), name=f"worker-{i}")
        for i in range(settings.workers)
    ]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    import os

                    os.kill(proc.pid, signal.SIGINT)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for proc in procs:
        proc.join()
    return max((p.exitcode or 0) for p in procs)


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from claim_service.embedded import EmbeddedServers

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
    from claim_service.demo import DemoOptions, run_demo

    options = DemoOptions(
        stock=args.stock,
        members=args.members,
        concurrency=args.concurrency,
        retries=args.retries,
        codes=args.codes,
    )
    return run_demo(settings, options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="claim-service",
        description="Flash benefit claims: atomic Redis decisions, durable PostgreSQL records.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run a release-time burst end to end on local servers")
    p.add_argument("--stock", type=int, default=8000)
    p.add_argument("--members", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--codes", type=int, default=2500, help="Youku codes loaded (card-key)")
    p.add_argument(
        "--retries",
        type=float,
        default=0.1,
        help="share of requests retried with the same request_id",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("dev", help="start local Valkey and PostgreSQL and print their URLs")
    p.add_argument("--data-dir", help="where the servers keep data (default CLAIM_DATA_DIR)")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("serve", help="serve the HTTP API")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="worker processes sharing the port")
    p.add_argument("--writer", action="store_true", help="also run a writer in each worker")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("writer", help="persist accepted claims from Redis to PostgreSQL")
    p.add_argument(
        "--name",
        help="a stable name per instance: restarted under the same name, it resumes its own "
        "unfinished work at once instead of waiting for it to time out",
    )
    p.set_defaults(func=cmd_writer)

    p = sub.add_parser("fulfil", help="deliver persisted claims (card-key and direct charge)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument(
        "--name",
        help="a stable name per instance: restarted under the same name, it resumes its own "
        "unfinished work at once instead of waiting for it to time out",
    )
    p.set_defaults(func=cmd_fulfil)

    p = sub.add_parser("load-codes", help="load redemption codes (CSV: code[,secret[,expires_at]])")
    p.add_argument("benefit")
    p.add_argument("option")
    p.add_argument("file")
    p.set_defaults(func=cmd_load_codes)

    from claim_service import partner_sim

    p = sub.add_parser("partner-sim", help="run the fulfilment partner simulator")
    partner_sim.add_arguments(p)
    p.set_defaults(func=lambda _settings, args: partner_sim.run(args))

    p = sub.add_parser("migrate", help="apply pending database migrations")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("warm", help="rebuild Redis from PostgreSQL (after a Redis data loss)")
    p.add_argument("--period", action="append", help="YYYY-MM (repeatable; default: current)")
    p.set_defaults(func=cmd_warm)

    p = sub.add_parser("load-tiers", help="load a CSV of user_id,tier for a period")
    p.add_argument("file")
    p.add_argument("--period", required=True, help="YYYY-MM")
    p.set_defaults(func=cmd_load_tiers)

    p = sub.add_parser("token", help="mint a dev member token (HS256, CLAIM_JWT_SECRET)")
    p.add_argument("user_id")
    p.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    p.set_defaults(func=cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = {k: getattr(args, k, None) for k in ("host", "port", "workers")}
        settings = Settings.from_env(**overrides)
        configure_logging(settings)
        func: Callable[[Settings, argparse.Namespace], int] = args.func
        return func(settings, args)
    except ClaimServiceError as exc:
        print(f"claim-service: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
