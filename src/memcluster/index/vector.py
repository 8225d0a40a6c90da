"""Vector search: an hnswlib graph for sealed data and exact numpy scans.

Scores are "higher is better" for every metric: cosine and dot give the inner product (cosine
vectors are stored normalised), l2 gives the negative squared Euclidean distance.

A shard uses two structures together (DESIGN.md §4): fresh writes stay in an exact buffer and
a background step moves them into the graph, so a write never waits for graph insertion; a
search merges the graph's answer with an exact scan of the buffer. This module holds the graph
(:class:`HnswIndex`), its in-memory twin for tests (:class:`ExactIndex`, same protocol, exact
answers) and the exact scan (:func:`exact_topk`).

Concurrency of :class:`HnswIndex`: one writer thread at a time calls ``add``/``mark_deleted``
(the shard's background step); searches from any thread may run at the same time as that
writer, as hnswlib allows. Resizing and saving the graph take the lock exclusively. A search
that overlaps an insertion may find fewer than k results; ``search`` then retries with a
smaller k and returns what it found, and the shard's planner tops up from an exact scan.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import hnswlib
import numpy as np
import numpy.typing as npt

from memcluster.core.types import Metric

Labels = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float32]
Matrix = npt.NDArray[np.float32]


def scores(matrix: Matrix, query: npt.NDArray[np.float32], metric: Metric) -> Scores:
    """The score of every row of ``matrix`` against ``query``."""
    dots: Scores = matrix @ query
    if metric is Metric.L2:
        sq = np.einsum("ij,ij->i", matrix, matrix)
        l2: Scores = (2.0 * dots - sq - float(query @ query)).astype(np.float32, copy=False)
        return l2
    return dots


def topk(values: Scores, k: int) -> npt.NDArray[np.intp]:
    """Positions of the k largest values, best first (ties: lower position first)."""
    n = values.shape[0]
    if k <= 0 or n == 0:
        return np.empty(0, dtype=np.intp)
    part = np.argpartition(-values, k - 1)[:k] if k < n else np.arange(n)
    order = np.lexsort((part, -values[part]))
    return part[order]


def exact_topk(
    matrix: Matrix, query: npt.NDArray[np.float32], k: int, metric: Metric
) -> tuple[npt.NDArray[np.intp], Scores]:
    """Exact top-k over the rows of ``matrix``: (row positions, scores), best first."""
    s = scores(matrix, query, metric)
    pos = topk(s, k)
    return pos, s[pos]


class VectorIndex(Protocol):
    """An approximate nearest-neighbour index over integer labels (shard slots).

    ``add`` inserts or replaces labels (a deleted label comes back to life); ``mark_deleted``
    hides labels from results. One thread at a time may call ``add`` and ``mark_deleted``;
    ``search`` may run concurrently with them.
    """

    def add(self, vectors: Matrix, labels: Labels, threads: int = 1) -> None:
        """Insert or replace ``labels``, using up to ``threads`` threads."""
        ...

    def mark_deleted(self, labels: Labels) -> None:
        """Hide labels; labels that are absent or already deleted are ignored."""
        ...

    def search(self, query: npt.NDArray[np.float32], k: int, ef: int) -> tuple[Labels, Scores]:
        """Up to k (label, score) pairs, best first. May return fewer than k."""
        ...

    def __len__(self) -> int:
        """Labels present and not deleted."""
        ...

    def vectors(self, labels: Labels) -> Matrix:
        """The stored vectors of ``labels`` (which must be present), one row each."""
        ...

    def save(self, path: Path) -> None: ...


class _RWLock:
    """Many readers or one exclusive holder; exclusive waiters block new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._exclusive = False
        self._waiting = 0

    def acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()


_SPACE = {Metric.COSINE: "ip", Metric.DOT: "ip", Metric.L2: "l2"}


class HnswIndex:
    """An hnswlib HNSW graph whose labels are shard slots."""

    def __init__(
        self,
        dim: int,
        metric: Metric,
        *,
        m: int,
        ef_construction: int,
        capacity: int = 1024,
        path: Path | None = None,
    ) -> None:
        """A new empty graph, or the one saved at ``path``."""
        self.metric = metric
        self._lock = _RWLock()
        self._index = hnswlib.Index(space=_SPACE[metric], dim=dim)
        if path is not None:
            self._index.load_index(str(path), max_elements=max(capacity, 1))
        else:
            self._index.init_index(
                max_elements=max(capacity, 1), ef_construction=ef_construction, M=m
            )
        # hnswlib does not report how many labels are deleted; the shard re-marks its dead
        # slots after loading a saved graph, which refills this set.
        self._deleted: set[int] = set()

    def __len__(self) -> int:
        return int(self._index.element_count) - len(self._deleted)

    def add(self, vectors: Matrix, labels: Labels, threads: int = 1) -> None:
        if len(labels) == 0:
            return
        needed = int(labels.max()) + 1
        if needed > self._index.get_max_elements():
            self._lock.acquire_exclusive()
            try:
                current = self._index.get_max_elements()
                self._index.resize_index(max(needed, current + current // 4, 1024))
            finally:
                self._lock.release_exclusive()
        self._lock.acquire_shared()
        try:
            self._index.add_items(vectors, labels, num_threads=threads)
            self._deleted.difference_update(labels.tolist())
        finally:
            self._lock.release_shared()

    def vectors(self, labels: Labels) -> Matrix:
        self._lock.acquire_shared()
        try:
            return np.asarray(self._index.get_items(labels.tolist()), dtype=np.float32)
        finally:
            self._lock.release_shared()

    def mark_deleted(self, labels: Labels) -> None:
        self._lock.acquire_shared()
        try:
            for label in labels.tolist():
                try:
                    self._index.mark_deleted(label)
                except RuntimeError as exc:
                    if "already deleted" not in str(exc):
                        continue  # never added: nothing to hide
                self._deleted.add(label)
        finally:
            self._lock.release_shared()

    def search(self, query: npt.NDArray[np.float32], k: int, ef: int) -> tuple[Labels, Scores]:
        self._lock.acquire_shared()
        try:
            k = min(k, len(self))
            while k > 0:
                # hnswlib's ef is index-global; concurrent searches set the same value.
                self._index.set_ef(max(ef, k))
                try:
                    labels, dist = self._index.knn_query(query, k=k, num_threads=1)
                except RuntimeError:
                    k //= 2  # fewer than k reachable (deletions, concurrent insert)
                    continue
                out_scores = -dist[0] if self.metric is Metric.L2 else 1.0 - dist[0]
                return labels[0].astype(np.int64), out_scores.astype(np.float32)
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        finally:
            self._lock.release_shared()

    def save(self, path: Path) -> None:
        self._lock.acquire_exclusive()
        try:
            self._index.save_index(str(path))
        finally:
            self._lock.release_exclusive()


class ExactIndex:
    """The in-memory twin of :class:`HnswIndex`: the same protocol, answered exactly."""

    def __init__(self, dim: int, metric: Metric) -> None:
        self.metric = metric
        self._dim = dim
        self._vectors: dict[int, npt.NDArray[np.float32]] = {}

    def __len__(self) -> int:
        return len(self._vectors)

    def add(self, vectors: Matrix, labels: Labels, threads: int = 1) -> None:
        for row, label in zip(vectors, labels.tolist(), strict=True):
            self._vectors[label] = row.copy()

    def vectors(self, labels: Labels) -> Matrix:
        return np.stack([self._vectors[label] for label in labels.tolist()])

    def mark_deleted(self, labels: Labels) -> None:
        for label in labels.tolist():
            self._vectors.pop(label, None)

    def search(self, query: npt.NDArray[np.float32], k: int, ef: int) -> tuple[Labels, Scores]:
        if not self._vectors:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        labels = np.fromiter(self._vectors, dtype=np.int64, count=len(self._vectors))
        matrix = np.stack(list(self._vectors.values()))
        pos, s = exact_topk(matrix, query, k, self.metric)
        return labels[pos], s

    def save(self, path: Path) -> None:
        """Nothing to save: a shard with this twin rebuilds it from its slots on load."""
