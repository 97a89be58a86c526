"""What a run measures (``Plan``, full or quick), what each scenario produced (``Scenario``)
and everything the report is written from (``Results``)."""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.peak.records import Latency, Run

CLAIMS_PATH = "/v1/benefits/{}/claims"
STEADY_PREFIX = "peak-s"  # members of the steady scenarios (tier 5)
RELEASE_PREFIX = "peak-m"  # members of the release (mixed tiers)
OPTION = "iqiyi"
RELEASE_OPTIONS = ("iqiyi", "tencent", "youku")
STEADY_QUOTA = 1000  # claims per member and period: each member claims a few times, always
STEADY_STOCK = 100_000_000  # accepted, so the figures time the claim path, not rejections
MIN_TIER = 4


@dataclass(frozen=True)
class Plan:
    """How much load, for how long."""

    quick: bool
    warmup_s: float  # closed and open loops: answers in this first part are left out
    measure_s: float
    rounds: int  # the comparison (baselines and service): interleaved rounds ...
    round_warmup_s: float  # ... each this long to warm up ...
    round_s: float  # ... then measured this long
    connections: int  # closed loops
    steady_members: int
    release_stock: int
    release_members: int
    release_connections: int
    release_opens_in_s: float
    release_retry_share: float
    release_max_s: float
    writer_backlog: int
    overload_factor: float
    overload_connections: int  # more than a worker's default in-flight bound (1,024)
    client_timeout_s: float
    seed: int = 20261110
    profile: bool = False  # py-spy on `serve` during the 1-worker claim scenario

    @property
    def duration_s(self) -> float:
        return self.warmup_s + self.measure_s


FULL = Plan(
    quick=False,
    warmup_s=2.0,
    measure_s=10.0,
    rounds=3,
    round_warmup_s=1.0,
    round_s=5.0,
    connections=64,
    steady_members=20_000,
    release_stock=80_000,
    release_members=200_000,
    release_connections=1000,
    release_opens_in_s=3.0,
    release_retry_share=0.1,
    release_max_s=240.0,
    writer_backlog=80_000,
    overload_factor=4.0,
    overload_connections=3000,
    client_timeout_s=2.0,
)
QUICK = Plan(
    quick=True,
    warmup_s=1.0,
    measure_s=3.0,
    rounds=2,
    round_warmup_s=0.5,
    round_s=1.5,
    connections=64,
    steady_members=5_000,
    release_stock=8_000,
    release_members=20_000,
    release_connections=200,
    release_opens_in_s=2.0,
    release_retry_share=0.1,
    release_max_s=60.0,
    writer_backlog=8_000,
    overload_factor=4.0,
    overload_connections=1500,
    client_timeout_s=2.0,
)


@dataclass
class Scenario:
    """One server under one load (one generator run, or several rounds pooled), and what the
    report says about it."""

    key: str
    title: str
    server: str  # what answered: the command line or baseline
    load: str  # how it was loaded
    run: Run  # the (first) run: its timeline is the one plotted
    focus: tuple[int, ...] = (202,)  # the statuses its throughput counts
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    more: list[Run] = field(default_factory=list)  # further rounds, pooled in the figures

    @property
    def runs(self) -> list[Run]:
        return [self.run, *self.more]

    @property
    def rate(self) -> float:
        """The scenario's throughput: answers with a ``focus`` status per second measured."""
        return self._pooled(self.focus)

    @property
    def answers_rate(self) -> float:
        return self._pooled(None)

    def _pooled(self, statuses: tuple[int, ...] | None) -> float:
        answers = sum(r.rate(statuses) * r.window_s for r in self.runs)
        return answers / sum(r.window_s for r in self.runs)

    def window_latencies(self) -> npt.NDArray[np.float64]:
        """Every answer's latency in the measured windows of every round (ms)."""
        return np.concatenate([r.latency_ms[r.in_window()] for r in self.runs])

    @property
    def latency(self) -> Latency:
        return Latency.of(self.window_latencies())

    def counts(self) -> dict[int, int]:
        total: Counter[int] = Counter()
        for r in self.runs:
            total.update(r.counts())
        return dict(total)

    @property
    def unexpected(self) -> int:
        """Answers (warm-up included) outside ``focus``: timing the wrong thing, if any."""
        return sum(c for s, c in self.counts().items() if s not in self.focus)


@dataclass
class Check:
    """A correctness check of the release: what was expected, what was found."""

    name: str
    ok: bool
    detail: str


@dataclass
class Results:
    plan: Plan
    command: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)  # single numbers (writer rows/s…)
    series: dict[str, Any] = field(default_factory=dict)  # for the plots (rows over time…)
    valkey: str = "?"
    postgres: str = "?"
    embedded: bool = True
    wall_s: float = 0.0
    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    skipped: list[str] = field(default_factory=list)

    def add(self, scenario: Scenario) -> Scenario:
        self.scenarios[scenario.key] = scenario
        return scenario

    def get(self, key: str) -> Scenario | None:
        return self.scenarios.get(key)


def release_tier(member: int, seed: int) -> int:
    """Tiers V1..V16, most members in the middle tiers as in a real book."""
    rng = random.Random(seed * 1_000_003 + member)
    return max(1, min(16, round(rng.gauss(6.5, 3.5))))


def quota_of(tier: int) -> int:
    """The release's quota: 1 from V4, 2 from V8 (0 below ``MIN_TIER``)."""
    return 0 if tier < MIN_TIER else 2 if tier >= 8 else 1


def steady_benefit(stock: int, title: str) -> dict[str, Any]:
    """A benefit open since a minute ago, one option, a quota no steady scenario reaches."""
    opens = datetime.now(UTC) - timedelta(minutes=1)
    return {
        "name": f"peak benchmark: {title}",
        "min_tier": MIN_TIER,
        "quota": STEADY_QUOTA,
        "stock_per_period": stock,
        "release": {"type": "once", "opens_at": opens.isoformat()},
        "options": [
            {
                "option_id": OPTION,
                "name": "iQiyi VIP",
                "kind": "direct_charge",
                "partner": "videohub",
                "sku": "IQY-MONTH",
            }
        ],
    }


def release_benefit(stock: int, opens_at: float) -> dict[str, Any]:
    """The monthly card: three options sharing the stock, 1 per member from V4, 2 from V8."""
    opens = datetime.fromtimestamp(opens_at, UTC)
    return {
        "name": "peak benchmark: release",
        "min_tier": MIN_TIER,
        "quota": [{"min_tier": MIN_TIER, "per_period": 1}, {"min_tier": 8, "per_period": 2}],
        "stock_per_period": stock,
        "release": {"type": "once", "opens_at": opens.isoformat(timespec="milliseconds")},
        "options": [
            {
                "option_id": o,
                "name": o,
                "kind": "direct_charge",
                "partner": "videohub",
                "sku": o.upper(),
            }
            for o in RELEASE_OPTIONS
        ],
    }
