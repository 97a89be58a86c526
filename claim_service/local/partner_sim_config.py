"""The partner simulator's settings, its books (orders, counters) and its command-line
options."""

from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from claim_service.errors import ValidationError
from claim_service.http.app import parse_json_object

DEFAULT_SECRET = "sim-secret"
SECRET_ENV = "CLAIM_SIM_SECRET"
ORDER_RATES = ("failure_rate", "timeout_rate", "reject_rate", "processing_rate")
RATE_FIELDS = (*ORDER_RATES, "callback_failure_rate", "duplicate_callback_rate")
DELAY_FIELDS = ("latency_ms", "timeout_delay_s", "callback_delay_ms")
PARTNER_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class SimConfig:
    """How the simulated partner behaves.

    Fault rates are applied in turn to each new order: ``failure_rate`` first (500, nothing
    recorded), then ``timeout_rate`` (charged, answer held back), ``reject_rate`` and
    ``processing_rate``; each is the share of the requests that got past the earlier ones,
    so an outage (``failure_rate=1``) can be switched on over any other mix. Status queries
    get the ``failure_rate`` too: in an outage they go unanswered as well.
    """

    partner_id: str = "sim"
    secret: str = field(default=DEFAULT_SECRET, repr=False)
    callback_base: str | None = None
    latency_ms: float = 5.0
    failure_rate: float = 0.0
    timeout_rate: float = 0.0
    timeout_delay_s: float = 30.0
    reject_rate: float = 0.0
    processing_rate: float = 0.0
    callback_delay_ms: float = 200.0
    callback_failure_rate: float = 0.0
    duplicate_callback_rate: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not PARTNER_ID_RE.match(self.partner_id):
            raise ValueError(f"partner_id {self.partner_id!r} must match {PARTNER_ID_RE.pattern}")
        if not self.secret:
            raise ValueError("secret must not be empty")
        base = self.callback_base
        if base is not None and base.split("://")[0] not in ("http", "https"):
            raise ValueError("callback_base must be an http:// or https:// URL")
        for name in (*RATE_FIELDS, *DELAY_FIELDS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
            if value < 0 or (name in RATE_FIELDS and value > 1):
                bounds = "between 0 and 1" if name in RATE_FIELDS else "at least 0"
                raise ValueError(f"{name} must be {bounds}, got {value}")

    def public(self) -> dict[str, Any]:
        """Every setting except the secret."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "secret"}

    @property
    def callback_url(self) -> str | None:
        if self.callback_base is None:
            return None
        return f"{self.callback_base.rstrip('/')}/v1/partners/{self.partner_id}/callbacks"


@dataclass
class PartnerOrder:
    """One order as the partner keeps it; ``answer()`` is what a resend gets with its 409."""

    order_id: str
    sku: str
    account: str
    created_at: str
    partner_ref: str
    first_status: str
    status: str
    reason: str | None = None
    times_charged: int = 0
    received_at: float = field(default_factory=time.time)
    completed_at: float | None = None

    def answer(self) -> dict[str, Any]:
        return {"status": self.status, "partner_ref": self.partner_ref, "reason": self.reason}


@dataclass
class SimCounters:
    requests: int = 0
    failures_injected: int = 0
    timeouts_injected: int = 0
    rejected: int = 0
    processing: int = 0
    callbacks_sent: int = 0
    callbacks_acknowledged: int = 0
    callbacks_failed: int = 0
    callback_retries: int = 0
    duplicate_callbacks: int = 0
    bad_signatures: int = 0
    bad_requests: int = 0
    duplicates_received: int = 0
    status_queries: int = 0


def parse_order(body: bytes) -> dict[str, Any]:
    """The order request's fields, or ``ValidationError`` naming the first bad one."""
    data = parse_json_object(body)
    for name in ("order_id", "sku", "account", "created_at"):
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ValidationError(f"{name} must be a non-empty string", field=name)
    quantity = data.get("quantity")
    if isinstance(quantity, bool) or quantity != 1:
        raise ValidationError("quantity must be 1", field="quantity")
    try:
        datetime.fromisoformat(data["created_at"])
    except ValueError as exc:
        raise ValidationError("created_at must be ISO 8601", field="created_at") from exc
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``claim-service partner-sim``."""
    defaults = SimConfig()
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=9090, help="default 9090")
    parser.add_argument("--partner-id", default=defaults.partner_id)
    parser.add_argument(
        "--secret", help=f"shared HMAC secret (default ${SECRET_ENV} or {DEFAULT_SECRET!r})"
    )
    parser.add_argument(
        "--callback-base",
        help="claim-service base URL for callbacks "
        "(default: complete processing orders without callbacks)",
    )
    parser.add_argument("--seed", type=int, help="seed for reproducible fault injection")
    helps = {
        "latency_ms": "mean added latency per order request",
        "failure_rate": "share of orders and status queries answered 500 (nothing recorded)",
        "timeout_rate": "share recorded and charged but answered after --timeout-delay-s",
        "timeout_delay_s": "how long a 'timed out' answer is held back",
        "reject_rate": "share answered failed/account_not_found (not charged)",
        "processing_rate": "share answered processing, completed by callback",
        "callback_delay_ms": "delay before a processing order completes",
        "callback_failure_rate": "share of processing orders completing as failed",
        "duplicate_callback_rate": "share of callbacks sent more than once",
    }
    for name, text in helps.items():
        flag, default = "--" + name.replace("_", "-"), getattr(defaults, name)
        parser.add_argument(flag, type=float, default=default, help=f"{text} (default {default:g})")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    secret = args.secret or os.environ.get(SECRET_ENV) or DEFAULT_SECRET
    values = {name: getattr(args, name) for name in (*RATE_FIELDS, *DELAY_FIELDS)}
    return SimConfig(
        partner_id=args.partner_id,
        secret=secret,
        callback_base=args.callback_base,
        seed=args.seed,
        **values,
    )
