"""Benchmark of the server over HTTP and the binary protocol, each figure beside the embedded
engine measured in the same run.

Run ``make bench`` (after the engine benchmark) or ``.venv/bin/python -m bench.server [--quick]
[--n N] [--dim D] [--queries Q] [--concurrency C]``. It prints the machine, one table and
per-row notes, and writes the same rows as JSON to ``bench/out/server.json``
(``server-quick.json`` with ``--quick``).

Setup
-----

* The server is a real ``memcluster serve`` child process (``python -m memcluster.cli.main
  serve --http-port 0 --peer-port 0 --quiet``) over a fresh data directory under ``/tmp``,
  with the default durability: fsync before the ack. It is stopped with SIGTERM (its PID
  only) at the end, and the directories are deleted.
* The load generator is this process: one uvloop event loop running ``--concurrency`` tasks,
  each with one request in flight, through ``memcluster.AsyncClient``. Over ``mc://`` the
  client keeps its default pool of 4 multiplexed connections; over ``http://`` it gets
  ``--concurrency`` keep-alive connections, so no task waits for a connection. Retries are
  off (``retries=0``), so an error stops the run instead of hiding in the figures.
* The baseline is the embedded engine (``memcluster.open()``) in this same process, on the
  same data, with the same batches, driven by ``--concurrency`` threads instead of tasks.
  The ratio protocol / embedded is the protocol's cost: encoding, the socket, the server's
  request handling and the client library.
* Diagnostic rows 2g and 3i drive the server's HTTP API with :class:`ThinHttp` instead: raw
  asyncio streams, keep-alive, the SDK's own request and reply structs, no httpx. Set beside
  2d and 3e, they tell how much of the HTTP figures is the server and how much the SDK's
  HTTP client.
* BLAS is pinned to one thread in this process (threadpoolctl, as ``memcluster serve`` does
  in its own), so the engine runs alike on both sides.
* Client, server and embedded engine share the machine's cores: a protocol figure includes
  the client's own CPU, as it would for any client on the same host. Each protocol row's
  note gives the CPU the server and this process spent per operation (``/proc`` and
  ``time.process_time``), which tells a server-side bottleneck from a client-side one.

What runs, in order (default sizes: about 2.5 minutes on 2 cores, more under load;
``--quick``: about 30 s):

1. Bulk ingest: ``put_many`` batches of ``--batch`` items, ``--concurrency`` batches in
   flight, into a 1-shard collection: N items embedded, N over the binary protocol (the
   collection the searches use) and N/4 over HTTP into a second collection, to save time.
   The load is cut into ``--rounds`` chunks; after each chunk the bench waits until the
   graph holds every item (polling ``describe()``), so that one variant's background
   indexing does not slow the next one's timed load; the waits are reported too. HTTP's
   baseline is the embedded rate over as many batches at the start of its own chunk.
2. Single puts: one ``put`` per request (per call, embedded), ``--concurrency`` in flight,
   ``--single-n`` items per variant, each variant into a fresh collection of its own.
3. Search, k=10, unfiltered, on the N-item collections once all is in the graph:
   ``--queries`` queries with ``--concurrency`` in flight. Recall@10 is against exact numpy
   (:func:`bench.data.exact_topk`) over the same normalised vectors.

Every rate is the median of ``--rounds`` rounds in which the variants (embedded, binary, HTTP
and, in 2 and 3, the thin HTTP client) take turns, each round starting with a different one,
so a burst of foreign load on a shared machine does not land on one variant only; p50 and p99
latencies pool every round. A latency is one call, from the caller's side, with
``--concurrency`` calls in flight (closed loop): it includes queueing behind the others.

The only figures not measured here are the targets' references: Chroma 1.5.9 server's 1,440
inserts/s and 324 queries/s on the same data size (DESIGN.md §11), labelled as such. Data
comes from :mod:`bench.data`; output helpers from :mod:`bench.engine`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast
from urllib.parse import urlsplit

import msgspec
import numpy as np
import uvloop
from rich.console import Console
from rich.table import Table

import memcluster
from bench import data
from bench.engine import (
    Report,
    Row,
    _fmt,
    _fmt_ratio,
    _loadavg,
    memories,
    ordered,
    recall_at,
    wait_indexed,
    write_json,
)
from memcluster.cli.main import single_threaded_blas
from memcluster.core import api
from memcluster.core.api import OPERATIONS

REPO = Path(__file__).resolve().parent.parent
CHROMA_SERVER_INSERTS_PER_S = 1440.0
"""Chroma 1.5.9 server on 200k x 384, this machine class (DESIGN.md §11); not measured here."""
CHROMA_SERVER_QPS = 324.0
"""Chroma 1.5.9 server, same data (DESIGN.md §11); not measured here."""
TARGET_RATIO = 3.0
RECALL_TARGET = 0.95
INSERT_TARGET = f">= {TARGET_RATIO * CHROMA_SERVER_INSERTS_PER_S:,.0f}/s (3x Chroma)"
SEARCH_TARGET = f">= {TARGET_RATIO * CHROMA_SERVER_QPS:,.0f} q/s (3x Chroma), recall >= 0.95"
PROTOCOLS = ("binary", "http")
VARIANTS = ("embedded", *PROTOCOLS)

err = Console(stderr=True)
T = TypeVar("T")


# -- results -------------------------------------------------------------------------------


@dataclass
class ServerRow(Row):
    """A table row; ``chroma`` is the Chroma server reference the target multiplies, if any."""

    chroma: float | None = None

    @property
    def vs_chroma(self) -> float | None:
        if self.value is None or not self.chroma:
            return None
        return self.value / self.chroma


def fmt(value: float | None, unit: str) -> str:
    if value is not None and unit == "ms":
        return f"{value:.2f} ms" if value < 100 else f"{value:,.0f} ms"
    return _fmt(value, unit)


def add(report: Report, row: ServerRow) -> None:
    report.rows.append(row)
    err.log(
        f"[bold]{row.id}[/] {row.measure}: {fmt(row.value, row.unit)}"
        f" (embedded: {fmt(row.baseline_value, row.unit)})"
    )


def render(report: Report) -> Table:
    table = Table(
        title="memcluster server vs the embedded engine (same run, same data, same concurrency)"
    )
    for name, justify in (
        ("#", "left"),
        ("measure", "left"),
        ("memcluster", "right"),
        ("baseline (same run)", "right"),
        ("ratio", "right"),
        ("vs Chroma ref", "right"),
        ("target", "left"),
        ("met", "center"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in ordered(report.rows):
        assert isinstance(row, ServerRow)
        met = "-" if row.met is None else ("yes" if row.met else "[red]NO[/]")
        table.add_row(
            row.id,
            row.measure,
            fmt(row.value, row.unit),
            fmt(row.baseline_value, row.unit),
            _fmt_ratio(row.ratio),
            _fmt_ratio(row.vs_chroma),
            row.target,
            met,
        )
    return table


def machine() -> dict[str, Any]:
    """bench.engine's machine header, except that the commit is read from ``.git/`` directly
    (this benchmark runs no git command), so it cannot flag uncommitted changes."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_gib, 1),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "uvloop": importlib.metadata.version("uvloop"),
        "memcluster_commit": _commit(),
        "src_sha256": src_fingerprint(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": _loadavg(),
        "blas_threads": "1 (threadpoolctl, as memcluster serve)",
    }


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    return _loadavg()


def machine_line(m: dict[str, Any]) -> str:
    """The header line that names the machine and the code measured (from :func:`machine`,
    after the run has added ``loadavg_end``)."""
    return (
        f"machine: {m['nproc']} cpus ({m['cpu']}), {m['memory_gib']} GiB RAM,"
        f" Python {m['python']}, numpy {m['numpy']}, uvloop {m['uvloop']};"
        f" memcluster {m['memcluster_commit']} (src sha256 {m['src_sha256']}"
        f"{', CHANGED DURING THE RUN' if m.get('src_changed_during_run') else ''}); {m['time']};"
        f" load average {m['loadavg_start']} at start, {m['loadavg_end']} at end;"
        f" BLAS threads {m['blas_threads']}"
    )


def src_fingerprint() -> str:
    """The first 12 hex digits of a SHA-256 over every file under src/ (path and bytes): names
    the code measured even when the tree differs from the commit."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "src").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _commit() -> str:
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:7]
        ref = head.removeprefix("ref: ")
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:7]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:7]
    except OSError:
        pass
    return "unknown"


# -- the server process --------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # fields 3.. of proc(5); utime is 14, stime 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """``memcluster serve`` in a child process on loopback, on ports the OS picks.

    The approach of ``tests/server_util.py``: the URLs come from the first line the server
    prints. Its stderr goes to ``log`` (a file, so a chatty server cannot block on a full
    pipe). :meth:`stop` signals this child's PID only.
    """

    def __init__(self, data_dir: Path, log: Path, start_timeout_s: float = 30.0) -> None:
        self.log = log
        self._log: TextIO = log.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memcluster.cli.main",
                "serve",
                "--data",
                str(data_dir),
                "--http-port",
                "0",
                "--peer-port",
                "0",
                "--quiet",
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + start_timeout_s
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if not line.startswith("listening "):
            self.stop(5.0)
            raise RuntimeError(f"server did not start: {line!r} {log.read_text()[-2000:]}")
        _, self.http_url, self.mc_url = line.split()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far (all its threads)."""
        return process_cpu_s(self.pid)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful: in-flight requests finish, every WAL is synced), wait, return
        the exit code; SIGKILL if it has not exited after ``timeout_s``."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            code = self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return code


# -- a thin HTTP client --------------------------------------------------------------------


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class ThinHttp:
    """A minimal HTTP/1.1 keep-alive client for the diagnostic rows: asyncio streams and msgspec,
    the same request and reply structs as the SDK, no httpx.

    It tells what the server's HTTP path can do from what the SDK's HTTP client (httpx) can
    drive. At most ``connections`` keep-alive connections, one request at a time on each; a
    caller waits for a free one. A connection is opened when first needed and again when the
    server has closed it (uvicorn drops idle keep-alive connections after 5 s); a request
    that finds its reused connection closed is sent once more on a fresh one. Any status other
    than 200 raises RuntimeError.
    """

    def __init__(self, url: str, connections: int) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        self._host, self._port = parts.hostname, parts.port
        self._free: asyncio.Queue[Stream | None] = asyncio.Queue()
        for _ in range(connections):
            self._free.put_nowait(None)
        self._open: set[asyncio.StreamWriter] = set()
        self._encoder = msgspec.json.Encoder(enc_hook=api.json_enc_hook)
        self.reconnects = 0
        """Connections opened again after the server closed an idle one."""

    async def close(self) -> None:
        for writer in self._open:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._open.clear()

    async def _connect(self) -> Stream:
        reader, writer = await asyncio.open_connection(self._host, self._port)
        self._open.add(writer)
        return reader, writer

    def _drop(self, stream: Stream) -> None:
        stream[1].close()
        self._open.discard(stream[1])

    async def call(self, kind: str, collection: str, body: msgspec.Struct, reply: type[T]) -> T:
        path = OPERATIONS[kind].path.format(collection=collection).encode()
        content = self._encoder.encode(body)
        request = (
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path, self._host.encode(), len(content), content)
        )
        stream = await self._free.get()
        try:
            if stream is not None and (stream[0].at_eof() or stream[1].is_closing()):
                self._drop(stream)
                self.reconnects += 1
                stream = None
            reused = stream is not None
            if stream is None:
                stream = await self._connect()
            try:
                head, payload = await self._exchange(stream, request)
            except (asyncio.IncompleteReadError, ConnectionError):
                if not reused:
                    raise
                self._drop(stream)
                self.reconnects += 1
                stream = await self._connect()
                head, payload = await self._exchange(stream, request)
        except BaseException:
            if stream is not None:
                self._drop(stream)
            self._free.put_nowait(None)
            raise
        self._free.put_nowait(stream)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"thin http: {head.splitlines()[0]!r}: {payload[:200]!r}")
        return msgspec.json.decode(payload, type=reply)

    @staticmethod
    async def _exchange(stream: Stream, request: bytes) -> tuple[bytes, bytes]:
        """Send one request, read its reply: (status line and headers, body)."""
        reader, writer = stream
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head, await reader.readexactly(length)


# -- measuring -----------------------------------------------------------------------------

Meter = Callable[[], tuple[float, float]]
"""CPU seconds so far: (this process, the server process)."""


@dataclass
class Run:
    """One timed series of operations, ``concurrency`` of them in flight at any time."""

    elapsed_s: float
    latencies_s: list[float]
    results: list[Any]
    """What each operation returned, in the order of the items given."""
    cpu_self_s: float
    cpu_server_s: float
    mark_s: float | None = None
    """Seconds from the start until ``mark`` operations had completed (None: no mark)."""

    @property
    def ops(self) -> int:
        return len(self.latencies_s)

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed_s


def run_threads(
    items: Sequence[int],
    concurrency: int,
    op: Callable[[int], Any],
    meter: Meter,
    mark: int | None = None,
) -> Run:
    """``op(item)`` for every item from ``concurrency`` threads, each taking the next item."""
    count = len(items)
    results: list[Any] = [None] * count
    latencies = [0.0] * count
    lock = threading.Lock()
    next_pos = 0
    done = 0
    mark_at: float | None = None
    errors: list[BaseException] = []
    barrier = threading.Barrier(concurrency + 1)

    def work() -> None:
        nonlocal next_pos, done, mark_at
        barrier.wait()
        while not errors:
            with lock:
                pos = next_pos
                next_pos += 1
            if pos >= count:
                return
            t0 = time.perf_counter()
            try:
                results[pos] = op(items[pos])
            except BaseException as exc:
                errors.append(exc)
                return
            t1 = time.perf_counter()
            latencies[pos] = t1 - t0
            with lock:
                done += 1
                if done == mark:
                    mark_at = t1

    workers = [threading.Thread(target=work) for _ in range(concurrency)]
    for w in workers:
        w.start()
    cpu0 = meter()
    start = time.perf_counter()
    barrier.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    cpu1 = meter()
    if errors:
        raise errors[0]
    return Run(
        elapsed,
        latencies,
        results,
        cpu1[0] - cpu0[0],
        cpu1[1] - cpu0[1],
        None if mark_at is None else mark_at - start,
    )


async def run_tasks(
    items: Sequence[int],
    concurrency: int,
    op: Callable[[int], Awaitable[Any]],
    meter: Meter,
    mark: int | None = None,
) -> Run:
    """``await op(item)`` for every item from ``concurrency`` tasks, each taking the next."""
    count = len(items)
    results: list[Any] = [None] * count
    latencies = [0.0] * count
    next_pos = 0
    done = 0
    mark_at: float | None = None

    async def work() -> None:
        nonlocal next_pos, done, mark_at
        while next_pos < count:
            pos = next_pos
            next_pos += 1
            t0 = time.perf_counter()
            results[pos] = await op(items[pos])
            t1 = time.perf_counter()
            latencies[pos] = t1 - t0
            done += 1
            if done == mark:
                mark_at = t1

    cpu0 = meter()
    start = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as tasks:
            for _ in range(concurrency):
                tasks.create_task(work())
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    elapsed = time.perf_counter() - start
    cpu1 = meter()
    return Run(
        elapsed,
        latencies,
        results,
        cpu1[0] - cpu0[0],
        cpu1[1] - cpu0[1],
        None if mark_at is None else mark_at - start,
    )


Series = Callable[[Sequence[int]], Awaitable[Run]]
"""Runs a series of operations on one variant."""


async def take_turns(
    series: dict[str, Series], chunks: Sequence[Sequence[int]]
) -> dict[str, list[Run]]:
    """Round r runs ``chunks[r]`` on every variant; round r starts with variant r (mod the
    number of variants), so no variant always runs first or right after a given other."""
    names = list(series)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for r, chunk in enumerate(chunks):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            runs[name].append(await series[name](chunk))
    return runs


@dataclass
class Summary:
    """A variant's runs: rate (median of the rounds), latency over all rounds, CPU per op."""

    rate: float
    rounds: list[float]
    p50_ms: float
    p99_ms: float
    cpu_self_ms: float
    """This process's CPU per operation (for embedded: all of it)."""
    cpu_server_ms: float

    @classmethod
    def of(cls, runs: Sequence[Run]) -> Summary:
        lat = np.array([x for r in runs for x in r.latencies_s])
        ops = sum(r.ops for r in runs)
        return cls(
            rate=statistics.median(r.rate for r in runs),
            rounds=[round(r.rate, 1) for r in runs],
            p50_ms=float(np.percentile(lat, 50)) * 1000,
            p99_ms=float(np.percentile(lat, 99)) * 1000,
            cpu_self_ms=sum(r.cpu_self_s for r in runs) / ops * 1000,
            cpu_server_ms=sum(r.cpu_server_s for r in runs) / ops * 1000,
        )

    def cpu_note(self, variant: str, per: str) -> str:
        if variant == "embedded":
            return f"embedded CPU {self.cpu_self_ms:.2f} ms/{per}"
        if variant == "thin":
            variant = "thin HTTP"
        return (
            f"{variant} CPU: server {self.cpu_server_ms:.2f} + client {self.cpu_self_ms:.2f}"
            f" ms/{per}"
        )


async def wait_indexed_remote(
    coll: memcluster.AsyncCollection, items: int, timeout_s: float = 1800.0
) -> float:
    """Seconds until the server's collection holds ``items`` items, all in the graph."""
    start = time.perf_counter()
    while True:
        stats = (await coll.describe()).stats
        if stats.items >= items and stats.indexed_items >= stats.items:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"server indexing did not finish in {timeout_s} s: {stats}")
        await asyncio.sleep(0.05)


# -- the phases ----------------------------------------------------------------------------


@dataclass
class Bench:
    """What every phase needs: settings, the report, the data, the engine and the clients."""

    args: argparse.Namespace
    report: Report
    vectors: data.Matrix
    queries: data.Matrix
    meta: data.Metadata
    truth: data.Ints
    db: memcluster.Database
    server: ServerProcess
    clients: dict[str, memcluster.AsyncClient]
    """"binary" and "http"."""
    thin: ThinHttp
    """The diagnostic rows' HTTP client (no httpx)."""
    searched: dict[str, Any]
    """The N-item collection each variant searches: embedded Collection, AsyncCollection."""

    @property
    def n(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def meter(self) -> tuple[float, float]:
        return time.process_time(), self.server.cpu_s()

    def threads(self, op: Callable[[int], Any]) -> Series:
        async def series(items: Sequence[int]) -> Run:
            conc = self.args.concurrency
            return await asyncio.to_thread(run_threads, items, conc, op, self.meter)

        return series

    def tasks(self, op: Callable[[int], Awaitable[Any]]) -> Series:
        async def series(items: Sequence[int]) -> Run:
            return await run_tasks(items, self.args.concurrency, op, self.meter)

        return series


async def phase_ingest(b: Bench) -> None:
    """Rows 1a-1c: put_many batches; N items embedded and over binary, N/4 over HTTP.

    The load is cut into ``rounds`` chunks. In round r each variant loads its chunk r (the
    three take turns, starting with a different one each round) and then waits until its
    graph holds everything, so that no variant's background indexing runs into another's
    timed load. Rates are the median of the rounds.
    """
    args, n, conc, rounds = b.args, b.n, b.args.concurrency, b.args.rounds
    batches = [range(lo, min(lo + args.batch, n)) for lo in range(0, n, args.batch)]
    http_batches = max(rounds, (n // 4) // args.batch)

    def split(count: int) -> list[range]:
        return [range(count * r // rounds, count * (r + 1) // rounds) for r in range(rounds)]

    chunks = {"embedded": split(len(batches)), "binary": split(len(batches))}
    chunks["http"] = split(http_batches)

    def items(chunk: range) -> int:
        return sum(len(batches[j]) for j in chunk)

    def batch(j: int) -> list[memcluster.Memory]:
        return memories(b.vectors, b.meta, batches[j])

    emb = b.db.create_collection("bulk", dim=b.dim)
    remote = {
        "binary": await b.clients["binary"].create_collection("bulk", dim=b.dim),
        "http": await b.clients["http"].create_collection("bulk-http", dim=b.dim),
    }

    def put_remote(coll: memcluster.AsyncCollection) -> Callable[[int], Awaitable[list[int]]]:
        async def put(j: int) -> list[int]:
            return await coll.put_many(batch(j))

        return put

    runs: dict[str, list[Run]] = {name: [] for name in VARIANTS}
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    index_s = dict.fromkeys(VARIANTS, 0.0)
    loaded = dict.fromkeys(VARIANTS, 0)
    http_base: list[float] = []
    """Embedded rate over as many batches at the start of its chunk as HTTP loads."""
    for r in range(rounds):
        for j in range(len(VARIANTS)):
            name = VARIANTS[(r + j) % len(VARIANTS)]
            chunk = chunks[name][r]
            loaded[name] += items(chunk)
            err.log(f"ingest round {r + 1}/{rounds}: {name}, {items(chunk):,} items")
            if name == "embedded":
                mark = len(chunks["http"][r])
                run = await asyncio.to_thread(
                    run_threads, chunk, conc, lambda j: emb.put_many(batch(j)), b.meter, mark
                )
                index_s[name] += await asyncio.to_thread(wait_indexed, emb, loaded[name])
                assert run.mark_s is not None
                http_base.append(items(chunk[:mark]) / run.mark_s)
            else:
                run = await run_tasks(chunk, conc, put_remote(remote[name]), b.meter)
                index_s[name] += await wait_indexed_remote(remote[name], loaded[name])
            runs[name].append(run)
            rates[name].append(items(chunk) / run.elapsed_s)
    assert emb.count() == n
    assert await remote["binary"].count() == n
    assert await remote["http"].count() == loaded["http"]
    b.searched["embedded"] = emb
    b.searched["binary"] = remote["binary"]
    b.searched["http"] = await b.clients["http"].collection("bulk")

    rate = {name: statistics.median(rates[name]) for name in VARIANTS}
    e_http = statistics.median(http_base)
    summaries = {name: Summary.of(runs[name]) for name in VARIANTS}
    b.report.details["ingest"] = {
        name: asdict(summaries[name])
        | {
            "items": loaded[name],
            "items_per_s": rate[name],
            "rounds_items_per_s": rates[name],
            "wait_all_in_graph_s": index_s[name],
        }
        for name in VARIANTS
    } | {
        "embedded_http_baseline_rounds": http_base,
        "server_rss_after_load_mib": round(b.server.rss_bytes() / 2**20),
    }
    per = f"batch of {args.batch}"

    def note(name: str) -> str:
        s, e = summaries[name], summaries["embedded"]
        shown = [round(x) for x in rates[name]]
        base = [round(x) for x in (rates["embedded"] if name == "binary" else http_base)]
        return (
            f"rounds {shown} (embedded {base}); batch latency p50 {s.p50_ms:,.0f} ms,"
            f" p99 {s.p99_ms:,.0f} ms (embedded {e.p50_ms:,.0f} / {e.p99_ms:,.0f});"
            f" {s.cpu_note(name, per)}; {e.cpu_note('embedded', per)}"
        )

    add(
        b.report,
        ServerRow(
            "1a",
            f"put_many x{args.batch}, binary, {n:,} items",
            rate["binary"],
            "items/s",
            f"embedded, {conc} threads",
            rate["embedded"],
            INSERT_TARGET,
            rate["binary"] >= TARGET_RATIO * CHROMA_SERVER_INSERTS_PER_S,
            f"{conc} batches in flight, 1 shard, fsync before ack; {note('binary')}",
            chroma=CHROMA_SERVER_INSERTS_PER_S,
        ),
    )
    add(
        b.report,
        ServerRow(
            "1b",
            f"put_many x{args.batch}, HTTP, {loaded['http']:,} items",
            rate["http"],
            "items/s",
            "embedded, same number of batches",
            e_http,
            INSERT_TARGET,
            rate["http"] >= TARGET_RATIO * CHROMA_SERVER_INSERTS_PER_S,
            f"into a second collection; baseline: embedded's rate over as many batches at the"
            f" start of its chunk; {note('http')}",
            chroma=CHROMA_SERVER_INSERTS_PER_S,
        ),
    )
    add(
        b.report,
        ServerRow(
            "1c",
            f"waits until all in graph, server, {n:,} items",
            index_s["binary"],
            "s",
            "embedded, same items",
            index_s["embedded"],
            note=f"sum over the {rounds} waits after each chunk (polling"
            f" describe().stats.indexed_items); load time: binary"
            f" {sum(r.elapsed_s for r in runs['binary']):.1f} s, embedded"
            f" {sum(r.elapsed_s for r in runs['embedded']):.1f} s",
        ),
    )


async def phase_single_puts(b: Bench) -> None:
    """Rows 2a-2f: one put per request, ``concurrency`` in flight, rounds taking turns."""
    args = b.args
    per_round = args.single_n // args.rounds
    chunks = [range(r * per_round, (r + 1) * per_round) for r in range(args.rounds)]
    err.log(
        f"single puts: {per_round * args.rounds:,} per variant in {args.rounds} rounds,"
        f" {args.concurrency} in flight"
    )
    emb = b.db.create_collection("single", dim=b.dim)
    remote = {
        name: await b.clients[name].create_collection(f"single-{name}", dim=b.dim)
        for name in PROTOCOLS
    }
    remote["thin"] = await b.clients["http"].create_collection("single-thin", dim=b.dim)
    v, meta = b.vectors, b.meta

    def put_embedded(i: int) -> int:
        return emb.put(
            ("bench",), data.key(i), text=meta.text(i), vector=v[i], metadata=meta.item(i)
        )

    def put_remote(coll: memcluster.AsyncCollection) -> Callable[[int], Awaitable[int]]:
        async def put(i: int) -> int:
            return await coll.put(
                ("bench",), data.key(i), text=meta.text(i), vector=v[i], metadata=meta.item(i)
            )

        return put

    async def put_thin(i: int) -> int:
        memory = memcluster.Memory(
            namespace=("bench",),
            key=data.key(i),
            text=meta.text(i),
            vector=v[i],
            metadata=meta.item(i),
        )
        body = api.PutBody(memories=[memory])
        return (await b.thin.call("put", "single-thin", body, api.PutReply)).versions[0]

    series = {"embedded": b.threads(put_embedded)} | {
        name: b.tasks(put_remote(remote[name])) for name in PROTOCOLS
    }
    series["thin"] = b.tasks(put_thin)
    runs = await take_turns(series, chunks)
    total = per_round * args.rounds
    assert emb.count() == total
    for coll in remote.values():
        assert await coll.count() == total
    s = {name: Summary.of(r) for name, r in runs.items()}
    b.report.details["single_puts"] = {name: asdict(x) for name, x in s.items()}
    base = s["embedded"]
    letters = {"binary": "abc", "http": "def"}
    for name in PROTOCOLS:
        x, ids = s[name], letters[name]
        label = "binary" if name == "binary" else "HTTP"
        add(
            b.report,
            ServerRow(
                f"2{ids[0]}",
                f"single puts, {label}",
                x.rate,
                "puts/s",
                f"embedded, {args.concurrency} threads",
                base.rate,
                INSERT_TARGET,
                x.rate >= TARGET_RATIO * CHROMA_SERVER_INSERTS_PER_S,
                f"{args.concurrency} in flight, fsync before ack (group commit);"
                f" median of {args.rounds} rounds of {per_round:,}: {x.rounds}"
                f" (embedded {base.rounds}); {x.cpu_note(name, 'put')};"
                f" {base.cpu_note('embedded', 'put')}",
                chroma=CHROMA_SERVER_INSERTS_PER_S,
            ),
        )
        for letter, what, value, base_value in (
            (ids[1], "p50", x.p50_ms, base.p50_ms),
            (ids[2], "p99", x.p99_ms, base.p99_ms),
        ):
            add(
                b.report,
                ServerRow(
                    f"2{letter}",
                    f"single put latency {what}, {label}",
                    value,
                    "ms",
                    f"embedded, {args.concurrency} threads",
                    base_value,
                    note="" if what == "p50" else f"over all {per_round * args.rounds:,} puts",
                ),
            )
    x = s["thin"]
    add(
        b.report,
        ServerRow(
            "2g",
            "single puts, HTTP, thin client (diagnostic)",
            x.rate,
            "puts/s",
            f"embedded, {args.concurrency} threads",
            base.rate,
            note=f"the server's HTTP path driven without httpx (bench ThinHttp), to compare with"
            f" 2d; p50 {x.p50_ms:.2f} ms, p99 {x.p99_ms:.2f} ms; rounds {x.rounds};"
            f" {x.cpu_note('thin', 'put')}",
            chroma=CHROMA_SERVER_INSERTS_PER_S,
        ),
    )
    err.log("single puts: waiting until those collections are in the graph")
    await asyncio.to_thread(wait_indexed, emb, total)
    for coll in remote.values():
        await wait_indexed_remote(coll, total)


async def phase_search(b: Bench) -> None:
    """Rows 3a-3h: k=10 searches, ``concurrency`` in flight, rounds taking turns."""
    args = b.args
    q = b.queries
    emb = b.searched["embedded"]

    def search_embedded(i: int) -> list[int]:
        return [data.item_of(h.memory.key) for h in emb.search(q[i], k=10)]

    def search_remote(coll: memcluster.AsyncCollection) -> Callable[[int], Awaitable[list[int]]]:
        async def search(i: int) -> list[int]:
            return [data.item_of(h.memory.key) for h in await coll.search(q[i], k=10)]

        return search

    async def search_thin(i: int) -> list[int]:
        body = api.SearchBody(vector=q[i], k=10)
        reply = await b.thin.call("search", "bulk", body, api.SearchReply)
        return [data.item_of(h.memory.key) for h in reply.hits]

    series = {"embedded": b.threads(search_embedded)} | {
        name: b.tasks(search_remote(b.searched[name])) for name in PROTOCOLS
    }
    series["thin"] = b.tasks(search_thin)
    err.log(f"search: warm-up, then {args.rounds} rounds of {len(q):,} queries per variant")
    await take_turns(series, [range(min(50, len(q)))])
    runs = await take_turns(series, [range(len(q))] * args.rounds)
    s = {name: Summary.of(r) for name, r in runs.items()}
    recall = {
        name: recall_at(cast(list[list[int]], r[0].results), b.truth, 10)
        for name, r in runs.items()
    }
    b.report.details["search"] = {
        name: asdict(x) | {"recall_at_10": recall[name]} for name, x in s.items()
    }
    base = s["embedded"]
    letters = {"binary": "abcd", "http": "efgh"}
    for name in PROTOCOLS:
        x, ids = s[name], letters[name]
        label = "binary" if name == "binary" else "HTTP"
        ok = x.rate >= TARGET_RATIO * CHROMA_SERVER_QPS and recall[name] >= RECALL_TARGET
        add(
            b.report,
            ServerRow(
                f"3{ids[0]}",
                f"search k=10, {label}",
                x.rate,
                "q/s",
                f"embedded, {args.concurrency} threads",
                base.rate,
                SEARCH_TARGET,
                ok,
                f"{args.concurrency} in flight, {b.n:,} items, 1 shard; median of {args.rounds}"
                f" rounds: {x.rounds} (embedded {base.rounds}); {x.cpu_note(name, 'query')};"
                f" {base.cpu_note('embedded', 'query')}",
                chroma=CHROMA_SERVER_QPS,
            ),
        )
        for letter, what, value, base_value in (
            (ids[1], "p50", x.p50_ms, base.p50_ms),
            (ids[2], "p99", x.p99_ms, base.p99_ms),
        ):
            add(
                b.report,
                ServerRow(
                    f"3{letter}",
                    f"search latency {what}, {label}",
                    value,
                    "ms",
                    f"embedded, {args.concurrency} threads",
                    base_value,
                ),
            )
        add(
            b.report,
            ServerRow(
                f"3{ids[3]}",
                f"recall@10, {label}",
                recall[name],
                "recall",
                "embedded (its own graph)",
                recall["embedded"],
                ">= 0.95",
                recall[name] >= RECALL_TARGET,
                "ground truth: exact numpy; the server's graph and the embedded one are built"
                " separately"
                if name == "binary"
                else "the same server collection as binary",
            ),
        )
    x = s["thin"]
    add(
        b.report,
        ServerRow(
            "3i",
            "search k=10, HTTP, thin client (diagnostic)",
            x.rate,
            "q/s",
            f"embedded, {args.concurrency} threads",
            base.rate,
            note=f"the server's HTTP path driven without httpx (bench ThinHttp), to compare with"
            f" 3e; p50 {x.p50_ms:.2f} ms, p99 {x.p99_ms:.2f} ms; recall {recall['thin']:.3f};"
            f" rounds {x.rounds}; {x.cpu_note('thin', 'query')}",
            chroma=CHROMA_SERVER_QPS,
        ),
    )


# -- main ----------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.server", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about 30 s")
    p.add_argument("--n", type=int, default=None, help="items (default 200000; quick 20000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--queries", type=int, default=None, help="queries (default 1000; quick 500)")
    p.add_argument("--concurrency", type=int, default=8, help="requests (threads) in flight")
    p.add_argument("--batch", type=int, default=500, help="put_many batch size")
    p.add_argument(
        "--single-n", type=int, default=None, help="single puts per variant (6000; quick 1500)"
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the variants alternate")
    p.add_argument("--dir", type=Path, default=None, help="scratch root (default: a /tmp dir)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file (server.json; quick: server-quick.json)"
    )
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 20_000 if args.quick else 200_000
    if args.queries is None:
        args.queries = 500 if args.quick else 1000
    if args.single_n is None:
        args.single_n = 1500 if args.quick else 6000
    if args.out is None:
        args.out = data.OUT / ("server-quick.json" if args.quick else "server.json")
    if args.n < 4 * args.batch:
        p.error(f"--n must be at least 4 x --batch ({4 * args.batch})")
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
            "hnsw_threads": cfg.hnsw_threads,
            "durability": str(cfg.durability),
            "binary_pool": 4,
            "http_pool": args.concurrency,
        },
    )
    m = report.machine
    err.print(
        f"[bold]machine[/]: {m['nproc']} cpus, {m['cpu']}, {m['memory_gib']} GiB,"
        f" Python {m['python']}, memcluster {m['memcluster_commit']} (src {m['src_sha256']}),"
        f" load {m['loadavg_start']},"
        f" BLAS threads {m['blas_threads']}"
    )
    root = Path(tempfile.mkdtemp(prefix="memcluster-server-bench-", dir=args.dir))
    err.log(f"scratch dir {root}")
    start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        vectors = data.vectors(args.n, args.dim, args.seed)
        queries = data.queries(args.queries, args.dim, args.seed)
        truth = data.exact_topk(vectors, queries, 10)
        err.log(
            f"data: {args.n:,} x {args.dim}, {len(queries)} queries,"
            f" truth in {time.perf_counter() - t0:.1f} s"
        )
        server = ServerProcess(root / "server", root / "server.log")
        report.details["server_pid"] = server.pid
        err.log(f"server pid {server.pid}: {server.http_url} {server.mc_url}")
        try:
            db = memcluster.open(root / "embedded")
            try:
                async with (
                    memcluster.AsyncClient(server.mc_url, retries=0, timeout_s=120.0) as mc,
                    memcluster.AsyncClient(
                        server.http_url, retries=0, timeout_s=120.0, pool=args.concurrency
                    ) as http,
                ):
                    thin = ThinHttp(server.http_url, args.concurrency)
                    try:
                        b = Bench(
                            args,
                            report,
                            vectors,
                            queries,
                            data.metadata(args.n, args.seed),
                            truth,
                            db,
                            server,
                            {"binary": mc, "http": http},
                            thin,
                            {},
                        )
                        await phase_ingest(b)
                        await phase_single_puts(b)
                        await phase_search(b)
                    finally:
                        await thin.close()
                        report.details["thin_http_reconnects"] = thin.reconnects
                    report.details["server_rss_mib_end"] = round(server.rss_bytes() / 2**20)
            finally:
                db.close()
        finally:
            code = server.stop()
            report.details["server_exit_code"] = code
            err.log(f"server stopped with SIGTERM, exit code {code}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report.details["elapsed_s"] = round(time.perf_counter() - start, 1)
    report.machine["loadavg_end"] = _loadavg()
    if src_fingerprint() != report.machine["src_sha256"]:
        report.machine["src_changed_during_run"] = True
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
        f"data: {p['n']:,} x {p['dim']} clustered unit vectors (bench/data.py, seed {p['seed']}),"
        f" cosine; {p['queries']} queries; server: memcluster serve, durability"
        f" {p['durability']}, M={p['hnsw_m']}, ef_construction={p['hnsw_ef_construction']},"
        f" ef={p['hnsw_ef_search']}; load generator: this process, uvloop,"
        f" {p['concurrency']} requests in flight (binary: 4 multiplexed connections; HTTP:"
        f" {p['http_pool']} keep-alive connections); baseline: the embedded engine in this"
        f" process, {p['concurrency']} threads; rates = median of {p['rounds']} alternating"
        f" rounds; total {report.details.get('elapsed_s', 0):.0f} s",
        highlight=False,
    )
    out.print(render(report))
    out.print(
        f"  vs Chroma ref: the Chroma 1.5.9 server on 200k x 384 reached"
        f" {CHROMA_SERVER_INSERTS_PER_S:,.0f} inserts/s and {CHROMA_SERVER_QPS:,.0f} q/s"
        " (DESIGN.md §11): references, NOT measured in this run.",
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
