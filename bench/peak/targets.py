"""The issue's targets, each read off this run's results: met, or missed by how much."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.peak.model import Results, Scenario
from bench.peak.records import CONN_ERROR, TIMEOUT

FAST_REJECT_MS = 5.0
ACCEPTED_P99_MS = 100.0


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    value: float | None  # None: not measured in this run
    shown: str
    limit: float
    at_least: bool = True  # the value must be >= limit (else <= limit)
    stretch: float | None = None
    boolean: bool = False  # a yes/no check: 1 met, 0 not

    @property
    def met(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def verdict(self) -> str:
        if self.value is None or math.isnan(self.value):
            return "**not measured**"
        if self.met:
            extra = ""
            if self.stretch is not None:
                extra = " (stretch met)" if self.value >= self.stretch else " (stretch missed)"
            return "met" + extra
        if math.isinf(self.value) or self.boolean:
            return "**missed**"
        if self.limit == 0:
            return f"**missed** by {self.value:,.0f}"
        gap = abs(self.value - self.limit) / abs(self.limit)
        return f"**missed** by {gap:.0%}"


def ratio(results: Results, key: str, base: str) -> float | None:
    a, b = results.get(key), results.get(base)
    if a is None or b is None or b.rate == 0:
        return None
    return a.rate / b.rate


def _x(value: float | None, base: str) -> str:
    return "–" if value is None else f"{value:.2f}× ({base})"


def _ms(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.1f} ms"


def evaluate(results: Results) -> list[Target]:
    out: list[Target] = []
    svc = results.get("svc1")
    p99 = svc.latency.p99 if svc else None
    out.append(
        Target(
            "claim p99 at 64 connections, full claim throughput, writer running",
            "≤ 25 ms",
            p99,
            _ms(p99),
            25.0,
            at_least=False,
        )
    )
    for base, limit, stretch in (
        ("b", 1.0, None),
        ("a", 0.6, 0.75),
        ("c", 2.5, None),
        ("d", 12.0, None),
    ):
        value = ratio(results, "svc1", base)
        goal = f"≥ {limit:g}× ({base})" + (f", stretch {stretch:g}×" if stretch else "")
        out.append(
            Target(
                f"claim throughput, 1 worker, vs baseline ({base})",
                goal,
                value,
                _x(value, base),
                limit,
                stretch=stretch,
            )
        )
    sold = ratio(results, "soldout", "a")
    out.append(Target("sold-out answers vs baseline (a)", "≥ 0.8× (a)", sold, _x(sold, "a"), 0.8))
    for check in results.checks:
        if check.name in ("sells out", "zero oversell", "zero undersell", "no member over quota"):
            out.append(
                Target(
                    f"release: {check.name}",
                    "yes",
                    1.0 if check.ok else 0.0,
                    check.detail,
                    1.0,
                    boolean=True,
                )
            )
    spike = results.figures.get("spike_rate")
    steady = results.figures.get("release_steady_rate")
    spike_ratio = spike / steady if spike is not None and steady else None
    out.append(
        Target(
            "release: claims decided in the opening second vs the steady rate",
            "≥ 0.8×",
            spike_ratio,
            "–"
            if spike_ratio is None
            else f"{spike_ratio:.2f}× ({spike:,.0f} vs {steady:,.0f} claims/s)",
            0.8,
        )
    )
    persist = results.figures.get("persist_s")
    out.append(
        Target(
            "release: every row in PostgreSQL after the last accepted claim",
            "≤ 5 s",
            persist,
            "–" if persist is None else f"{persist:.2f} s",
            5.0,
            at_least=False,
        )
    )
    writer = results.figures.get("writer_rows_per_s")
    out.append(
        Target(
            "writer alone, rows/s",
            "≥ 30,000",
            writer,
            "–" if writer is None else f"{writer:,.0f} rows/s",
            30_000,
        )
    )
    out.extend(_overload(results.get("overload")))
    return out


def _overload(scenario: Scenario | None) -> list[Target]:
    if scenario is None:
        return [Target("overload", "measured", None, "–", 0)]
    run = scenario.run
    window = run.in_window()
    timeouts = int((window & run.of(TIMEOUT, CONN_ERROR)).sum())
    shed = window & run.of(429, 503)
    # No 503/429 at all: the excess was queued, not answered fast (missed, not unmeasured).
    shed_p99 = run.latency(shed).p99 if shed.any() else math.inf
    accepted = window & run.of(202)
    # None accepted in time at all is a miss too, not a figure left unmeasured.
    accepted_p99 = run.latency(accepted).p99 if accepted.any() else math.inf
    shed_share = float(shed.sum()) / max(int(window.sum()), 1)
    return [
        Target(
            "overload: client timeouts (and broken connections)",
            "0",
            float(timeouts),
            f"{timeouts:,}",
            0.0,
            at_least=False,
        ),
        Target(
            f"overload: excess answered 503/429 within {FAST_REJECT_MS:g} ms (p99)",
            f"≤ {FAST_REJECT_MS:g} ms",
            shed_p99,
            "no 503/429 answers"
            if math.isinf(shed_p99)
            else f"{_ms(shed_p99)} ({shed_share:.0%} of answers)",
            FAST_REJECT_MS,
            at_least=False,
        ),
        Target(
            "overload: accepted claims' p99",
            f"≤ {ACCEPTED_P99_MS:g} ms",
            accepted_p99,
            "no claim accepted" if math.isinf(accepted_p99) else _ms(accepted_p99),
            ACCEPTED_P99_MS,
            at_least=False,
        ),
    ]
