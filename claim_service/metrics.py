"""Prometheus metrics, exposed at ``/metrics`` on the admin listener of ``serve`` and by
``fulfil --metrics-port``.

Under ``serve --workers N`` each worker writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) and a scrape merges them,
whichever worker answers it: counters are summed, each gauge says how (``multiprocess_mode``).
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.multiprocess import MultiProcessCollector


def registry() -> CollectorRegistry:
    """What a scrape reports: this process's metrics, or every worker's, merged."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    merged = CollectorRegistry()
    MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    return merged


CLAIM_DECISIONS = Counter(
    "claim_decisions_total", "Claims decided by claim.lua, by outcome", ["outcome"]
)
CLAIM_LOCAL_ANSWERS = Counter(
    "claim_local_answers_total",
    "Claims a worker answered without Redis (before opening, sold out), by outcome",
    ["outcome"],
)
CLAIMS_SHED = Counter(
    "claim_shed_total",
    "Claims refused before a decision to protect the service, by reason",
    ["reason"],
)
CLAIM_BATCH_SIZE = Gauge(
    "claim_last_batch_size", "Claims in the last Lua batch", multiprocess_mode="mostrecent"
)
FULFILMENT = Counter(
    "claim_fulfilment_total", "Claims reaching a final fulfilment state", ["kind", "status"]
)
PARTNER_CALLS = Counter(
    "claim_partner_requests_total", "Orders sent to partners, by outcome", ["partner", "outcome"]
)
PARTNER_CIRCUIT = Gauge(
    "claim_partner_circuit_open",
    "1 while the partner's circuit breaker is open",
    ["partner"],
    multiprocess_mode="livemax",
)
# Pool levels are counted in PostgreSQL by whoever last looked (a fulfil worker every few
# seconds, ops loading or reading a pool), never by a scrape: the latest count wins.
CODES_FREE = Gauge(
    "claim_codes_free",
    "Unassigned, unexpired redemption codes",
    ["benefit", "option"],
    multiprocess_mode="mostrecent",
)
CODES_LOW = Gauge(
    "claim_codes_low",
    "1 when the free codes are below the low watermark",
    ["benefit", "option"],
    multiprocess_mode="mostrecent",
)
REFUNDS = Counter("claim_refunds_total", "Failed claims whose unit and quota were returned")
ANOMALIES = Counter(
    "claim_anomalies_total", "Anomalies recorded for ops (GET /admin/v1/anomalies)", ["kind"]
)
OUTCOME_UNKNOWN = Gauge(
    "claim_outcome_unknown",
    "Claims whose partner has not said whether it charged their order (never refunded blind)",
    multiprocess_mode="livemax",
)
PARTNER_STATUS_QUERIES = Counter(
    "claim_partner_status_queries_total",
    "Order status queries to partners, by answer",
    ["partner", "answer"],
)
CLAIM_DURABLE_WAIT = Counter(
    "claim_durable_wait_seconds",
    "Time claim batches spent waiting for Redis to confirm them durable (CLAIM_DURABILITY)",
)
CLAIM_DURABLE_BATCHES = Counter(
    "claim_durable_batches",
    "Claim batches that waited for durability, by whether Redis confirmed it in time",
    ["confirmed"],
)
CLAIM_NOT_DURABLE = Counter(
    "claim_not_durable_total",
    "Accepted or replayed claims answered 503 because Redis did not confirm them durable in time",
)
# Set by every writer's periodic comparison of Redis with PostgreSQL and the stream (see
# ``store/reconcile.py``): the highest count any live process saw last.
DRIFT = Gauge(
    "claim_drift",
    "Counters in Redis that PostgreSQL and the stream do not explain, at the last check",
    ["benefit", "kind"],
    multiprocess_mode="livemax",
)
