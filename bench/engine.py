"""Benchmark of the embedded storage engine, each figure beside a baseline from the same run.

Run ``make bench`` (or ``.venv/bin/python -m bench.engine [--quick] [--n N] [--dim D]``). It
prints the machine, then one table, and writes the same rows as JSON to
``bench/out/engine.json``. Machines are shared and noisy, so every memcluster figure sits beside
a baseline measured in the same process on the same data (raw hnswlib, exact numpy, a bare
write+fsync loop); the ratio is the number to read. The only figure not measured here is the
Chroma ingest reference of DESIGN.md §11, labelled as such.

What runs, in order (default sizes: 4-8 minutes on 2 cores, depending on load; ``--quick``
shrinks them for a smoke run of about 45 s):

1. Ingest with default durability (fsync before ack) into a fresh directory per variant:
   ``put_many`` batches of 1,000, all N items, into a 1-shard collection that the search rows
   reuse (row 1d), then the time until the background step has put every item into the
   graph, against raw hnswlib building the same vectors on every core (built just before, so
   that both RSS growths are measured on a heap that has not freed much yet); single puts
   from one thread (1a, beside Chroma's figure, and 1b, beside a bare write+fsync loop) and
   from 8 threads (1c, group commit) on the first ``--single-n`` items.
2. Unfiltered search, k=10, one query at a time: QPS and recall@10 (ground truth: exact numpy)
   for the 1-shard collection and a 4-shard one, against raw hnswlib with memcluster's
   M/ef_construction/ef and against exact numpy (matmul + argpartition).
3. Filtered search at 1% (``bucket == 42``) and 10% (``speaker`` in two of 20 names) against
   exact numpy over the pre-filtered rows and hnswlib's Python filter callback.
4. RSS growth per item while loading the 1-shard collection (``/proc/self/status`` VmRSS),
   against the raw vector bytes and raw hnswlib's RSS growth.
5. Recovery: a child process ingests, prints ``acked N`` after each batch and is SIGKILLed
   after the last; the parent times ``memcluster.open()`` + first search and checks that every
   acknowledged item came back. Once from the WAL only, once with a snapshot (graph included)
   taken at 90% of the items.
6. LoCoMo retrieval (``/work/shared/data/locomo``): recall@10 of the evidence turns per
   question, searching the question's conversation namespace, against exact numpy.

QPS figures are the median of ``--rounds`` rounds in which memcluster and its baselines take
turns, so a burst of foreign load on a shared machine does not land on one of them only.
numpy's BLAS thread count is left as the environment sets it (``OPENBLAS_NUM_THREADS``),
as an application embedding memcluster would; the header prints it.

Synthetic data comes from :mod:`bench.data` (seeded, cached in ``bench/out/``). Results are
discussed in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import hnswlib
import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

import memcluster
from bench import data

REPO = Path(__file__).resolve().parent.parent
CHROMA_INSERTS_PER_S = 1350.0
"""Chroma 1.5.9 embedded on this machine class (DESIGN.md §11); not measured here."""
INGEST_TARGET_RATIO = 3.0
LOCOMO_README_RECALL = 0.304

err = Console(stderr=True)

Matrix = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
T = TypeVar("T")


# -- results -------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a memcluster figure, its baseline and the target it serves."""

    id: str
    measure: str
    value: float | None
    unit: str
    baseline: str
    baseline_value: float | None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value


@dataclass
class Report:
    machine: dict[str, Any]
    params: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        shown = _fmt(row.value, row.unit)
        base = _fmt(row.baseline_value, row.unit)
        err.log(f"[bold]{row.id}[/] {row.measure}: {shown} (baseline {row.baseline}: {base})")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "recall":
        return f"{value:.3f}"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "B/item":
        return f"{value:,.0f} B"
    if unit == "items":
        return f"{value:,.0f}"
    return f"{value:,.0f} {unit}"


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


def ordered(rows: list[Row]) -> list[Row]:
    """Rows in id order: the section's number, then a letter."""
    return sorted(rows, key=lambda r: r.id)


def render(report: Report) -> Table:
    table = Table(title="memcluster embedded engine vs baselines (same run, same data)")
    for name, justify in (
        ("#", "left"),
        ("measure", "left"),
        ("memcluster", "right"),
        ("baseline", "left"),
        ("baseline value", "right"),
        ("ratio", "right"),
        ("target", "left"),
        ("met", "center"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in ordered(report.rows):
        met = "-" if row.met is None else ("yes" if row.met else "[red]NO[/]")
        table.add_row(
            row.id,
            row.measure,
            _fmt(row.value, row.unit),
            row.baseline,
            _fmt(row.baseline_value, row.unit),
            _fmt_ratio(row.ratio),
            row.target,
            met,
        )
    return table


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**asdict(r), "ratio": r.ratio} for r in report.rows]
    doc = {
        "machine": report.machine,
        "params": report.params,
        "rows": rows,
        "details": report.details,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


# -- measuring helpers ---------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--", "src"):
        commit += "+uncommitted changes in src/"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_gb, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "hnswlib": getattr(hnswlib, "__version__", "0.8.0"),
        "memcluster_commit": commit,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": _loadavg(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
    }


def _git(*argv: str) -> str:
    """Output of a read-only git command in the repository ("" if git is missing)."""
    try:
        done = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return done.stdout.strip()


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS), after a garbage collection."""
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def recall_at(found: Sequence[Sequence[int]], truth: Ints, k: int) -> float:
    """Mean over the queries that ran (a prefix of truth's) of |found[:k] ∩ truth[:k]| / k."""
    total = 0.0
    for got, want in zip(found, truth[: len(found)], strict=True):
        total += len(set(got[:k]) & set(want[:k].tolist())) / k
    return total / max(len(found), 1)


def timed_queries(
    run: Callable[[int], list[T]], count: int, warmup: int = 20, budget_s: float = math.inf
) -> tuple[float, list[list[T]]]:
    """Run queries 0..count-1 one at a time; (queries/s, ids found per query).

    Stops early, after at least 20 queries, once ``budget_s`` seconds have passed, so a slow
    path cannot stretch the run; the caller scores only the queries that ran.
    """
    for i in range(min(warmup, count)):
        run(i)
    out: list[list[T]] = []
    start = time.perf_counter()
    for i in range(count):
        out.append(run(i))
        if i >= 20 and time.perf_counter() - start > budget_s:
            break
    elapsed = time.perf_counter() - start
    return len(out) / elapsed, out


def numpy_topk(matrix: Matrix, query: Matrix, k: int) -> Ints:
    """Exact top-k rows of ``matrix`` by inner product with ``query``, best first."""
    sims = matrix @ query
    k = min(k, len(sims))
    part = np.argpartition(-sims, k - 1)[:k]
    order: Ints = part[np.argsort(-sims[part], kind="stable")].astype(np.int64)
    return order


def wait_indexed(coll: memcluster.Collection, items: int, timeout_s: float = 3600.0) -> float:
    """Seconds until every item is in the graph (polling describe())."""
    start = time.perf_counter()
    while coll.describe().stats.indexed_items < items:
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"indexing did not finish in {timeout_s} s")
        time.sleep(0.05)
    return time.perf_counter() - start


def memories(
    vectors: Matrix, meta: data.Metadata, items: range, namespace: tuple[str, ...] = ("bench",)
) -> list[memcluster.Memory]:
    return [
        memcluster.Memory(
            namespace=namespace,
            key=data.key(i),
            text=meta.text(i),
            vector=vectors[i],
            metadata=meta.item(i),
        )
        for i in items
    ]


@contextmanager
def scratch_dir(root: Path, name: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- 1. ingest -----------------------------------------------------------------------------


def ingest_single(
    root: Path, vectors: Matrix, meta: data.Metadata, count: int, threads: int
) -> float:
    """Single puts of items [0, count) from ``threads`` threads; items/s."""
    with scratch_dir(root, f"single{threads}") as path:
        db = memcluster.open(path)
        try:
            coll = db.create_collection("ingest", dim=vectors.shape[1])
            errors: list[BaseException] = []
            barrier = threading.Barrier(threads + 1)

            def work(t: int) -> None:
                barrier.wait()
                try:
                    for i in range(t, count, threads):
                        coll.put(
                            ("bench",),
                            data.key(i),
                            text=meta.text(i),
                            vector=vectors[i],
                            metadata=meta.item(i),
                        )
                except BaseException as exc:
                    errors.append(exc)

            workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
            for w in workers:
                w.start()
            barrier.wait()
            start = time.perf_counter()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - start
            if errors:
                raise errors[0]
            assert coll.count() == count, (coll.count(), count)
        finally:
            db.close()
    return count / elapsed


def bare_fsync_floor(root: Path, count: int, record_bytes: int) -> float:
    """Items/s of a bare loop: one os.write of ``record_bytes`` and one fsync per item."""
    with scratch_dir(root, "fsync") as path:
        fd = os.open(path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        payload = os.urandom(record_bytes)
        try:
            start = time.perf_counter()
            for _ in range(count):
                os.write(fd, payload)
                os.fsync(fd)
            elapsed = time.perf_counter() - start
        finally:
            os.close(fd)
    return count / elapsed


@dataclass
class Loaded:
    db: memcluster.Database
    coll: memcluster.Collection
    path: Path
    ingest_s: float
    index_after_s: float
    rss_growth: int


def ingest_batches(
    root: Path, name: str, vectors: Matrix, meta: data.Metadata, shards: int, batch: int
) -> Loaded:
    """put_many of all items in batches into a fresh collection; waits until all is indexed."""
    n = len(vectors)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    rss_before = rss_bytes()
    db = memcluster.open(path)
    coll = db.create_collection(name, dim=vectors.shape[1], shards=shards)
    start = time.perf_counter()
    for lo in range(0, n, batch):
        coll.put_many(memories(vectors, meta, range(lo, min(lo + batch, n))))
    ingest_s = time.perf_counter() - start
    index_after_s = wait_indexed(coll, n)
    growth = rss_bytes() - rss_before
    assert coll.count() == n
    return Loaded(db, coll, path, ingest_s, index_after_s, growth)


def raw_hnsw(vectors: Matrix, cfg: memcluster.Config, threads: int) -> tuple[Any, float, int]:
    """Raw hnswlib with memcluster's M, ef_construction and ef, built on ``threads`` threads:
    (index, build seconds, RSS growth)."""
    rss_before = rss_bytes()
    start = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(
        max_elements=len(vectors), ef_construction=cfg.hnsw_ef_construction, M=cfg.hnsw_m
    )
    index.add_items(vectors, np.arange(len(vectors)), num_threads=threads)
    build_s = time.perf_counter() - start
    index.set_ef(cfg.hnsw_ef_search)
    return index, build_s, rss_bytes() - rss_before


# -- 2./3. search --------------------------------------------------------------------------

Runner = Callable[[int], list[int]]
"""Runs query ``i`` and returns the item numbers found, best first."""


def memcluster_runner(
    coll: memcluster.Collection, queries: Matrix, flt: dict[str, Any] | None = None
) -> Runner:
    def run(i: int) -> list[int]:
        hits = coll.search(queries[i], k=10, filter=flt)
        return [data.item_of(h.memory.key) for h in hits]

    return run


def hnsw_runner(index: Any, queries: Matrix, allowed: Bools | None = None) -> Runner:
    """Raw hnswlib; with ``allowed``, through its Python filter callback."""
    allow: Callable[[int], bool] | None = None
    if allowed is not None:
        as_list = allowed.tolist()

        def allow_label(label: int) -> bool:
            return bool(as_list[label])

        allow = allow_label

    def run(i: int) -> list[int]:
        try:
            labels, _ = index.knn_query(queries[i], k=10, num_threads=1, filter=allow)
        except RuntimeError:  # fewer than k found
            return []
        return [int(x) for x in labels[0]]

    return run


def numpy_runner(matrix: Matrix, ids: Ints, queries: Matrix) -> Runner:
    """Exact search over the rows of ``matrix``, which hold items ``ids``."""

    def run(i: int) -> list[int]:
        return ids[numpy_topk(matrix, queries[i], 10)].tolist()  # type: ignore[no-any-return]

    return run


@dataclass
class Timing:
    qps: float
    """Median over the rounds."""
    rounds: list[float]
    found: list[list[int]]
    """Results of the first round (the queries it ran)."""


def compare(
    engines: Sequence[tuple[str, Runner, int]], rounds: int, budget_s: float
) -> dict[str, Timing]:
    """Time each (name, runner, query count) in ``rounds`` interleaved rounds.

    On a shared machine a burst of foreign load would hit whichever engine happened to run
    then; interleaving and taking the median per engine spreads it over all of them. Each
    engine gets ``budget_s`` seconds in total, split over the rounds.
    """
    qps: dict[str, list[float]] = {name: [] for name, _, _ in engines}
    found: dict[str, list[list[int]]] = {}
    for r in range(rounds):
        for name, run, count in engines:
            rate, got = timed_queries(
                run, count, warmup=20 if r == 0 else 0, budget_s=budget_s / rounds
            )
            qps[name].append(rate)
            found.setdefault(name, got)
    return {
        name: Timing(statistics.median(rates), rates, found[name]) for name, rates in qps.items()
    }


def filtered_truth(vectors: Matrix, queries: Matrix, mask: Bools) -> Ints:
    ids = np.flatnonzero(mask).astype(np.int64)
    truth: Ints = ids[data.exact_topk(vectors[ids], queries, 10)]
    return truth


# -- 5. recovery ---------------------------------------------------------------------------


def crash_child(args: argparse.Namespace) -> int:
    """The child of the recovery test: ingest, print ``acked N`` per batch, wait to be killed."""
    vectors = data.vectors(args.n, args.dim, args.seed)
    meta = data.metadata(args.n, args.seed)
    total = args.crash_n
    db = memcluster.open(args.crash_child)
    coll = db.create_collection("crash", dim=args.dim)
    for lo in range(0, total, args.batch):
        hi = min(lo + args.batch, total)
        coll.put_many(memories(vectors, meta, range(lo, hi)))
        if args.crash_snapshot_at and lo < args.crash_snapshot_at <= hi:
            db.maintain()
            for shard in coll._shards:
                shard.snapshot()
        print(f"acked {hi}", flush=True)
    time.sleep(3600)  # the parent kills us here
    return 1


@dataclass
class Recovery:
    acked: int
    recovered: int
    open_s: float
    first_search_s: float
    indexed_s: float
    """From the start of open() until every recovered item is in the graph again."""
    wal_bytes: int
    snapshots: int
    last_item_found: bool


def recovery_run(
    args: argparse.Namespace,
    root: Path,
    vectors: Matrix,
    queries: Matrix,
    total: int,
    snapshot_at: int,
) -> Recovery:
    with scratch_dir(root, "crash") as path:
        cmd = [
            sys.executable,
            "-m",
            "bench.engine",
            "--crash-child",
            str(path),
            "--crash-n",
            str(total),
            "--crash-snapshot-at",
            str(snapshot_at),
            "--n",
            str(args.n),
            "--dim",
            str(args.dim),
            "--seed",
            str(args.seed),
            "--batch",
            str(args.batch),
        ]
        child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        acked = 0
        try:
            for line in child.stdout:
                if line.startswith("acked "):
                    acked = int(line.split()[1])
                    if acked == total:
                        os.kill(child.pid, signal.SIGKILL)
                        break
        finally:
            if child.poll() is None and acked != total:
                os.kill(child.pid, signal.SIGKILL)
            child.wait()
            child.stdout.close()
        if acked != total:
            raise RuntimeError(f"crash child exited with {child.returncode} after acked {acked}")
        wal = sum(dir_bytes(p) for p in path.rglob("wal") if p.is_dir())
        snaps = sum(1 for p in path.rglob("state.bin"))
        start = time.perf_counter()
        db = memcluster.open(path)
        opened = time.perf_counter()
        coll = db.collection("crash")
        coll.search(queries[0], k=10)
        searched = time.perf_counter()
        try:
            recovered = coll.count()
            hits = coll.search(vectors[total - 1], k=1)
            last_found = bool(hits) and hits[0].memory.key == data.key(total - 1)
            wait_indexed(coll, recovered)
            indexed = time.perf_counter()
        finally:
            db.close()
    return Recovery(
        acked=acked,
        recovered=recovered,
        open_s=opened - start,
        first_search_s=searched - opened,
        indexed_s=indexed - start,
        wal_bytes=wal,
        snapshots=snaps,
        last_item_found=last_found,
    )


# -- 6. LoCoMo -----------------------------------------------------------------------------

_EVIDENCE_ID = re.compile(r"D:?(\d+):0*(\d+)")


def normalise_evidence(raw: Sequence[str]) -> set[str]:
    """Evidence dia ids as README.md says: split on [;,\\s]+, normalise D:?(\\d+):0*(\\d+)."""
    out: set[str] = set()
    for item in raw:
        for part in re.split(r"[;,\s]+", item):
            match = _EVIDENCE_ID.fullmatch(part)
            if match:
                out.add(f"D{int(match.group(1))}:{int(match.group(2))}")
    return out


@dataclass
class Locomo:
    questions: int
    recall: float
    exact_recall: float
    graph_recall: float
    qps: float
    exact_qps: float
    differing: int


def locomo(root: Path, where: Path) -> Locomo:
    convs = json.loads((where / "locomo10.json").read_text())
    mem_ids: list[str] = json.loads((where / "memories.ids.json").read_text())
    mem_vecs = np.load(where / "memories.all-MiniLM-L6-v2.npy").astype(np.float32)
    q_ids: list[str] = json.loads((where / "queries.ids.json").read_text())
    q_vecs = np.load(where / "queries.all-MiniLM-L6-v2.npy").astype(np.float32)
    row_of = {mid: i for i, mid in enumerate(mem_ids)}
    q_row = {qid: i for i, qid in enumerate(q_ids)}

    turns: dict[str, tuple[str, str, int]] = {}  # "conv/D1:3" -> (speaker, text, session)
    for conv in convs:
        sample = conv["sample_id"]
        talk = conv["conversation"]
        for name, value in talk.items():
            match = re.fullmatch(r"session_(\d+)", name)
            if not match or not isinstance(value, list):
                continue
            for turn in value:
                text = turn.get("text", "")
                if turn.get("blip_caption"):
                    text += f" [shares image: {turn['blip_caption']}]"
                turns[f"{sample}/{turn['dia_id']}"] = (turn["speaker"], text, int(match.group(1)))

    questions: list[tuple[str, int, set[str]]] = []  # (conversation, query row, evidence)
    for conv in convs:
        sample = conv["sample_id"]
        for qi, qa in enumerate(conv["qa"]):
            if qa.get("category") not in (1, 2, 3, 4):
                continue
            evidence = {
                e for e in normalise_evidence(qa.get("evidence", [])) if f"{sample}/{e}" in row_of
            }
            if evidence:
                questions.append((sample, q_row[f"{sample}/q{qi}"], evidence))

    def score(found: list[list[str]]) -> float:
        total = 0.0
        for (_, _, evidence), got in zip(questions, found, strict=True):
            total += len(evidence & set(got)) / len(evidence)
        return total / len(questions)

    # Exact numpy, per conversation.
    by_conv: dict[str, list[int]] = {}
    for i, mid in enumerate(mem_ids):
        by_conv.setdefault(mid.split("/", 1)[0], []).append(i)
    conv_rows = {s: np.array(rows, dtype=np.int64) for s, rows in by_conv.items()}
    conv_mats = {s: mem_vecs[rows] for s, rows in conv_rows.items()}

    def exact(i: int) -> list[int]:
        sample, row, _ = questions[i]
        top = conv_rows[sample][numpy_topk(conv_mats[sample], q_vecs[row], 10)]
        return top.tolist()  # type: ignore[no-any-return]

    exact_qps, exact_found = timed_queries(exact, len(questions), warmup=5)
    exact_keys = [[mem_ids[r].split("/", 1)[1] for r in rows] for rows in exact_found]

    def load_and_search(config: memcluster.Config, name: str) -> tuple[float, list[list[str]]]:
        with scratch_dir(root, name) as path:
            db = memcluster.open(path, config)
            try:
                coll = db.create_collection("locomo", dim=mem_vecs.shape[1])
                batch: list[memcluster.Memory] = []
                for i, mid in enumerate(mem_ids):
                    sample, dia = mid.split("/", 1)
                    speaker, text, session = turns[mid]
                    batch.append(
                        memcluster.Memory(
                            namespace=(sample,),
                            key=dia,
                            text=text,
                            vector=mem_vecs[i],
                            metadata={"session": session, "speaker": speaker},
                        )
                    )
                for lo in range(0, len(batch), 1000):
                    coll.put_many(batch[lo : lo + 1000])
                db.maintain()

                def run(i: int) -> list[str]:
                    sample, row, _ = questions[i]
                    hits = coll.search(q_vecs[row], k=10, namespace=(sample,))
                    return [h.memory.key for h in hits]

                qps, found = timed_queries(run, len(questions), warmup=5)
            finally:
                db.close()
        keys = [[str(k) for k in got] for got in found]
        return qps, keys

    qps, found = load_and_search(memcluster.Config(), "locomo")
    # The same with the exact paths turned off, so the graph answers (filtered by namespace).
    graph_cfg = memcluster.Config(exact_items_max=0, exact_filter_items_max=0)
    _, graph_found = load_and_search(graph_cfg, "locomo-graph")
    differing = sum(set(a) != set(b) for a, b in zip(found, exact_keys, strict=True))
    return Locomo(
        questions=len(questions),
        recall=score(found),
        exact_recall=score(exact_keys),
        graph_recall=score(graph_found),
        qps=qps,
        exact_qps=exact_qps,
        differing=differing,
    )


# -- main ----------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about 45 s")
    p.add_argument("--n", type=int, default=None, help="items (default 200000; quick 20000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--queries", type=int, default=None, help="ANN queries (default 1000)")
    p.add_argument("--exact-queries", type=int, default=None, help="exact numpy queries (200)")
    p.add_argument("--filter-hnsw-queries", type=int, default=None, help="hnswlib+filter (200)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (3)")
    p.add_argument(
        "--budget-s", type=float, default=None, help="most seconds per engine and series (30)"
    )
    p.add_argument("--single-n", type=int, default=None, help="items for single puts (20000)")
    p.add_argument("--threads", type=int, default=8, help="writer threads of ingest 1c")
    p.add_argument("--batch", type=int, default=1000, help="put_many batch size")
    p.add_argument("--shards", type=int, default=4, help="shards of the multi-shard collection")
    p.add_argument("--recovery-n", type=int, default=None, help="items of the crash test (100000)")
    p.add_argument("--locomo", type=Path, default=Path("/work/shared/data/locomo"))
    p.add_argument("--dir", type=Path, default=None, help="scratch root (default: a /tmp dir)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file (engine.json; quick: engine-quick.json)"
    )
    p.add_argument("--crash-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--crash-n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--crash-snapshot-at", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick

    def default(name: str, full: float, small: float) -> None:
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)

    default("n", 200_000, 20_000)
    default("queries", 1000, 200)
    default("exact_queries", 200, 50)
    default("filter_hnsw_queries", 200, 50)
    default("rounds", 3, 2)
    default("budget_s", 30.0, 5.0)
    default("single_n", 20_000, 2_000)
    default("recovery_n", 100_000, 10_000)
    if args.out is None:
        args.out = data.OUT / ("engine-quick.json" if quick else "engine.json")
    args.single_n = min(args.single_n, args.n)
    args.recovery_n = min(args.recovery_n, args.n)
    args.queries = max(args.queries, args.exact_queries, args.filter_hnsw_queries)
    return args


@dataclass
class Bench:
    """What every phase needs: settings, the report, the scratch root and the data."""

    args: argparse.Namespace
    cfg: memcluster.Config
    report: Report
    root: Path
    vectors: Matrix
    queries: Matrix
    meta: data.Metadata
    truth: Ints

    @property
    def n(self) -> int:
        return len(self.vectors)

    def compare(self, engines: Sequence[tuple[str, Runner, int]]) -> dict[str, Timing]:
        return compare(engines, self.args.rounds, self.args.budget_s)


CHROMA = "Chroma 1.5.9 embedded (reference, NOT measured here)"
INGEST_TARGET = f">= {INGEST_TARGET_RATIO:.0f}x Chroma"


def ingest_row(rid: str, measure: str, rate: float, note: str) -> Row:
    ok = rate >= INGEST_TARGET_RATIO * CHROMA_INSERTS_PER_S
    return Row(rid, measure, rate, "items/s", CHROMA, CHROMA_INSERTS_PER_S, INGEST_TARGET, ok, note)


def phase_bulk_ingest(b: Bench) -> Loaded:
    """Row 1d; returns the loaded 1-shard collection."""
    args, n = b.args, b.n
    err.log(f"ingest 1d: {n:,} items in batches of {args.batch}, 1 shard")
    one = ingest_batches(b.root, "one", b.vectors, b.meta, 1, args.batch)
    b.report.add(
        ingest_row(
            "1d",
            f"ingest: put_many batches of {args.batch}",
            n / one.ingest_s,
            f"{n:,} items, 1 shard; the graph is built in the background meanwhile"
            f" ({b.cfg.hnsw_threads} hnswlib thread(s))",
        )
    )
    return one


def phase_single_ingest(b: Bench) -> None:
    """Rows 1a-1c."""
    args, n = b.args, b.n
    sn = args.single_n
    part = f"first {sn:,} of {n:,} items" if sn < n else f"{n:,} items"
    record_bytes = 4 * args.dim + len(json.dumps(b.meta.item(0))) + len(b.meta.text(0)) + 40
    err.log(f"ingest 1a-1c: single puts of {sn:,} items")
    rate = ingest_single(b.root, b.vectors, b.meta, sn, 1)
    b.report.add(
        ingest_row("1a", "ingest: single puts, 1 thread", rate, f"{part}; fsync before each ack")
    )
    floor = bare_fsync_floor(b.root, min(sn, 5000), record_bytes)
    b.report.add(
        Row(
            "1b",
            "ingest: single puts, 1 thread",
            rate,
            "items/s",
            f"bare os.write+fsync of {record_bytes} B, 1 thread",
            floor,
            note="the disk's limit for one writer that fsyncs each item",
        )
    )
    rate = ingest_single(b.root, b.vectors, b.meta, sn, args.threads)
    b.report.add(
        ingest_row(
            "1c", f"ingest: single puts, {args.threads} threads", rate, f"{part}; group commit"
        )
    )


def phase_index_time(b: Bench, one: Loaded, build_s: float, threads: int) -> None:
    """Rows 1f-1g: how long until the graph holds everything."""
    b.report.add(
        Row(
            "1f",
            "ingest (1d) end -> all in graph",
            one.index_after_s,
            "s",
            "-",
            None,
            note=f"ingest took {one.ingest_s:.1f} s; polling describe().stats.indexed_items",
        )
    )
    b.report.add(
        Row(
            "1g",
            "ingest (1d) start -> all in graph",
            one.ingest_s + one.index_after_s,
            "s",
            f"raw hnswlib build, {threads} thread(s)",
            build_s,
            note=f"durable ingest + background indexing ({b.cfg.hnsw_threads} hnswlib thread(s))"
            " vs an in-memory graph build alone, on every core",
        )
    )


def hnsw_label(cfg: memcluster.Config) -> str:
    return f"raw hnswlib (M={cfg.hnsw_m}, efC={cfg.hnsw_ef_construction}, ef={cfg.hnsw_ef_search})"


def phase_search(b: Bench, one: Loaded, index: Any) -> None:
    """Rows 2a-2c: unfiltered search on the 1-shard collection."""
    args = b.args
    t = b.compare(
        [
            ("memcluster", memcluster_runner(one.coll, b.queries), args.queries),
            ("hnswlib", hnsw_runner(index, b.queries), args.queries),
            ("numpy", numpy_runner(b.vectors, np.arange(b.n), b.queries), args.exact_queries),
        ]
    )
    mc, hn, npy = t["memcluster"], t["hnswlib"], t["numpy"]
    recall = recall_at(mc.found, b.truth, 10)
    hnsw_recall = recall_at(hn.found, b.truth, 10)
    b.report.details["search_1_shard"] = {k: asdict(v) | {"found": None} for k, v in t.items()}
    label = hnsw_label(b.cfg)
    b.report.add(
        Row(
            "2a",
            "search QPS, 1 shard, k=10",
            mc.qps,
            "q/s",
            label,
            hn.qps,
            ">= 0.5x hnswlib",
            mc.qps >= 0.5 * hn.qps,
            f"median of {args.rounds} interleaved rounds; {len(mc.found)} sequential queries"
            f" per round (hnswlib {len(hn.found)})",
        )
    )
    b.report.add(
        Row(
            "2b",
            "recall@10, 1 shard",
            recall,
            "recall",
            label,
            hnsw_recall,
            ">= 0.95",
            recall >= 0.95,
            "ground truth: exact numpy",
        )
    )
    b.report.add(
        Row(
            "2c",
            "search QPS, 1 shard, k=10",
            mc.qps,
            "q/s",
            "exact numpy (matmul + argpartition)",
            npy.qps,
            note=f"numpy: {len(npy.found)} queries per round,"
            f" recall {recall_at(npy.found, b.truth, 10):.3f}",
        )
    )


def phase_filtered(b: Bench, one: Loaded, index: Any) -> None:
    """Rows 3a-3f: filtered search at 1% and 10% selectivity."""
    args, meta = b.args, b.meta
    selections: list[tuple[str, str, dict[str, Any], Bools]] = [
        ("abc", "1%", {"bucket": 42}, meta.bucket == 42),
        ("def", "10%", {"speaker": {"$in": ["Alice", "Bob"]}}, meta.speaker < 2),
    ]
    for letters, label, flt, mask in selections:
        rid = [f"3{c}" for c in letters]
        ftruth = filtered_truth(b.vectors, b.queries, mask)
        ids = np.flatnonzero(mask).astype(np.int64)
        sub = np.ascontiguousarray(b.vectors[ids])
        t = b.compare(
            [
                ("memcluster", memcluster_runner(one.coll, b.queries, flt), args.queries),
                ("numpy", numpy_runner(sub, ids, b.queries), args.queries),
                ("hnswlib", hnsw_runner(index, b.queries, mask), args.filter_hnsw_queries),
            ]
        )
        mc, npy, hn = t["memcluster"], t["numpy"], t["hnswlib"]
        recall = recall_at(mc.found, ftruth, 10)
        b.report.details[f"filtered_{label}"] = {
            k: asdict(v) | {"found": None} for k, v in t.items()
        }
        b.report.add(
            Row(
                rid[0],
                f"filtered QPS, {label}",
                mc.qps,
                "q/s",
                "exact numpy over the pre-filtered rows",
                npy.qps,
                note=f"{label} = {int(mask.sum()):,} items, filter {json.dumps(flt)};"
                f" {len(mc.found)} queries per round (numpy {len(npy.found)})",
            )
        )
        b.report.add(
            Row(
                rid[1],
                f"filtered QPS, {label}",
                mc.qps,
                "q/s",
                "hnswlib + Python filter callback",
                hn.qps,
                note=f"hnswlib: {len(hn.found)} queries per round",
            )
        )
        b.report.add(
            Row(
                rid[2],
                f"filtered recall@10, {label}",
                recall,
                "recall",
                "hnswlib + Python filter callback",
                recall_at(hn.found, ftruth, 10),
                ">= 0.95",
                recall >= 0.95,
                f"numpy over the pre-filtered rows: recall {recall_at(npy.found, ftruth, 10):.3f}",
            )
        )


def phase_memory(b: Bench, one: Loaded, hnsw_rss: int) -> None:
    """Rows 4a-4b."""
    n = b.n
    per_item = one.rss_growth / n
    b.report.add(
        Row(
            "4a",
            "RSS growth per item (1 shard)",
            per_item,
            "B/item",
            f"raw vector bytes ({b.args.dim} x 4)",
            4.0 * b.args.dim,
            note=f"{one.rss_growth / 2**20:,.0f} MiB for {n:,} items, graph included",
        )
    )
    b.report.add(
        Row(
            "4b",
            "RSS growth per item (1 shard)",
            per_item,
            "B/item",
            "raw hnswlib RSS growth per item",
            hnsw_rss / n,
            note=f"hnswlib: {hnsw_rss / 2**20:,.0f} MiB",
        )
    )


def phase_shards(b: Bench, index: Any) -> None:
    """Rows 1e, 2d, 2e: the same data in a multi-shard collection."""
    args, n, cfg = b.args, b.n, b.cfg
    err.log(f"ingest 1e: {n:,} items into {args.shards} shards")
    multi = ingest_batches(b.root, "multi", b.vectors, b.meta, args.shards, args.batch)
    try:
        t = b.compare(
            [
                ("memcluster", memcluster_runner(multi.coll, b.queries), args.queries),
                ("hnswlib", hnsw_runner(index, b.queries), args.queries),
            ]
        )
    finally:
        multi.db.close()
        shutil.rmtree(multi.path, ignore_errors=True)
    mc, hn = t["memcluster"], t["hnswlib"]
    recall = recall_at(mc.found, b.truth, 10)
    note = f"{args.shards} shards of ~{n // args.shards:,}, searched one after another"
    if n // args.shards <= cfg.exact_items_max:
        note += f"; <= exact_items_max {cfg.exact_items_max:,}, so scanned exactly"
    label = hnsw_label(cfg)
    b.report.add(
        Row(
            "2d",
            f"search QPS, {args.shards} shards, k=10",
            mc.qps,
            "q/s",
            label,
            hn.qps,
            ">= 0.5x hnswlib",
            mc.qps >= 0.5 * hn.qps,
            note,
        )
    )
    b.report.add(
        Row(
            "2e",
            f"recall@10, {args.shards} shards",
            recall,
            "recall",
            label,
            recall_at(hn.found, b.truth, 10),
            ">= 0.95",
            recall >= 0.95,
        )
    )
    b.report.add(
        ingest_row(
            "1e",
            f"ingest: put_many, {args.shards} shards",
            n / multi.ingest_s,
            f"then {multi.index_after_s:.1f} s until all in graph",
        )
    )


def phase_recovery(b: Bench) -> None:
    """Rows 5a-5d."""
    args = b.args
    rn = args.recovery_n
    err.log(f"recovery: a child ingests {rn:,} items and is SIGKILLed after the last ack")
    wal_only = recovery_run(args, b.root, b.vectors, b.queries, rn, 0)
    snap_at = max(args.batch, (rn * 9 // 10) // args.batch * args.batch)
    err.log(f"recovery: the same with a snapshot at {snap_at:,} items")
    with_snap = recovery_run(args, b.root, b.vectors, b.queries, rn, snap_at)
    b.report.details["recovery"] = {"wal_only": asdict(wal_only), "snapshot": asdict(with_snap)}
    for rid, label, rec, base in (
        ("5a", "WAL only", wal_only, None),
        ("5b", f"snapshot at {snap_at:,} + WAL tail", with_snap, wal_only),
    ):
        ok = rec.recovered == rec.acked and rec.last_item_found
        b.report.add(
            Row(
                rid,
                f"recovery: open + first search, {label}",
                rec.open_s + rec.first_search_s,
                "s",
                "-" if base is None else "recovery, WAL only",
                None if base is None else base.open_s + base.first_search_s,
                "all acked items back",
                ok,
                f"recovered {rec.recovered:,} of {rec.acked:,} acked;"
                f" open {rec.open_s:.2f} s + search {rec.first_search_s:.2f} s;"
                f" WAL on disk {rec.wal_bytes / 2**20:,.0f} MiB,"
                f" {rec.snapshots} snapshot(s)",
            )
        )
    for rid, label, rec, base in (
        ("5c", "WAL only", wal_only, None),
        ("5d", "snapshot + WAL tail", with_snap, wal_only),
    ):
        b.report.add(
            Row(
                rid,
                f"recovery: open -> all in graph, {label}",
                rec.indexed_s,
                "s",
                "-" if base is None else "recovery, WAL only",
                None if base is None else base.indexed_s,
                note="" if base is not None else "searches scan the unindexed part exactly",
            )
        )


def phase_locomo(b: Bench) -> None:
    """Rows 6a-6c."""
    where = b.args.locomo
    if not (where / "locomo10.json").exists():
        err.log(f"LoCoMo skipped: no {where}/locomo10.json")
        return
    err.log("LoCoMo")
    lo = locomo(b.root, where)
    b.report.details["locomo"] = asdict(lo)
    b.report.add(
        Row(
            "6a",
            f"LoCoMo recall@10 ({lo.questions:,} questions)",
            lo.recall,
            "recall",
            "exact numpy, same run",
            lo.exact_recall,
            "= exact",
            abs(lo.recall - lo.exact_recall) < 1e-9,
            f"README: {LOCOMO_README_RECALL}; {lo.differing} questions with a different top-10 set",
        )
    )
    b.report.add(
        Row(
            "6b",
            "LoCoMo recall@10, graph forced",
            lo.graph_recall,
            "recall",
            "exact numpy, same run",
            lo.exact_recall,
            note="Config(exact_items_max=0, exact_filter_items_max=0)",
        )
    )
    b.report.add(
        Row(
            "6c",
            "LoCoMo search QPS (namespace = conversation)",
            lo.qps,
            "q/s",
            "exact numpy per conversation",
            lo.exact_qps,
        )
    )


def run(args: argparse.Namespace) -> Report:
    cfg = memcluster.Config()
    report = Report(
        machine=machine(),
        params={
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if not k.startswith("crash")
        }
        | {
            "hnsw_m": cfg.hnsw_m,
            "hnsw_ef_construction": cfg.hnsw_ef_construction,
            "hnsw_ef_search": cfg.hnsw_ef_search,
            "hnsw_threads": cfg.hnsw_threads,
            "exact_items_max": cfg.exact_items_max,
            "exact_filter_items_max": cfg.exact_filter_items_max,
            "durability": str(cfg.durability),
        },
    )
    m = report.machine
    err.print(
        f"[bold]machine[/]: {m['nproc']} cpus, {m['cpu']}, {m['memory_gib']} GiB,"
        f" Python {m['python']}, numpy {m['numpy']}, memcluster {m['memcluster_commit']},"
        f" load {m['loadavg_start']}, OPENBLAS_NUM_THREADS={m['openblas_num_threads']}"
    )
    root = Path(tempfile.mkdtemp(prefix="memcluster-bench-", dir=args.dir))
    free_gib = shutil.disk_usage(root).free / 2**30
    report.details["scratch"] = {"root": str(root), "free_gib": round(free_gib, 1)}
    err.log(f"scratch dir {root} ({free_gib:.0f} GiB free)")
    start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        vectors = data.vectors(args.n, args.dim, args.seed)
        queries = data.queries(args.queries, args.dim, args.seed)
        truth = data.exact_topk(vectors, queries, 10)
        took = time.perf_counter() - t0
        err.log(f"data: {args.n:,} x {args.dim}, {len(queries)} queries, truth in {took:.1f} s")
        b = Bench(
            args, cfg, report, root, vectors, queries, data.metadata(args.n, args.seed), truth
        )
        # Raw hnswlib first, then the bulk ingest: each RSS growth is measured on a heap that
        # has not yet freed much, so reused memory does not hide either one.
        threads = os.cpu_count() or 1
        err.log(f"raw hnswlib build on {threads} threads")
        index, build_s, hnsw_rss = raw_hnsw(vectors, cfg, threads)
        one = phase_bulk_ingest(b)
        phase_index_time(b, one, build_s, threads)
        phase_single_ingest(b)
        phase_search(b, one, index)
        phase_filtered(b, one, index)
        phase_memory(b, one, hnsw_rss)
        one.db.close()
        shutil.rmtree(one.path, ignore_errors=True)
        del one
        phase_shards(b, index)
        del index
        gc.collect()
        phase_recovery(b)
        phase_locomo(b)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report.details["elapsed_s"] = round(time.perf_counter() - start, 1)
    report.machine["loadavg_end"] = _loadavg()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.crash_child is not None:
        return crash_child(args)
    report = run(args)
    out = Console() if sys.stdout.isatty() else Console(width=180)
    m = report.machine
    out.print(
        f"machine: {m['nproc']} cpus ({m['cpu']}), {m['memory_gib']} GiB RAM,"
        f" Python {m['python']}, numpy {m['numpy']}, hnswlib {m['hnswlib']};"
        f" memcluster {m['memcluster_commit']}; {m['time']};"
        f" load average {m['loadavg_start']} at start, {m['loadavg_end']} at end;"
        f" OPENBLAS_NUM_THREADS={m['openblas_num_threads']}",
        highlight=False,
    )
    p = report.params
    out.print(
        f"data: {p['n']:,} x {p['dim']} clustered unit vectors (bench/data.py, seed {p['seed']});"
        f" {p['queries']} queries; default Config (durability {p['durability']},"
        f" M={p['hnsw_m']}, ef_construction={p['hnsw_ef_construction']},"
        f" ef={p['hnsw_ef_search']}); QPS = median of {p['rounds']} interleaved rounds;"
        f" total {report.details.get('elapsed_s', 0):.0f} s",
        highlight=False,
    )
    out.print(render(report))
    for row in ordered(report.rows):
        if row.note:
            out.print(f"  {row.id}: {row.note}", highlight=False)
    write_json(report, args.out)
    out.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
