"""Hostile input against the real servers: every bad request gets a 4xx JSON error, never a 500.

Each case checks the exact status and the ``error`` code (and ``field`` where there is one).
Requests the HTTP parser itself refuses are answered in JSON too, and no token they carry
reaches a log. The OpenAPI document is checked against the routes the apps really register,
and hypothesis throws arbitrary JSON at the claim and benefit endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import gzip
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib import resources
from typing import Any

import asyncpg
import hypothesis
import hypothesis.strategies as st
import jwt
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given
from redis.asyncio import Redis
from yarl import URL

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.fulfilment.signing import signed_headers
from claim_service.http import member as api
from claim_service.http.auth import mint_token
from claim_service.http.server import Guard
from claim_service.http.service import create_apps
from tests.helpers import (
    ServiceClient,
    admin,
    auth,
    benefit_body,
    claim_codes,
    hostile_requests,
    send_raw,
    settle,
    setup_codes,
)

Client = TestClient[Any, Any]

MEMBER = "member-1"
BENEFIT = "video"
CLAIMS = f"/v1/benefits/{BENEFIT}/claims"
GOOD_CLAIM = {"request_id": "r-1", "option_id": "iqiyi"}
PUBLIC_PATHS = {"/healthz", "/readyz", "/openapi.json", "/metrics"}
DELETE = object()  # a benefit-body edit that removes the key

# One hypothesis profile for the fuzz tests: the client fixture is shared by all examples.
FUZZ = hypothesis.settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


# -- helpers -------------------------------------------------------------------------------


async def expect_error(
    resp: ClientResponse, status: int, code: str, field: str | None = None
) -> dict[str, Any]:
    """Assert a JSON error of this status and code (and ``field``); return the body."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/json", text
    body = json.loads(text)
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    if field is not None:
        assert body.get("field") == field, body
    return dict(body)


async def expect_json_error(resp: ClientResponse) -> None:
    """Any status below 500; a 4xx must carry the error shape."""
    text = await resp.text()
    assert resp.status < 500, text
    if resp.status >= 400:
        body = json.loads(text)
        assert isinstance(body["error"], str) and isinstance(body["message"], str), body


def listener(client: Client, path: str) -> tuple[str, int]:
    """Host and port of the listener that serves ``path`` (admin or member)."""
    url = client.make_url(path.split("?")[0])
    assert url.host is not None and url.port is not None
    return url.host, url.port


def encoded(client: Client, path: str) -> URL:
    """An absolute URL whose path is sent exactly as written (no re-quoting)."""
    host, port = listener(client, path)
    return URL(f"http://{host}:{port}{path}", encoded=True)


def routes(client: Client) -> list[Any]:
    """Every route of both listeners."""
    apps = [client.app, client.admin_app]  # type: ignore[attr-defined]
    return [route for app in apps for route in app.router.routes()]


async def raw_request(client: Client, request: bytes) -> tuple[int, dict[str, str], Any]:
    """Send bytes the aiohttp client refuses to write; read one response."""
    path = request.split(b" ", 2)[1].decode("latin-1")
    reader, writer = await asyncio.open_connection(*listener(client, path))
    try:
        writer.write(request)
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.strip().split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
        payload = await reader.readexactly(int(headers["content-length"]))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return int(status_line.split()[1]), headers, json.loads(payload)


def http(method: str, path: str, headers: dict[str, bytes], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: localhost", b"Connection: close"]
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    if "Content-Length" not in headers and (body or method in ("POST", "PUT")):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256(header: Any, payload: Any, secret: str) -> str:
    """A JWT signed by hand, so that headers and claims PyJWT would refuse can be made."""
    parts = [h if isinstance(h, bytes) else json.dumps(h).encode() for h in (header, payload)]
    signing_input = f"{b64(parts[0])}.{b64(parts[1])}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def edited(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``body`` with the value at ``path`` replaced (or removed: DELETE)."""
    out = copy.deepcopy(body)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


@pytest.fixture
async def video(client: Client, settings: Settings) -> None:
    """Benefit ``video`` open now with plenty of stock, and MEMBER at tier 9."""
    resp = await client.put(
        f"/admin/v1/benefits/{BENEFIT}", json=benefit_body(stock=1000), headers=admin(settings)
    )
    assert resp.status == 201, await resp.text()
    period = periods.current_period(settings.tz)
    resp = await client.put(
        f"/admin/v1/tiers/{period}", json=[{"user_id": MEMBER, "tier": 9}], headers=admin(settings)
    )
    assert resp.status == 200, await resp.text()


# -- request bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b"{'request_id': 'r'}",
        b'{"request_id": "r",}',
        b'{"request_id": "r"} trailing',
        b"not json",
        b"\xff\xfe\x00{",
        b'{"request_id": NaN}',
        b'{"request_id": 1e999}',
        b'{"request_id": "\\ud800"}',
        b"[" * 5000 + b"]" * 5000,
    ],
    ids=repr,
)
async def test_malformed_json_is_400(
    client: Client, settings: Settings, video: None, raw: bytes
) -> None:
    headers = {**auth(settings, MEMBER), "Content-Type": "application/json"}
    resp = await client.post(CLAIMS, data=raw, headers=headers)
    await expect_error(resp, 400, "invalid_request")


@pytest.mark.parametrize("value", [[], [GOOD_CLAIM], "r-1", 7, 1.5, None, True], ids=repr)
async def test_json_that_is_not_an_object_is_400(
    client: Client, settings: Settings, video: None, value: Any
) -> None:
    resp = await client.post(CLAIMS, data=json.dumps(value), headers=auth(settings, MEMBER))
    body = await expect_error(resp, 400, "invalid_request")
    assert body["message"] == "body must be a JSON object"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"option_id": "iqiyi"}, "request_id"),
        ({"request_id": None}, "request_id"),
        ({"request_id": 1}, "request_id"),
        ({"request_id": 1.5}, "request_id"),
        ({"request_id": True}, "request_id"),
        ({"request_id": ["r"]}, "request_id"),
        ({"request_id": {"id": "r"}}, "request_id"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": "r" * 65}, "request_id"),
        ({"request_id": "a\x00b"}, "request_id"),
        ({"request_id": "a\nb"}, "request_id"),
        ({"request_id": "\x7f"}, "request_id"),
        ({"request_id": "r\u00e9"}, "request_id"),
        ({"request_id": "\U0007033a"}, "request_id"),
        ({"request_id": "r", "account": "\u00e9"}, "account"),
        ({"request_id": "r", "option_id": 1}, "option_id"),
        ({"request_id": "r", "option_id": 0}, "option_id"),
        ({"request_id": "r", "option_id": True}, "option_id"),
        ({"request_id": "r", "option_id": ["iqiyi"]}, "option_id"),
        ({"request_id": "r", "option_id": {"id": "iqiyi"}}, "option_id"),
        ({"request_id": "r", "option_id": "iqiyi", "account": 13800000000}, "account"),
        ({"request_id": "r", "option_id": "iqiyi", "account": False}, "account"),
        ({"request_id": "r", "option_id": "iqiyi", "account": ["a"]}, "account"),
        ({"request_id": "r", "option_id": "iqiyi", "account": {}}, "account"),
        ({"request_id": "r", "option_id": "iqiyi", "account": "a" * 129}, "account"),
        ({"request_id": "r", "option_id": "iqiyi", "account": "a\x00"}, "account"),
        ({"request_id": "r", "option_id": "iqiyi", "account": "\t"}, "account"),
    ],
    ids=repr,
)
async def test_claim_fields_of_the_wrong_shape_are_400(
    client: Client, settings: Settings, video: None, body: dict[str, Any], field: str
) -> None:
    resp = await client.post(CLAIMS, json=body, headers=auth(settings, MEMBER))
    await expect_error(resp, 400, "invalid_request", field)


@pytest.mark.parametrize("option_id", ["", "o" * 65, "nope", "../iqiyi", "iqiyi\n", "IQIYI"])
async def test_option_that_does_not_exist_is_404(
    client: Client, settings: Settings, video: None, option_id: str
) -> None:
    body = {"request_id": "r", "option_id": option_id}
    resp = await client.post(CLAIMS, json=body, headers=auth(settings, MEMBER))
    await expect_error(resp, 404, "unknown_option")


async def test_unknown_keys_and_null_account_are_accepted(
    client: Client, settings: Settings, video: None
) -> None:
    body = {**GOOD_CLAIM, "account": None, "extra": {"nested": [1, 2]}}
    resp = await client.post(CLAIMS, json=body, headers=auth(settings, MEMBER))
    assert resp.status == 202, await resp.text()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_body_that_cannot_be_decoded_is_400(
    client: Client, settings: Settings, video: None, encoding: str
) -> None:
    headers = {
        "Authorization": auth(settings, MEMBER)["Authorization"].encode(),
        "Content-Encoding": encoding.encode(),
    }
    status, _, body = await raw_request(client, http("POST", CLAIMS, headers, b"garbage"))
    assert (status, body["error"]) == (400, "invalid_request"), body


async def test_gzip_body_is_read(client: Client, settings: Settings, video: None) -> None:
    headers = {**auth(settings, MEMBER), "Content-Encoding": "gzip"}
    resp = await client.post(
        CLAIMS, data=gzip.compress(json.dumps(GOOD_CLAIM).encode()), headers=headers
    )
    assert resp.status == 202, await resp.text()


# -- body size -----------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid claim body of exactly ``size`` bytes."""
    base = json.dumps({**GOOD_CLAIM, "pad": ""}).encode()
    return json.dumps({**GOOD_CLAIM, "pad": "x" * (size - len(base))}).encode()


async def chunked(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


async def test_body_at_the_limit_is_read(client: Client, settings: Settings, video: None) -> None:
    body = padded(settings.max_body_bytes)
    assert len(body) == settings.max_body_bytes
    resp = await client.post(CLAIMS, data=body, headers=auth(settings, MEMBER))
    assert resp.status == 202, await resp.text()


async def test_chunked_body_within_the_limit_is_read_whole(
    client: Client, settings: Settings, video: None
) -> None:
    body = padded(settings.max_body_bytes)
    resp = await client.post(CLAIMS, data=chunked(body), headers=auth(settings, MEMBER))
    assert resp.status == 202, await resp.text()


@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
async def test_oversized_claim_body_is_413(
    client: Client, settings: Settings, video: None, transfer: str
) -> None:
    body = padded(settings.max_body_bytes + 1)
    data: Any = body if transfer == "content-length" else chunked(body)
    resp = await client.post(CLAIMS, data=data, headers=auth(settings, MEMBER))
    await expect_error(resp, 413, "payload_too_large")


@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
async def test_oversized_admin_bodies_are_413(
    client: Client, settings: Settings, video: None, transfer: str
) -> None:
    for path, method, limit in [
        (f"/admin/v1/benefits/{BENEFIT}", "PUT", settings.max_body_bytes * 16),
        (f"/admin/v1/benefits/{BENEFIT}/stock", "POST", settings.max_body_bytes),
    ]:
        body = b" " * (limit + 1)
        data: Any = body if transfer == "content-length" else chunked(body, 64 * 1024)
        resp = await client.request(method, path, data=data, headers=admin(settings))
        await expect_error(resp, 413, "payload_too_large")


async def test_oversized_content_length_is_refused_before_the_body(
    client: Client, settings: Settings
) -> None:
    # Only the headers are sent: the declared length alone must be enough to refuse.
    period = periods.current_period(settings.tz)
    headers = {
        "Authorization": admin(settings)["Authorization"].encode(),
        "Content-Length": str(settings.admin_max_body_bytes + 1).encode(),
    }
    request = http("PUT", f"/admin/v1/tiers/{period}", headers)
    status, _, body = await raw_request(client, request)
    assert (status, body["error"]) == (413, "payload_too_large"), body


# -- member credentials --------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "Basic bWVtYmVyOnB3",
        "Token abc",
        "Bearerabc",
        "Bearer abc",
        "Bearer a.b.c",
        "Bearer ...",
        "Bearer " + "x" * 9000,
        "Bearer é",
    ],
    ids=repr,
)
async def test_missing_or_garbled_authorization_is_401(
    client: Client, settings: Settings, video: None, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for resp in (
        await client.get("/v1/benefits", headers=headers),
        await client.post(CLAIMS, json=GOOD_CLAIM, headers=headers),
    ):
        await expect_error(resp, 401, "unauthorized")
        assert resp.headers["WWW-Authenticate"] == "Bearer"


def _tokens(settings: Settings) -> dict[str, str]:
    now = int(time.time())
    good = {"sub": MEMBER, "exp": now + 600}
    header = {"alg": "HS256", "typ": "JWT"}
    secret = settings.jwt_secret
    return {
        "forged": jwt.encode(good, "another-secret-" + "x" * 32, algorithm="HS256"),
        "alg none": jwt.encode(good, "", algorithm="none"),
        "alg none, signed": hs256({"alg": "none"}, good, secret),
        "alg HS512": hs256({"alg": "HS512"}, good, secret),
        "alg RS256 without a key": hs256({"alg": "RS256"}, good, secret),
        "alg is a list": hs256({"alg": ["HS256"]}, good, secret),
        "expired": mint_token(settings, MEMBER, ttl_s=-3600),
        "not yet valid": hs256(header, {**good, "nbf": now + 3600}, secret),
        "no sub": hs256(header, {"exp": now + 600}, secret),
        "sub is a number": hs256(header, {**good, "sub": 42}, secret),
        "sub is a list": hs256(header, {**good, "sub": [MEMBER]}, secret),
        "sub is empty": hs256(header, {**good, "sub": ""}, secret),
        "sub too long": hs256(header, {**good, "sub": "m" * 129}, secret),
        "sub has control characters": hs256(header, {**good, "sub": "m\x00"}, secret),
        "no exp": hs256(header, {"sub": MEMBER}, secret),
        "exp is text": hs256(header, {**good, "exp": "tomorrow"}, secret),
        "exp is infinite": hs256(header, b'{"sub": "member-1", "exp": 1e999}', secret),
        "exp is huge": hs256(header, b'{"sub": "member-1", "exp": 1' + b"0" * 400 + b"}", secret),
        "header not JSON": hs256(b"{not json", good, secret),
        "header a list": hs256([1], good, secret),
        "payload not JSON": hs256(header, b"not json", secret),
        "payload a list": hs256(header, b"[1]", secret),
        "crit header": hs256({**header, "crit": ["exp"]}, good, secret),
        "truncated": mint_token(settings, MEMBER)[:-5],
        "too large": hs256(header, {**good, "pad": "x" * 9000}, secret),
    }


TOKEN_CASES = list(_tokens(Settings()))


@pytest.mark.parametrize("case", TOKEN_CASES)
async def test_rejected_tokens_are_401(
    client: Client, settings: Settings, video: None, case: str
) -> None:
    headers = {"Authorization": f"Bearer {_tokens(settings)[case]}"}
    resp = await client.post(CLAIMS, json=GOOD_CLAIM, headers=headers)
    await expect_error(resp, 401, "unauthorized")


async def test_lowercase_scheme_and_valid_token_pass(
    client: Client, settings: Settings, video: None
) -> None:
    # The control for the cases above: the same request with a good token is accepted.
    token = mint_token(settings, MEMBER)
    resp = await client.post(CLAIMS, json=GOOD_CLAIM, headers={"Authorization": f"bearer {token}"})
    assert resp.status == 202, await resp.text()


@pytest.mark.parametrize("path", ["/v1/benefits", "/admin/v1/benefits"])
async def test_authorization_that_is_not_utf8_is_401(client: Client, path: str) -> None:
    request = http("GET", path, {"Authorization": b"Bearer \xff\xfe\xfd"})
    status, headers, body = await raw_request(client, request)
    assert (status, body["error"]) == (401, "unauthorized"), body
    assert headers["www-authenticate"] == "Bearer"


async def test_every_protected_route_needs_credentials(client: Client, settings: Settings) -> None:
    member_token = auth(settings, MEMBER)["Authorization"]
    checked = 0
    for route in routes(client):
        path = route.resource.canonical if route.resource else ""
        if route.method == "HEAD" or path in PUBLIC_PATHS:
            continue
        url = path.replace("{benefit_id}", BENEFIT).replace("{claim_id}", "0" * 32)
        url = url.replace("{period}", periods.current_period(settings.tz))
        url = url.replace("{partner_id}", "p1").replace("{option_id}", "iqiyi")
        url = url.replace("{zone_id}", "z1").replace("{user_id}", "m1")
        url = url.replace("{campaign_id}", "c1")
        wrong = [{}, {"Authorization": "Bearer wrong"}]
        # Each kind of credential opens only its own door.
        if path.startswith("/admin/"):
            wrong += [
                {"Authorization": member_token},
                {"Authorization": settings.admin_token},
                {"Authorization": f"Basic {settings.admin_token}"},
            ]
        else:
            wrong += [admin(settings)]
        for headers in wrong:
            resp = await client.request(route.method, url, json={}, headers=headers)
            await expect_error(resp, 401, "unauthorized")
        checked += 1
    assert checked >= 12


# -- unknown and odd ids -------------------------------------------------------------------


async def test_unknown_ids_are_404(client: Client, settings: Settings, video: None) -> None:
    member = auth(settings, MEMBER)
    resp = await client.post("/v1/benefits/nope/claims", json=GOOD_CLAIM, headers=member)
    await expect_error(resp, 404, "unknown_benefit")
    resp = await client.post(CLAIMS, json={"request_id": "r", "option_id": "nope"}, headers=member)
    await expect_error(resp, 404, "unknown_option")
    for claim_id in ["0" * 32, "f" * 32, "not-a-claim", "0" * 33]:
        resp = await client.get(f"/v1/claims/{claim_id}", headers=member)
        await expect_error(resp, 404, "unknown_claim")
    ops = admin(settings)
    resp = await client.get("/admin/v1/benefits/nope", headers=ops)
    await expect_error(resp, 404, "unknown_benefit")
    for action in ("pause", "resume"):
        resp = await client.post(f"/admin/v1/benefits/nope/{action}", headers=ops)
        await expect_error(resp, 404, "unknown_benefit")
    resp = await client.post("/admin/v1/benefits/nope/stock", json={"amount": 1}, headers=ops)
    await expect_error(resp, 404, "unknown_benefit")


LONG = "a" * 2000


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        # The router's own {name} matches no braces: such paths match no route at all.
        ("POST", "/v1/benefits/%7Bvideo%7D/claims", 404, "not_found"),
        ("POST", "/v1/benefits/%7B%7D/claims", 404, "not_found"),
        ("POST", "/v1/benefits/video%0A/claims", 404, "unknown_benefit"),
        ("POST", "/v1/benefits/video%00/claims", 404, "unknown_benefit"),
        ("POST", "/v1/benefits/a%2Fb/claims", 404, "unknown_benefit"),
        ("POST", "/v1/benefits/%2e%2e/claims", 404, "unknown_benefit"),
        ("POST", "/v1/benefits/vid%C3%A9o/claims", 404, "unknown_benefit"),
        ("POST", "/v1/benefits/%FF%FE/claims", 404, "unknown_benefit"),
        ("POST", f"/v1/benefits/{LONG}/claims", 404, "unknown_benefit"),
        ("GET", "/v1/claims/%7B%7D", 404, "not_found"),
        ("GET", f"/v1/claims/{'0' * 32}%0A", 404, "unknown_claim"),
        ("GET", "/v1/claims/%00", 404, "unknown_claim"),
        ("GET", f"/v1/claims/{'f' * 5000}", 404, "unknown_claim"),
        ("GET", "/v1/claims/..%2F..%2Fadmin", 404, "unknown_claim"),
    ],
)
async def test_odd_member_path_ids(
    client: Client,
    settings: Settings,
    video: None,
    method: str,
    path: str,
    status: int,
    code: str,
) -> None:
    resp = await client.session.request(
        method, encoded(client, path), json=GOOD_CLAIM, headers=auth(settings, MEMBER)
    )
    await expect_error(resp, status, code)


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "field"),
    [
        ("PUT", "/admin/v1/benefits/video%0A", 400, "invalid_request", "benefit_id"),
        ("PUT", "/admin/v1/benefits/a%20b", 400, "invalid_request", "benefit_id"),
        ("PUT", "/admin/v1/benefits/%2Dvideo", 400, "invalid_request", "benefit_id"),
        ("PUT", f"/admin/v1/benefits/{'a' * 65}", 400, "invalid_request", "benefit_id"),
        ("PUT", "/admin/v1/benefits/%7Bvideo%7D", 404, "not_found", None),
        ("GET", f"/admin/v1/benefits/{LONG}", 400, "invalid_request", "benefit_id"),
        ("GET", "/admin/v1/benefits/%00", 400, "invalid_request", "benefit_id"),
        ("POST", "/admin/v1/benefits/a%2Fb/pause", 400, "invalid_request", "benefit_id"),
        ("POST", "/admin/v1/benefits/%C3%A9/resume", 400, "invalid_request", "benefit_id"),
        ("POST", "/admin/v1/benefits/%0A/stock", 400, "invalid_request", "benefit_id"),
        ("PUT", "/admin/v1/tiers/2024-13", 400, "invalid_request", "period"),
        ("PUT", "/admin/v1/tiers/2024-1", 400, "invalid_request", "period"),
        ("PUT", f"/admin/v1/tiers/{LONG}", 400, "invalid_request", "period"),
        ("PUT", "/admin/v1/tiers/%7B%7D", 404, "not_found", None),
    ],
)
async def test_odd_admin_path_ids(
    client: Client,
    settings: Settings,
    method: str,
    path: str,
    status: int,
    code: str,
    field: str | None,
) -> None:
    body: Any = benefit_body() if "/tiers/" not in path else []
    if path.endswith("/stock"):
        body = {"amount": 1}
    resp = await client.session.request(
        method, encoded(client, path), json=body, headers=admin(settings)
    )
    await expect_error(resp, status, code, field)


BAD_PERIODS = [
    "2024-13",
    "2024-00",
    "24-01",
    "2024-1",
    "abcd-ef",
    "2024-01-01",
    "2024/01",
    " 2024-01",
    "",
    "9" * 1000,
    "2024-01\x00",
]
# "$" would also match before a final newline, and \d any Unicode digit.
LAX_PERIODS = ["2024-01\n", "２０２４-01"]


@pytest.mark.parametrize("period", [*BAD_PERIODS, *LAX_PERIODS], ids=repr)
async def test_bad_period_is_400(
    client: Client, settings: Settings, video: None, period: str
) -> None:
    resp = await client.get(
        "/v1/me/claims", params={"period": period}, headers=auth(settings, MEMBER)
    )
    await expect_error(resp, 400, "invalid_request", "period")
    resp = await client.get(
        f"/admin/v1/benefits/{BENEFIT}", params={"period": period}, headers=admin(settings)
    )
    await expect_error(resp, 400, "invalid_request", "period")


async def test_good_or_absent_period_lists_claims(
    client: Client, settings: Settings, video: None
) -> None:
    member = auth(settings, MEMBER)
    for params, period in [
        ({"period": "2024-01"}, "2024-01"),
        ({}, periods.current_period(settings.tz)),
    ]:
        resp = await client.get("/v1/me/claims", params=params, headers=member)
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"period": period, "claims": []}


# -- admin bodies --------------------------------------------------------------------------

OPTIONS_65 = [{"option_id": f"o{i}", "kind": "card_key"} for i in range(65)]

BAD_BENEFITS: list[tuple[tuple[Any, ...], Any, str]] = [
    (("name",), 1, "name"),
    (("name",), "", "name"),
    (("name",), "n" * 201, "name"),
    (("name",), "a\x00b", "name"),
    (("name",), "line\nbreak", "name"),
    (("min_tier",), DELETE, "min_tier"),
    (("min_tier",), None, "min_tier"),
    (("min_tier",), -1, "min_tier"),
    (("min_tier",), 100, "min_tier"),
    (("min_tier",), "4", "min_tier"),
    (("min_tier",), 4.5, "min_tier"),
    (("min_tier",), True, "min_tier"),
    (("quota",), None, "quota"),
    (("quota",), "1", "quota"),
    (("quota",), [], "quota"),
    (("quota",), {}, "quota"),
    (("quota",), True, "quota"),
    (("quota",), -1, "quota"),
    (("quota",), 1001, "quota"),
    (("quota",), [1], "quota[0]"),
    (("quota", 1, "per_period"), DELETE, "quota[1].per_period"),
    (("quota", 1, "per_period"), 1001, "quota[1].per_period"),
    (("quota", 0, "min_tier"), 100, "quota[0].min_tier"),
    (("quota", 0, "min_tier"), "4", "quota[0].min_tier"),
    (("stock_per_period",), DELETE, "stock_per_period"),
    (("stock_per_period",), -1, "stock_per_period"),
    (("stock_per_period",), 1_000_000_001, "stock_per_period"),
    (("stock_per_period",), "10", "stock_per_period"),
    (("stock_per_period",), 1.5, "stock_per_period"),
    (("stock_per_period",), [], "stock_per_period"),
    (("release",), DELETE, "release"),
    (("release",), [], "release"),
    (("release",), "monthly", "release"),
    (("release",), {}, "release.type"),
    (("release",), {"type": "weekly", "day": 1}, "release.type"),
    (("release",), {"type": "monthly"}, "release.day"),
    (("release",), {"type": "monthly", "day": 0}, "release.day"),
    (("release",), {"type": "monthly", "day": 32}, "release.day"),
    (("release",), {"type": "monthly", "day": "1"}, "release.day"),
    (("release",), {"type": "monthly", "day": 1, "time": "24:00"}, "release.time"),
    (("release",), {"type": "monthly", "day": 1, "time": "9:00"}, "release.time"),
    (("release",), {"type": "monthly", "day": 1, "time": "09:60"}, "release.time"),
    (("release",), {"type": "monthly", "day": 1, "time": "09:00\n"}, "release.time"),
    (("release",), {"type": "monthly", "day": 1, "time": 900}, "release.time"),
    (("release",), {"type": "monthly", "day": 1, "time": None}, "release.time"),
    (("release",), {"type": "monthly", "day": 1, "close_day": 0}, "release.close_day"),
    (
        ("release",),
        {"type": "monthly", "day": 1, "close_day": 2, "close_time": "25:00"},
        "release.close_time",
    ),
    (("release",), {"type": "once"}, "release.opens_at"),
    (("release",), {"type": "once", "opens_at": "yesterday"}, "release.opens_at"),
    (("release",), {"type": "once", "opens_at": 1_700_000_000}, "release.opens_at"),
    (("release",), {"type": "once", "opens_at": "2026-02-30T00:00:00"}, "release.opens_at"),
    (
        ("release",),
        {"type": "once", "opens_at": "2026-01-01T10:00:00+08:00", "closes_at": "soon"},
        "release.closes_at",
    ),
    (("paused",), "yes", "paused"),
    (("paused",), 1, "paused"),
    (("paused",), None, "paused"),
    (("options",), DELETE, "options"),
    (("options",), [], "options"),
    (("options",), "iqiyi", "options"),
    (("options",), {"option_id": "iqiyi"}, "options"),
    (("options",), OPTIONS_65, "options"),
    (("options", 0), "iqiyi", "options[0]"),
    (("options", 0, "option_id"), DELETE, "options[0].option_id"),
    (("options", 0, "option_id"), "a b", "options[0].option_id"),
    (("options", 0, "option_id"), 7, "options[0].option_id"),
    (("options", 0, "option_id"), "o" * 65, "options[0].option_id"),
    (("options", 0, "option_id"), "-lead", "options[0].option_id"),
    (("options", 1, "kind"), "gift", "options[1].kind"),
    (("options", 1, "kind"), None, "options[1].kind"),
    (("options", 1, "kind"), ["card_key"], "options[1].kind"),
    (("options", 0, "partner"), DELETE, "options[0].partner"),
    (("options", 0, "partner"), "bad id!", "options[0].partner"),
    (("options", 0, "partner"), 5, "options[0].partner"),
    (("options", 0, "sku"), DELETE, "options[0].sku"),
    (("options", 0, "sku"), "", "options[0].sku"),
    (("options", 0, "sku"), "s" * 129, "options[0].sku"),
    (("options", 0, "sku"), "a\tb", "options[0].sku"),
    (("options", 1, "stock_cap"), -1, "options[1].stock_cap"),
    (("options", 1, "stock_cap"), "5", "options[1].stock_cap"),
    (("options", 1, "stock_cap"), 1_000_000_001, "options[1].stock_cap"),
    (("options", 1, "name"), 7, "options[1].name"),
]


@pytest.mark.parametrize(
    ("path", "value", "field"),
    BAD_BENEFITS,
    ids=[f"{'.'.join(map(str, p))}={v!r:.40}" for p, v, _ in BAD_BENEFITS],
)
async def test_bad_benefit_json_is_400_naming_the_field(
    client: Client, settings: Settings, path: tuple[Any, ...], value: Any, field: str
) -> None:
    body = edited(benefit_body(), path, value)
    resp = await client.put("/admin/v1/benefits/b1", json=body, headers=admin(settings))
    await expect_error(resp, 400, "invalid_request", field)
    resp = await client.get("/admin/v1/benefits/b1", headers=admin(settings))
    await expect_error(resp, 404, "unknown_benefit")


@pytest.mark.parametrize("value", [[], [benefit_body()], "benefit", 1, None], ids=repr)
async def test_benefit_that_is_not_an_object_is_400(
    client: Client, settings: Settings, value: Any
) -> None:
    resp = await client.put(
        "/admin/v1/benefits/b1", data=json.dumps(value), headers=admin(settings)
    )
    await expect_error(resp, 400, "invalid_request")


@pytest.mark.parametrize(
    ("release", "statuses"),
    [
        ({"type": "once", "opens_at": "0001-01-01T00:00:00+14:00"}, {202}),
        ({"type": "once", "opens_at": "9999-12-31T23:59:59-14:00"}, {425}),
        (
            {
                "type": "once",
                "opens_at": "2000-01-01T00:00:00+08:00",
                "closes_at": "9999-12-31T23:59:59.99+08:00",
            },
            {202},
        ),
        # Day 31 means the month's last day; which side of the window "now" is depends on
        # the date the test runs.
        (
            {"type": "monthly", "day": 31, "time": "23:58", "close_day": 31, "close_time": "23:59"},
            {425, 202, 410},
        ),
        (
            {"type": "monthly", "day": 1, "time": "00:00", "close_day": 31, "close_time": "23:59"},
            {202, 410},
        ),
    ],
    ids=repr,
)
async def test_extreme_but_valid_releases_never_break_reads(
    client: Client, settings: Settings, video: None, release: dict[str, Any], statuses: set[int]
) -> None:
    body = {**benefit_body(), "release": release}
    resp = await client.put("/admin/v1/benefits/edge", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    for path, headers in [
        ("/admin/v1/benefits/edge", admin(settings)),
        ("/admin/v1/benefits", admin(settings)),
        ("/v1/benefits", auth(settings, MEMBER)),
    ]:
        resp = await client.get(path, headers=headers)
        assert resp.status == 200, await resp.text()
    resp = await client.post(
        "/v1/benefits/edge/claims", json=GOOD_CLAIM, headers=auth(settings, MEMBER)
    )
    assert resp.status in statuses, await resp.text()
    await expect_json_error(resp)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, None),
        ({"tiers": "alice"}, None),
        ({"tiers": None}, None),
        ("alice", None),
        (5, None),
        (None, None),
        ([1], "[0]"),
        ([[MEMBER, 5]], "[0]"),
        ([{"user_id": 1, "tier": 1}], "[0]"),
        ([{"user_id": "a", "tier": -1}], "[0]"),
        ([{"user_id": "a", "tier": 100}], "[0]"),
        ([{"user_id": "a", "tier": "1"}], "[0]"),
        ([{"user_id": "a", "tier": True}], "[0]"),
        ([{"user_id": "a", "tier": 1.5}], "[0]"),
        ([{"user_id": "a"}], "[0]"),
        ([{"user_id": "", "tier": 1}], "[0]"),
        ([{"user_id": "u" * 129, "tier": 1}], "[0]"),
        ([{"user_id": "a\x00", "tier": 1}], "[0]"),
        ([{"user_id": "a\nb", "tier": 1}], "[0]"),
        ([{"user_id": "ok", "tier": 1}, {"user_id": "b"}], "[1]"),
        ({"tiers": [{"user_id": "a"}]}, "[0]"),
    ],
    ids=repr,
)
async def test_bad_tiers_are_400(
    client: Client, settings: Settings, body: Any, field: str | None
) -> None:
    period = periods.current_period(settings.tz)
    resp = await client.put(
        f"/admin/v1/tiers/{period}", data=json.dumps(body), headers=admin(settings)
    )
    error = await expect_error(resp, 400, "invalid_request", field)
    if field is None:
        assert "field" not in error


async def test_malformed_tiers_json_is_400(client: Client, settings: Settings) -> None:
    period = periods.current_period(settings.tz)
    resp = await client.put(
        f"/admin/v1/tiers/{period}", data=b'[{"user_id": "a", "tier": 1}', headers=admin(settings)
    )
    await expect_error(resp, 400, "invalid_request")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "amount"),
        ({"amount": 0}, "amount"),
        ({"amount": -1}, "amount"),
        ({"amount": 1_000_000_001}, "amount"),
        ({"amount": "5"}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": None}, "amount"),
        ({"amount": [5]}, "amount"),
        ({"amount": 1, "period": "2024-13"}, "period"),
        ({"amount": 1, "period": "2024-1"}, "period"),
        ({"amount": 1, "period": ""}, "period"),
        ({"amount": 1, "period": 202401}, "period"),
        ({"amount": 1, "period": ["2024-01"]}, "period"),
        ({"amount": 1, "note": 1}, "note"),
        ({"amount": 1, "note": "n" * 501}, "note"),
        ({"amount": 1, "note": "a\x00b"}, "note"),
    ],
    ids=repr,
)
async def test_bad_stock_top_up_is_400(
    client: Client, settings: Settings, video: None, body: dict[str, Any], field: str
) -> None:
    resp = await client.post(
        f"/admin/v1/benefits/{BENEFIT}/stock", json=body, headers=admin(settings)
    )
    await expect_error(resp, 400, "invalid_request", field)
    resp = await client.get(f"/admin/v1/benefits/{BENEFIT}", headers=admin(settings))
    assert (await resp.json())["stock"]["added"] == 0


# -- fulfilment routes ---------------------------------------------------------------------

PARTNER = {"base_url": "http://127.0.0.1:9/", "secret": "s" * 32}


@pytest.fixture
async def partner(client: Client, settings: Settings) -> str:
    resp = await client.put("/admin/v1/partners/p1", json=PARTNER, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    return "/v1/partners/p1/callbacks"


async def test_partner_callback_needs_a_valid_signature(
    client: Client, settings: Settings, partner: str
) -> None:
    body = json.dumps({"order_id": "0" * 32, "status": "success"}).encode()
    good = signed_headers(PARTNER["secret"], body)
    for path, headers in [
        ("/v1/partners/nope/callbacks", good),
        ("/v1/partners/bad%20id/callbacks", good),
        (partner, {}),
        (partner, {**good, "X-Claim-Signature": "00" * 32}),
        (partner, {**good, "X-Claim-Signature": "not hex at all"}),
        (partner, {**good, "X-Claim-Timestamp": "yesterday"}),
        (partner, signed_headers(PARTNER["secret"], body, now=time.time() - 3600)),
        (partner, signed_headers("another-secret-" + "x" * 20, body)),
        (partner, admin(settings)),
    ]:
        resp = await client.session.post(encoded(client, path), data=body, headers=headers)
        await expect_error(resp, 401, "unauthorized")


async def test_partner_callback_with_an_absurd_timestamp_is_401(
    client: Client, partner: str
) -> None:
    body = json.dumps({"order_id": "0" * 32, "status": "success"}).encode()
    headers = {**signed_headers(PARTNER["secret"], body), "X-Claim-Timestamp": "1" + "0" * 400}
    resp = await client.post(partner, data=body, headers=headers)
    await expect_error(resp, 401, "unauthorized")


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (b"{", 400, "invalid_request", None),
        (b"[]", 400, "invalid_request", None),
        (b'{"status": "success"}', 404, "unknown_order", None),
        (b'{"order_id": 5, "status": "success"}', 404, "unknown_order", None),
        (b'{"order_id": "../x", "status": "success"}', 404, "unknown_order", None),
        (b'{"order_id": "' + b"0" * 32 + b'", "status": "success"}', 404, "unknown_order", None),
        (b'{"order_id": "' + b"0" * 32 + b'", "status": "done"}', 400, "invalid_request", "status"),
        (
            b'{"order_id": "' + b"0" * 32 + b'", "status": ["success"]}',
            400,
            "invalid_request",
            "status",
        ),
        (
            b'{"order_id": "' + b"0" * 32 + b'", "status": "failed", "reason": 5}',
            400,
            "invalid_request",
            "reason",
        ),
        (
            b'{"order_id": "'
            + b"0" * 32
            + b'", "status": "failed", "partner_ref": "'
            + b"r" * 201
            + b'"}',
            400,
            "invalid_request",
            "partner_ref",
        ),
    ],
    ids=repr,
)
async def test_signed_callback_with_a_bad_body(
    client: Client, partner: str, body: bytes, status: int, code: str, field: str | None
) -> None:
    resp = await client.post(partner, data=body, headers=signed_headers(PARTNER["secret"], body))
    await expect_error(resp, status, code, field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], None),
        ({"secret": "s" * 32}, "base_url"),
        ({**PARTNER, "base_url": "ftp://files.example"}, "base_url"),
        ({**PARTNER, "base_url": "http://"}, "base_url"),
        ({**PARTNER, "base_url": 80}, "base_url"),
        ({**PARTNER, "base_url": "http://x/" + "p" * 500}, "base_url"),
        ({"base_url": PARTNER["base_url"]}, "secret"),
        ({**PARTNER, "secret": "s" * 15}, "secret"),
        ({**PARTNER, "secret": "s" * 513}, "secret"),
        ({**PARTNER, "secret": 12345678901234567890}, "secret"),
        ({**PARTNER, "timeout_s": 0}, "timeout_s"),
        ({**PARTNER, "timeout_s": 30.5}, "timeout_s"),
        ({**PARTNER, "timeout_s": "5"}, "timeout_s"),
        ({**PARTNER, "timeout_s": True}, "timeout_s"),
        ({**PARTNER, "max_in_flight": 0}, "max_in_flight"),
        ({**PARTNER, "max_in_flight": 1001}, "max_in_flight"),
        ({**PARTNER, "max_in_flight": 1.5}, "max_in_flight"),
        ({**PARTNER, "max_attempts": 51}, "max_attempts"),
        ({**PARTNER, "base_url": "http://[::1"}, "base_url"),
        ({**PARTNER, "base_url": "http://a\x00b"}, "base_url"),
        ({**PARTNER, "base_url": "http://host:99999"}, "base_url"),
    ],
    ids=repr,
)
async def test_bad_partner_config_is_400(
    client: Client, settings: Settings, body: Any, field: str | None
) -> None:
    resp = await client.put("/admin/v1/partners/p1", json=body, headers=admin(settings))
    await expect_error(resp, 400, "invalid_request", field)
    resp = await client.get("/admin/v1/partners/p1", headers=admin(settings))
    await expect_error(resp, 404, "unknown_partner")


@pytest.mark.parametrize(
    ("option_id", "body", "status", "code", "field"),
    [
        ("keys", {}, 400, "invalid_request", None),
        ("keys", [], 400, "invalid_request", None),
        ("keys", {"codes": "ABC"}, 400, "invalid_request", None),
        ("keys", [1], 400, "invalid_request", "[0]"),
        ("keys", ["ok", ""], 400, "invalid_request", "[1]"),
        ("keys", ["   "], 400, "invalid_request", "[0]"),
        ("keys", ["c" * 257], 400, "invalid_request", "[0]"),
        ("keys", [{"code": None}], 400, "invalid_request", "[0]"),
        ("keys", [{"code": "ok", "secret": 5}], 400, "invalid_request", "[0]"),
        ("keys", [{"code": "ok", "expires_at": "soon"}], 400, "invalid_request", "[0]"),
        ("keys", [{"code": "ok", "expires_at": 1_700_000_000}], 400, "invalid_request", "[0]"),
        ("iqiyi", ["ok"], 409, "not_card_key", None),  # not a card_key option
        ("nope", ["ok"], 404, "unknown_option", None),
        ("bad%20id", ["ok"], 400, "invalid_request", "option_id"),
    ],
    ids=repr,
)
async def test_bad_code_batches(
    client: Client,
    settings: Settings,
    option_id: str,
    body: Any,
    status: int,
    code: str,
    field: str | None,
) -> None:
    options = [
        {"option_id": "iqiyi", "kind": "direct_charge", "partner": "p1", "sku": "S"},
        {"option_id": "keys", "kind": "card_key"},
    ]
    resp = await client.put(
        "/admin/v1/benefits/cards", json=benefit_body(options=options), headers=admin(settings)
    )
    assert resp.status == 201, await resp.text()
    path = f"/admin/v1/benefits/cards/options/{option_id}/codes"
    resp = await client.session.post(
        encoded(client, path), data=json.dumps(body), headers=admin(settings)
    )
    await expect_error(resp, status, code, field)
    resp = await client.get("/admin/v1/benefits/cards/codes", headers=admin(settings))
    assert (await resp.json())["pools"] == []


@pytest.mark.parametrize("claim_id", ["0" * 32, "not-a-claim", "%7B%7D", "0" * 32 + "%0A", LONG])
async def test_unknown_claims_for_ops_are_404(
    client: Client, settings: Settings, claim_id: str
) -> None:
    code = "not_found" if claim_id == "%7B%7D" else "unknown_claim"
    for method, suffix in [("GET", ""), ("POST", "/retry"), ("POST", "/refund")]:
        path = f"/admin/v1/claims/{claim_id}{suffix}"
        resp = await client.session.request(method, encoded(client, path), headers=admin(settings))
        await expect_error(resp, 404, code)


async def test_signature_that_is_not_ascii_is_401(client: Client, partner: str) -> None:
    body = json.dumps({"order_id": "0" * 32, "status": "success"}).encode()
    good = signed_headers(PARTNER["secret"], body)
    for signature in ["é" + good["X-Claim-Signature"][1:], "İ" * 64, "ｆ" * 64]:
        headers = {
            "X-Claim-Timestamp": good["X-Claim-Timestamp"].encode(),
            "X-Claim-Signature": signature.encode(),
        }
        status, _, reply = await raw_request(client, http("POST", partner, headers, body))
        assert (status, reply["error"]) == (401, "unauthorized"), reply


# -- what the HTTP parser refuses, and what reaches the logs ----------------------------------


async def test_parser_rejections_are_json_and_no_token_reaches_a_log(
    client: Client, settings: Settings, partner: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = mint_token(settings, MEMBER)
    for _ in range(3):
        for request, status in hostile_requests(token, settings.admin_token, PARTNER["secret"]):
            path = request.split(b" ", 2)[1].decode("latin-1")
            await send_raw(*listener(client, path), request, status)
    await asyncio.sleep(0.2)  # the last hang-up reaches the server
    for secret in (token, settings.admin_token, PARTNER["secret"], token[:40]):
        assert secret not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "backend" not in caplog.text  # a client hanging up is not an outage
    assert "Traceback" not in caplog.text
    # Each refusal is one short line below ERROR.
    assert "client sent a malformed request (400): too many headers" in caplog.text
    assert "client sent a malformed request (400): a request line or header is too long" in (
        caplog.text
    )


async def test_custom_header_limit_still_applies(client: Client, settings: Settings) -> None:
    # aiohttp's own limit is 8190 bytes; tokens may be longer, so the service sets 16 KiB.
    for size, status in [(12_000, 401), (17_000, 400)]:
        request = http("GET", "/v1/benefits", {"Authorization": b"Bearer " + b"x" * size})
        got, _, reply = await raw_request(client, request)
        assert got == status, reply


# -- misconfiguration ------------------------------------------------------------------------


async def test_a_wrong_codes_key_is_503_and_one_line_for_ops(
    client: Client,
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    partner: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await setup_codes(client, settings, codes=1)
    (claimed,) = await claim_codes(client, settings, range(1))
    await settle(settings, redis, pool)
    path = f"/v1/claims/{claimed['claim_id']}"
    resp = await client.get(path, headers=auth(settings, "u0"))
    assert (await resp.json())["voucher"]["code"]  # readable with the right key

    wrong = replace(settings, codes_key="11" * 32)
    member, ops = create_apps(wrong, pools=(redis, pool))
    async with ServiceClient(member, ops, Guard.for_process(wrong)) as misconfigured:
        body = json.dumps({"order_id": "0" * 32, "status": "success"}).encode()
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", path, {"headers": auth(settings, "u0")}),
            ("POST", partner, {"data": body, "headers": signed_headers(PARTNER["secret"], body)}),
            ("GET", "/admin/v1/partners/p1", {"headers": admin(settings)}),
        ]
        for method, url, kwargs in calls:
            caplog.clear()
            resp = await misconfigured.request(method, url, **kwargs)
            await expect_error(resp, 503, "unavailable")
            lines = [r for r in caplog.records if "CLAIM_CODES_KEY" in r.getMessage()]
            assert len(lines) == 1 and lines[0].exc_info is None, caplog.text


# -- the OpenAPI document ------------------------------------------------------------------


def openapi_file() -> dict[str, Any]:
    return dict(json.loads((resources.files("claim_service.http") / "openapi.json").read_bytes()))


async def test_openapi_is_served_from_the_file(client: Client) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == openapi_file()


async def test_openapi_documents_every_route_and_nothing_else(client: Client) -> None:
    doc = openapi_file()
    assert doc["openapi"].startswith("3.1.")
    registered = {
        (route.resource.canonical, route.method.lower())
        for route in routes(client)
        if route.method != "HEAD" and route.resource is not None
    }
    verbs = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    documented = {
        (path, method) for path, item in doc["paths"].items() for method in item if method in verbs
    }
    assert registered == documented


def test_openapi_documents_the_errors_routes_can_give() -> None:
    doc = openapi_file()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["memberJwt"]["scheme"] == schemes["adminToken"]["scheme"] == "bearer"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in ("parameters", "servers"):
                continue
            responses = op["responses"]
            security = op.get("security", doc["security"])
            if security:
                assert "401" in responses and "503" in responses, (path, method)
            if "requestBody" in op:
                assert "400" in responses and "413" in responses, (path, method)
    claim = doc["paths"]["/v1/benefits/{benefit_id}/claims"]["post"]["responses"]
    for status, code in [
        *api.REJECTIONS.values(),
        (404, "unknown_benefit"),
        (403, "admission_required"),
    ]:
        schema = claim[str(status)]["content"]["application/json"]["schema"]
        codes = set()
        for branch in schema.get("oneOf", [schema]):  # one status may have several shapes
            error = branch["allOf"][1]["properties"]["error"]
            codes.update(error.get("enum", [error.get("const")]))
        assert code in codes, (status, code)
    assert {"200", "202"} <= set(claim)
    not_open = claim["425"]["content"]["application/json"]["schema"]["allOf"][1]
    assert "opens_at" in not_open["required"]


# -- fuzzing -------------------------------------------------------------------------------

claim_like = st.dictionaries(
    st.sampled_from(["request_id", "option_id", "account"]) | st.text(max_size=8),
    json_values | st.sampled_from(["iqiyi", "tencent", "r-1", ""]),
    max_size=4,
)
BENEFIT_PATHS: list[tuple[Any, ...]] = [
    (k,) for k in ("name", "min_tier", "quota", "stock_per_period", "release", "paused", "options")
] + [
    ("quota", 0),
    ("quota", 1, "min_tier"),
    ("quota", 0, "per_period"),
    ("release", "type"),
    ("release", "opens_at"),
    ("release", "closes_at"),
    ("release", "day"),
    ("release", "time"),
    ("release", "close_day"),
    ("release", "close_time"),
    ("options", 0),
    ("options", 1),
    ("options", 0, "option_id"),
    ("options", 0, "kind"),
    ("options", 0, "partner"),
    ("options", 0, "sku"),
    ("options", 1, "stock_cap"),
    ("options", 1, "name"),
    ("options", 1, "kind"),
]
benefit_edits = st.lists(
    st.tuples(st.sampled_from(BENEFIT_PATHS), json_values | st.just(DELETE)),
    min_size=1,
    max_size=3,
)


def apply_edits(body: dict[str, Any], edits: list[tuple[tuple[Any, ...], Any]]) -> Any:
    for path, value in edits:
        with contextlib.suppress(KeyError, IndexError, TypeError):
            body = edited(body, path, value)
    return body


async def check_catalogue_reads(client: Client, settings: Settings, benefit_id: str) -> None:
    """After a benefit was accepted, every read that involves it still works."""
    resp = await client.get(f"/admin/v1/benefits/{benefit_id}", headers=admin(settings))
    assert resp.status == 200, await resp.text()
    resp = await client.get("/v1/benefits", headers=auth(settings, MEMBER))
    assert resp.status == 200, await resp.text()
    resp = await client.post(
        f"/v1/benefits/{benefit_id}/claims",
        json={"request_id": "fuzz"},
        headers=auth(settings, MEMBER),
    )
    await expect_json_error(resp)


@FUZZ
@given(body=json_values | claim_like)
async def test_fuzz_claim_body_never_500(
    client: Client, settings: Settings, video: None, body: Any
) -> None:
    resp = await client.post(CLAIMS, data=json.dumps(body), headers=auth(settings, MEMBER))
    await expect_json_error(resp)


@FUZZ
@given(body=json_values)
async def test_fuzz_benefit_body_never_500(client: Client, settings: Settings, body: Any) -> None:
    resp = await client.put(
        "/admin/v1/benefits/fuzz", data=json.dumps(body), headers=admin(settings)
    )
    await expect_json_error(resp)


@FUZZ
@given(edits=benefit_edits)
async def test_fuzz_benefit_fields_never_500(
    client: Client, settings: Settings, edits: list[tuple[tuple[Any, ...], Any]]
) -> None:
    body = apply_edits(benefit_body(), edits)
    resp = await client.put(
        "/admin/v1/benefits/fuzz", data=json.dumps(body), headers=admin(settings)
    )
    await expect_json_error(resp)
    if resp.status < 300:
        await check_catalogue_reads(client, settings, "fuzz")


@FUZZ
@given(body=json_values, amount=json_values)
async def test_fuzz_admin_bodies_never_500(
    client: Client, settings: Settings, video: None, body: Any, amount: Any
) -> None:
    period = periods.current_period(settings.tz)
    ops = admin(settings)
    for method, path, data in [
        ("PUT", f"/admin/v1/tiers/{period}", body),
        ("POST", f"/admin/v1/benefits/{BENEFIT}/stock", body),
        ("POST", f"/admin/v1/benefits/{BENEFIT}/stock", {"amount": amount, "note": body}),
    ]:
        resp = await client.request(method, path, data=json.dumps(data), headers=ops)
        await expect_json_error(resp)


async def test_wrong_method_is_405_with_allow(client: Client) -> None:
    resp = await client.request("TRACE", "/v1/benefits/video/claims")
    assert resp.status == 405
    assert "POST" in resp.headers["Allow"]
    assert (await resp.json())["error"] == "method_not_allowed"
