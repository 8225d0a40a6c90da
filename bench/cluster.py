"""Benchmark of a cluster: 3 nodes beside 1 node over the same data, and vector sharding
beside hash sharding on the 3 nodes, every figure beside its baseline from the same run.

Run ``.venv/bin/python -m bench.cluster [--quick] [--n N] [--queries Q] [--shards S]
[--concurrency C] [--json PATH]``. It prints the machine, one table and per-row notes, and
writes the same rows as JSON to ``--json PATH`` if given.

Setup
-----

* Two clusters, each a real ``memcluster up`` child process (``python -m memcluster.cli.main
  up --nodes N --port 0``: its own etcd and N ``memcluster node`` processes on loopback, ports
  the OS picks) over a fresh data directory under ``/tmp``: **A** with 1 node and **B** with
  3. Both live for the whole run, so their rounds can alternate; while one is measured the
  other is idle (heartbeats, maintenance ticks), and each row's note gives the idle
  cluster's CPU over that row's runs. At the end each ``up`` gets SIGTERM (it stops its nodes,
  then its etcd), a wait, and SIGKILL as the last resort, for it and for the processes it had
  started (their PIDs, read from ``/proc`` at start, checked against their command lines).
* The same collection config on both: ``--shards`` shards (6), hash sharding on the key, the
  server defaults (fsync before the ack, M=16, ef_construction=100, ef=64, shards of at most
  ``exact_items_max`` = 10,000 items scanned exactly). Every shard has one replica.
* On A, the client talks to the only node, which holds every shard: requests go through the
  cluster router, but nothing is forwarded. On B, the client talks to the node that holds
  the fewest shards of the collection (2 of 6 with an even placement), so most of the work
  is forwarded: a search scatters to 3 nodes (its own shards in-process, the others over the
  binary protocol) and merges a global top-k; a ``put_many`` batch is split by shard and
  sent to each owner. The ratio B / A is therefore the cost of routing, forwarding and
  scatter-gather. All processes share this machine's cores (2 here): 3 nodes add no CPU,
  so this measures the overhead of distribution, not scale-out.
* Vector sharding (B only): ``sharding="vector"``, the same shard count, centroids by
  k-means over ``--sample`` items (``create_collection(sample=...)``, computed in the
  client), searched with ``nprobe`` = 1, 2 and all shards; the baseline is the hash
  collection on B through the same client node. Each recall row's note also gives the
  *routing bound*: the fraction of the exact top-10 that lives in the probed shards (the
  placement and probe computed with the server's own ``Sharder``), which tells what the
  unprobed shards cost from what the per-shard graphs cost.
* The load generator is this process: one uvloop loop, ``--concurrency`` tasks each with one
  request in flight, through ``memcluster.AsyncClient`` over ``mc://`` (4 multiplexed
  connections), retries off (``retries=0``) so an error stops the run instead of hiding.
  BLAS is pinned to one thread here, as in the nodes.

What runs, in order (default sizes: about 5 minutes on 2 cores; ``--quick``: about 1.5 min):

1. Bulk ingest: the first ``--n`` items of the server bench's data set (bench.data, 200k x
   384 clustered unit vectors) into A/hash, B/hash and B/vector with ``put_many`` batches of
   ``--batch``, cut into ``--rounds`` chunks; the three take turns, and after each chunk the
   bench waits until that collection's graphs hold everything (polling ``describe()``).
2. Single puts: ``--single-n`` puts per variant, one per request, into fresh hash
   collections with the same config on A and B.
3. Search, k=10, unfiltered: ``--queries`` queries per round on A/hash, B/hash and B/vector
   at each ``nprobe``; recall@10 is against exact numpy (:func:`bench.data.exact_topk`).

Every rate is the median of ``--rounds`` rounds in which the variants take turns, each round
starting with a different one (:func:`bench.server.take_turns`); p50 and p99 latencies pool
every round. A latency is one call from the caller's side with ``--concurrency`` calls in
flight (closed loop), so it includes queueing behind the others.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import uvloop
from rich.console import Console
from rich.table import Table

import memcluster
from bench import data
from bench.engine import Report, Row, _fmt_ratio, memories, ordered, recall_at, write_json
from bench.server import (
    Run,
    Series,
    Summary,
    fmt,
    loadavg,
    machine,
    machine_line,
    process_cpu_s,
    run_tasks,
    src_fingerprint,
    take_turns,
    wait_indexed_remote,
)
from memcluster.cli.main import single_threaded_blas
from memcluster.cluster.coordinator import EtcdCoordinator
from memcluster.cluster.view import cluster_view
from memcluster.shard.sharding import Sharder

SOURCE_N = 200_000
"""The server bench's data set; this bench takes its first ``--n`` items."""
ONE, THREE = "1 node", "3 nodes"
VECTOR = "3 nodes, vector"
BULK, VECTOR_BULK, SINGLE = "bulk", "bulk-vector", "single"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 90.0
LOG_PROBLEMS = ("Traceback", "ERROR", "CRITICAL")

err = Console(stderr=True)


# -- the cluster processes -----------------------------------------------------------------


def _cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" if it is gone or a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


class ClusterProcess:
    """``memcluster up --nodes N`` in a child process, on ports the OS picks.

    Its stdout is read by a thread into a queue (the endpoints, then the ``cluster ... up``
    line); its stderr and the nodes' logs stay under ``data_dir`` (``*.log``). The processes
    ``up`` started (etcd and the nodes) are read from ``/proc`` once it reports the cluster
    up, so :meth:`stop` can reach them even if ``up`` itself has to be killed; every signal
    goes to one of these PIDs only, after checking its command line is still the one seen.
    """

    def __init__(self, label: str, nodes: int, data_dir: Path, name: str) -> None:
        self.label = label
        self.data_dir = data_dir
        data_dir.mkdir(parents=True)
        self._stderr: TextIO = (data_dir / "up.stderr.log").open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memcluster.cli.main",
                "up",
                "--nodes",
                str(nodes),
                "--data",
                str(data_dir),
                "--cluster",
                name,
                "--port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.etcd_url = ""
        self.nodes: dict[str, str] = {}
        """Node id -> its binary endpoint (``mc://``)."""
        self.children: dict[int, str] = {}
        """PID -> command line of every process ``up`` started."""
        self.node_pids: dict[str, int] = {}
        try:
            self._wait_up(name, START_TIMEOUT_S)
        except BaseException:
            self.stop(30.0)
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _wait_up(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise RuntimeError(
                    f"cluster {self.label}: memcluster up did not report the cluster up: {seen};"
                    f" logs in {self.data_dir}: {self.log_tail()}"
                )
            seen.append(line)
            parts = line.split()
            if parts[:1] == ["etcd"]:
                self.etcd_url = parts[1]
            elif parts[:1] == ["node"]:
                self.nodes[parts[1]] = next(p for p in parts[2:] if p.startswith("mc://"))
            elif line.startswith(f"cluster {name} up"):
                break
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        for pid in map(int, children.split()):
            cmd = _cmdline(pid)
            self.children[pid] = cmd
            args = cmd.split()
            if "--name" in args:
                self.node_pids[args[args.index("--name") + 1]] = pid
        if sorted(self.node_pids) != sorted(self.nodes):
            raise RuntimeError(f"cluster {self.label}: node processes {self.node_pids} != {seen}")

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of each node process (all its threads), by node id."""
        return {node: process_cpu_s(pid) for node, pid in self.node_pids.items()}

    def rss_mib(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for node, pid in self.node_pids.items():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[node] = int(line.split()[1]) // 1024
        return out

    def log_problems(self) -> dict[str, int]:
        """Lines of each log that name an error or a traceback."""
        found: dict[str, int] = {}
        for log in sorted(self.data_dir.glob("*.log")):
            text = log.read_text(errors="replace")
            count = sum(1 for line in text.splitlines() if any(p in line for p in LOG_PROBLEMS))
            if count:
                found[log.name] = count
        return found

    def log_tail(self, chars: int = 1500) -> str:
        return " | ".join(
            f"{log.name}: {log.read_text(errors='replace')[-chars:]!r}"
            for log in sorted(self.data_dir.glob("*.log"))
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM to ``up`` (it stops the nodes, then etcd), wait, return its exit code;
        SIGKILL after ``timeout_s``. Then any process it had started that is still running
        gets SIGTERM and, 30 s later, SIGKILL."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            err.log(f"[red]cluster {self.label}: up did not stop in {timeout_s} s: SIGKILL[/]")
            os.kill(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(30)
        left = [pid for pid, cmd in self.children.items() if _cmdline(pid) == cmd]
        if left:
            err.log(f"[red]cluster {self.label}: processes {left} outlived up: SIGTERM[/]")
            for pid in left:
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = [pid for pid in left if _cmdline(pid) == self.children[pid]]
            for pid in left:
                os.kill(pid, signal.SIGKILL)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
        return code


async def shard_owners(cluster: ClusterProcess, name: str, collection: str) -> dict[int, str]:
    """Shard number -> the node that leads it, from the shard map in etcd."""
    coord = EtcdCoordinator(cluster.etcd_url)
    try:
        view = await cluster_view(coord, name)
    finally:
        await coord.close()
    owners: dict[int, str] = {}
    for s in view.shards:
        if s.collection == collection:
            if s.assignment is None or s.assignment.leader is None or not s.available:
                raise RuntimeError(f"cluster {cluster.label}: shard {collection}/{s.shard} not up")
            owners[s.shard] = s.assignment.leader
    return owners


# -- results -------------------------------------------------------------------------------


def add(report: Report, row: Row) -> None:
    report.rows.append(row)
    err.log(
        f"[bold]{row.id}[/] {row.measure}: {fmt(row.value, row.unit)}"
        f" ({row.baseline}: {fmt(row.baseline_value, row.unit)})"
    )


def render(report: Report) -> Table:
    table = Table(title="memcluster cluster: 3 nodes vs 1 node, vector vs hash sharding (same run)")
    for name, justify in (
        ("#", "left"),
        ("measure", "left"),
        ("memcluster", "right"),
        ("baseline (same run)", "left"),
        ("baseline value", "right"),
        ("ratio", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in ordered(report.rows):
        table.add_row(
            row.id,
            row.measure,
            fmt(row.value, row.unit),
            row.baseline,
            fmt(row.baseline_value, row.unit),
            _fmt_ratio(row.ratio),
        )
    return table


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Bench:
    """What every phase needs: settings, the report, the data, the clusters and clients."""

    args: argparse.Namespace
    report: Report
    vectors: data.Matrix
    queries: data.Matrix
    truth: data.Ints
    meta: data.Metadata
    clusters: dict[str, ClusterProcess]
    """ONE and THREE."""
    clients: dict[str, memcluster.AsyncClient]
    """The measured client of each cluster, on its chosen node."""
    client_node: dict[str, str]
    owners: dict[str, dict[int, str]] = field(default_factory=dict)
    """Variant -> shard -> node, for the N-item collections."""
    colls: dict[str, memcluster.AsyncCollection] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    """``phase/variant`` -> process label -> CPU seconds over that variant's timed runs."""
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.vectors)

    def cpu_now(self) -> dict[str, float]:
        out = {"client": time.process_time()}
        for label, cluster in self.clusters.items():
            for node, cpu in cluster.cpu_s().items():
                out[f"{label}/{node}"] = cpu
        return out

    def series(
        self, phase: str, variant: str, cluster: str, op: Callable[[int], Awaitable[Any]]
    ) -> Series:
        """A timed series of ``op`` with ``concurrency`` in flight; its CPU is accounted to
        ``phase/variant`` per process. ``Run.cpu_server_s`` is the measured cluster's."""
        nodes = self.clusters[cluster]

        def meter() -> tuple[float, float]:
            return time.process_time(), sum(nodes.cpu_s().values())

        async def run(items: Sequence[int]) -> Run:
            before = self.cpu_now()
            result = await run_tasks(items, self.args.concurrency, op, meter)
            after = self.cpu_now()
            key = f"{phase}/{variant}"
            acc = self.cpu.setdefault(key, {})
            for label, cpu in after.items():
                acc[label] = acc.get(label, 0.0) + cpu - before[label]
            self.ops[key] = self.ops.get(key, 0) + len(items)
            return result

        return run

    def cpu_note(self, phase: str, variant: str, cluster: str, per: str) -> str:
        """CPU per operation: the client, each node of the measured cluster (``*``: the node
        the client talks to), and the idle cluster's nodes together."""
        key = f"{phase}/{variant}"
        acc, ops = self.cpu.get(key, {}), max(self.ops.get(key, 0), 1)

        def ms(seconds: float) -> str:
            return f"{seconds / ops * 1000:.2f}"

        mine = sorted(k for k in acc if k.startswith(cluster + "/"))
        nodes = " + ".join(
            f"{k.split('/')[1]}{'*' if k.split('/')[1] == self.client_node[cluster] else ''}"
            f" {ms(acc[k])}"
            for k in mine
        )
        idle = sum(v for k, v in acc.items() if k != "client" and k not in mine)
        total = sum(acc[k] for k in mine)
        return (
            f"CPU ms/{per}: client {ms(acc.get('client', 0.0))}, nodes {ms(total)}"
            f" ({nodes}; * = the client's node), idle cluster {ms(idle)}"
        )

    def record(self, phase: str, summaries: dict[str, Summary], extra: dict[str, Any]) -> None:
        self.report.details[phase] = {
            name: asdict(s) | {"cpu_s": self.cpu.get(f"{phase}/{name}", {})}
            for name, s in summaries.items()
        } | extra


def split(count: int, rounds: int) -> list[range]:
    return [range(count * r // rounds, count * (r + 1) // rounds) for r in range(rounds)]


# -- the phases ----------------------------------------------------------------------------


async def phase_ingest(b: Bench) -> None:
    """Rows 1a-1c and 4a-4c: put_many batches into A/hash, B/hash and B/vector, the three
    taking turns chunk by chunk, each chunk followed by a wait until all is in the graph."""
    args, n, rounds = b.args, b.n, b.args.rounds
    batches = [range(lo, min(lo + args.batch, n)) for lo in range(0, n, args.batch)]
    chunks = split(len(batches), rounds)
    variants = {ONE: ONE, THREE: THREE, VECTOR: THREE}
    """variant -> the cluster it runs on."""

    def put(coll: memcluster.AsyncCollection) -> Callable[[int], Awaitable[list[int]]]:
        async def op(j: int) -> list[int]:
            return await coll.put_many(memories(b.vectors, b.meta, batches[j]))

        return op

    series = {
        name: b.series("ingest", name, cluster, put(b.colls[name]))
        for name, cluster in variants.items()
    }
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    index_s = dict.fromkeys(variants, 0.0)
    loaded = dict.fromkeys(variants, 0)
    names = list(variants)
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            chunk = chunks[r]
            items = sum(len(batches[x]) for x in chunk)
            loaded[name] += items
            err.log(f"ingest round {r + 1}/{rounds}: {name}, {items:,} items")
            run = await series[name](chunk)
            runs[name].append(run)
            rates[name].append(items / run.elapsed_s)
            index_s[name] += await wait_indexed_remote(b.colls[name], loaded[name])
    counts = {name: await b.colls[name].count() for name in variants}
    for name, count in counts.items():
        if count != n:
            err.log(f"[red]{name}: count() is {count:,} after loading {n:,} items[/]")
    rate = {name: statistics.median(rates[name]) for name in variants}
    s = {name: Summary.of(runs[name]) for name in variants}
    b.record(
        "ingest",
        s,
        {
            "items_per_s": rate,
            "rounds_items_per_s": rates,
            "wait_all_in_graph_s": index_s,
            "counts": counts,
        },
    )
    per = f"batch of {args.batch}"

    def note(name: str, cluster: str) -> str:
        return (
            f"rounds {[round(x) for x in rates[name]]}; then waits until all in graph"
            f" {index_s[name]:.1f} s in total; count() {counts[name]:,};"
            f" {b.cpu_note('ingest', name, cluster, per)}"
        )

    rows = (
        ("1", THREE, ONE, f"{ONE}, same client load", f"hash, {n:,} items, {args.shards} shards"),
        ("4", VECTOR, THREE, f"{THREE}, hash", f"{n:,} items, {args.shards} shards"),
    )
    for section, name, base, label, what in rows:
        add(
            b.report,
            Row(
                f"{section}a",
                f"put_many x{args.batch}, {name} ({what})",
                rate[name],
                "items/s",
                label,
                rate[base],
                note=f"{args.concurrency} batches in flight, fsync before ack; {note(name, THREE)};"
                f" baseline {note(base, ONE if base == ONE else THREE)}",
            ),
        )
        for letter, what_p, value, base_value in (
            ("b", "p50", s[name].p50_ms, s[base].p50_ms),
            ("c", "p99", s[name].p99_ms, s[base].p99_ms),
        ):
            add(
                b.report,
                Row(
                    f"{section}{letter}",
                    f"put_many batch latency {what_p}, {name}",
                    value,
                    "ms",
                    label,
                    base_value,
                ),
            )


async def phase_single_puts(b: Bench) -> None:
    """Rows 2a-2c: one put per request into a fresh hash collection on A and on B."""
    args = b.args
    per_round = args.single_n // args.rounds
    chunks = [range(r * per_round, (r + 1) * per_round) for r in range(args.rounds)]
    err.log(
        f"single puts: {per_round * args.rounds:,} per variant in {args.rounds} rounds,"
        f" {args.concurrency} in flight"
    )
    v, meta = b.vectors, b.meta
    colls = {name: await b.clients[name].collection(SINGLE) for name in (ONE, THREE)}

    def put(coll: memcluster.AsyncCollection) -> Callable[[int], Awaitable[int]]:
        async def op(i: int) -> int:
            return await coll.put(
                ("bench",), data.key(i), text=meta.text(i), vector=v[i], metadata=meta.item(i)
            )

        return op

    series = {name: b.series("single", name, name, put(colls[name])) for name in (ONE, THREE)}
    runs = await take_turns(series, chunks)
    s = {name: Summary.of(r) for name, r in runs.items()}
    counts = {name: await colls[name].count() for name in colls}
    b.record("single_puts", s, {"counts": counts})
    base, x = s[ONE], s[THREE]
    add(
        b.report,
        Row(
            "2a",
            f"single puts, {THREE}",
            x.rate,
            "puts/s",
            f"{ONE}, same client load",
            base.rate,
            note=f"{args.concurrency} in flight, fsync before ack, {args.shards} shards; median"
            f" of {args.rounds} rounds of {per_round:,}: {x.rounds} ({ONE}: {base.rounds});"
            f" count() {counts[THREE]:,} ({ONE}: {counts[ONE]:,});"
            f" {THREE}: {b.cpu_note('single', THREE, THREE, 'put')};"
            f" {ONE}: {b.cpu_note('single', ONE, ONE, 'put')}",
        ),
    )
    for letter, what, value, base_value in (
        ("b", "p50", x.p50_ms, base.p50_ms),
        ("c", "p99", x.p99_ms, base.p99_ms),
    ):
        add(
            b.report,
            Row(
                f"2{letter}",
                f"single put latency {what}, {THREE}",
                value,
                "ms",
                f"{ONE}, same client load",
                base_value,
            ),
        )


@dataclass
class SearchVariant:
    name: str
    cluster: str
    coll: memcluster.AsyncCollection
    nprobe: int | None


async def phase_search(b: Bench) -> None:
    """Rows 3a-3d (hash, 3 nodes vs 1) and 5-7 (vector at each nprobe vs hash, 3 nodes)."""
    args, q = b.args, b.queries
    probes = [p for p in args.nprobe if p < args.shards] + [args.shards]
    variants = [
        SearchVariant(ONE, ONE, b.colls[ONE], None),
        SearchVariant(THREE, THREE, b.colls[THREE], None),
    ] + [SearchVariant(f"vector nprobe={p}", THREE, b.colls[VECTOR], p) for p in probes]
    missing: dict[str, int] = {v.name: 0 for v in variants}

    def search(v: SearchVariant) -> Callable[[int], Awaitable[list[int]]]:
        async def op(i: int) -> list[int]:
            found = await v.coll.search(q[i], k=10, nprobe=v.nprobe)
            if found.missing_shards:
                missing[v.name] += 1
            return [data.item_of(h.memory.key) for h in found]

        return op

    series = {v.name: b.series("search", v.name, v.cluster, search(v)) for v in variants}
    err.log(f"search: warm-up, then {args.rounds} rounds of {len(q):,} queries per variant")
    await take_turns(series, [range(min(50, len(q)))])
    for key in [k for k in b.ops if k.startswith("search/")]:  # the warm-up is not measured
        del b.cpu[key], b.ops[key]
    runs = await take_turns(series, [range(len(q))] * args.rounds)
    s = {name: Summary.of(r) for name, r in runs.items()}
    recall = {name: recall_at(r[0].results, b.truth, 10) for name, r in runs.items()}

    # What routing alone allows: the share of the exact top-10 in the probed shards.
    config = b.colls[VECTOR].config
    sharder = Sharder(config)
    home = np.asarray(sharder.place([()] * b.n, [""] * b.n, b.vectors, [None] * b.n))
    sizes = np.bincount(home, minlength=args.shards).tolist()
    local = {n for n, owner in b.owners[VECTOR].items() if owner == b.client_node[THREE]}
    bound: dict[int, float] = {}
    remote_share: dict[int, float] = {}
    for p in probes:
        inside, remote = 0, 0
        for i in range(len(q)):
            probed = set(sharder.search_shards((), None, q[i], p))
            inside += int(np.isin(home[b.truth[i, :10]], list(probed)).sum())
            remote += len(probed - local)
        bound[p] = inside / (10 * len(q))
        remote_share[p] = remote / (p * len(q))
    b.record(
        "search",
        s,
        {
            "recall_at_10": recall,
            "routing_bound": bound,
            "vector_shard_items": sizes,
            "searches_with_missing_shards": missing,
        },
    )
    for name, count in missing.items():
        if count:
            err.log(f"[red]{name}: {count} searches reported missing shards[/]")

    def rows(section: str, name: str, base: str, label: str, note: str) -> None:
        x, y = s[name], s[base]
        add(
            b.report,
            Row(
                f"{section}a",
                f"search k=10, {name}",
                x.rate,
                "q/s",
                label,
                y.rate,
                note=f"{args.concurrency} in flight; median of {args.rounds} rounds: {x.rounds}"
                f" (baseline {y.rounds}); {note}",
            ),
        )
        for letter, what, value, base_value in (
            ("b", "p50", x.p50_ms, y.p50_ms),
            ("c", "p99", x.p99_ms, y.p99_ms),
        ):
            add(
                b.report,
                Row(
                    f"{section}{letter}",
                    f"search latency {what}, {name}",
                    value,
                    "ms",
                    label,
                    base_value,
                ),
            )

    rows(
        "3",
        THREE,
        ONE,
        f"{ONE}, same client load",
        f"{b.n:,} items, {args.shards} shards, hash, every shard searched;"
        f" {THREE}: {b.cpu_note('search', THREE, THREE, 'query')};"
        f" {ONE}: {b.cpu_note('search', ONE, ONE, 'query')}",
    )
    add(
        b.report,
        Row(
            "3d",
            f"recall@10, {THREE}",
            recall[THREE],
            "recall",
            ONE,
            recall[ONE],
            note="ground truth: exact numpy over the same vectors; each cluster built its own"
            " graphs",
        ),
    )
    for section, p in enumerate(probes, start=5):
        name = f"vector nprobe={p}"
        rows(
            str(section),
            name,
            THREE,
            f"{THREE}, hash (all {args.shards} shards)",
            f"{p} of {args.shards} shards probed, {remote_share[p]:.0%} of them on another node"
            f" than the client's; vector shard sizes {sizes};"
            f" {b.cpu_note('search', name, THREE, 'query')}",
        )
        add(
            b.report,
            Row(
                f"{section}d",
                f"recall@10, {name}",
                recall[name],
                "recall",
                f"{THREE}, hash",
                recall[THREE],
                note=f"routing bound (share of the exact top-10 inside the probed shards):"
                f" {bound[p]:.3f}",
            ),
        )


# -- main ----------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about 1.5 min")
    p.add_argument("--n", type=int, default=None, help="items (default 100000; quick 20000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--queries", type=int, default=None, help="queries (default 1000; quick 500)")
    p.add_argument("--shards", type=int, default=6, help="shards of every collection")
    p.add_argument(
        "--nprobe", type=int, nargs="+", default=[1, 2], help="vector nprobe values (plus all)"
    )
    p.add_argument("--sample", type=int, default=None, help="k-means sample (10000; quick 4000)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--batch", type=int, default=500, help="put_many batch size")
    p.add_argument(
        "--single-n", type=int, default=None, help="single puts per variant (3000; quick 600)"
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the variants alternate")
    p.add_argument("--dir", type=Path, default=None, help="scratch root (default: a /tmp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 20_000 if args.quick else 100_000
    if args.queries is None:
        args.queries = 500 if args.quick else 1000
    if args.sample is None:
        args.sample = min(args.n, 4000 if args.quick else 10_000)
    if args.single_n is None:
        args.single_n = 600 if args.quick else 3000
    if args.n < args.rounds * args.batch or args.shards < 2 or args.sample < args.shards:
        p.error("need --n >= rounds x batch, --shards >= 2 and --sample >= --shards")
    return args


async def run(args: argparse.Namespace) -> Report:
    cfg = memcluster.Config()
    report = Report(
        machine=machine(),
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {
            "hnsw_m": cfg.hnsw_m,
            "hnsw_ef_construction": cfg.hnsw_ef_construction,
            "hnsw_ef_search": cfg.hnsw_ef_search,
            "exact_items_max": cfg.exact_items_max,
            "durability": str(cfg.durability),
            "binary_pool": 4,
        },
    )
    m = report.machine
    err.print(
        f"[bold]machine[/]: {m['nproc']} cpus, {m['cpu']}, {m['memory_gib']} GiB,"
        f" memcluster {m['memcluster_commit']} (src {m['src_sha256']}), load {m['loadavg_start']}"
    )
    root = Path(tempfile.mkdtemp(prefix="memcluster-cluster-bench-", dir=args.dir))
    err.log(f"scratch dir {root}")
    start = time.perf_counter()
    t0 = time.perf_counter()
    vectors = data.vectors(max(SOURCE_N, args.n), args.dim, args.seed)[: args.n]
    queries = data.queries(args.queries, args.dim, args.seed)
    truth = data.exact_topk(vectors, queries, 10)
    meta = data.metadata(args.n, args.seed)
    err.log(
        f"data: {args.n:,} x {args.dim}, {len(queries)} queries,"
        f" truth in {time.perf_counter() - t0:.1f} s"
    )
    clusters: dict[str, ClusterProcess] = {}
    failed = True
    try:
        for label, nodes, name in ((ONE, 1, "bench1"), (THREE, 3, "bench3")):
            t0 = time.perf_counter()
            clusters[label] = ClusterProcess(label, nodes, root / name, name)
            c = clusters[label]
            err.log(
                f"cluster {label} up in {time.perf_counter() - t0:.1f} s: up pid {c.proc.pid},"
                f" nodes {c.node_pids}, etcd {c.etcd_url}"
            )
        report.details["pids"] = {
            label: {"up": c.proc.pid, "children": list(c.children)} for label, c in clusters.items()
        }
        report.machine["nodes_share_cpus"] = os.cpu_count()
        report.details["vector_config"] = await create_collections(args, clusters, vectors)
        b = await connect(args, report, vectors, queries, truth, meta, clusters)
        try:
            await phase_ingest(b)
            await phase_single_puts(b)
            await phase_search(b)
        finally:
            for client in b.clients.values():
                await client.close()
        report.details["rss_mib_end"] = {label: c.rss_mib() for label, c in clusters.items()}
        failed = False
    finally:
        for label, c in clusters.items():
            problems = c.log_problems()
            report.details.setdefault("log_problems", {})[label] = problems
            if problems:
                err.log(f"[red]cluster {label}: error lines in its logs: {problems}[/]")
            if failed:
                err.log(f"cluster {label} logs: {c.log_tail()}")
            code = c.stop()
            report.details.setdefault("up_exit_codes", {})[label] = code
            err.log(f"cluster {label} stopped with SIGTERM, exit code {code}")
        shutil.rmtree(root, ignore_errors=True)
    report.details["elapsed_s"] = round(time.perf_counter() - start, 1)
    report.machine["loadavg_end"] = loadavg()
    if src_fingerprint() != report.machine["src_sha256"]:
        report.machine["src_changed_during_run"] = True
        err.log("[red]src/ changed during the run: the figures may mix two versions[/]")
    return report


async def create_collections(
    args: argparse.Namespace, clusters: dict[str, ClusterProcess], vectors: data.Matrix
) -> dict[str, Any]:
    """The N-item and single-put collections on both clusters (through node n1), and the
    vector collection on B; returns what the vector config looks like."""
    for label, c in clusters.items():
        async with memcluster.AsyncClient(c.nodes["n1"], retries=0, timeout_s=120.0) as admin:
            for name in (BULK, SINGLE):
                await admin.create_collection(name, dim=args.dim, shards=args.shards)
            if label != THREE:
                continue
            rng = np.random.default_rng([args.seed, 7])
            sample = vectors[np.sort(rng.choice(len(vectors), args.sample, replace=False))]
            t0 = time.perf_counter()
            coll = await admin.create_collection(
                VECTOR_BULK, dim=args.dim, shards=args.shards, sharding="vector", sample=sample
            )
            kmeans_s = time.perf_counter() - t0
            err.log(f"vector collection: k-means over {args.sample:,} items in {kmeans_s:.1f} s")
            return {
                "sample": args.sample,
                "create_s": round(kmeans_s, 2),
                "nprobe_default": coll.config.nprobe,
            }
    raise AssertionError("no 3-node cluster")


async def connect(
    args: argparse.Namespace,
    report: Report,
    vectors: data.Matrix,
    queries: data.Matrix,
    truth: data.Ints,
    meta: data.Metadata,
    clusters: dict[str, ClusterProcess],
) -> Bench:
    """One client per cluster, on the node holding the fewest shards of the N-item hash
    collection (ties: the lowest id)."""
    owners = {
        ONE: await shard_owners(clusters[ONE], "bench1", BULK),
        THREE: await shard_owners(clusters[THREE], "bench3", BULK),
        VECTOR: await shard_owners(clusters[THREE], "bench3", VECTOR_BULK),
    }
    client_node: dict[str, str] = {}
    clients: dict[str, memcluster.AsyncClient] = {}
    for label, c in clusters.items():
        held = {node: sum(1 for o in owners[label].values() if o == node) for node in c.nodes}
        client_node[label] = min(held, key=lambda node: (held[node], node))
        clients[label] = memcluster.AsyncClient(
            c.nodes[client_node[label]], retries=0, timeout_s=120.0
        )
        err.log(
            f"cluster {label}: shards per node {held}; the client talks to {client_node[label]}"
        )
    report.details["shard_owners"] = owners
    report.details["client_node"] = client_node
    b = Bench(args, report, vectors, queries, truth, meta, clusters, clients, client_node, owners)
    b.colls = {
        ONE: await clients[ONE].collection(BULK),
        THREE: await clients[THREE].collection(BULK),
        VECTOR: await clients[THREE].collection(VECTOR_BULK),
    }
    return b


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    single_threaded_blas()
    report = uvloop.run(run(args))
    out = Console() if sys.stdout.isatty() else Console(width=200)
    m, p, d = report.machine, report.params, report.details
    out.print(machine_line(m), highlight=False)
    held = {
        label: {
            node: sum(1 for o in d["shard_owners"][label].values() if o == node)
            for node in sorted(set(d["shard_owners"][label].values()))
        }
        for label in d["shard_owners"]
    }
    out.print(
        f"data: first {p['n']:,} of bench.data's {SOURCE_N:,} x {p['dim']} clustered unit"
        f" vectors (seed {p['seed']}), cosine; {p['queries']} queries; clusters: memcluster up"
        f" with 1 node and with 3 nodes (each with its own etcd), all on this machine's"
        f" {m['nproc']} cpus together with the client, so 3 nodes add no CPU: the ratios are"
        f" the cost of distribution, not scale-out; collections: {p['shards']} shards, one"
        f" replica each, durability {p['durability']}, M={p['hnsw_m']},"
        f" ef_construction={p['hnsw_ef_construction']}, ef={p['hnsw_ef_search']}, shards of at"
        f" most {p['exact_items_max']:,} items scanned exactly; shards per node: {held};"
        f" the client talks to {d['client_node']}; vector centroids: k-means over"
        f" {p['sample']:,} items; load generator: this process, uvloop, {p['concurrency']}"
        f" requests in flight over mc:// (4 multiplexed connections); rates = median of"
        f" {p['rounds']} alternating rounds; total {d.get('elapsed_s', 0):.0f} s",
        highlight=False,
    )
    out.print(render(report))
    out.print(
        "  ratio = memcluster / baseline: for 1-3 the 3-node cluster over the 1-node one (the"
        " cost of routing and scatter-gather on the same cores), for 4-7 vector sharding over"
        " hash sharding on the 3 nodes. Latencies: higher ratio = slower.",
        highlight=False,
    )
    for row in ordered(report.rows):
        if row.note:
            out.print(f"  {row.id}: {row.note}", highlight=False)
    problems = {k: v for k, v in d.get("log_problems", {}).items() if v}
    out.print(
        f"  node logs: {'error lines ' + str(problems) if problems else 'no error lines'};"
        f" up exit codes {d.get('up_exit_codes')}",
        highlight=False,
    )
    if args.json is not None:
        write_json(report, args.json)
        out.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
