"""The client side of the wire: what a generator run does (``Spec``), claim requests encoded
once per member, and the connection protocol that reads answers no further than it must
(status line, ``Content-Length``, the body as bytes)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, cast

from bench.peak.records import FIRST
from claim_service.config import Settings
from claim_service.http.auth import mint_token

TOKEN_TTL_S = 7200


class Listener(Protocol):
    """What a connection reports to (the generator's driver)."""

    def answered(self, conn: Conn, status: int, body: bytes) -> None: ...

    def lost(self, conn: Conn) -> None: ...


@dataclass(frozen=True)
class Spec:
    """What one generator run does (written as JSON by the benchmark)."""

    mode: str  # "closed", "open" or "release"
    port: int
    path: str
    out: str
    connections: int
    label: str = ""
    host: str = "127.0.0.1"
    warmup_s: float = 0.0  # answers before this are left out of the figures
    duration_s: float = 10.0  # closed, open: how long requests are sent
    max_requests: int = 0  # closed: stop after sending this many (0: no limit)
    rate: float = 0.0  # open: requests per second
    timeout_s: float = 2.0
    member_prefix: str = "m"
    members: int = 1000
    request_prefix: str = "r"
    options: tuple[str, ...] = ("iqiyi",)
    retry_share: float = 0.1  # release: accepted claims resent with the same request_id
    early_poll_s: float = 0.5  # release: longest wait after a 425 before asking again
    spread_s: float = 0.05  # release: jitter on every wait (apps are not synchronised)
    backoff_s: float = 0.5  # release: wait after 503/429/no answer (to twice that)
    max_s: float = 600.0  # release: give up after this long
    seed: int = 1
    # Tokens, one a line, member by member: runs that share them look like the same apps
    # coming back (a server's token cache knows them); else each run mints its own.
    tokens_file: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Spec:
        data = json.loads(path.read_text())
        data["options"] = tuple(data["options"])
        return cls(**data)


def member_id(prefix: str, i: int) -> str:
    return f"{prefix}{i:06d}"


def mint_tokens(settings: Settings, prefix: str, members: int) -> list[str]:
    """One token per member, as the members' apps would hold them."""
    return [mint_token(settings, member_id(prefix, i), TOKEN_TTL_S) for i in range(members)]


def claim_id_of(body: bytes) -> bytes:
    at = body.find(b'"claim_id":"')
    return body[at + 12 : at + 44] if at >= 0 else b""


class Requests:
    """Claim requests: the head (with the member's token) encoded once per member."""

    def __init__(self, spec: Spec, settings: Settings) -> None:
        host = f"{spec.host}:{spec.port}"
        tokens = (
            Path(spec.tokens_file).read_text().split()[: spec.members]
            if spec.tokens_file
            else mint_tokens(settings, spec.member_prefix, spec.members)
        )
        self.heads = [
            f"POST {spec.path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: ".encode()
            for token in tokens
        ]
        self.options = [o.encode() for o in spec.options]
        self.prefix = spec.request_prefix.encode()

    def claim(self, member: int, request_id: bytes, option: bytes) -> bytes:
        body = b'{"request_id":"' + request_id + b'","option_id":"' + option + b'"}'
        return self.heads[member] + b"%d\r\n\r\n" % len(body) + body

    def nth(self, k: int) -> bytes:
        """The k-th request of a loop: members in turn, every request_id new."""
        n = len(self.heads)
        return self.claim(k % n, self.prefix + b"%d" % k, self.options[k % len(self.options)])


class Slot:
    """One connection's place in the load; it survives reconnects."""

    __slots__ = (
        "attempt",
        "claim_id",
        "conn",
        "due",
        "index",
        "member",
        "option",
        "pending",
        "request",
        "retired",
        "tag",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.conn: Conn | None = None
        self.request = b""
        self.tag = FIRST
        self.due: int | None = None
        self.pending = False  # to be sent once its connection is back
        self.member = -1
        self.attempt = 0
        self.option = b""
        self.claim_id = b""
        self.retired = False


class Conn(asyncio.Protocol):
    """A keep-alive connection with at most one request in flight."""

    def __init__(self, driver: Listener, slot: Slot) -> None:
        self.driver = driver
        self.slot = slot
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.total = -1  # bytes of the answer being read (head + body), once known
        self.body_at = 0
        self.status = 0
        self.busy = False
        self.timed_out = False
        self.due = 0
        self.tag = FIRST

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes, tag: int, due: int) -> None:
        assert self.transport is not None
        self.tag, self.due, self.busy = tag, due, True
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.total < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.status = int(buf[9:12])
            at = buf.find(b"Content-Length:", 0, end)
            if at < 0:
                at = buf.lower().find(b"content-length:", 0, end)
            length = int(buf[at + 15 : buf.find(b"\r\n", at, end + 2)]) if at >= 0 else 0
            self.body_at = end + 4
            self.total = self.body_at + length
        if len(buf) < self.total:
            self.buf = buf
            return
        body = buf[self.body_at : self.total]
        self.buf = buf[self.total :]
        self.total = -1
        if self.busy:
            self.busy = False
            self.driver.answered(self, self.status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.driver.lost(self)
