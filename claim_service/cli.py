"""``claim-service``: the one module that wires everything together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import web

from claim_service import __version__, periods
from claim_service.config import Settings
from claim_service.errors import ClaimServiceError, ConfigError
from claim_service.http_server import Guard, ServiceRunner, file_limit
from claim_service.web import PG, REDIS, create_admin_app, create_app

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
SHUTDOWN_TIMEOUT_S = 10.0
# A worker that dies sooner than this after starting crashed "at once" (a bad setting, a
# port taken): restarted with a growing delay, and given up on after this many in a row.
WORKER_QUICK_CRASH_S = 10.0
WORKER_MAX_QUICK_CRASHES = 4
WORKER_RESTART_DELAY_S = (0.5, 30.0)
METRICS_DIR_PREFIX = "claim-service-metrics-"


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
        from claim_service.recovery import Recovery

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
    settings.require_urls()
    # fulfil decrypts codes and partner secrets: only the codes key matters to it.
    dev_secrets = [name for name in settings.dev_defaults() if name == "CLAIM_CODES_KEY"]
    refuse_dev_secrets(dev_secrets, settings.exposure([METRICS_HOST]), args.insecure_dev)
    warn_dev_defaults(settings)
    file_limit()
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=METRICS_HOST)

    async def body(redis: Any, pool: Any) -> int:
        from claim_service.fulfilment import FulfilmentWorker
        from claim_service.recovery import Recovery

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


METRICS_HOST = "127.0.0.1"  # fulfil --metrics-port listens on loopback only


def warn_dev_defaults(settings: Settings) -> None:
    for name in settings.dev_defaults():
        log.warning("%s is the public development default; set it before going live", name)


def refuse_dev_secrets(dev_secrets: list[str], exposure: list[str], insecure_dev: bool) -> None:
    """Closed by default: public development secrets only on a machine of one's own."""
    if dev_secrets and exposure and not insecure_dev:
        raise ConfigError(
            f"refusing to start with the public development value of {', '.join(dev_secrets)} "
            f"while {'; '.join(exposure)}: set {'them' if len(dev_secrets) > 1 else 'it'}, "
            "or pass --insecure-dev for a throw-away setup"
        )


def _die_with_parent(parent_pid: int) -> None:
    """A worker never outlives the `serve` process supervising it (even one killed -9)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the line above took effect
        raise SystemExit(1)
    # A terminal's Ctrl-C reaches the supervisor alone, which stops each worker once.
    os.setpgid(0, 0)


def _serve_one(
    settings: Settings, with_writer: bool, reuse_port: bool, parent_pid: int | None = None
) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    configure_logging(settings)
    run_async(_serve(settings, with_writer, reuse_port))


async def _serve(settings: Settings, with_writer: bool, reuse_port: bool) -> int:
    """The member and admin listeners of one process, until SIGINT/SIGTERM."""
    member = create_app(settings)
    if with_writer:
        from claim_service.writer import ClaimWriter

        async def writer_task(app: web.Application) -> Any:
            stop = asyncio.Event()
            writer = ClaimWriter(app[REDIS], app[PG], settings)
            task = asyncio.create_task(writer.run(stop), name="claim-writer")
            yield
            stop.set()
            await task

        member.cleanup_ctx.append(writer_task)
    guard = Guard.for_process(settings)
    # The admin application serves from the member one's pools: it starts after it and
    # stops before it.
    runners = [
        ServiceRunner(app, guard, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        for app in (member, create_admin_app(settings, member))
    ]
    stop = stop_event()
    try:
        for runner in runners:
            await runner.setup()
        listeners = ((settings.host, settings.port), (settings.admin_host, settings.admin_port))
        for runner, (host, port) in zip(runners, listeners, strict=True):
            await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    settings.require_urls()
    exposure = settings.exposure([settings.host, settings.admin_host])
    refuse_dev_secrets(settings.dev_defaults(), exposure, args.insecure_dev)
    warn_dev_defaults(settings)
    file_limit()  # workers inherit it
    print(
        f"claim-service {__version__} listening on http://{settings.host}:{settings.port} "
        f"(admin and metrics on http://{settings.admin_host}:{settings.admin_port}) "
        f"with {settings.workers} worker(s)",
        flush=True,
    )
    if settings.workers == 1:
        _serve_one(settings, args.writer, reuse_port=False)
        return 0
    return _supervise(settings, args.writer)


@dataclass
class _Worker:
    slot: int
    proc: BaseProcess | None = None
    started: float = 0.0
    quick_crashes: int = 0
    restart_at: float | None = None


def _supervise(settings: Settings, with_writer: bool) -> int:
    """Run ``settings.workers`` processes sharing both ports (``SO_REUSEPORT``); restart one
    that dies, with a growing delay, and give up only when one keeps dying at start-up."""
    ctx = multiprocessing.get_context("spawn")
    metrics_dir, own_metrics_dir = _metrics_dir()
    parent = os.getpid()
    workers = [_Worker(slot) for slot in range(settings.workers)]
    state = {"stopping": False, "killing": False}

    def on_signal(signum: int, _frame: Any) -> None:
        if state["stopping"]:
            state["killing"] = True
            _signal_workers(workers, signal.SIGKILL)
        state["stopping"] = True

    def start(worker: _Worker) -> None:
        worker.proc = ctx.Process(
            target=_serve_one,
            args=(settings, with_writer, True, parent),
            name=f"claim-service-worker-{worker.slot}",
        )
        worker.proc.start()
        worker.started = time.monotonic()
        worker.restart_at = None

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    exit_code = 0
    try:
        for worker in workers:
            start(worker)
        while not state["stopping"]:
            alive = [w.proc.sentinel for w in workers if w.proc is not None]
            multiprocessing.connection.wait(alive, timeout=0.2)
            now = time.monotonic()
            for worker in workers:
                if worker.proc is not None and not worker.proc.is_alive():
                    if not _restart_later(worker, now, metrics_dir):
                        exit_code = 1
                        state["stopping"] = True
                if worker.restart_at is not None and worker.restart_at <= now:
                    if not state["stopping"]:
                        start(worker)
    finally:
        _stop_workers(workers, state)
        if own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return exit_code


def _restart_later(worker: _Worker, now: float, metrics_dir: str) -> bool:
    """Reap a dead worker and schedule its restart; ``False`` to give up."""
    from prometheus_client import multiprocess

    proc = worker.proc
    assert proc is not None
    proc.join()
    uptime = now - worker.started
    worker.proc = None
    if proc.pid is not None:
        multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
    worker.quick_crashes = worker.quick_crashes + 1 if uptime < WORKER_QUICK_CRASH_S else 0
    if worker.quick_crashes >= WORKER_MAX_QUICK_CRASHES:
        log.error(
            "worker %d keeps exiting right after it starts (exit code %s, %d times in a row); "
            "giving up (see its errors above)",
            worker.slot,
            proc.exitcode,
            worker.quick_crashes,
        )
        return False
    first, most = WORKER_RESTART_DELAY_S
    delay = min(first * 2**worker.quick_crashes, most)
    log.warning(
        "worker %d (pid %s) exited with code %s after %.1fs; restarting it in %.1fs",
        worker.slot,
        proc.pid,
        proc.exitcode,
        uptime,
        delay,
    )
    worker.restart_at = now + delay
    return True


def _signal_workers(workers: list[_Worker], signum: int) -> None:
    for worker in workers:
        if worker.proc is not None and worker.proc.pid and worker.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.proc.pid, signum)


def _stop_workers(workers: list[_Worker], state: dict[str, bool]) -> None:
    """SIGTERM each worker (a graceful stop), then SIGKILL whatever outlives the grace."""
    _signal_workers(workers, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S + 5
    for worker in workers:
        if worker.proc is not None:
            worker.proc.join(max(deadline - time.monotonic(), 0))
    _signal_workers(workers, signal.SIGKILL)
    for worker in workers:
        if worker.proc is not None:
            worker.proc.join(5)


def _metrics_dir() -> tuple[str, bool]:
    """Where workers keep their metrics for a scrape to merge (prometheus-client's
    multiprocess mode): the operator's ``PROMETHEUS_MULTIPROC_DIR``, or a fresh directory
    removed at exit. Set before any worker starts (and imports prometheus_client)."""
    chosen = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if chosen:
        os.makedirs(chosen, exist_ok=True)
        return chosen, False
    # A `serve` killed -9 could not remove its directory: the next one does.
    for stale in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        owner = stale.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path, True


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

    insecure_help = (
        "start even with public development secrets on a listener or server that is not "
        "local (a throw-away setup only)"
    )
    p = sub.add_parser("serve", help="serve the HTTP API")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--admin-host", help="the admin and metrics listener (default 127.0.0.1)")
    p.add_argument("--admin-port", type=int)
    p.add_argument("--workers", type=int, help="worker processes sharing the ports")
    p.add_argument("--writer", action="store_true", help="also run a writer in each worker")
    p.add_argument("--insecure-dev", action="store_true", help=insecure_help)
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
    p.add_argument("--insecure-dev", action="store_true", help=insecure_help)
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
        overrides = {
            k: getattr(args, k, None)
            for k in ("host", "port", "admin_host", "admin_port", "workers")
        }
        settings = Settings.from_env(**overrides)
        configure_logging(settings)
        func: Callable[[Settings, argparse.Namespace], int] = args.func
        return func(settings, args)
    except ClaimServiceError as exc:
        print(f"claim-service: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
