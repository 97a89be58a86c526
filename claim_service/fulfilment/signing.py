"""Request signatures shared by us and fulfilment partners (both directions).

``X-Claim-Signature`` is the hex HMAC-SHA256 of ``<X-Claim-Timestamp> + "." + <raw body>``
keyed with the partner's secret; a timestamp more than ``MAX_SKEW_S`` away from now is
rejected, which bounds how long a captured request can be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping

TIMESTAMP_HEADER = "X-Claim-Timestamp"
SIGNATURE_HEADER = "X-Claim-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_SKEW_S = 300
SIGNATURE_CHARS = 64
HEX_RE = re.compile(r"[0-9a-f]+\Z")


class SignatureError(ValueError):
    """A request's signature or timestamp is missing, malformed, stale or wrong."""


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        "Content-Type": "application/json",
    }


def signature_headers(headers: Mapping[str, str], now: float | None = None) -> tuple[int, str]:
    """The timestamp and signature of a request, checked for shape and freshness only.

    Needs neither the body nor the secret, so a forged or stale request is refused before
    either is read. Raises ``SignatureError``.
    """
    raw_ts = headers.get(TIMESTAMP_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    if not raw_ts or not signature:
        raise SignatureError("missing signature headers")
    if not raw_ts.isascii() or not raw_ts.isdigit() or len(raw_ts) > 12:
        raise SignatureError("timestamp is not a unix time in seconds")
    timestamp = int(raw_ts)
    current = time.time() if now is None else now
    if abs(current - timestamp) > MAX_SKEW_S:
        raise SignatureError("timestamp outside the allowed window")
    signature = signature.strip().lower()
    # compare_digest refuses non-ASCII text with a TypeError: check the shape first.
    if len(signature) != SIGNATURE_CHARS or not HEX_RE.match(signature):
        raise SignatureError("signature is not a hex HMAC-SHA256")
    return timestamp, signature


def check_signature(secret: str, timestamp: int, body: bytes, signature: str) -> None:
    """Raise ``SignatureError`` unless ``signature`` (from ``signature_headers``) signs ``body``."""
    if not hmac.compare_digest(sign(secret, timestamp, body).encode(), signature.encode()):
        raise SignatureError("bad signature")


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
    """Raise ``SignatureError`` unless ``headers`` carry a fresh, valid signature of ``body``."""
    timestamp, signature = signature_headers(headers, now)
    check_signature(secret, timestamp, body, signature)
