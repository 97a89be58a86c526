"""A fulfilment partner over real HTTP, for the demo, the tests and the benches.

It implements the partner side of ``docs/partner-protocol.md``: signed ``POST /orders``,
``409`` with the earlier answer for an order it already has, ``processing`` orders completed
later by a signed callback, and the signed order status query ``GET /orders/{order_id}``.
Faults are injected at configurable rates so the caller's retries, idempotency, status
queries and callback handling can be exercised; ``GET /stats`` reports what happened,
including ``double_charged``, which must stay 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web

from claim_service.errors import ValidationError
from claim_service.fulfilment.partners import status_path
from claim_service.fulfilment.signing import (
    IDEMPOTENCY_HEADER,
    SignatureError,
    signed_headers,
    verify,
)
from claim_service.http.app import parse_json_object
from claim_service.local.partner_sim_config import (
    DELAY_FIELDS,
    RATE_FIELDS,
    PartnerOrder,
    SimConfig,
    SimCounters,
    config_from_args,
    parse_order,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
CALLBACK_ATTEMPTS = 5
CALLBACK_BACKOFF_S = 0.1
CALLBACK_TIMEOUT_S = 5.0
MAX_CALLBACK_COPIES = 3
SHUTDOWN_TIMEOUT_S = 2.0
REJECT_REASON = "account_not_found"
CALLBACK_FAILURE_REASON = "fulfilment_failed"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": code, "message": message}, status)


class PartnerSimulator:
    """The partner's state (orders, counters) and its HTTP application."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.orders: dict[str, PartnerOrder] = {}
        self.counters = SimCounters()
        self.url: str | None = None
        self._rng = random.Random(self.config.seed)
        self._refs = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app[SIMULATOR] = self
        app.router.add_post("/orders", self._post_order)
        app.router.add_get("/orders/{order_id}", self._get_order)
        app.router.add_get("/stats", self._get_stats)
        app.router.add_post("/control", self._post_control)
        app.cleanup_ctx.append(self._callback_session)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _callback_session(self, app: web.Application) -> AsyncIterator[None]:
        self._closing.clear()
        timeout = aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S)
        self._session = aiohttp.ClientSession(timeout=timeout)
        yield
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._session.close()
        self._session = None

    async def _on_shutdown(self, app: web.Application) -> None:
        # Wake handlers holding back an answer, so shutdown does not wait timeout_delay_s.
        self._closing.set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: any free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("the partner simulator is already running")
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = port or int(runner.addresses[0][1])
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
        log.info("partner simulator %r listening on %s", self.config.partner_id, self.url)
        return self.url

    async def stop(self) -> None:
        """Stop serving; pending callbacks are cancelled. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- state -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        charges = [order.times_charged for order in self.orders.values()]
        return {
            "orders": len(self.orders),
            "charged": sum(charges),
            "double_charged": sum(1 for n in charges if n > 1),
            "pending": sum(1 for o in self.orders.values() if o.status == "processing"),
            **asdict(self.counters),
        }

    def _charge(self, order: PartnerOrder) -> None:
        # Called once per order by construction (first acceptance, or completion of a
        # processing order); deliberately unguarded so a regression shows in double_charged.
        order.times_charged += 1

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)

    def _latency_s(self) -> float:
        mean_ms = self.config.latency_ms
        return self._rng.expovariate(1000.0 / mean_ms) if mean_ms > 0 else 0.0

    def _verify(self, request: web.Request, body: bytes) -> web.Response | None:
        try:
            verify(self.config.secret, request.headers, body)
        except SignatureError as exc:
            self.counters.bad_signatures += 1
            return _error(401, "bad_signature", str(exc))
        return None

    # -- handlers ----------------------------------------------------------------------------

    async def _post_order(self, request: web.Request) -> web.Response:
        self.counters.requests += 1
        body = await request.read()
        if (rejection := self._verify(request, body)) is not None:
            return rejection
        try:
            data = parse_order(body)
            if request.headers.get(IDEMPOTENCY_HEADER) != data["order_id"]:
                raise ValidationError(f"{IDEMPOTENCY_HEADER} must equal order_id")
        except ValidationError as exc:
            self.counters.bad_requests += 1
            return _error(400, "invalid_request", str(exc))
        await self._pause(self._latency_s())

        # No await from here until the order is recorded: two concurrent sends of one
        # order cannot both be accepted, so nothing is charged twice.
        config, rng = self.config, self._rng
        if rng.random() < config.failure_rate:
            self.counters.failures_injected += 1
            return _error(500, "unavailable", "injected failure; nothing was recorded")
        existing = self.orders.get(data["order_id"])
        if existing is not None:
            self.counters.duplicates_received += 1
            return _json(existing.answer(), 409)

        self._refs += 1
        order = PartnerOrder(
            order_id=data["order_id"],
            sku=data["sku"],
            account=data["account"],
            created_at=data["created_at"],
            partner_ref=f"{config.partner_id.upper()}-{self._refs:08d}",
            first_status="success",
            status="success",
        )
        self.orders[order.order_id] = order
        if rng.random() < config.timeout_rate:
            self.counters.timeouts_injected += 1
            self._charge(order)
            await self._pause(config.timeout_delay_s)
        elif rng.random() < config.reject_rate:
            self.counters.rejected += 1
            order.first_status = order.status = "failed"
            order.reason = REJECT_REASON
        elif rng.random() < config.processing_rate:
            self.counters.processing += 1
            order.first_status = order.status = "processing"
            task = asyncio.create_task(self._complete(order), name=f"complete-{order.order_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._charge(order)
        return _json(order.answer())

    async def _get_order(self, request: web.Request) -> web.Response:
        """The protocol's status query (signed over the path), answered with the protocol's
        fields plus the simulator's own books (``times_charged``, ``first_status``, ...)."""
        self.counters.status_queries += 1
        order_id = request.match_info["order_id"]
        if (rejection := self._verify(request, status_path(order_id).encode())) is not None:
            return rejection
        await self._pause(self._latency_s())
        if self._rng.random() < self.config.failure_rate:
            self.counters.failures_injected += 1
            return _error(500, "unavailable", "injected failure")
        order = self.orders.get(order_id)
        if order is None:
            not_found = {
                "order_id": order_id,
                "status": "not_found",
                "partner_ref": None,
                "reason": None,
            }
            return _json(not_found, 404)
        return _json(asdict(order))

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json(self.stats())

    async def _post_control(self, request: web.Request) -> web.Response:
        body = await request.read()
        if (rejection := self._verify(request, body)) is not None:
            return rejection
        try:
            changes = parse_json_object(body)
            unknown = sorted(set(changes) - {*RATE_FIELDS, *DELAY_FIELDS})
            if unknown:
                raise ValidationError(f"cannot change {', '.join(unknown)}")
            self.config = replace(self.config, **changes)
        except (ValidationError, ValueError) as exc:
            return _error(400, "invalid_request", str(exc))
        log.info("partner simulator settings changed: %s", changes)
        return _json(self.config.public())

    # -- callbacks ---------------------------------------------------------------------------

    async def _complete(self, order: PartnerOrder) -> None:
        try:
            await asyncio.sleep(self.config.callback_delay_ms / 1000)
            if self._rng.random() < self.config.callback_failure_rate:
                order.status, order.reason = "failed", CALLBACK_FAILURE_REASON
            else:
                order.status = "success"
                self._charge(order)
            order.completed_at = time.time()
            url = self.config.callback_url
            if url is None:
                return
            copies, repeat_rate = 1, self.config.duplicate_callback_rate
            while copies < MAX_CALLBACK_COPIES and self._rng.random() < repeat_rate:
                copies += 1
            self.counters.duplicate_callbacks += copies - 1
            body = orjson.dumps({"order_id": order.order_id, **order.answer()})
            # Copies go out together: the receiver must cope with concurrent repeats.
            await asyncio.gather(*(self._deliver(url, body) for _ in range(copies)))
        except Exception:
            log.exception("completing order %s failed", order.order_id)

    async def _deliver(self, url: str, body: bytes) -> None:
        """POST one callback, retrying 5xx and connection errors with backoff and jitter."""
        self.counters.callbacks_sent += 1
        outcome = "no attempt"
        for attempt in range(CALLBACK_ATTEMPTS):
            if attempt:
                self.counters.callback_retries += 1
                backoff = CALLBACK_BACKOFF_S * 2 ** (attempt - 1)
                await asyncio.sleep(backoff * (0.5 + self._rng.random() / 2))
            if self._session is None:
                break
            headers = signed_headers(self.config.secret, body)
            try:
                async with self._session.post(url, data=body, headers=headers) as response:
                    status = response.status
                    await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = repr(exc)
                continue
            if 200 <= status < 300:
                self.counters.callbacks_acknowledged += 1
                return
            outcome = f"HTTP {status}"
            if status < 500:
                break
        self.counters.callbacks_failed += 1
        log.warning("callback to %s not acknowledged: %s", url, outcome)


SIMULATOR = web.AppKey("partner_simulator", PartnerSimulator)


# -- command line ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, then print the stats as JSON."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"partner-sim: {exc}", file=sys.stderr)
        return 2
    return uvloop.run(_serve(config, args.host, args.port))


async def _serve(config: SimConfig, host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    simulator = PartnerSimulator(config)
    url = await simulator.start(host, port)
    print(f"partner simulator {config.partner_id!r} listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await simulator.stop()
    print(orjson.dumps(simulator.stats(), option=orjson.OPT_INDENT_2).decode(), flush=True)
    return 0
