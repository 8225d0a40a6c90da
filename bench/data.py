"""Synthetic benchmark data: clustered unit vectors with metadata, deterministic and cached.

Vectors imitate sentence embeddings: ``clusters`` random unit centers, and around each a
cloud that spreads mostly in a low-dimensional subspace of its own (``local_dim`` directions)
plus a little isotropic noise, normalised to unit length. Real embeddings have a low
intrinsic dimension; plain isotropic Gaussian noise in 384-d would make every neighbour
nearly equidistant and any ANN index look worse than it is in practice.

Every array is a pure function of (kind, n, dim, seed), computed with numpy's PCG64, and is
cached in ``bench/out/`` as ``.npy`` so a rerun (and the crash-test child process) loads the
same bytes instead of regenerating them.

Metadata of item ``i`` (columns, so ground truth is a numpy mask)::

    speaker  one of SPEAKERS (20 names), uniform at random       -> 5% each
    session  int in [0, 100), uniform at random                  -> 1% each
    topic    "topic-NNN", NNN in [0, 1000), uniform at random    -> 0.1% each
    bucket   i % 100                                             -> exactly 1% each
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

OUT = Path(__file__).resolve().parent / "out"

Matrix = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]

SPEAKERS = (
    "Alice",
    "Bob",
    "Carol",
    "Dave",
    "Erin",
    "Frank",
    "Grace",
    "Heidi",
    "Ivan",
    "Judy",
    "Mallory",
    "Niaj",
    "Olivia",
    "Peggy",
    "Rupert",
    "Sybil",
    "Trent",
    "Uma",
    "Victor",
    "Walter",
)
TOPICS = 1000
SESSIONS = 100
BUCKETS = 100

_CLUSTERS = 200
_LOCAL_DIM = 32
_LOCAL_SPREAD = 1.0
_NOISE = 0.3
_GEN_VERSION = 1
"""Bump when the generator changes, so stale caches are not reused."""


def _cached(name: str, make: Any) -> Any:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.v{_GEN_VERSION}.npy"
    if path.exists():
        return np.load(path)
    array = make()
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.rename(path)
    return array


def _model(dim: int, seed: int) -> tuple[Matrix, Matrix]:
    """Cluster centers [clusters, dim] and local bases [clusters, local_dim, dim]."""
    rng = np.random.default_rng([seed, dim, 0])
    centers = rng.standard_normal((_CLUSTERS, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    bases = rng.standard_normal((_CLUSTERS, _LOCAL_DIM, dim), dtype=np.float32)
    bases /= np.linalg.norm(bases, axis=2, keepdims=True)
    return centers, bases


def _sample(n: int, dim: int, seed: int, stream: int) -> Matrix:
    centers, bases = _model(dim, seed)
    rng = np.random.default_rng([seed, dim, stream, n])
    labels = rng.integers(0, _CLUSTERS, size=n)
    out = np.empty((n, dim), dtype=np.float32)
    step = 8192
    for start in range(0, n, step):
        lab = labels[start : start + step]
        m = len(lab)
        z = rng.standard_normal((m, _LOCAL_DIM), dtype=np.float32)
        z *= _LOCAL_SPREAD / np.sqrt(_LOCAL_DIM)
        local = np.einsum("ml,mld->md", z, bases[lab])
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (_NOISE / np.sqrt(dim))
        block = centers[lab] + local + noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + m] = block
    return out


def vectors(n: int, dim: int, seed: int = 1) -> Matrix:
    """The first ``n`` data vectors: float32 [n, dim], unit length."""
    return np.asarray(_cached(f"vectors-{n}x{dim}-s{seed}", lambda: _sample(n, dim, seed, 1)))


def queries(n: int, dim: int, seed: int = 1) -> Matrix:
    """``n`` query vectors from the same distribution as :func:`vectors`, not in the data."""
    return np.asarray(_cached(f"queries-{n}x{dim}-s{seed}", lambda: _sample(n, dim, seed, 2)))


@dataclass(frozen=True)
class Metadata:
    """Metadata columns of items [0, n); see the module docstring."""

    speaker: Ints
    session: Ints
    topic: Ints
    bucket: Ints

    def item(self, i: int) -> dict[str, Any]:
        """The metadata object of item ``i``, as stored in memcluster."""
        return {
            "speaker": SPEAKERS[int(self.speaker[i])],
            "session": int(self.session[i]),
            "topic": f"topic-{int(self.topic[i]):03d}",
            "bucket": int(self.bucket[i]),
        }

    def text(self, i: int) -> str:
        """A short text for item ``i`` (about 50 bytes)."""
        return (
            f"{SPEAKERS[int(self.speaker[i])]} on topic-{int(self.topic[i]):03d}"
            f" in session {int(self.session[i])}"
        )


def metadata(n: int, seed: int = 1) -> Metadata:
    """Metadata of items [0, n)."""
    rng = np.random.default_rng([seed, 3, n])
    return Metadata(
        speaker=rng.integers(0, len(SPEAKERS), size=n),
        session=rng.integers(0, SESSIONS, size=n),
        topic=rng.integers(0, TOPICS, size=n),
        bucket=np.arange(n, dtype=np.int64) % BUCKETS,
    )


def key(i: int) -> str:
    """The memcluster key of item ``i``; :func:`item_of` inverts it."""
    return f"m{i:07d}"


def item_of(key: str) -> int:
    return int(key[1:])


def exact_topk(data: Matrix, query_rows: Matrix, k: int, block: int = 256) -> Ints:
    """Exact top-``k`` by inner product for each query: [len(query_rows), k], best first."""
    out = np.empty((len(query_rows), k), dtype=np.int64)
    for start in range(0, len(query_rows), block):
        sims = query_rows[start : start + block] @ data.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        out[start : start + block] = np.take_along_axis(part, order, axis=1)
    return out
