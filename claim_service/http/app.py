"""The aiohttp applications: state under typed keys, JSON errors, pools in ``cleanup_ctx``.

Two applications share one set of pools: the member-facing one (claims, the catalogue,
partner callbacks, health, the OpenAPI document) and the ops one on its own listener
(``/admin``, ``/metrics``, health), loopback-only by default.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from claim_service import metrics
from claim_service.claims.engine import ClaimEngine
from claim_service.config import Settings
from claim_service.errors import (
    BackendUnavailable,
    ConflictError,
    NotFoundError,
    ValidationError,
)
from claim_service.http.auth import AuthError, TokenVerifier
from claim_service.http.limits import ClaimLimits, retry_after
from claim_service.http.server import RequestBodyTimeout
from claim_service.store.vault import Vault, VaultError

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
PG = web.AppKey("pg", asyncpg.Pool)
ENGINE = web.AppKey("engine", ClaimEngine)
VERIFIER = web.AppKey("verifier", TokenVerifier)
VAULT = web.AppKey("vault", Vault)
LIMITS = web.AppKey("limits", ClaimLimits)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Bearer tokens may be up to 8192 characters (``auth.MAX_TOKEN_BYTES``): aiohttp's default
# header limit (8190 bytes) would refuse the longest before we can answer 401.
HANDLER_ARGS = {"max_field_size": 16384}

MESSAGES = {
    408: "the request body did not arrive in time",
    413: "request body is too large",
}
STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int, code: str, message: str, *, retry_after: str = "1", **extra: Any
) -> web.Response:
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif status in (429, 503):
        headers = {"Retry-After": retry_after}
    return json_response({"error": code, "message": message, **extra}, status, headers)


class ClientDisconnected(Exception):
    """The client closed its connection before sending the whole body."""


def check_length(request: web.Request, limit: int) -> None:
    """413 from the declared ``Content-Length`` alone, before any of the body is read."""
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body; 413 as soon as it passes ``limit`` bytes (chunked bodies included),
    408 when it did not arrive within ``CLAIM_BODY_TIMEOUT_S`` (see ``http_server``)."""
    check_length(request, limit)
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
    except RequestBodyTimeout as exc:
        raise web.HTTPRequestTimeout() from exc
    except ConnectionError as exc:  # gone mid-body: the client's doing, not a backend's
        raise ClientDisconnected() from exc
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
        message = MESSAGES.get(exc.status, exc.reason)
        response = error_response(exc.status, code, message)
        if "Allow" in exc.headers:  # a 405 must say which methods are allowed
            response.headers["Allow"] = exc.headers["Allow"]
        if exc.status == 408:
            response.force_close()  # the rest of that body is not worth waiting for
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
    except ClientDisconnected:
        log.debug("client closed the connection mid-body on %s %s", request.method, request.path)
        return error_response(400, "invalid_request", "the request body was not sent whole")
    except BackendUnavailable as exc:
        log.warning("backend unavailable: %s (%s)", exc, exc.__cause__)
        return error_response(503, "unavailable", str(exc))
    except VaultError:
        # Not the client's fault, and no retry will fix it: ops must look at the key.
        log.error(
            "a stored code or partner secret cannot be decrypted on %s %s: CLAIM_CODES_KEY is "
            "probably not the key the data was sealed with",
            request.method,
            request.path,
        )
        return error_response(503, "unavailable", "a stored secret cannot be read; retry later")
    except (
        RedisError,
        RedisClusterException,  # a cluster's own errors (a slot no primary serves)
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OSError,
    ) as exc:
        log.warning("backend error on %s %s: %r", request.method, request.path, exc)
        return error_response(503, "unavailable", "a backing service is unavailable; retry")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error")


def shed_load(request: web.Request) -> web.Response | None:
    """503 when this worker has too many claims in flight, 429 past the client address's
    rate (when limited); None to go on. Before the token is checked: the cheapest refusals
    first (the claim route, then the waiting room's)."""
    limits = request.app[LIMITS]
    if limits.full:
        metrics.CLAIMS_SHED.labels("overloaded").inc()
        return error_response(503, "overloaded", "too many claims waiting here; retry shortly")
    if limits.addresses.enabled:
        wait = limits.addresses.take(request.remote or "")
        if wait:
            return rate_limited(wait)
    return None


def rate_limited(wait: float) -> web.Response:
    metrics.CLAIMS_SHED.labels("rate_limited").inc()
    return error_response(
        429, "rate_limited", "too many claims; slow down", retry_after=retry_after(wait)
    )
