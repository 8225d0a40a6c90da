"""One behaviour suite, three clients: embedded, HTTP and binary protocol.

Every test runs against ``memcluster.open()`` in this process, and against a real
``memcluster serve`` process through ``memcluster.connect("http://...")`` and
``memcluster.connect("mc://...")``. The same calls must give the same results and raise the
same errors, field for field.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import memcluster
from memcluster import Memory

DIM = 4
Store = Any  # memcluster.Database or memcluster.Client: the same interface


def vec(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


def unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm


def test_collections_are_created_listed_described_and_dropped(store: Store) -> None:
    coll = store.create_collection("notes", dim=DIM, metric="dot", shards=2, ttl_s=60)
    assert coll.name == "notes"
    assert coll.config.metric == memcluster.Metric.DOT
    assert store.list_collections() == ["notes"]
    info = store.collection("notes").describe()
    assert (info.config.dim, info.config.shards, info.config.ttl_s) == (DIM, 2, 60)
    assert info.stats.items == 0
    assert info.stats.last_seq == [0, 0]
    with pytest.raises(memcluster.CollectionExists):
        store.create_collection("notes", dim=DIM)
    store.drop_collection("notes")
    assert store.list_collections() == []
    with pytest.raises(memcluster.CollectionNotFound):
        store.collection("notes")
    with pytest.raises(memcluster.CollectionNotFound):
        store.drop_collection("notes")


def test_bad_collection_configs_are_rejected(store: Store) -> None:
    with pytest.raises(memcluster.InvalidName):
        store.create_collection("bad name!", dim=DIM)
    with pytest.raises(memcluster.InvalidArgument, match="dim"):
        store.create_collection("c", dim=0)
    with pytest.raises(memcluster.InvalidArgument):
        store.create_collection("c", dim=DIM, metric="hamming")
    assert store.list_collections() == []


def test_put_returns_versions_and_get_returns_the_memory(store: Store) -> None:
    coll = store.create_collection("m", dim=DIM)
    assert coll.put(("team-a", "agent-7"), "k1", text="hello", vector=[1, 2, 3, 4]) == 1
    assert coll.put(["team-a", "agent-7"], "k1", text="again", vector=vec(1, 0, 0, 0)) == 2
    got = coll.get(("team-a", "agent-7"), "k1")
    assert got is not None
    assert (got.namespace, got.key, got.text, got.version) == (
        ("team-a", "agent-7"),
        "k1",
        "again",
        2,
    )
    assert isinstance(got.vector, np.ndarray)
    assert got.vector.dtype == np.float32
    np.testing.assert_allclose(got.vector, [1, 0, 0, 0])
    assert got.metadata == {}
    assert got.updated_at >= got.created_at > 0
    assert got.expires_at is None
    assert coll.get(("team-a", "agent-7"), "missing") is None


def test_metadata_text_and_ttl_round_trip(store: Store) -> None:
    coll = store.create_collection("m", dim=DIM)
    meta = {"speaker": "Alice", "session": 3, "tags": ["x", "y"], "nested": {"a": 1.5}, "ok": True}
    coll.put(("a",), "k", text="ünïcode ✓", vector=vec(1, 1, 0, 0), metadata=meta, ttl_s=3600)
    got = coll.get(("a",), "k")
    assert got is not None
    assert got.metadata == meta
    assert got.text == "ünïcode ✓"
    assert got.expires_at is not None
    assert math.isclose(got.expires_at - got.updated_at, 3600, abs_tol=1)


def test_conditional_puts_report_expected_and_actual(store: Store) -> None:
    coll = store.create_collection("m", dim=DIM)
    assert coll.put(("a",), "k", vector=vec(1, 0, 0, 0), if_version=0) == 1
    with pytest.raises(memcluster.VersionConflict) as info:
        coll.put(("a",), "k", vector=vec(1, 0, 0, 0), if_version=0)
    assert (info.value.expected, info.value.actual) == (0, 1)
    with pytest.raises(memcluster.VersionConflict) as info:
        coll.put(("a",), "k", vector=vec(1, 0, 0, 0), if_version=5)
    assert (info.value.expected, info.value.actual) == (5, 1)
    assert coll.put(("a",), "k", vector=vec(1, 0, 0, 0), if_version=1) == 2


def test_put_many_is_ordered_idempotent_and_all_or_nothing(store: Store) -> None:
    coll = store.create_collection("m", dim=DIM, shards=3)
    batch = [Memory(namespace=("a",), key=f"k{i}", vector=vec(1, i, 0, 0)) for i in range(20)]
    versions = coll.put_many(batch, idempotency_key="batch-1")
    assert all(v >= 1 for v in versions)
    assert coll.get(("a",), "k7").version == versions[7]
    assert coll.put_many(batch, idempotency_key="batch-1") == versions
    assert coll.count() == 20
    bad = [*batch[:5], Memory(namespace=("a",), key="wrong", vector=[1.0, 2.0])]
    with pytest.raises(memcluster.DimensionMismatch) as info:
        coll.put_many(bad)
    assert (info.value.expected, info.value.actual) == (DIM, 2)
    assert coll.get(("a",), "k0").version == versions[0]
    assert coll.get(("a",), "wrong") is None
    assert coll.put_many([]) == []


def test_delete_and_delete_where(store: Store) -> None:
    coll = store.create_collection("m", dim=DIM, shards=2)
    for i in range(10):
        coll.put(("a", "x" if i < 6 else "y"), f"k{i}", vector=vec(1, i, 0, 0), metadata={"i": i})
    assert coll.delete(("a", "x"), "k0") is True
    assert coll.delete(("a", "x"), "k0") is False
    assert coll.delete_where(filter={"i": {"$gte": 8}}) == 2
    assert coll.delete_where(namespace=("a", "x")) == 5
    assert coll.count() == 2
    assert coll.delete_where() == 2
    assert coll.count() == 0


def test_search_ranks_filters_and_scopes(store: Store) -> None:
    coll = store.create_collection("m", dim=DIM, shards=2)
    coll.put(("team-a", "alice"), "east", vector=vec(1, 0, 0, 0), metadata={"kind": "fact"})
    coll.put(("team-a", "bob"), "north", vector=vec(0, 1, 0, 0), metadata={"kind": "fact"})
    coll.put(("team-b", "carol"), "north-east", vector=vec(1, 1, 0, 0), metadata={"kind": "plan"})
    hits = coll.search(vec(1, 0.1, 0, 0), k=3)
    assert [h.memory.key for h in hits] == ["east", "north-east", "north"]
    assert hits[0].score == pytest.approx(float(unit(vec(1, 0.1, 0, 0))[0]), abs=1e-5)
    assert hits[0].memory.vector is None
    scoped = coll.search(vec(1, 0.1, 0, 0), k=3, namespace=("team-a",))
    assert [h.memory.key for h in scoped] == ["east", "north"]
    filtered = coll.search(vec(1, 0.1, 0, 0), k=3, filter={"kind": "plan"})
    assert [h.memory.key for h in filtered] == ["north-east"]
    with_vectors = coll.search(vec(0, 1, 0, 0), k=1, include_vectors=True, consistency="eventual")
    assert isinstance(with_vectors[0].memory.vector, np.ndarray)
    np.testing.assert_allclose(with_vectors[0].memory.vector, [0, 1, 0, 0])
    with pytest.raises(memcluster.InvalidArgument, match="k"):
        coll.search(vec(1, 0, 0, 0), k=0)
    with pytest.raises(memcluster.InvalidArgument, match="consistency"):
        coll.search(vec(1, 0, 0, 0), consistency="sometimes")


def test_count_list_and_iter_page_in_key_order(store: Store) -> None:
    coll = store.create_collection("m", dim=DIM, shards=3)
    keys = [f"k{i:03d}" for i in range(25)]
    coll.put_many([Memory(namespace=("a",), key=k, vector=vec(1, 0, 0, 1)) for k in keys])
    coll.put(("b",), "other", vector=vec(0, 1, 0, 0))
    assert coll.count(namespace=("a",)) == 25
    page = coll.list(namespace=("a",), limit=10)
    assert [m.key for m in page.items] == keys[:10]
    assert page.next_cursor is not None
    assert all(m.vector is None for m in page.items)
    seen: list[str] = []
    cursor = None
    while True:
        page = coll.list(namespace=("a",), limit=10, cursor=cursor)
        seen.extend(m.key for m in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == keys
    assert [m.key for m in coll.iter()] == [*keys, "other"]
    with pytest.raises(memcluster.InvalidArgument, match="cursor"):
        coll.list(cursor="not-a-cursor")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.put("team-a", "k", vector=[1, 0, 0, 0]), memcluster.InvalidName),
        (lambda c: c.put(("a",), "", vector=[1, 0, 0, 0]), memcluster.InvalidName),
        (lambda c: c.put(("a",), "k", vector=[math.nan, 0, 0, 0]), memcluster.InvalidVector),
        (lambda c: c.put(("a",), "k", vector=[0, 0, 0, 0]), memcluster.InvalidVector),
        (lambda c: c.put(("a",), "k", vector=[1, 2, 3]), memcluster.DimensionMismatch),
        (lambda c: c.put(("a",), "k", vector=[1, 0, 0, 0], ttl_s=-1), memcluster.InvalidArgument),
        (
            lambda c: c.put(("a",), "k", vector=[1, 0, 0, 0], if_version=-2),
            memcluster.InvalidArgument,
        ),
        (lambda c: c.search([1, 0, 0, 0], filter={"x": {"$near": 1}}), memcluster.InvalidFilter),
        (lambda c: c.search([1, 0, 0]), memcluster.DimensionMismatch),
        (lambda c: c.count(filter={"$and": 3}), memcluster.InvalidFilter),
        (
            lambda c: c.put_many(
                [Memory(namespace=("a",), key=str(i), vector=[1, 0, 0, 0]) for i in range(10_001)]
            ),
            memcluster.PayloadTooLarge,
        ),
    ],
)
def test_bad_input_raises_the_same_error_everywhere_and_writes_nothing(
    store: Store, call: Any, error: type[Exception]
) -> None:
    coll = store.create_collection("m", dim=DIM)
    with pytest.raises(error):
        call(coll)
    assert coll.count() == 0


def test_operations_on_a_dropped_collection_raise_not_found(store: Store) -> None:
    coll = store.create_collection("m", dim=DIM)
    store.drop_collection("m")
    with pytest.raises((memcluster.CollectionNotFound, memcluster.InvalidState)):
        coll.count()
