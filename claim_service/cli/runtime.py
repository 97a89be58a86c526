"""What every command shares: logging, the event loop, signals, pools, start-up checks."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
import uvloop

from claim_service.claims.durability import check_server
from claim_service.config import Settings
from claim_service.errors import ConfigError
from claim_service.store.connections import close_redis, create_pg_pool, create_redis

log = logging.getLogger(__name__)


METRICS_HOST = "127.0.0.1"  # fulfil --metrics-port listens on loopback only


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
    redis_url, database_url = settings.require_urls()
    # The writer's reads block for up to CLAIM_WRITER_BLOCK_MS on top of the reply time.
    timeout_ms = settings.redis_timeout_ms + settings.writer_block_ms
    redis = await create_redis(redis_url, timeout_s=timeout_ms / 1000)
    try:
        pool = await create_pg_pool(database_url, max_size=pg_size)
        try:
            return await body(redis, pool)
        finally:
            await pool.close()
    finally:
        await redis.aclose()


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


def refuse_undurable(settings: Settings) -> None:
    """Refuse (``ConfigError``) a ``CLAIM_DURABILITY`` the Redis server cannot honour; log
    what could not be verified."""
    if settings.durability == "none":
        return
    redis_url, _ = settings.require_urls()

    async def check() -> int:
        redis = await create_redis(redis_url, timeout_s=settings.redis_timeout_ms / 1000)
        try:
            for warning in await check_server(redis, settings):
                log.warning("CLAIM_DURABILITY=%s: %s", settings.durability, warning)
        finally:
            await close_redis(redis)
        return 0

    run_async(check())
