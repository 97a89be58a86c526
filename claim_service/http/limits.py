"""Overload protection for the claim endpoint, per worker process.

- A bound on claims in flight (``CLAIM_MAX_IN_FLIGHT``): past it a claim is answered ``503``
  ``overloaded`` with ``Retry-After`` at once, before its token or body is looked at, rather
  than queued into the clients' timeouts.
- The event loop's lag (``CLAIM_SHED_LAG_MS``): when a timer fires that late, requests are
  already queueing in front of the worker (more arrive than its CPU can answer; the claims
  in flight stay few because each waits on the CPU, not on Redis), so for the next
  ``SHED_HOLD_S`` new claims get the same cheap ``503`` instead of waiting their turn.
- Token buckets per member (``CLAIM_RATE_MEMBER_PER_S`` / ``_BURST``) and per client address
  (``CLAIM_RATE_IP_PER_S`` / ``_BURST``, off by default: members behind one carrier NAT or
  gateway share an address): past them ``429`` ``rate_limited`` with ``Retry-After``. A
  request refused this way costs nothing downstream.

Buckets live in a bounded LRU (``MAX_KEYS``): a key pushed out comes back with a full bucket,
which only ever errs towards letting a request through.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict

from claim_service.config import Settings

MAX_KEYS = 200_000
LAG_EVERY_S = 0.01
SHED_HOLD_S = 0.1


class TokenBuckets:
    """``rate`` tokens a second per key, up to ``burst``; each request takes one."""

    def __init__(self, rate: float, burst: float, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, now: float | None = None) -> float:
        """0 when ``key`` may go on (a token is taken), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        buckets = self._buckets
        entry = buckets.get(key)
        if entry is None:
            tokens = self.burst
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
            buckets.move_to_end(key)
        if tokens < 1.0:
            buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        buckets[key] = (tokens - 1.0, now)
        return 0.0

    def __len__(self) -> int:
        return len(self._buckets)


class ClaimLimits:
    """The in-flight bound and the rate limits of one worker's claim endpoint."""

    def __init__(self, settings: Settings) -> None:
        self.max_in_flight = settings.max_in_flight
        self.in_flight = 0
        self.shed_lag_s = settings.shed_lag_ms / 1000
        self.shedding_until = 0.0  # loop time
        self.members = TokenBuckets(settings.rate_member_per_s, settings.rate_member_burst)
        self.addresses = TokenBuckets(settings.rate_ip_per_s, settings.rate_ip_burst)

    @property
    def full(self) -> bool:
        if self.in_flight >= self.max_in_flight:
            return True
        return self.shedding_until > 0 and asyncio.get_running_loop().time() < self.shedding_until

    async def watch_lag(self, stop: asyncio.Event) -> None:
        """Measure how late the loop runs a timer, until ``stop``; shed while it is late."""
        if not self.shed_lag_s:
            return
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due = loop.time() + LAG_EVERY_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LAG_EVERY_S)
            now = loop.time()
            if now - due > self.shed_lag_s:
                self.shedding_until = now + SHED_HOLD_S


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
