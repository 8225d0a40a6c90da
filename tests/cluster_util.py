"""A real cluster for end-to-end tests: one etcd and N ``memcluster node`` processes.

:class:`Cluster` starts a single-member etcd on loopback (or uses one it is given) and node
processes on ports the OS picks, each with its own data directory and a short membership lease
(``lease_ttl_s``, 2 s by default: etcd's minimum TTL with its default election timeout, so a
killed node is seen as down within about 3 s). A node's stdout and stderr go to
``ROOT/{name}.log``, appended across restarts; :meth:`Cluster.log_tails` gives the end of every
log, and the :func:`cluster_fixture` helper prints them when the test failed.

Only the children this object started are signalled, each by its PID: :meth:`Cluster.kill`
(SIGKILL: no shutdown, the lease runs out), :meth:`Cluster.stop` (SIGTERM: the node revokes
its lease and leaves at once), :meth:`Cluster.restart` (the same name and data directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

import pytest

import memcluster
from memcluster.cluster.coordinator import EtcdCoordinator
from memcluster.cluster.keys import COORDINATION, ShardAssignment, coordination_key, decode
from memcluster.cluster.view import ClusterView, cluster_view
from test_coordinator import EtcdProcess

T = TypeVar("T")

LEASE_TTL_S = 2.0
"""The nodes' membership lease: etcd's minimum with its default timing."""
START_TIMEOUT_S = 60.0
"""A node process imports numpy, hnswlib and litestar: slow on a loaded 2-core machine."""
POLL_S = 0.05
_EXCEPTION = re.compile(r"^[\s|]*(?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception|Group)\b.*")
"""A log line naming an exception (the last line of a traceback, or of one in a group)."""


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str = "the condition") -> T:
    """Call ``predicate`` until it returns something truthy, and return that; fail the test
    after ``timeout_s`` naming ``what`` (and the last value seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last: {value!r}")
        time.sleep(POLL_S)


class Node:
    """One ``memcluster node`` child process; :meth:`start` it again after it ended."""

    def __init__(
        self, name: str, data: Path, log: Path, etcd_url: str, cluster: str, lease_ttl_s: float
    ) -> None:
        self.name = name
        self.data = data
        self.log = log
        self.etcd_url = etcd_url
        self.cluster = cluster
        self.lease_ttl_s = lease_ttl_s
        self.extra_args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.meant_down = False
        """Set by kill() and stop(): the process is down on purpose."""
        self.http_url = ""
        self.mc_url = ""
        self._log_offset = 0

    def spawn(self) -> None:
        """Start the process; :meth:`wait_ready` reads its endpoints."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.http_url = self.mc_url = ""
        self.meant_down = False
        with self.log.open("ab") as log:  # the child keeps its own copy of the descriptor
            log.write(f"==== test harness: starting node {self.name} ====\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "memcluster.cli.main",
                    "node",
                    "--data",
                    str(self.data),
                    "--etcd",
                    self.etcd_url,
                    "--name",
                    self.name,
                    "--cluster",
                    self.cluster,
                    "--http-port",
                    "0",
                    "--peer-port",
                    "0",
                    "--lease-ttl",
                    str(self.lease_ttl_s),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait for the ``listening HTTP MC node NAME up`` line (printed once registered)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            with self.log.open("rb") as log:
                log.seek(self._log_offset)
                for raw in log.read().decode(errors="replace").splitlines(keepends=True):
                    if raw.startswith("listening ") and raw.endswith("\n"):
                        _, self.http_url, self.mc_url = raw.split()[:3]
                        return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(
                    f"node {self.name} did not start (exit code {self.proc.returncode});"
                    f" its log ends:\n{self.tail()}"
                )
            time.sleep(POLL_S)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL this child only, and reap it."""
        self.meant_down = True
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def send_term(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (graceful: the node leaves the cluster at once); its exit code."""
        assert self.proc is not None
        self.meant_down = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return "(no log)"
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Cluster:
    """etcd plus node processes under ``root``; :meth:`close` ends all of them."""

    def __init__(
        self,
        root: Path,
        *,
        etcd: EtcdProcess | None = None,
        cluster: str = "test",
        lease_ttl_s: float = LEASE_TTL_S,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.name = cluster
        self.lease_ttl_s = lease_ttl_s
        self.node_args: list[str] = []
        """Extra ``memcluster node`` arguments for every node started from now on."""
        self.etcd_via: dict[str, str] = {}
        """Per node name: the etcd URL it is given instead (a proxy a test can cut)."""
        self._own_etcd = etcd is None
        self.etcd = etcd if etcd is not None else EtcdProcess(root / "etcd")
        self.nodes: dict[str, Node] = {}
        self._clients: list[memcluster.Client] = []

    @property
    def etcd_url(self) -> str:
        return self.etcd.url

    # -- nodes ---------------------------------------------------------------------------------

    def add_node(self, name: str) -> Node:
        """Start node ``name`` and wait until it is registered."""
        return self.add_nodes(name)[0]

    def add_nodes(self, *names: str) -> list[Node]:
        """Start nodes in parallel (their imports take a while) and wait for all of them."""
        started = []
        for name in names:
            assert name not in self.nodes, f"node {name} exists; restart() it"
            node = Node(
                name,
                self.root / name,
                self.root / f"{name}.log",
                self.etcd_via.get(name, self.etcd.url),
                self.name,
                self.lease_ttl_s,
            )
            node.extra_args = list(self.node_args)
            self.nodes[name] = node
            node.spawn()
            started.append(node)
        for node in started:
            node.wait_ready()
        return started

    def kill(self, name: str) -> None:
        """SIGKILL node ``name``: it stays registered until its lease expires."""
        self.nodes[name].kill()

    def stop(self, name: str) -> int:
        """SIGTERM node ``name``; its exit code."""
        return self.nodes[name].stop()

    def restart(self, name: str) -> Node:
        """Start node ``name`` again (same name, same data directory) after kill or stop."""
        node = self.nodes[name]
        if node.running:
            node.stop()
        node.spawn()
        node.wait_ready()
        return node

    # -- clients and etcd ----------------------------------------------------------------------

    def client(
        self, name: str, kind: Literal["http", "binary"] = "http", *, retries: int = 3
    ) -> memcluster.Client:
        """``memcluster.connect`` to node ``name``; closed by :meth:`close`."""
        node = self.nodes[name]
        client = memcluster.connect(
            node.http_url if kind == "http" else node.mc_url, retries=retries
        )
        self._clients.append(client)
        return client

    def view(self) -> ClusterView:
        """The cluster as etcd has it now: nodes up, controller, shard map."""
        return self._read(lambda coord: cluster_view(coord, self.name))

    def _read(self, read: Callable[[EtcdCoordinator], Awaitable[T]]) -> T:
        async def run() -> T:
            coord = EtcdCoordinator(self.etcd.url)
            try:
                return await read(coord)
            finally:
                await coord.close()

        return asyncio.run(run())

    def shard_map(self) -> dict[tuple[str, int], str | None]:
        """Every shard -> the node the map names as its leader (None: not placed yet),
        including the coordination shard (``COORDINATION``) once it is placed."""

        async def read(coord: EtcdCoordinator) -> dict[tuple[str, int], str | None]:
            view = await cluster_view(coord, self.name)
            out = {
                (s.collection, s.shard): None if s.assignment is None else s.assignment.leader
                for s in view.shards
            }
            kv = await coord.get(coordination_key(self.name))
            if kv is not None:
                out[COORDINATION] = decode(kv.value, ShardAssignment, kv.key).leader
            return out

        return self._read(read)

    def held(self, collection: str | None = None) -> dict[str, list[int]]:
        """Node -> the shard numbers of ``collection`` it leads (every collection's, and the
        coordination shard, if None)."""
        out: dict[str, list[int]] = {}
        for (coll, shard), leader in sorted(self.shard_map().items()):
            if leader is not None and collection in (None, coll):
                out.setdefault(leader, []).append(shard)
        return out

    def placed_and_balanced(self, collection: str, nodes: Iterable[str]) -> bool:
        """Every shard of ``collection`` has a node, each of ``nodes`` leads at least one of
        them, and the nodes' loads (all shards they lead, as the planner counts them) differ
        by at most one: the state the controller settles in."""
        shards = self.shard_map()
        mine = [leader for (coll, _), leader in shards.items() if coll == collection]
        if not mine or None in mine or not set(nodes) <= set(mine):
            return False
        load = dict.fromkeys(nodes, 0)
        for leader in shards.values():
            if leader is not None:
                load[leader] = load.get(leader, 0) + 1
        return max(load.values()) - min(load.values()) <= 1

    def wait_for(
        self, predicate: Callable[[], T], timeout_s: float, what: str = "the condition"
    ) -> T:
        return wait_for(predicate, timeout_s, what)

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``memcluster ARGS --etcd URL --cluster NAME`` in a subprocess."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "memcluster.cli.main",
                *args,
                "--etcd",
                self.etcd.url,
                "--cluster",
                self.name,
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def crashed(self) -> dict[str, int]:
        """Nodes that exited without kill() or stop(): name -> exit code."""
        return {
            name: node.proc.returncode
            for name, node in self.nodes.items()
            if node.proc is not None and node.proc.poll() is not None and not node.meant_down
        }

    def check_no_crash(self) -> None:
        """Fail, with the exceptions in their logs, if nodes exited on their own (a crash the
        test may not have noticed)."""
        crashed = self.crashed()
        if not crashed:
            return
        report = []
        for name in crashed:
            lines = self.nodes[name].log.read_text(errors="replace").splitlines()
            raised = [line.strip(" |") for line in lines if _EXCEPTION.match(line)]
            report.append(f"---- {name}: exceptions in its log ----\n" + "\n".join(raised[-20:]))
        pytest.fail(f"nodes exited on their own (name: exit code) {crashed}:\n" + "\n".join(report))

    # -- the end -------------------------------------------------------------------------------

    def log_tails(self, lines: int = 40) -> str:
        parts = [
            f"---- {name}.log (last {lines} lines) ----\n{node.tail(lines)}"
            for name, node in self.nodes.items()
        ]
        etcd_log = self.etcd.log
        if self._own_etcd and etcd_log.exists():
            tail = etcd_log.read_text(errors="replace").splitlines()[-lines:]
            parts.append("---- etcd.log ----\n" + "\n".join(tail))
        return "\n".join(parts)

    def close(self) -> None:
        """Close the clients, SIGTERM every node (SIGKILL if it hangs), stop our etcd."""
        for client in self._clients:
            with contextlib.suppress(Exception):  # its node may be gone: go on
                client.close()
        self._clients.clear()
        for node in self.nodes.values():
            node.send_term()
        for node in self.nodes.values():
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):  # stop() killed it
                    node.stop(timeout_s=20)
        if self._own_etcd:
            self.etcd.stop()


def report_on_failure(request: pytest.FixtureRequest, cluster: Cluster, failed_before: int) -> None:
    """Print the node logs' tails if a test failed since ``failed_before`` was read from
    ``request.session.testsfailed`` (the call phase is reported before teardown runs)."""
    if request.session.testsfailed <= failed_before:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    text = f"\n==== {request.node.nodeid} failed; cluster logs ====\n{cluster.log_tails()}\n"
    if capture is None:
        print(text, file=sys.stderr)
        return
    with capture.global_and_fixture_disabled():
        print(text, file=sys.stderr)


def cluster_fixture(
    request: pytest.FixtureRequest, root: Path, *, etcd: EtcdProcess | None = None, name: str
) -> Iterator[Cluster]:
    """The body of a cluster fixture: yield a :class:`Cluster`, print its logs if the test
    failed, close it."""
    cluster = Cluster(root, etcd=etcd, cluster=name)
    failed_before = request.session.testsfailed
    try:
        yield cluster
        report_on_failure(request, cluster, failed_before)
        cluster.check_no_crash()
    finally:
        cluster.close()
