"""Benchmark of replication on a 3-node cluster on this machine, for the three replication
models (leader-follower, chain, multi-leader): what replication factor 3 costs writes under
each model and ``ack`` policy, what the cheaper read levels save, how long writes stop when a
node holding a replica is killed, and whether an acknowledged write is ever lost. Every
figure sits beside its baseline from the same run.

Run ``.venv/bin/python -m bench.replication --json bench/out/replication.json`` (about 5
minutes on 2 cores; needs etcd on PATH: ``make etcd``). Options: ``--seconds`` per timed
series (1.5), ``--rounds`` (3), ``--concurrency`` (8), ``--batch`` (64), ``--repeats`` of the
failover per model (3), ``--failover`` (the models whose failover is measured, in order:
``leader,chain,multi``), ``--dim`` (64), ``--shards`` (3), ``--read-n`` (20,000), ``--dir``
(scratch root), ``--keep`` (keep the scratch directory and its logs), ``--json PATH``. It
prints the machine, one table per phase and notes, and writes the same rows (plus every
detail) as JSON.

Setup
-----

* One etcd (a single member on 127.0.0.1, ports the OS picks) and three ``memcluster node``
  processes n1, n2, n3 (``--http-port 0 --peer-port 0 --lease-ttl 2``: a killed node's
  membership lease runs out 2 s after its last renewal, as in tests/test_replication.py),
  each with its own data directory under a fresh ``/tmp`` directory, and the server defaults
  otherwise: every replica fsyncs a write before acknowledging it. The node logs are
  ``n*.log`` there; the bench counts their error lines at the end.
* Every process is a child of this one and is signalled by its PID only: SIGKILL for the
  failover, SIGTERM (the node leaves the cluster) and SIGKILL 30 s later if need be at the end.
* The load generator is this process: one uvloop loop, ``memcluster.AsyncClient`` over
  ``mc://``, one client per node, ``--concurrency`` tasks each with one request in flight
  (closed loop), task t on node t mod 3, retries off, so an error is counted, not hidden.
  A latency is one call from the caller's side, queueing behind the other tasks included.
* All processes share the machine's cores. A write to an RF3 collection is appended, fsynced
  and indexed three times, and here all three land on the same cores: the RF3 / RF1 ratio is
  the cost of replication on shared hardware, a pessimistic figure for separate machines.
* Between two timed series the bench waits, untimed, until the nodes are idle again (their
  CPU below ``SETTLE_CORES`` over half a second, at most ``SETTLE_MAX_S``), so that one
  variant's background graph building does not slow the next; the notes give the waits.
* Collection handles are built from the config ``create_collection`` returned
  (:func:`handle`), not with ``client.collection(name)``: that asks ``describe()``, which on
  a chain collection waits out the router's 15 s deadline (its ``shard.stats`` goes to the
  tail, which refuses it). ``create_collection`` of a chain collection still takes 15 s
  (it describes the collection it made), untimed.

The models
----------

* ``leader`` (``"RF3 ack=..."``): the shard's leader takes every write and acknowledges it
  once ``ack`` replicas hold it: "all" 3, "majority" 2, "leader" 1. Strong reads at the
  leader; eventual reads at any replica. A dead leader is replaced by the controller once
  its lease is gone.
* ``chain`` (``"RF3 chain"``, ack="all" only): writes enter at the head, go down the chain
  and are acknowledged by the tail; strong reads at the tail. A dead member is cut out of
  the chain once its lease is gone (a dead head: the next in-sync member becomes the head).
* ``multi`` (``"RF3 multi ack=..."``, hash sharding): every replica takes writes (the router
  sends a write to its own node's replica) and acknowledges once W replicas hold it: "all"
  3, "majority" 2, "leader" 1 (only the replica that took it). Replicas push new records to
  each other at once and pull every 0.5 s. No strong or session reads: ``quorum`` reads a
  majority of replicas and returns the newest, ``eventual`` any one. No failover: a dead
  replica only stops acknowledging.

What runs, in order
-------------------

1. Writes. Eight collections of ``--shards`` shards (hash sharding, dimension ``--dim``): RF1,
   RF3 leader-follower with ``ack="all"``, ``"majority"`` and ``"leader"``, RF3 chain, and
   RF3 multi with ``ack="all"``, ``"majority"`` and ``"leader"``. ``put_many`` of 1 memory
   per call, then of ``--batch``, each memory under a fresh key: ``--rounds`` rounds in which
   every variant runs ``--seconds`` in turn, each round starting with a different variant
   (the machine's noise then falls on all of them). Rate = median of the rounds; p50 and p99
   over every call of every round; ratio = RF3 variant / RF1. Rows 1a-1u (single puts) and
   2a-2u (batches): a-g the rates, h-n the p50s, o-u the p99s, each in the order above.
2. Reads. Two RF3 collections with the same ``--read-n`` memories, all in the graph and the
   nodes idle: leader-follower ``ack="all"``, and multi ``ack="majority"``. ``get`` of a
   random loaded key and ``search`` (k=10) of a random vector; the leader collection with
   ``consistency="strong"`` and ``"eventual"``, the multi one with ``"quorum"`` and
   ``"eventual"``; all eight take turns as above. Strong: the shard's leader answers after
   checking its lease and that what it returns is acknowledged, so a get for a shard led
   elsewhere (2 in 3) is forwarded, and a search is forwarded to the 2 other leaders.
   Quorum: the client's node asks its own replica and one other of each shard (a search:
   every shard) and keeps the newest copy. Eventual: the node the client talks to answers
   from its own replicas (every node holds every shard here). Ratios: eventual / strong,
   quorum / multi eventual, quorum / leader strong.
3. Failover, ``--repeats`` times per model, each on its own 1-shard RF3 collection (the
   collections of phase 1 are dropped at its end, those of phase 2 at the start of this
   one, and each model's collection once its repeats are done, so nothing else reacts to
   a kill): ``leader`` (ack="all": the
   leader's node is killed), ``chain`` (the head's node is killed) and ``multi``
   (ack="majority": n1, n2, n3 in turn are killed, whichever is the map's leader). A
   writer task puts one memory at a time through another node (for leader and chain, one
   that does not lead the shard), starting again after 10 ms when a put fails. After 1 s
   and at least 100 acknowledged puts, the chosen node gets SIGKILL. Measured from the kill:
   when etcd no longer lists the node (its lease expired), when the shard map names a new
   leader (leader, chain; multi only when the map's leader was killed: that role only
   admits replicas), and when the first put *issued after the kill* is acknowledged: the
   failover time as a client sees it (multi: how long writes through the surviving nodes
   stall, expected ~0). Also the longest time between two acknowledged puts. The writer
   goes on until the lease is gone (and the new leader named) and 100 puts issued after
   that are acknowledged. Every acknowledged put of the repeat is then read back through
   the writer's node, strong (multi: quorum); one that is missing or different is a lost
   write, and a read that fails is counted and tried again. The killed node is started
   again on its data. Leader, chain: the bench waits until the shard map has it back in
   the in-sync set, and reads the repeat's acknowledged puts from its own copy (eventual,
   through it). Multi: it polls eventual reads through the restarted node until its own copy
   has every acknowledged put of the repeat (the time that takes is row 7f). Then every
   acknowledged put is read back once more through the writer's node, and at the end of a
   model's repeats every acknowledged put of every repeat once more. Rows 5a-5g (leader),
   6a-6g (chain), 7a-7g (multi).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import uvloop
from rich.console import Console
from rich.table import Table

import memcluster
from bench.engine import Report, Row, write_json
from bench.server import loadavg, machine, machine_line, process_cpu_s, src_fingerprint
from memcluster.cli.main import single_threaded_blas
from memcluster.cluster.coordinator import EtcdCoordinator, leader
from memcluster.cluster.keys import ShardAssignment, assignment_key, controller_key, decode
from memcluster.cluster.membership import live_nodes

NODES = ("n1", "n2", "n3")
CLUSTER = "replbench"
LEASE_TTL_S = 2.0
"""The nodes' membership lease (``--lease-ttl``): etcd's minimum with its default timing."""
START_TIMEOUT_S = 120.0
"""A node imports numpy, hnswlib and litestar: slow on a loaded 2-core machine."""
STOP_TIMEOUT_S = 30.0
IN_SYNC_TIMEOUT_S = 120.0
RESUME_TIMEOUT_S = 60.0
"""Longest the failover phase waits for writes to resume after a kill."""
SETTLE_CORES = 0.2
SETTLE_WINDOW_S = 0.5
SETTLE_MAX_S = 30.0
POLL_S = 0.025
NAMESPACE = ("bench",)
RF1, ALL, MAJORITY, LEADER = "RF1", "RF3 ack=all", "RF3 ack=majority", "RF3 ack=leader"
CHAIN = "RF3 chain"
M_ALL, M_MAJORITY, M_LEADER = "RF3 multi ack=all", "RF3 multi ack=majority", "RF3 multi ack=leader"
WRITE_VARIANTS: dict[str, tuple[int, str, str]] = {
    RF1: (1, "leader", "all"),
    ALL: (3, "leader", "all"),
    MAJORITY: (3, "leader", "majority"),
    LEADER: (3, "leader", "leader"),
    CHAIN: (3, "chain", "all"),
    M_ALL: (3, "multi", "all"),
    M_MAJORITY: (3, "multi", "majority"),
    M_LEADER: (3, "multi", "leader"),
}
"""Variant -> (replication_factor, replication, ack). "RF3 ack=..." are leader-follower."""
RF3_VARIANTS = tuple(v for v in WRITE_VARIANTS if v != RF1)
READS = "reads"
READS_MULTI = "reads_multi"
FAILOVER = "failover"
FAILOVER_MODELS: dict[str, tuple[str, str, str]] = {
    "leader": (FAILOVER, "leader", "all"),
    "chain": ("failover_chain", "chain", "all"),
    "multi": ("failover_multi", "multi", "majority"),
}
"""Failover model -> (collection, replication, ack), each a 1-shard RF3 collection."""
FAILOVER_SECTION = {"leader": "5", "chain": "6", "multi": "7"}
WARMUP_S = 1.0
WARMUP_ACKS = 100
AFTER_RESUME_ACKS = 100
WRITER_BACKOFF_S = 0.01
LOG_PROBLEMS = ("Traceback", "ERROR", "CRITICAL")
_LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)$")

Matrix = npt.NDArray[np.float32]

err = Console(stderr=True)


# -- the cluster processes -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _end(proc: subprocess.Popen[bytes], timeout_s: float, term: bool = True) -> int:
    """SIGTERM this child (unless ``term`` is False: it has had one), wait ``timeout_s``,
    then SIGKILL it; its exit code. One SIGTERM only: a node that gets a second one late in
    its shutdown, after it gave the signal back to the default handler, dies of it."""
    if term and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        err.log(f"[red]pid {proc.pid} did not stop in {timeout_s} s: SIGKILL[/]")
        proc.send_signal(signal.SIGKILL)
        return proc.wait(30)


class Etcd:
    """A single-member etcd on loopback, on ports picked free just before it starts."""

    def __init__(self, root: Path) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise SystemExit("etcd is not on PATH: `make etcd` installs Debian's etcd-server")
        self.url = f"http://127.0.0.1:{free_port()}"
        peer = f"http://127.0.0.1:{free_port()}"
        self.log = root / "etcd.log"
        with self.log.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [
                    etcd,
                    "--name=bench",
                    f"--data-dir={root / 'etcd'}",
                    f"--listen-client-urls={self.url}",
                    f"--advertise-client-urls={self.url}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=bench={peer}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as reply:
                    if b'"true"' in reply.read():
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"etcd did not become healthy at {self.url}: {tail}")
            time.sleep(0.05)

    def stop(self) -> int:
        return _end(self.proc, 10.0)


class NodeProcess:
    """One ``memcluster node`` child process; :meth:`spawn` it again after a kill (same name,
    same data directory). Its stdout and stderr go to ``ROOT/NAME.log``, appended."""

    def __init__(self, name: str, root: Path, etcd_url: str) -> None:
        self.name = name
        self.data = root / name
        self.log = root / f"{name}.log"
        self.etcd_url = etcd_url
        self.proc: subprocess.Popen[bytes] | None = None
        self.mc_url = ""
        self._offset = 0
        self._terminated = False

    def spawn(self) -> None:
        assert not self.running, f"{self.name} is running"
        self.mc_url = ""
        self._terminated = False
        with self.log.open("ab") as log:
            log.write(f"==== bench: starting node {self.name} ====\n".encode())
            log.flush()
            self._offset = log.tell()
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
                    CLUSTER,
                    "--host",
                    "127.0.0.1",
                    "--http-port",
                    "0",
                    "--peer-port",
                    "0",
                    "--lease-ttl",
                    str(LEASE_TTL_S),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait for the ``listening HTTP MC node NAME up`` line (printed once registered)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            with self.log.open("rb") as log:
                log.seek(self._offset)
                for line in log.read().decode(errors="replace").splitlines(keepends=True):
                    if line.startswith("listening ") and line.endswith("\n"):
                        self.mc_url = line.split()[2]
                        return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"node {self.name} did not start (exit code {self.proc.poll()}): "
                    + self.log.read_text(errors="replace")[-2000:]
                )
            await asyncio.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL this child (reaped by :meth:`reap`)."""
        assert self.proc is not None
        assert self.proc.poll() is None, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGKILL)

    def reap(self) -> int:
        assert self.proc is not None
        return self.proc.wait(30)

    def terminate(self) -> None:
        """SIGTERM, not waiting: the node leaves the cluster and shuts down."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL after STOP_TIMEOUT_S; the exit code (None: never started)."""
        if self.proc is None:
            return None
        return _end(self.proc, STOP_TIMEOUT_S, term=not self._terminated)


class LocalCluster:
    """etcd and the three nodes under ``root``, and an etcd client to read the shard map."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etcd = Etcd(root)
        self.nodes = {name: NodeProcess(name, root, self.etcd.url) for name in NODES}
        self.coord = EtcdCoordinator(self.etcd.url)

    async def start(self) -> None:
        for node in self.nodes.values():  # in parallel: their imports take a while
            node.spawn()
        for node in self.nodes.values():
            await node.ready()

    async def assignment(self, collection: str, shard: int = 0) -> ShardAssignment | None:
        kv = await self.coord.get(assignment_key(CLUSTER, (collection, shard)))
        return None if kv is None else decode(kv.value, ShardAssignment, kv.key)

    async def leaders(self, collection: str, shards: int) -> dict[int, str | None]:
        out: dict[int, str | None] = {}
        for shard in range(shards):
            a = await self.assignment(collection, shard)
            out[shard] = None if a is None else a.leader
        return out

    async def live(self) -> set[str]:
        return {n.id for n in await live_nodes(self.coord, CLUSTER)}

    async def controller(self) -> str | None:
        return await leader(self.coord, controller_key(CLUSTER))

    async def wait_placed(self, collection: str, shards: int, replicas: int) -> None:
        """Until every shard has a leader and ``replicas`` replicas, all in sync."""
        deadline = time.monotonic() + IN_SYNC_TIMEOUT_S
        while True:
            found = [await self.assignment(collection, s) for s in range(shards)]
            if all(
                a is not None and a.leader and len(a.in_sync) == len(a.replicas) == replicas
                for a in found
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{collection}: not placed in sync in time: {found}")
            await asyncio.sleep(0.05)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of each running node process, by node id."""
        return {n.name: process_cpu_s(n.pid) for n in self.nodes.values() if n.running}

    async def settle(self) -> float:
        """Wait until the nodes together use less than SETTLE_CORES (background indexing
        done); the seconds waited (at most SETTLE_MAX_S)."""
        start = time.perf_counter()
        while True:
            before = self.cpu_s()
            await asyncio.sleep(SETTLE_WINDOW_S)
            after = self.cpu_s()
            per = {n: (after[n] - before.get(n, after[n])) / SETTLE_WINDOW_S for n in after}
            used = sum(per.values())
            waited = time.perf_counter() - start
            if used < SETTLE_CORES:
                return waited
            if waited > SETTLE_MAX_S:
                cores = ", ".join(f"{n} {x:.2f}" for n, x in per.items())
                err.log(f"[yellow]nodes still busy after {waited:.0f} s ({cores} cores)[/]")
                return waited

    def log_problems(self) -> dict[str, int]:
        """Lines of each node log that name an error or a traceback."""
        found: dict[str, int] = {}
        for log in sorted(self.root.glob("n*.log")):
            lines = log.read_text(errors="replace").splitlines()
            count = sum(1 for line in lines if any(p in line for p in LOG_PROBLEMS))
            if count:
                found[log.name] = count
        return found

    def log_messages(
        self, levels: tuple[str, ...] = ("WARNING", "ERROR", "CRITICAL")
    ) -> Counter[str]:
        """How often each node log message of ``levels`` occurred, numbers masked, so that
        ``shard failover/0000: ...`` repeated for every write counts as one message."""
        found: Counter[str] = Counter()
        for log in sorted(self.root.glob("n*.log")):
            for line in log.read_text(errors="replace").splitlines():
                m = _LOG_LINE.match(line)
                if m is not None and m["level"] in levels:
                    text = re.sub(r"\d+(\.\d+)?", "N", m["message"])[:160]
                    found[f"{m['level']} {m['logger']}: {text}"] += 1
        return found

    async def close(self) -> dict[str, int | None]:
        """SIGTERM every node (they leave the cluster), then etcd; their exit codes."""
        loop = asyncio.get_running_loop()
        codes: dict[str, int | None] = {}
        for node in self.nodes.values():
            node.terminate()
        for name, node in self.nodes.items():
            codes[name] = await loop.run_in_executor(None, node.stop)
        await self.coord.close()
        codes["etcd"] = self.etcd.stop()
        return codes


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Series:
    """One timed series of one variant: ``concurrency`` calls in flight for a while."""

    calls: int
    items: int
    errors: int
    elapsed_s: float
    latencies_s: list[float]
    cpu_nodes_s: float
    cpu_client_s: float
    settle_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.items / self.elapsed_s


@dataclass
class Stats:
    """A variant's series: rate (median of the rounds), latency over all rounds, CPU."""

    rate: float
    rounds: list[float]
    p50_ms: float
    p99_ms: float
    calls: int
    items: int
    errors: int
    node_cpu_ms_per_call: float
    client_cpu_ms_per_call: float
    settle_s: list[float]

    @classmethod
    def of(cls, runs: Sequence[Series]) -> Stats:
        lat = np.array([x for r in runs for x in r.latencies_s] or [float("nan")])
        calls = max(1, sum(r.calls for r in runs))
        return cls(
            rate=statistics.median(r.rate for r in runs),
            rounds=[round(r.rate, 1) for r in runs],
            p50_ms=float(np.percentile(lat, 50)) * 1000,
            p99_ms=float(np.percentile(lat, 99)) * 1000,
            calls=sum(r.calls for r in runs),
            items=sum(r.items for r in runs),
            errors=sum(r.errors for r in runs),
            node_cpu_ms_per_call=sum(r.cpu_nodes_s for r in runs) / calls * 1000,
            client_cpu_ms_per_call=sum(r.cpu_client_s for r in runs) / calls * 1000,
            settle_s=[round(r.settle_s, 1) for r in runs],
        )


Op = Callable[[int], Awaitable[int]]
"""One call from task ``t``; returns how many items it wrote or read."""


@dataclass
class Bench:
    args: argparse.Namespace
    report: Report
    cluster: LocalCluster
    clients: list[memcluster.AsyncClient] = field(default_factory=list)
    """One per node, in NODES order."""
    errors: dict[str, Counter[str]] = field(default_factory=dict)
    """Variant -> error messages of failed calls in timed series."""

    async def timed(self, variant: str, op: Op) -> Series:
        """``op`` from ``concurrency`` tasks for ``--seconds``, then wait for the nodes to
        settle (not timed)."""
        latencies: list[float] = []
        items = 0
        failed = 0
        errors = self.errors.setdefault(variant, Counter())
        deadline = time.perf_counter() + self.args.seconds

        async def work(t: int) -> None:
            nonlocal items, failed
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    n = await op(t)
                except memcluster.MemclusterError as exc:
                    failed += 1
                    errors[f"{type(exc).__name__}: {str(exc)[:200]}"] += 1
                    await asyncio.sleep(WRITER_BACKOFF_S)
                    continue
                latencies.append(time.perf_counter() - t0)
                items += n

        cpu0, client0 = sum(self.cluster.cpu_s().values()), time.process_time()
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for t in range(self.args.concurrency):
                tasks.create_task(work(t))
        elapsed = time.perf_counter() - start
        cpu1, client1 = sum(self.cluster.cpu_s().values()), time.process_time()
        series = Series(
            len(latencies), items, failed, elapsed, latencies, cpu1 - cpu0, client1 - client0
        )
        series.settle_s = await self.cluster.settle()
        return series

    async def take_turns(self, ops: dict[str, Op]) -> dict[str, Stats]:
        """``--rounds`` rounds; round r runs every variant once, starting with variant r."""
        names = list(ops)
        runs: dict[str, list[Series]] = {name: [] for name in names}
        for r in range(self.args.rounds):
            for j in range(len(names)):
                name = names[(r + j) % len(names)]
                run = await self.timed(name, ops[name])
                runs[name].append(run)
                err.log(
                    f"  round {r + 1}/{self.args.rounds} {name}: {run.rate:,.0f}/s over"
                    f" {run.elapsed_s:.1f} s, {run.errors} errors; nodes idle"
                    f" {run.settle_s:.1f} s later"
                )
        return {name: Stats.of(r) for name, r in runs.items()}


def unit_vectors(n: int, dim: int, seed: int) -> Matrix:
    rng = np.random.default_rng([seed, dim, n])
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def handle(
    client: memcluster.AsyncClient, config: memcluster.CollectionConfig
) -> memcluster.AsyncCollection:
    """A handle on an existing collection through ``client``, from its config: what
    ``client.collection(name)`` returns, without the ``describe()`` it asks for, which takes
    the router's 15 s deadline on a chain collection (its ``shard.stats`` is routed to the
    tail, which refuses it) and so would make every chain handle cost 15 s."""
    return memcluster.AsyncCollection(client, config)


def add(report: Report, row: Row) -> None:
    report.rows.append(row)


# -- phase 1: writes -----------------------------------------------------------------------


async def phase_writes(b: Bench) -> dict[int, dict[str, Stats]]:
    args = b.args
    admin = b.clients[0]
    colls: dict[str, list[memcluster.AsyncCollection]] = {}
    for i, (name, (rf, replication, ack)) in enumerate(WRITE_VARIANTS.items()):
        coll_name = f"w{i}"
        created = await admin.create_collection(
            coll_name,
            dim=args.dim,
            shards=args.shards,
            replication_factor=rf,
            replication=replication,
            ack=ack,
        )
        await b.cluster.wait_placed(coll_name, args.shards, rf)
        colls[name] = [handle(c, created.config) for c in b.clients]
    leaders = {name: await b.cluster.leaders(c[0].name, args.shards) for name, c in colls.items()}
    b.report.details["write_leaders"] = leaders
    err.log(f"write collections placed; shard leaders {leaders}")
    pool = unit_vectors(4096, args.dim, args.seed)
    counters = dict.fromkeys(WRITE_VARIANTS, 0)

    def put(name: str, batch: int) -> Op:
        def op(t: int) -> Awaitable[int]:
            first = counters[name]
            counters[name] += batch
            memories = [
                memcluster.Memory(
                    namespace=NAMESPACE,
                    key=f"w{i:09d}",
                    vector=pool[i % len(pool)],
                    metadata={"i": i},
                )
                for i in range(first, first + batch)
            ]
            coll = colls[name][t % len(NODES)]

            async def call() -> int:
                return len(await coll.put_many(memories))

            return call()

        return op

    await b.cluster.settle()
    out: dict[int, dict[str, Stats]] = {}
    for batch in (1, args.batch):
        err.log(f"writes: put_many x{batch}, {args.rounds} rounds of {args.seconds} s per variant")
        out[batch] = await b.take_turns({name: put(name, batch) for name in WRITE_VARIANTS})
    counts = {name: await c[0].count() for name, c in colls.items()}
    b.report.details["writes"] = {
        f"x{batch}": {name: asdict(s) for name, s in stats.items()} for batch, stats in out.items()
    } | {"counts": counts, "written": counters}
    for name, count in counts.items():
        acked = sum(s.items for stats in out.values() for v, s in stats.items() if v == name)
        if count < acked:
            err.log(f"[red]{name}: count() {count:,} < {acked:,} acknowledged items[/]")
    n = len(RF3_VARIANTS)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for section, batch in (("1", 1), ("2", args.batch)):
        s = out[batch]
        unit = "puts/s" if batch == 1 else "items/s"
        for letter, name in zip(letters[:n], RF3_VARIANTS, strict=True):
            add(
                b.report,
                Row(
                    f"{section}{letter}",
                    f"put_many x{batch}, {name}",
                    s[name].rate,
                    unit,
                    RF1,
                    s[RF1].rate,
                    note=f"rounds {s[name].rounds} (RF1 {s[RF1].rounds}); node CPU"
                    f" {s[name].node_cpu_ms_per_call:.2f} ms/call"
                    f" (RF1 {s[RF1].node_cpu_ms_per_call:.2f})",
                ),
            )
        for lat_letters, what in ((letters[n : 2 * n], "p50"), (letters[2 * n : 3 * n], "p99")):
            for letter, name in zip(lat_letters, RF3_VARIANTS, strict=True):
                add(
                    b.report,
                    Row(
                        f"{section}{letter}",
                        f"put_many x{batch} latency {what}, {name}",
                        getattr(s[name], f"{what}_ms"),
                        "ms",
                        RF1,
                        getattr(s[RF1], f"{what}_ms"),
                    ),
                )
    # Dropped now: their replicas (the multi ones' anti-entropy above all) keep the nodes
    # busier than SETTLE_CORES when idle, and phase 2 would wait SETTLE_MAX_S every time.
    for handles in colls.values():
        try:
            await admin.drop_collection(handles[0].name)
        except memcluster.MemclusterError as exc:
            err.log(f"[red]drop {handles[0].name}: {exc}[/]")
    return out


# -- phase 2: reads ------------------------------------------------------------------------


async def phase_reads(b: Bench) -> dict[str, Stats]:
    args = b.args
    admin = b.clients[0]
    vectors = unit_vectors(args.read_n, args.dim, args.seed + 1)
    queries = unit_vectors(1000, args.dim, args.seed + 2)
    load_s: dict[str, float] = {}
    for coll_name, replication, ack in (
        (READS, "leader", "all"),
        (READS_MULTI, "multi", "majority"),
    ):
        await admin.create_collection(
            coll_name,
            dim=args.dim,
            shards=args.shards,
            replication_factor=3,
            replication=replication,
            ack=ack,
        )
        await b.cluster.wait_placed(coll_name, args.shards, 3)
        loader = await admin.collection(coll_name)
        t0 = time.perf_counter()
        for lo in range(0, args.read_n, 500):
            await loader.put_many(
                [
                    memcluster.Memory(
                        namespace=NAMESPACE, key=f"r{i:07d}", vector=vectors[i], metadata={"i": i}
                    )
                    for i in range(lo, min(lo + 500, args.read_n))
                ]
            )
        load_s[coll_name] = time.perf_counter() - t0
        while True:
            stats = (await loader.describe()).stats
            if stats.items >= args.read_n and stats.indexed_items >= stats.items:
                break
            await asyncio.sleep(0.1)
        settle_s = await b.cluster.settle()
        err.log(
            f"reads: {args.read_n:,} memories loaded into {coll_name} ({replication}, ack={ack})"
            f" in {load_s[coll_name]:.1f} s; all in the graph and the nodes idle"
            f" {time.perf_counter() - t0 - load_s[coll_name]:.1f} s later"
            f" (the last {settle_s:.1f} s waiting for idle)"
        )
    colls = {name: [await c.collection(name) for c in b.clients] for name in (READS, READS_MULTI)}
    rngs = [random.Random(args.seed * 1000 + t) for t in range(args.concurrency)]
    misses: Counter[str] = Counter()

    def get(coll_name: str, consistency: str) -> Op:
        async def op(t: int) -> int:
            i = rngs[t].randrange(args.read_n)
            coll = colls[coll_name][t % len(NODES)]
            got = await coll.get(NAMESPACE, f"r{i:07d}", consistency=consistency)
            if got is None or got.metadata != {"i": i}:
                misses[f"{coll_name} get {consistency}"] += 1
            return 1

        return op

    def search(coll_name: str, consistency: str) -> Op:
        async def op(t: int) -> int:
            q = queries[rngs[t].randrange(len(queries))]
            coll = colls[coll_name][t % len(NODES)]
            found = await coll.search(q, k=10, consistency=consistency)
            if len(found) < 10 or found.missing_shards:
                misses[f"{coll_name} search {consistency}"] += 1
            return 1

        return op

    ops = {
        "get strong": get(READS, "strong"),
        "get eventual": get(READS, "eventual"),
        "get multi quorum": get(READS_MULTI, "quorum"),
        "get multi eventual": get(READS_MULTI, "eventual"),
        "search strong": search(READS, "strong"),
        "search eventual": search(READS, "eventual"),
        "search multi quorum": search(READS_MULTI, "quorum"),
        "search multi eventual": search(READS_MULTI, "eventual"),
    }
    err.log(f"reads: {args.rounds} rounds of {args.seconds} s per variant")
    out = await b.take_turns(ops)
    b.report.details["reads"] = {name: asdict(s) for name, s in out.items()} | {
        "load_s": {name: round(x, 2) for name, x in load_s.items()},
        "misses": dict(misses),
        "leaders": await b.cluster.leaders(READS, args.shards),
        "multi_map_leaders": await b.cluster.leaders(READS_MULTI, args.shards),
    }
    if misses:
        err.log(f"[red]reads that missed a loaded memory or came back short: {dict(misses)}[/]")
    for section, what in (("3", "get"), ("4", "search k=10")):
        op = what.split()[0]
        strong, eventual = out[f"{op} strong"], out[f"{op} eventual"]
        add(
            b.report,
            Row(
                f"{section}a",
                f"{what}, eventual, RF3",
                eventual.rate,
                "ops/s",
                "strong",
                strong.rate,
                note=f"rounds {eventual.rounds} (strong {strong.rounds}); node CPU"
                f" {eventual.node_cpu_ms_per_call:.2f} ms/call"
                f" (strong {strong.node_cpu_ms_per_call:.2f})",
            ),
        )
        for letter, p in (("b", "p50"), ("c", "p99")):
            add(
                b.report,
                Row(
                    f"{section}{letter}",
                    f"{what} latency {p}, eventual",
                    getattr(eventual, f"{p}_ms"),
                    "ms",
                    "strong",
                    getattr(strong, f"{p}_ms"),
                ),
            )
        quorum, m_eventual = out[f"{op} multi quorum"], out[f"{op} multi eventual"]
        cpu = (
            f"node CPU {quorum.node_cpu_ms_per_call:.2f} ms/call"
            f" (multi eventual {m_eventual.node_cpu_ms_per_call:.2f},"
            f" leader strong {strong.node_cpu_ms_per_call:.2f})"
        )
        rows = (
            ("d", f"{what}, quorum, multi RF3", quorum.rate, "ops/s", "multi eventual",
             m_eventual.rate, f"rounds {quorum.rounds} (eventual {m_eventual.rounds}); {cpu}"),
            ("e", f"{what}, quorum, multi RF3", quorum.rate, "ops/s", "leader strong",
             strong.rate, f"leader strong rounds {strong.rounds}"),
            ("f", f"{what}, eventual, multi RF3", m_eventual.rate, "ops/s", "leader eventual",
             eventual.rate, ""),
            ("g", f"{what} latency p50, quorum, multi", quorum.p50_ms, "ms", "multi eventual",
             m_eventual.p50_ms, ""),
            ("h", f"{what} latency p99, quorum, multi", quorum.p99_ms, "ms", "multi eventual",
             m_eventual.p99_ms, ""),
            ("i", f"{what} latency p50, quorum, multi", quorum.p50_ms, "ms", "leader strong",
             strong.p50_ms, ""),
        )  # fmt: skip
        for letter, measure, value, unit, base, base_value, note in rows:
            add(
                b.report,
                Row(f"{section}{letter}", measure, value, unit, base, base_value, note=note),
            )
    return out


# -- phase 3: failover ---------------------------------------------------------------------


@dataclass
class Attempt:
    i: int
    issued: float
    done: float
    ok: bool


@dataclass
class Repeat:
    """One kill -9 of a node holding a replica of the model's 1-shard collection (times in
    seconds from the kill): leader and chain kill the shard's leader (the chain's head), multi
    any replica but the writer's."""

    model: str
    repeat: int
    killed: str
    entry: str
    killed_was_controller: bool
    killed_was_map_leader: bool
    epoch_before: int
    epoch_after: int | None = None
    new_leader: str | None = None
    lease_expired_s: float | None = None
    """etcd no longer lists the killed node."""
    promoted_s: float | None = None
    """The shard map names another leader (multi: only when the killed node was the map's
    leader, which only admits replicas there)."""
    failover_s: float | None = None
    """The first put issued after the kill is acknowledged."""
    longest_gap_s: float = 0.0
    in_flight_s: float | None = None
    """The put in flight at the kill: its whole latency (None: it failed, or there was none)."""
    acked: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    """Acknowledged puts missing right after the writer stopped (strong; multi: quorum)."""
    restart_s: float | None = None
    """Spawn of the killed node -> it is registered and listening."""
    in_sync_s: float | None = None
    """Listening -> back in the shard's in-sync set (multi: every acknowledged put of the
    repeat readable from its own copy, eventual reads through it, polled)."""
    lost_on_rejoined: int | None = None
    """Acknowledged puts missing from the restarted node's own copy once back in sync
    (multi: still missing when the polling gave up)."""
    lost_after_restart: int | None = None
    """Acknowledged puts missing once the restarted node is back (strong; multi: quorum)."""
    read_errors: dict[str, int] = field(default_factory=dict)
    """Reads of the acknowledged puts that failed (tried again, see :func:`missing`)."""
    read_back_s: dict[str, float] = field(default_factory=dict)
    """How long each read-back of the acknowledged puts took."""
    acked_keys: list[int] = field(default_factory=list)


def failover_memory(prefix: str, i: int, vectors: Matrix) -> memcluster.Memory:
    return memcluster.Memory(
        namespace=NAMESPACE,
        key=f"{prefix}-{i:06d}",
        vector=vectors[i % len(vectors)],
        metadata={"i": i},
    )


async def missing_keys(
    coll: memcluster.AsyncCollection,
    prefix: str,
    keys: Sequence[int],
    consistency: str,
    concurrency: int,
    errors: dict[str, int],
) -> tuple[list[int], list[int]]:
    """The puts ``keys`` under ``prefix`` that are absent or differ, and those whose read
    failed (the error counted in ``errors``)."""
    lost: list[int] = []
    failed: list[int] = []
    queue = list(keys)

    async def work() -> None:
        while queue:
            i = queue.pop()
            try:
                got = await coll.get(NAMESPACE, f"{prefix}-{i:06d}", consistency=consistency)
            except memcluster.MemclusterError as exc:
                what = f"{type(exc).__name__}: {str(exc)[:160]}"
                errors[what] = errors.get(what, 0) + 1
                failed.append(i)
                continue
            if got is None or got.metadata != {"i": i}:
                lost.append(i)

    async with asyncio.TaskGroup() as tasks:
        for _ in range(concurrency):
            tasks.create_task(work())
    return sorted(lost), sorted(failed)


async def missing(
    coll: memcluster.AsyncCollection,
    prefix: str,
    keys: Sequence[int],
    consistency: str,
    concurrency: int,
    errors: dict[str, int],
) -> int:
    """How many of the puts ``keys`` under ``prefix`` are absent or differ. A read that fails
    is counted in ``errors`` and tried again (after POLL_S) until RESUME_TIMEOUT_S; one that
    never answers counts as missing."""
    deadline = time.monotonic() + RESUME_TIMEOUT_S
    lost, failed = await missing_keys(coll, prefix, keys, consistency, concurrency, errors)
    while failed and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
        more, failed = await missing_keys(coll, prefix, failed, consistency, concurrency, errors)
        lost += more
    return len(lost) + len(failed)


def strong_for(model: str) -> str:
    """The read level that sees every acknowledged write: strong, or quorum for multi (its
    writes are acknowledged by a majority, ack="majority")."""
    return "quorum" if model == "multi" else "strong"


async def one_failover(
    b: Bench, model: str, config: memcluster.CollectionConfig, r: int, vectors: Matrix
) -> Repeat:
    cluster, args = b.cluster, b.args
    coll_name = config.name
    await cluster.wait_placed(coll_name, 1, 3)
    await cluster.settle()
    before = await cluster.assignment(coll_name)
    assert before is not None
    assert before.leader is not None
    if model == "multi":  # any replica takes writes: kill each node in turn
        killed = NODES[r % len(NODES)]
        entry = NODES[(r + 1) % len(NODES)]
    else:
        killed = before.leader
        others = [n for n in NODES if n != killed]
        entry = others[r % len(others)]
    rep = Repeat(
        model,
        r + 1,
        killed,
        entry,
        await cluster.controller() == killed,
        before.leader == killed,
        before.epoch,
    )
    prefix = f"{model[0]}{r + 1}"
    read_level = strong_for(model)
    attempts: list[Attempt] = []
    errors: Counter[str] = Counter()
    stop = asyncio.Event()

    async with memcluster.AsyncClient(
        cluster.nodes[entry].mc_url, retries=0, timeout_s=60.0
    ) as client:
        coll = handle(client, config)

        async def writer() -> None:
            i = 0
            while not stop.is_set():
                issued = time.monotonic()
                try:
                    await coll.put_many([failover_memory(prefix, i, vectors)])
                    attempts.append(Attempt(i, issued, time.monotonic(), True))
                except memcluster.MemclusterError as exc:
                    attempts.append(Attempt(i, issued, time.monotonic(), False))
                    errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
                    await asyncio.sleep(WRITER_BACKOFF_S)
                i += 1

        def acked() -> list[Attempt]:
            return [a for a in attempts if a.ok]

        watch: dict[str, float] = {}
        wait_promotion = model != "multi" or rep.killed_was_map_leader

        async def watcher(kill_at: float) -> None:
            """Poll etcd: when the killed node's lease is gone, when a new leader is named."""
            while (
                "expired" not in watch or (wait_promotion and "promoted" not in watch)
            ) and not stop.is_set():
                now_a = await cluster.assignment(coll_name)
                now = time.monotonic()
                if (
                    "promoted" not in watch
                    and now_a is not None
                    and now_a.leader not in (None, killed)
                    and (now_a.leader != before.leader or now_a.epoch != before.epoch)
                ):
                    watch["promoted"] = now - kill_at
                    rep.new_leader, rep.epoch_after = now_a.leader, now_a.epoch
                if "expired" not in watch and killed not in await cluster.live():
                    watch["expired"] = time.monotonic() - kill_at
                await asyncio.sleep(POLL_S)

        async with asyncio.TaskGroup() as tasks:
            writing = tasks.create_task(writer())
            started = time.monotonic()
            while len(acked()) < WARMUP_ACKS or time.monotonic() - started < WARMUP_S:
                if time.monotonic() - started > RESUME_TIMEOUT_S:
                    stop.set()
                    raise RuntimeError(
                        f"failover {model} {r + 1}: no writes before the kill: {errors}"
                    )
                await asyncio.sleep(0.02)
            kill_at = time.monotonic()
            cluster.nodes[killed].kill()
            watching = tasks.create_task(watcher(kill_at))
            deadline = kill_at + RESUME_TIMEOUT_S
            # Write on until the cluster has noticed the kill (lease gone, new leader named)
            # and AFTER_RESUME_ACKS puts issued after that are acknowledged: a multi writer
            # that never stopped still goes through the killed node's removal from the map.
            while time.monotonic() < deadline:
                if watching.done():
                    since = kill_at + max(watch.values(), default=0.0)
                    after = [a for a in acked() if a.issued > since]
                    if len(after) > AFTER_RESUME_ACKS:
                        break
                await asyncio.sleep(0.02)
            stop.set()
            await writing
            await watching
        code = cluster.nodes[killed].reap()
        assert code == -signal.SIGKILL, f"{killed} exited with {code}, not by SIGKILL"
        ok = acked()
        rep.acked, rep.failed, rep.errors = len(ok), len(attempts) - len(ok), dict(errors)
        rep.acked_keys = [a.i for a in ok]
        rep.lease_expired_s, rep.promoted_s = watch.get("expired"), watch.get("promoted")
        resumed = [a for a in ok if a.issued > kill_at]
        if resumed:
            rep.failover_s = resumed[0].done - kill_at
        in_flight = [a for a in attempts if a.issued <= kill_at < a.done]
        if in_flight and in_flight[0].ok:
            rep.in_flight_s = in_flight[0].done - in_flight[0].issued
        times = [a.done for a in ok]
        rep.longest_gap_s = max((y - x for x, y in itertools.pairwise(times)), default=0.0)
        t0 = time.monotonic()
        rep.lost = await missing(
            coll, prefix, rep.acked_keys, read_level, args.concurrency, rep.read_errors
        )
        rep.read_back_s["after the writer"] = time.monotonic() - t0

    node = cluster.nodes[killed]
    t0 = time.monotonic()
    node.spawn()
    await node.ready()
    rep.restart_s = time.monotonic() - t0
    t0 = time.monotonic()
    if model == "multi":  # no in-sync set to wait for: poll its own copy until it has all
        async with memcluster.AsyncClient(node.mc_url, retries=0, timeout_s=60.0) as client:
            coll = handle(client, config)
            left: list[int] = rep.acked_keys
            while True:
                lost, failed = await missing_keys(
                    coll, prefix, left, "eventual", args.concurrency, rep.read_errors
                )
                left = lost + failed
                if not left:
                    rep.in_sync_s = time.monotonic() - t0
                    break
                if time.monotonic() - t0 > IN_SYNC_TIMEOUT_S:
                    err.log(
                        f"[red]failover {model} {r + 1}: {killed} still misses {len(left)}"
                        f" acknowledged puts after {IN_SYNC_TIMEOUT_S} s[/]"
                    )
                    break
                await asyncio.sleep(POLL_S)
            rep.lost_on_rejoined = len(left)
    else:
        while True:
            a = await cluster.assignment(coll_name)
            if a is not None and killed in a.in_sync:
                rep.in_sync_s = time.monotonic() - t0
                break
            if time.monotonic() - t0 > IN_SYNC_TIMEOUT_S:
                err.log(
                    f"[red]failover {model} {r + 1}: {killed} not back in sync after"
                    f" {IN_SYNC_TIMEOUT_S} s: {a}[/]"
                )
                break
            await asyncio.sleep(0.05)
        if rep.in_sync_s is not None:
            async with memcluster.AsyncClient(node.mc_url, retries=0, timeout_s=60.0) as client:
                coll = handle(client, config)
                t0 = time.monotonic()
                rep.lost_on_rejoined = await missing(
                    coll, prefix, rep.acked_keys, "eventual", args.concurrency, rep.read_errors
                )
                rep.read_back_s["on the rejoined node"] = time.monotonic() - t0
    async with memcluster.AsyncClient(
        cluster.nodes[entry].mc_url, retries=0, timeout_s=60.0
    ) as client:
        coll = handle(client, config)
        t0 = time.monotonic()
        rep.lost_after_restart = await missing(
            coll, prefix, rep.acked_keys, read_level, args.concurrency, rep.read_errors
        )
        rep.read_back_s["after the restart"] = time.monotonic() - t0
    return rep


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


async def failover_model(b: Bench, model: str) -> list[Repeat]:
    """``--repeats`` kills on the model's 1-shard RF3 collection, then every acknowledged put
    read once more, then the collection dropped (so that it fails over no more)."""
    args, cluster = b.args, b.cluster
    coll_name, replication, ack = FAILOVER_MODELS[model]
    read_level = strong_for(model)
    async with memcluster.AsyncClient(
        cluster.nodes["n1"].mc_url, retries=0, timeout_s=60.0
    ) as client:
        created = await client.create_collection(
            coll_name,
            dim=args.dim,
            shards=1,
            replication_factor=3,
            replication=replication,
            ack=ack,
        )
    config = created.config
    vectors = unit_vectors(1024, args.dim, args.seed + 3)
    repeats: list[Repeat] = []
    for r in range(args.repeats):
        rep = await one_failover(b, model, config, r, vectors)
        repeats.append(rep)
        err.log(
            f"failover {model} {rep.repeat}/{args.repeats}: killed {rep.killed}"
            f"{' (the controller)' if rep.killed_was_controller else ''}"
            f"{' (the map leader)' if rep.killed_was_map_leader else ''}, writer on {rep.entry};"
            f" lease gone {_s(rep.lease_expired_s)} s, new leader {rep.new_leader} at"
            f" {_s(rep.promoted_s)} s, first put issued after the kill acked at"
            f" {_s(rep.failover_s)} s, longest gap {rep.longest_gap_s:.2f} s; {rep.acked} acked,"
            f" {rep.failed} failed, {rep.lost} lost; restart {_s(rep.restart_s)} s, back in"
            f" sync {_s(rep.in_sync_s)} s later, {rep.lost_on_rejoined} missing on it,"
            f" {rep.lost_after_restart} lost after the restart"
        )
        if rep.errors:
            err.log(f"  writer errors: {rep.errors}")
        if rep.read_errors:
            err.log(f"  [red]read-back errors (tried again)[/]: {rep.read_errors}")
        err.log(f"  read-backs took { {k: round(v, 2) for k, v in rep.read_back_s.items()} } s")
    # Every acknowledged put of every repeat, once more, after all the kills.
    entry = next(n for n in NODES if cluster.nodes[n].running)
    async with memcluster.AsyncClient(
        cluster.nodes[entry].mc_url, retries=0, timeout_s=60.0
    ) as client:
        coll = handle(client, config)
        final = 0
        final_errors: dict[str, int] = {}
        for rep in repeats:
            final += await missing(
                coll,
                f"{model[0]}{rep.repeat}",
                rep.acked_keys,
                read_level,
                args.concurrency,
                final_errors,
            )
        count = await coll.count()
        try:
            await client.drop_collection(coll_name)
        except memcluster.MemclusterError as exc:
            err.log(f"[red]drop {coll_name}: {exc}[/]")
    total = sum(rep.acked for rep in repeats)
    b.report.details.setdefault("failover", {})[model] = {
        "collection": {"replication": replication, "ack": ack, "read_back": read_level},
        "repeats": [{k: v for k, v in asdict(rep).items() if k != "acked_keys"} for rep in repeats],
        "lost_at_end": final,
        "read_errors_at_end": final_errors,
        "count_at_end": count,
        "acked_total": total,
    }
    sec = FAILOVER_SECTION[model]
    what = {
        "leader": "leader-follower ack=all, kill the leader",
        "chain": "chain, kill the head",
        "multi": "multi ack=majority, kill a replica, writer on another",
    }[model]
    done = [rep.failover_s for rep in repeats if rep.failover_s is not None]
    gaps = [rep.longest_gap_s for rep in repeats]
    promoted = [rep.promoted_s for rep in repeats if rep.promoted_s is not None]
    expired = [rep.lease_expired_s for rep in repeats if rep.lease_expired_s is not None]
    caught_up = [rep.in_sync_s for rep in repeats if rep.in_sync_s is not None]
    note = f"{len(repeats)} kills; per repeat {[_s(x) for x in done]}"
    lease = f"node lease TTL {LEASE_TTL_S:g} s"
    rows: list[tuple[str, str, float | None, str]] = [
        ("a", "kill -> first put issued after it acked, p50", _median(done), lease),
        ("b", "kill -> first put issued after it acked, max", _max(done), note),
        ("c", "longest gap between acked puts, p50", _median(gaps), lease),
        ("d", "longest gap between acked puts, max", _max(gaps), f"{[_s(g) for g in gaps]}"),
        ("e", "kill -> etcd drops the node (lease expiry), p50", _median(expired), lease),
    ]
    if model == "multi":
        rows.append(
            (
                "f",
                "restarted node listening -> its own copy has every acked put, p50",
                _median(caught_up),
                f"{[_s(x) for x in caught_up]}",
            )
        )
    else:
        rows.append(("f", "kill -> shard map names a new leader, p50", _median(promoted), lease))
    for letter, measure, value, base in rows:
        add(b.report, Row(f"{sec}{letter}", f"{what}: {measure}", value, "s", base, None))
    lost = sum(rep.lost for rep in repeats)
    after_restart = sum(rep.lost_after_restart or 0 for rep in repeats)
    add(
        b.report,
        Row(
            f"{sec}g",
            f"{what}: acknowledged puts lost (read back {read_level} after each repeat, after"
            " the restart, and at the end)",
            float(lost + after_restart + final),
            "items",
            f"of {total:,} acknowledged; must be 0",
            None,
            note=f"after each repeat {lost}, after the restarts {after_restart}, at the end"
            f" {final}; count() {count:,}; missing on the restarted replica"
            f" {[rep.lost_on_rejoined for rep in repeats]}",
        ),
    )
    if lost or after_restart or final:
        err.log(
            f"[red]{model}: LOST acknowledged writes: {lost} after the repeats,"
            f" {after_restart} after the restarts, {final} at the end[/]"
        )
    return repeats


async def phase_failover(b: Bench) -> dict[str, list[Repeat]]:
    admin = b.clients[0]
    for name in (READS, READS_MULTI):
        try:
            await admin.drop_collection(name)
        except memcluster.MemclusterError as exc:
            err.log(f"[red]drop {name}: {exc}[/]")
    for client in b.clients:  # their nodes restart in this phase, on new ports
        await client.close()
    b.clients.clear()
    out: dict[str, list[Repeat]] = {}
    for model in b.args.failover:
        t0 = time.perf_counter()
        out[model] = await failover_model(b, model)
        b.report.details["failover"][model]["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return out


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _max(values: Sequence[float]) -> float | None:
    return max(values) if values else None


# -- main ----------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.replication", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--seconds", type=float, default=1.5, help="length of each timed series")
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the variants alternate")
    p.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    p.add_argument("--batch", type=int, default=64, help="memories per batched put_many")
    p.add_argument(
        "--repeats", type=int, default=3, help="kills per replication model in the failover phase"
    )
    p.add_argument(
        "--failover",
        type=lambda v: [m for m in v.split(",") if m],
        default=list(FAILOVER_MODELS),
        help="replication models whose failover is measured, in order (leader,chain,multi)",
    )
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--shards", type=int, default=3, help="shards of the phase 1 and 2 collections")
    p.add_argument("--read-n", type=int, default=20_000, help="memories in the read collection")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", type=Path, default=None, help="scratch root (default: a /tmp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir and node logs")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or args.concurrency < 1 or args.repeats < 0:
        p.error("need --seconds > 0, --rounds >= 1, --concurrency >= 1, --repeats >= 0")
    if args.read_n < 1 or args.batch < 1 or args.shards < 1:
        p.error("need --read-n, --batch and --shards >= 1")
    if not set(args.failover) <= set(FAILOVER_MODELS):
        p.error(f"--failover takes a comma-separated list of {', '.join(FAILOVER_MODELS)}")
    return args


async def run(args: argparse.Namespace) -> Report:
    cfg = memcluster.Config()
    report = Report(
        machine=machine(),
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {
            "nodes": len(NODES),
            "lease_ttl_s": LEASE_TTL_S,
            "durability": str(cfg.durability),
            "settle_cores": SETTLE_CORES,
            "settle_max_s": SETTLE_MAX_S,
        },
    )
    m = report.machine
    err.print(
        f"[bold]machine[/]: {m['nproc']} cpus, {m['cpu']}, {m['memory_gib']} GiB,"
        f" memcluster {m['memcluster_commit']} (src {m['src_sha256']}), load {m['loadavg_start']}"
    )
    root = Path(tempfile.mkdtemp(prefix="memcluster-replication-bench-", dir=args.dir))
    err.log(f"scratch dir {root}")
    start = time.perf_counter()
    cluster = LocalCluster(root)
    b = Bench(args, report, cluster)
    failed = True
    try:
        await cluster.start()
        err.log(
            f"cluster up in {time.perf_counter() - start:.1f} s: etcd {cluster.etcd.url} (pid"
            f" {cluster.etcd.proc.pid}), nodes"
            f" { {n: (node.pid, node.mc_url) for n, node in cluster.nodes.items()} }"
        )
        b.clients = [
            memcluster.AsyncClient(cluster.nodes[n].mc_url, retries=0, timeout_s=60.0)
            for n in NODES
        ]
        report.details["phase_s"] = {}
        phases: list[tuple[str, Callable[[Bench], Awaitable[object]]]] = [
            ("writes", phase_writes),
            ("reads", phase_reads),
            ("failover", phase_failover),
        ]
        for name, phase in phases:
            t0 = time.perf_counter()
            await phase(b)
            report.details["phase_s"][name] = round(time.perf_counter() - t0, 1)
        report.details["call_errors"] = {k: dict(v) for k, v in b.errors.items() if v}
        failed = False
    finally:
        for client in b.clients:
            await client.close()
        report.details["log_problems"] = cluster.log_problems()
        report.details["log_messages"] = dict(cluster.log_messages().most_common(30))
        if failed:
            for node in cluster.nodes.values():
                tail = node.log.read_text(errors="replace")[-3000:] if node.log.exists() else ""
                err.log(f"{node.name}.log ends: {tail}")
        report.details["exit_codes"] = await cluster.close()
        if args.keep or failed:
            err.log(f"scratch dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report.details["elapsed_s"] = round(time.perf_counter() - start, 1)
    report.machine["loadavg_end"] = loadavg()
    if src_fingerprint() != report.machine["src_sha256"]:
        report.machine["src_changed_during_run"] = True
        err.log("[red]src/ changed during the run: the figures may mix two versions[/]")
    return report


def writes_table(d: dict[str, Any], batch: int) -> Table:
    table = Table(title=f"writes: put_many, 1 and {batch} memories per call")
    for name in ("variant", "x1 puts/s", "vs RF1", "p50 ms", "p99 ms", "node CPU ms/put"):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for name in (f"x{batch} items/s", "vs RF1", "p50 ms", "p99 ms", "node CPU ms/call"):
        table.add_column(name, justify="right")
    one, many = d["x1"], d[f"x{batch}"]
    for v in WRITE_VARIANTS:
        a, m = one[v], many[v]
        table.add_row(
            v,
            f"{a['rate']:,.0f}",
            f"{a['rate'] / one[RF1]['rate']:.2f}x",
            f"{a['p50_ms']:.1f}",
            f"{a['p99_ms']:.1f}",
            f"{a['node_cpu_ms_per_call']:.2f}",
            f"{m['rate']:,.0f}",
            f"{m['rate'] / many[RF1]['rate']:.2f}x",
            f"{m['p50_ms']:.1f}",
            f"{m['p99_ms']:.1f}",
            f"{m['node_cpu_ms_per_call']:.1f}",
        )
    return table


def reads_table(d: dict[str, Any]) -> Table:
    table = Table(
        title="reads on RF3 (clients on all 3 nodes): leader-follower strong / eventual,"
        " multi (ack=majority) quorum / eventual"
    )
    for name in (
        "operation",
        "collection",
        "level",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "vs leader strong",
        "vs same collection's eventual",
        "node CPU ms/op",
    ):
        left = name in ("operation", "collection", "level")
        table.add_column(name, justify="left" if left else "right")
    for op in ("get", "search"):
        strong = d[f"{op} strong"]
        for variant, coll, level, base in (
            (f"{op} strong", "leader", "strong", f"{op} eventual"),
            (f"{op} eventual", "leader", "eventual", None),
            (f"{op} multi quorum", "multi", "quorum", f"{op} multi eventual"),
            (f"{op} multi eventual", "multi", "eventual", None),
        ):
            s = d[variant]
            table.add_row(
                op if op == "get" else "search k=10",
                coll,
                level,
                f"{s['rate']:,.0f}",
                f"{s['p50_ms']:.1f}",
                f"{s['p99_ms']:.1f}",
                f"{s['rate'] / strong['rate']:.2f}x",
                "-" if base is None else f"{s['rate'] / d[base]['rate']:.2f}x",
                f"{s['node_cpu_ms_per_call']:.2f}",
            )
    return table


def failover_table(model: str, d: dict[str, Any]) -> Table:
    c = d["collection"]
    kills = "a replica (the writer writes through another)" if model == "multi" else "the leader"
    if model == "chain":
        kills = "the head"
    table = Table(
        title=f"failover, {model} (ack={c['ack']}): SIGKILL of {kills} under single puts"
        " (seconds from the kill)"
    )
    for name in (
        "#",
        "killed",
        "writer on",
        "lease gone",
        "new leader named",
        "first put after kill acked",
        "longest gap",
        "in-flight put took",
        "acked",
        "failed",
        "lost",
        "restart",
        "caught up" if model == "multi" else "back in sync",
        "missing on rejoined",
        f"lost after restart ({c['read_back']})",
    ):
        table.add_column(name, justify="left" if name in ("killed", "writer on") else "right")
    for rep in d["repeats"]:
        tags = (" (ctrl)" if rep["killed_was_controller"] else "") + (
            " (map leader)" if model == "multi" and rep["killed_was_map_leader"] else ""
        )
        table.add_row(
            str(rep["repeat"]),
            rep["killed"] + tags,
            rep["entry"],
            _s(rep["lease_expired_s"]),
            "-" if rep["promoted_s"] is None else f"{_s(rep['promoted_s'])} ({rep['new_leader']})",
            _s(rep["failover_s"]),
            _s(rep["longest_gap_s"]),
            _s(rep["in_flight_s"]),
            str(rep["acked"]),
            str(rep["failed"]),
            str(rep["lost"]),
            _s(rep["restart_s"]),
            _s(rep["in_sync_s"]),
            str(rep["lost_on_rejoined"]),
            str(rep["lost_after_restart"]),
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    single_threaded_blas()
    report = uvloop.run(run(args))
    out = Console() if sys.stdout.isatty() else Console(width=200)
    m, p, d = report.machine, report.params, report.details
    out.print(machine_line(m), highlight=False)
    out.print(
        f"cluster: etcd + {p['nodes']} memcluster nodes on loopback, node lease TTL"
        f" {p['lease_ttl_s']:g} s, durability {p['durability']} (every replica fsyncs before it"
        f" acknowledges), all on this machine's {m['nproc']} cpus together with the client;"
        f" load generator: this process, uvloop, {p['concurrency']} calls in flight over mc://,"
        f" spread over one client per node, retries off; dim {p['dim']}, {p['shards']} shards;"
        f" rates = median of {p['rounds']} alternating rounds of {p['seconds']:g} s; the nodes"
        f" idle again (< {p['settle_cores']} cores) before each series; total"
        f" {d.get('elapsed_s', 0):.0f} s ({d.get('phase_s')})",
        highlight=False,
    )
    out.print(writes_table(d["writes"], p["batch"]))
    for batch in ("x1", f"x{p['batch']}"):
        for v, s in d["writes"][batch].items():
            out.print(
                f"  {batch} {v}: rounds {s['rounds']}, client CPU"
                f" {s['client_cpu_ms_per_call']:.2f} ms/call, {s['errors']} failed calls;"
                f" nodes idle again after {s['settle_s']} s",
                highlight=False,
            )
    out.print(reads_table(d["reads"]))
    for v, s in d["reads"].items():
        if isinstance(s, dict) and "rounds" in s:
            out.print(
                f"  {v}: rounds {s['rounds']}, client CPU {s['client_cpu_ms_per_call']:.2f}"
                f" ms/op, {s['errors']} failed calls",
                highlight=False,
            )
    out.print(
        f"  reads that missed a loaded memory or came back short: {d['reads']['misses'] or 0};"
        f" loading {p['read_n']:,} memories took {d['reads']['load_s']} s",
        highlight=False,
    )
    rows = {row.id: row for row in report.rows}
    for model, f in d.get("failover", {}).items():
        out.print(failover_table(model, f))
        sec = FAILOVER_SECTION[model]
        sixth = (
            "restarted node listening -> its copy has every acked put"
            if model == "multi"
            else "kill -> new leader named"
        )
        out.print(
            f"  {model}: kill -> first put issued after the kill acknowledged: p50"
            f" {_s(rows[sec + 'a'].value)} s, max {_s(rows[sec + 'b'].value)} s; longest gap"
            f" between acknowledged puts: p50 {_s(rows[sec + 'c'].value)} s, max"
            f" {_s(rows[sec + 'd'].value)} s; kill -> lease gone p50 {_s(rows[sec + 'e'].value)}"
            f" s, {sixth} p50 {_s(rows[sec + 'f'].value)} s",
            highlight=False,
        )
        lost = [r["lost"] for r in f["repeats"]]
        after = [r["lost_after_restart"] for r in f["repeats"]]
        out.print(
            f"  {model}: LOST acknowledged writes: {rows[sec + 'g'].value:.0f} (after each repeat"
            f" {lost}, after the restarts {after}, all of them again at the end"
            f" {f['lost_at_end']}) of {f['acked_total']:,} acknowledged, read back"
            f" {f['collection']['read_back']}; count() {f['count_at_end']:,}",
            highlight=False,
        )
    errors = d.get("call_errors", {})
    out.print(f"  failed calls in timed series: {errors or 'none'}", highlight=False)
    problems = d.get("log_problems", {})
    out.print(
        f"  node logs: {'error lines ' + str(problems) if problems else 'no error lines'};"
        f" exit codes {d.get('exit_codes')}",
        highlight=False,
    )
    for message, count in d.get("log_messages", {}).items():
        out.print(f"    {count:5d} x {message}", highlight=False)
    if args.json is not None:
        write_json(report, args.json)
        out.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
