"""Waiting rooms: tickets, positions, admissions and the proof of the shuffle.

A benefit with ``waiting_room`` gives tickets from ``prequeue_minutes`` before each opening
(``POST /v1/benefits/{id}/queue``; one per member and period, a retry returns the same). The
tickets taken before the opening are shuffled by a seed committed when the first ticket was
given (see ``domain.waiting_room``); later ones join the back. From the opening the room
admits ``admit_per_s`` places a second while stock is left, and stands still while none is
(the room is closed: ``sold_out``) until a top-up, and while the benefit is paused. An
admitted member is given an admission token (``claims.admission``); while the release window
is open every claim needs one.
"""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg
from redis.asyncio import Redis

from claim_service.claims.admission import Admissions
from claim_service.claims.decisions import Span
from claim_service.claims.engine import ClaimEngine
from claim_service.domain import periods
from claim_service.domain.catalogue import Benefit
from claim_service.domain.waiting_room import estimated_wait_s, shuffle_key
from claim_service.errors import BackendUnavailable
from claim_service.store import rooms
from claim_service.store.draw_seeds import DrawSeeds
from claim_service.store.rooms import RoomTimes, RoomView

REVEAL_AFTER_MS = 5_000  # the seed is revealed this long after the opening
REFRESH_MIN_S, REFRESH_MAX_S = 1, 30

# RoomView phase -> a ticket's status
STATUS = {
    rooms.EARLY: "not_open",
    rooms.PREQUEUE: "prequeue",
    rooms.PAUSED: "paused",
    rooms.SOLD_OUT: "sold_out",
    rooms.CLOSED: "closed",
}


class WaitingRooms:
    """One per process, next to the claim engine."""

    def __init__(self, engine: ClaimEngine, redis: Redis, pool: asyncpg.Pool | None) -> None:
        self.engine = engine
        self.redis = redis
        self.seeds = DrawSeeds(pool, engine.settings.codes_key, "room_seeds") if pool else None
        self.admissions = Admissions(engine.settings.codes_key)

    # -- which room ----------------------------------------------------------------------

    def times(self, benefit: Benefit, now_ms: int | None = None) -> RoomTimes:
        """The room a member joins now: the current period's, unless the next period's
        pre-queue has begun (a monthly release whose pre-queue starts before the month ends)."""
        room = benefit.waiting_room
        assert room is not None
        now_ms = self.engine.redis_ms() if now_ms is None else now_ms
        span = self.engine.span(benefit, now_ms)
        upcoming = self.engine.span(benefit, now_ms + room.prequeue_ms)
        if (
            upcoming.period != span.period
            and upcoming.opens_ms - room.prequeue_ms <= now_ms < upcoming.opens_ms
        ):
            span = upcoming
        return self._times(benefit, span)

    def claim_period(self, benefit: Benefit, now_ms: int | None = None) -> str | None:
        """The period whose admission a claim needs now (None: the window is not open, so
        ``claim.lua`` refuses the claim anyway)."""
        now_ms = self.engine.redis_ms() if now_ms is None else now_ms
        span = self.engine.span(benefit, now_ms)
        if now_ms < span.opens_ms or (span.closes_ms and now_ms >= span.closes_ms):
            return None
        return span.period

    def claim_times(self, benefit: Benefit, now_ms: int | None = None) -> RoomTimes:
        now_ms = self.engine.redis_ms() if now_ms is None else now_ms
        return self._times(benefit, self.engine.span(benefit, now_ms))

    def _times(self, benefit: Benefit, span: Span) -> RoomTimes:
        room = benefit.waiting_room
        assert room is not None
        return RoomTimes(
            span.period,
            span.opens_ms - room.prequeue_ms,
            span.opens_ms,
            span.closes_ms,
            room.admit_per_s,
        )

    # -- tickets -------------------------------------------------------------------------

    async def join(self, benefit: Benefit, user_id: str) -> tuple[RoomView, RoomTimes]:
        """The member's ticket (made now if they hold none and tickets are being given)."""
        times = self.times(benefit)
        seed = await self._seeds().seed(benefit.benefit_id, times.period)
        ticket = secrets.token_hex(16)
        view = await rooms.visit(
            self.redis,
            benefit.benefit_id,
            times,
            user_id,
            join=True,
            ticket_id=ticket,
            shuffle_key=shuffle_key(seed, ticket),
        )
        return view, times

    async def look(
        self, benefit: Benefit, user_id: str = "", times: RoomTimes | None = None
    ) -> tuple[RoomView, RoomTimes]:
        """The room (and the member's ticket, if they hold one) without joining."""
        times = times or self.times(benefit)
        return await rooms.visit(self.redis, benefit.benefit_id, times, user_id), times

    @staticmethod
    def summary(benefit_id: str, view: RoomView, times: RoomTimes) -> dict[str, Any]:
        """The room as everyone may see it (the event stream's and the dashboard's
        ``RoomSummary``): no place is admitted before the order is drawn."""
        ordered = view.phase not in (rooms.EARLY, rooms.PREQUEUE)
        return {
            "benefit_id": benefit_id,
            "period": times.period,
            "phase": view.phase,
            "queue_size": view.size,
            "admitted": view.admitted if ordered else 0,
            "admit_per_s": times.admit_per_s,
        }

    def answer(
        self, benefit: Benefit, times: RoomTimes, view: RoomView, user_id: str
    ) -> dict[str, Any]:
        """A ticket as the member sees it: status, place, wait, when to ask again, and the
        admission token once admitted."""
        status = STATUS.get(view.phase) or ("admitted" if view.is_admitted else "waiting")
        ahead = None
        wait: float | None = None
        rate = times.admit_per_s
        if status == "waiting" and view.rank is not None:
            ahead = max(view.rank - view.admitted, 0)
            wait = estimated_wait_s(ahead + 1, rate)
        elif status == "admitted":
            ahead, wait = 0, 0.0
        elif status in ("prequeue", "not_open"):
            wait = round(max(times.opens_ms - view.now_ms, 0) / 1000, 1)
        out: dict[str, Any] = {
            "benefit_id": benefit.benefit_id,
            "period": times.period,
            "ticket_id": view.ticket_id,
            "status": status,
            "position": view.position,
            "ahead": ahead,
            "queue_size": view.size,
            "admitted": view.admitted if view.phase not in (rooms.EARLY, rooms.PREQUEUE) else 0,
            "admit_per_s": rate,
            "estimated_wait_s": wait,
            "refresh_after_s": _refresh_after(status, wait, self.admissions.ttl_s),
            "prequeue_opens_at": self._iso(times.prequeue_ms),
            "opens_at": self._iso(times.opens_ms),
        }
        if status == "admitted" and view.ticket_id:
            token, expires = self.admissions.issue(
                user_id, benefit.benefit_id, times.period, view.ticket_id
            )
            out["admission_token"] = token
            out["admission_expires_at"] = periods.from_ms(
                expires * 1000, self.engine.tz
            ).isoformat()
        return out

    def _iso(self, ms: int) -> str:
        return periods.from_ms(ms + self.engine.calendar.shift_ms, self.engine.tz).isoformat()

    def _seeds(self) -> DrawSeeds:
        if self.seeds is None:
            raise BackendUnavailable("waiting rooms need PostgreSQL (their seeds live there)")
        return self.seeds

    # -- the proof -----------------------------------------------------------------------

    async def proof(self, benefit: Benefit, period: str) -> dict[str, Any]:
        """The period's commitment and, from ``REVEAL_AFTER_MS`` after the opening, its seed
        and the queue's order (pre-queue shuffled, then late arrivals), so that anyone can
        re-derive the order of the pre-queue from the seed."""
        room = benefit.waiting_room
        assert room is not None
        opens, _ = self.engine.window(benefit, period)
        opens_ms = self.engine.calendar.real_ms(opens)
        now_ms = self.engine.redis_ms()
        started = now_ms >= opens_ms - room.prequeue_ms
        commitment = await self._seeds().commitment(benefit.benefit_id, period, create=started)
        out: dict[str, Any] = {
            "benefit_id": benefit.benefit_id,
            "period": period,
            "commitment": commitment,
            "prequeue_opens_at": self._iso(opens_ms - room.prequeue_ms),
            "opens_at": opens.isoformat(),
            "reveal_at": self._iso(opens_ms + REVEAL_AFTER_MS),
            "seed": None,
            "prequeue": None,
            "late": None,
        }
        if commitment is not None and now_ms >= opens_ms + REVEAL_AFTER_MS:
            seed = await self._seeds().seed(benefit.benefit_id, period)
            prequeue, late = await rooms.queue_order(self.redis, benefit.benefit_id, period)
            out.update(seed=seed.hex(), prequeue=prequeue, late=late)
        return out


def _refresh_after(status: str, wait: float | None, ttl_s: int) -> int:
    """When a client should ask again (the event stream tells sooner when it can)."""
    if status == "admitted":
        return max(ttl_s // 2, REFRESH_MIN_S)
    if wait is None:
        return REFRESH_MAX_S
    return int(min(max(wait / 2, REFRESH_MIN_S), REFRESH_MAX_S))
