"""``/admin/dashboard``: the ops dashboard page and its live feed of snapshots (Server-Sent
Events, see ``dashboard_feed``), on the admin listener behind the admin token.

A browser can put no ``Authorization`` header on a page it navigates to, nor on an
``EventSource``. So besides the bearer token, ``GET /admin/dashboard?token=…`` signs in: it
checks the token, sets a session cookie (HttpOnly, SameSite=Strict, Path=/admin, for
``SESSION_S``) and redirects to ``/admin/dashboard``, so the token leaves the address bar
and the history at once. The cookie is not the token but an HMAC of its expiry keyed by the
token: it opens only these two read-only routes, expires, and is void once the token
changes, on every worker alike (nothing is stored). The admin API takes the bearer only.

The page is one committed HTML file with its script and style inline, allowed by their
hashes in its Content-Security-Policy and by nothing else (no other origin, no inline
handler, no ``eval``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import re
import time
from collections.abc import AsyncIterator
from importlib import resources

from aiohttp import web

from claim_service.config import Settings
from claim_service.http.app import ENGINE, PG, REDIS, SETTINGS, error_response
from claim_service.http.auth import AuthError, check_admin
from claim_service.http.dashboard_feed import MAX_VIEWERS, Dashboard

DASHBOARD = web.AppKey("dashboard", Dashboard)
PATH = "/admin/dashboard"
COOKIE = "claim_dashboard"
SESSION_S = 12 * 3600
RETRY_MS = 3000
HEARTBEAT = b": keep-alive\n\n"


def _page() -> tuple[bytes, str]:
    """The page, and a policy allowing exactly its inline script and style."""
    page = (resources.files("claim_service.http") / "static" / "dashboard.html").read_bytes()
    allowed = {}
    for tag in ("script", "style"):
        blocks = re.findall(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), page, re.S)
        digests = (base64.b64encode(hashlib.sha256(b).digest()).decode() for b in blocks)
        allowed[tag] = " ".join(f"'sha256-{d}'" for d in digests)
    policy = (
        "default-src 'none'; "
        f"script-src {allowed['script']}; style-src {allowed['style']}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, policy


PAGE, POLICY = _page()
PAGE_HEADERS = {
    "Content-Security-Policy": POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


# -- the session cookie --------------------------------------------------------------------


def session_cookie(admin_token: str, expires: int) -> str:
    """``<expiry>.<HMAC-SHA256(token, expiry)>``: proves the holder knew the token."""
    return f"{expires}.{_mac(admin_token, expires)}"


def valid_session(value: str, admin_token: str, now: float) -> bool:
    expires, _, mac = value.partition(".")
    if not expires.isascii() or not expires.isdigit() or len(expires) > 12 or not mac.isascii():
        return False
    if not now < int(expires) <= now + SESSION_S + 60:
        return False
    return hmac.compare_digest(mac.encode(), _mac(admin_token, int(expires)).encode())


def _mac(admin_token: str, expires: int) -> str:
    message = f"claim-service dashboard session {expires}".encode()
    return hmac.new(admin_token.encode(), message, hashlib.sha256).hexdigest()


def _authorised(request: web.Request) -> None:
    """The bearer header if sent (a wrong one is refused whatever the cookie), else the
    session cookie."""
    settings = request.app[SETTINGS]
    header = request.headers.get("Authorization")
    if header is not None:
        check_admin(header, settings)
        return
    cookie = request.cookies.get(COOKIE)
    if cookie is not None and valid_session(cookie, settings.admin_token, time.time()):
        return
    raise AuthError(
        f"the dashboard needs the admin token: open {PATH}?token=… in a browser, "
        "or send Authorization: Bearer <token>"
    )


def _sign_in(request: web.Request, token: str, settings: Settings) -> web.Response:
    if not token.isascii() or not hmac.compare_digest(
        token.encode(), settings.admin_token.encode()
    ):
        raise AuthError("invalid admin token")
    response = web.Response(
        status=303,
        headers={"Location": PATH, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )
    expires = int(time.time()) + SESSION_S
    response.set_cookie(
        COOKIE,
        session_cookie(settings.admin_token, expires),
        max_age=SESSION_S,
        path="/admin",
        httponly=True,
        samesite="Strict",
        secure=request.secure,  # plain HTTP on loopback must work; HTTPS keeps it there
    )
    return response


# -- routes --------------------------------------------------------------------------------


async def dashboard_page(request: web.Request) -> web.Response:
    """``GET /admin/dashboard``: the page; with ``?token=`` the sign-in redirect."""
    token = request.query.get("token")
    if token is not None:
        return _sign_in(request, token, request.app[SETTINGS])
    _authorised(request)
    return web.Response(body=PAGE, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


async def dashboard_events(request: web.Request) -> web.StreamResponse:
    """``GET /admin/dashboard/events``: a snapshot every tick, the latest one only."""
    _authorised(request)
    board = request.app[DASHBOARD]
    if board.closed:
        return error_response(503, "shutting_down", "this worker is shutting down; retry")
    if board.viewers >= MAX_VIEWERS:
        return error_response(
            503, "too_many_streams", "this worker holds all the dashboards it may; retry"
        )
    # Joining an idle dashboard: its last snapshot is old, wait for the fresh one.
    sent = board.seq if board.viewers == 0 else 0
    board.join()
    try:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(b"retry: %d\n\n" % RETRY_MS)
        with contextlib.suppress(ConnectionResetError):
            while not board.closed:
                latest = await board.next_frame(sent)
                if latest is None:
                    if not board.closed:
                        await response.write(HEARTBEAT)
                    continue
                sent, data = latest
                await response.write(data)
    finally:
        board.leave()
    return response


async def feed(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: this worker's dashboard, sampling while watched (after the pools)."""
    board = app[DASHBOARD] = Dashboard(app[ENGINE], app[REDIS], app[PG])
    stop = asyncio.Event()
    task = asyncio.create_task(board.run(stop), name="dashboard")
    yield
    board.close()
    stop.set()
    await task


async def _close(app: web.Application) -> None:
    """On shutdown, before the server waits for handlers: end the streams."""
    if DASHBOARD in app:
        app[DASHBOARD].close()


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, dashboard_page)
    app.router.add_get(f"{PATH}/events", dashboard_events)
    app.on_shutdown.append(_close)
