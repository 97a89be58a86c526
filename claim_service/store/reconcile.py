"""Reconciliation: where a benefit's counters in Redis differ from the truth, without
touching a live benefit.

The truth is what recovery would write: PostgreSQL united with the stream's not yet
persisted claims (``Snapshot.expected_counters``). Compared, per benefit and period: stock
taken (in all, per option and per prize of a draw), top-ups (``added``), each member's quota
use, the idempotency keys (missing, extra, or naming another claim) and each card-key option's free
codes (summed over its unexpired buckets). The points mirror is compared member by member
with the ledger less the points spent in Redis and not yet recorded (``points_drift``).

Claims keep being decided, persisted and refunded meanwhile, so Redis is read between two
readings of the truth (each: the stream, then PostgreSQL) and compared with what the truth
says it held at that instant: the claims accepted before it by Redis's clock, refunded as
Redis's refunded set says where PostgreSQL agrees the claim failed (a refund reaches Redis
first). Quota use and idempotency keys are scanned rather than read in one command that
would stall claims, so their bounds also allow for what happened during the scan. A benefit
showing drift is compared once more after a short pause, and only drift seen both times is
reported (a top-up or a code load caught between PostgreSQL and Redis is not).

Nothing here writes to Redis: ``fix`` leaves the repair to
``Recovery.ensure_benefit(force=True)``, which refuses claims while it rebuilds, so no count
a pending claim depends on is lowered. ``watch`` runs in every writer: it compares each
benefit's current period every ``CLAIM_RECONCILE_EVERY_S``, logs each drift and exports
the ``claim_drift`` gauge.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import Benefit
from claim_service.domain.lifecycle import ACCEPTED, FAILED, REFUNDED
from claim_service.errors import BackendUnavailable
from claim_service.metrics import DRIFT
from claim_service.store.catalogue_store import load_benefits
from claim_service.store.keyspace import BenefitKeys, Scripts, text
from claim_service.store.points_mirror import points_drift
from claim_service.store.recovery import Recovery, claim_period, redis_now_ms
from claim_service.store.snapshot import (
    ClaimRecord,
    Counters,
    Snapshot,
    idem_pairs,
    read_snapshot,
    stream_claims,
)

log = logging.getLogger(__name__)

# The kinds of drift (the ``kind`` label of ``claim_drift``).
KINDS = (
    "taken",
    "option_taken",
    "added",
    "quota",
    "idem_missing",
    "idem_extra",
    "idem_different",
    "codes",
)
PASSES = 2  # a drift is reported only when every pass sees it
PASS_PAUSE_S = 0.05  # lets a refund or a code load caught half-way finish
SCAN_COUNT = 1_000  # large hashes are scanned, never read in one blocking command
LOG_AT_MOST = 50  # drift lines logged per benefit and check


@dataclass(frozen=True)
class Drift:
    """One counter (or idempotency key) in Redis that the truth does not explain."""

    benefit_id: str
    period: str  # "" for free codes, which are not per period
    kind: str
    subject: str  # the option, the member, the member's request; "" for the stock
    redis: int | str | None  # a count, or for idempotency keys a claim id (None: absent)
    expected: int | str | None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.benefit_id, self.period, self.kind, self.subject)

    def describe(self) -> str:
        where = " ".join(p for p in (self.benefit_id, self.period, self.kind, self.subject) if p)
        if isinstance(self.redis, int) and isinstance(self.expected, int):
            delta = self.redis - self.expected
            return f"{where}: Redis {self.redis}, expected {self.expected} ({delta:+d})"
        return f"{where}: Redis {_claim(self.redis)}, expected {_claim(self.expected)}"


@dataclass
class BenefitCheck:
    benefit_id: str
    period: str
    live: bool  # False: not live on this server, so not compared (rebuilt before a claim)
    drift: list[Drift] = field(default_factory=list)


@dataclass
class Observed:
    """What Redis holds for one benefit and period. The stock, the refunded ids and the free
    codes are read at one instant, ``now_ms`` by Redis's clock; quota use and idempotency
    keys are scanned just after it (never read in one command that would stall claims)."""

    now_ms: int
    stock: dict[str, int]
    refunded: set[str]
    codes: dict[str, int]  # option -> free codes in its unexpired buckets
    used: dict[str, int]
    idem: dict[str, str]
    scanned_ms: int  # Redis's clock when the scans were done
    refunded_by_then: set[str]


def _claim(value: int | str | None) -> str:
    return "none" if value is None else f"claim {value}"


def split_idem_field(name: str) -> tuple[str, str]:
    """(member, request) of an idempotency field (see ``keyspace.idem_field``)."""
    length, _, rest = name.partition(":")
    raw = rest.encode()
    try:
        cut = int(length)
    except ValueError:
        return name, ""
    return raw[:cut].decode(errors="replace"), raw[cut:].decode(errors="replace")


def free_codes(buckets: Iterable[tuple[str, int, int]], now_ms: int) -> dict[str, int]:
    """Free codes per option from (option, expiry_ms or 0, count), expired buckets left out
    (``claim.lua`` drops them lazily; recovery never writes them)."""
    totals: dict[str, int] = {}
    for option_id, expiry, count in buckets:
        if expiry == 0 or expiry > now_ms:
            totals[option_id] = totals.get(option_id, 0) + count
    return totals


def at_read(
    before: Snapshot, after: Snapshot, seen: Observed, *, scanned: bool, least: bool
) -> Counters:
    """The counters Redis should show when it was read, from the truth read before and
    after it: the claims accepted by then (by Redis's clock; one of that very millisecond
    may go either way), each refunded when PostgreSQL said so before, or when Redis's
    refunded set has it and PostgreSQL agrees it failed (the refund reaches Redis first).
    ``scanned``: the counters scanned after that instant, while claims and refunds went on.
    ``least``: the lower end of what is possible, else the upper end."""
    known = {c.claim_id: c for c in before.claims if c.period == before.period}
    until = seen.scanned_ms if scanned else seen.now_ms
    kept: list[ClaimRecord] = []
    codes = Counter(after.codes)
    for claim in (c for c in after.claims if c.period == after.period):
        earlier = known.get(claim.claim_id)
        failed = claim.status in (FAILED, REFUNDED)
        counted = earlier is not None or claim.created_ms < seen.now_ms
        returned = (earlier is not None and earlier.status == REFUNDED) or (
            failed and claim.claim_id in seen.refunded
        )
        if least:
            returned = returned or (scanned and failed and claim.claim_id in seen.refunded_by_then)
        else:
            counted = counted or claim.created_ms <= until
        if counted:
            kept.append(replace(claim, status=REFUNDED if returned else ACCEPTED))
        elif claim.code_expiry_ms is not None and not failed:
            codes[(claim.option_id, claim.code_expiry_ms)] += 1  # its code was still free
    return Snapshot(kept, after.added, codes, 0, after.period).expected_counters()


def compare(benefit_id: str, before: Snapshot, seen: Observed, after: Snapshot) -> list[Drift]:
    """Drift of ``seen`` (read from Redis between the two readings of the truth)."""
    period, found = after.period, []

    def count(kind: str, subject: str, value: int, bounds: Iterable[int]) -> None:
        low, high = min(bounds), max(bounds)
        if not low <= value <= high:
            nearest = low if value < low else high
            where = "" if kind == "codes" else period
            found.append(Drift(benefit_id, where, kind, subject, value, nearest))

    views = [at_read(before, after, seen, scanned=False, least=flag) for flag in (True, False)]
    scans = [at_read(before, after, seen, scanned=True, least=flag) for flag in (True, False)]
    count("taken", "", seen.stock.get("taken", 0), [v.stock["taken"] for v in views])
    count("added", "", seen.stock.get("added", 0), [before.added, after.added])
    names = {n for n in (*seen.stock, *views[1].stock) if n.startswith("taken:")}
    for name in sorted(names):
        bounds = [v.stock.get(name, 0) for v in views]
        count("option_taken", name.removeprefix("taken:"), seen.stock.get(name, 0), bounds)
    for name in sorted(n for n in (*seen.stock, *views[1].stock) if n.startswith("prize:")):
        bounds = [v.stock.get(name, 0) for v in views]
        count("prize_taken", name.removeprefix("prize:"), seen.stock.get(name, 0), bounds)
    for member in sorted({*seen.used, *scans[1].used}):
        bounds = [v.used.get(member, 0) for v in scans]
        count("quota", member, seen.used.get(member, 0), bounds)
    free = [free_codes(((o, e, n) for (o, e), n in v.codes.items()), seen.now_ms) for v in views]
    for option_id in sorted({*seen.codes, *free[0], *free[1]}):
        bounds = [f.get(option_id, 0) for f in free]
        count("codes", option_id, seen.codes.get(option_id, 0), bounds)

    def idem(kind: str, name: str, redis: str | None, expected: str | None) -> None:
        member, request = split_idem_field(name)
        subject = f"member {member!r} request {request!r}"
        found.append(Drift(benefit_id, period, kind, subject, redis, expected))

    for name, entry in scans[0].idem:  # accepted before the scan began: Redis has them
        if name not in seen.idem:
            idem("idem_missing", name, None, entry.split("|")[0])
    holders: dict[str, list[str]] = {}
    for snapshot in (before, after):
        claims = [c for c in snapshot.claims if c.period == period]
        for name, entry in idem_pairs(claims):
            holders.setdefault(name, []).append(entry.split("|")[0])
    for name, entry in seen.idem.items():  # every key Redis holds was accepted by then
        claim_id, truth = entry.split("|")[0], holders.get(name)
        if truth is None:
            idem("idem_extra", name, claim_id, None)
        elif claim_id not in truth:  # (two only while the writer has not refused one)
            idem("idem_different", name, claim_id, truth[-1])
    return found


class Reconciler:
    """Compares benefits' counters in one Redis with the truth; repairs through recovery."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        settings: Settings,
        calendar: periods.Calendar | None = None,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.settings = settings
        self.calendar = calendar or periods.Calendar(settings.tz)
        self.scripts = Scripts(redis)

    async def benefits(self) -> list[Benefit]:
        return await load_benefits(self.pool, self.settings.tz)

    async def check(self, benefit: Benefit, period: str | None = None) -> BenefitCheck:
        """Drift of ``benefit`` in ``period`` (default: the period claims count against
        now). Raises ``BackendUnavailable`` when Redis or PostgreSQL fails."""
        try:
            return await self._check(benefit, period)
        except RedisError as exc:
            raise BackendUnavailable("Redis is unavailable") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise BackendUnavailable("PostgreSQL is unavailable") from exc

    async def _check(self, benefit: Benefit, period: str | None) -> BenefitCheck:
        benefit_id = benefit.benefit_id
        if period is None:
            period = claim_period(benefit, self.calendar, await redis_now_ms(self.redis))
        before = await self._truth(benefit_id, period)
        confirmed: dict[tuple[str, str, str, str], Drift] = {}
        for attempt in range(PASSES):
            if attempt:
                await asyncio.sleep(PASS_PAUSE_S)
            seen = await self._observe(benefit_id, period)
            if seen is None:
                return BenefitCheck(benefit_id, period, live=False)
            after = await self._truth(benefit_id, period)
            found = {d.key: d for d in compare(benefit_id, before, seen, after)}
            confirmed = found if not attempt else {k: found[k] for k in confirmed if k in found}
            if not confirmed:
                break
            before = after
        return BenefitCheck(benefit_id, period, live=True, drift=list(confirmed.values()))

    async def _truth(self, benefit_id: str, period: str) -> Snapshot:
        # The stream first, then PostgreSQL: an entry persisted in between is seen twice
        # (and counted once), never missed.
        in_stream = await stream_claims(self.redis, BenefitKeys(benefit_id).stream)
        return await read_snapshot(self.pool, benefit_id, period, None, in_stream)

    async def _instant(
        self, keys: BenefitKeys, period: str, hashes: list[str]
    ) -> tuple[int, set[str], list[Any]] | None:
        """Redis's clock, the period's refunded ids and ``hashes`` in one atomic step; None
        when the benefit is not live here."""
        async with self.redis.pipeline(transaction=True) as pipe:
            await self.scripts.live(keys=[keys.live], args=["check"], client=pipe)
            pipe.time()
            pipe.smembers(keys.refunded(period))
            for name in hashes:
                pipe.hgetall(name)
            live, clock, refunded, *values = await pipe.execute()
        if not live:
            return None
        now_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
        return now_ms, {text(m) for m in refunded}, values

    async def _observe(self, benefit_id: str, period: str) -> Observed | None:
        """What Redis holds, or None when the benefit is not live here (or stopped being
        live meanwhile: a rebuild started)."""
        keys = BenefitKeys(benefit_id)
        first = await self._instant(keys, period, [keys.stock(period), keys.codes])
        if first is None:
            return None
        now_ms, refunded, (stock, codes) = first
        used = {
            text(k): int(v)
            async for k, v in self.redis.hscan_iter(keys.used(period), count=SCAN_COUNT)
        }
        idem = {
            text(k): text(v)
            async for k, v in self.redis.hscan_iter(keys.idempotency(period), count=SCAN_COUNT)
        }
        then = await self._instant(keys, period, [])
        if then is None:
            return None
        buckets = []
        for name, value in codes.items():
            option_id, _, expiry = text(name).partition("|")
            buckets.append((option_id, int(expiry or 0), int(value)))
        return Observed(
            now_ms=now_ms,
            stock={text(k): int(v) for k, v in stock.items()},
            refunded=refunded,
            codes=free_codes(buckets, now_ms),
            used=used,
            idem=idem,
            scanned_ms=then[0],
            refunded_by_then=then[1],
        )

    async def check_all(self, period: str | None = None) -> list[BenefitCheck]:
        return [await self.check(benefit, period) for benefit in await self.benefits()]

    async def fix(self, benefit: Benefit, period: str | None = None) -> BenefitCheck:
        """Rebuild ``benefit`` from the truth (claims wait meanwhile, as in any recovery:
        none can slip in between, so no pending claim loses its unit), then compare again.
        Recovery rebuilds the current period; drift in another one is left and reported."""
        recovery = Recovery(self.pool, self.redis, self.settings, self.calendar)
        await recovery.ensure_benefit(benefit.benefit_id, force=True)
        return await self.check(benefit, period)

    async def report_all(self) -> list[BenefitCheck]:
        """Check every benefit's current period; log each drift and set ``claim_drift``."""
        checks = await self.check_all()
        for check in checks:
            for kind in KINDS:
                count = sum(1 for d in check.drift if d.kind == kind)
                DRIFT.labels(check.benefit_id, kind).set(count)
            for drift in check.drift[:LOG_AT_MOST]:
                log.warning("drift between Redis and PostgreSQL: %s", drift.describe())
            if len(check.drift) > LOG_AT_MOST:
                log.warning(
                    "… and %d more drift(s) for %s (`claim-service reconcile` lists them all)",
                    len(check.drift) - LOG_AT_MOST,
                    check.benefit_id,
                )
        points = await points_drift(self.pool, self.redis)
        DRIFT.labels("*points*", "points").set(len(points))
        for found in points[:LOG_AT_MOST]:
            log.warning("drift between Redis and the points ledger: %s", found.describe())
        return checks

    async def watch(self, stop: asyncio.Event, every_s: float) -> None:
        """``report_all`` every ``every_s`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), every_s)
                return
            except TimeoutError:
                pass
            try:
                await self.report_all()
            except BackendUnavailable as exc:
                log.warning("drift check failed (%s); trying again in %.0fs", exc, every_s)
            except Exception:  # a check that breaks must not end the checks for good
                log.exception("drift check failed; trying again in %.0fs", every_s)
