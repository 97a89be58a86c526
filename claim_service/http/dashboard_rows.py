"""The ops dashboard's rows, built from what ``dashboard_feed`` read: pure functions, so
that what each number means is stated once, apart from how and when it is read (but for
``campaign_rows``, which reads the campaigns' funnels the feed asks for)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

from claim_service.domain.campaigns import Campaign
from claim_service.domain.catalogue import Benefit
from claim_service.domain.lifecycle import ACCEPTED, FAILED, FULFILLED, FULFILLING, REFUNDED
from claim_service.errors import ValidationError
from claim_service.store import campaign_views, campaigns

log = logging.getLogger(__name__)

STATES = (ACCEPTED, FULFILLING, FULFILLED, FAILED, REFUNDED)
CAMPAIGNS_SHOWN = 20  # each shown costs a few queries every PostgreSQL turn
CAMPAIGNS_RECENT = timedelta(days=7)


def benefit_row(
    benefit: Benefit,
    period: str,
    window: str,
    live: bool,
    counters: dict[str, int],
    codes: dict[str, int],
    backlog: int,
    lag_ms: int | None,
) -> dict[str, Any]:
    """One benefit's row: its stock and each option's, from the period's counters and the
    free codes in Redis. Until Redis vouches for the benefit (``live``: recovery, or its
    first claim, rebuilds it from PostgreSQL) its counters may be incomplete: the row says
    so, and free codes, which Redis counts only once live, are left unknown."""
    total = benefit.stock_per_period + counters.get("added", 0)
    left = max(total - counters.get("taken", 0), 0)
    options = []
    for option in benefit.options:
        taken = counters.get(f"taken:{option.option_id}", 0)
        codes_free = None
        if option.kind == "card_key" and live:
            codes_free = codes.get(option.option_id, 0)
        # What this option can still give: the benefit's stock, its own cap, its codes.
        limits = [left]
        if option.stock_cap is not None:
            limits.append(max(option.stock_cap - taken, 0))
        if codes_free is not None:
            limits.append(codes_free)
        options.append(
            {
                "option_id": option.option_id,
                "name": option.name,
                "kind": option.kind,
                "partner": option.partner,
                "stock_cap": option.stock_cap,
                "taken": taken,
                "left": min(limits),
                "codes_free": codes_free,
            }
        )
    return {
        "benefit_id": benefit.benefit_id,
        "name": benefit.name,
        "period": period,
        "phase": "sold_out" if window == "open" and left == 0 else window,
        "live": live,
        "stock": total,
        "taken": counters.get("taken", 0),
        "left": left,
        "accepted": counters.get("accepted", 0),
        "backlog": backlog,
        "lag_ms": lag_ms,
        "options": options,
    }


def phase(benefit: Benefit, opens_ms: int, closes_ms: int, now_ms: int) -> str:
    """Where the release stands by Redis's clock (``benefit_row`` turns an open benefit
    without stock into ``sold_out``)."""
    if benefit.paused:
        return "paused"
    if now_ms < opens_ms:
        return "not_open"
    if closes_ms and now_ms >= closes_ms:
        return "closed"
    return "open"


def partner_counts() -> dict[str, int]:
    """A partner's orders this period: still open, outcome unknown, and by final state."""
    return {"in_flight": 0, "outcome_unknown": 0, FULFILLED: 0, FAILED: 0, REFUNDED: 0}


def counters(registry: CollectorRegistry) -> dict[str, Any]:
    """This serve's (or process's) Prometheus values the dashboard shows."""
    decided: dict[str, int] = {}
    local: dict[str, int] = {}
    shed = {"overloaded": 0, "rate_limited": 0, "not_durable": 0}
    breakers: dict[str, str] = {}
    drift: dict[str, int] = {}
    for family in registry.collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, int(sample.value)
            if name == "claim_decisions_total":
                decided[labels["outcome"]] = decided.get(labels["outcome"], 0) + value
            elif name == "claim_local_answers_total":
                local[labels["outcome"]] = local.get(labels["outcome"], 0) + value
            elif name == "claim_shed_total":
                shed[labels["reason"]] = shed.get(labels["reason"], 0) + value
            elif name == "claim_not_durable_total":
                shed["not_durable"] += value
            elif name == "claim_partner_circuit_open":
                breakers[labels["partner"]] = "open" if value else "closed"
            elif name == "claim_drift":
                drift[labels["benefit"]] = drift.get(labels["benefit"], 0) + value
    outcomes = [
        {"code": code, "decided": decided.get(code, 0), "local": local.get(code, 0)}
        for code in sorted(decided.keys() | local.keys())
    ]
    return {"outcomes": outcomes, "shed": shed, "breakers": breakers, "drift": drift}


def fulfilment_rows(
    rows: Iterable[Mapping[str, Any]], benefits: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Claims by state per benefit, and orders per partner (its options' claims), from the
    rows of ``dashboard_feed.FULFILMENT_SQL``."""
    partner_of = {
        (b["benefit_id"], o["option_id"]): o["partner"]
        for b in benefits
        for o in b["options"]
        if o["partner"]
    }
    fulfilment: dict[str, dict[str, int]] = {}
    partners: dict[str, dict[str, int]] = {}
    for row in rows:
        states = fulfilment.setdefault(row["benefit_id"], dict.fromkeys(STATES, 0))
        states[row["status"]] = states.get(row["status"], 0) + row["n"]
        partner = partner_of.get((row["benefit_id"], row["option_id"]))
        if partner is not None:
            counts = partners.setdefault(partner, partner_counts())
            key = "in_flight" if row["status"] in (ACCEPTED, FULFILLING) else row["status"]
            counts[key] = counts.get(key, 0) + row["n"]
            counts["outcome_unknown"] += row["unknown"]
    return fulfilment, partners


def shown_campaigns(
    found: Iterable[Campaign], now: datetime, limit: int = CAMPAIGNS_SHOWN
) -> list[Campaign]:
    """The campaigns the dashboard shows, ``limit`` at most: first those open, to come or
    ended within ``CAMPAIGNS_RECENT``, then older ones; each group by id."""
    recent = now - CAMPAIGNS_RECENT
    return sorted(found, key=lambda c: (c.ends_at <= recent, c.campaign_id))[:limit]


def campaign_row(campaign: Campaign, funnel: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A campaign's row: what it is, whether it is open at ``now``, and its funnel (a
    ``store.campaign_views.funnel``): its stages, their conversions, rewards and budget."""
    return {
        "campaign_id": campaign.campaign_id,
        "name": campaign.name,
        "type": campaign.type,
        "open": campaign.is_open(now),
        "ends_at": campaign.ends_at.isoformat(),
        "funnel": funnel["funnel"],
        "conversion": funnel["conversion"],
        "rewards": funnel["rewards"],
        "budget": funnel["budget"],
    }


async def campaign_rows(pool: asyncpg.Pool, last: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the campaigns shown (``shown_campaigns``), a funnel's few queries each;
    PostgreSQL's errors are the caller's. While a stored campaign does not parse (its rules
    changed since it was saved), the ``last`` rows, logged."""
    now = datetime.now(UTC)
    try:
        shown = shown_campaigns(await campaigns.load_all(pool), now)
    except ValidationError as exc:
        log.warning("dashboard: campaigns not read (%r); showing the last ones", exc)
        return last
    return [campaign_row(c, await campaign_views.funnel(pool, c), now) for c in shown]
