"""Drift between a benefit's counters in Redis and the truth: what one reading of Redis
should show, given the truth read before and after it (``at_read``), and every counter (or
idempotency key) it shows that the truth does not explain (``compare``). Pure: ``reconcile``
does the reading.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from claim_service.domain.lifecycle import ACCEPTED, FAILED, REFUNDED
from claim_service.store.snapshot import ClaimRecord, Counters, Snapshot, idem_pairs


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
class Observed:
    """What Redis holds for one benefit and period. The stock, the refunded ids and the free
    codes are read at one instant, between ``now_ms`` and ``read_ms`` by Redis's clock (the
    same on one server, which reads its clock in that atomic step); quota use and idempotency
    keys are scanned just after it (never read in one command that would stall claims)."""

    now_ms: int
    read_ms: int
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
    after it: the claims accepted by then (by Redis's clock; one dated between ``now_ms``
    and ``read_ms``, on one server of that very millisecond, may go either way), each
    refunded when PostgreSQL said so before, or when Redis's refunded set has it and
    PostgreSQL agrees it failed (the refund reaches Redis first).
    ``scanned``: the counters scanned after that instant, while claims and refunds went on.
    ``least``: the lower end of what is possible, else the upper end."""
    known = {c.claim_id: c for c in before.claims if c.period == before.period}
    until = seen.scanned_ms if scanned else seen.read_ms
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
