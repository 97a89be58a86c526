"""``serve``: the member and admin listeners in one process, or N worker processes sharing
both ports (``SO_REUSEPORT``) under a supervisor that restarts a dead one."""

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
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import multiprocess
from redis.asyncio import Redis

from claim_service import __version__
from claim_service.claims.writer import ClaimWriter
from claim_service.cli.runtime import (
    configure_logging,
    refuse_dev_secrets,
    refuse_undurable,
    run_async,
    stop_event,
    warn_dev_defaults,
)
from claim_service.config import Settings
from claim_service.http.app import PG
from claim_service.http.server import Guard, ServiceRunner, file_limit
from claim_service.http.service import create_admin_app, create_app
from claim_service.store.connections import close_redis, create_pg_pool, create_redis

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
REDIS_POOL_SIZE = 256
PG_POOL_SIZE = 10
SHUTDOWN_TIMEOUT_S = 10.0
# A worker that dies sooner than this after starting crashed "at once" (a bad setting, a
# port taken): restarted with a growing delay, and given up on after this many in a row.
WORKER_QUICK_CRASH_S = 10.0
WORKER_MAX_QUICK_CRASHES = 4
WORKER_RESTART_DELAY_S = (0.5, 30.0)
METRICS_DIR_PREFIX = "claim-service-metrics-"


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    settings.require_urls()
    exposure = settings.exposure([settings.host, settings.admin_host])
    refuse_dev_secrets(settings.dev_defaults(), exposure, args.insecure_dev)
    refuse_undurable(settings)
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
    redis_url, database_url = settings.require_urls()
    # Every Redis call of the API is bounded by CLAIM_REDIS_TIMEOUT_MS: with Redis gone (or
    # no master elected yet) a claim is a 503 within it, never a hang.
    redis = await create_redis(
        redis_url, max_connections=REDIS_POOL_SIZE, timeout_s=settings.redis_timeout_ms / 1000
    )
    try:
        # A hung PostgreSQL makes a read a 503 within CLAIM_PG_TIMEOUT_MS, not a hang.
        pg = await create_pg_pool(
            database_url, max_size=PG_POOL_SIZE, command_timeout_s=settings.pg_timeout_ms / 1000
        )
        try:
            return await _listen(settings, (redis, pg), with_writer, reuse_port)
        finally:
            await pg.close()
    finally:
        await close_redis(redis)


async def _listen(
    settings: Settings, pools: tuple[Redis, asyncpg.Pool], with_writer: bool, reuse_port: bool
) -> int:
    """Both listeners over ``pools`` (and a writer if asked), until SIGINT/SIGTERM."""
    member = create_app(settings, pools=pools)
    if with_writer:

        async def writer_task(app: web.Application) -> Any:
            # Its own client: its reads block for up to CLAIM_WRITER_BLOCK_MS on top.
            timeout_ms = settings.redis_timeout_ms + settings.writer_block_ms
            redis = await create_redis(settings.redis_url or "", timeout_s=timeout_ms / 1000)
            stop = asyncio.Event()
            writer = ClaimWriter(redis, app[PG], settings)
            task = asyncio.create_task(writer.run(stop), name="claim-writer")
            yield
            stop.set()
            await task
            await close_redis(redis)

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
