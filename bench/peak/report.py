"""The Markdown report: machine and versions, the command, each target (met or missed by how
much), every scenario's figures, the release's books, the plots, and a section kept for
profile findings (carried over when the report is recorded again)."""

from __future__ import annotations

import math
import os
import re
import statistics
from pathlib import Path

from bench.peak.model import Results, Scenario
from bench.peak.records import CONN_ERROR, QUEUED_TIMEOUT, TIMEOUT
from bench.peak.targets import evaluate, ratio
from bench.report import machine

REPO = Path(__file__).resolve().parents[2]
FINDINGS_START = "<!-- profile-findings:start -->"
FINDINGS_END = "<!-- profile-findings:end -->"
FINDINGS_PLACEHOLDER = (
    "_Not written yet: where the claim path spends its time under this load (py-spy on "
    "`serve` during the steady 1-worker scenario), and what to change._"
)
STATUS_NAMES = {TIMEOUT: "timeout", CONN_ERROR: "conn error"}
SHORT = {
    "ceiling": "trivial server",
    "a": "(a)",
    "b": "(b)",
    "c": "(c)",
    "d": "(d)",
    "svc1": "service",
    "svc2": "2 workers",
    "soldout": "sold out",
    "durable": "durability local",
    "backlog": "no writer",
}
ANSWERED = tuple(range(100, 600))  # HTTP statuses: not a timeout or a broken connection
ORDER = (
    "ceiling",
    "a",
    "b",
    "c",
    "d",
    "svc1",
    "svc2",
    "soldout",
    "durable",
    "backlog",
    "release",
    "overload",
)


def _commit() -> str:
    """HEAD's commit, read from ``.git`` (no git process)."""
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head.removeprefix("ref: ")
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return "?"


def _settings() -> str:
    """``CLAIM_*`` variables set for the run; values hidden where they may be secret."""
    names = sorted(n for n in os.environ if n.startswith("CLAIM_"))
    shown = [
        n if any(w in n for w in ("SECRET", "TOKEN", "KEY", "URL")) else f"{n}={os.environ[n]}"
        for n in names
    ]
    return ", ".join(f"`{x}`" for x in shown) or "none (defaults)"


def _load(avg: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in avg)


def _ms(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def _outcomes(scenario: Scenario) -> str:
    counts = scenario.counts()
    return ", ".join(f"{STATUS_NAMES.get(s, s)}: {c:,}" for s, c in sorted(counts.items()))


def _vs(results: Results, scenario: Scenario, base: str) -> str:
    if scenario.key in ("ceiling", "release", "overload") or scenario.key == base:
        return ""
    if scenario.key == "soldout" and base != "a":  # only (a) answers as cheaply
        return ""
    value = ratio(results, scenario.key, base)
    return "" if value is None else f"{value:.2f}×"


def header(results: Results) -> list[str]:
    plan = results.plan
    servers = (
        "embedded, throw-away: Valkey without AOF, PostgreSQL with fsync off"
        if results.embedded
        else "from CLAIM_REDIS_URL / CLAIM_DATABASE_URL"
    )
    return [
        "# Peak load benchmark" + (" (quick run)" if plan.quick else ""),
        "",
        f"- date: {results.started_at:%Y-%m-%d %H:%M:%S %Z}",
        f"- reproduce: `{results.command}` (after the README's set-up; `--record` writes "
        "this file)",
        f"- commit: {_commit()}",
        *(f"- {k}: {v}" for k, v in machine()),
        f"- Valkey {results.valkey}, PostgreSQL {results.postgres} ({servers})",
        f"- load average at start / end: {_load(results.load_before)} / "
        f"{_load(results.load_after)}",
        f"- run time: {results.wall_s:.0f} s",
        f"- settings from the environment (reach every server): {_settings()}",
        "- server, load generator, Valkey and PostgreSQL share this machine's CPUs; the "
        "generator is its own process",
    ]


def targets_section(results: Results) -> list[str]:
    lines = ["", "## Targets", "", "| target | goal | this run | verdict |", "|---|---|---|---|"]
    for t in evaluate(results):
        lines.append(f"| {t.name} | {t.goal} | {t.shown} | {t.verdict()} |")
    two = ratio(results, "svc2", "a")
    durable = ratio(results, "durable", "svc1")
    if two is not None:
        lines.append(
            f"| claim throughput, 2 workers, vs baseline (a) (reported) | – | "
            f"{two:.2f}× (a), {ratio(results, 'svc2', 'svc1') or 0:.2f}× 1 worker | – |"
        )
    if durable is not None:
        lines.append(
            f"| claim throughput, CLAIM_DURABILITY=local vs none (reported) | – | "
            f"{durable:.2f}× | – |"
        )
    return lines


def scenarios_section(results: Results) -> list[str]:
    lines = [
        "",
        "## Scenarios",
        "",
        "Throughput counts the answers each scenario is about (202 for claims, 410 for "
        "sold-out, every decided claim for the release) per second of the measured window; "
        "latency covers every answer in that window, from when the request was sent "
        "(open loop: from when it was due).",
        "",
        "| scenario | load | throughput | p50 ms | p90 ms | p99 ms | max ms | outcomes (whole "
        "run) | ÷ (a) | ÷ (b) | ÷ (c) | ÷ (d) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for key in ORDER:
        s = results.get(key)
        if s is None:
            continue
        lat = s.latency
        note = "; ".join(s.notes)
        lines.append(
            f"| {s.title}{' — ' + note if note else ''} | {s.load} | {s.rate:,.0f}/s | "
            f"{_ms(lat.p50)} | {_ms(lat.p90)} | {_ms(lat.p99)} | {_ms(lat.max)} | "
            f"{_outcomes(s)} | " + " | ".join(_vs(results, s, b) for b in "abcd") + " |"
        )
    lines += ["", "What answered each scenario:", ""]
    lines += [
        f"- {s.title.split(':')[0]}: `{s.server}`"
        for k in ORDER
        if (s := results.get(k)) is not None and k not in ("release", "overload", "svc2")
    ]
    return lines


def release_section(results: Results) -> list[str]:
    s = results.get("release")
    if s is None:
        return []
    f, meta = results.figures, s.run.meta
    per_second = results.series.get("release_per_second", [])
    lines = [
        "",
        "## Release",
        "",
        f"{s.load}. Sold out {f.get('sell_out_s', float('nan')):.1f} s after the opening "
        f"(first 410); {meta['members_used']:,} members played, {meta['sent']:,} requests "
        f"sent; {meta['accepted']:,} claims accepted ({meta.get('late_accepts', 0):,} of them "
        f"first learnt from a 200 after a client timeout), {meta['replays']:,} resent with "
        f"the same request_id. Claims decided per second after the opening: "
        + ", ".join(f"{n:,}" for n in per_second[:20])
        + (" …" if len(per_second) > 20 else "")
        + ".",
        "",
        "| check | ok | found |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {'yes' if c.ok else '**no**'} | {c.detail} |" for c in results.checks]
    return lines


def other_sections(results: Results) -> list[str]:
    f = results.figures
    lines: list[str] = []
    if "writer_rows" in f:
        lines += [
            "",
            "## Writer alone",
            "",
            f"{f['writer_rows']:,.0f} claims accepted with no writer running (the "
            "`backlog` row above), then one `claim-service writer` drained them: "
            f"{f.get('writer_rows_per_s', float('nan')):,.0f} rows/s from its first "
            f"commit batch to its last, {f['writer_wall_s']:.1f} s from starting the "
            "process to the last row (start-up included).",
        ]
    s = results.get("overload")
    if s is not None:
        run = s.run
        window = run.in_window()
        text = (
            f"Offered {s.extra['offered']:,.0f} req/s ({results.plan.overload_factor:g}"
            f"× the {s.extra['sustained']:,.0f} claims/s sustained); answered "
            f"{run.rate(ANSWERED):,.0f}/s. Largest client-side queue of requests waiting for a "
            f"free connection: {run.meta.get('max_backlog', 0):,}."
        )
        never_sent = int((window & (run.tag == QUEUED_TIMEOUT)).sum())
        if never_sent:
            text += (
                f" Of the timeouts, {never_sent:,} were never sent: no connection came free "
                "within the client timeout."
            )
        lines += [
            "",
            "## Overload",
            "",
            text,
            "",
            "| outcome (measured window) | count | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for status, count in sorted(run.counts(window).items()):
            lat = run.latency(window & run.of(status))
            lines.append(
                f"| {STATUS_NAMES.get(status, status)} | {count:,} | "
                f"{_ms(lat.p50)} | {_ms(lat.p99)} | {_ms(lat.max)} |"
            )
    ceiling, fastest = (
        results.get("ceiling"),
        max(
            (s.rate for k, s in results.scenarios.items() if k not in ("ceiling", "overload")),
            default=0.0,
        ),
    )
    if ceiling is not None and fastest:
        shares = ", ".join(
            f"{SHORT.get(s.key, s.key)} "
            f"{statistics.mean(float(r.meta.get('cpu_share', 0.0)) for r in s.runs):.0%}"
            for k in ORDER
            if (s := results.get(k)) is not None
        )
        lines += [
            "",
            "## Load generator",
            "",
            f"Against a trivial server the generator drove {ceiling.rate:,.0f} req/s "
            f"({ceiling.rate / fastest:.1f}× the fastest server measured here, "
            f"{fastest:,.0f}/s), sharing the CPUs with it: it is not what limits the "
            "figures above. What it took of one CPU while loading each: " + shares + " (the "
            "rest of the two CPUs is what the server, Valkey and PostgreSQL shared).",
        ]
    if results.skipped:
        lines += ["", "## Not measured", ""] + [f"- {s}" for s in results.skipped]
    return lines


def method_section(results: Results) -> list[str]:
    plan = results.plan
    return [
        "",
        "## Method",
        "",
        "One asyncio load generator process (raw keep-alive HTTP/1.1 on uvloop, requests "
        "encoded up front, answers parsed down to the status line and Content-Length) drives "
        "one server at a time; every server is a real process (the service as `claim-service "
        "serve`, with a separate `claim-service writer`). The baselines and the service (1 "
        "and 2 workers, sold-out answers) are all started first and then loaded in "
        f"{plan.rounds} interleaved rounds whose order rotates, so that other work on the "
        "machine weighs on each alike; their figures pool the rounds. Steady scenarios use "
        "members with tier V5 on a benefit of their own whose stock and quota no run "
        "reaches, so every claim is a fresh one that must be accepted (checked against the "
        "service's stock taken); each member claims a few times with new request_ids, so its "
        "token is verified once and then found in the service's cache. Baselines (c) and (d) "
        "check tokens as the service does (cached); (b) decodes each token. The release and "
        "overload scenarios each get a `serve` of their own. PostgreSQL and Valkey are tuned "
        "for throw-away runs (embedded mode), which flatters (d) and the writer more than the "
        "service. `--profile` adds a py-spy flame graph of `serve` (first 1-worker round) to "
        "the run folder; `--keep-records` keeps the generator's raw records.",
    ]


def findings_section(previous: str | None) -> list[str]:
    kept = FINDINGS_PLACEHOLDER
    if previous:
        match = re.search(
            re.escape(FINDINGS_START) + r"\n(.*?)\n" + re.escape(FINDINGS_END), previous, re.S
        )
        if match and match.group(1).strip():
            kept = match.group(1).strip()
    return ["", "## Profile findings", "", FINDINGS_START, kept, FINDINGS_END]


def render(results: Results, plots: list[str], previous: str | None = None) -> str:
    lines = header(results) + targets_section(results) + scenarios_section(results)
    lines += release_section(results) + other_sections(results)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.removesuffix('.png')}](peak/{p})" for p in plots]
    lines += method_section(results) + findings_section(previous) + [""]
    return "\n".join(lines)
