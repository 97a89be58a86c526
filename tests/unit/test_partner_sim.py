"""The partner simulator over real HTTP on loopback, driven by a plain aiohttp client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from claim_service.fulfilment.signing import (
    IDEMPOTENCY_HEADER,
    SignatureError,
    signed_headers,
    verify,
)
from claim_service.local.embedded import free_port
from claim_service.local.partner_sim import PartnerSimulator
from claim_service.local.partner_sim_config import SimConfig

SECRET = "test-partner-secret"

StartSim = Callable[..., Awaitable[str]]
MakeReceiver = Callable[..., Awaitable[tuple["CallbackReceiver", str]]]


def order_body(order_id: str, **overrides: Any) -> bytes:
    fields = {
        "order_id": order_id,
        "sku": "phone-topup-50",
        "account": "13800000000",
        "quantity": 1,
        "created_at": "2026-01-01T08:00:00+08:00",
        **overrides,
    }
    return orjson.dumps(fields)


def order_headers(order_id: str, body: bytes, secret: str = SECRET, **kw: Any) -> dict[str, str]:
    return {**signed_headers(secret, body, **kw), IDEMPOTENCY_HEADER: order_id}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Start simulators on free ports; every one is stopped at the end of the test."""
    started: list[PartnerSimulator] = []

    async def start(**config: Any) -> str:
        config = {"secret": SECRET, "latency_ms": 0, "seed": 7, **config}
        simulator = PartnerSimulator(SimConfig(**config))
        started.append(simulator)
        return await simulator.start("127.0.0.1", free_port())

    yield start
    for simulator in started:
        await simulator.stop()


class CallbackReceiver:
    """Our side of the callback, reduced to: verify the signature, record, answer."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.hits = 0
        self.bad_signatures = 0
        # Answers to give in turn before settling on 200 (e.g. [503] = fail once).
        self.statuses = list(statuses or [])

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.read()
        try:
            verify(SECRET, request.headers, body)
        except SignatureError:
            self.bad_signatures += 1
            return web.json_response({"error": "bad_signature"}, status=401)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.bodies.append(orjson.loads(body))
            self.paths.append(request.path)
        return web.json_response({"ok": status == 200}, status=status)


@pytest.fixture
async def receiver_factory() -> AsyncIterator[MakeReceiver]:
    runners: list[web.AppRunner] = []

    async def make(statuses: list[int] | None = None) -> tuple[CallbackReceiver, str]:
        receiver = CallbackReceiver(statuses)
        app = web.Application()
        app.router.add_post("/v1/partners/{partner_id}/callbacks", receiver.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return receiver, f"http://127.0.0.1:{port}"

    yield make
    for runner in runners:
        await runner.cleanup()


async def send_order(
    http: aiohttp.ClientSession, url: str, order_id: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    body = order_body(order_id)
    headers = order_headers(order_id, body)
    async with http.post(f"{url}/orders", data=body, headers=headers, **kw) as response:
        return response.status, await response.json()


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def status_headers(path: str, secret: str = SECRET, **kw: Any) -> dict[str, str]:
    """A status query is signed over its path, standing in for the body a GET lacks."""
    headers = signed_headers(secret, path.encode(), **kw)
    del headers["Content-Type"]
    return headers


async def query_status(
    http: aiohttp.ClientSession, url: str, order_id: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    path = f"/orders/{order_id}"
    sent = status_headers(path) if headers is None else headers
    async with http.get(url + path, headers=sent) as response:
        return response.status, await response.json()


async def get_order(http: aiohttp.ClientSession, url: str, order_id: str) -> Any:
    status, body = await query_status(http, url, order_id)
    assert status == 200, body
    return body


async def wait_for(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` (it reads over HTTP, so there is no event to wait on) for up to 3 s."""
    for _ in range(150):
        if await check():
            return
        await asyncio.sleep(0.02)
    pytest.fail("condition not reached in 3 s")


async def test_wrong_or_stale_signature_is_401_and_nothing_is_recorded(http, start_sim):
    url = await start_sim()
    body = order_body("c1")
    cases = [
        order_headers("c1", body, secret="not-the-secret"),
        order_headers("c1", body, now=time.time() - 600),
        {IDEMPOTENCY_HEADER: "c1", "Content-Type": "application/json"},
    ]
    for headers in cases:
        async with http.post(f"{url}/orders", data=body, headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["error"] == "bad_signature"
    stats = await get_json(http, f"{url}/stats")
    assert stats["bad_signatures"] == 3
    assert stats["orders"] == 0
    assert stats["charged"] == 0


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (order_body("c1", quantity=2), "c1"),
        (order_body("c1", created_at="yesterday"), "c1"),
        (order_body("c1", account=""), "c1"),
        (b"[1, 2]", "c1"),
        (b"{not json", "c1"),
        (order_body("c1"), "c2"),
    ],
)
async def test_bad_order_request_is_400(http, start_sim, body, key):
    url = await start_sim()
    headers = order_headers(key, body)
    async with http.post(f"{url}/orders", data=body, headers=headers) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_request"
    assert (await get_json(http, f"{url}/stats"))["orders"] == 0


async def test_order_success_is_charged_once(http, start_sim):
    url = await start_sim(latency_ms=2)
    status, answer = await send_order(http, url, "c1")
    assert status == 200
    assert answer["status"] == "success"
    assert answer["reason"] is None
    assert answer["partner_ref"].startswith("SIM-")
    order = await get_order(http, url, "c1")
    assert order["times_charged"] == 1
    assert order["account"] == "13800000000"


async def test_repeated_order_gets_409_with_the_same_answer_and_no_second_charge(http, start_sim):
    url = await start_sim()
    first = await send_order(http, url, "c1")
    again = await send_order(http, url, "c1")
    assert first[0] == 200
    assert again == (409, first[1])
    stats = await get_json(http, f"{url}/stats")
    assert stats["duplicates_received"] == 1
    assert (stats["orders"], stats["charged"], stats["double_charged"]) == (1, 1, 0)


async def test_concurrent_sends_of_one_order_are_accepted_once(http, start_sim):
    url = await start_sim(latency_ms=3)
    results = await asyncio.gather(*(send_order(http, url, "c1") for _ in range(20)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [409] * 19
    assert len({answer["partner_ref"] for _, answer in results}) == 1
    stats = await get_json(http, f"{url}/stats")
    assert (stats["charged"], stats["double_charged"]) == (1, 0)


async def test_injected_failure_is_500_and_not_recorded(http, start_sim):
    url = await start_sim(failure_rate=1.0)
    status, _ = await send_order(http, url, "c1")
    assert status == 500
    stats = await get_json(http, f"{url}/stats")
    assert (stats["failures_injected"], stats["orders"], stats["charged"]) == (1, 0, 0)


async def test_rejected_order_is_failed_not_charged_and_resend_repeats_it(http, start_sim):
    url = await start_sim(reject_rate=1.0)
    status, answer = await send_order(http, url, "c1")
    assert (status, answer["status"], answer["reason"]) == (200, "failed", "account_not_found")
    assert await send_order(http, url, "c1") == (409, answer)
    stats = await get_json(http, f"{url}/stats")
    assert (stats["rejected"], stats["charged"]) == (1, 0)


async def test_outage_then_recovery_through_signed_control(http, start_sim):
    url = await start_sim()

    async def control(changes: dict[str, Any], secret: str = SECRET) -> int:
        body = orjson.dumps(changes)
        headers = signed_headers(secret, body)
        async with http.post(f"{url}/control", data=body, headers=headers) as response:
            return int(response.status)

    assert await control({"failure_rate": 1.0}, secret="wrong") == 401
    assert await control({"secret": "x"}) == 400
    assert await control({"failure_rate": 1.5}) == 400
    assert await control({"failure_rate": 1.0}) == 200
    assert (await send_order(http, url, "c1"))[0] == 500
    assert await control({"failure_rate": 0.0}) == 200
    status, answer = await send_order(http, url, "c1")
    assert (status, answer["status"]) == (200, "success")
    stats = await get_json(http, f"{url}/stats")
    assert (stats["failures_injected"], stats["charged"], stats["bad_signatures"]) == (1, 1, 1)


async def test_processing_order_completes_by_signed_callback_sent_repeatedly(
    http, start_sim, receiver_factory
):
    receiver, callback_base = await receiver_factory()
    url = await start_sim(
        partner_id="acme",
        callback_base=callback_base,
        processing_rate=1.0,
        callback_delay_ms=20,
        duplicate_callback_rate=1.0,
    )
    status, answer = await send_order(http, url, "c1")
    assert (status, answer["status"]) == (200, "processing")
    assert (await get_order(http, url, "c1"))["times_charged"] == 0

    async def acknowledged() -> bool:
        stats = await get_json(http, f"{url}/stats")
        return bool(stats["callbacks_acknowledged"] == stats["callbacks_sent"] >= 2)

    await wait_for(acknowledged)
    expected = {
        "order_id": "c1",
        "status": "success",
        "partner_ref": answer["partner_ref"],
        "reason": None,
    }
    assert len(receiver.bodies) >= 2
    assert all(body == expected for body in receiver.bodies)
    assert set(receiver.paths) == {"/v1/partners/acme/callbacks"}
    assert receiver.bad_signatures == 0
    stats = await get_json(http, f"{url}/stats")
    assert stats["duplicate_callbacks"] == len(receiver.bodies) - 1
    assert (stats["charged"], stats["pending"], stats["callbacks_failed"]) == (1, 0, 0)
    # A resend after completion gets the current state, not the first "processing".
    status, again = await send_order(http, url, "c1")
    assert status == 409
    assert again == {**answer, "status": "success"}


async def test_failed_completion_is_not_charged(http, start_sim, receiver_factory):
    receiver, callback_base = await receiver_factory()
    url = await start_sim(
        callback_base=callback_base,
        processing_rate=1.0,
        callback_delay_ms=10,
        callback_failure_rate=1.0,
    )
    await send_order(http, url, "c1")

    async def delivered() -> bool:
        return bool(receiver.bodies)

    await wait_for(delivered)
    assert receiver.bodies[0]["status"] == "failed"
    assert receiver.bodies[0]["reason"] == "fulfilment_failed"
    assert (await get_json(http, f"{url}/stats"))["charged"] == 0


async def test_callback_retried_after_5xx_but_not_after_404(http, start_sim, receiver_factory):
    flaky, flaky_base = await receiver_factory([503, 502])
    url = await start_sim(callback_base=flaky_base, processing_rate=1.0, callback_delay_ms=0)
    await send_order(http, url, "c1")

    async def settled(target: str) -> bool:
        stats = await get_json(http, f"{target}/stats")
        return bool(stats["callbacks_acknowledged"] + stats["callbacks_failed"] == 1)

    await wait_for(lambda: settled(url))
    stats = await get_json(http, f"{url}/stats")
    assert (stats["callbacks_acknowledged"], stats["callback_retries"], flaky.hits) == (1, 2, 3)

    gone, gone_base = await receiver_factory([404])
    url = await start_sim(callback_base=gone_base, processing_rate=1.0, callback_delay_ms=0)
    await send_order(http, url, "c1")
    await wait_for(lambda: settled(url))
    stats = await get_json(http, f"{url}/stats")
    assert (stats["callbacks_failed"], stats["callback_retries"], gone.hits) == (1, 0, 1)


async def test_processing_without_callback_base_completes_internally(http, start_sim):
    url = await start_sim(processing_rate=1.0, callback_delay_ms=10)
    assert (await send_order(http, url, "c1"))[1]["status"] == "processing"

    async def completed() -> bool:
        return bool((await get_order(http, url, "c1"))["status"] == "success")

    await wait_for(completed)
    stats = await get_json(http, f"{url}/stats")
    assert (stats["charged"], stats["callbacks_sent"]) == (1, 0)


async def test_timed_out_order_was_charged_and_resend_gets_409_success(http, start_sim):
    url = await start_sim(timeout_rate=1.0, timeout_delay_s=1.0)
    with pytest.raises(TimeoutError):
        await send_order(http, url, "c1", timeout=aiohttp.ClientTimeout(total=0.2))
    stats = await get_json(http, f"{url}/stats")
    assert (stats["timeouts_injected"], stats["charged"]) == (1, 1)
    # Asked while the answer is still held back, the partner tells the truth: charged.
    order = await get_order(http, url, "c1")
    assert (order["status"], order["times_charged"]) == ("success", 1)
    status, answer = await send_order(http, url, "c1")
    assert (status, answer["status"]) == (409, "success")
    stats = await get_json(http, f"{url}/stats")
    assert (stats["charged"], stats["double_charged"]) == (1, 0)


async def test_same_seed_gives_the_same_outcomes(http, start_sim):
    outcomes = []
    for _ in range(2):
        url = await start_sim(seed=42, reject_rate=0.5, failure_rate=0.3)
        results = [await send_order(http, url, f"c{i}") for i in range(30)]
        outcomes.append([(status, answer.get("status")) for status, answer in results])
    assert outcomes[0] == outcomes[1]
    kinds = set(outcomes[0])
    assert {(500, None), (200, "failed"), (200, "success")} <= kinds


async def test_status_query_answers_the_protocol_fields_and_not_found_explicitly(http, start_sim):
    url = await start_sim(reject_rate=1.0)
    _, answer = await send_order(http, url, "c1")
    status, order = await query_status(http, url, "c1")
    assert status == 200
    protocol = {k: order[k] for k in ("order_id", "status", "partner_ref", "reason")}
    assert protocol == {"order_id": "c1", **answer}
    assert order["times_charged"] == 0
    status, absent = await query_status(http, url, "nope")
    assert status == 404
    assert absent == {
        "order_id": "nope",
        "status": "not_found",
        "partner_ref": None,
        "reason": None,
    }
    stats = await get_json(http, f"{url}/stats")
    assert (stats["status_queries"], stats["orders"]) == (2, 1)


async def test_status_query_signature_is_bound_to_the_order_and_fresh(http, start_sim):
    url = await start_sim()
    await send_order(http, url, "c1")
    await send_order(http, url, "c2")
    cases = [
        {},
        status_headers("/orders/c1"),  # captured for c1, replayed for c2
        status_headers("/orders/c2", secret="not-the-secret"),
        status_headers("/orders/c2", now=time.time() - 600),
    ]
    for headers in cases:
        status, body = await query_status(http, url, "c2", headers)
        assert (status, body["error"]) == (401, "bad_signature")
    assert (await query_status(http, url, "c2"))[0] == 200
    stats = await get_json(http, f"{url}/stats")
    assert (stats["bad_signatures"], stats["status_queries"]) == (4, 5)


async def test_outage_leaves_status_queries_unanswered_too(http, start_sim):
    url = await start_sim()
    await send_order(http, url, "c1")

    async def control(changes: dict[str, Any]) -> None:
        body = orjson.dumps(changes)
        async with http.post(f"{url}/control", data=body, headers=signed_headers(SECRET, body)):
            pass

    await control({"failure_rate": 1.0})
    status, body = await query_status(http, url, "c1")
    assert (status, body["error"]) == (500, "unavailable")
    assert (await query_status(http, url, "never-sent"))[0] == 500
    await control({"failure_rate": 0.0})
    assert (await get_order(http, url, "c1"))["status"] == "success"
    stats = await get_json(http, f"{url}/stats")
    assert (stats["failures_injected"], stats["charged"], stats["double_charged"]) == (2, 1, 0)


def test_config_rejects_out_of_range_rates() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        SimConfig(failure_rate=1.2)
    with pytest.raises(ValueError, match="callback_base"):
        SimConfig(callback_base="localhost:8080")
    assert "hide-me" not in repr(SimConfig(secret="hide-me"))
