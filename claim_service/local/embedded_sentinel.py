"""A replicated Valkey watched by Sentinel, on one machine: a master, its replicas and the
sentinels, each a child process on loopback that dies with the process that started it.

For failover drills and tests: kill the master (``node(master_port()).proc.kill()``) and the
sentinels promote a replica; claim-service, given ``url``, follows it by itself.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

from claim_service.errors import EmbeddedServerError
from claim_service.local.embedded import (
    START_TIMEOUT_S,
    EmbeddedValkey,
    die_with_parent,
    free_port,
    stop_process,
    valkey_binary,
    wait_for_port,
)

PROBE_TIMEOUT_S = 1.0


class EmbeddedSentinelSet:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels. Every server keeps an AOF
    fsynced on each write (what ``CLAIM_DURABILITY`` needs); a master unreachable for
    ``down_after_ms`` is failed over as soon as a majority of the sentinels agree."""

    def __init__(
        self,
        data_dir: Path,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        down_after_ms: int = 500,
        master_name: str = "claims",
    ) -> None:
        self.data_dir = data_dir
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        # Any node may become the master: none waits for more replicas before syncing one.
        prompt = ("--repl-diskless-sync-delay", "0")
        self.nodes = [
            EmbeddedValkey(data_dir / f"node{i}", appendfsync="always", extra=prompt)
            for i in range(replicas + 1)
        ]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """``CLAIM_REDIS_URL`` for claim-service."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.master_name}"

    def start(self) -> EmbeddedSentinelSet:
        try:
            master, *replicas = self.nodes
            master.start()
            for node in replicas:
                node.replica_of = master.port
                node.start()
            self._wait(lambda: self._online_replicas(master.port) == len(replicas), "replicas")
            for port in self.sentinel_ports:
                self.sentinels.append(self._start_sentinel(port, master.port))
            self._wait(self._sentinels_met, "the sentinels to find each other")
        except BaseException:
            self.stop()
            raise
        return self

    def master_port(self) -> int:
        """The master's port as the sentinels name it now."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), _client(port) as client:
                address = client.sentinel_get_master_addr_by_name(self.master_name)
                if address:
                    return int(address[1])
        raise EmbeddedServerError("no sentinel names a master")

    def node(self, port: int) -> EmbeddedValkey:
        """The server listening on ``port``."""
        return next(node for node in self.nodes if node.port == port)

    def stop(self) -> None:
        for proc in self.sentinels:
            stop_process(proc)
        self.sentinels = []
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedSentinelSet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_sentinel(self, port: int, master_port: int) -> subprocess.Popen[bytes]:
        folder = self.data_dir / f"sentinel-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        logfile = folder / "sentinel.log"
        name, quorum = self.master_name, len(self.sentinel_ports) // 2 + 1
        config = folder / "sentinel.conf"  # a sentinel rewrites its own configuration file
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {folder}\nlogfile {logfile}\n"
            f"sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {max(4 * self.down_after_ms, 1000)}\n"
            f"sentinel parallel-syncs {name} {len(self.nodes)}\n"
        )
        proc = subprocess.Popen(
            [str(valkey_binary()), str(config), "--sentinel"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        wait_for_port(port, proc, "valkey-server --sentinel", logfile)
        return proc

    def _online_replicas(self, port: int) -> int:
        with _client(port) as client:
            info = client.info("replication")
        return sum(1 for value in info.values() if isinstance(value, dict) and _online(value))

    def _sentinels_met(self) -> bool:
        others = len(self.sentinel_ports) - 1
        for port in self.sentinel_ports:
            with _client(port) as client:
                state = client.sentinel_master(self.master_name)
            if int(state["num-other-sentinels"]) < others:
                return False
        return True

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if done():
                    return
            time.sleep(0.1)
        raise EmbeddedServerError(f"timed out waiting for {what} ({self.data_dir})")


def _online(replica: dict[str, object]) -> bool:
    return replica.get("state") == "online"


def _client(port: int) -> redis.Redis:
    return redis.Redis(
        port=port, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S
    )
