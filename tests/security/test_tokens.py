"""Member tokens under attack, against the real application in its three configurations:
HS256 with ``CLAIM_JWT_SECRET``; a gateway's RS256 key (``CLAIM_JWT_PUBLIC_KEY``) alone; the
gateway's key and an explicitly configured secret.

Every forged, unsigned, mis-keyed, expired, not-yet-valid, oversized or ill-addressed token
is 401 with a JSON body, nothing is logged at ERROR and no token reaches a log. Key
locations a token names (``jku``, ``x5u``) are never fetched, and neither they nor ``kid``,
``jwk`` or ``x5c`` choose the key: only the configured one verifies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, RSAPSSAlgorithm
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.http.auth import MAX_TOKEN_BYTES
from claim_service.http.server import Guard
from claim_service.http.service import create_apps
from tests.helpers import ServiceClient

Client = TestClient[Any, Any]
MEMBER = "member-1"
EXPLICIT_SECRET = "a-secret-configured-by-ops-0123456789"
# Routes that read the token first: one that reads nothing else, one that reads PostgreSQL.
ROUTES = ("/v1/benefits", "/v1/me/claims")


def _pem(key: rsa.RSAPublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


GATEWAY_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
GATEWAY_PEM = _pem(GATEWAY_KEY.public_key())
ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_EC_KEY = ec.generate_private_key(ec.SECP256R1())
RS256 = RSAAlgorithm(RSAAlgorithm.SHA256)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def segment(part: Any) -> str:
    return b64(part if isinstance(part, bytes) else json.dumps(part).encode())


Signer = Callable[[bytes], bytes]


def token(header: Any, payload: Any, sign: Signer | None = None) -> str:
    """A JWT assembled by hand, so that what PyJWT would refuse to make can be made."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def hs(secret: str | bytes, digest: str = "sha256") -> Signer:
    key = secret.encode() if isinstance(secret, str) else secret
    return lambda message: hmac.new(key, message, getattr(hashlib, digest)).digest()


def rs(key: rsa.RSAPrivateKey) -> Signer:
    return lambda message: RS256.sign(message, key)


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": MEMBER, "iat": now, "exp": now + 600, **changes}
    return {k: v for k, v in payload.items() if v is not DROP}


DROP = object()
HS = {"alg": "HS256", "typ": "JWT"}
RS = {"alg": "RS256", "typ": "JWT"}


def attacker_jwk() -> dict[str, Any]:
    return dict(json.loads(RSAAlgorithm.to_jwk(ATTACKER_KEY.public_key())))


# -- the attacks ---------------------------------------------------------------------------
# Each makes a token from (the configured secret, the URL of a trap that records any fetch).
Attack = Callable[[str, str], str]

COMMON: dict[str, Attack] = {
    "alg none, unsigned": lambda s, u: token({"alg": "none"}, claims()),
    "alg None, unsigned": lambda s, u: token({"alg": "None"}, claims()),
    "alg NONE, unsigned": lambda s, u: token({"alg": "NONE"}, claims()),
    "alg none, signed with the secret": lambda s, u: token({"alg": "none"}, claims(), hs(s)),
    "alg none, no signature segment": lambda s, u: token({"alg": "none"}, claims())[:-1],
    "alg hs256 in lower case": lambda s, u: token({"alg": "hs256"}, claims(), hs(s)),
    "HS384 with the secret": lambda s, u: token({"alg": "HS384"}, claims(), hs(s, "sha384")),
    "HS512 with the secret": lambda s, u: token({"alg": "HS512"}, claims(), hs(s, "sha512")),
    "HS256 with an empty key": lambda s, u: token(HS, claims(), hs("")),
    "HS256 with a wrong key": lambda s, u: token(HS, claims(), hs("not-the-secret-" + "x" * 32)),
    "HS256 signature stripped": lambda s, u: token(HS, claims(), hs(s)).rsplit(".", 1)[0] + ".",
    "HS256 signature of another payload": lambda s, u: (
        token(HS, claims()).rsplit(".", 1)[0]
        + "."
        + token(HS, claims(sub="someone-else"), hs(s)).rsplit(".", 1)[1]
    ),
    "RS256 signed by an unknown key": lambda s, u: token(RS, claims(), rs(ATTACKER_KEY)),
    "PS256 signed by an unknown key": lambda s, u: token(
        {"alg": "PS256"},
        claims(),
        lambda m: RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256).sign(m, ATTACKER_KEY),
    ),
    "ES256 signed by an unknown key": lambda s, u: token(
        {"alg": "ES256"},
        claims(),
        lambda m: ECAlgorithm(ECAlgorithm.SHA256).sign(m, ATTACKER_EC_KEY),
    ),
    "jku to the attacker's key set": lambda s, u: token(
        {**RS, "jku": u + "/jwks.json", "kid": "attacker"}, claims(), rs(ATTACKER_KEY)
    ),
    "x5u to the attacker's certificate": lambda s, u: token(
        {**RS, "x5u": u + "/cert.pem"}, claims(), rs(ATTACKER_KEY)
    ),
    "jwk: the attacker's key embedded": lambda s, u: token(
        {**RS, "jwk": attacker_jwk()}, claims(), rs(ATTACKER_KEY)
    ),
    "x5c: a chain embedded": lambda s, u: token(
        {**RS, "x5c": [b64(b"not a certificate")]}, claims(), rs(ATTACKER_KEY)
    ),
    "kid naming an empty file, signed with nothing": lambda s, u: token(
        {**HS, "kid": "../../../../../../dev/null"}, claims(), hs("")
    ),
    "kid as SQL, signed with its result": lambda s, u: token(
        {**HS, "kid": "x' UNION SELECT 'k"}, claims(), hs("k")
    ),
    "kid as a URL": lambda s, u: token({**HS, "kid": u + "/key"}, claims(), hs("key")),
    "b64 false (unencoded payload)": lambda s, u: token(
        {**HS, "b64": False, "crit": ["b64"]}, claims(), hs(s)
    ),
    "five segments (JWE-shaped)": lambda s, u: token(HS, claims(), hs(s)) + ".a.b",
    "two segments": lambda s, u: token(HS, claims(), hs(s)).rsplit(".", 1)[0],
    "expired a minute ago": lambda s, u: token(HS, claims(exp=int(time.time()) - 60), hs(s)),
    "no exp": lambda s, u: token(HS, claims(exp=DROP), hs(s)),
    "nbf an hour ahead": lambda s, u: token(HS, claims(nbf=int(time.time()) + 3600), hs(s)),
    "nbf a minute ahead": lambda s, u: token(HS, claims(nbf=int(time.time()) + 60), hs(s)),
    "nbf not a number": lambda s, u: token(HS, claims(nbf="now"), hs(s)),
    "iat an hour ahead": lambda s, u: token(HS, claims(iat=int(time.time()) + 3600), hs(s)),
    "no sub": lambda s, u: token(HS, claims(sub=DROP), hs(s)),
    "sub null": lambda s, u: token(HS, claims(sub=None), hs(s)),
    "sub empty": lambda s, u: token(HS, claims(sub=""), hs(s)),
    "sub a number": lambda s, u: token(HS, claims(sub=42), hs(s)),
    "sub a float": lambda s, u: token(HS, claims(sub=4.2), hs(s)),
    "sub true": lambda s, u: token(HS, claims(sub=True), hs(s)),
    "sub a list": lambda s, u: token(HS, claims(sub=[MEMBER]), hs(s)),
    "sub an object": lambda s, u: token(HS, claims(sub={"id": MEMBER}), hs(s)),
    "sub of 200 characters": lambda s, u: token(HS, claims(sub="m" * 200), hs(s)),
    "sub of 129 characters": lambda s, u: token(HS, claims(sub="m" * 129), hs(s)),
    "sub with NUL": lambda s, u: token(HS, claims(sub="m\x00"), hs(s)),
    "sub with a newline": lambda s, u: token(HS, claims(sub="m\nINFO forged log line"), hs(s)),
    "sub with DEL": lambda s, u: token(HS, claims(sub="m\x7f"), hs(s)),
    "sub with an escape sequence": lambda s, u: token(HS, claims(sub="m\x1b[2J"), hs(s)),
    "sub with a line separator": lambda s, u: token(HS, claims(sub="m\u2028"), hs(s)),
    "sub with a zero-width space": lambda s, u: token(HS, claims(sub="m\u200b"), hs(s)),
    "sub with a right-to-left override": lambda s, u: token(HS, claims(sub="m\u202e1"), hs(s)),
    "sub with a lone surrogate": lambda s, u: token(
        HS, b'{"sub": "m\\ud800", "exp": %d}' % (time.time() + 600), hs(s)
    ),
    "just over the size limit": lambda s, u: token(
        HS, claims(pad="x" * (MAX_TOKEN_BYTES - 200)), hs(s)
    ),
    "12 KB": lambda s, u: token(HS, claims(pad="x" * 9000), hs(s)),
}
# With a gateway key configured: the key confused for an HMAC secret, the development secret.
GATEWAY: dict[str, Attack] = {
    "HS256 signed with the public key PEM": lambda s, u: token(HS, claims(), hs(GATEWAY_PEM)),
    "HS256 signed with the PEM, trimmed": lambda s, u: token(HS, claims(), hs(GATEWAY_PEM.strip())),
    "HS256 signed with the key's DER": lambda s, u: token(
        HS,
        claims(),
        hs(
            GATEWAY_KEY.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ),
    ),
    "HS256 with the development secret": lambda s, u: token(
        HS, claims(), hs(Settings().jwt_secret)
    ),
    "RS256 by the gateway, expired": lambda s, u: token(
        RS, claims(exp=int(time.time()) - 60), rs(GATEWAY_KEY)
    ),
    "RS256 by the gateway, nbf ahead": lambda s, u: token(
        RS, claims(nbf=int(time.time()) + 3600), rs(GATEWAY_KEY)
    ),
    "RS256 by the gateway, sub of 200 characters": lambda s, u: token(
        RS, claims(sub="m" * 200), rs(GATEWAY_KEY)
    ),
}
# The same headers on tokens the configured key did sign: they are ignored, the key is not
# looked up by them (and nothing is fetched).
HONEST: dict[str, Attack] = {
    "plain": lambda s, u: token(HS, claims(), hs(s)),
    "with jku": lambda s, u: token({**HS, "jku": u + "/jwks.json"}, claims(), hs(s)),
    "with x5u": lambda s, u: token({**HS, "x5u": u + "/cert.pem"}, claims(), hs(s)),
    "with a kid": lambda s, u: token({**HS, "kid": "../../../../dev/null"}, claims(), hs(s)),
    "with nbf and iat now": lambda s, u: token(
        HS, claims(nbf=int(time.time()), iat=int(time.time())), hs(s)
    ),
}
GATEWAY_HONEST: dict[str, Attack] = {
    "RS256 by the gateway": lambda s, u: token(RS, claims(), rs(GATEWAY_KEY)),
    "RS256 by the gateway, with jku and jwk": lambda s, u: token(
        {**RS, "jku": u + "/jwks.json", "jwk": attacker_jwk(), "kid": "attacker"},
        claims(),
        rs(GATEWAY_KEY),
    ),
}

# Which configuration each runs in: (name, public key, explicit secret).
CONFIGS = {
    "secret": (None, None),
    "gateway key": (GATEWAY_PEM, None),
    "gateway key and secret": (GATEWAY_PEM, EXPLICIT_SECRET),
}
REFUSED = [(config, name) for config in CONFIGS for name in COMMON] + [
    (config, name) for config in ("gateway key", "gateway key and secret") for name in GATEWAY
]
ACCEPTED = [
    (config, name) for config in ("secret", "gateway key and secret") for name in HONEST
] + [
    (config, name)
    for config in ("gateway key", "gateway key and secret")
    for name in GATEWAY_HONEST
]
ATTACKS = {**COMMON, **GATEWAY, **HONEST, **GATEWAY_HONEST}


def configured(settings: Settings, config: str) -> Settings:
    public_key, secret = CONFIGS[config]
    return replace(settings, jwt_public_key=public_key, jwt_secret=secret or settings.jwt_secret)


class Trap:
    """An HTTP server standing in for an attacker's key host: it records every request."""

    def __init__(self) -> None:
        self.hits: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.json_response({"keys": [attacker_jwk()]})


@pytest.fixture
async def trap() -> AsyncIterator[tuple[Trap, str]]:
    recorder = Trap()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = TestServer(app)
    await server.start_server()
    yield recorder, str(server.make_url("")).rstrip("/")
    await server.close()


async def service_for(settings: Settings, redis: Redis, pool: asyncpg.Pool) -> ServiceClient:
    member, ops = create_apps(settings, pools=(redis, pool))
    return ServiceClient(member, ops, Guard.for_process(settings))


async def answers(client: Client, bearer: str) -> list[tuple[int, Any, str]]:
    """Status, JSON body and WWW-Authenticate of each route for this token."""
    out = []
    for path in ROUTES:
        resp = await client.get(path, headers={"Authorization": f"Bearer {bearer}"})
        assert resp.content_type == "application/json", await resp.text()
        out.append((resp.status, await resp.json(), resp.headers.get("WWW-Authenticate", "")))
    return out


@pytest.mark.parametrize(("config", "attack"), REFUSED, ids=[f"{c}: {a}" for c, a in REFUSED])
async def test_attack_tokens_are_401_and_nothing_is_fetched_or_logged(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    trap: tuple[Trap, str],
    caplog: pytest.LogCaptureFixture,
    config: str,
    attack: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    recorder, trap_url = trap
    custom = configured(settings, config)
    forged = ATTACKS[attack](custom.jwt_secret, trap_url)
    async with await service_for(custom, redis, pool) as client:
        for _ in range(2):  # the second time, from no cache
            for status, body, challenge in await answers(client, forged):
                assert status == 401, body
                assert body["error"] == "unauthorized" and body["message"], body
                assert challenge == "Bearer"
    assert recorder.hits == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    signature = forged.split(".")[-1]
    assert forged not in caplog.text and (len(signature) < 16 or signature not in caplog.text)


@pytest.mark.parametrize(("config", "honest"), ACCEPTED, ids=[f"{c}: {a}" for c, a in ACCEPTED])
async def test_tokens_the_configured_key_signed_pass(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    trap: tuple[Trap, str],
    caplog: pytest.LogCaptureFixture,
    config: str,
    honest: str,
) -> None:
    """The control for the attacks: signed by the configured key, the same shapes pass, and
    their key-location headers are still never fetched."""
    caplog.set_level(logging.DEBUG)
    recorder, trap_url = trap
    custom = configured(settings, config)
    good = ATTACKS[honest](custom.jwt_secret, trap_url)
    async with await service_for(custom, redis, pool) as client:
        for status, body, _ in await answers(client, good):
            assert status == 200, body
    assert recorder.hits == []
    assert good not in caplog.text


@pytest.mark.parametrize("leeway", [-4, 0, 4])
async def test_clock_skew_of_a_few_seconds_is_tolerated(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, leeway: int
) -> None:
    """exp, nbf and iat are checked with 5 s of leeway, no more (see the attacks above)."""
    now = int(time.time())
    skewed = token(
        HS,
        claims(exp=now + leeway + 2, nbf=now + leeway, iat=now + leeway),
        hs(settings.jwt_secret),
    )
    async with await service_for(settings, redis, pool) as client:
        for status, body, _ in await answers(client, skewed):
            assert status == 200, body
