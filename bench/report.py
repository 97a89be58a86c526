"""The Markdown report of a benchmark run: machine, command, measurements, interpretation."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path

LIBRARIES = ("aiohttp", "redis", "hiredis", "PyJWT", "cryptography", "uvloop", "asyncpg")


@dataclass
class Row:
    """One measurement: a sample per repeat, in ``µs`` per operation or ``req/s``."""

    key: str
    what: str
    unit: str
    samples: list[float]
    ops: int  # operations timed, warm-up excluded
    accepted: int | None = None  # claims accepted, warm-up included ...
    expected: int | None = None  # ... out of this many sent
    baseline: str | None = None  # key of the row this one is compared with
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def all_accepted(self) -> bool:
        return self.accepted == self.expected


@dataclass
class Report:
    started_at: datetime
    rows: list[Row] = field(default_factory=list)
    valkey: str = "?"
    postgres: str = "?"
    members: int = 0
    accepted_total: int = 0
    stock_taken: int = 0
    duration_s: float = 0.0
    wall_s: float = 0.0
    command: str = ""
    quick: bool = False
    embedded: bool = True
    repeats: int = 0
    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    nproc: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def has(self, key: str) -> bool:
        return any(r.key == key for r in self.rows)

    @property
    def all_accepted(self) -> bool:
        return (
            all(r.all_accepted for r in self.rows if r.expected is not None)
            and self.stock_taken == self.accepted_total
        )


def ratio(report: Report, row: Row) -> str:
    if row.baseline is None:
        return "1 (baseline)" if row.key in {r.baseline for r in report.rows} else ""
    base = report.row(row.baseline)
    value = row.median / base.median
    name = {"ping": "PING", "healthz": "/healthz rate"}.get(base.key, base.key)
    return f"{value:.2f}× {name}" if value >= 0.1 else f"{value:.2g}× {name}"


def _fmt(value: float, unit: str) -> str:
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    if value < 1:
        return f"{value:.2f} µs"
    return f"{value:,.1f} µs" if value < 1000 else f"{value:,.0f} µs"


def machine() -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = []
    for name in LIBRARIES:
        try:
            libs.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return [
        ("nproc", f"{len(os.sched_getaffinity(0))} (of {os.cpu_count()} CPUs on the machine)"),
        ("cpu", cpu),
        ("os", platform.platform()),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("libraries", ", ".join(libs)),
    ]


def _git() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + (" (with uncommitted changes)" if dirty else "")


def interpretation(report: Report) -> list[str]:
    """3-5 sentences read off this run's numbers (worded by comparing them, not fixed)."""
    ping, lone = report.row("ping").median, report.row("lone").median
    bursts = sorted((r for r in report.rows if r.key.startswith("burst")),
                    key=lambda r: int(r.key.removeprefix("burst")))  # fmt: skip
    coalesced = min((r.median for r in bursts), default=lone)
    out = [
        f"A claim decided alone costs {lone:.0f} µs, {lone / ping:.1f}× a PING from the same "
        "client: one EVALSHA round trip plus the Lua decision and the engine's per-claim "
        "Python work (future, batch task, reply decoding)."
    ]
    if bursts:
        parts = ", ".join(
            f"{r.median:.1f} µs with {r.key.removeprefix('burst')} in flight ({r.note})"
            for r in bursts
        )
        below = "below" if coalesced < ping else "still above"
        sentence = (
            f"Coalesced, the cost per claim falls to {parts}, {lone / coalesced:.0f}× cheaper "
            f"than alone and {below} one PING"
        )
        if report.has("ping64"):
            p64 = report.row("ping64").median
            sentence += (
                f"; 64 PINGs in flight on separate connections still cost {p64:.1f} µs each, "
                "so sharing the round trip, not mere concurrency, is what makes batches cheap"
                if p64 > coalesced
                else f"; 64 PINGs in flight cost only {p64:.1f} µs each, so concurrency alone "
                "buys as much as coalescing here"
            )
        out.append(sentence + ".")
    hs, cached = report.row("jwt_hs256").median, report.row("jwt_cached").median
    gateway = [r for r in report.rows if r.key in ("jwt_rs256", "jwt_es256")]
    others = ", ".join(f"{r.what.split()[0]} {r.median:.0f} µs" for r in gateway)
    out.append(
        f"Verifying an unseen HS256 token takes {hs:.0f} µs ({hs / ping:.2f}× PING"
        + (f"; {others}" if others else "")
        + f"): {'less' if hs < lone else 'more'} than a lone claim but "
        f"{hs / coalesced:.1f}× a coalesced one, so during a burst checking the signature "
        f"costs {'more' if hs > coalesced else 'less'} than deciding the claim, and the cache "
        f"({cached:.2f} µs) is what keeps a member's retries cheap."
    )
    if report.has("http_claims"):
        http, health = report.row("http_claims"), report.row("healthz")
        extra = 1e6 / http.median - 1e6 / health.median
        out.append(
            f"Over HTTP the service decided {http.median:,.0f} claims/s, "
            f"{http.median / health.median:.0%} of the /healthz rate with the same client: "
            f"each claim costs about {extra:.0f} µs of event-loop time more than a /healthz "
            f"request, of which JWT and the coalesced decision explain about "
            f"{hs + coalesced:.0f} µs, the rest being request and response handling on both "
            "ends (client and server share one process and loop here, so compare this ratio "
            "between commits, not as the capacity of a multi-worker deployment)."
        )
    busiest = max(report.load_before[0], report.load_after[0])
    if busiest > 0.5 * report.nproc:
        out.append(
            f"Other work kept the machine busy (load average up to {busiest:.1f} on "
            f"{report.nproc} CPUs), which widens the min – max spreads; rerun on a quiet "
            "machine before reading small differences between commits into these figures."
        )
    return out


def _load(avg: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in avg)


def render(report: Report) -> str:
    lines = [
        "# Claim path micro-benchmark" + (" (quick run)" if report.quick else ""),
        "",
        f"- date: {report.started_at:%Y-%m-%d %H:%M:%S %Z}",
        f"- reproduce: `{report.command}` (same as `python -m bench claim-path"
        + (" --quick" if report.quick else "")
        + "`)",
        f"- commit: {_git()}",
        *(f"- {k}: {v}" for k, v in machine()),
        f"- valkey {report.valkey}, PostgreSQL {report.postgres} "
        + (
            "(embedded, ephemeral, on the same machine)"
            if report.embedded
            else "(from CLAIM_REDIS_URL / CLAIM_DATABASE_URL)"
        ),
        f"- load average at start / end: {_load(report.load_before)} / {_load(report.load_after)}",
        f"- run time: {report.duration_s:.1f} s measuring, {report.wall_s:.1f} s with "
        "server start-up",
        "",
        "Each row: one warm-up round, then "
        f"{report.repeats} timed repeats; the median and the "
        "range of the repeats. Every claim comes from a member who has not claimed yet "
        "(quota 1), so each should be accepted; the *accepted* column counts them, warm-up "
        "included.",
        "",
        "| measurement | median | min – max | ratio | ops timed | accepted / sent | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in report.rows:
        accepted = "" if row.expected is None else f"{row.accepted:,} / {row.expected:,}"
        if row.expected is not None and not row.all_accepted:
            accepted += " **(!)**"
        lines.append(
            f"| {row.what} | {_fmt(row.median, row.unit)} | "
            f"{_fmt(min(row.samples), row.unit)} – {_fmt(max(row.samples), row.unit)} | "
            f"{ratio(report, row)} | {row.ops:,} | {accepted} | {row.note} |"
        )
    check = "matches" if report.stock_taken == report.accepted_total else "**does not match**"
    lines += [
        "",
        f"Stock taken in Valkey ({report.stock_taken:,}) {check} the claims accepted "
        f"({report.accepted_total:,}); {report.members:,} members had tiers loaded.",
    ]
    if not report.all_accepted:
        lines += ["", "**Some claims were not accepted: the claim rows are not trustworthy.**"]
    lines += ["", "## Interpretation", "", " ".join(interpretation(report)), ""]
    return "\n".join(lines)


def write_report(report: Report, path: Path) -> str:
    text = render(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text
