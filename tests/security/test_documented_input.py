"""What fuzzing the OpenAPI document found, pinned: for each input the document and the server
must agree, accepted by both or refused by both (and refused the documented way).

- ``option_id`` omitted or null is the benefit's only option; with several it is 409
  ``option_required`` (the body is well formed, the benefit decides), never 400;
- integers may be written ``1000.0`` (JSON Schema's integers include them);
- timestamps are RFC 3339 with an offset (``format: date-time``), nothing looser;
- a partner's ``base_url`` has a host, an existing port, no credentials, query or fragment;
- codes for a direct-charge option are 409 ``not_card_key``; a code is trimmed, then 1-256;
- fields that contradict each other (no schema can say so) are 422;
- query parameters and stored text that broke the service: ``?limit=²`` was a 500, a NUL in
  ``?kind=`` or in a signed callback's ``partner_ref`` a 503.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import jsonschema_rs
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.fulfilment.signing import signed_headers
from claim_service.http.member import openapi_document
from tests.helpers import admin, auth, benefit_body, direct, drain, fast

Client = TestClient[Any, Any]
DOCUMENT: dict[str, Any] = json.loads(openapi_document())
MEMBER = "member-1"
PARTNER = {"base_url": "http://127.0.0.1:9/", "secret": "s" * 32}


def documented(schema: str, value: Any) -> bool:
    """Whether the document's ``components.schemas[schema]`` allows ``value``."""
    root = {"$ref": f"#/components/schemas/{schema}", "components": DOCUMENT["components"]}
    return bool(jsonschema_rs.Draft202012Validator(root, validate_formats=True).is_valid(value))


async def error_of(resp: ClientResponse) -> tuple[int, str | None, str | None]:
    body = await resp.json()
    return resp.status, body.get("error"), body.get("field")


@pytest.fixture
async def members(client: Client, settings: Settings) -> None:
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": MEMBER, "tier": 9}]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))
    assert resp.status == 200, await resp.text()


async def put_benefit(client: Client, settings: Settings, body: Any, benefit: str = "b1") -> Any:
    return await client.put(f"/admin/v1/benefits/{benefit}", json=body, headers=admin(settings))


# -- claims: an option left out ---------------------------------------------------------------


@pytest.mark.parametrize("body", [{"request_id": "r"}, {"request_id": "r", "option_id": None}])
async def test_an_option_left_out_is_the_only_one_or_409(
    client: Client, settings: Settings, members: None, body: dict[str, Any]
) -> None:
    assert documented("ClaimRequest", body)
    two = benefit_body(options=[direct("iqiyi"), direct("tencent")])
    assert (await put_benefit(client, settings, two, "two")).status == 201
    one = benefit_body(options=[direct("iqiyi")])
    assert (await put_benefit(client, settings, one, "one")).status == 201

    resp = await client.post("/v1/benefits/two/claims", json=body, headers=auth(settings, MEMBER))
    reply = await resp.json()
    assert (resp.status, reply["error"], reply["field"]) == (409, "option_required", "option_id")
    assert reply["options"] == ["iqiyi", "tencent"] and reply["benefit_id"] == "two"

    resp = await client.post("/v1/benefits/one/claims", json=body, headers=auth(settings, MEMBER))
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["option_id"] == "iqiyi"
    # A retry with the option named gets the same claim back.
    named = {**body, "option_id": "iqiyi"}
    resp = await client.post("/v1/benefits/one/claims", json=named, headers=auth(settings, MEMBER))
    assert resp.status == 200 and (await resp.json())["replayed"] is True


async def test_an_option_left_out_on_an_unknown_benefit_is_404(
    client: Client, settings: Settings
) -> None:
    resp = await client.post(
        "/v1/benefits/nope/claims", json={"request_id": "r"}, headers=auth(settings, MEMBER)
    )
    assert await error_of(resp) == (404, "unknown_benefit", None)


# -- integers written as 1000.0 -----------------------------------------------------------------


async def test_whole_numbers_written_as_floats_are_integers(
    client: Client, settings: Settings, members: None
) -> None:
    body = benefit_body(stock=10, quota=2.0, options=[direct("iqiyi", stock_cap=5.0)])
    body.update(min_tier=4.0, stock_per_period=10.0)
    assert documented("BenefitInput", body)
    resp = await put_benefit(client, settings, body)
    assert resp.status == 201, await resp.text()
    saved = await resp.json()
    assert (saved["min_tier"], saved["stock_per_period"]) == (4, 10)
    assert saved["quota"] == [{"min_tier": 4, "per_period": 2}]
    assert saved["options"][0]["stock_cap"] == 5

    monthly = {**body, "release": {"type": "monthly", "day": 10.0, "close_day": 20.0}}
    assert (await put_benefit(client, settings, monthly, "b2")).status == 201

    top_up = {"amount": 1000.0}
    assert documented("StockTopUp", top_up)
    resp = await client.post("/admin/v1/benefits/b1/stock", json=top_up, headers=admin(settings))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["added"] == 1000

    period = periods.current_period(settings.tz)
    rows = [{"user_id": "m-float", "tier": 5.0}]
    assert documented("TierSnapshot", rows)
    resp = await client.put(f"/admin/v1/tiers/{period}", json=rows, headers=admin(settings))
    assert resp.status == 200, await resp.text()

    partner = {**PARTNER, "max_in_flight": 32.0, "max_attempts": 3.0, "timeout_s": 2}
    assert documented("PartnerInput", partner)
    resp = await client.put("/admin/v1/partners/p1", json=partner, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["max_attempts"] == 3


@pytest.mark.parametrize("value", [1000.5, 1e-9, "1000", True])
async def test_numbers_that_are_not_whole_are_still_400(
    client: Client, settings: Settings, value: Any
) -> None:
    assert (await put_benefit(client, settings, benefit_body())).status == 201
    top_up = {"amount": value}
    assert not documented("StockTopUp", top_up)
    resp = await client.post("/admin/v1/benefits/b1/stock", json=top_up, headers=admin(settings))
    assert await error_of(resp) == (400, "invalid_request", "amount")


# -- timestamps ----------------------------------------------------------------------------------

TIMESTAMPS = [
    ("2026-12-01T10:00:00+08:00", True),
    ("2026-12-01T02:00:00Z", True),
    ("2026-12-01t02:00:00z", True),
    ("2026-12-01T02:00:00.123456789-03:30", True),
    ("0001-01-01T00:00:01+14:00", True),
    ("9999-12-31T23:59:59-14:00", True),
    ("0", False),
    ("soon", False),
    ("", False),
    ("2026-12-01", False),  # a date is not a timestamp
    ("2026-12-01T10:00:00", False),  # no offset: which zone?
    ("2026-12-01 10:00:00+08:00", False),
    ("2026-12-01T10:00+08:00", False),
    ("2026-02-30T10:00:00+08:00", False),
    ("2026-12-01T24:00:00+08:00", False),
    ("2026-12-01T10:00:00+24:00", False),
    ("2026-12-01T10:00:60+08:00", False),
    ("0000-12-01T10:00:00Z", False),
    ("２０２６-12-01T10:00:00Z", False),  # digits of another script
    ("2026-W49-1T10:00:00Z", False),
]


@pytest.mark.parametrize(("closes_at", "valid"), TIMESTAMPS, ids=repr)
async def test_release_timestamps_are_rfc3339_with_an_offset(
    client: Client, settings: Settings, members: None, closes_at: str, valid: bool
) -> None:
    release = {"type": "once", "opens_at": "0001-01-01T00:00:00+14:00", "closes_at": closes_at}
    body = {**benefit_body(), "release": release}
    assert documented("BenefitInput", body) == valid
    resp = await put_benefit(client, settings, body)
    if valid:
        assert resp.status == 201, await resp.text()
        resp = await client.get("/admin/v1/benefits/b1", headers=admin(settings))
        assert resp.status == 200, await resp.text()
        assert documented("BenefitWithStock", await resp.json())
        resp = await client.get("/v1/benefits", headers=auth(settings, MEMBER))
        assert resp.status == 200, await resp.text()
        assert documented("MemberCatalogue", await resp.json())
        claim = {"request_id": "r", "option_id": "iqiyi"}
        resp = await client.post(
            "/v1/benefits/b1/claims", json=claim, headers=auth(settings, MEMBER)
        )
        assert resp.status in (202, 410), await resp.text()
    else:
        assert await error_of(resp) == (400, "invalid_request", "release.closes_at")
        opens_body = {**body, "release": {"type": "once", "opens_at": closes_at}}
        resp = await put_benefit(client, settings, opens_body)
        assert await error_of(resp) == (400, "invalid_request", "release.opens_at")


EXPIRIES = [(text, valid) for text, valid in TIMESTAMPS if text] + [("", True), (None, True)]


@pytest.mark.parametrize(("expires_at", "valid"), EXPIRIES, ids=repr)
async def test_code_expiries_are_rfc3339_with_an_offset(
    client: Client, settings: Settings, expires_at: str | None, valid: bool
) -> None:
    options = [{"option_id": "keys", "kind": "card_key"}]
    assert (await put_benefit(client, settings, benefit_body(options=options))).status == 201
    batch = [{"code": "C-1", "expires_at": expires_at}]
    assert documented("CodeBatch", batch) == valid
    path = "/admin/v1/benefits/b1/options/keys/codes"
    resp = await client.post(path, json=batch, headers=admin(settings))
    if valid:
        assert resp.status == 200, await resp.text()
    else:
        assert await error_of(resp) == (400, "invalid_request", "[0]")


# -- partners ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "valid"),
    [
        ("http://127.0.0.1:9", True),
        ("HTTPS://Partner.Example:8443/api/v1/", True),
        ("https://a-b.c0.example/p%20q/~x;y=z", True),
        ("http://x:65535", True),
        ("http://", False),
        ("HTTP://", False),
        ("http:///orders", False),
        ("https://:443", False),
        ("http://x:0", False),
        ("http://x:65536", False),
        ("http://x:", False),
        ("http://user:pass@x", False),
        ("http://x/orders?secret=1", False),
        ("http://x/#frag", False),
        ("http://-x", False),
        ("http://x-", False),
        ("http://x..y", False),
        ("http://" + "a" * 64, False),
        ("http://[::1]:8080", False),
        ("http://x/a b", False),
        ("http://ex\u00e4mple.com", False),
        ("ftp://x", False),
    ],
    ids=repr,
)
async def test_partner_base_urls(
    client: Client, settings: Settings, base_url: str, valid: bool
) -> None:
    body = {**PARTNER, "base_url": base_url}
    assert documented("PartnerInput", body) == valid
    resp = await client.put("/admin/v1/partners/p1", json=body, headers=admin(settings))
    if valid:
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["base_url"] == base_url.rstrip("/")
    else:
        assert await error_of(resp) == (400, "invalid_request", "base_url")


# -- card keys ---------------------------------------------------------------------------------


async def test_codes_for_a_direct_charge_option_are_409(client: Client, settings: Settings) -> None:
    options = [direct("iqiyi"), {"option_id": "keys", "kind": "card_key"}]
    assert (await put_benefit(client, settings, benefit_body(options=options))).status == 201
    path = "/admin/v1/benefits/b1/options/iqiyi/codes"
    resp = await client.post(path, json=["C-1"], headers=admin(settings))
    assert await error_of(resp) == (409, "not_card_key", None)


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        ("C-1", True),
        ("  C-1\n", True),
        ("\u3000C\u00a0D\u2028", True),
        ("c" * 256, True),
        (" " * 10 + "c" * 256 + "\t", True),
        ("\x12", True),
        ("\t", False),
        (" \u2028\u3000", False),
        ("", False),
        ("c" * 257, False),
    ],
    ids=repr,
)
async def test_codes_are_trimmed_then_1_to_256(
    client: Client, settings: Settings, code: str, valid: bool
) -> None:
    options = [{"option_id": "keys", "kind": "card_key"}]
    assert (await put_benefit(client, settings, benefit_body(options=options))).status == 201
    for batch in ([code], [{"code": code}], {"codes": [code]}):
        assert documented("CodeBatch", batch) == valid
        path = "/admin/v1/benefits/b1/options/keys/codes"
        resp = await client.post(path, json=batch, headers=admin(settings))
        if valid:
            assert resp.status == 200, await resp.text()
        else:
            assert await error_of(resp) == (400, "invalid_request", "[0]")


# -- fields that contradict each other -------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {
                "release": {
                    "type": "once",
                    "opens_at": "2026-01-01T10:00:00+08:00",
                    "closes_at": "2026-01-01T09:00:00+07:00",
                }
            },
            "release",
        ),
        (
            {
                "release": {
                    "type": "once",
                    "opens_at": "2026-01-01T10:00:00+08:00",
                    "closes_at": "2026-01-01T10:00:00+08:00",
                }
            },
            "release",
        ),
        (
            {
                "release": {
                    "type": "monthly",
                    "day": 10,
                    "time": "10:00",
                    "close_day": 10,
                    "close_time": "09:59:59",
                }
            },
            "release",
        ),
        ({"quota": [{"min_tier": 4, "per_period": 1}, {"min_tier": 4, "per_period": 2}]}, "quota"),
        ({"options": [direct("iqiyi"), direct("iqiyi", sku="other")]}, "options"),
    ],
    ids=repr,
)
async def test_contradicting_fields_are_422(
    client: Client, settings: Settings, change: dict[str, Any], field: str
) -> None:
    body = {**benefit_body(), **change}
    assert documented("BenefitInput", body)  # no schema can tell
    resp = await put_benefit(client, settings, body)
    assert await error_of(resp) == (422, "invalid_request", field)
    resp = await client.get("/admin/v1/benefits/b1", headers=admin(settings))
    assert resp.status == 404


async def test_times_of_day_may_have_seconds(client: Client, settings: Settings) -> None:
    release = {
        "type": "monthly",
        "day": 1,
        "time": "09:30:15",
        "close_day": 2,
        "close_time": "00:00:01",
    }
    body = {**benefit_body(), "release": release}
    assert documented("BenefitInput", body)
    resp = await put_benefit(client, settings, body)
    assert resp.status == 201, await resp.text()
    saved = await resp.json()
    assert documented("Benefit", saved)
    assert (saved["release"]["time"], saved["release"]["close_time"]) == ("09:30:15", "00:00:01")


# -- what broke the service --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status", "field"),
    [
        ("limit=%C2%B2", 400, "limit"),  # "²": a digit to str.isdigit(), not to int()
        ("limit=%EF%BC%91", 400, "limit"),  # a fullwidth 1
        ("limit=1" + "0" * 5000, 400, "limit"),
        ("limit=0", 400, "limit"),
        ("limit=1001", 400, "limit"),
        ("limit=0001000", 200, None),
        ("kind=a%00b", 400, "kind"),
        ("kind=late_partner_success", 200, None),
        ("kind=", 200, None),
        ("kind=Late", 400, "kind"),
    ],
    ids=repr,
)
async def test_anomaly_queries(
    client: Client, settings: Settings, query: str, status: int, field: str | None
) -> None:
    resp = await client.get(f"/admin/v1/anomalies?{query}", headers=admin(settings))
    if status == 200:
        assert resp.status == 200, await resp.text()
    else:
        assert await error_of(resp) == (400, "invalid_request", field)


@pytest.mark.parametrize("field", ["partner_ref", "reason"])
async def test_a_signed_callback_with_a_nul_is_400_not_503(
    client: Client,
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    members: None,
    field: str,
) -> None:
    resp = await client.put("/admin/v1/partners/p1", json=PARTNER, headers=admin(settings))
    assert resp.status == 201
    body = benefit_body(options=[direct("iqiyi", partner="p1")])
    assert (await put_benefit(client, settings, body)).status == 201
    resp = await client.post(
        "/v1/benefits/b1/claims", json={"request_id": "r"}, headers=auth(settings, MEMBER)
    )
    claim_id = (await resp.json())["claim_id"]
    await drain(ClaimWriter(redis, pool, fast(settings)))
    status = "success" if field == "partner_ref" else "failed"
    callback = {"order_id": claim_id, "status": status, field: "ref\x00"}
    assert not documented("PartnerCallback", callback)
    raw = json.dumps(callback).encode()
    resp = await client.post(
        "/v1/partners/p1/callbacks", data=raw, headers=signed_headers(PARTNER["secret"], raw)
    )
    assert await error_of(resp) == (400, "invalid_request", field)
    # Without the NUL the same callback is applied.
    raw = json.dumps({**callback, field: "ref"}).encode()
    resp = await client.post(
        "/v1/partners/p1/callbacks", data=raw, headers=signed_headers(PARTNER["secret"], raw)
    )
    assert resp.status == 200, await resp.text()
