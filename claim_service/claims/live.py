"""The live state of benefits, pushed to members: one feed per benefit per worker.

A member's event stream (``GET /v1/benefits/{id}/events``) does not read Redis: each worker
keeps one ``Feed`` per benefit someone is watching and refreshes it every ``TICK_S`` (sooner
when the claim gate hears a stock announcement, or a claim here is refused sold out), in one
pipelined read per benefit whatever the number of streams. A refresh that changes the phase
or the coarse stock appends an event to the feed's ring; every stream of that benefit sends
the events after the last it sent, in order. Memory is bounded: a stream holds no queue, and
one that falls more than ``RING`` events behind is sent a fresh ``state`` instead.

Events: ``state`` (on connect, or after falling behind: the whole picture), ``countdown``
(before the opening, every ``COUNTDOWN_EVERY_S``), ``open``, ``stock`` (the stock left,
rounded down to a ``STOCK_STEPS``-th of the period's stock), ``sold_out``, ``reopened`` (stock
came back: a refund or a top-up), ``paused``, ``closed``, and for a benefit with a waiting
room ``queue`` (the room's size and admissions, at most every ``QUEUE_EVERY_S``; a member who
holds a ticket is sent their own position, wait and, once admitted, admission token instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.claims.engine import ClaimEngine
from claim_service.claims.rooms import WaitingRooms
from claim_service.domain import periods
from claim_service.domain.catalogue import Benefit
from claim_service.errors import BackendUnavailable
from claim_service.store import rooms
from claim_service.store.buckets import stock_counters
from claim_service.store.draw_records import prize_levels
from claim_service.store.rooms import RoomTimes, RoomView
from claim_service.store.stock_events import listen_here

log = logging.getLogger(__name__)

TICK_S = 0.25
FAN_OUT = 100  # streams woken per turn of the event loop
HEARTBEAT_S = 15.0
SWEEP_S = 1.0
MIN_GAP_S = 0.05  # between two refreshes of the feeds, however often poked
COUNTDOWN_EVERY_S = 1.0
RING = 128
STOCK_STEPS = 20
IDLE_FEED_S = 30.0  # a feed nobody watches is dropped after this long
QUEUE_EVERY_S = 2.0  # waiting-room updates, at most this often
RESOLVE_EVERY_S = 1.0  # watchers' tickets and places looked up (in one read) this often


def frame(seq: int, name: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event, as written to every stream."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, name.encode(), orjson.dumps(data))


HEARTBEAT = b": keep-alive\n\n"


@dataclass(frozen=True)
class LiveEvent:
    seq: int
    name: str
    data: dict[str, Any]
    frame: bytes  # encoded once, written to every stream


@dataclass(eq=False)
class Stream:
    """One member's stream, as its feed sees it: how to wake it, and whether its client is
    gone (checked by the feed's sweep, so a closed connection frees its place promptly)."""

    closed: Callable[[], bool]
    wake: asyncio.Future[bool] | None = None  # result: True for a heartbeat
    user_id: str = ""

    def release(self, beat: bool) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(beat)


@dataclass
class Feed:
    benefit_id: str
    seq: int = 0
    phase: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    ring: deque[LiveEvent] = field(default_factory=lambda: deque(maxlen=RING))
    waiting: set[Stream] = field(default_factory=set)
    watchers: int = 0
    idle_since: float = 0.0
    stock_step: int | None = None
    countdown_at: float = 0.0
    beat_at: float = field(default_factory=time.monotonic)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _state_frame: tuple[int, bytes] = (-1, b"")
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # the waiting room, when the benefit has one
    room: dict[str, Any] | None = None
    room_times: RoomTimes | None = None
    room_dirty: bool = False
    queue_at: float = 0.0
    resolved_at: float = 0.0
    seekers: dict[str, int] = field(default_factory=dict)  # watching member -> streams
    holders: dict[str, str] = field(default_factory=dict)  # member -> ticket id
    ranks: dict[str, int] = field(default_factory=dict)  # ticket id -> 0-based place

    def push(self, name: str, data: dict[str, Any]) -> None:
        self.seq += 1
        self.ring.append(LiveEvent(self.seq, name, data, frame(self.seq, name, data)))
        self.release(beat=False)

    def state_frame(self) -> bytes:
        """The whole picture as a ``state`` event (encoded once per change)."""
        if self._state_frame[0] != self.seq:
            self._state_frame = (self.seq, frame(self.seq, "state", self.state))
        return self._state_frame[1]

    def release(self, *, beat: bool) -> None:
        """Wake every waiting stream, ``FAN_OUT`` at a time with a turn of the event loop in
        between, so that claims are answered while thousands of streams are written to."""
        waiting, self.waiting = self.waiting, set()
        if waiting:
            task = asyncio.get_running_loop().create_task(_fan_out(waiting, beat))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def sweep(self) -> None:
        """Wake the waiting streams whose client has gone, so they end now."""
        gone = [s for s in self.waiting if s.closed()]
        for stream in gone:
            self.waiting.discard(stream)
            stream.release(False)

    def since(self, seq: int) -> list[LiveEvent] | None:
        """The events after ``seq`` in order; None when some have left the ring."""
        if seq >= self.seq:
            return []
        if not self.ring or self.ring[0].seq > seq + 1:
            return None
        return [e for e in self.ring if e.seq > seq]


async def _fan_out(streams: set[Stream], beat: bool) -> None:
    for i, stream in enumerate(streams, start=1):
        stream.release(beat)
        if i % FAN_OUT == 0:
            await asyncio.sleep(0)


class LiveFeeds:
    """One per worker: the feeds, refreshed by ``run``."""

    def __init__(
        self, engine: ClaimEngine, redis: Redis, rooms: WaitingRooms | None = None
    ) -> None:
        self.engine = engine
        self.redis = redis
        self.rooms = rooms
        self.feeds: dict[str, Feed] = {}
        self.streams = 0
        self.closed = False
        self._wake = asyncio.Event()
        listen_here(self.poke)  # announcements made here
        engine.gate.listeners.append(self.poke)  # made elsewhere, and sold out seen here

    def poke(self, benefit_id: str) -> None:
        """Something changed (any benefit for ``"*"``): refresh now rather than at the tick."""
        self._wake.set()

    async def watch(self, benefit_id: str) -> Feed:
        """The benefit's feed, with its state read (a new feed is refreshed first)."""
        feed = self.feeds.get(benefit_id)
        if feed is None:
            feed = self.feeds[benefit_id] = Feed(benefit_id)
            self.poke(benefit_id)
        feed.watchers += 1
        self.streams += 1
        if not feed.ready.is_set():
            try:
                await self.refresh(feed)
            except (RedisError, BackendUnavailable):
                self.unwatch(feed)
                raise
        return feed

    def close(self) -> None:
        """Shutting down: every stream ends (each wakes and sees ``closed``)."""
        self.closed = True
        for feed in self.feeds.values():
            feed.release(beat=False)

    def unwatch(self, feed: Feed) -> None:
        feed.watchers -= 1
        self.streams -= 1
        if feed.watchers == 0:
            feed.idle_since = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh the watched feeds every ``TICK_S`` (or when poked) until ``stop``."""
        swept_at = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()
            await asyncio.sleep(MIN_GAP_S)
            now = time.monotonic()
            sweep, swept_at = (True, now) if now - swept_at >= SWEEP_S else (False, swept_at)
            for feed in self.feeds.values():
                if sweep:
                    feed.sweep()
                if now - feed.beat_at >= HEARTBEAT_S:
                    feed.beat_at = now
                    feed.release(beat=True)
            for benefit_id, feed in list(self.feeds.items()):
                if feed.watchers == 0 and now - feed.idle_since > IDLE_FEED_S:
                    del self.feeds[benefit_id]
                    continue
                if feed.watchers == 0:
                    continue
                try:
                    await self.refresh(feed)
                except (RedisError, BackendUnavailable, OSError) as exc:
                    log.debug("live feed of %s not refreshed: %s", benefit_id, exc)

    async def refresh(self, feed: Feed) -> None:
        benefit = await self.engine.benefit(feed.benefit_id)
        if benefit is None:
            return
        now_ms = self.engine.redis_ms()
        span = self.engine.span(benefit, now_ms)
        counters = await stock_counters(self.redis, benefit.benefit_id, benefit.shards, span.period)
        added, taken = counters.get("added", 0), counters.get("taken", 0)
        total = benefit.stock_per_period + added
        left = max(total - taken, 0)
        if left > 0 and benefit.draw is not None:
            levels = await prize_levels(self.redis, benefit, span.period, now_ms)
            if not any(drawable for _, _, drawable in levels.values()):
                left = 0  # no prize can be drawn: as sold out as a benefit without stock
        room = None
        if benefit.waiting_room is not None and self.rooms is not None:
            room = await self._refresh_room(feed, benefit)
        phase = _phase(benefit, span.opens_ms, span.closes_ms, now_ms, left)
        step = None if total <= 0 else math.floor(left * STOCK_STEPS / total)
        coarse = 0 if step is None else math.ceil(step * total / STOCK_STEPS)
        state = {
            "benefit_id": benefit.benefit_id,
            "period": span.period,
            "phase": phase,
            "opens_at": span.opens.isoformat(),
            "closes_at": periods.from_ms(
                span.closes_ms + self.engine.calendar.shift_ms, self.engine.tz
            ).isoformat()
            if span.closes_ms
            else None,
            "stock_left": coarse,
            "stock": total,
            "waiting_room": room,
        }
        previous = feed.phase
        feed.state = state
        if previous is not None and phase != previous:
            name = {
                "open": "reopened" if previous == "sold_out" else "open",
                "sold_out": "sold_out",
                "paused": "paused",
                "closed": "closed",
                "not_open": "countdown",
            }[phase]
            feed.push(
                name, _countdown(state, now_ms, span.opens_ms) if name == "countdown" else state
            )
            feed.stock_step = step
        elif phase == "open" and previous is not None and step != feed.stock_step:
            feed.stock_step = step
            feed.push("stock", state)
        elif phase == "not_open" and time.monotonic() - feed.countdown_at >= COUNTDOWN_EVERY_S:
            feed.countdown_at = time.monotonic()
            if previous is not None:
                feed.push("countdown", _countdown(state, now_ms, span.opens_ms))
        if previous is None:
            feed.stock_step = step
        feed.phase = phase
        if feed.room_dirty and time.monotonic() - feed.queue_at >= QUEUE_EVERY_S:
            feed.room_dirty = False
            feed.queue_at = time.monotonic()
            feed.push("queue", room or {"benefit_id": benefit.benefit_id})
        feed.ready.set()

    async def _refresh_room(self, feed: Feed, benefit: Benefit) -> dict[str, Any]:
        """The room's summary; the watchers' tickets and places, looked up in batches."""
        assert self.rooms is not None
        view, times = await self.rooms.look(benefit)
        if feed.room_times is None or feed.room_times.period != times.period:
            feed.holders.clear()
            feed.ranks.clear()
        feed.room_times = times
        ordered = view.phase not in (rooms.EARLY, rooms.PREQUEUE)
        summary = self.rooms.summary(benefit.benefit_id, view, times)
        now = time.monotonic()
        opened = feed.room is not None and feed.room["phase"] != view.phase
        if opened or now - feed.resolved_at >= RESOLVE_EVERY_S:
            feed.resolved_at = now
            unknown = [user for user in feed.seekers if user not in feed.holders]
            feed.holders.update(
                await rooms.tickets_of(self.redis, benefit.benefit_id, times.period, unknown)
            )
            if ordered:
                unranked = [t for t in feed.holders.values() if t not in feed.ranks]
                feed.ranks.update(
                    await rooms.ranks_of(self.redis, benefit.benefit_id, times.period, unranked)
                )
        if summary != feed.room:
            feed.room_dirty = True
            if opened:
                feed.queue_at = 0.0  # a new phase is told at once
        feed.room = summary
        return summary

    def personal(self, feed: Feed, event: LiveEvent, user_id: str) -> bytes:
        """The frame of ``event`` for the member ``user_id``: a ``queue`` event becomes their
        own ticket's state when they hold one (their place, wait, admission token)."""
        ticket = feed.holders.get(user_id)
        if event.name != "queue" or ticket is None or feed.room_times is None or not self.rooms:
            return event.frame
        benefit = self.engine.catalogue.cached(feed.benefit_id)
        if benefit is None:
            return event.frame
        room = event.data
        view = RoomView(
            phase=room["phase"],
            ticket_id=ticket,
            rank=feed.ranks.get(ticket),
            size=room["queue_size"],
            admitted=room["admitted"],
            stock_left=0,
            now_ms=self.engine.redis_ms(),
        )
        answer = self.rooms.answer(benefit, feed.room_times, view, user_id)
        return frame(event.seq, "queue", answer)

    def seek(self, feed: Feed, user_id: str, ticket_id: str | None) -> None:
        """A stream of ``user_id`` opened (their ticket, if known already)."""
        feed.seekers[user_id] = feed.seekers.get(user_id, 0) + 1
        if ticket_id is not None:
            feed.holders[user_id] = ticket_id

    def unseek(self, feed: Feed, user_id: str) -> None:
        left = feed.seekers.get(user_id, 0) - 1
        if left > 0:
            feed.seekers[user_id] = left
        else:
            feed.seekers.pop(user_id, None)
            ticket = feed.holders.pop(user_id, None)
            if ticket is not None:
                feed.ranks.pop(ticket, None)


def _phase(benefit: Benefit, opens_ms: int, closes_ms: int, now_ms: int, left: int) -> str:
    if benefit.paused:
        return "paused"
    if now_ms < opens_ms:
        return "not_open"
    if closes_ms and now_ms >= closes_ms:
        return "closed"
    return "sold_out" if left <= 0 else "open"


def _countdown(state: dict[str, Any], now_ms: int, opens_ms: int) -> dict[str, Any]:
    return {**state, "opens_in_s": max(opens_ms - now_ms, 0) / 1000}
