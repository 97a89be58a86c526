"""A Valkey Cluster on one machine: ``primaries`` primaries with ``replicas_per_primary``
replicas each, every node a ``valkey-server`` child process on loopback that dies with the
process that started it.

For the cluster-mode tests, the demo and the drills: ``url`` is the ``redis+cluster://`` URL of
every node; ``kill``/``pause``/``resume``/``restart`` a node for a failover drill, and
``migrate_slot`` reshards one slot live. The project forms the cluster itself (CLUSTER MEET,
ADDSLOTSRANGE, REPLICATE) rather than through ``valkey-cli --cluster create``, so that which
replica follows which primary is known (replica ``j`` of primary ``i`` is node
``primaries + i * replicas_per_primary + j``) and a drill can name the node it fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis

from claim_service.errors import EmbeddedServerError
from claim_service.local.embedded import START_TIMEOUT_S, EmbeddedValkey, free_port
from claim_service.local.embedded_cluster_ops import (
    NodeView,
    client,
    cluster_info,
    cluster_nodes,
    even_ranges,
    migrate_slot_steps,
    owner_of,
    replication_map,
    slot_map,
)

log = logging.getLogger(__name__)

CLUSTER_SCHEME = "redis+cluster"
NODE_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class NodeInfo:
    """A node as the cluster sees it now (``role`` changes on a failover)."""

    host: str
    port: int
    role: str  # "primary" or "replica"
    pid: int | None  # None once killed
    node_id: str
    primary_id: str | None = None  # the primary a replica follows

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class EmbeddedCluster:
    """A cluster whose every node keeps an AOF like the single server (none when
    ``ephemeral``), with a ``cluster-node-timeout`` of ``node_timeout_ms``: a primary silent
    that long is failed and its replica promoted within a few seconds, so drills stay quick.
    Replicas may always be promoted (``cluster-replica-validity-factor 0``), however long
    their link was down, because a drill kills primaries on purpose."""

    def __init__(
        self,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        *,
        ephemeral: bool = True,
        data_dir: Path | None = None,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        appendfsync: str = "everysec",
    ) -> None:
        if primaries < 3:
            # Fewer than three primaries cannot reach a majority once one of them is lost.
            raise EmbeddedServerError("a cluster needs at least 3 primaries to fail over")
        self.primaries = primaries
        self.replicas_per_primary = replicas_per_primary
        self._tmp: str | None = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="claim-service-cluster-")
            data_dir = Path(self._tmp)
        self.data_dir = data_dir.resolve()
        self.node_timeout_ms = node_timeout_ms
        extra = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",  # in the node's own --dir; the node rewrites it on every change
            "--cluster-node-timeout",
            str(node_timeout_ms),
            "--cluster-replica-validity-factor",
            "0",
            # A replica syncs at once instead of waiting for more replicas to join the sync.
            "--repl-diskless-sync-delay",
            "0",
        )
        count = primaries * (1 + replicas_per_primary)
        # The bus port is chosen too: its default (port + 10000) may be taken, or past 65535.
        self._bus_ports = [free_port() for _ in range(count)]
        self.servers = [
            EmbeddedValkey(
                self.data_dir / f"node{i}",
                ephemeral=ephemeral,
                appendfsync=appendfsync,
                extra=(*extra, "--cluster-port", str(bus_port)),
            )
            for i, bus_port in enumerate(self._bus_ports)
        ]
        self._ids: dict[int, str] = {}  # port -> node id
        self._paused: set[int] = set()

    @property
    def url(self) -> str:
        """``CLAIM_REDIS_URL`` for claim-service: every node, any of which can answer for
        the cluster's layout."""
        hosts = ",".join(f"127.0.0.1:{server.port}" for server in self.servers)
        return f"{CLUSTER_SCHEME}://{hosts}"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", server.port) for server in self.servers]

    @property
    def nodes(self) -> list[NodeInfo]:
        """Every node, with its role as the cluster states it now."""
        views = {view.port: view for view in self._view()}
        found = []
        for server in self.servers:
            view = views.get(server.port)
            alive = server.proc is not None and server.proc.poll() is None
            found.append(
                NodeInfo(
                    host="127.0.0.1",
                    port=server.port,
                    role="primary" if view is None or view.is_primary else "replica",
                    pid=server.proc.pid if alive and server.proc else None,
                    node_id=self._ids.get(server.port, ""),
                    primary_id=view.primary_id if view else None,
                )
            )
        return found

    def start(self) -> EmbeddedCluster:
        began = time.monotonic()
        try:
            for server in self.servers:
                server.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        log.info(
            "valkey cluster of %d primaries and %d replicas ready at %s in %.1fs",
            self.primaries,
            len(self.servers) - self.primaries,
            self.url,
            time.monotonic() - began,
        )
        return self

    def stop(self) -> None:
        for port in list(self._paused):
            self.resume(port)  # a stopped process cannot act on SIGTERM
        for server in self.servers:
            server.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- drills ------------------------------------------------------------------------------

    def primary_for_slot(self, slot: int) -> NodeInfo:
        """The primary serving ``slot``, as a live node states it now."""
        owner = owner_of(self._view(), slot)
        return self._info(owner.port)

    def replicas_of(self, node: NodeInfo | int) -> list[NodeInfo]:
        """The replicas following ``node`` now."""
        primary_id = self._ids[self._port(node)]
        return [info for info in self.nodes if info.primary_id == primary_id]

    def kill(self, node: NodeInfo | int) -> None:
        """SIGKILL a node: a crash, nothing flushed beyond what its AOF already holds."""
        server = self._server(node)
        if server.proc is not None:
            server.proc.kill()
            server.proc.wait()
            server.proc = None
        self._paused.discard(server.port)
        log.info("valkey cluster node 127.0.0.1:%d killed", server.port)

    def pause(self, node: NodeInfo | int) -> None:
        """SIGSTOP a node: it holds its connections but answers nothing (a hung host)."""
        server = self._server(node)
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGSTOP)
            self._paused.add(server.port)
            log.info("valkey cluster node 127.0.0.1:%d paused", server.port)

    def resume(self, node: NodeInfo | int) -> None:
        """SIGCONT a paused node."""
        server = self._server(node)
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
            log.info("valkey cluster node 127.0.0.1:%d resumed", server.port)
        self._paused.discard(server.port)

    def restart(self, node: NodeInfo | int) -> None:
        """Start a killed node again on its port; it reads its ``nodes.conf`` and rejoins
        (as a replica, if its slots were taken over meanwhile). Call it from a thread that
        lives as long as the cluster: the node dies with the thread that started it."""
        server = self._server(node)
        if server.proc is None:
            server.start()

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every live node says ``cluster_state:ok`` and all of them agree on which
        primary owns which slots and which replica follows which primary."""
        self._wait(self._healthy, "cluster_state:ok and one slot map on every node", timeout_s)

    def migrate_slot(
        self, slot: int, target: NodeInfo | int, *, batch: int = 10, pause_s: float = 0.0
    ) -> int:
        """Reshard ``slot`` live onto the primary ``target``, keys included (see
        ``migrate_slot_steps``); returns how many keys moved, once every node agrees."""
        views = self._view()
        source = owner_of(views, slot)
        target_port = self._port(target)
        destination = next(v for v in views if v.port == target_port)
        if not destination.is_primary:
            raise EmbeddedServerError(f"127.0.0.1:{target_port} is not a primary")
        if destination.node_id == source.node_id:
            return 0
        moving = {source.node_id, destination.node_id}
        others = [
            v.port for v in views if v.is_primary and not v.failed and v.node_id not in moving
        ]
        moved = migrate_slot_steps(slot, source, destination, others, batch=batch, pause_s=pause_s)
        self.wait_healthy()
        return moved

    # -- internals ---------------------------------------------------------------------------

    def _form(self) -> None:
        for server in self.servers:
            with client(server.port) as conn:
                self._ids[server.port] = str(conn.execute_command("CLUSTER", "MYID"))
        primaries = self.servers[: self.primaries]
        first = primaries[0]
        for epoch, server in enumerate(self.servers, start=1):
            with client(server.port) as conn:
                # Distinct epochs up front spare the nodes resolving collisions by gossip.
                conn.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for server, (low, high) in zip(primaries, even_ranges(self.primaries), strict=True):
            with client(server.port) as conn:
                conn.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
        with client(first.port) as conn:
            for server, bus_port in zip(self.servers[1:], self._bus_ports[1:], strict=True):
                conn.execute_command("CLUSTER", "MEET", "127.0.0.1", server.port, bus_port)
        self._wait(self._all_met, "every node to know every other")
        for index, server in enumerate(self.servers[self.primaries :]):
            primary = primaries[index // self.replicas_per_primary]
            with client(server.port) as conn:
                conn.execute_command("CLUSTER", "REPLICATE", self._ids[primary.port])
        self._wait(self._replicas_synced, "every replica to sync with its primary")
        self.wait_healthy()

    def _all_met(self) -> bool:
        for server in self.servers:
            views = cluster_nodes(server.port)
            if len(views) != len(self.servers) or any(v.failed for v in views):
                return False
        return True

    def _replicas_synced(self) -> bool:
        for server in self.servers[self.primaries :]:
            with client(server.port) as conn:
                info = conn.info("replication")
            if info.get("master_link_status") != "up":
                return False
        return True

    def _healthy(self) -> bool:
        live = set(self._live_ports())
        maps = set()
        for port in live:
            if cluster_info(port).get("cluster_state") != "ok":
                return False
            views = cluster_nodes(port)
            # Right after a kill the others still trust the dead primary: not healthy yet.
            if any(v.port not in live for v in views if v.is_primary and v.slots):
                return False
            maps.add((slot_map(views), replication_map(views)))
        return len(maps) == 1

    def _view(self) -> list[NodeView]:
        """``CLUSTER NODES`` from the first live node that answers."""
        for port in self._live_ports():
            with contextlib.suppress(redis.RedisError, OSError):
                return cluster_nodes(port)
        raise EmbeddedServerError("no node of the cluster answers")

    def _live_ports(self) -> list[int]:
        return [
            s.port
            for s in self.servers
            if s.proc is not None and s.proc.poll() is None and s.port not in self._paused
        ]

    def _info(self, port: int) -> NodeInfo:
        return next(info for info in self.nodes if info.port == port)

    def _port(self, node: NodeInfo | int) -> int:
        return node if isinstance(node, int) else node.port

    def _server(self, node: NodeInfo | int) -> EmbeddedValkey:
        port = self._port(node)
        for server in self.servers:
            if server.port == port:
                return server
        raise EmbeddedServerError(f"no node of the cluster listens on {port}")

    def _wait(
        self, done: Callable[[], bool], what: str, timeout_s: float = START_TIMEOUT_S
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, OSError):
                if done():
                    return
            time.sleep(0.05)
        raise EmbeddedServerError(f"timed out waiting for {what} ({self.data_dir})")
