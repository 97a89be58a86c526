"""Prometheus metrics, exposed at ``/metrics`` by the API and by ``fulfil --metrics-port``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CLAIM_DECISIONS = Counter(
    "claim_decisions_total", "Claims decided by claim.lua, by outcome", ["outcome"]
)
CLAIM_BATCH_SIZE = Gauge("claim_last_batch_size", "Claims in the last Lua batch")
FULFILMENT = Counter(
    "claim_fulfilment_total", "Claims reaching a final fulfilment state", ["kind", "status"]
)
PARTNER_CALLS = Counter(
    "claim_partner_requests_total", "Orders sent to partners, by outcome", ["partner", "outcome"]
)
PARTNER_CIRCUIT = Gauge(
    "claim_partner_circuit_open", "1 while the partner's circuit breaker is open", ["partner"]
)
CODES_FREE = Gauge(
    "claim_codes_free", "Unassigned, unexpired redemption codes", ["benefit", "option"]
)
CODES_LOW = Gauge(
    "claim_codes_low", "1 when the free codes are below the low watermark", ["benefit", "option"]
)
REFUNDS = Counter("claim_refunds_total", "Failed claims whose unit and quota were returned")
ANOMALIES = Counter(
    "claim_anomalies_total", "Anomalies recorded for ops (GET /admin/v1/anomalies)", ["kind"]
)
