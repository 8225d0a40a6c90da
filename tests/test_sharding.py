"""Sharding strategies: configs, placement, read routing, moves between shards, k-means.

The pure router (``memcluster.shard.sharding``) is tested by tables and properties; the
embedded engine by a hypothesis state machine per non-hash strategy (range, vector) against a
dict, checking after every step that each key is in exactly one shard, its expected one.
Randomized tests take the ``seed`` fixture (printed; ``MEMCLUSTER_SEED=N`` replays it).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import memcluster
from filter_model import matches
from memcluster import Memory
from memcluster.core.clock import ManualClock
from memcluster.core.codec import DeleteOp, DeleteReason, Record
from memcluster.core.config import Config
from memcluster.core.errors import (
    InvalidArgument,
    InvalidMetadata,
    VersionConflict,
)
from memcluster.core.hashing import key_hash, namespace_hash, shard_of
from memcluster.core.types import (
    CollectionConfig,
    Durability,
    Hit,
    Metric,
    SearchResult,
    Sharding,
)
from memcluster.index.filters import compile_filter
from memcluster.shard.shard import PreparedPut, Shard
from memcluster.shard.sharding import Sharder, check_config, kmeans
from memcluster.storage.wal import MemoryWal

FAST = Config(background=False, graph=False, durability=Durability.NONE)
Key = tuple[tuple[str, ...], str]


# -- configs ----------------------------------------------------------------------------------

BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"sharding": "range"}, "needs range_field"),
    ({"sharding": "range", "range_field": "t"}, "needs boundaries"),
    ({"sharding": "range", "range_field": "t", "boundaries": [1.0]}, "need shards - 1 = 2"),
    ({"sharding": "range", "range_field": "t", "boundaries": [2.0, 1.0]}, "strictly ascending"),
    ({"sharding": "range", "range_field": "t", "boundaries": [1.0, 1.0]}, "strictly ascending"),
    ({"sharding": "range", "range_field": "t", "boundaries": [1.0, math.nan]}, "finite"),
    ({"sharding": "range", "range_field": "t", "boundaries": [1.0, math.inf]}, "finite"),
    ({"sharding": "range", "range_field": "a.b", "boundaries": [1.0, 2.0]}, "top-level"),
    ({"sharding": "range", "range_field": "$t", "boundaries": [1.0, 2.0]}, "top-level"),
    ({"sharding": "range", "range_field": "", "boundaries": [1.0, 2.0]}, "non-empty"),
    ({"sharding": "vector"}, "needs centroids"),
    ({"sharding": "vector", "centroids": [[1.0, 0.0], [0.0, 1.0]]}, "shards=3 needs one"),
    ({"sharding": "vector", "centroids": [[1.0, 0.0], [0.0, 1.0], [1.0]]}, "dim=2"),
    ({"sharding": "vector", "centroids": [[1.0, 0.0], [0.0, 1.0], [1.0, math.nan]]}, "NaN"),
    ({"sharding": "vector", "centroids": [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]}, "all zeros"),
    ({"sharding": "vector", "centroids": [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]}, "same direction"),
    (
        {"sharding": "vector", "centroids": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], "nprobe": 0},
        "nprobe",
    ),
    ({"shard_key": "namespace:0"}, "'namespace:N' with N >= 1"),
    ({"shard_key": "namespace:x"}, "'namespace:N' with N >= 1"),
    ({"shard_key": "agent"}, "'namespace:N' with N >= 1"),
    ({"range_field": "t"}, "range_field applies to sharding='range' only"),
    ({"boundaries": [1.0, 2.0]}, "boundaries applies to sharding='range' only"),
    ({"centroids": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]}, "centroids applies to"),
    ({"nprobe": 2}, "nprobe applies to sharding='vector' only"),
    (
        {"sharding": "range", "range_field": "t", "boundaries": [1.0, 2.0], "nprobe": 1},
        "nprobe applies",
    ),
    (
        {"sharding": "vector", "centroids": [[1, 0], [0, 1], [1, 1]], "shard_key": "namespace"},
        "shard_key applies to sharding='hash' only",
    ),
    ({"sharding": "consistent"}, "sharding"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_CONFIGS)
def test_bad_sharding_configs_are_refused_saying_what_to_fix(
    db: memcluster.Database, fields: dict[str, Any], message: str
) -> None:
    config = CollectionConfig(name="c", dim=2, shards=3, **fields)
    with pytest.raises(InvalidArgument, match="sharding") as pure:
        check_config(config)
    assert message in str(pure.value)
    with pytest.raises(InvalidArgument) as created:
        db.create_collection("c", dim=2, shards=3, **fields)
    assert message in str(created.value)
    assert db.list_collections() == []


GOOD_CONFIGS: list[dict[str, Any]] = [
    {},
    {"shard_key": "namespace"},
    {"shard_key": "namespace:2"},
    {"sharding": "range", "range_field": "t", "boundaries": [-1, 2.5]},
    {"sharding": "vector", "centroids": [[1, 0], [0, 1], [-1, -1]]},
    {"sharding": "vector", "centroids": np.eye(3)[:, :2] + 0.5, "nprobe": 1},
    {"sharding": "vector", "sample": [[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, -1]]},
]


@pytest.mark.parametrize("fields", GOOD_CONFIGS)
def test_good_sharding_configs_are_kept_across_a_reopen(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    with memcluster.open(tmp_path, FAST) as db:
        config = db.create_collection("c", dim=2, shards=3, **fields).config
        assert check_config(config) == config
    with memcluster.open(tmp_path, FAST) as db:
        assert db.collection("c").config == config
    if "sample" in fields:
        assert config.centroids is not None
        assert len(config.centroids) == 3


def test_one_range_shard_needs_no_boundaries_but_an_empty_list(db: memcluster.Database) -> None:
    coll = db.create_collection("c", dim=2, sharding="range", range_field="t", boundaries=[])
    coll.put(("a",), "k", vector=[1, 0], metadata={"t": 1e300})
    assert coll.count() == 1


def test_sample_and_centroids_do_not_mix(db: memcluster.Database) -> None:
    with pytest.raises(InvalidArgument, match="not both"):
        db.create_collection(
            "c", dim=2, shards=2, sharding="vector", centroids=[[1, 0], [0, 1]], sample=np.eye(2)
        )
    with pytest.raises(InvalidArgument, match="sharding='vector'"):
        db.create_collection("c", dim=2, shards=2, sample=np.eye(2))


# -- hashes ---------------------------------------------------------------------------------

# Part of the data format, like key_hash: never update these values.
NAMESPACE_HASHES = [
    (("team-a",), 15221019763065516053),
    (("team-a", "agent-7"), 12810355104039861980),
    (("ümlaut", "x"), 4574017201810676572),
    (("a", "b"), 8822065115869940840),
]


@pytest.mark.parametrize(("parts", "value"), NAMESPACE_HASHES)
def test_namespace_hash_values_are_stable(parts: tuple[str, ...], value: int) -> None:
    assert namespace_hash(parts) == value


def test_namespace_hash_differs_from_the_key_hash_of_the_same_bytes() -> None:
    assert namespace_hash(("a", "b")) != key_hash(("a",), "b")
    assert namespace_hash(("ab",)) != namespace_hash(("a", "b"))


def test_hash_by_key_places_exactly_like_shard_of() -> None:
    sharder = Sharder(CollectionConfig(name="c", dim=2, shards=7))
    names = [((f"t{i % 5}", f"a{i % 3}"), f"k{i}") for i in range(500)]
    placed = sharder.place(
        [ns for ns, _ in names], [k for _, k in names], np.zeros((500, 2), np.float32), [{}] * 500
    )
    assert placed == [shard_of(ns, k, 7) for ns, k in names]
    assert all(sharder.key_shard(ns, k) == shard_of(ns, k, 7) for ns, k in names)
    assert sharder.keyed


def test_hash_by_namespace_prefix_keeps_an_agent_on_one_shard() -> None:
    sharder = Sharder(CollectionConfig(name="c", dim=2, shards=8, shard_key="namespace:2"))
    ns = ("team-a", "agent-7")
    expected = namespace_hash(ns) % 8
    for deeper in [ns, (*ns, "x"), (*ns, "y", "z")]:
        assert sharder.key_shard(deeper, "any") == expected
        assert sharder.search_shards(deeper, None) == [expected]
    assert sharder.key_shard(("solo",), "k") == namespace_hash(("solo",)) % 8
    assert sharder.search_shards(("team-a",), None) == list(range(8))
    assert sharder.search_shards(None, None) == list(range(8))
    whole = Sharder(CollectionConfig(name="c", dim=2, shards=8, shard_key="namespace"))
    assert whole.key_shard((*ns, "x"), "k") == namespace_hash((*ns, "x")) % 8
    # A prefix also covers the longer namespaces under it, which hash anywhere.
    assert whole.search_shards((*ns, "x"), None) == list(range(8))


# -- range routing --------------------------------------------------------------------------


def range_sharder(boundaries: list[float]) -> Sharder:
    return Sharder(
        CollectionConfig(
            name="c",
            dim=2,
            shards=len(boundaries) + 1,
            sharding=Sharding.RANGE,
            range_field="t",
            boundaries=boundaries,
        )
    )


def test_range_places_values_in_half_open_intervals() -> None:
    sharder = range_sharder([0.0, 10.0])
    values = [-1e300, -0.5, 0, 0.0, 9.999, 10, 10.5, 1e300]
    placed = sharder.place(
        [("a",)] * 8, ["k"] * 8, np.zeros((8, 2), np.float32), [{"t": v} for v in values]
    )
    assert placed == [0, 0, 1, 1, 1, 2, 2, 2]
    assert not sharder.keyed
    assert sharder.key_shard(("a",), "k") is None


@pytest.mark.parametrize(
    "metadata",
    [{}, {"t": None}, {"t": "5"}, {"t": True}, {"t": [1]}, {"t": {"x": 1}}, {"t": 10**400}, None],
)
def test_range_needs_a_finite_number_in_the_field(metadata: dict[str, Any] | None) -> None:
    with pytest.raises(InvalidMetadata, match="'t'"):
        range_sharder([0.0]).place([("a",)], ["k"], np.zeros((1, 2), np.float32), [metadata])


RANGE_PRUNING = [
    (None, [0, 1, 2, 3]),
    ({"t": 5}, [1]),
    ({"t": 10}, [2]),
    ({"t": {"$eq": -3.5}}, [0]),
    ({"t": {"$lt": 10}}, [0, 1]),
    ({"t": {"$lte": 10}}, [0, 1, 2]),
    ({"t": {"$gt": 10}}, [2, 3]),
    ({"t": {"$gte": 20}}, [3]),
    ({"t": {"$gte": 5, "$lt": 15}}, [1, 2]),
    ({"t": {"$gt": 10, "$lt": 10}}, []),
    ({"t": {"$gte": 10, "$lte": 10}}, [2]),
    ({"t": {"$in": [-1, 25]}}, [0, 3]),
    ({"t": {"$in": [-1, "x"]}}, [0, 1, 2, 3]),
    ({"$and": [{"t": {"$gte": 0}}, {"t": {"$lt": 10}}]}, [1]),
    ({"$and": [{"t": {"$gte": 0}}, {"$and": [{"t": {"$lt": 5}}]}]}, [1]),
    ({"$or": [{"t": 5}, {"t": 25}]}, [0, 1, 2, 3]),
    ({"$not": {"t": 5}}, [0, 1, 2, 3]),
    ({"t": {"$ne": 5}}, [0, 1, 2, 3]),
    ({"t": {"$nin": [5]}}, [0, 1, 2, 3]),
    ({"t": {"$not": {"$lt": 10}}}, [0, 1, 2, 3]),
    ({"t": {"$not": {"$lt": 10}, "$lt": 0}}, [0]),
    ({"t": "5"}, [0, 1, 2, 3]),
    ({"u": 5, "t": {"$gte": 15}}, [2, 3]),
]


@pytest.mark.parametrize(("flt", "shards"), RANGE_PRUNING)
def test_range_reads_touch_the_shards_the_filter_bounds(
    flt: dict[str, Any] | None, shards: list[int]
) -> None:
    compile_filter(flt)  # a valid filter
    sharder = range_sharder([0.0, 10.0, 20.0])
    assert sharder.search_shards(None, flt) == shards
    assert sharder.search_shards(("a",), flt, np.ones(2, np.float32)) == shards


numbers = st.one_of(
    st.integers(-30, 30), st.sampled_from([-10.0, 0.0, 10.0, 20.0, -0.5, 9.999, 10.0001])
)


def field_filters() -> st.SearchStrategy[dict[str, Any]]:
    ops = st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"])
    condition = st.one_of(
        numbers,
        st.dictionaries(ops, numbers, min_size=1, max_size=3),
        st.builds(lambda xs: {"$in": xs}, st.lists(numbers, min_size=1, max_size=4)),
        st.builds(lambda xs: {"$nin": xs}, st.lists(numbers, min_size=1, max_size=4)),
        st.builds(lambda c: {"$not": c}, st.dictionaries(ops, numbers, min_size=1, max_size=2)),
    )
    leaf = st.dictionaries(st.sampled_from(["t", "u"]), condition, min_size=1, max_size=2)
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.builds(lambda xs: {"$and": xs}, st.lists(inner, min_size=1, max_size=3)),
            st.builds(lambda xs: {"$or": xs}, st.lists(inner, min_size=1, max_size=3)),
            st.builds(lambda x: {"$not": x}, inner),
        ),
        max_leaves=6,
    )


@settings(max_examples=300, deadline=None)
@given(
    bounds=st.lists(st.integers(-20, 20), min_size=0, max_size=4, unique=True),
    flt=field_filters(),
    values=st.lists(st.tuples(numbers, numbers), min_size=1, max_size=20),
)
def test_range_pruning_never_drops_a_shard_that_holds_a_match(
    bounds: list[int], flt: dict[str, Any], values: list[tuple[float, float]]
) -> None:
    """Property: for any filter of the DSL and any values, the shard of every matching value
    is among the shards a read touches (checked with the reference filter evaluator)."""
    compile_filter(flt)
    sharder = range_sharder(sorted(float(b) for b in bounds))
    touched = set(sharder.search_shards(None, flt))
    metas = [{"t": t, "u": u} for t, u in values]
    placed = sharder.place(
        [("a",)] * len(metas), ["k"] * len(metas), np.zeros((len(metas), 2), np.float32), metas
    )
    for meta, shard in zip(metas, placed, strict=True):
        if matches(flt, meta, 0.0, 0.0):
            assert shard in touched, (meta, shard, touched)


# -- vector routing -------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_vector_places_on_the_nearest_centroid_ties_to_the_lowest(metric: str) -> None:
    centroids = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
    sharder = Sharder(
        CollectionConfig(
            name="c",
            dim=2,
            shards=3,
            metric=Metric(metric),
            sharding=Sharding.VECTOR,
            centroids=centroids,
        )
    )
    vectors = np.array([[2, 0.1], [0.1, 3], [-1, 0.2], [1, 1], [0, -1]], np.float32)
    if metric == "cosine":
        vectors /= np.linalg.norm(vectors, axis=1)[:, None]
    placed = sharder.place([("a",)] * 5, ["k"] * 5, vectors, [{}] * 5)
    # [1, 1] is as near centroid 0 as centroid 1; [0, -1] as near 0 as 2.
    assert placed == [0, 1, 2, 0, 0]


def test_vector_search_probes_the_nearest_centroids() -> None:
    centroids = [[float(i == j) for j in range(4)] for i in range(4)]
    config = CollectionConfig(
        name="c", dim=4, shards=4, sharding=Sharding.VECTOR, centroids=centroids, nprobe=2
    )
    sharder = Sharder(config)
    q = np.array([0.1, 0.2, 0.9, 0.4], np.float32)
    q /= np.linalg.norm(q)
    assert sharder.search_shards(None, None, q) == [2, 3]
    assert sharder.search_shards(None, None, q, nprobe=1) == [2]
    assert sharder.search_shards(None, None, q, nprobe=3) == [1, 2, 3]
    for every in (0, 4, 99):
        assert sharder.search_shards(None, None, q, nprobe=every) == [0, 1, 2, 3]
    assert sharder.search_shards(("a",), {"x": 1}) == [0, 1, 2, 3]  # count, list: all
    with pytest.raises(InvalidArgument, match="nprobe"):
        sharder.search_shards(None, None, q, nprobe=-1)


# -- k-means --------------------------------------------------------------------------------


def clusters(rng: np.random.Generator, centers: np.ndarray, per: int, spread: float) -> Any:
    return np.concatenate(
        [c + spread * rng.standard_normal((per, centers.shape[1])) for c in centers]
    )


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_kmeans_recovers_well_separated_clusters(seed: int, metric: str) -> None:
    """Goal: on clusters far apart, k-means finds them. Method: every row of a true cluster
    is placed (by the collection's rule: the Sharder) on the same shard, a different shard
    per cluster, and each centroid is that cluster's mean (normalised under cosine)."""
    rng = np.random.default_rng(seed)
    centers = 10.0 * np.eye(6)[:5]  # 5 orthogonal directions, equal norms
    per = 60
    sample = clusters(rng, centers, per=per, spread=0.5)
    found = kmeans(sample, 5, metric=metric, seed=seed)
    assert found.dtype == np.float32
    assert found.shape == (5, 6)
    sharder = Sharder(
        CollectionConfig(
            name="c",
            dim=6,
            shards=5,
            metric=Metric(metric),
            sharding=Sharding.VECTOR,
            centroids=found.tolist(),
        )
    )
    rows = sample.astype(np.float32)
    if metric == "cosine":
        rows /= np.linalg.norm(rows, axis=1)[:, None]
    placed = np.array(
        sharder.place([("a",)] * len(rows), ["k"] * len(rows), rows, [{}] * len(rows))
    )
    shard_of_cluster = [set(placed[i * per : (i + 1) * per].tolist()) for i in range(5)]
    assert all(len(s) == 1 for s in shard_of_cluster), shard_of_cluster
    assert sorted(s.pop() for s in shard_of_cluster) == list(range(5))
    for i in range(5):
        mean = rows[i * per : (i + 1) * per].mean(axis=0)
        if metric == "cosine":
            mean /= np.linalg.norm(mean)
        np.testing.assert_allclose(found[placed[i * per]], mean, atol=1e-4)


def test_kmeans_is_deterministic_for_a_seed(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((300, 8))
    first = kmeans(sample, 6, seed=seed)
    assert np.array_equal(first, kmeans(sample, 6, seed=seed))
    assert np.array_equal(first, kmeans(sample.tolist(), 6, metric="cosine", seed=seed))


@pytest.mark.parametrize(
    ("sample", "k", "message"),
    [
        ([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], 3, "2 distinct rows"),
        ([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], 3, "2 distinct rows"),  # one direction
        ([[1.0, 0.0], [math.nan, 1.0]], 1, "NaN"),
        ([[0.0, 0.0], [1.0, 1.0]], 1, "all zeros"),
        ([1.0, 2.0, 3.0], 1, "n x dim"),
        ([[1.0, 2.0], [3.0]], 1, "n x dim"),
        (np.zeros((0, 3)), 1, "n x dim"),
        ([[1.0, 0.0]], 0, "k must be"),
    ],
)
def test_kmeans_refuses_a_sample_it_cannot_cluster(sample: Any, k: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        kmeans(sample, k)


def test_kmeans_under_l2_separates_directions_cosine_would_merge() -> None:
    sample = [[1.0, 0.0], [1.1, 0.0], [10.0, 0.0], [10.5, 0.0]]
    found = kmeans(sample, 2, metric="l2")
    np.testing.assert_allclose(sorted(found[:, 0].tolist()), [1.05, 10.25], rtol=1e-6)


# -- the shard methods a move uses ----------------------------------------------------------


def test_shard_locates_and_plans_deletes_under_a_held_lock() -> None:
    config = Config(background=False, graph=False)
    clock = ManualClock()
    shard = Shard.open(
        CollectionConfig(name="c", dim=2), config, MemoryWal(config), clock, snapshots=None
    )

    def put(key: str, ttl_s: float | None = None) -> PreparedPut:
        return PreparedPut(("n",), key, None, np.ones(2, np.float32), b"{}", ttl_s, None)

    shard.put([put("a"), put("b", ttl_s=1.0)])
    t0 = clock.time()
    clock.advance(2.0)  # b has expired, its slot is still there
    a, b, c = (("n",), "a"), (("n",), "b"), (("n",), "c")
    with shard.lock:
        assert shard.located([a, b, c]) == [(1, t0, t0), (0, t0, t0), None]
        assert shard.get_held(*a) is not None
        assert shard.get_held(*b) is None
        assert shard.plan_delete([c]) == (None, 0)
        record, live = shard.plan_delete([a, b, c])
        assert record is not None
        assert live == 1
        assert [op.reason for op in record.ops if isinstance(op, DeleteOp)] == [
            DeleteReason.USER,
            DeleteReason.EXPIRED,
        ]
        assert record.seq == shard.applied_seq + 1
        shard.write_planned(record)
    assert shard.live_count == 0
    shard.put([put("d"), put("e")])
    with shard.lock:
        # After a planned record: numbered after it, leaving out what it deletes already.
        planned = shard.plan_put([put("f")], None)
        assert isinstance(planned, Record)
        evicting = Record(planned.seq, planned.ts, [DeleteOp(("n",), "d"), *planned.ops])
        record, live = shard.plan_delete([(("n",), "d"), (("n",), "e")], after=evicting)
        assert record is not None
        assert live == 1
        assert record.seq == evicting.last_seq + 1
        assert [op.key for op in record.ops if isinstance(op, DeleteOp)] == ["e"]
        shard.write_planned(evicting)
        shard.write_planned(record)
    assert shard.get(("n",), "f") is not None
    assert shard.live_count == 1
    shard.validate()


# -- moves in the embedded engine ----------------------------------------------------------


@pytest.fixture
def ranged(db: memcluster.Database) -> memcluster.Collection:
    return db.create_collection(
        "r", dim=2, shards=3, sharding="range", range_field="t", boundaries=[0, 10]
    )


def holders(coll: memcluster.Collection, namespace: tuple[str, ...], key: str) -> list[int]:
    return [i for i, s in enumerate(coll._shards) if s.get(namespace, key) is not None]


def test_a_memory_moves_when_its_range_field_changes(
    ranged: memcluster.Collection, clock: ManualClock
) -> None:
    ns = ("a",)
    v1 = ranged.put(ns, "k", vector=[1, 0], metadata={"t": -5})
    created = ranged.get(ns, "k").created_at  # type: ignore[union-attr]
    assert holders(ranged, ns, "k") == [0]
    clock.advance(1.0)
    with pytest.raises(VersionConflict) as conflict:
        ranged.put(ns, "k", vector=[1, 0], metadata={"t": 15}, if_version=v1 + 1)
    assert (conflict.value.expected, conflict.value.actual) == (v1 + 1, v1)
    assert holders(ranged, ns, "k") == [0]
    with pytest.raises(VersionConflict):
        ranged.put(ns, "k", vector=[1, 0], metadata={"t": 15}, if_version=0)
    v2 = ranged.put(ns, "k", vector=[0, 1], metadata={"t": 15}, if_version=v1)
    assert holders(ranged, ns, "k") == [2]
    got = ranged.get(ns, "k")
    assert got is not None
    assert got.version == v2
    assert got.metadata == {"t": 15}
    assert got.created_at == created
    assert got.updated_at == created + 1.0
    assert ranged.count() == 1
    assert ranged.delete(ns, "k")
    assert not ranged.delete(ns, "k")
    assert ranged.get(ns, "k") is None
    assert holders(ranged, ns, "k") == []
    for shard in ranged._shards:
        shard.validate()


def test_a_batch_with_a_bad_range_field_writes_nothing(ranged: memcluster.Collection) -> None:
    ranged.put(("a",), "x", vector=[1, 0], metadata={"t": 1})
    batch = [
        Memory(namespace=("a",), key="x", vector=[1, 0], metadata={"t": 20}),
        Memory(namespace=("a",), key="y", vector=[1, 0], metadata={"t": 1}),
        Memory(namespace=("a",), key="z", vector=[1, 0], metadata={"when": 1}),
    ]
    with pytest.raises(InvalidMetadata, match="memory 2: metadata 't'"):
        ranged.put_many(batch)
    batch[2] = Memory(namespace=("a",), key="z", vector=[1, 0], metadata={"t": 1}, if_version=4)
    with pytest.raises(VersionConflict):
        ranged.put_many(batch)
    assert [s.applied_seq for s in ranged._shards] == [0, 1, 0]
    assert holders(ranged, ("a",), "x") == [1]
    assert ranged.count() == 1


def test_an_idempotent_retry_of_a_move_writes_nothing(ranged: memcluster.Collection) -> None:
    ranged.put(("a",), "x", vector=[1, 0], metadata={"t": 1})
    batch = [
        Memory(namespace=("a",), key="x", vector=[1, 0], metadata={"t": 20}, if_version=1),
        Memory(namespace=("a",), key="y", vector=[1, 0], metadata={"t": -1}),
    ]
    first = ranged.put_many(batch, idempotency_key="b1")
    seqs = [s.applied_seq for s in ranged._shards]
    assert ranged.put_many(batch, idempotency_key="b1") == first
    assert [s.applied_seq for s in ranged._shards] == seqs
    assert holders(ranged, ("a",), "x") == [2]
    assert holders(ranged, ("a",), "y") == [0]


def test_a_copy_left_by_a_crash_mid_move_is_hidden_then_removed(
    ranged: memcluster.Collection, clock: ManualClock
) -> None:
    """Goal: the state a crash between a move's two records leaves (the memory in both
    shards) reads as the newer copy, and the next write removes the older. Method: write the
    old copy straight into its shard, as the first record of an interrupted move."""
    ns = ("a",)
    old = PreparedPut(ns, "k", "old", np.array([1, 0], np.float32), b'{"t":1}', None, None)
    ranged._shards[1].put([old])
    clock.advance(1.0)
    ranged._shards[2].put([PreparedPut(ns, "k", "new", old.vector, b'{"t":20}', None, None)])
    got = ranged.get(ns, "k")
    assert got is not None
    assert got.text == "new"
    assert [m.text for m in ranged.list().items] == ["new"]
    hits = ranged.search([1, 0], k=5)
    assert [h.memory.text for h in hits] == ["new"]
    ranged.put(ns, "k", text="newer", vector=[1, 0], metadata={"t": 25})
    assert holders(ranged, ns, "k") == [2]
    assert ranged.count() == 1


DIM = 3
NAMES: list[Key] = [(ns, k) for ns in [("a",), ("a", "x"), ("b",)] for k in ["k0", "k1", "k2"]]
RANGE_VALUES = [-7, -0.5, 0, 3.25, 9.999, 10, 12, 1e9]
VECTORS = [
    [1.0, 0.1, 0.0],
    [0.2, 1.0, 0.1],
    [0.0, 0.2, 1.0],
    [1.0, 1.0, 0.0],  # a tie between shards 0 and 1
    [-1.0, 2.0, 0.5],
    [0.3, 0.0, -1.0],
]


class ShardedMachine(RuleBasedStateMachine):
    """The engine of a range or vector collection against a dict, with keys moving between
    shards. Subclasses say how a choice (an index) becomes a memory's field or vector."""

    choices: int

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="mc-sharding-"))
        self.clock = ManualClock()
        self.db = memcluster.open(self.dir, FAST, clock=self.clock)
        self.coll = self.create(self.db)
        self.model: dict[Key, dict[str, Any]] = {}

    def create(self, db: memcluster.Database) -> memcluster.Collection:
        raise NotImplementedError

    def fields(self, choice: int) -> dict[str, Any]:
        raise NotImplementedError

    def teardown(self) -> None:
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def memory(self, name: Key, choice: int, if_version: int | None = None) -> Memory:
        return Memory(namespace=name[0], key=name[1], if_version=if_version, **self.fields(choice))

    def expected_shard(self, choice: int) -> int:
        m = self.memory(NAMES[0], choice)
        matrix = memcluster.core.validation.vectors(
            [m.vector], self.coll.config.dim, self.coll.config.metric
        )
        return self.coll._sharder.place([m.namespace], [m.key], matrix, [m.metadata])[0]

    def record(self, name: Key, choice: int, version: int) -> None:
        now = self.clock.time()
        created = self.model[name]["created_at"] if name in self.model else now
        self.model[name] = {"choice": choice, "version": version, "created_at": created}

    @rule(name=st.sampled_from(NAMES), choice=st.integers(0, 7), cond=st.sampled_from("-=!"))
    def put(self, name: Key, choice: int, cond: str) -> None:
        choice %= self.choices
        current = self.model[name]["version"] if name in self.model else 0
        if_version = {"-": None, "=": current, "!": current + 1}[cond]
        if cond == "!":
            with pytest.raises(VersionConflict) as exc:
                self.coll.put_many([self.memory(name, choice, if_version)])
            assert exc.value.actual == current
            return
        [version] = self.coll.put_many([self.memory(name, choice, if_version)])
        self.record(name, choice, version)

    @rule(
        picks=st.lists(
            st.tuples(st.sampled_from(NAMES), st.integers(0, 7)),
            min_size=1,
            max_size=5,
            unique_by=lambda p: p[0],
        ),
        spoil=st.booleans(),
    )
    def put_many(self, picks: list[tuple[Key, int]], spoil: bool) -> None:
        batch = [self.memory(name, choice % self.choices) for name, choice in picks]
        if spoil:  # the last memory's condition fails: nothing at all is written
            name = picks[-1][0]
            wrong = (self.model[name]["version"] + 1) if name in self.model else 1
            batch[-1] = self.memory(name, picks[-1][1] % self.choices, wrong)
            with pytest.raises(VersionConflict):
                self.coll.put_many(batch)
            return
        versions = self.coll.put_many(batch)
        for (name, choice), version in zip(picks, versions, strict=True):
            self.record(name, choice % self.choices, version)

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: Key) -> None:
        assert self.coll.delete(*name) == (name in self.model)
        self.model.pop(name, None)

    @rule()
    def tick(self) -> None:
        self.clock.advance(1.5)

    @rule()
    def reopen(self) -> None:
        self.db.close()
        self.db = memcluster.open(self.dir, FAST, clock=self.clock)
        self.coll = self.db.collection(self.coll.name)

    @invariant()
    def every_key_is_in_its_shard_only(self) -> None:
        for name in NAMES:
            where = holders(self.coll, *name)
            if name not in self.model:
                assert where == [], name
                assert self.coll.get(*name) is None
                continue
            item = self.model[name]
            assert where == [self.expected_shard(item["choice"])], (name, where)
            got = self.coll.get(*name)
            assert got is not None
            assert got.version == item["version"]
            assert got.created_at == item["created_at"]
            want = self.memory(name, item["choice"])
            assert got.metadata == want.metadata
            np.testing.assert_allclose(
                got.vector, np.asarray(want.vector, np.float32) / self.norm(want.vector), rtol=1e-6
            )
        for shard in self.coll._shards:
            shard.validate()

    def norm(self, vector: Any) -> float:
        return float(np.linalg.norm(vector)) if self.coll.config.metric == "cosine" else 1.0

    @invariant()
    def reads_agree_with_the_model(self) -> None:
        assert self.coll.count() == len(self.model)
        assert [(m.namespace, m.key) for m in self.coll.iter()] == sorted(self.model)
        assert self.coll.count(namespace=("a",)) == sum(ns[0] == "a" for ns, _ in self.model)
        hits = self.coll.search([1.0, 0.5, 0.25], k=len(NAMES), nprobe=0)
        assert sorted((h.memory.namespace, h.memory.key) for h in hits) == sorted(self.model)


class RangeMachine(ShardedMachine):
    choices = len(RANGE_VALUES)

    def create(self, db: memcluster.Database) -> memcluster.Collection:
        return db.create_collection(
            "r", dim=DIM, shards=3, sharding="range", range_field="t", boundaries=[0, 10]
        )

    def fields(self, choice: int) -> dict[str, Any]:
        return {"vector": [1.0, float(choice), 0.5], "metadata": {"t": RANGE_VALUES[choice]}}

    @invariant()
    def range_filters_count_like_the_model(self) -> None:
        in_middle = sum(0 <= RANGE_VALUES[v["choice"]] < 10 for v in self.model.values())
        assert self.coll.count(filter={"t": {"$gte": 0, "$lt": 10}}) == in_middle


class VectorMachine(ShardedMachine):
    choices = len(VECTORS)

    def create(self, db: memcluster.Database) -> memcluster.Collection:
        return db.create_collection(
            "v",
            dim=DIM,
            metric="cosine",
            shards=3,
            sharding="vector",
            centroids=np.eye(3),
            nprobe=1,
        )

    def fields(self, choice: int) -> dict[str, Any]:
        return {"vector": VECTORS[choice], "metadata": {"c": choice}}


MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRangeShardedEngine = RangeMachine.TestCase
TestRangeShardedEngine.settings = MACHINE_SETTINGS
TestVectorShardedEngine = VectorMachine.TestCase
TestVectorShardedEngine.settings = MACHINE_SETTINGS


# -- searches -------------------------------------------------------------------------------


def spy_on_searches(coll: memcluster.Collection, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of each shard a search, count or list calls into."""
    touched: list[int] = []
    for i, shard in enumerate(coll._shards):
        for method in ("search", "count", "list_page", "delete_where"):
            real = getattr(shard, method)

            def wrapper(*args: Any, _i: int = i, _real: Callable[..., Any] = real) -> Any:
                touched.append(_i)
                return _real(*args)

            monkeypatch.setattr(shard, method, wrapper)
    return touched


def brute_force(
    items: list[tuple[Key, np.ndarray]], query: np.ndarray, metric: str
) -> dict[Key, float]:
    matrix = np.array([v for _, v in items], dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    if metric == "cosine":
        matrix /= np.linalg.norm(matrix, axis=1)[:, None]
        q = q / np.linalg.norm(q)
    scores = -((matrix - q) ** 2).sum(axis=1) if metric == "l2" else matrix @ q
    return {name: float(s) for (name, _), s in zip(items, scores, strict=True)}


def assert_exact_top_k(hits: list[Hit], expected: dict[Key, float], k: int) -> None:
    """``hits`` are the k best of ``expected`` in order (score, then namespace and key), up
    to float32 rounding: near-equal scores may come in either order."""
    eps = 1e-4
    ranked = sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))
    kth = ranked[k - 1][1]
    got = [(h.memory.namespace, h.memory.key) for h in hits]
    assert len(got) == k == len(set(got))
    for name, hit in zip(got, hits, strict=True):
        assert abs(hit.score - expected[name]) < eps, name
        assert expected[name] >= kth - eps
    assert {name for name, s in ranked if s > kth + eps} <= set(got)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    clear = all(
        abs(a - b) > eps
        for a, b in zip(
            [s for _, s in ranked[: k + 1]], [s for _, s in ranked[1 : k + 1]], strict=False
        )
    )
    if clear:
        assert got == [name for name, _ in ranked[:k]]


@pytest.mark.parametrize("strategy", ["hash", "range", "vector"])
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_a_search_of_every_shard_is_the_exact_top_k(
    db: memcluster.Database, seed: int, strategy: str, metric: str
) -> None:
    rng = np.random.default_rng(seed)
    dim, n, k = 6, 120, 10
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    fields: dict[str, Any] = {
        "hash": dict[str, Any](),
        "range": {"sharding": "range", "range_field": "t", "boundaries": [-10, 0, 10]},
        "vector": {"sharding": "vector", "sample": vectors, "nprobe": 1},
    }[strategy]
    coll = db.create_collection("c", dim=dim, metric=metric, shards=4, **fields)
    names: list[Key] = [((f"ns{i % 4}",), f"k{i:03d}") for i in range(n)]
    coll.put_many(
        [
            Memory(namespace=ns, key=key, vector=v, metadata={"t": float(rng.uniform(-20, 20))})
            for (ns, key), v in zip(names, vectors, strict=True)
        ]
    )
    assert sum(s.live_count > 0 for s in coll._shards) >= 2  # really spread
    items = list(zip(names, vectors, strict=True))
    for _ in range(8):
        q = rng.standard_normal(dim).astype(np.float32)
        hits = coll.search(q, k=k, nprobe=0)
        assert isinstance(hits, SearchResult)
        assert hits.missing_shards == []
        assert_exact_top_k(hits, brute_force(items, q, metric), k)
        under = coll.search(q, k=k, namespace=("ns1",), nprobe=0)
        assert_exact_top_k(
            under, brute_force([it for it in items if it[0][0] == ("ns1",)], q, metric), k
        )


def test_a_range_search_touches_only_the_overlapping_shards(
    db: memcluster.Database, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(seed)
    coll = db.create_collection(
        "c", dim=4, shards=4, sharding="range", range_field="t", boundaries=[0, 10, 20]
    )
    coll.put_many(
        [
            Memory(
                namespace=("a",),
                key=f"k{i}",
                vector=rng.standard_normal(4),
                metadata={"t": float(rng.uniform(-10, 30))},
            )
            for i in range(200)
        ]
    )
    flt = {"t": {"$gte": 5, "$lt": 15}, "u": {"$exists": False}}
    q = rng.standard_normal(4)
    unpruned = sorted(
        (
            h
            for shard in coll._shards
            for h in shard.search(
                memcluster.core.validation.query_vector(q, 4, coll.config.metric),
                10,
                (),
                compile_filter(flt),
            )
        ),
        key=lambda h: (-h.score, h.memory.namespace, h.memory.key),
    )[:10]
    expected_count = sum(shard.count((), compile_filter(flt)) for shard in coll._shards)
    touched = spy_on_searches(coll, monkeypatch)
    hits = coll.search(q, k=10, filter=flt)
    assert sorted(set(touched)) == [1, 2]
    assert [(h.memory.key, h.score) for h in hits] == [(h.memory.key, h.score) for h in unpruned]
    assert all(5 <= h.memory.metadata["t"] < 15 for h in hits)
    touched.clear()
    assert coll.count(filter=flt) == expected_count
    assert len(coll.list(filter=flt, limit=1000).items) == expected_count
    assert sorted(set(touched)) == [1, 2]
    touched.clear()
    assert coll.count(filter={"t": {"$gte": 30}}) == 0
    assert sorted(set(touched)) == [3]
    touched.clear()
    assert coll.delete_where(filter={"t": {"$lt": 0}}) > 0
    assert sorted(set(touched)) == [0]
    assert coll.count(filter={"t": {"$lt": 0}}) == 0


def test_a_namespace_keyed_search_touches_one_shard(
    db: memcluster.Database, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(seed)
    coll = db.create_collection("c", dim=4, metric="l2", shards=4, shard_key="namespace:2")
    names: list[Key] = [
        ((f"team{t}", f"agent{a}", *(("sub",) if i % 2 else ())), f"k{i}")
        for t in range(3)
        for a in range(4)
        for i in range(6)
    ]
    vectors = rng.standard_normal((len(names), 4)).astype(np.float32)
    coll.put_many(
        [Memory(namespace=ns, key=k, vector=v) for (ns, k), v in zip(names, vectors, strict=True)]
    )
    for ns in {ns[:2] for ns, _ in names}:
        agent = [s.count(ns, compile_filter(None)) for s in coll._shards]
        assert sorted(agent)[:-1] == [0, 0, 0]
        assert max(agent) == 6
    q = rng.standard_normal(4).astype(np.float32)
    touched = spy_on_searches(coll, monkeypatch)
    hits = coll.search(q, k=4, namespace=("team1", "agent2"))
    assert touched == [namespace_hash(("team1", "agent2")) % 4]
    mine = [
        (name, v)
        for name, v in zip(names, vectors, strict=True)
        if name[0][:2] == ("team1", "agent2")
    ]
    assert_exact_top_k(hits, brute_force(mine, q, "l2"), 4)
    touched.clear()
    assert coll.count(namespace=("team1", "agent2", "sub")) == 3
    assert len(touched) == 1
    touched.clear()
    assert coll.count(namespace=("team1",)) == 24
    assert sorted(touched) == [0, 1, 2, 3]


def test_a_vector_search_probes_nprobe_shards(
    db: memcluster.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    coll = db.create_collection(
        "c", dim=3, shards=3, sharding="vector", centroids=np.eye(3), nprobe=1
    )
    coll.put_many([Memory(namespace=("a",), key=f"k{i}", vector=v) for i, v in enumerate(VECTORS)])
    touched = spy_on_searches(coll, monkeypatch)
    hits = coll.search([0.1, 0.0, 1.0], k=10)
    assert touched == [2]
    assert {h.memory.key for h in hits} == {"k2"}
    touched.clear()
    assert len(coll.search([0.1, 0.0, 1.0], k=10, nprobe=2)) == 4
    assert touched == [0, 2]
    touched.clear()
    assert len(coll.search([0.1, 0.0, 1.0], k=10, nprobe=0)) == len(VECTORS)
    assert sorted(touched) == [0, 1, 2]
    bad: Any
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(InvalidArgument, match="nprobe"):
            coll.search([1, 0, 0], nprobe=bad)
    with pytest.raises(InvalidArgument, match="allow_partial"):
        coll.search([1, 0, 0], allow_partial="yes")  # type: ignore[arg-type]
    assert coll.search([1, 0, 0], allow_partial=True).missing_shards == []


# -- the three clients ----------------------------------------------------------------------


def test_sharded_collections_work_through_every_client(store: Any) -> None:
    ranged = store.create_collection(
        "r", dim=2, shards=3, sharding="range", range_field="t", boundaries=[0, 10]
    )
    assert ranged.config.boundaries == [0.0, 10.0]
    ranged.put(("a",), "k", vector=[1, 0], metadata={"t": 5})
    ranged.put(("a",), "k", vector=[1, 0], metadata={"t": 50})
    assert ranged.count() == 1
    assert ranged.get(("a",), "k").metadata == {"t": 50}
    hits = ranged.search([1, 0], k=3, filter={"t": {"$gte": 10}})
    assert [h.memory.key for h in hits] == ["k"]
    assert hits.missing_shards == []
    with pytest.raises(InvalidMetadata, match="'t'"):
        ranged.put(("a",), "j", vector=[1, 0])
    sample = [[1, 0], [0.9, 0.2], [0, 1], [0.1, 0.8]]
    vectored = store.create_collection("v", dim=2, shards=2, sharding="vector", sample=sample)
    assert vectored.config.centroids is not None
    assert len(vectored.config.centroids) == 2
    vectored.put(("a",), "x", vector=[1, 0])
    vectored.put(("a",), "y", vector=[0, 1])
    assert len(vectored.search([1, 0], k=5, nprobe=1)) == 1
    assert len(vectored.search([1, 0], k=5, nprobe=0)) == 2
    with pytest.raises(InvalidArgument, match="needs boundaries"):
        store.create_collection("bad", dim=2, shards=2, sharding="range", range_field="t")
