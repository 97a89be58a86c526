"""The generator's machinery shared by every way of driving the load: the connections (one
request in flight each), recording each answer, client timeouts, reconnecting, progress on
stderr. What to send next is the subclass's (``generator``)."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.peak.records import CONN_ERROR, TIMEOUT, Recording
from bench.peak.wire import Conn, Requests, Slot, Spec

PROGRESS_EVERY_S = 2.0
SWEEP_EVERY_S = 0.05
CONNECT_BATCH = 100
RECONNECT_ATTEMPTS = 20
perf_ns = time.perf_counter_ns


class Driver:
    """Connections, records, timeouts and reconnects; subclasses decide what to send."""

    def __init__(self, spec: Spec, requests: Requests) -> None:
        self.spec = spec
        self.requests = requests
        self.rec = Recording()
        self.loop = asyncio.get_running_loop()
        self.slots = [Slot(i) for i in range(spec.connections)]
        self.timeout_ns = int(spec.timeout_s * 1e9)
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.counts: dict[int, int] = {}
        self.busy = 0
        self.stopping = False
        self.go_ns = self.stop_ns = 0
        self.reconnects = 0
        self.sent = 0
        self.cpu_share = 0.0

    async def connect_all(self) -> None:
        for start in range(0, len(self.slots), CONNECT_BATCH):
            batch = self.slots[start : start + CONNECT_BATCH]
            await asyncio.gather(*(self._connect(slot) for slot in batch))

    async def _connect(self, slot: Slot) -> None:
        for attempt in range(RECONNECT_ATTEMPTS):
            try:
                _, conn = await self.loop.create_connection(
                    lambda: Conn(self, slot), self.spec.host, self.spec.port
                )
                slot.conn = conn
                return
            except OSError:
                if attempt == RECONNECT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))

    def send(self, slot: Slot, request: bytes, tag: int, due: int | None = None) -> None:
        slot.request, slot.tag, slot.due = request, tag, due
        conn = slot.conn
        if conn is None or conn.transport is None:
            slot.pending = True  # reconnecting: sent once connected
            return
        self.busy += 1
        self.sent += 1
        conn.send(request, tag, perf_ns() if due is None else due)

    def answered(self, conn: Conn, status: int, body: bytes) -> None:
        now = perf_ns()
        self.busy -= 1
        self.rec.add(status, now - conn.due, now, conn.tag)
        self.counts[status] = self.counts.get(status, 0) + 1
        self.on_answer(conn.slot, status, body, conn.tag, now)

    def lost(self, conn: Conn) -> None:
        failed = conn.timed_out
        if conn.busy:
            conn.busy, failed = False, True
            self.busy -= 1
            now = perf_ns()
            self.rec.add(CONN_ERROR, now - conn.due, now, conn.tag)
            self.counts[CONN_ERROR] = self.counts.get(CONN_ERROR, 0) + 1
        slot = conn.slot
        if slot.conn is conn and not self.finished.done() and not slot.retired:
            slot.conn = None
            self.reconnects += 1
            self.loop.create_task(self._reconnect(slot, failed))

    async def _reconnect(self, slot: Slot, failed: bool) -> None:
        await asyncio.sleep(0.01)
        try:
            await self._connect(slot)
        except OSError:
            slot.retired = True
            self.maybe_finish()
            return
        if slot.pending:
            slot.pending = False
            self.send(slot, slot.request, slot.tag, slot.due)
        elif failed:
            self.retry(slot)

    def sweep(self) -> None:
        """Abandon requests older than the client timeout (their connection is dropped)."""
        if self.finished.done():
            return
        now = perf_ns()
        for slot in self.slots:
            conn = slot.conn
            if conn is not None and conn.busy and now - conn.due > self.timeout_ns:
                conn.busy, conn.timed_out = False, True
                self.busy -= 1
                self.rec.add(TIMEOUT, now - conn.due, now, conn.tag)
                self.counts[TIMEOUT] = self.counts.get(TIMEOUT, 0) + 1
                if conn.transport is not None:
                    conn.transport.abort()
        self.loop.call_later(SWEEP_EVERY_S, self.sweep)

    async def progress(self) -> None:
        last_n, last_t = 0, perf_ns()
        while not self.finished.done():
            await asyncio.sleep(PROGRESS_EVERY_S)
            n, now = len(self.rec.status), perf_ns()
            top = sorted(self.counts.items(), key=lambda kv: -kv[1])[:5]
            rate = (n - last_n) * 1e9 / (now - last_t)
            statuses = " ".join(f"{s}:{c:,}" for s, c in top)
            elapsed = (now - self.go_ns) / 1e9
            print(
                f"    {self.spec.label} {elapsed:5.1f}s {rate:8,.0f}/s  {statuses}",
                file=sys.stderr,
                flush=True,
            )
            last_n, last_t = n, now

    def maybe_finish(self) -> None:
        if self.stopping and self.busy <= 0 and not self.finished.done():
            self.finished.set_result(None)

    def stop(self) -> None:
        if not self.stopping:
            self.stopping, self.stop_ns = True, perf_ns()
        self.maybe_finish()

    async def run(self, go: dict[str, Any]) -> None:
        self.go_ns = perf_ns()
        cpu = time.process_time()
        self.loop.call_later(SWEEP_EVERY_S, self.sweep)
        ticker = self.loop.create_task(self.progress())
        self.start(go)
        await self.finished
        ticker.cancel()
        # How much of a CPU the generator itself took while loading (its cost on 2 cores).
        self.cpu_share = (time.process_time() - cpu) / max((perf_ns() - self.go_ns) / 1e9, 1e-9)
        for slot in self.slots:
            slot.retired = True
            if slot.conn is not None and slot.conn.transport is not None:
                slot.conn.transport.close()

    def meta(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "go_ns": self.go_ns,
            "stop_ns": self.stop_ns,
            "warmup_s": self.spec.warmup_s,
            "sent": self.sent,
            "counts": self.counts,
            "reconnects": self.reconnects,
            "cpu_share": self.cpu_share,
        }

    def write(self) -> None:
        self.rec.write(Path(self.spec.out), self.meta())

    # -- what each mode decides --------------------------------------------------------

    def start(self, go: dict[str, Any]) -> None:
        raise NotImplementedError

    def on_answer(self, slot: Slot, status: int, body: bytes, tag: int, now: int) -> None:
        raise NotImplementedError

    def retry(self, slot: Slot) -> None:
        """After a request was lost (timeout, broken connection), on a new connection."""
        raise NotImplementedError
