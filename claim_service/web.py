"""The aiohttp application: state under typed keys, JSON errors, pools in ``cleanup_ctx``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.auth import AuthError, TokenVerifier
from claim_service.config import Settings
from claim_service.connections import create_pg_pool, create_redis
from claim_service.engine import ClaimEngine
from claim_service.errors import (
    BackendUnavailable,
    ConflictError,
    NotFoundError,
    ValidationError,
)
from claim_service.vault import Vault

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
PG = web.AppKey("pg", asyncpg.Pool)
ENGINE = web.AppKey("engine", ClaimEngine)
VERIFIER = web.AppKey("verifier", TokenVerifier)
VAULT = web.AppKey("vault", Vault)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif status in (429, 503):
        headers = {"Retry-After": "1"}
    return json_response({"error": code, "message": message, **extra}, status, headers)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body; 413 as soon as it passes ``limit`` bytes (chunked bodies included)."""
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
    chunks: list[bytes] = []
    size = 0
    # StreamReader.read(n) returns whatever is buffered, so read until EOF.
    try:
        while chunk := await request.content.read(65536):
            size += len(chunk)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            chunks.append(chunk)
    except web.RequestPayloadError as exc:  # bad gzip/deflate, unsupported Content-Encoding
        raise ValidationError("request body could not be decoded") from exc
    return b"".join(chunks)


async def read_json(request: web.Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``limit`` bytes, 400 for anything not an object."""
    body = await read_body(request, limit)
    return parse_json_object(body)


async def read_json_any(request: web.Request, limit: int) -> Any:
    body = await read_body(request, limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"body is not valid JSON: {exc.msg}") from exc


def parse_json_object(body: bytes) -> dict[str, Any]:
    """``body`` as a JSON object, or ``ValidationError`` saying what is wrong with it."""
    if not body:
        raise ValidationError("a JSON object body is required")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"body is not valid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ValidationError("body must be a JSON object")
    return data


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes ``{"error", "message"}``; bad input is never a 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = STATUS_CODES.get(exc.status, "error")
        message = exc.reason if exc.status != 413 else "request body is too large"
        response = error_response(exc.status, code, message)
        if "Allow" in exc.headers:  # a 405 must say which methods are allowed
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except ValidationError as exc:
        extra = {"field": exc.field} if exc.field else {}
        return error_response(400, "invalid_request", str(exc), **extra)
    except AuthError as exc:
        return error_response(401, "unauthorized", str(exc))
    except NotFoundError as exc:
        return error_response(404, exc.code, str(exc))
    except ConflictError as exc:
        return error_response(409, exc.code, str(exc))
    except BackendUnavailable as exc:
        log.warning("backend unavailable: %s (%s)", exc, exc.__cause__)
        return error_response(503, "unavailable", str(exc))
    except (RedisError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        log.warning("backend error on %s %s: %r", request.method, request.path, exc)
        return error_response(503, "unavailable", "a backing service is unavailable; retry")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error")


async def warm_if_empty(redis: Redis, pg: asyncpg.Pool, settings: Settings) -> None:
    """A Redis that came back empty is rebuilt from PostgreSQL before serving claims."""
    from claim_service import periods
    from claim_service.catalogue_store import warm
    from claim_service.keyspace import CATALOGUE_KEY

    if await redis.exists(CATALOGUE_KEY):
        return
    if not await pg.fetchval("SELECT EXISTS (SELECT 1 FROM benefits)"):
        return  # a new installation: nothing to restore
    period = periods.current_period(settings.tz)
    log.warning("Redis holds no catalogue; warming it from PostgreSQL for %s", period)
    report = await warm(pg, redis, settings.tz, [period])
    log.warning(
        "warmed %d benefit(s), %d tier row(s), %d counter(s)",
        report.benefits_pushed,
        report.tiers_loaded,
        report.counters_restored,
    )


def create_app(
    settings: Settings, *, pools: tuple[Redis, asyncpg.Pool] | None = None
) -> web.Application:
    """The whole HTTP service. ``pools`` lets tests share clients; otherwise they are opened
    from the settings' URLs in ``cleanup_ctx`` and closed on shutdown."""
    from claim_service import admin_api, api, fulfilment_api

    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=settings.admin_max_body_bytes,
        handler_args={"max_field_size": 16384},
    )
    app[SETTINGS] = settings
    app[VERIFIER] = TokenVerifier(settings)
    app[VAULT] = Vault(settings.codes_key)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        if pools is not None:
            redis, pg = pools
        else:
            redis_url, database_url = settings.require_urls()
            redis = await create_redis(redis_url, max_connections=256)
            pg = await create_pg_pool(database_url, max_size=10)
            await warm_if_empty(redis, pg, settings)
        app[REDIS] = redis
        app[PG] = pg
        app[ENGINE] = ClaimEngine(redis, settings)
        yield
        await app[ENGINE].drain()
        if pools is None:
            await pg.close()
            await redis.aclose()

    app.cleanup_ctx.append(resources)
    api.add_routes(app)
    admin_api.add_routes(app)
    fulfilment_api.add_routes(app)
    return app
