"""The OpenAPI document against a live ``serve`` process, by schemathesis.

Every operation of the document ``GET /openapi.json`` serves is sent generated requests (its
examples, boundary values, then random ones, valid and invalid) on the listener the document
names for it in ``servers``: member routes with a member token, admin routes with the admin
token, partner callbacks signed with the partner's secret. Every response is checked: no
5xx, only documented status codes, bodies and headers as documented, requests the document
allows are not refused as invalid and requests it forbids are refused, credentials are
enforced. A stateful run then follows the document's links (a benefit created, claimed, the
claim read back…). Nothing ``serve`` logged reaches ERROR.

CI runs the quick form: ``CLAIM_FUZZ_EXAMPLES`` random requests per operation and as many
stateful scenarios (default 25, about 20 s). For the full form set it higher, e.g.
``CLAIM_FUZZ_EXAMPLES=1000 .venv/bin/pytest tests/security/test_openapi_fuzz.py`` (about 5
minutes on two cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.fulfilment.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, signed_headers
from claim_service.http.auth import mint_token
from claim_service.http.member import openapi_document
from claim_service.store.connections import create_pg_pool, create_redis
from tests.helpers import TABLES, Listeners, admin, spawn_serve, wait_ready

Case = schemathesis.Case[Any]
SEED = 20261110
EXAMPLES = int(os.environ.get("CLAIM_FUZZ_EXAMPLES", "25"))
DOCUMENT: dict[str, Any] = json.loads(openapi_document())
MEMBER = "fuzz-member"
PARTNER_SECRET = "fuzz-partner-secret-0123456789"
# The document's examples name these, so its examples meet data that exists.
BENEFIT, PARTNER = "video-monthly", "videohub"
# What a request the document allows may get besides 2xx: states of the service no schema can
# know (credentials, unknown ids, tier, quota and other conflicts, sold out or closed, paused,
# not open yet, too few points). Never 400 or 413, never 5xx.
ACCEPTED = ["2xx", "401", "402", "403", "404", "409", "410", "423", "425"]
# A benefit's fields, the points rules, or a campaign's fields can also contradict each other
# in ways no schema states (documented: 422); nothing else can.
ACCEPTED_BENEFIT = [*ACCEPTED, "422"]
# A line ``serve`` logged at ERROR or above, or a traceback: a finding whatever the response.
SERVER_FAULT = re.compile(r" (ERROR|CRITICAL) |Traceback")


@dataclass(frozen=True)
class Service:
    """A running ``serve`` process: where its listeners are, what it logged."""

    ports: Listeners
    log: Path

    def base_url(self, case: Case) -> str:
        """The listener the document names for the operation (its first server)."""
        item = DOCUMENT["paths"][case.operation.path]
        server = item.get("servers", DOCUMENT["servers"])[0]
        variables = {
            "host": "127.0.0.1",
            "port": str(self.ports.port),
            "admin_host": "127.0.0.1",
            "admin_port": str(self.ports.admin_port),
        }
        return re.sub(r"\{(\w+)\}", lambda m: variables[m.group(1)], server["url"])

    def call_kwargs(self, case: Case) -> dict[str, Any]:
        """Where to send ``case``, and for a partner callback or a bank event (both signed
        with ``PARTNER_SECRET`` here) a valid signature over the body
        as sent, in place of the generated signature headers (kept out when the case leaves
        them out or garbles headers on purpose)."""
        kwargs: dict[str, Any] = {"base_url": self.base_url(case)}
        signed = SIGNATURE_HEADER in case.headers and TIMESTAMP_HEADER in case.headers
        negative = case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER)
        if signed and not negative:
            raw = body_as_sent(case.as_transport_kwargs(base_url=kwargs["base_url"]))
            headers = signed_headers(PARTNER_SECRET, raw)
            if case.media_type:
                headers["Content-Type"] = case.media_type
            kwargs.update(data=raw, headers=headers)
        return kwargs

    def server_faults(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if SERVER_FAULT.search(line)]


def body_as_sent(request: dict[str, Any]) -> bytes:
    """The bytes ``requests`` sends for these keyword arguments."""
    if "json" in request:  # how ``requests`` encodes ``json=``
        return json.dumps(request["json"], allow_nan=False).encode()
    data = request.get("data")
    if isinstance(data, str):
        return data.encode()
    return data if isinstance(data, bytes) else b""


# The credentials of the test settings (the development defaults, which ``serve`` is given
# too): generated requests, explicit examples included, are made when the tests are collected.
CREDENTIALS = Settings()
MEMBER_TOKEN = mint_token(CREDENTIALS, MEMBER, ttl_s=24 * 3600)

api = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # Each operation carries the credentials its security scheme names.
            "auth": {
                "openapi": {
                    "memberJwt": {"bearer": MEMBER_TOKEN},
                    "adminToken": {"bearer": CREDENTIALS.admin_token},
                }
            },
            "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}},
            "generation": {"max-examples": EXAMPLES},
            "operations": [
                {
                    "include-operation-id": "putBenefit",
                    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED_BENEFIT}},
                },
                {  # an event "occurred" in the future: well formed, still refused (422)
                    "include-operation-id": "postBankEvent",
                    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED_BENEFIT}},
                },
                {
                    "include-operation-id": "putPointsRules",
                    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED_BENEFIT}},
                },
                {  # ends_at before starts_at, tiers out of order, a points budget without points
                    "include-operation-id": "putCampaign",
                    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED_BENEFIT}},
                },
            ],
        }
    ),
)


@st.composite
def printable_text(draw: st.DrawFn) -> str:
    """The document's ``printable`` format: no character of categories C* or Z* but the space."""
    alphabet = st.characters(
        exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"),
        include_characters=" ",
    )
    return draw(st.text(alphabet, min_size=1))


schemathesis.openapi.format("printable", printable_text())


async def _reset(settings: Settings) -> None:
    assert settings.redis_url and settings.database_url
    redis = await create_redis(settings.redis_url)
    await redis.flushall()
    await redis.aclose()
    pool = await create_pg_pool(settings.database_url, max_size=1)
    await pool.execute(f"TRUNCATE {TABLES} CASCADE")
    await pool.close()


async def _seed(settings: Settings, ports: Listeners) -> None:
    """What the document's examples point at: a benefit with a direct-charge and a card-key
    option (codes loaded), open, the member at tier 9, the partner of the direct-charge one."""
    period = periods.current_period(settings.tz)
    benefit = {
        "name": "Video membership, monthly card",
        "min_tier": 4,
        "quota": 1000,
        "stock_per_period": 100_000,
        "release": {"type": "once", "opens_at": "2020-01-01T00:00:00+08:00"},
        "options": [
            {"option_id": "iqiyi", "kind": "direct_charge", "partner": PARTNER, "sku": "IQY"},
            {"option_id": "youku", "kind": "card_key"},
        ],
    }
    # No fulfil worker runs: the partner is never called.
    partner = {"base_url": "http://127.0.0.1:9/partner", "secret": PARTNER_SECRET}
    calls: list[tuple[str, str, Any]] = [
        ("PUT", f"/admin/v1/partners/{PARTNER}", partner),
        ("PUT", f"/admin/v1/benefits/{BENEFIT}", benefit),
        ("POST", f"/admin/v1/benefits/{BENEFIT}/options/youku/codes", [f"K{i}" for i in range(50)]),
        ("PUT", f"/admin/v1/tiers/{period}", [{"user_id": MEMBER, "tier": 9}]),
    ]
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, ports.base, ports.admin)
        for method, path, body in calls:
            url = ports.admin + path
            async with http.request(method, url, json=body, headers=admin(settings)) as resp:
                assert resp.status < 300, await resp.text()


@pytest.fixture(scope="module")
def service(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``serve --writer`` on two free ports, over stores emptied for this module."""
    assert (settings.jwt_secret, settings.admin_token) == (
        CREDENTIALS.jwt_secret,
        CREDENTIALS.admin_token,
    )
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    asyncio.run(_reset(settings))
    # No member rate limit here: the fuzzer sends hundreds of claims as one member, and the
    # 429 the limit answers (documented; tests/integration/test_short_circuits.py) would be
    # read as a valid request refused.
    # The bank's event intake is signed like partner callbacks, here with the same secret.
    proc, ports = spawn_serve(
        settings,
        log,
        "--writer",
        CLAIM_RATE_MEMBER_PER_S="0",
        CLAIM_EVENTS_SECRET=PARTNER_SECRET,
    )
    try:
        asyncio.run(_seed(settings, ports))
        yield Service(ports, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@api.parametrize()
def test_every_operation_keeps_to_the_document(case: Case, service: Service) -> None:
    case.call_and_validate(**service.call_kwargs(case))


def test_linked_operations_keep_to_the_document(service: Service) -> None:
    """Scenarios that follow the document's links, e.g. a benefit created, claimed by the
    member, the claim read back by its owner."""
    found: list[FailureGroup] = []
    scenarios = 0

    class Workflow(api.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return service.call_kwargs(case)

        def validate_response(self, response: Any, case: Case, *args: Any, **kwargs: Any) -> None:
            try:
                super().validate_response(response, case, *args, **kwargs)
            except FailureGroup as exc:
                found.append(exc)
                raise

        def teardown(self) -> None:
            nonlocal scenarios
            scenarios += 1
            super().teardown()

    # As schemathesis runs its own scenarios: generated, not shrunk (a replay meets a server
    # that has moved on).
    settings = hypothesis.settings(
        max_examples=EXAMPLES,
        stateful_step_count=8,
        phases=[hypothesis.Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    for session in range(5):
        try:
            hypothesis.seed(SEED + session)(Workflow).run(settings=settings)
            return
        except hypothesis.errors.FlakyStrategyDefinition:
            # What a scenario draws depends on the answers, and the server keeps its state
            # (quota used, stock taken), so Hypothesis can meet a scenario it drew before
            # drawing differently. Schemathesis's own runner starts a fresh session then; so
            # does this, after reporting any failure found meanwhile.
            if found:
                raise found[0] from None
            if scenarios >= EXAMPLES:
                return
    pytest.fail(f"only {scenarios} of {EXAMPLES} scenarios ran: the server's state kept moving")


def test_the_server_logged_no_fault(service: Service) -> None:
    """Runs after the two above (same module, in file order): what they sent left no ERROR."""
    faults = service.server_faults()
    assert not faults, "\n".join(faults[:20])
