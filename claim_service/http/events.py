"""``GET /v1/benefits/{benefit_id}/events``: the benefit's live state pushed to a member as
Server-Sent Events (see ``claims.live``): a ``state`` first, then each event in order, a
comment every ``HEARTBEAT_S`` so proxies keep the stream open. ``Last-Event-ID`` resumes
after the event a client last received (a fresh ``state`` when that has left the ring)."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from claim_service.claims.live import (
    HEARTBEAT,
    HEARTBEAT_S,
    Feed,
    LiveEvent,
    LiveFeeds,
    Stream,
)
from claim_service.domain.catalogue import ID_RE
from claim_service.errors import NotFoundError
from claim_service.http.app import ENGINE, SETTINGS, VERIFIER, error_response
from claim_service.http.auth import bearer

__all__ = ["HEARTBEAT_S", "LIVE", "add_routes", "benefit_events"]

LIVE = web.AppKey("live", LiveFeeds)
RETRY_MS = 3000


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", "")
    return int(raw) if raw.isdigit() and len(raw) < 19 else None


async def benefit_events(request: web.Request) -> web.StreamResponse:
    user_id = request.app[VERIFIER].verify(bearer(request.headers.get("Authorization")))
    benefit_id = request.match_info["benefit_id"]
    engine = request.app[ENGINE]
    benefit = await engine.benefit(benefit_id) if ID_RE.match(benefit_id) else None
    if benefit is None:
        raise NotFoundError("unknown_benefit", "no such benefit")
    live = request.app[LIVE]
    if live.closed:
        return error_response(503, "shutting_down", "this worker is shutting down; retry")
    if live.streams >= request.app[SETTINGS].max_event_streams:
        return error_response(
            503, "too_many_streams", "this worker holds all the event streams it may; retry"
        )
    feed = await live.watch(benefit_id)
    seeking = False
    try:
        ticket = None
        if benefit.waiting_room is not None and live.rooms is not None:
            view, _times = await live.rooms.look(benefit, user_id)
            ticket = view.ticket_id
            if ticket is not None and view.position is not None:
                feed.ranks[ticket] = view.position - 1
            live.seek(feed, user_id, ticket)
            seeking = True
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(b"retry: %d\n\n" % RETRY_MS)
        await _stream(request, response, live, feed, _last_event_id(request), user_id)
    finally:
        if seeking:
            live.unseek(feed, user_id)
        live.unwatch(feed)
    return response


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    live: LiveFeeds,
    feed: Feed,
    last: int | None,
    user_id: str,
) -> None:
    transport = request.transport
    stream = Stream(lambda: transport is None or transport.is_closing(), user_id=user_id)
    loop = asyncio.get_running_loop()
    sent = feed.seq
    missed = feed.since(last) if last is not None else None
    if missed is None:
        await response.write(feed.state_frame())
        if feed.room is not None and user_id in feed.holders:  # their ticket, at once
            now = LiveEvent(feed.seq, "queue", feed.room, b"")
            await response.write(live.personal(feed, now, user_id))
    else:
        for event in missed:
            await response.write(live.personal(feed, event, user_id))
        sent = missed[-1].seq if missed else min(last or 0, feed.seq)
    with contextlib.suppress(ConnectionResetError):
        while not live.closed:
            beat = False
            if feed.seq == sent:
                stream.wake = loop.create_future()
                feed.waiting.add(stream)
                try:
                    beat = await stream.wake
                finally:
                    feed.waiting.discard(stream)
                if live.closed or stream.closed():
                    return
            if feed.seq == sent:
                if beat:
                    await response.write(HEARTBEAT)
                continue
            events = feed.since(sent)
            if events is None:  # fell behind the ring: the whole picture again
                await response.write(feed.state_frame())
                sent = feed.seq
                continue
            for event in events:
                await response.write(live.personal(feed, event, user_id))
                sent = event.seq


async def _close_streams(app: web.Application) -> None:
    if LIVE in app:
        app[LIVE].close()


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/benefits/{benefit_id}/events", benefit_events)
    app.on_shutdown.append(_close_streams)
