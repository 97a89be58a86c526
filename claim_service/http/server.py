"""The HTTP server under both listeners: aiohttp's connection handling, guarded.

Left alone, aiohttp gives a request no deadline to arrive (slowly sent headers, or a body
that never comes, hold their connection until the keep-alive timer fires, an hour later;
that timer is the only bound on headers), holds as many connections as the process has file
descriptors, answers parser rejections in text/plain and logs them with the raw header line
(a bearer token included) at ERROR. Here:

- a request must arrive whole, headers and body, within ``CLAIM_BODY_TIMEOUT_S`` of its
  first byte, and a new connection must send one within that time; otherwise the connection
  is closed, with a JSON 408 when an answer can still be written;
- a process holds at most ``CLAIM_MAX_CONNECTIONS`` connections across its listeners; at
  the bound, those stalled longest (mid-request first, then idle) are shed to make room,
  never one whose request is being answered;
- parser rejections answer JSON and are logged once, at INFO, without the offending bytes.

This subclasses aiohttp's ``Server``, ``RequestHandler`` and ``AppRunner`` and reads a few
of their internals (the handler's ``_messages``, ``_request_in_progress``, ``_close`` and
``_force_close``; the server's ``_kwargs``, the handler arguments aiohttp gathered for the
app); ``tests/acceptance/test_slow_clients.py`` and ``tests/integration/test_hostile_input.py``
pin the behaviour on raw sockets.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
)
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from claim_service.config import Settings

log = logging.getLogger(__name__)

# File descriptors kept for everything but client connections: Redis and PostgreSQL pools,
# partner calls, logs.
RESERVED_FDS = 512
# At the bound, one scan sheds this share of the bound at once, so that a flood of new
# connections costs a scan per many accepts rather than one each.
SHED_SHARE = 64
REPORT_EVERY_S = 10.0
# After a 408 to headers that never ended, what the client still sends is read and dropped
# this long, so that closing does not reset the connection before it has read the answer.
LINGER_S = 1.0

ERROR_CODES = {
    400: ("invalid_request", "Bad Request"),
    408: ("request_timeout", "Request Timeout"),
    413: ("payload_too_large", "Payload Too Large"),
    431: ("invalid_request", "Request Header Fields Too Large"),
    500: ("internal", "Internal Server Error"),
    503: ("unavailable", "Service Unavailable"),
    504: ("timeout", "Gateway Timeout"),
}


class RequestBodyTimeout(TimeoutError):
    """A request's body did not arrive whole within ``CLAIM_BODY_TIMEOUT_S``."""


def raw_json_response(status: int, message: str) -> bytes:
    """A whole ``Connection: close`` answer, for when no request object exists to answer."""
    code, reason = ERROR_CODES[status]
    body = orjson.dumps({"error": code, "message": message})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    )
    if status == 503:
        head += "Retry-After: 1\r\n"
    return head.encode() + b"\r\n" + body


def rejection(exc: BaseException | None) -> str:
    """What was wrong with a request the parser refused, in words that echo none of it."""
    if isinstance(exc, LineTooLong):
        return "a request line or header is too long"
    if isinstance(exc, BadHttpMethod):
        return "not an HTTP request"
    if isinstance(exc, BadStatusLine):
        return "malformed request line"
    if isinstance(exc, InvalidHeader):
        return "malformed header"
    if isinstance(exc, HttpProcessingError) and "too many headers" in exc.message.lower():
        return "too many headers"
    return "malformed HTTP request"


def file_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class ConnectionLimit:
    """The open connections of one process, across its listeners, and their bound."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.open: set[GuardedRequestHandler] = set()
        self._shed = 0
        self._refused = 0
        self._reported_at = 0.0

    @classmethod
    def for_process(cls, settings: Settings) -> ConnectionLimit:
        """``CLAIM_MAX_CONNECTIONS``, lowered to what the open-file limit leaves room for."""
        room = max(file_limit() - RESERVED_FDS, 16)
        if room < settings.max_connections:
            log.warning(
                "CLAIM_MAX_CONNECTIONS lowered from %d to %d by the open-file limit",
                settings.max_connections,
                room,
            )
        return cls(min(settings.max_connections, room))

    def admit(self, handler: GuardedRequestHandler) -> bool:
        """Room for one more connection, made by shedding stalled or idle ones if needed."""
        if len(self.open) >= self.maximum:
            self._shed_stalled()
        if len(self.open) >= self.maximum:
            self._refused += 1
            self._report()
            return False
        self.open.add(handler)
        return True

    def release(self, handler: GuardedRequestHandler) -> None:
        self.open.discard(handler)

    def _shed_stalled(self) -> None:
        batch = max(1, self.maximum // SHED_SHARE)
        ranked = (
            (rank, id(handler), handler)
            for handler in self.open
            if (rank := handler.shed_rank()) is not None
        )
        for _, _, handler in heapq.nsmallest(batch, ranked):
            handler.shed()
            self._shed += 1
        self._report()

    def _report(self) -> None:
        # Under a flood this runs thousands of times a second: one line per interval.
        now = time.monotonic()
        if now - self._reported_at < REPORT_EVERY_S:
            return
        self._reported_at = now
        log.warning(
            "at the connection limit (%d): %d stalled or idle connection(s) shed, "
            "%d refused since the last report",
            self.maximum,
            self._shed,
            self._refused,
        )
        self._shed = self._refused = 0


@dataclass(frozen=True)
class Guard:
    """What every connection of a process is held to."""

    body_timeout_s: float
    limit: ConnectionLimit = field(compare=False)

    @classmethod
    def for_process(cls, settings: Settings) -> Guard:
        return cls(settings.body_timeout_s, ConnectionLimit.for_process(settings))


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol with a request deadline, shedding and JSON errors."""

    __slots__ = (
        "_deadline",
        "_expired",
        "_guard",
        "_last_seen",
        "_pending",
        "_silent",
        "_started_at",
    )

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager.guard
        self._deadline: asyncio.TimerHandle | None = None
        self._pending: StreamReader | None = None  # body of the newest request, until whole
        self._started_at = 0.0
        self._last_seen = 0.0
        self._silent = True
        self._expired = False

    # -- the request deadline ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        admitted = self._guard.limit.admit(self)
        super().connection_made(transport)
        if not admitted:
            # Not one stalled or idle connection to shed: every one is being answered.
            transport_ = self.transport
            if transport_ is not None:
                transport_.write(raw_json_response(503, "too many connections; retry"))
            self.force_close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._expired:
            return
        if data and not (self._close or self._force_close):
            self._silent = False
            self._last_seen = self._loop.time()
            if self._deadline is None:
                self._arm()
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            self._pending = self._messages[-1][1]
        if self._deadline is not None and self._pending is not None and self._pending.is_eof():
            self._deadline.cancel()
            self._deadline = None
            self._pending = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.limit.release(self)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._pending = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._started_at = self._loop.time()
        self._pending = None
        self._deadline = self._loop.call_at(
            self._started_at + self._guard.body_timeout_s, self._on_deadline
        )

    def _on_deadline(self) -> None:
        self._deadline = None
        pending, self._pending = self._pending, None
        transport = self.transport
        if transport is None or self._force_close:
            return
        if pending is not None:
            # The handler reading the body (or aiohttp draining it after the answer) gets
            # this error: the handler answers 408, then the connection is closed.
            log.info("cut off a request body not sent within %gs", self._guard.body_timeout_s)
            pending.set_exception(RequestBodyTimeout("the request body did not arrive in time"))
            self.close()  # after that answer; later bytes are not read
            return
        if self._silent:
            log.debug(
                "closed a connection that sent no request within %gs", self._guard.body_timeout_s
            )
        else:
            log.info(
                "closed a connection whose request headers took over %gs",
                self._guard.body_timeout_s,
            )
        if not self._request_in_progress and not self._messages:
            transport.write(raw_json_response(408, "the request did not arrive in time"))
            if transport.can_write_eof():
                transport.write_eof()
                self._expired = True
                self._loop.call_later(LINGER_S, self.force_close)
                return
        self.force_close()

    # -- shedding ------------------------------------------------------------------------

    def shed_rank(self) -> tuple[int, float] | None:
        """Order of shedding, lowest first: stalled mid-request (or silent since connecting)
        longest, then idle longest; ``None`` while a whole request is being answered."""
        if self.transport is None or self._force_close:
            return None
        if self._deadline is not None:
            return (0, self._started_at)
        if self._request_in_progress or self._messages:
            return None
        return (1, self._last_seen)

    def shed(self) -> None:
        self._guard.limit.release(self)
        self.force_close()

    # -- errors --------------------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """JSON for every error aiohttp answers itself (parser rejections above all)."""
        if status >= 500:
            log.error("error handling a request (%d)", status, exc_info=exc)
            text = "internal error"
        else:
            # The parser's own message quotes the offending bytes (a token, say): never log
            # or echo it.
            text = rejection(exc)
            log.info("client sent a malformed request (%d): %s", status, text)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already being sent")
        code, _ = ERROR_CODES.get(status, ("error", ""))
        response = web.Response(
            status=status,
            body=orjson.dumps({"error": code, "message": text}),
            content_type="application/json",
        )
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        client_fault = (RequestPayloadError, HttpProcessingError, ConnectionError, TimeoutError)
        if isinstance(exc, client_fault):
            # A body that could not be read, or a client gone: the client's doing, not ours.
            log.info("client sent a request body that could not be read (%s)", type(exc).__name__)
            return
        super().log_exception(*args, **kw)


class GuardedServer(web.Server):
    """aiohttp's protocol factory, making guarded handlers."""

    def __init__(self, handler: Any, *, guard: Guard, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class ServiceRunner(web.AppRunner):
    """An ``AppRunner`` serving ``app`` through a ``GuardedServer``."""

    __slots__ = ("_guard",)

    def __init__(self, app: web.Application, guard: Guard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app; its handler arguments
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            guard=self._guard,
            **plain._kwargs,
        )
