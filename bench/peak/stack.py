"""The processes of a run and how the benchmark talks to them.

Everything under test is a real process started the way an operator would: the embedded
Valkey and PostgreSQL (or the servers named by ``CLAIM_REDIS_URL`` and
``CLAIM_DATABASE_URL`` when both are set), ``claim-service migrate``, ``load-tiers``,
``serve --insecure-dev [--workers N]``, ``writer``, the baseline servers and the load
generator. Each inherits this process's environment (so ``CLAIM_*`` tuning passes through),
logs to the run folder, and dies with the benchmark. Benefits and tiers are set up through
the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis

from bench.peak.records import Run
from bench.peak.wire import Spec
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.local.embedded import die_with_parent, free_port
from claim_service.store.connections import create_pg_pool, create_redis

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
TIERS_PER_CALL = 50_000
DRAIN_WAIT_S = 120.0
LOG_LINE = re.compile(r" (WARNING|ERROR|CRITICAL) [\w.]+: (.*)")


def log_warnings(path: Path) -> Counter[str]:
    """WARNING and ERROR lines of a process's log, ids and numbers blanked so that repeats
    count together (the start-up warnings about development secrets left out)."""
    found: Counter[str] = Counter()
    if not path.exists():
        return found
    for line in path.read_text(errors="replace").splitlines():
        match = LOG_LINE.search(line)
        if match and "public development default" not in line:
            message = re.sub(r"peak-[\w.-]+", "…", match.group(2))
            found[f"{match.group(1)} {re.sub(r'[0-9]+', 'N', message)[:140]}"] += 1
    return found


def say(message: str) -> None:
    """A progress line on stderr."""
    print(f"[peak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Service:
    """A running ``serve``: its listeners and process."""

    name: str
    base: str
    admin: str
    port: int
    proc: subprocess.Popen[bytes]
    workers: int


class Stack:
    """Starts and stops the run's processes; the admin API and database reads it needs."""

    def __init__(self, run_dir: Path, redis_url: str, database_url: str) -> None:
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.records = run_dir / "records"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.records.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.database_url = database_url
        self.settings = Settings.from_env(redis_url=redis_url, database_url=database_url)
        self.period = periods.current_period(self.settings.tz)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._http: aiohttp.ClientSession | None = None
        self._pg: asyncpg.Pool | None = None
        self._redis: Redis | None = None

    async def __aenter__(self) -> Stack:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        self._pg = await create_pg_pool(self.database_url, max_size=4)
        self._redis = await create_redis(self.redis_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        if self._http is not None:
            await self._http.close()
        if self._pg is not None:
            await self._pg.close()
        if self._redis is not None:
            await self._redis.aclose()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None
        return self._http

    @property
    def pg(self) -> asyncpg.Pool:
        assert self._pg is not None
        return self._pg

    @property
    def redis(self) -> Redis:
        assert self._redis is not None
        return self._redis

    # -- processes -----------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(CLAIM_REDIS_URL=self.redis_url, CLAIM_DATABASE_URL=self.database_url)
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    async def command(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        """Run a ``claim-service`` command to completion; raise if it fails."""
        proc = self.spawn(name, ["-m", "claim_service", *args], env or self.env())
        code = await asyncio.to_thread(proc.wait)
        self.procs.remove(proc)
        if code != 0:
            raise RuntimeError(f"claim-service {' '.join(args)} failed; see {self.logs}/{name}.log")

    @contextlib.asynccontextmanager
    async def service(
        self, name: str, *, workers: int = 1, writer: bool = True, **env: str
    ) -> AsyncIterator[Service]:
        """``serve`` (and a separate ``writer`` process) until the block ends."""
        port, admin_port = free_port(), free_port()
        penv = self.env(
            CLAIM_PORT=str(port),
            CLAIM_ADMIN_PORT=str(admin_port),
            CLAIM_HOST="127.0.0.1",
            CLAIM_ADMIN_HOST="127.0.0.1",
            **env,
        )
        args = ["-m", "claim_service", "serve", "--insecure-dev", "--workers", str(workers)]
        proc = self.spawn(name, args, penv)
        procs = [proc]
        if writer:
            procs.append(self.spawn(f"{name}-writer", ["-m", "claim_service", "writer"], penv))
        service = Service(
            name, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", port, proc, workers
        )
        try:
            await self.wait_ready(service.base + "/readyz", procs, name)
            yield service
            if writer:  # leave no backlog to the next scenario's writer
                await self.drain(service)
        finally:
            for p in reversed(procs):
                await asyncio.to_thread(self.stop, p)

    @contextlib.asynccontextmanager
    async def baseline(self, kind: str, benefit_id: str, stock: int) -> AsyncIterator[int]:
        port = free_port()
        args = [
            "-m",
            "bench.peak.baselines",
            kind,
            "--port",
            str(port),
            "--benefit",
            benefit_id,
            "--stock",
            str(stock),
        ]
        proc = self.spawn(f"baseline-{kind}", args, self.env())
        try:
            await self.wait_port(port, proc, f"baseline-{kind}")
            yield port
        finally:
            await asyncio.to_thread(self.stop, proc)

    async def wait_ready(self, url: str, procs: list[subprocess.Popen[bytes]], name: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive(procs, name)
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.http.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{name} did not become ready; see {self.logs}/{name}.log")

    async def wait_port(self, port: int, proc: subprocess.Popen[bytes], name: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive([proc], name)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{name} did not listen; see {self.logs}/{name}.log")

    def _check_alive(self, procs: list[subprocess.Popen[bytes]], name: str) -> None:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"{name} exited early; see {self.logs}/{name}*.log")

    async def generate(
        self, spec: Spec, go: Callable[[], Awaitable[dict[str, Any]]] | None = None
    ) -> Run:
        """One load generator run: prepared, started (after ``go`` if given), loaded back."""
        spec_path = Path(spec.out).with_suffix(".spec.json")
        spec.save(spec_path)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.peak.generator",
            str(spec_path),
            cwd=REPO,
            env=self.env(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S * 2)
            if line.strip() != b"ready":
                raise RuntimeError(f"load generator for {spec.label} did not start: {line!r}")
            message = await go() if go is not None else {}
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            await proc.stdin.drain()
            limit = max(spec.duration_s, spec.max_s if spec.mode == "release" else 0)
            code = await asyncio.wait_for(proc.wait(), limit + spec.timeout_s + 120)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if code != 0:
            raise RuntimeError(f"load generator for {spec.label} exited with {code}")
        return Run.load(Path(spec.out))

    # -- admin API and reads -------------------------------------------------------------

    def _admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token}"}

    async def put_benefit(self, service: Service, benefit_id: str, body: dict[str, Any]) -> None:
        url = f"{service.admin}/admin/v1/benefits/{benefit_id}"
        async with self.http.put(url, json=body, headers=self._admin_headers()) as resp:
            if resp.status not in (200, 201):
                raise RuntimeError(f"PUT {url}: {resp.status} {await resp.text()}")

    async def put_tiers(self, service: Service, rows: list[tuple[str, int]]) -> None:
        url = f"{service.admin}/admin/v1/tiers/{self.period}"
        for start in range(0, len(rows), TIERS_PER_CALL):
            chunk = [{"user_id": u, "tier": t} for u, t in rows[start : start + TIERS_PER_CALL]]
            async with self.http.put(url, json=chunk, headers=self._admin_headers()) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"PUT {url}: {resp.status} {await resp.text()}")

    async def stock(self, service: Service, benefit_id: str) -> dict[str, Any]:
        url = f"{service.admin}/admin/v1/benefits/{benefit_id}"
        async with self.http.get(url, headers=self._admin_headers()) as resp:
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return dict(data["stock"])

    async def unpersisted(self, service: Service) -> int:
        url = f"{service.admin}/admin/v1/writer"
        async with self.http.get(url, headers=self._admin_headers()) as resp:
            resp.raise_for_status()
            return int((await resp.json())["unpersisted"])

    async def drain(self, service: Service) -> tuple[int, float]:
        """Wait for the writer to persist every accepted claim: (claims it still had to
        persist when asked, seconds it took)."""
        started = time.monotonic()
        first = left = await self.unpersisted(service)
        while left and time.monotonic() - started < DRAIN_WAIT_S:
            await asyncio.sleep(0.05)
            left = await self.unpersisted(service)
        if left:
            raise RuntimeError(f"{service.name}: {left:,} claims still unpersisted")
        return first, time.monotonic() - started

    async def rows(self, benefit_id: str) -> int:
        return int(
            await self.pg.fetchval("SELECT count(*) FROM claims WHERE benefit_id = $1", benefit_id)
        )

    async def versions(self) -> tuple[str, str]:
        info = await self.redis.info("server")
        valkey = str(info.get("valkey_version") or info.get("redis_version"))
        return valkey, str(await self.pg.fetchval("SHOW server_version"))
