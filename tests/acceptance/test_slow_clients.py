"""Slow, stalled and malformed clients against a real ``serve`` process, on raw sockets.

A request must arrive whole within ``CLAIM_BODY_TIMEOUT_S``; a flood of stalled connections
cannot lock others out; a malformed request gets a JSON answer and a short log line that
quotes nothing it carried (tokens included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.http.auth import mint_token
from claim_service.local.embedded import free_port
from tests.helpers import (
    Listeners,
    hostile_requests,
    open_video,
    send_raw,
    service_env,
    spawn_serve,
    wait_ready,
)

BODY_TIMEOUT_S = 1.0
# How much later than the deadline a busy two-core machine may be to close a connection.
SLACK_S = 5.0


@dataclass
class Stalled:
    """A raw connection that sent part of a request and then nothing, read meanwhile until
    the server closes it (``outcome``: all it sent) or ``BODY_TIMEOUT_S + SLACK_S`` pass."""

    kind: str
    writer: asyncio.StreamWriter
    outcome: asyncio.Task[bytes]


async def stall(port: int, kind: str, data: bytes, within: float = BODY_TIMEOUT_S) -> Stalled:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    deadline = asyncio.get_running_loop().time() + within + SLACK_S
    return Stalled(kind, writer, asyncio.create_task(until_closed(reader, deadline)))


async def until_closed(reader: asyncio.StreamReader, deadline: float) -> bytes:
    """Everything the server sent before it closed the connection, which it must do by
    ``deadline`` (loop time)."""
    data = b""
    try:
        async with asyncio.timeout_at(deadline):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        raise AssertionError(f"still open past the deadline; got {data[:200]!r}") from None
    except ConnectionError:  # reset, or a write of ours hit the closed connection
        pass
    return data


def answer(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the one answer in ``data``."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def json_error(data: bytes, status: int, code: str) -> None:
    got, headers, body = answer(data)
    assert got == status, data[:300]
    assert headers["content-type"].startswith("application/json"), headers
    assert json.loads(body)["error"] == code, body


def claim_head(token: str, length: int) -> bytes:
    return (
        "POST /v1/benefits/video/claims HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def test_stalled_requests_are_cut_off_while_others_are_answered(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    # Hundreds of stalled claims come from one member: no rate limit, or 429 would answer
    # them before their bodies are due.
    server, ports = spawn_serve(
        settings,
        tmp_path / "serve.log",
        CLAIM_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        CLAIM_RATE_MEMBER_PER_S="0",
    )
    procs.append(server)
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, ports.base, ports.admin)
        await open_video(http, settings, ports)
    token = mint_token(settings, "m0")
    kinds = {
        # a member's claim whose body stops half-way
        "claim": claim_head(token, 40) + b'{"request_id": ',
        # an unauthenticated partner callback whose body stops half-way
        "callback": b"POST /v1/partners/p1/callbacks HTTP/1.1\r\nHost: test\r\n"
        b"Content-Length: 10\r\n\r\n01234",
        # headers that never end
        "headers": b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ",
    }
    stalled: list[Stalled] = []
    stop = asyncio.Event()

    async def attack() -> None:
        # Three waves of 120 while normal traffic goes on.
        for _ in range(3):
            for kind, data in kinds.items():
                stalled.extend(
                    await asyncio.gather(*(stall(ports.port, kind, data) for _ in range(40)))
                )
            await asyncio.sleep(BODY_TIMEOUT_S)
        stop.set()

    async def trickle() -> None:
        # The endless headers keep coming, one byte at a time.
        while not stop.is_set():
            for conn in stalled:
                if conn.kind == "headers" and not conn.outcome.done():
                    with contextlib.suppress(ConnectionError):  # cut off meanwhile
                        conn.writer.write(b"a")
            await asyncio.sleep(0.25)

    answered = 0

    async def normal_traffic() -> None:
        nonlocal answered
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            member = 1
            while not stop.is_set():
                async with http.get(ports.base + "/healthz") as resp:
                    assert resp.status == 200
                async with http.post(
                    ports.base + "/v1/benefits/video/claims",
                    headers={"Authorization": "Bearer " + mint_token(settings, f"m{member}")},
                    json={"request_id": "r", "option_id": "iqiyi"},
                ) as resp:
                    # accepted, or the same claim again once every member has one
                    assert resp.status in (200, 202), await resp.text()
                answered += 2
                member = member % 999 + 1

    await asyncio.gather(attack(), trickle(), normal_traffic())
    assert len(stalled) == 360 and answered >= 10

    outcomes = await asyncio.gather(*(c.outcome for c in stalled))
    for conn, data in zip(stalled, outcomes, strict=True):
        conn.writer.close()
        if conn.kind == "callback":
            json_error(data, 401, "unauthorized")  # refused before its body was read
        else:
            json_error(data, 408, "request_timeout")


def spawn_with_file_limit(
    settings: Settings, log: Path, limit: int, **env: str
) -> tuple[subprocess.Popen[bytes], Listeners]:
    ports = Listeners(free_port(), free_port())

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    command = ["serve", "--insecure-dev", "--port", str(ports.port)]
    command += ["--admin-port", str(ports.admin_port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "claim_service", *command],
        env=service_env(settings, **env),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        preexec_fn=few_files,
    )
    return proc, ports


async def test_a_flood_of_stalled_connections_cannot_lock_others_out(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    # More stalled connections than the server has file descriptors, and a body deadline
    # too far away to help: only the bound on connections keeps room for others.
    log = tmp_path / "serve.log"
    server, ports = spawn_with_file_limit(settings, log, 1024, CLAIM_BODY_TIMEOUT_S="300")
    procs.append(server)
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, ports.base, ports.admin)
        await open_video(http, settings, ports)
    head = b"POST /v1/benefits/video/claims HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n"
    stalled: list[Stalled] = []
    for _ in range(11):
        stalled += await asyncio.gather(
            *(stall(ports.port, "headers", head, within=300) for _ in range(100))
        )
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)
    ) as http:
        for i in range(20):
            async with http.get(ports.base + "/healthz") as resp:
                assert resp.status == 200
            async with http.post(
                ports.base + "/v1/benefits/video/claims",
                headers={"Authorization": "Bearer " + mint_token(settings, f"m{i}")},
                json={"request_id": "r", "option_id": "iqiyi"},
            ) as resp:
                assert resp.status == 202, await resp.text()
    # The ones stalled longest made room.
    await asyncio.wait_for(asyncio.gather(*(c.outcome for c in stalled[:100])), SLACK_S)
    for conn in stalled:
        conn.outcome.cancel()
        conn.writer.close()
    assert "at the connection limit" in log.read_text()


# -- malformed requests: JSON answers, quiet logs ---------------------------------------------

ADMIN_TOKEN = "admin-token-that-must-never-be-logged-0123456789"
PARTNER_SECRET = "partner-secret-never-logged-0123456789"


async def test_malformed_requests_get_json_and_leave_no_secret_in_the_log(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    log = tmp_path / "serve.log"
    server, ports = spawn_serve(
        settings, log, CLAIM_ADMIN_TOKEN=ADMIN_TOKEN, CLAIM_LOG_LEVEL="DEBUG"
    )
    procs.append(server)
    token = mint_token(settings, "m0")
    ops = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, ports.base, ports.admin)
        await open_video(http, replace(settings, admin_token=ADMIN_TOKEN), ports)
        partner = {"base_url": "http://127.0.0.1:9/", "secret": PARTNER_SECRET}
        async with http.put(
            ports.admin + "/admin/v1/partners/p1", json=partner, headers=ops
        ) as resp:
            assert resp.status == 201
    for _ in range(20):  # a client that keeps at it
        for request, status in hostile_requests(token, ADMIN_TOKEN, PARTNER_SECRET):
            admin_path = request.split(b" ", 2)[1].startswith(b"/admin")
            port = ports.admin_port if admin_path else ports.port
            await send_raw("127.0.0.1", port, request, status)
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, ports.base, ports.admin)  # still serving
    server.terminate()
    server.wait(30)
    text = log.read_text()
    for secret in (token, ADMIN_TOKEN, PARTNER_SECRET, token[:40], ADMIN_TOKEN[:20]):
        assert secret not in text
    assert " ERROR " not in text and "Traceback" not in text, text[-3000:]
    assert "backend" not in text, text[-3000:]  # a client hanging up is not an outage


@pytest.fixture(autouse=True)
def _enough_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
