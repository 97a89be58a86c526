"""``GET /v1/benefits/{benefit_id}/events``: the benefit's live state pushed to a member as
Server-Sent Events (see ``claims.live``): a ``state`` first, then each event in order, a
comment every ``HEARTBEAT_S`` so proxies keep the stream open. ``Last-Event-ID`` resumes
after the event a client last received (a fresh ``state`` when that has left the ring)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from aiohttp import web

from claim_service.claims.live import Feed, LiveFeeds
from claim_service.domain.catalogue import ID_RE
from claim_service.errors import NotFoundError
from claim_service.http.app import ENGINE, SETTINGS, VERIFIER, error_response
from claim_service.http.auth import bearer

LIVE = web.AppKey("live", LiveFeeds)
HEARTBEAT_S = 15.0
RETRY_MS = 3000


def frame(seq: int | None, name: str, data: dict[str, Any]) -> bytes:
    head = b"" if seq is None else b"id: %d\n" % seq
    return head + b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", "")
    return int(raw) if raw.isdigit() and len(raw) < 19 else None


async def benefit_events(request: web.Request) -> web.StreamResponse:
    request.app[VERIFIER].verify(bearer(request.headers.get("Authorization")))
    benefit_id = request.match_info["benefit_id"]
    engine = request.app[ENGINE]
    if not ID_RE.match(benefit_id) or await engine.benefit(benefit_id) is None:
        raise NotFoundError("unknown_benefit", "no such benefit")
    live = request.app[LIVE]
    if live.closed:
        return error_response(503, "shutting_down", "this worker is shutting down; retry")
    if live.streams >= request.app[SETTINGS].max_event_streams:
        return error_response(
            503, "too_many_streams", "this worker holds all the event streams it may; retry"
        )
    feed = await live.watch(benefit_id)
    try:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(b"retry: %d\n\n" % RETRY_MS)
        await _stream(response, live, feed, _last_event_id(request))
    finally:
        live.unwatch(feed)
    return response


async def _stream(
    response: web.StreamResponse, live: LiveFeeds, feed: Feed, last: int | None
) -> None:
    sent = feed.seq
    missed = feed.since(last) if last is not None else None
    if missed is None:
        await response.write(frame(feed.seq, "state", feed.state))
    else:
        for event in missed:
            await response.write(frame(event.seq, event.name, event.data))
        sent = missed[-1].seq if missed else min(last or 0, feed.seq)
    with contextlib.suppress(ConnectionResetError):
        while True:
            waiter = feed.changed
            if feed.seq == sent:
                try:
                    await asyncio.wait_for(waiter.wait(), HEARTBEAT_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
            if live.closed:
                return
            events = feed.since(sent)
            if events is None:  # fell behind the ring: the whole picture again
                await response.write(frame(feed.seq, "state", feed.state))
                sent = feed.seq
                continue
            for event in events:
                await response.write(frame(event.seq, event.name, event.data))
                sent = event.seq


async def _close_streams(app: web.Application) -> None:
    if LIVE in app:
        app[LIVE].close()


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/benefits/{benefit_id}/events", benefit_events)
    app.on_shutdown.append(_close_streams)
