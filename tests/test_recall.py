"""Search quality at default settings: recall@10 against exact search.

Goal: the graph path (hnswlib plus the exact buffer) at default settings finds at least 95% of
the true top 10. Method: 20k clustered vectors (more than ``exact_items_max``, so the graph is
used), part of them still in the buffer, compared with exact numpy search; and the real
LoCoMo embeddings (``../shared/data/locomo``) with the graph forced on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import memcluster
from memcluster import Memory
from memcluster.core.config import Config


def clustered(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centers = rng.standard_normal((50, dim)).astype(np.float32)
    data = centers[rng.integers(0, 50, n)] + 0.4 * rng.standard_normal((n, dim)).astype(np.float32)
    normed: np.ndarray = data / np.linalg.norm(data, axis=1, keepdims=True)
    return normed


def recall_at_10(coll: memcluster.Collection, queries: np.ndarray, data: np.ndarray) -> float:
    """Mean fraction of the exact top 10 (keys are row numbers of ``data``) that search finds."""
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    found = [{int(h.memory.key) for h in coll.search(vector=q, k=10)} for q in queries]
    return float(
        np.mean([len(f & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)])
    )


@pytest.mark.slow
def test_default_search_reaches_recall_095(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, dim = 20_000, 64
    data = clustered(n + 100, dim, rng)
    with memcluster.open(tmp_path, Config(background=False)) as db:
        coll = db.create_collection("m", dim=dim, metric="cosine")
        for start in range(0, n, 5000):
            coll.put_many(
                [
                    Memory(namespace=("ns",), key=str(i), vector=data[i])
                    for i in range(start, start + 5000)
                ]
            )
        db.maintain()
        # A few fresh writes stay in the exact buffer.
        coll.put_many(
            [Memory(namespace=("ns",), key=str(i), vector=data[i]) for i in range(n, n + 100)]
        )
        assert coll.describe().stats.indexed_items == n
        # Queries near stored memories, as an agent's questions are near what it stored.
        near = data[rng.integers(0, n, 200)] + 0.1 * rng.standard_normal((200, dim))
        queries = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)
        recall = recall_at_10(coll, queries, data)
    print(f"recall@10 = {recall:.4f}")
    assert recall >= 0.95


LOCOMO = next(
    (
        Path(p)
        for p in (
            os.environ.get("MEMCLUSTER_LOCOMO"),
            Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo",
            "/work/shared/data/locomo",  # where the evaluation data lives on these machines
        )
        if p and (Path(p) / "memories.all-MiniLM-L6-v2.npy").exists()
    ),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo",
)


@pytest.mark.slow
@pytest.mark.skipif(
    not (LOCOMO / "memories.all-MiniLM-L6-v2.npy").exists(), reason="no LoCoMo data"
)
def test_graph_recall_on_real_embeddings(tmp_path: Path) -> None:
    data = np.load(LOCOMO / "memories.all-MiniLM-L6-v2.npy")
    queries = np.load(LOCOMO / "queries.all-MiniLM-L6-v2.npy")[:300]
    config = Config(background=False, exact_items_max=0)
    with memcluster.open(tmp_path, config) as db:
        coll = db.create_collection("m", dim=data.shape[1], metric="cosine")
        coll.put_many([Memory(namespace=("ns",), key=str(i), vector=v) for i, v in enumerate(data)])
        db.maintain()
        recall = recall_at_10(coll, queries, data)
    print(f"LoCoMo graph recall@10 = {recall:.4f}")
    assert recall >= 0.95
