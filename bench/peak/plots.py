"""The report's PNG plots (matplotlib's object API on the Agg canvas: no global state).

- ``throughput.png``: answers per second over time, one panel per steady scenario;
- ``release.png``: the release by outcome around the opening (the spike), and accepted
  claims against rows in PostgreSQL;
- ``latency.png``: the latency distribution (CDF) of every steady scenario;
- ``overload.png``: offered against answered load by outcome, and the CDF per outcome.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.peak.model import Results, Scenario
from bench.peak.records import CONN_ERROR, TIMEOUT, Run

STEADY = ("ceiling", "a", "b", "c", "d", "svc1", "svc2", "soldout", "durable", "backlog")
OUTCOMES = (
    ("202 accepted", (202,)),
    ("200 replayed", (200,)),
    ("403 tier", (403,)),
    ("409 quota", (409,)),
    ("410 sold out", (410,)),
    ("425 not open", (425,)),
    ("429/503 shed", (429, 503)),
    ("timeout/error", (TIMEOUT, CONN_ERROR)),
)
SMOOTH_S = 0.25


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def _short(scenario: Scenario) -> str:
    return scenario.title.split(":")[0] if scenario.key in "abcd" else scenario.title


def throughput(results: Results, path: Path) -> None:
    shown = [results.scenarios[k] for k in STEADY if k in results.scenarios]
    cols = 2
    rows = max(math.ceil(len(shown) / cols), 1)
    fig = Figure(figsize=(11, 2.2 * rows + 0.6), layout="constrained")
    fig.suptitle("Answers per second over time (steady scenarios; warm-up shaded)")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, scenario in zip(axes.flat, shown, strict=False):
        start, rate = scenario.run.timeline(bin_s=SMOOTH_S)
        ax.plot(start, rate, lw=1)
        ax.axvspan(min(start[0], 0.0), scenario.run.window[0], color="0.9")
        first = f"; round 1 of {len(scenario.runs)} shown" if scenario.more else ""
        ax.set_title(f"{_short(scenario)}: {scenario.rate:,.0f}/s{first}", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("s", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    _save(fig, path)


def _by_outcome(ax: Axes, run: Run, origin: float, bin_s: float) -> None:
    for label, statuses in OUTCOMES:
        mask = run.of(*statuses)
        if not mask.any():
            continue
        start, rate = run.timeline(mask, bin_s=bin_s)
        ax.plot(start - origin, rate, lw=1, label=label)
    ax.set_ylabel("answers/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, ncols=4, loc="upper right")


def release(results: Results, path: Path) -> None:
    scenario = results.get("release")
    if scenario is None:
        return
    run = scenario.run
    opens = float(scenario.extra["opens_s"])
    fig = Figure(figsize=(11, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    _by_outcome(top, run, opens, 0.1)
    top.set_title("Release: answers per second by outcome (100 ms bins; 0 = the opening)")
    sold = results.figures.get("sell_out_s")
    for ax in (top, bottom):
        ax.axvline(0, color="k", lw=0.8, ls="--")
        if sold is not None and not math.isnan(sold):
            ax.axvline(sold, color="r", lw=0.8, ls="--")
    accepted = np.sort(run.end_s[run.of(202)]) - opens
    bottom.plot(accepted, np.arange(1, len(accepted) + 1), label="accepted (202), cumulative")
    rows = results.series.get("release_rows", [])
    if rows:
        t, n = zip(*rows, strict=True)
        bottom.plot(np.array(t) - opens, n, label="rows in PostgreSQL")
    bottom.set_xlabel("seconds since the opening (red: first 410)")
    bottom.set_ylabel("claims")
    bottom.legend(fontsize=8)
    _save(fig, path)


def _cdf(ax: Axes, values: npt.NDArray[np.float64], label: str) -> None:
    if len(values) == 0:
        return
    ordered = np.sort(values)
    ax.plot(
        np.maximum(ordered, 1e-3), np.arange(1, len(ordered) + 1) / len(ordered), lw=1, label=label
    )


def latency(results: Results, path: Path) -> None:
    fig = Figure(figsize=(11, 6), layout="constrained")
    ax = fig.subplots()
    ax.set_prop_cycle(color=[colormaps["tab20"](i) for i in range(20)])
    for key in STEADY:
        scenario = results.get(key)
        if scenario is not None:
            _cdf(
                ax,
                scenario.window_latencies(),
                f"{_short(scenario)} (p99 {scenario.latency.p99:,.1f} ms)",
            )
    release_ = results.get("release")
    if release_ is not None:
        run = release_.run
        decided = run.in_window() & run.of(*release_.focus)
        _cdf(
            ax,
            run.latency_ms[decided],
            f"release, claims decided (p99 {run.latency(decided).p99:,.1f} ms)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("share of answers at or below")
    ax.set_title("Latency distribution (measured window)")
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def overload(results: Results, path: Path) -> None:
    scenario = results.get("overload")
    if scenario is None:
        return
    run = scenario.run
    fig = Figure(figsize=(11, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    _by_outcome(top, run, 0.0, SMOOTH_S)
    top.axhline(scenario.extra["offered"], color="k", lw=0.8, ls="--", label="offered")
    top.set_title(f"Overload: {scenario.extra['offered']:,.0f} req/s offered (dashed)")
    top.set_xlabel("s")
    window = run.in_window()
    for label, statuses in OUTCOMES:
        mask = window & run.of(*statuses)
        _cdf(bottom, run.latency_ms[mask], label)
    bottom.set_xscale("log")
    bottom.set_xlabel("latency from when the request was due (ms, log scale)")
    bottom.set_ylabel("share at or below")
    bottom.grid(True, which="both", lw=0.3)
    bottom.legend(fontsize=8)
    _save(fig, path)


def draw(results: Results, folder: Path) -> list[str]:
    """Every plot into ``folder``; the file names written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in (
        ("throughput", throughput),
        ("release", release),
        ("latency", latency),
        ("overload", overload),
    ):
        plot(results, folder / f"{name}.png")
        if (folder / f"{name}.png").exists():
            written.append(f"{name}.png")
    return written
