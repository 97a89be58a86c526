"""Direct-charge partners: their configuration, the order call, the order status query and a
circuit breaker.

Ops configure partners at run time (``PUT /admin/v1/partners/{id}``); secrets are stored
encrypted and never echoed. Workers re-read the table every few seconds, so a change needs
no redeploy.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp
import asyncpg
import orjson

from claim_service.domain.catalogue import as_integer, check_id
from claim_service.errors import NotFoundError, ValidationError
from claim_service.fulfilment.signing import IDEMPOTENCY_HEADER, signed_headers
from claim_service.store.vault import Vault, partner_context

log = logging.getLogger(__name__)

MAX_TIMEOUT_S = 30.0
MAX_IN_FLIGHT = 1000
MAX_ATTEMPTS = 50
# What a partner's base URL may be (the OpenAPI document states the same pattern): orders go
# to ``{base_url}/orders``, so no query or fragment; no credentials, which would reach logs;
# DNS labels of 1-63 characters and a port that exists, so that every URL accepted can be
# requested.
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = "(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
BASE_URL_RE = re.compile(
    rf"[Hh][Tt][Tt][Pp][Ss]?://{_LABEL}(?:\.{_LABEL})*(?::{_PORT})?"
    r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?\Z"
)


@dataclass(frozen=True)
class Partner:
    partner_id: str
    base_url: str
    secret: str = field(repr=False)
    timeout_s: float = 5.0
    max_in_flight: int = 32
    max_attempts: int = 8

    def public(self) -> dict[str, Any]:
        return {
            "partner_id": self.partner_id,
            "base_url": self.base_url,
            "timeout_s": self.timeout_s,
            "max_in_flight": self.max_in_flight,
            "max_attempts": self.max_attempts,
        }


def parse_partner(partner_id: str, data: Any) -> Partner:
    check_id(partner_id, "partner_id")
    if not isinstance(data, dict):
        raise ValidationError("partner must be a JSON object")
    base_url = data.get("base_url")
    if not isinstance(base_url, str) or len(base_url) > 500 or not BASE_URL_RE.match(base_url):
        raise ValidationError(
            "base_url must be http(s)://host[:port][/path], the host a DNS name or IPv4 "
            "address, the port 1-65535, no query, fragment or credentials",
            field="base_url",
        )
    secret = data.get("secret")
    if not isinstance(secret, str) or not 16 <= len(secret) <= 512:
        raise ValidationError("secret must be a string of 16..512 characters", field="secret")
    timeout = data.get("timeout_s", 5.0)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not (0 < timeout <= MAX_TIMEOUT_S)
    ):
        raise ValidationError(
            f"timeout_s must be a number in (0, {MAX_TIMEOUT_S}]", field="timeout_s"
        )
    in_flight = as_integer(data.get("max_in_flight", 32))
    attempts = as_integer(data.get("max_attempts", 8))
    for name, value, hi in (
        ("max_in_flight", in_flight, MAX_IN_FLIGHT),
        ("max_attempts", attempts, MAX_ATTEMPTS),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
            raise ValidationError(f"{name} must be an integer in 1..{hi}", field=name)
    return Partner(partner_id, base_url.rstrip("/"), secret, float(timeout), in_flight, attempts)


async def save_partner(pool: asyncpg.Pool, vault: Vault, partner: Partner) -> bool:
    """Create or replace; returns True when it was created."""
    created = await pool.fetchval(
        """INSERT INTO partners (partner_id, base_url, secret_enc, timeout_s, max_in_flight,
                                 max_attempts)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (partner_id) DO UPDATE SET
               base_url = EXCLUDED.base_url, secret_enc = EXCLUDED.secret_enc,
               timeout_s = EXCLUDED.timeout_s, max_in_flight = EXCLUDED.max_in_flight,
               max_attempts = EXCLUDED.max_attempts, updated_at = now()
           RETURNING (xmax = 0)""",
        partner.partner_id,
        partner.base_url,
        vault.seal(partner.secret, partner_context(partner.partner_id)),
        partner.timeout_s,
        partner.max_in_flight,
        partner.max_attempts,
    )
    return bool(created)


async def load_partners(pool: asyncpg.Pool, vault: Vault) -> dict[str, Partner]:
    rows = await pool.fetch("SELECT * FROM partners")
    return {
        r["partner_id"]: Partner(
            r["partner_id"],
            r["base_url"],
            vault.open(r["secret_enc"], partner_context(r["partner_id"])),
            r["timeout_s"],
            r["max_in_flight"],
            r["max_attempts"],
        )
        for r in rows
    }


async def load_partner(pool: asyncpg.Pool, vault: Vault, partner_id: str) -> Partner:
    partners = await load_partners(pool, vault)
    if partner_id not in partners:
        raise NotFoundError("unknown_partner", f"no partner {partner_id!r}")
    return partners[partner_id]


class Outcome(Enum):
    SUCCESS = "success"
    PROCESSING = "processing"
    FAILED = "failed"  # the partner said no: permanent
    REJECTED = "rejected"  # a 4xx other than 409: permanent
    NOT_FOUND = "not_found"  # status query only: the partner never received the order
    # No usable answer (5xx, timeout, connection error, garbage): the order may well have
    # been charged. Resend it while attempts last, then ask with a status query.
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class OrderResult:
    outcome: Outcome
    partner_ref: str | None = None
    reason: str | None = None
    http_status: int | None = None


def order_body(claim_id: str, sku: str, account: str, created_at: str) -> bytes:
    return orjson.dumps(
        {
            "order_id": claim_id,
            "sku": sku,
            "account": account,
            "quantity": 1,
            "created_at": created_at,
        }
    )


async def _call(
    session: aiohttp.ClientSession,
    partner: Partner,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, bytes] | OrderResult:
    """One signed request to the partner: its status and body, or an ``UNKNOWN`` outcome
    when no answer came (a timeout or a connection error may hide a charge)."""
    try:
        async with session.request(
            method,
            partner.base_url + path,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=partner.timeout_s),
        ) as resp:
            return resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return OrderResult(Outcome.UNKNOWN, reason=f"{type(exc).__name__}: {exc}"[:200])


async def send_order(
    session: aiohttp.ClientSession, partner: Partner, claim_id: str, body: bytes
) -> OrderResult:
    """POST one order; classify the answer. A 409 carries the partner's earlier answer."""
    headers = signed_headers(partner.secret, body)
    headers[IDEMPOTENCY_HEADER] = claim_id
    answer = await _call(session, partner, "POST", "/orders", headers, body)
    if isinstance(answer, OrderResult):
        return answer
    status, raw = answer
    if status >= 500:
        return OrderResult(Outcome.UNKNOWN, reason=f"http {status}", http_status=status)
    if status in (200, 201, 409):
        return _classify_answer(raw, status)
    return OrderResult(Outcome.REJECTED, reason=f"http {status}", http_status=status)


def _classify_answer(raw: bytes, status: int) -> OrderResult:
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        if status == 409:  # it has the order but did not say how it went: wait for it
            return OrderResult(Outcome.PROCESSING, reason="duplicate", http_status=status)
        return OrderResult(Outcome.UNKNOWN, reason="unreadable answer", http_status=status)
    ref = data.get("partner_ref")
    ref = str(ref)[:200] if ref is not None else None
    reason = data.get("reason")
    reason = str(reason)[:200] if reason is not None else None
    answer = data.get("status", "processing" if status == 409 else None)
    outcomes = {
        "success": Outcome.SUCCESS,
        "processing": Outcome.PROCESSING,
        "failed": Outcome.FAILED,
    }
    if not isinstance(answer, str) or answer not in outcomes:
        return OrderResult(Outcome.UNKNOWN, ref, f"unknown status {answer!r}", status)
    return OrderResult(outcomes[answer], ref, reason, status)


STATUS_ANSWERS = {
    "success": Outcome.SUCCESS,
    "processing": Outcome.PROCESSING,
    "failed": Outcome.FAILED,
    "not_found": Outcome.NOT_FOUND,
}


def status_path(order_id: str) -> str:
    """The status query's path below ``base_url``; also the bytes it signs (a GET has no
    body), so a captured signature cannot be replayed to ask about another order."""
    return f"/orders/{order_id}"


async def query_order(
    session: aiohttp.ClientSession, partner: Partner, order_id: str
) -> OrderResult:
    """Ask the partner what became of an order (signed ``GET /orders/{order_id}``).

    Only a well-formed answer about this very order counts; anything else, including a
    bare 404 (a wrong ``base_url`` says nothing about the order), is ``UNKNOWN``.
    """
    path = status_path(order_id)
    headers = signed_headers(partner.secret, path.encode())
    del headers["Content-Type"]  # a GET has no body
    reply = await _call(session, partner, "GET", path, headers)
    if isinstance(reply, OrderResult):
        return reply
    status, raw = reply
    if status not in (200, 404):
        return OrderResult(Outcome.UNKNOWN, reason=f"http {status}", http_status=status)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or data.get("order_id") != order_id:
        return OrderResult(Outcome.UNKNOWN, reason="unreadable answer", http_status=status)
    said = data.get("status")
    answer = STATUS_ANSWERS.get(said) if isinstance(said, str) else None
    if answer is None or (status == 404 and answer is not Outcome.NOT_FOUND):
        return OrderResult(Outcome.UNKNOWN, reason="unreadable answer", http_status=status)
    ref, reason = data.get("partner_ref"), data.get("reason")
    return OrderResult(
        answer,
        str(ref)[:200] if ref is not None else None,
        str(reason)[:200] if reason is not None else None,
        status,
    )


class CircuitBreaker:
    """Per partner: after ``threshold`` consecutive unanswered calls, stop calling for a
    cool-down (doubling up to ``max_cooldown_s``), then let one probe through."""

    def __init__(self, threshold: int, cooldown_s: float, max_cooldown_s: float = 60.0) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown_s
        self.max_cooldown = max_cooldown_s
        self.failures = 0
        self.cooldown = cooldown_s
        self.open_until = 0.0
        self.probing = False

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "open" if time.monotonic() < self.open_until else "half_open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def retry_in(self) -> float:
        return max(self.open_until - time.monotonic(), 0.0) + random.uniform(0, 0.5)

    def record(self, ok: bool) -> None:
        self.probing = False
        if ok:
            self.failures = 0
            self.cooldown = self.base_cooldown
            return
        self.failures += 1
        now = time.monotonic()
        if self.failures < self.threshold or now < self.open_until:
            return  # still closed, or already open (answers of calls sent before it opened)
        if self.open_until:  # a failed probe: back off further
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
        self.open_until = now + self.cooldown
        log.warning("circuit open for %.1fs after %d failures", self.cooldown, self.failures)


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(max_s, base_s * 2 ** max(attempt - 1, 0))) + base_s / 2


class PartnerDirectory:
    """Partners as the workers see them, re-read from PostgreSQL every ``refresh_s``."""

    def __init__(self, pool: asyncpg.Pool, vault: Vault, refresh_s: float = 3.0) -> None:
        self.pool = pool
        self.vault = vault
        self.refresh_s = refresh_s
        self._partners: dict[str, Partner] = {}
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        self.semaphores: dict[str, asyncio.Semaphore] = {}
        self._limits: dict[str, int] = {}

    async def get(self, partner_id: str) -> Partner | None:
        if time.monotonic() - self._loaded_at > self.refresh_s:
            async with self._lock:
                if time.monotonic() - self._loaded_at > self.refresh_s:
                    self._partners = await load_partners(self.pool, self.vault)
                    self._loaded_at = time.monotonic()
        partner = self._partners.get(partner_id)
        if partner is not None and self._limits.get(partner_id) != partner.max_in_flight:
            self.semaphores[partner_id] = asyncio.Semaphore(partner.max_in_flight)
            self._limits[partner_id] = partner.max_in_flight
        return partner
