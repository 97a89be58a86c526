"""What the load generator records, and how the benchmark reads it back.

The generator process appends one entry per answered (or abandoned) request to four flat
arrays: HTTP status, latency, completion time (``perf_counter_ns``) and a tag saying why the
request was sent. Appending to ``array`` costs well under a microsecond, so recording never
limits the rate; the arrays are written raw next to a JSON summary. The benchmark process
loads them with numpy and derives everything (rates, percentiles, timelines) from the same
records, so every figure in the report can be recomputed from the run folder.
"""

from __future__ import annotations

import json
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# Statuses the generator records for requests that got no HTTP answer.
TIMEOUT = 0  # not answered within the client timeout (sent, or waiting for a connection)
CONN_ERROR = 1  # the connection broke while the request was in flight

# Why a request was sent (the ``tag`` of its record).
FIRST = 0  # a member's claim, first attempt (or the next request of a closed loop)
REPLAY = 1  # the same request again after a 202 (the app timed out and resent it)
EARLY = 2  # resent after 425 (the release had not opened yet)
BACKOFF = 3  # resent after 503 / 429 / a timeout / a broken connection
NEXT = 4  # the same member's next claim (a new request_id) after an accepted one
QUEUED_TIMEOUT = 5  # open loop: never sent, no connection was free within the timeout

BIN_S = 0.1  # timeline resolution

ARRAYS = (
    ("status", "H", np.uint16),
    ("latency", "q", np.int64),
    ("end", "q", np.int64),
    ("tag", "B", np.uint8),
)


class Recording:
    """The generator's side: append-only arrays, written raw at the end."""

    def __init__(self) -> None:
        self.status = array("H")
        self.latency = array("q")  # ns, from when the request was due
        self.end = array("q")  # perf_counter_ns when it was answered
        self.tag = array("B")
        # One moment read on both clocks, to turn perf_counter_ns into wall-clock time.
        self.base_ns = time.perf_counter_ns()
        self.base_wall = time.time()

    def add(self, status: int, latency_ns: int, end_ns: int, tag: int) -> None:
        self.status.append(status)
        self.latency.append(latency_ns)
        self.end.append(end_ns)
        self.tag.append(tag)

    def wall(self, ns: int) -> float:
        return self.base_wall + (ns - self.base_ns) / 1e9

    def write(self, prefix: Path, meta: dict[str, Any]) -> None:
        with open(prefix.with_suffix(".bin"), "wb") as out:
            for name, _, _ in ARRAYS:
                getattr(self, name).tofile(out)
        meta = {
            **meta,
            "records": len(self.status),
            "base_ns": self.base_ns,
            "base_wall": self.base_wall,
        }
        prefix.with_suffix(".json").write_text(json.dumps(meta, indent=1))


@dataclass
class Run:
    """One generator run, loaded: times in seconds from the start of the load (``go``)."""

    meta: dict[str, Any]
    status: npt.NDArray[np.uint16]
    latency_ms: npt.NDArray[np.float64]
    end_s: npt.NDArray[np.float64]
    tag: npt.NDArray[np.uint8]
    go_wall: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)  # the measured part: warm-up excluded
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, prefix: Path) -> Run:
        meta = json.loads(prefix.with_suffix(".json").read_text())
        n = int(meta["records"])
        raw = prefix.with_suffix(".bin").read_bytes()
        columns: dict[str, Any] = {}
        offset = 0
        for name, _, dtype in ARRAYS:
            size = np.dtype(dtype).itemsize * n
            columns[name] = np.frombuffer(raw, dtype=dtype, count=n, offset=offset)
            offset += size
        go_ns = int(meta["go_ns"])
        end_s = (columns["end"] - go_ns) / 1e9
        run = cls(meta, columns["status"], columns["latency"] / 1e6, end_s, columns["tag"])
        run.go_wall = float(meta["base_wall"]) + (go_ns - int(meta["base_ns"])) / 1e9
        stop = (int(meta["stop_ns"]) - go_ns) / 1e9
        run.window = (float(meta.get("warmup_s", 0.0)), stop)
        return run

    def wall_to_s(self, wall: float) -> float:
        """A wall-clock time as seconds from the start of the load."""
        return wall - self.go_wall

    def in_window(self) -> npt.NDArray[np.bool_]:
        start, stop = self.window
        return (self.end_s >= start) & (self.end_s < stop)

    @property
    def window_s(self) -> float:
        return max(self.window[1] - self.window[0], 1e-9)

    def counts(self, mask: npt.NDArray[np.bool_] | None = None) -> dict[int, int]:
        values, counts = np.unique(
            self.status if mask is None else self.status[mask], return_counts=True
        )
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def rate(self, statuses: tuple[int, ...] | None = None) -> float:
        """Answers per second within the measured window (of ``statuses`` only, if given)."""
        mask = self.in_window()
        if statuses is not None:
            mask &= np.isin(self.status, statuses)
        return float(mask.sum()) / self.window_s

    def latency(self, mask: npt.NDArray[np.bool_] | None = None) -> Latency:
        return Latency.of(self.latency_ms if mask is None else self.latency_ms[mask])

    def of(self, *statuses: int) -> npt.NDArray[np.bool_]:
        return np.isin(self.status, statuses)

    def timeline(
        self, mask: npt.NDArray[np.bool_] | None = None, bin_s: float = BIN_S
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Answers per second over time, in bins of ``bin_s``: (bin starts, rates)."""
        ends = self.end_s if mask is None else self.end_s[mask]
        last = float(self.end_s.max()) if len(self.end_s) else 0.0
        edges = np.arange(
            min(0.0, float(self.end_s.min()) if len(self.end_s) else 0.0), last + bin_s, bin_s
        )
        if len(edges) < 2:
            edges = np.array([0.0, bin_s])
        counts, _ = np.histogram(ends, bins=edges)
        return edges[:-1], counts / bin_s


@dataclass(frozen=True)
class Latency:
    """Percentiles of a set of latencies, in milliseconds."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: npt.NDArray[np.float64]) -> Latency:
        if len(values) == 0:
            return cls(0, float("nan"), float("nan"), float("nan"), float("nan"))
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return cls(len(values), float(p50), float(p90), float(p99), float(values.max()))
