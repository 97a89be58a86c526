"""Member tokens (JWT) and the admin bearer token.

Verifying a JWT signature costs more than the Redis round trip of a claim, and at release
time each member retries with the same token many times, so verified tokens are cached
(bounded, and never past their ``exp``).
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict

import jwt
from jwt.algorithms import HMACAlgorithm

from claim_service.config import DEV_JWT_SECRET, Settings
from claim_service.errors import ClaimServiceError
from claim_service.store.tiers import MAX_USER_ID

ASYMMETRIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256")
LEEWAY_S = 5
MAX_TOKEN_BYTES = 8192
TOKEN_CACHE_SIZE = 100_000  # verified tokens remembered (LRU, never past their exp)


class _PreparedHS256(HMACAlgorithm):
    """HS256 whose key checks (not empty, not PEM, SSH or DER) run once per secret, not on
    every token: PyJWT repeats them for each verification, and at release time each member
    brings a token the cache has not seen. Only configured secrets reach it (at most a few)."""

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._prepared: dict[str | bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = super().prepare_key(key)  # raises on a key it refuses: not kept
            if len(self._prepared) >= 8:
                self._prepared.clear()
            self._prepared[key] = prepared
        return prepared


jwt.unregister_algorithm("HS256")
jwt.register_algorithm("HS256", _PreparedHS256())


class AuthError(ClaimServiceError):
    """Missing, malformed, forged or expired credentials."""


class TokenVerifier:
    def __init__(self, settings: Settings, cache_size: int = TOKEN_CACHE_SIZE) -> None:
        self.secret = settings.jwt_secret
        self.public_key = settings.jwt_public_key
        # With a gateway key configured, the well-known dev secret must not open the door.
        self.hs_enabled = self.public_key is None or self.secret != DEV_JWT_SECRET
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._cache_size = cache_size

    def verify(self, token: str) -> str:
        """The member id (``sub``) of a valid token; raises ``AuthError`` otherwise."""
        cached = self._cache.get(token)
        now = time.time()
        if cached is not None:
            if cached[1] + LEEWAY_S > now:
                return cached[0]
            del self._cache[token]
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError("malformed token") from exc
        alg = header.get("alg")
        key: str
        if alg == "HS256" and self.hs_enabled:
            key = self.secret
        elif alg in ASYMMETRIC and self.public_key:
            key = self.public_key
        else:
            raise AuthError(f"token algorithm {alg!r} is not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                # PyJWT's defaults, spelled out: a change of defaults must not loosen them.
                options={
                    "require": ["sub", "exp"],
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    "verify_iss": True,
                    "verify_aud": self.audience is not None,
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise AuthError("invalid token") from exc
        sub = claims.get("sub")
        exp = claims.get("exp")
        if (
            not isinstance(sub, str)
            or not 0 < len(sub) <= MAX_USER_ID
            or not sub.isprintable()
            or not isinstance(exp, int | float)
        ):
            raise AuthError("token subject is not a valid member id")
        try:
            expires = float(exp)
        except OverflowError as exc:  # a signed but absurd integer expiry
            raise AuthError("invalid token") from exc
        self._remember(token, sub, expires)
        return sub

    def _remember(self, token: str, sub: str, exp: float) -> None:
        self._cache[token] = (sub, exp)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def bearer(header: str | None) -> str:
    if not header:
        raise AuthError("missing Authorization header")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("Authorization must be 'Bearer <token>'")
    # Header bytes that are not UTF-8 arrive as surrogate escapes that cannot be encoded
    # again for a JWT or a digest; a bearer token is ASCII anyway (RFC 6750).
    if not token.isascii():
        raise AuthError("malformed token")
    return token


def check_admin(header: str | None, settings: Settings) -> None:
    token = bearer(header)
    if not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
        raise AuthError("invalid admin token")


def mint_token(settings: Settings, user_id: str, ttl_s: int = 3600) -> str:
    """A dev token signed with ``CLAIM_JWT_SECRET`` (HS256)."""
    now = int(time.time())
    payload = {"sub": user_id, "iat": now, "exp": now + ttl_s}
    if settings.jwt_audience:
        payload["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        payload["iss"] = settings.jwt_issuer
    return jwt.encode(payload, settings.jwt_secret, algorithm="HS256")
