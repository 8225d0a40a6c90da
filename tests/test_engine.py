"""Behaviour of the embedded engine: writes, versions, TTL, capacity, search, list, recovery."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

import memcluster
from memcluster import Memory
from memcluster.core.clock import ManualClock
from memcluster.core.config import Config

NS = ("team-a", "agent-7")


def vec(*values: float) -> list[float]:
    return list(values)


def rand_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


# -- writes and versions ----------------------------------------------------------------------


def test_put_then_get_returns_the_memory_with_its_version(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=3, metric="dot")
    version = coll.put(NS, "m1", text="hi", vector=vec(1, 2, 3), metadata={"speaker": "Alice"})
    got = coll.get(NS, "m1")
    assert got is not None
    assert (got.namespace, got.key, got.text, got.version) == (NS, "m1", "hi", version)
    assert got.metadata == {"speaker": "Alice"}
    np.testing.assert_array_equal(got.vector, np.array([1, 2, 3], dtype=np.float32))


def test_cosine_vectors_are_stored_normalised(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2)
    coll.put(NS, "m1", vector=vec(3, 4))
    got = coll.get(NS, "m1")
    assert got is not None
    np.testing.assert_allclose(got.vector, [0.6, 0.8], rtol=1e-6)


def test_update_raises_version_keeps_created_at(
    db: memcluster.Database, clock: ManualClock
) -> None:
    coll = db.create_collection("m", dim=2)
    v1 = coll.put(NS, "m1", vector=vec(1, 0))
    first = coll.get(NS, "m1")
    clock.advance(5)
    v2 = coll.put(NS, "m1", vector=vec(0, 1), text="new")
    second = coll.get(NS, "m1")
    assert first is not None
    assert second is not None
    assert v2 > v1
    assert second.created_at == first.created_at
    assert second.updated_at == first.updated_at + 5


def test_if_version_zero_writes_only_when_absent(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2)
    v1 = coll.put(NS, "m1", vector=vec(1, 0), if_version=0)
    with pytest.raises(memcluster.VersionConflict) as info:
        coll.put(NS, "m1", vector=vec(0, 1), if_version=0)
    assert (info.value.expected, info.value.actual) == (0, v1)
    got = coll.get(NS, "m1")
    assert got is not None
    assert got.version == v1


def test_if_version_matching_writes_and_stale_is_rejected(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2)
    v1 = coll.put(NS, "m1", vector=vec(1, 0))
    v2 = coll.put(NS, "m1", vector=vec(0, 1), if_version=v1)
    with pytest.raises(memcluster.VersionConflict) as info:
        coll.put(NS, "m1", vector=vec(1, 1), if_version=v1)
    assert info.value.actual == v2
    with pytest.raises(memcluster.VersionConflict):
        coll.put(NS, "absent", vector=vec(1, 1), if_version=7)


def test_batch_with_one_conflict_writes_nothing_on_any_shard(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, shards=4)
    coll.put(NS, "exists", vector=vec(1, 0))
    before = coll.describe().stats.last_seq
    batch = [Memory(namespace=NS, key=f"k{i}", vector=vec(1, i)) for i in range(20)]
    batch.append(Memory(namespace=NS, key="exists", vector=vec(0, 1), if_version=0))
    with pytest.raises(memcluster.VersionConflict):
        coll.put_many(batch)
    assert coll.count() == 1
    assert coll.describe().stats.last_seq == before


def test_idempotency_key_makes_a_retried_batch_a_no_op(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, shards=3)
    batch = [Memory(namespace=NS, key=f"k{i}", vector=vec(1, i)) for i in range(10)]
    first = coll.put_many(batch, idempotency_key="batch-1")
    seqs = coll.describe().stats.last_seq
    again = coll.put_many(batch, idempotency_key="batch-1")
    assert again == first
    assert coll.describe().stats.last_seq == seqs


def test_idempotency_key_survives_reopen(tmp_path: Path, config: Config) -> None:
    batch = [Memory(namespace=NS, key=f"k{i}", vector=vec(1, i)) for i in range(5)]
    with memcluster.open(tmp_path, config) as db:
        first = db.create_collection("m", dim=2, shards=2).put_many(batch, idempotency_key="b")
    with memcluster.open(tmp_path, config) as db:
        coll = db.collection("m")
        seqs = coll.describe().stats.last_seq
        assert coll.put_many(batch, idempotency_key="b") == first
        assert coll.describe().stats.last_seq == seqs


def test_duplicate_keys_in_one_batch_are_rejected(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2)
    with pytest.raises(memcluster.InvalidArgument, match="same namespace and key"):
        coll.put_many([Memory(namespace=NS, key="a", vector=vec(1, 0))] * 2)
    assert coll.count() == 0


def test_delete_returns_whether_it_existed(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2)
    coll.put(NS, "m1", vector=vec(1, 0))
    assert coll.delete(NS, "m1") is True
    assert coll.delete(NS, "m1") is False
    assert coll.get(NS, "m1") is None


def test_delete_where_uses_the_same_filter_as_search(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, shards=2)
    coll.put_many(
        [Memory(namespace=NS, key=f"k{i}", vector=vec(1, i), metadata={"i": i}) for i in range(30)]
    )
    assert coll.count(filter={"i": {"$gte": 20}}) == 10
    assert coll.delete_where(filter={"i": {"$gte": 20}}) == 10
    assert coll.count() == 20
    assert coll.count(filter={"i": {"$gte": 20}}) == 0


# -- TTL ------------------------------------------------------------------------------------


def test_memory_expires_after_its_ttl(db: memcluster.Database, clock: ManualClock) -> None:
    coll = db.create_collection("m", dim=2)
    coll.put(NS, "short", vector=vec(1, 0), ttl_s=10)
    coll.put(NS, "long", vector=vec(0, 1))
    clock.advance(9.9)
    assert coll.get(NS, "short") is not None
    clock.advance(0.2)
    assert coll.get(NS, "short") is None
    assert coll.count() == 1
    assert [h.memory.key for h in coll.search(vector=vec(1, 0), k=5)] == ["long"]


def test_expiries_are_logged_as_deletes(tmp_path: Path, config: Config, clock: ManualClock) -> None:
    with memcluster.open(tmp_path, config, clock=clock) as db:
        coll = db.create_collection("m", dim=2, ttl_s=5)
        coll.put(NS, "a", vector=vec(1, 0))
        seq = coll.describe().stats.last_seq[0]
        clock.advance(6)
        db.maintain()
        assert coll.describe().stats.last_seq[0] == seq + 1  # the sweep wrote a delete
    with memcluster.open(tmp_path, config, clock=ManualClock(0)) as db:
        # Even with a clock before the expiry, the replayed delete removed it.
        assert db.collection("m").get(NS, "a") is None


def test_expired_memory_counts_as_absent_for_if_version(
    db: memcluster.Database, clock: ManualClock
) -> None:
    coll = db.create_collection("m", dim=2)
    coll.put(NS, "a", vector=vec(1, 0), ttl_s=1)
    clock.advance(2)
    assert coll.put(NS, "a", vector=vec(0, 1), if_version=0) > 0


# -- capacity and eviction --------------------------------------------------------------------


def test_full_collection_without_eviction_rejects_writes(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, capacity_items=3)
    for i in range(3):
        coll.put(NS, f"k{i}", vector=vec(1, i))
    with pytest.raises(memcluster.CapacityExceeded, match="eviction"):
        coll.put(NS, "k3", vector=vec(1, 3))
    coll.put(NS, "k0", vector=vec(0, 1))  # replacing needs no room
    assert coll.count() == 3


def test_lru_evicts_the_least_recently_used(db: memcluster.Database, clock: ManualClock) -> None:
    coll = db.create_collection("m", dim=2, capacity_items=3, eviction="lru")
    for i in range(3):
        coll.put(NS, f"k{i}", vector=vec(1, i))
        clock.advance(1)
    coll.get(NS, "k0")  # k1 is now the least recently used
    clock.advance(1)
    coll.put(NS, "k3", vector=vec(1, 3))
    keys = {m.key for m in coll.iter()}
    assert keys == {"k0", "k2", "k3"}


def test_lfu_evicts_the_least_frequently_used(db: memcluster.Database, clock: ManualClock) -> None:
    coll = db.create_collection("m", dim=2, capacity_items=3, eviction="lfu")
    for i in range(3):
        coll.put(NS, f"k{i}", vector=vec(1, i))
        clock.advance(1)
    for _ in range(3):
        coll.get(NS, "k0")
        coll.get(NS, "k1")
    coll.put(NS, "k3", vector=vec(1, 3))
    assert {m.key for m in coll.iter()} == {"k0", "k1", "k3"}


def test_ttl_eviction_takes_the_soonest_to_expire(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, capacity_items=2, eviction="ttl")
    coll.put(NS, "later", vector=vec(1, 0), ttl_s=100)
    coll.put(NS, "sooner", vector=vec(0, 1), ttl_s=10)
    coll.put(NS, "new", vector=vec(1, 1), ttl_s=50)
    assert {m.key for m in coll.iter()} == {"later", "new"}


def test_ttl_eviction_never_evicts_memories_without_ttl(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, capacity_items=1, eviction="ttl")
    coll.put(NS, "forever", vector=vec(1, 0))
    with pytest.raises(memcluster.CapacityExceeded):
        coll.put(NS, "new", vector=vec(0, 1), ttl_s=5)


def test_byte_capacity_evicts_enough_bytes(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, capacity_bytes=400, eviction="lru")
    for i in range(5):
        coll.put(NS, f"k{i}", vector=vec(1, i), text="x" * 100)
    info = coll.describe().stats
    assert info.bytes <= 400
    assert coll.get(NS, "k4") is not None


def test_namespace_capacity_evicts_within_the_namespace(
    db: memcluster.Database, clock: ManualClock
) -> None:
    coll = db.create_collection("m", dim=2, namespace_capacity_items=2, eviction="lru")
    coll.put(("other",), "o1", vector=vec(1, 0))
    for i in range(3):
        clock.advance(1)
        coll.put(NS, f"k{i}", vector=vec(1, i))
    assert coll.count(namespace=NS) == 2
    assert coll.get(("other",), "o1") is not None
    assert coll.get(NS, "k0") is None


def test_evictions_replay_to_the_same_state(tmp_path: Path, config: Config) -> None:
    with memcluster.open(tmp_path, config) as db:
        coll = db.create_collection("m", dim=2, capacity_items=5, eviction="lru")
        for i in range(20):
            coll.put(NS, f"k{i}", vector=vec(1, i))
        before = {m.key for m in coll.iter()}
    with memcluster.open(tmp_path, config) as db:
        assert {m.key for m in db.collection("m").iter()} == before


# -- search ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("cosine", ["same-dir", "close", "far"]),
        ("dot", ["same-dir", "close", "far"]),
        ("l2", ["close", "far", "same-dir"]),
    ],
)
def test_search_ranks_by_metric(db: memcluster.Database, metric: str, expected: list[str]) -> None:
    coll = db.create_collection("m", dim=2, metric=metric)
    coll.put(NS, "same-dir", vector=vec(10, 0))
    coll.put(NS, "close", vector=vec(1.2, 0.3))
    coll.put(NS, "far", vector=vec(-1, 0.1))
    hits = coll.search(vector=vec(1, 0), k=3)
    assert [h.memory.key for h in hits] == expected
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_l2_score_is_negative_squared_distance(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, metric="l2")
    coll.put(NS, "a", vector=vec(1, 2))
    (hit,) = coll.search(vector=vec(0, 0), k=1)
    assert hit.score == pytest.approx(-5.0)


def test_search_respects_namespace_prefix_and_filter(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, shards=3)
    coll.put(("team-a", "x"), "1", vector=vec(1, 0), metadata={"speaker": "Alice"})
    coll.put(("team-a", "y"), "2", vector=vec(1, 0.1), metadata={"speaker": "Bob"})
    coll.put(("team-b",), "3", vector=vec(1, 0), metadata={"speaker": "Alice"})
    hits = coll.search(vector=vec(1, 0), k=10, namespace=("team-a",))
    assert {h.memory.key for h in hits} == {"1", "2"}
    hits = coll.search(vector=vec(1, 0), k=10, filter={"speaker": "Alice"})
    assert {h.memory.key for h in hits} == {"1", "3"}
    hits = coll.search(vector=vec(1, 0), k=10, namespace=("team-a",), filter={"speaker": "Bob"})
    assert [h.memory.key for h in hits] == ["2"]


def test_search_filters_on_created_at(db: memcluster.Database, clock: ManualClock) -> None:
    coll = db.create_collection("m", dim=2)
    coll.put(NS, "old", vector=vec(1, 0))
    clock.advance(100)
    cutoff = clock.time()
    coll.put(NS, "new", vector=vec(1, 0))
    hits = coll.search(vector=vec(1, 0), k=10, filter={"$created_at": {"$gte": cutoff}})
    assert [h.memory.key for h in hits] == ["new"]


def test_ties_across_shards_break_by_namespace_then_key(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, shards=4)
    coll.put_many([Memory(namespace=NS, key=f"k{i:02d}", vector=vec(1, 0)) for i in range(20)])
    hits = coll.search(vector=vec(1, 0), k=5)
    assert [h.memory.key for h in hits] == ["k00", "k01", "k02", "k03", "k04"]


def test_graph_search_merges_buffer_updates_and_deletes(tmp_path: Path, seed: int) -> None:
    """Goal: the graph path (not the exact path) returns what exact search returns after
    sealed writes, fresh unsealed writes, updates of sealed memories and deletes.
    Method: exact_items_max=0 forces the graph; results are compared to exact numpy."""
    config = Config(background=False, exact_items_max=0, exact_filter_items_max=0)
    rng = np.random.default_rng(seed)
    with memcluster.open(tmp_path, config) as db:
        coll = db.create_collection("m", dim=16, metric="cosine")
        data = rng.standard_normal((600, 16)).astype(np.float32)
        model = {f"k{i}": data[i] for i in range(500)}
        coll.put_many([Memory(namespace=NS, key=k, vector=v) for k, v in model.items()])
        db.maintain()
        assert coll.describe().stats.indexed_items == 500
        for i in range(500, 600):  # fresh, unsealed
            model[f"k{i}"] = data[i]
            coll.put(NS, f"k{i}", vector=data[i])
        for i in range(0, 100, 2):  # sealed, then updated
            model[f"k{i}"] = -data[i]
            coll.put(NS, f"k{i}", vector=-data[i])
        for i in range(1, 100, 2):
            del model[f"k{i}"]
            coll.delete(NS, f"k{i}")
        keys = list(model)
        matrix = np.stack([model[k] for k in keys])
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        recalls = []
        for q in rng.standard_normal((20, 16)).astype(np.float32):
            hits = coll.search(vector=q, k=10)
            exact = {keys[j] for j in np.argsort(-(matrix @ (q / np.linalg.norm(q))))[:10]}
            got = {h.memory.key for h in hits}
            assert got <= set(model), "a deleted memory came back"
            recalls.append(len(got & exact) / 10)
        assert np.mean(recalls) >= 0.95


def test_filtered_graph_search_returns_only_matches(tmp_path: Path) -> None:
    config = Config(background=False, exact_items_max=0, exact_filter_items_max=0)
    with memcluster.open(tmp_path, config) as db:
        coll = db.create_collection("m", dim=8)
        data = rand_vectors(2000, 8)
        coll.put_many(
            [
                Memory(namespace=NS, key=f"k{i}", vector=data[i], metadata={"b": i % 10})
                for i in range(2000)
            ]
        )
        db.maintain()
        hits = coll.search(vector=data[0], k=10, filter={"b": 3})
        assert len(hits) == 10
        assert all(h.memory.metadata["b"] == 3 for h in hits)


def test_k_larger_than_the_collection_returns_everything(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, shards=2)
    coll.put(NS, "a", vector=vec(1, 0))
    coll.put(NS, "b", vector=vec(0, 1))
    assert len(coll.search(vector=vec(1, 1), k=100)) == 2


# -- list -----------------------------------------------------------------------------------


def test_list_pages_through_everything_in_order(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2, shards=3)
    coll.put_many(
        [Memory(namespace=(f"ns{i % 3}",), key=f"k{i:03d}", vector=vec(1, i)) for i in range(50)]
    )
    seen: list[tuple[tuple[str, ...], str]] = []
    cursor = None
    while True:
        page = coll.list(limit=7, cursor=cursor)
        seen.extend((m.namespace, m.key) for m in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == sorted(seen)
    assert len(seen) == 50


def test_list_rejects_a_forged_cursor(db: memcluster.Database) -> None:
    coll = db.create_collection("m", dim=2)
    with pytest.raises(memcluster.InvalidArgument, match="cursor"):
        coll.list(cursor="not-a-cursor!")


# -- collections and lifecycle ----------------------------------------------------------------


def test_collections_are_created_listed_and_dropped(db: memcluster.Database) -> None:
    db.create_collection("b", dim=2)
    db.create_collection("a", dim=2)
    assert db.list_collections() == ["a", "b"]
    with pytest.raises(memcluster.CollectionExists):
        db.create_collection("a", dim=2)
    db.drop_collection("a")
    assert db.list_collections() == ["b"]
    with pytest.raises(memcluster.CollectionNotFound):
        db.collection("a")
    with pytest.raises(memcluster.CollectionNotFound):
        db.drop_collection("a")


def test_a_second_open_of_the_same_directory_is_refused(tmp_path: Path, config: Config) -> None:
    with (
        memcluster.open(tmp_path, config),
        pytest.raises(memcluster.InvalidState, match="in use"),
    ):
        memcluster.open(tmp_path, config)


def test_a_closed_database_refuses_requests(tmp_path: Path, config: Config) -> None:
    db = memcluster.open(tmp_path, config)
    coll = db.create_collection("m", dim=2)
    db.close()
    db.close()
    with pytest.raises(memcluster.InvalidState):
        coll.put(NS, "a", vector=vec(1, 0))
    with pytest.raises(memcluster.InvalidState):
        db.list_collections()


def test_data_survives_snapshot_and_replay(tmp_path: Path, config: Config) -> None:
    with memcluster.open(tmp_path, config) as db:
        coll = db.create_collection("m", dim=4, shards=2)
        data = rand_vectors(300, 4)
        coll.put_many([Memory(namespace=NS, key=f"k{i}", vector=data[i]) for i in range(200)])
        db.maintain()
        for shard in coll._shards:
            shard.snapshot()
        coll.put_many([Memory(namespace=NS, key=f"k{i}", vector=data[i]) for i in range(200, 300)])
        for i in range(0, 50):
            coll.delete(NS, f"k{i}")
        expected = {m.key: m.version for m in coll.iter()}
    with memcluster.open(tmp_path, config) as db:
        coll = db.collection("m")
        assert {m.key: m.version for m in coll.iter()} == expected
        hits = coll.search(vector=data[250], k=1)
        assert hits[0].memory.key == "k250"


def test_snapshot_drops_the_wal_it_covers(tmp_path: Path) -> None:
    config = Config(background=False, wal_segment_bytes=4096, feed_retention_events=100)
    with memcluster.open(tmp_path, config) as db:
        coll = db.create_collection("m", dim=32)
        data = rand_vectors(400, 32)
        for i in range(400):
            coll.put(NS, f"k{i}", vector=data[i])
        wal_dir = coll.path / "shard-0000" / "wal"
        before = len(list(wal_dir.glob("*.wal")))
        coll._shards[0].snapshot()
        coll.put(NS, "after", vector=data[0])
        coll._shards[0].snapshot()
        after = len(list(wal_dir.glob("*.wal")))
        assert after < before
    with memcluster.open(tmp_path, config) as db:
        assert db.collection("m").count() == 401


def test_a_snapshot_drops_all_the_wal_it_covers(tmp_path: Path, config: Config) -> None:
    config = msgspec.structs.replace(config, feed_retention_events=0)
    with memcluster.open(tmp_path, config) as db:
        coll = db.create_collection("m", dim=4)
        coll.put_many(
            [Memory(namespace=NS, key=f"k{i}", vector=vec(1, i, 0, 0)) for i in range(50)]
        )
        coll._shards[0].snapshot()
        wal_dir = coll.path / "shard-0000" / "wal"
        assert list(wal_dir.glob("*.wal")) == []
    with memcluster.open(tmp_path, config) as db:
        coll = db.collection("m")
        assert coll.count() == 50
        version = coll.put(NS, "after", vector=vec(0, 1, 0, 0))
    with memcluster.open(tmp_path, config) as db:
        got = db.collection("m").get(NS, "after")
        assert got is not None
        assert got.version == version
        assert db.collection("m").count() == 51


def test_metadata_paths_are_bounded_per_shard(tmp_path: Path) -> None:
    config = Config(background=False, metadata_paths_max=5)
    with memcluster.open(tmp_path, config) as db:
        coll = db.create_collection("m", dim=2)
        for i in range(5):
            coll.put(NS, f"k{i}", vector=vec(1, 0), metadata={f"id-{i}": True})
        with pytest.raises(memcluster.CapacityExceeded, match="metadata_paths_max=5"):
            coll.put(NS, "k5", vector=vec(1, 0), metadata={"id-5": True})
        coll.put(NS, "k6", vector=vec(1, 0), metadata={"id-0": False})  # known path: fine
        assert coll.count() == 6
