"""Collection layouts in a real cluster (etcd + node processes): a range shard splitting
while writes go on, centroids learned after the first writes, and the three strategies giving
exactly the exact-search recall on LoCoMo.

These need real processes because the layout changes are the controller's (an elected node)
and the data moves between node processes over the binary protocol."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

import memcluster
from cluster_util import Cluster, cluster_fixture, wait_for
from memcluster import Memory
from test_coordinator import EtcdProcess


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, etcd: EtcdProcess
) -> Iterator[Cluster]:
    for c in cluster_fixture(
        request, tmp_path_factory.mktemp("layouts"), etcd=etcd, name="layouts"
    ):
        c.add_nodes("n1", "n2", "n3")
        yield c


def _memories(ids: Sequence[int], vectors: np.ndarray) -> list[Memory]:
    return [
        Memory(namespace=("a",), key=f"k{i}", vector=vectors[i], metadata={"t": float(i)})
        for i in ids
    ]


@pytest.mark.slow
def test_a_range_shard_splits_while_writes_go_on(cluster: Cluster, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(3000, 8)).astype(np.float32)
    client = cluster.client("n1", "binary")
    coll = client.create_collection(
        "ranged",
        dim=8,
        shards=2,
        sharding="range",
        range_field="t",
        boundaries=[1000.0],
        split_items=700,
    )
    coll.put_many(_memories(range(0, 1200), vectors))
    acked: set[str] = set()
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        writer = cluster.client("n2", "binary")
        order = list(range(1200, 3000))
        for start in range(0, len(order), 50):
            batch = order[start : start + 50]
            try:
                writer.collection("ranged").put_many(_memories(batch, vectors))
            except BaseException as exc:
                errors.append(exc)
                return
            acked.update(f"k{i}" for i in batch)
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    wait_for(lambda: client.collection("ranged").config.shards >= 4, 60, "two splits")
    thread.join(120)
    assert not errors, errors
    assert done.is_set()
    wait_for(lambda: client.collection("ranged").config.shards >= 5, 60, "more splits")
    layout = client.collection("ranged").config
    assert layout.range_shards is not None
    assert sorted(layout.range_shards) == list(range(layout.shards))
    coll = client.collection("ranged")
    assert coll.count() == 3000
    keys = {m.key for m in coll.iter()}
    assert keys == {f"k{i}" for i in range(3000)}
    for i in rng.choice(3000, 50, replace=False).tolist():
        got = coll.get(("a",), f"k{i}")
        assert got is not None
        assert got.metadata == {"t": float(i)}
    # A range filter touches only the shards of its interval and misses nothing.
    assert coll.count(filter={"t": {"$gte": 500, "$lt": 2500}}) == 2000
    hits = coll.search(vectors[42], k=5, filter={"t": {"$lt": 100}})
    assert hits[0].memory.key == "k42"
    assert all(h.memory.metadata["t"] < 100 for h in hits)


@pytest.mark.slow
def test_centroids_are_learned_after_the_first_writes(cluster: Cluster, seed: int) -> None:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 16)) * 5
    vectors = (centers[rng.integers(0, 3, 900)] + rng.normal(size=(900, 16))).astype(np.float32)
    client = cluster.client("n3", "http")
    coll = client.create_collection("learned", dim=16, shards=3, sharding="vector", train_after=600)
    for start in range(0, 900, 100):
        coll.put_many(_memories(range(start, start + 100), vectors))
    wait_for(lambda: client.collection("learned").config.centroids is not None, 60, "centroids")
    config = client.collection("learned").config
    assert config.centroids is not None
    assert len(config.centroids) == 3
    coll = client.collection("learned")
    wait_for(lambda: coll.count() == 900, 30, "the moved copies to be deleted")
    per_shard = coll.describe().stats.last_seq
    assert all(seq > 0 for seq in per_shard), per_shard  # every shard received memories
    for i in rng.choice(900, 30, replace=False).tolist():
        hits = coll.search(vectors[i], k=1, nprobe=1)
        assert hits[0].memory.key == f"k{i}"  # each memory sits with its nearest centroid


# -- LoCoMo: exactly the exact-search recall across shards ---------------------------------

_EVIDENCE_ID = re.compile(r"D:?(\d+):0*(\d+)")


def _locomo_dir() -> Path | None:
    for candidate in (
        os.environ.get("MEMCLUSTER_LOCOMO"),
        Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo",
        "/work/shared/data/locomo",
    ):
        if candidate and (Path(candidate) / "memories.all-MiniLM-L6-v2.npy").exists():
            return Path(candidate)
    return None


LOCOMO = _locomo_dir()


def _questions(where: Path, row_of: dict[str, int]) -> list[tuple[int, set[int]]]:
    """(query row, evidence memory rows) of the category 1-4 questions with evidence, as the
    data's README defines them."""
    convs = json.loads((where / "locomo10.json").read_text())
    q_ids: list[str] = json.loads((where / "queries.ids.json").read_text())
    q_row = {qid: i for i, qid in enumerate(q_ids)}
    out = []
    for conv in convs:
        sample = conv["sample_id"]
        for qi, qa in enumerate(conv["qa"]):
            if qa.get("category") not in (1, 2, 3, 4):
                continue
            rows = set()
            for item in qa.get("evidence", []):
                for part in re.split(r"[;,\s]+", item):
                    match = _EVIDENCE_ID.fullmatch(part)
                    if match:
                        dia = f"{sample}/D{int(match.group(1))}:{int(match.group(2))}"
                        if dia in row_of:
                            rows.add(row_of[dia])
            if rows:
                out.append((q_row[f"{sample}/q{qi}"], rows))
    return out


def _recall(found: Sequence[Sequence[int]], questions: Sequence[tuple[int, set[int]]]) -> float:
    total = sum(len(ev & set(got)) / len(ev) for (_, ev), got in zip(questions, found, strict=True))
    return total / len(questions)


@pytest.mark.slow
@pytest.mark.skipif(LOCOMO is None, reason="no LoCoMo data (../shared/data/locomo)")
@pytest.mark.parametrize("strategy", ["hash", "range", "vector"])
def test_locomo_recall_across_shards_equals_exact_search(cluster: Cluster, strategy: str) -> None:
    assert LOCOMO is not None
    memories = np.load(LOCOMO / "memories.all-MiniLM-L6-v2.npy").astype(np.float32)
    queries = np.load(LOCOMO / "queries.all-MiniLM-L6-v2.npy").astype(np.float32)
    ids: list[str] = json.loads((LOCOMO / "memories.ids.json").read_text())
    row_of = {mid: i for i, mid in enumerate(ids)}
    questions = _questions(LOCOMO, row_of)
    assert len(memories) == 5882
    assert len(questions) == 1536
    exact = [
        np.argsort(-(memories @ queries[q]), kind="stable")[:10].tolist() for q, _ in questions
    ]
    exact_recall = _recall(exact, questions)
    assert round(exact_recall, 3) == 0.247  # the data's README

    client = cluster.client("n2", "binary")
    name = f"locomo-{strategy}"
    options: dict[str, object] = {"shards": 3, "sharding": strategy}
    if strategy == "range":
        options.update(range_field="row", boundaries=[2000.0, 4000.0])
    if strategy == "vector":
        options.update(sample=memories, nprobe=1)  # nprobe=1 by default: the search says all
    coll = client.create_collection(name, dim=384, metric="cosine", **options)  # type: ignore[arg-type]
    for start in range(0, len(memories), 1000):
        coll.put_many(
            [
                Memory(namespace=("locomo",), key=str(i), vector=memories[i], metadata={"row": i})
                for i in range(start, min(start + 1000, len(memories)))
            ]
        )
    found = []
    for q, _ in questions:
        hits = coll.search(queries[q], k=10, nprobe=0)
        found.append([int(h.memory.key) for h in hits])
    recall = _recall(found, questions)
    print(f"{strategy}: recall@10 {recall:.4f}, exact {exact_recall:.4f}")
    assert recall == pytest.approx(exact_recall, abs=1e-12)
    differing = sum(set(f) != set(e) for f, e in zip(found, exact, strict=True))
    assert differing == 0
    client.drop_collection(name)


def test_embedded_refuses_layouts_that_need_a_cluster(tmp_path: Path) -> None:
    with memcluster.open(tmp_path) as db:
        with pytest.raises(memcluster.InvalidArgument, match="cluster"):
            db.create_collection(
                "r",
                dim=4,
                shards=2,
                sharding="range",
                range_field="t",
                boundaries=[1.0],
                split_items=10,
            )
        with pytest.raises(memcluster.InvalidArgument, match="cluster"):
            db.create_collection("v", dim=4, shards=2, sharding="vector", train_after=10)


def test_memories_moving_between_shards_are_never_lost(cluster: Cluster) -> None:
    """Two writers move the same memories back and forth between two range shards at once:
    no acknowledged write may vanish (the old copy is deleted only while unchanged), and
    ``if_version`` holds across a move."""
    a, b = cluster.client("n1", "binary"), cluster.client("n2", "http")
    coll = a.create_collection(
        "moving", dim=4, shards=2, sharding="range", range_field="t", boundaries=[10.0]
    )
    keys = [f"m{i}" for i in range(40)]
    errors: list[BaseException] = []

    def write(client: memcluster.Client, t: float) -> None:
        try:
            for _ in range(5):
                client.collection("moving").put_many(
                    [
                        Memory(namespace=("a",), key=k, vector=np.ones(4), metadata={"t": t})
                        for k in keys
                    ]
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=write, args=(a, 5.0)),
        threading.Thread(target=write, args=(b, 15.0)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for key in keys:
        got = coll.get(("a",), key)
        assert got is not None, key
        assert got.metadata["t"] in (5.0, 15.0)
    # A conditional write follows the memory wherever it is.
    current = coll.get(("a",), "m0")
    assert current is not None
    moved_to = 25.0 if current.metadata["t"] < 10 else 1.0
    coll.put(("a",), "m0", vector=np.ones(4), metadata={"t": moved_to}, if_version=current.version)
    again = coll.get(("a",), "m0")
    assert again is not None
    assert again.metadata == {"t": moved_to}
    assert again.version > current.version  # versions never go back across a move
    with pytest.raises(memcluster.VersionConflict):
        coll.put(("a",), "m0", vector=np.ones(4), metadata={"t": 3.0}, if_version=0)
    with pytest.raises(memcluster.VersionConflict):
        coll.put(("a",), "m0", vector=np.ones(4), metadata={"t": 3.0}, if_version=current.version)
    # The next writes tidy up any duplicate that concurrent moves left: one copy each.
    coll.put_many(
        [Memory(namespace=("a",), key=k, vector=np.ones(4), metadata={"t": 1.0}) for k in keys]
    )
    assert coll.count() == len(keys)
