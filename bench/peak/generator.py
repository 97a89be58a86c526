"""The load generator: ``python -m bench.peak.generator SPEC.json``, one process of its own.

Raw keep-alive HTTP/1.1 on asyncio Protocols under uvloop (no HTTP client library: aiohttp's
or locust's clients spend more CPU per request than the server under test, and on two cores
that would measure the client). Each connection has one request in flight. The request line
and headers (with the member's token, minted before the clock starts) are encoded once per
member; only the small JSON body is built per request. Answers are parsed no further than
the status line and ``Content-Length`` (and, for the release, the ``claim_id``).

Three ways to drive the load:

- ``closed``: ``connections`` connections, each sending its next request as soon as the
  last is answered, for ``duration_s`` (what a server sustains, and its latency there);
- ``open``: requests due at a fixed ``rate`` whatever the server does, over up to
  ``connections`` connections; a request waits for a free connection if none is, and its
  latency counts from when it was due (no coordinated omission); one not answered within
  ``timeout_s`` is a client timeout;
- ``release``: each connection plays members in turn (a shuffled queue): it claims, retries
  after ``425`` until the opening, resends a share of accepted claims with the same
  ``request_id`` (the answer must be the same claim), claims again while the member's quota
  allows, backs off after ``503``/``429``, and stops at the first ``410``.

Protocol with the benchmark: once every connection is open the generator prints ``ready``
on stdout and waits for one JSON line on stdin (``{"open_ts": ...}`` for a release); the
load starts then. Records go to ``out`` (see ``records``); progress goes to stderr.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections import deque
from pathlib import Path
from typing import Any

import uvloop

from bench.peak.driver import Driver, perf_ns
from bench.peak.records import BACKOFF, EARLY, FIRST, NEXT, QUEUED_TIMEOUT, REPLAY, TIMEOUT
from bench.peak.wire import Requests, Slot, Spec, claim_id_of
from claim_service.config import Settings
from claim_service.http.server import file_limit

TICK_S = 0.001


class ClosedLoop(Driver):
    def __init__(self, spec: Spec, requests: Requests) -> None:
        super().__init__(spec, requests)
        self.issued = 0

    def start(self, go: dict[str, Any]) -> None:
        self.loop.call_later(self.spec.duration_s, self.stop)
        for slot in self.slots:
            self.next(slot)

    def next(self, slot: Slot) -> None:
        if self.stopping:
            self.maybe_finish()
            return
        if self.spec.max_requests and self.issued >= self.spec.max_requests:
            self.stop()
            return
        k, self.issued = self.issued, self.issued + 1
        self.send(slot, self.requests.nth(k), FIRST)

    def on_answer(self, slot: Slot, status: int, body: bytes, tag: int, now: int) -> None:
        self.next(slot)

    def retry(self, slot: Slot) -> None:
        self.next(slot)


class OpenLoop(Driver):
    def __init__(self, spec: Spec, requests: Requests) -> None:
        super().__init__(spec, requests)
        self.issued = self.max_backlog = self.t0 = self.stop_at = 0
        self.idle = list(self.slots)
        self.backlog: deque[tuple[int, int]] = deque()  # (request number, when it was due)
        self.interval = 1e9 / spec.rate

    def start(self, go: dict[str, Any]) -> None:
        self.t0 = perf_ns()
        self.stop_at = self.t0 + int(self.spec.duration_s * 1e9)
        self.tick()

    def tick(self) -> None:
        now = perf_ns()
        due_count = int((min(now, self.stop_at) - self.t0) / self.interval) + 1
        while self.issued < due_count:
            k, self.issued = self.issued, self.issued + 1
            due = self.t0 + int(k * self.interval)
            if self.idle:
                self.send(self.idle.pop(), self.requests.nth(k), FIRST, due)
            else:
                self.backlog.append((k, due))
        self.max_backlog = max(self.max_backlog, len(self.backlog))
        if now >= self.stop_at:
            self.stop()
        else:
            self.loop.call_later(TICK_S, self.tick)

    def free(self, slot: Slot, now: int) -> None:
        while self.backlog:
            k, due = self.backlog.popleft()
            if now - due > self.timeout_ns:
                self._expired(now, due)
                continue
            self.send(slot, self.requests.nth(k), FIRST, due)
            return
        self.idle.append(slot)
        self.maybe_finish()

    def _expired(self, now: int, due: int) -> None:
        self.rec.add(TIMEOUT, now - due, now, QUEUED_TIMEOUT)
        self.counts[TIMEOUT] = self.counts.get(TIMEOUT, 0) + 1

    def sweep(self) -> None:
        now = perf_ns()
        while self.backlog and now - self.backlog[0][1] > self.timeout_ns:
            self._expired(now, self.backlog.popleft()[1])
        super().sweep()
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if not self.backlog:
            super().maybe_finish()

    def on_answer(self, slot: Slot, status: int, body: bytes, tag: int, now: int) -> None:
        self.free(slot, now)

    def retry(self, slot: Slot) -> None:
        self.free(slot, perf_ns())

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "issued": self.issued, "max_backlog": self.max_backlog}


class Release(Driver):
    def __init__(self, spec: Spec, requests: Requests) -> None:
        super().__init__(spec, requests)
        self.rng = random.Random(spec.seed)
        self.order = list(range(spec.members))
        self.rng.shuffle(self.order)
        self.next_member = self.open_ns = 0
        self.claim_ids: list[bytes] = []
        self.seen: set[bytes] = set()
        self.late_accepts = 0
        self.replays = self.replay_mismatches = self.retired = 0
        self.last_accept_ns = self.first_sold_out_ns = 0

    def start(self, go: dict[str, Any]) -> None:
        self.open_ns = self.rec.base_ns + int((float(go["open_ts"]) - self.rec.base_wall) * 1e9)
        self.loop.call_later(self.spec.max_s, self.stop)
        for slot in self.slots:
            self.new_member(slot)

    def new_member(self, slot: Slot) -> None:
        if self.next_member >= len(self.order) or self.stopping:
            self.retire(slot)
            return
        slot.member, self.next_member = self.order[self.next_member], self.next_member + 1
        slot.attempt = 0
        slot.option = self.rng.choice(self.requests.options)
        self.next_attempt(slot, FIRST)

    def next_attempt(self, slot: Slot, tag: int) -> None:
        slot.attempt += 1
        request_id = self.requests.prefix + b"%d-%d" % (slot.member, slot.attempt)
        self.send(slot, self.requests.claim(slot.member, request_id, slot.option), tag)

    def later(self, slot: Slot, tag: int, delay_s: float) -> None:
        delay_s += self.rng.random() * self.spec.spread_s
        self.loop.call_later(delay_s, self.resend, slot, tag)

    def resend(self, slot: Slot, tag: int) -> None:
        if not slot.retired and not self.stopping:
            self.send(slot, slot.request, tag)
        elif not slot.retired:
            self.retire(slot)

    def retire(self, slot: Slot) -> None:
        if not slot.retired:
            slot.retired = True
            self.retired += 1
            if self.retired >= len(self.slots):
                self.stop()

    def on_answer(self, slot: Slot, status: int, body: bytes, tag: int, now: int) -> None:
        if self.stopping:
            self.retire(slot)
        elif status in (200, 202):
            claim_id = claim_id_of(body)
            if tag == REPLAY or claim_id in self.seen:
                # The same request again: it must name the claim it made, as a replay.
                self.replays += 1
                self.replay_mismatches += status != 200 or claim_id != slot.claim_id
                self.next_attempt(slot, NEXT)
                return
            # A new claim (a 200 here: its first answer was lost to a client timeout).
            self.seen.add(claim_id)
            self.claim_ids.append(claim_id)
            self.late_accepts += status == 200
            slot.claim_id = claim_id
            self.last_accept_ns = now
            if self.rng.random() < self.spec.retry_share:
                self.send(slot, slot.request, REPLAY)
            else:
                self.next_attempt(slot, NEXT)
        elif status == 425:
            wait = min(max(self.open_ns - now, 0) / 1e9, self.spec.early_poll_s)
            self.later(slot, EARLY, wait)
        elif status in (429, 503):
            self.later(slot, BACKOFF, self.spec.backoff_s * (1 + self.rng.random()))
        elif status == 410:
            if not self.first_sold_out_ns:
                self.first_sold_out_ns = now
            self.retire(slot)
        else:  # 403 tier, 409 quota (or an error): this member is done
            self.new_member(slot)

    def retry(self, slot: Slot) -> None:
        self.later(slot, BACKOFF, self.spec.backoff_s)

    def write(self) -> None:
        Path(self.spec.out).with_suffix(".claims").write_bytes(b"\n".join(self.claim_ids))
        super().write()

    def meta(self) -> dict[str, Any]:
        return {
            **super().meta(),
            "open_ns": self.open_ns,
            "accepted": len(self.claim_ids),
            "replays": self.replays,
            "replay_mismatches": self.replay_mismatches,
            "late_accepts": self.late_accepts,
            "last_accept_ns": self.last_accept_ns,
            "first_sold_out_ns": self.first_sold_out_ns,
            "members_used": self.next_member,
        }


DRIVERS: dict[str, type[Driver]] = {"closed": ClosedLoop, "open": OpenLoop, "release": Release}


async def main(spec_path: Path) -> None:
    spec = Spec.load(spec_path)
    file_limit()  # a release opens a thousand connections
    requests = Requests(spec, Settings.from_env())
    driver = DRIVERS[spec.mode](spec, requests)
    await driver.connect_all()
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await driver.run(json.loads(line or "{}"))
    driver.write()


if __name__ == "__main__":
    uvloop.run(main(Path(sys.argv[1])))
