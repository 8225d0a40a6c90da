"""Benchmark of the agent layer (DESIGN.md §9): locks and the change feed, each memcluster
figure beside etcd's, measured on the same machine in the same run.

Run ``make bench`` (after the server benchmark; ``make etcd`` installs etcd) or
``.venv/bin/python -m bench.agents [--quick] [--seconds S] [--clients C] [--puts N]
[--rate R]``. It prints the machine, one table (measure / memcluster / etcd / ratio) and
per-row notes, and writes the same rows as JSON to ``bench/out/agents.json``
(``agents-quick.json`` with ``--quick``).

Setup
-----

* memcluster is a real ``memcluster serve`` child process (:class:`bench.server.ServerProcess`:
  loopback, ports the OS picks, a fresh data directory, default durability: fsync before the
  ack).
* etcd is a real ``etcd`` child process (:class:`EtcdProcess`: Debian's ``etcd-server``, one
  member, client and peer URLs on loopback ports chosen free, a fresh ``--data-dir``, default
  durability: its WAL is fsynced before the ack too). Its Python client is aetcd (asyncio
  gRPC), DESIGN.md §10's choice.
* Both are stopped with SIGTERM to their own PID at the end; the directories are deleted.
* The load generator is this process: one uvloop event loop for memcluster's ``AsyncClient``
  and aetcd alike. Every client below is a client object of its own with one connection
  (memcluster ``pool=1``, one gRPC channel per aetcd client), and memcluster's retries are off
  (``retries=0``), so an error stops the run instead of hiding in the figures.
* The no-network baseline (rows 1c, 2g-2i) is the embedded engine (``memcluster.open()``) in
  this same process, driven by threads.

What runs, in order (default sizes: about 2.5 minutes on 2 cores; ``--quick``: about 40 s):

1. Lock acquire+release pairs per second, 1 client: a loop of ``acquire_lock(name,
   ttl_s=10)`` + ``release_lock(name, token)`` for ``--seconds`` per round; over the binary
   protocol (``mc://``), over HTTP, embedded; etcd: aetcd's ``client.lock(name, ttl=10)``
   with ``acquire()`` + ``release()``. The note gives each side's CPU per pair.
2. The same with ``--clients`` contending clients (16 asyncio tasks, each with its own
   client, on one lock name; embedded: 16 threads on one database): total pairs per second,
   and p50/p99 of the acquire wait (from the call to the grant).
3. Change-feed latency: a subscriber (memcluster ``coll.subscribe()`` over ``mc://`` and
   over HTTP server-sent events, on a collection of dim 8; etcd: ``watch_prefix``) and a
   writer (a client of its own, same protocol) issuing ``--puts`` puts at a steady ``--rate``
   per second (open loop: each put is issued on schedule, at most 64 in flight, so a slow
   ack does not slow the schedule). Latency is the time the subscriber's loop receives the
   event minus the time just before the writer issued that put (same process,
   ``time.perf_counter``; events are matched by key). The subscription is proven live by a
   warm-up put before the clock starts.

Every figure is the median of ``--rounds`` rounds in which the variants (binary, HTTP,
embedded where it applies, etcd) take turns, each round starting with a different one
(:func:`bench.server.take_turns`), so a burst of foreign load on a shared machine does not land
on one variant only. Latency percentiles pool every round.

What the two lock recipes do (read this before the ratio): memcluster's acquire is one
fsynced record (the implicit lease and the grant) and its release another; waiters queue
FIFO on the server, which hands the lock to the next one in the release's record. aetcd's
lock is the classic client-side recipe: ``acquire`` grants a lease (a raft write, fsynced)
and tries a transaction that creates the key (another); on failure it watches for the key's
deletion and tries again (a new lease each try, not revoked); ``release`` is a transaction
that deletes the key. So an uncontended etcd pair is three fsynced writes, and under
contention every release wakes every waiter (a thundering herd, not FIFO).

What the two feeds deliver: memcluster's change feed carries a write as soon as it is
applied, before its fsync ("visible before durable, acknowledged after",
``docs/design/storage-engine.md``), so its delivery can precede the writer's ack; etcd's
watch carries a write once raft has committed it, after the fsync. Rows 3a-3d note each
side's put ack latency beside its delivery latency.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import aetcd  # type: ignore[import-untyped]
import msgspec
import numpy as np
import uvloop
from rich.console import Console
from rich.table import Table

import memcluster
from bench import data
from bench.engine import Report, Row, _fmt_ratio, ordered, write_json
from bench.server import (
    Meter,
    Run,
    ServerProcess,
    Summary,
    fmt,
    loadavg,
    machine,
    machine_line,
    process_cpu_s,
    src_fingerprint,
    take_turns,
)
from memcluster.cli.main import single_threaded_blas

LOCK_TTL_S = 10
"""TTL of every lock (an int: aetcd's leases take whole seconds)."""
LOCK_WAIT_S = 120
"""Longest an acquire may wait: far above any round, so a timeout means a fault."""
FEED_DIM = 8
FEED_NAMESPACE = "feed"
FEED_IN_FLIGHT_MAX = 64
"""Puts of the change-feed writer in flight at once."""
FEED_DRAIN_S = 30.0
"""After the last put, how long the subscriber may take to see every event."""
START_TIMEOUT_S = 30.0
LOCK_VARIANTS = ("binary", "http", "embedded", "etcd")
FEED_VARIANTS = ("binary", "http", "etcd")
LABEL = {
    "binary": "binary (mc://)",
    "http": "HTTP",
    "embedded": "embedded (no network)",
    "etcd": "etcd",
}

err = Console(stderr=True)


# -- etcd ----------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago (the OS picked them)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def etcd_version(binary: str) -> str:
    """``3.4.23`` from ``etcd --version`` ("?" if it cannot be read)."""
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "?"


class EtcdProcess:
    """One etcd member in a child process, client and peer URLs on loopback ports chosen free.

    Ready once its log says it serves client requests. Its output goes to ``log`` (a file, so
    it cannot block on a full pipe). The free ports may be taken between the choice and
    etcd's bind: then it is started again on others, up to 3 times. :meth:`stop` signals this
    child's PID only.
    """

    def __init__(self, data_dir: Path, log: Path, start_timeout_s: float = START_TIMEOUT_S):
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is not on PATH: run `make etcd` (Debian's etcd-server)")
        self.binary = binary
        self.version = etcd_version(binary)
        self.log = log
        for attempt in range(3):
            shutil.rmtree(data_dir, ignore_errors=True)
            self.client_port, peer_port = free_ports(2)
            client_url = f"http://127.0.0.1:{self.client_port}"
            peer_url = f"http://127.0.0.1:{peer_port}"
            self._log: TextIO = log.open("w")
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--name",
                    "bench",
                    "--data-dir",
                    str(data_dir),
                    "--listen-client-urls",
                    client_url,
                    "--advertise-client-urls",
                    client_url,
                    "--listen-peer-urls",
                    peer_url,
                    "--initial-advertise-peer-urls",
                    peer_url,
                    "--initial-cluster",
                    f"bench={peer_url}",
                    "--initial-cluster-state",
                    "new",
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            if self._wait_ready(start_timeout_s):
                return
            self.stop(5.0)
            tail = log.read_text()[-2000:]
            if "address already in use" not in tail or attempt == 2:
                raise RuntimeError(f"etcd did not start: {tail}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "ready to serve client requests" in self.log.read_text(errors="replace"):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)

    def client(self) -> Any:
        """A new aetcd client of this member (one gRPC channel); connect before use."""
        return aetcd.Client("127.0.0.1", self.client_port)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait, return the exit code; SIGKILL if still running after ``timeout_s``."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            code = self.proc.wait(30)
        self._log.close()
        return code


# -- lock contenders -------------------------------------------------------------------------


class Contender(Protocol):
    """One client taking and giving back one lock, one pair at a time."""

    async def pair(self) -> float:
        """Acquire, then release; returns the acquire's wait in seconds (call to grant)."""
        ...

    async def close(self) -> None: ...


class McContender:
    """A memcluster ``AsyncClient`` of its own, one connection."""

    def __init__(self, url: str, name: str) -> None:
        self.client = memcluster.AsyncClient(url, retries=0, pool=1, timeout_s=60.0)
        self.name = name

    async def pair(self) -> float:
        t0 = time.perf_counter()
        token = await self.client.acquire_lock(self.name, ttl_s=LOCK_TTL_S, timeout_s=LOCK_WAIT_S)
        waited = time.perf_counter() - t0
        await self.client.release_lock(self.name, token)
        return waited

    async def close(self) -> None:
        await self.client.close()


class EtcdContender:
    """An aetcd client of its own (one gRPC channel) and its ``Lock`` object."""

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.lock = client.lock(f"bench/lock/{name}".encode(), ttl=LOCK_TTL_S)

    @classmethod
    async def open(cls, etcd: EtcdProcess, name: str) -> EtcdContender:
        client = etcd.client()
        await client.connect()
        return cls(client, name)

    async def pair(self) -> float:
        t0 = time.perf_counter()
        if not await self.lock.acquire(timeout=LOCK_WAIT_S):
            raise RuntimeError(f"etcd lock: not acquired within {LOCK_WAIT_S} s")
        waited = time.perf_counter() - t0
        if not await self.lock.release():
            raise RuntimeError("etcd lock: release found the key held by another")
        return waited

    async def close(self) -> None:
        await self.client.close()


async def lock_tasks(contenders: Sequence[Contender], seconds: float, meter: Meter) -> Run:
    """Every contender loops pairs until ``seconds`` have passed (a pair begun in time is
    finished and counted); the run lasts until the last one stops. The Run's ``latencies_s``
    are the acquire waits, its ``results`` the pairs each contender made (fairness)."""
    waits: list[float] = []
    pairs = [0] * len(contenders)
    cpu0 = meter()
    start = time.perf_counter()
    deadline = start + seconds

    async def loop(i: int, c: Contender) -> None:
        while time.perf_counter() < deadline:
            waits.append(await c.pair())
            pairs[i] += 1

    try:
        async with asyncio.TaskGroup() as tasks:
            for i, c in enumerate(contenders):
                tasks.create_task(loop(i, c))
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    elapsed = time.perf_counter() - start
    cpu1 = meter()
    return Run(elapsed, waits, pairs, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])


def lock_threads(db: memcluster.Database, name: str, threads: int, seconds: float) -> Run:
    """:func:`lock_tasks` for the embedded database: ``threads`` threads, one loop each."""
    waits: list[float] = []
    pairs = [0] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)
    deadline = 0.0

    def loop(i: int) -> None:
        barrier.wait()
        try:
            while time.perf_counter() < deadline and not errors:
                t0 = time.perf_counter()
                token = db.acquire_lock(name, ttl_s=LOCK_TTL_S, timeout_s=LOCK_WAIT_S)
                waits.append(time.perf_counter() - t0)
                db.release_lock(name, token)
                pairs[i] += 1
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds
    barrier.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return Run(elapsed, waits, pairs, time.process_time() - cpu0, 0.0)


# -- change-feed sides -----------------------------------------------------------------------


class FeedSide(Protocol):
    """A writer and a subscriber of one system, each a client of its own."""

    async def subscribe(self, prefix: str) -> AsyncGenerator[str, None]:
        """Start a subscription to everything written under ``prefix`` from now on; returns
        the keys of the events as they arrive (live once this returns, or once a first
        event arrives)."""
        ...

    async def put(self, prefix: str, key: str) -> None: ...

    async def close(self) -> None: ...


def feed_value(key: str) -> tuple[str, list[float]]:
    """The text and vector written at ``key``: small, like a short agent note."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    vector = rng.standard_normal(FEED_DIM).astype(np.float32)
    return f"observation {key}", [float(x) for x in vector / np.linalg.norm(vector)]


class McFeed:
    """memcluster: ``coll.subscribe(namespace=(feed, prefix), cursor=feed_cursor())`` and
    ``coll.put``, both over ``url``'s protocol."""

    def __init__(self, url: str, collection: str) -> None:
        self.writer = memcluster.AsyncClient(url, retries=0, pool=1)
        self.reader = memcluster.AsyncClient(url, retries=0, pool=1)
        self.collection = collection
        self._w: memcluster.AsyncCollection | None = None
        self._r: memcluster.AsyncCollection | None = None

    async def _colls(self) -> tuple[memcluster.AsyncCollection, memcluster.AsyncCollection]:
        if self._w is None or self._r is None:
            self._w = await self.writer.collection(self.collection)
            self._r = await self.reader.collection(self.collection)
        return self._w, self._r

    async def subscribe(self, prefix: str) -> AsyncGenerator[str, None]:
        _, coll = await self._colls()
        cursor = await coll.feed_cursor()
        events = coll.subscribe(namespace=(FEED_NAMESPACE, prefix), cursor=cursor)

        async def keys() -> AsyncGenerator[str, None]:
            assert isinstance(events, AsyncGenerator)
            try:
                async for event in events:
                    yield event.key
            finally:
                await events.aclose()

        return keys()

    async def put(self, prefix: str, key: str) -> None:
        coll, _ = await self._colls()
        text, vector = feed_value(key)
        await coll.put((FEED_NAMESPACE, prefix), key, text=text, vector=vector)

    async def close(self) -> None:
        await self.writer.close()
        await self.reader.close()


class EtcdFeed:
    """etcd: ``watch_prefix(feed/prefix/)`` on one aetcd client, ``put`` on another; the value
    is the JSON of the same text and vector as memcluster's."""

    def __init__(self, etcd: EtcdProcess) -> None:
        self.writer = etcd.client()
        self.reader = etcd.client()

    async def subscribe(self, prefix: str) -> AsyncGenerator[str, None]:
        await self.reader.connect()
        start = f"{FEED_NAMESPACE}/{prefix}/".encode()
        watch = await self.reader.watch_prefix(start)

        async def keys() -> AsyncGenerator[str, None]:
            try:
                async for event in watch:
                    yield event.kv.key[len(start) :].decode()
            finally:
                await watch.cancel()

        return keys()

    async def put(self, prefix: str, key: str) -> None:
        text, vector = feed_value(key)
        value = msgspec.json.encode({"text": text, "vector": vector})
        await self.writer.put(f"{FEED_NAMESPACE}/{prefix}/{key}".encode(), value)

    async def close(self) -> None:
        await self.writer.close()
        await self.reader.close()


async def feed_round(side: FeedSide, prefix: str, puts: int, rate: float, meter: Meter) -> Run:
    """One round of the change-feed measure. In the Run: ``latencies_s`` are the deliveries
    (receipt minus issue) of the events received, ``results`` the writer's ack latencies,
    ``elapsed_s`` the writer's span; events never received are ``puts - ops``."""
    keys = [f"k{i:05d}" for i in range(puts)]
    warm = "warm-up"
    sent: dict[str, float] = {}
    received: dict[str, float] = {}
    acks: list[float] = []
    warm_seen = asyncio.Event()
    stream = await side.subscribe(prefix)

    async def consume() -> None:
        try:
            async for key in stream:
                now = time.perf_counter()
                if key == warm:
                    warm_seen.set()
                elif key in sent:
                    received.setdefault(key, now)
                    if len(received) == puts:
                        return
        finally:
            await stream.aclose()

    in_flight = asyncio.Semaphore(FEED_IN_FLIGHT_MAX)

    async def put(key: str) -> None:
        try:
            t0 = time.perf_counter()
            sent[key] = t0
            await side.put(prefix, key)
            acks.append(time.perf_counter() - t0)
        finally:
            in_flight.release()

    async with asyncio.TaskGroup() as tasks:
        consumer = tasks.create_task(consume())
        await side.put(prefix, warm)
        try:
            await asyncio.wait_for(warm_seen.wait(), START_TIMEOUT_S)
        except TimeoutError:
            consumer.cancel()
            raise RuntimeError(f"feed {prefix}: the warm-up event never arrived") from None
        cpu0 = meter()
        start = time.perf_counter()
        async with asyncio.TaskGroup() as writers:
            for i, key in enumerate(keys):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await in_flight.acquire()
                writers.create_task(put(key))
        elapsed = time.perf_counter() - start
        try:
            await asyncio.wait_for(asyncio.shield(consumer), FEED_DRAIN_S)
        except TimeoutError:
            consumer.cancel()
        cpu1 = meter()
    deliveries = [received[k] - sent[k] for k in keys if k in received]
    return Run(elapsed, deliveries, acks, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])


# -- the phases ----------------------------------------------------------------------------


@dataclass
class Bench:
    """What every phase needs: settings, the report and the systems under test."""

    args: argparse.Namespace
    report: Report
    server: ServerProcess
    etcd: EtcdProcess
    db: memcluster.Database

    def meter(self, variant: str) -> Meter:
        """CPU seconds so far: (this process, the server that ``variant`` talks to)."""
        if variant == "etcd":
            return lambda: (time.process_time(), self.etcd.cpu_s())
        if variant == "embedded":
            return lambda: (time.process_time(), 0.0)
        return lambda: (time.process_time(), self.server.cpu_s())

    def url(self, variant: str) -> str:
        return self.server.mc_url if variant == "binary" else self.server.http_url

    async def contenders(self, variant: str, count: int, name: str) -> list[Contender]:
        if variant == "etcd":
            return list(
                await asyncio.gather(*(EtcdContender.open(self.etcd, name) for _ in range(count)))
            )
        return [McContender(self.url(variant), name) for _ in range(count)]


def etcd_label(b: Bench, what: str) -> str:
    return f"etcd {b.etcd.version}, {what}"


def add(report: Report, row: Row) -> None:
    report.rows.append(row)
    err.log(
        f"[bold]{row.id}[/] {row.measure}: {fmt(row.value, row.unit)}"
        f" (etcd: {fmt(row.baseline_value, row.unit)})"
    )


Fairness = dict[str, tuple[int, int]]
"""Per variant: the fewest and the most pairs one contender made, over all rounds."""


async def lock_phase(b: Bench, clients: int) -> tuple[dict[str, Summary], Fairness]:
    """Pairs of every variant with ``clients`` contenders each, rounds taking turns."""
    args = b.args
    name = f"bench-{clients}"
    contenders = {v: await b.contenders(v, clients, name) for v in LOCK_VARIANTS if v != "embedded"}
    try:
        # One pair per contender first: connections open, code paths warm.
        for cs in contenders.values():
            for c in cs:
                await c.pair()
        token = await asyncio.to_thread(b.db.acquire_lock, name, LOCK_TTL_S, LOCK_WAIT_S)
        await asyncio.to_thread(b.db.release_lock, name, token)

        def series(variant: str) -> Callable[[Sequence[int]], Awaitable[Run]]:
            async def run(_: Sequence[int]) -> Run:
                if variant == "embedded":
                    return await asyncio.to_thread(lock_threads, b.db, name, clients, args.seconds)
                return await lock_tasks(contenders[variant], args.seconds, b.meter(variant))

            return run

        err.log(f"locks, {clients} client(s): {args.rounds} rounds of {args.seconds} s each")
        runs = await take_turns(
            {v: series(v) for v in LOCK_VARIANTS}, [range(r, r + 1) for r in range(args.rounds)]
        )
    finally:
        for cs in contenders.values():
            for c in cs:
                await c.close()
    summaries = {v: Summary.of(r) for v, r in runs.items()}
    per_client = {
        v: [sum(c) for c in zip(*(r.results for r in rs), strict=True)] for v, rs in runs.items()
    }
    fairness = {v: (min(counts), max(counts)) for v, counts in per_client.items()}
    b.report.details[f"locks_{clients}"] = {
        v: asdict(s) | {"pairs_per_client": per_client[v]} for v, s in summaries.items()
    }
    return summaries, fairness


def pair_note(s: dict[str, Summary], variant: str, rounds: int) -> str:
    x, e = s[variant], s["etcd"]
    note = (
        f"median of {rounds} rounds: {x.rounds} (etcd {e.rounds}) pairs/s;"
        f" {x.cpu_note(variant, 'pair')}; {e.cpu_note('etcd', 'pair')}"
    )
    if variant != "embedded":
        note += f"; {x.rate / s['embedded'].rate:.0%} of embedded's rate"
    return note


async def phase_lock_single(b: Bench) -> None:
    """Rows 1a-1c: one client, pairs per second."""
    s, _ = await lock_phase(b, 1)
    e = s["etcd"]
    for rid, variant in (("1a", "binary"), ("1b", "http"), ("1c", "embedded")):
        x = s[variant]
        add(
            b.report,
            Row(
                rid,
                f"lock acquire+release, 1 client, {LABEL[variant]}",
                x.rate,
                "pairs/s",
                etcd_label(b, "aetcd lock, 1 client"),
                e.rate,
                note=pair_note(s, variant, b.args.rounds)
                + f"; pair's acquire p50 {x.p50_ms:.2f} ms (etcd {e.p50_ms:.2f} ms)",
            ),
        )


async def phase_lock_contended(b: Bench) -> None:
    """Rows 2a-2i: ``--clients`` contending clients on one lock name."""
    clients = b.args.clients
    s, fair = await lock_phase(b, clients)
    e = s["etcd"]
    lo, hi = fair["etcd"]
    base = etcd_label(b, f"aetcd lock, {clients} clients")
    for ids, variant in (("abc", "binary"), ("def", "http"), ("ghi", "embedded")):
        x = s[variant]
        who = f"{clients} threads" if variant == "embedded" else f"{clients} clients"
        add(
            b.report,
            Row(
                f"2{ids[0]}",
                f"lock pairs, {who} contending, {LABEL[variant]}",
                x.rate,
                "pairs/s",
                base,
                e.rate,
                note=pair_note(s, variant, b.args.rounds)
                + f"; pairs per client over all rounds: {fair[variant][0]:,} to"
                f" {fair[variant][1]:,} (etcd {lo:,} to {hi:,})",
            ),
        )
        for letter, what, value, base_value in (
            (ids[1], "p50", x.p50_ms, e.p50_ms),
            (ids[2], "p99", x.p99_ms, e.p99_ms),
        ):
            add(
                b.report,
                Row(
                    f"2{letter}",
                    f"acquire wait {what}, {who}, {LABEL[variant]}",
                    value,
                    "ms",
                    base,
                    base_value,
                    note="FIFO: a waiter waits for every one queued ahead of it, while"
                    " aetcd's releaser often takes the lock again at once (see the pairs per"
                    " client): short waits for some, long ones for the others"
                    if what == "p50" and variant == "binary"
                    else "",
                ),
            )


async def phase_feed(b: Bench) -> None:
    """Rows 3a-3d: change feed, write to delivery."""
    args = b.args
    async with memcluster.AsyncClient(b.server.mc_url, retries=0) as admin:
        await admin.create_collection("feed", dim=FEED_DIM)
    sides: dict[str, FeedSide] = {
        "binary": McFeed(b.server.mc_url, "feed"),
        "http": McFeed(b.server.http_url, "feed"),
        "etcd": EtcdFeed(b.etcd),
    }
    try:

        def series(variant: str) -> Callable[[Sequence[int]], Awaitable[Run]]:
            async def run(chunk: Sequence[int]) -> Run:
                prefix = f"{variant}-r{chunk[0]}"
                return await feed_round(
                    sides[variant], prefix, args.puts, args.rate, b.meter(variant)
                )

            return run

        err.log(
            f"change feed: {args.rounds} rounds of {args.puts:,} puts at {args.rate:g}/s"
            " per variant"
        )
        runs = await take_turns(
            {v: series(v) for v in FEED_VARIANTS}, [range(r, r + 1) for r in range(args.rounds)]
        )
    finally:
        for side in sides.values():
            await side.close()
    s = {v: Summary.of(r) for v, r in runs.items()}
    missing = {v: args.puts * args.rounds - sum(r.ops for r in rs) for v, rs in runs.items()}
    acks = {
        v: np.percentile(np.array([a for r in rs for a in r.results]), [50, 99]) * 1000
        for v, rs in runs.items()
    }
    issued = {v: [round(args.puts / r.elapsed_s, 1) for r in rs] for v, rs in runs.items()}
    b.report.details["feed"] = {
        v: asdict(s[v])
        | {
            "missing_events": missing[v],
            "ack_p50_ms": float(acks[v][0]),
            "ack_p99_ms": float(acks[v][1]),
            "issued_per_s": issued[v],
        }
        for v in FEED_VARIANTS
    }
    e = s["etcd"]
    base = etcd_label(b, "watch_prefix + put")
    for ids, variant in (("ab", "binary"), ("cd", "http")):
        x = s[variant]
        label = "binary (mc://)" if variant == "binary" else "HTTP (SSE)"
        for letter, what, value, base_value in (
            (ids[0], "p50", x.p50_ms, e.p50_ms),
            (ids[1], "p99", x.p99_ms, e.p99_ms),
        ):
            note = ""
            if what == "p50":
                note = (
                    f"{args.puts:,} puts/round at {args.rate:g}/s (issued at {issued[variant]}/s,"
                    f" etcd {issued['etcd']}/s), pooled over {args.rounds} rounds; writer's"
                    f" put ack p50/p99 {acks[variant][0]:.2f}/{acks[variant][1]:.2f} ms"
                    f" (etcd {acks['etcd'][0]:.2f}/{acks['etcd'][1]:.2f} ms); events missing:"
                    f" {missing[variant]} (etcd {missing['etcd']})"
                )
            else:
                note = (
                    f"{x.cpu_note(variant, 'event')}; {e.cpu_note('etcd', 'event')}"
                    " (writer and subscriber together)"
                )
            add(
                b.report,
                Row(
                    f"3{letter}",
                    f"change feed write→delivery {what}, {label}",
                    value,
                    "ms",
                    base,
                    base_value,
                    note=note,
                ),
            )


# -- output --------------------------------------------------------------------------------


def verdict(row: Row) -> str:
    """Which side wins and by how much: higher is better for rates, lower for latencies."""
    if row.ratio is None:
        return "-"
    better = 1 / row.ratio if row.unit == "ms" else row.ratio
    if better >= 1:
        return f"{_fmt_ratio(better)} better"
    return f"[red]{_fmt_ratio(1 / better)} worse[/]"


def render(report: Report) -> Table:
    table = Table(title="memcluster agent layer vs etcd (same machine, same run)")
    for name, justify in (
        ("#", "left"),
        ("measure", "left"),
        ("memcluster", "right"),
        ("etcd (same run)", "right"),
        ("ratio", "right"),
        ("memcluster is", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in ordered(report.rows):
        table.add_row(
            row.id,
            row.measure,
            fmt(row.value, row.unit),
            fmt(row.baseline_value, row.unit),
            _fmt_ratio(row.ratio),
            verdict(row),
        )
    return table


# -- main ----------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.agents", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short rounds: a smoke run of about 40 s")
    p.add_argument(
        "--seconds", type=float, default=None, help="seconds per lock round (3; quick 1)"
    )
    p.add_argument("--clients", type=int, default=16, help="contending lock clients")
    p.add_argument("--puts", type=int, default=None, help="feed puts per round (1000; quick 200)")
    p.add_argument("--rate", type=float, default=200.0, help="feed puts per second")
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the variants alternate")
    p.add_argument("--dir", type=Path, default=None, help="scratch root (default: a /tmp dir)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file (agents.json; quick: agents-quick.json)"
    )
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 3.0
    if args.puts is None:
        args.puts = 200 if args.quick else 1000
    if args.out is None:
        args.out = data.OUT / ("agents-quick.json" if args.quick else "agents.json")
    if args.clients < 2 or args.puts < 1 or args.rate <= 0 or args.rounds < 1:
        p.error("need --clients >= 2, --puts >= 1, --rate > 0 and --rounds >= 1")
    return args


async def run(args: argparse.Namespace) -> Report:
    cfg = memcluster.Config()
    report = Report(
        machine=machine(),
        params={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {
            "durability": str(cfg.durability),
            "lock_ttl_s": LOCK_TTL_S,
            "feed_dim": FEED_DIM,
            "feed_in_flight_max": FEED_IN_FLIGHT_MAX,
        },
    )
    m = report.machine
    m["aetcd"] = importlib.metadata.version("aetcd")
    m["grpcio"] = importlib.metadata.version("grpcio")
    err.print(
        f"[bold]machine[/]: {m['nproc']} cpus, {m['cpu']}, Python {m['python']},"
        f" memcluster {m['memcluster_commit']} (src {m['src_sha256']}),"
        f" load {m['loadavg_start']}"
    )
    root = Path(tempfile.mkdtemp(prefix="memcluster-agents-bench-", dir=args.dir))
    err.log(f"scratch dir {root}")
    start = time.perf_counter()
    try:
        etcd = EtcdProcess(root / "etcd", root / "etcd.log")
        m["etcd"] = etcd.version
        report.details["etcd_pid"] = etcd.pid
        err.log(f"etcd {etcd.version} pid {etcd.pid}: 127.0.0.1:{etcd.client_port}")
        try:
            server = ServerProcess(root / "server", root / "server.log")
            report.details["server_pid"] = server.pid
            err.log(f"server pid {server.pid}: {server.http_url} {server.mc_url}")
            try:
                db = memcluster.open(root / "embedded")
                try:
                    b = Bench(args, report, server, etcd, db)
                    await phase_lock_single(b)
                    await phase_lock_contended(b)
                    await phase_feed(b)
                finally:
                    db.close()
            finally:
                code = server.stop()
                report.details["server_exit_code"] = code
                err.log(f"server stopped with SIGTERM, exit code {code}")
        finally:
            code = etcd.stop()
            report.details["etcd_exit_code"] = code
            err.log(f"etcd stopped with SIGTERM, exit code {code}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report.details["elapsed_s"] = round(time.perf_counter() - start, 1)
    m["loadavg_end"] = loadavg()
    if src_fingerprint() != m["src_sha256"]:
        m["src_changed_during_run"] = True
        err.log("[red]src/ changed during the run: the figures may mix two versions[/]")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    single_threaded_blas()
    report = uvloop.run(run(args))
    out = Console() if sys.stdout.isatty() else Console(width=200)
    m, p = report.machine, report.params
    out.print(machine_line(m), highlight=False)
    out.print(
        f"systems: memcluster serve (durability {p['durability']}) and etcd {m['etcd']} (one"
        f" member, default fsync), each a child process on loopback; clients: memcluster"
        f" AsyncClient and aetcd {m['aetcd']} (grpcio {m['grpcio']}) on one uvloop loop in"
        f" this process, each lock client with one connection; locks: ttl {p['lock_ttl_s']} s,"
        f" {p['seconds']:g} s rounds, 1 and {p['clients']} clients; feed: {p['puts']:,} puts"
        f" per round at {p['rate']:g}/s, dim {p['feed_dim']}; every figure beside etcd's,"
        f" median of {p['rounds']} alternating rounds (latencies pooled); total"
        f" {report.details.get('elapsed_s', 0):.0f} s",
        highlight=False,
    )
    out.print(render(report))
    out.print(
        "  ratio = memcluster / etcd; 'better' reads higher for pairs/s, lower for ms."
        " etcd's lock is aetcd's client-side recipe: 3 fsynced writes per uncontended pair"
        " (lease grant, create txn, delete txn), and a release wakes every waiter; memcluster's"
        " is 2 (grant, release) with a FIFO queue on the server. Change feed: memcluster"
        " delivers a write once applied, before its fsync (docs/design/storage-engine.md,"
        " 'visible before durable, acknowledged after'); etcd's watch sees a write only once"
        " committed, after its fsync: compare each delivery with its own side's put ack.",
        highlight=False,
    )
    for row in ordered(report.rows):
        if row.note:
            out.print(f"  {row.id}: {row.note}", highlight=False)
    write_json(report, args.out)
    out.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
