"""Admission tokens: what a member admitted by a benefit's waiting room shows with a claim.

A token is a JWT (HS256) naming the member (``sub``), the benefit (``bid``), the period
(``per``) and the ticket (``tid``), valid ``ADMISSION_TTL_S`` seconds. Its key is derived
from ``CLAIM_CODES_KEY`` (HMAC-SHA256 of the key with ``"admission-token"``), which every
worker of a deployment shares, so any worker accepts a token any other made; a member token
can never pass for one (another key, and the audience ``claim-admission``).
"""

from __future__ import annotations

import hashlib
import hmac
import time

import jwt

from claim_service.config import parse_key

ADMISSION_TTL_S = 120
AUDIENCE = "claim-admission"
MAX_TOKEN_BYTES = 2048
LEEWAY_S = 2


class Admissions:
    """Makes and checks admission tokens (one per process)."""

    def __init__(self, codes_key: str, ttl_s: int = ADMISSION_TTL_S) -> None:
        self._key = hmac.new(parse_key(codes_key), b"admission-token", hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def issue(self, user_id: str, benefit_id: str, period: str, ticket_id: str) -> tuple[str, int]:
        """A token for the member, and when it expires (unix seconds)."""
        expires = int(time.time()) + self.ttl_s
        token = jwt.encode(
            {
                "sub": user_id,
                "bid": benefit_id,
                "per": period,
                "tid": ticket_id,
                "aud": AUDIENCE,
                "exp": expires,
            },
            self._key,
            algorithm="HS256",
        )
        return token, expires

    def check(self, token: object, user_id: str, benefit_id: str, period: str) -> bool:
        """Whether ``token`` admits ``user_id`` to claim ``benefit_id`` in ``period`` now."""
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_BYTES:
            return False
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                audience=AUDIENCE,
                leeway=LEEWAY_S,
                options={"require": ["sub", "exp", "aud"]},
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            return False
        return (
            claims.get("sub") == user_id
            and claims.get("bid") == benefit_id
            and claims.get("per") == period
        )
