"""Every bad input raises a specific error from the tree, says what to fix, and writes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import memcluster
from memcluster import Memory
from memcluster.core.config import Config

NS = ("team-a", "agent-7")
GOOD = [1.0, 0.0, 0.0]

Call = Callable[[memcluster.Collection], Any]


def BAD(value: Any) -> Any:  # noqa: N802 - reads as a marker in the table
    """A value of the wrong type, passed on purpose."""
    return value


BAD_WRITES: list[tuple[str, Call, type[Exception], str]] = [
    (
        "short vector",
        lambda c: c.put(NS, "k", vector=[1.0, 2.0]),
        memcluster.DimensionMismatch,
        "dim=3",
    ),
    (
        "long vector",
        lambda c: c.put(NS, "k", vector=[1.0] * 4),
        memcluster.DimensionMismatch,
        "4 dimensions",
    ),
    (
        "nan",
        lambda c: c.put(NS, "k", vector=[1.0, float("nan"), 0]),
        memcluster.InvalidVector,
        "NaN",
    ),
    (
        "inf",
        lambda c: c.put(NS, "k", vector=[float("inf"), 0, 0]),
        memcluster.InvalidVector,
        "infinite",
    ),
    (
        "zero under cosine",
        lambda c: c.put(NS, "k", vector=[0, 0, 0]),
        memcluster.InvalidVector,
        "zeros",
    ),
    (
        "2-d vector",
        lambda c: c.put(NS, "k", vector=[[1, 0, 0]]),
        memcluster.InvalidVector,
        "one-dimensional",
    ),
    (
        "strings as vector",
        lambda c: c.put(NS, "k", vector=["a", "b", "c"]),
        memcluster.InvalidVector,
        "numbers",
    ),
    ("no vector", lambda c: c.put(NS, "k"), memcluster.InvalidVector, "missing"),
    (
        "empty namespace",
        lambda c: c.put((), "k", vector=GOOD),
        memcluster.InvalidName,
        "at least one",
    ),
    (
        "string namespace",
        lambda c: c.put("team-a", "k", vector=GOOD),
        memcluster.InvalidName,
        "tuple",
    ),
    (
        "empty namespace part",
        lambda c: c.put(("a", ""), "k", vector=GOOD),
        memcluster.InvalidName,
        "empty",
    ),
    (
        "long namespace part",
        lambda c: c.put(("a" * 200,), "k", vector=GOOD),
        memcluster.InvalidName,
        "limit",
    ),
    (
        "deep namespace",
        lambda c: c.put(tuple("abcdefghij"), "k", vector=GOOD),
        memcluster.InvalidName,
        "parts",
    ),
    (
        "control char",
        lambda c: c.put(("a\x1fb",), "k", vector=GOOD),
        memcluster.InvalidName,
        "control",
    ),
    ("empty key", lambda c: c.put(NS, "", vector=GOOD), memcluster.InvalidName, "key"),
    ("long key", lambda c: c.put(NS, "k" * 600, vector=GOOD), memcluster.InvalidName, "limit"),
    ("int key", lambda c: c.put(NS, BAD(5), vector=GOOD), memcluster.InvalidName, "string"),
    (
        "huge text",
        lambda c: c.put(NS, "k", vector=GOOD, text="x" * 2_000_000),
        memcluster.PayloadTooLarge,
        "text",
    ),
    (
        "non-str text",
        lambda c: c.put(NS, "k", vector=GOOD, text=BAD(5)),
        memcluster.InvalidArgument,
        "text",
    ),
    (
        "list metadata",
        lambda c: c.put(NS, "k", vector=GOOD, metadata=BAD([1])),
        memcluster.InvalidMetadata,
        "object",
    ),
    (
        "set in metadata",
        lambda c: c.put(NS, "k", vector=GOOD, metadata={"a": {1}}),
        memcluster.InvalidMetadata,
        "JSON",
    ),
    (
        "nan in metadata",
        lambda c: c.put(NS, "k", vector=GOOD, metadata={"a": float("nan")}),
        memcluster.InvalidMetadata,
        "finite",
    ),
    (
        "$ key in metadata",
        lambda c: c.put(NS, "k", vector=GOOD, metadata={"$a": 1}),
        memcluster.InvalidMetadata,
        "'\\$'",
    ),
    (
        "dotted key",
        lambda c: c.put(NS, "k", vector=GOOD, metadata={"a.b": 1}),
        memcluster.InvalidMetadata,
        "'.'",
    ),
    (
        "int metadata key",
        lambda c: c.put(NS, "k", vector=GOOD, metadata=BAD({1: 1})),
        memcluster.InvalidMetadata,
        "strings",
    ),
    (
        "huge metadata",
        lambda c: c.put(NS, "k", vector=GOOD, metadata={"a": "x" * 70_000}),
        memcluster.PayloadTooLarge,
        "metadata",
    ),
    (
        "negative ttl",
        lambda c: c.put(NS, "k", vector=GOOD, ttl_s=-1),
        memcluster.InvalidArgument,
        "ttl_s",
    ),
    (
        "nan ttl",
        lambda c: c.put(NS, "k", vector=GOOD, ttl_s=float("nan")),
        memcluster.InvalidArgument,
        "ttl_s",
    ),
    (
        "negative if_version",
        lambda c: c.put(NS, "k", vector=GOOD, if_version=-1),
        memcluster.InvalidArgument,
        "if_version",
    ),
    (
        "one bad item in a batch",
        lambda c: c.put_many(
            [Memory(namespace=NS, key=f"k{i}", vector=GOOD) for i in range(5)]
            + [Memory(namespace=NS, key="bad", vector=[1.0, float("nan"), 0.0])]
        ),
        memcluster.InvalidVector,
        "vector 5",
    ),
    (
        "batch over the limit",
        lambda c: c.put_many(
            [Memory(namespace=NS, key=f"k{i}", vector=GOOD) for i in range(10_001)]
        ),
        memcluster.PayloadTooLarge,
        "split",
    ),
]

BAD_READS: list[tuple[str, Call, type[Exception], str]] = [
    (
        "unknown operator",
        lambda c: c.search(vector=GOOD, filter={"a": {"$regex": "x"}}),
        memcluster.InvalidFilter,
        r"\$regex",
    ),
    ("bad $in", lambda c: c.count(filter={"a": {"$in": 5}}), memcluster.InvalidFilter, r"\$in"),
    ("bad $and", lambda c: c.delete_where(filter={"$and": {}}), memcluster.InvalidFilter, r"\$and"),
    ("zero k", lambda c: c.search(vector=GOOD, k=0), memcluster.InvalidArgument, "k must"),
    ("huge k", lambda c: c.search(vector=GOOD, k=10**9), memcluster.InvalidArgument, "k must"),
    ("query dim", lambda c: c.search(vector=[1.0]), memcluster.DimensionMismatch, "dim=3"),
    ("query nan", lambda c: c.search(vector=[float("nan")] * 3), memcluster.InvalidVector, "NaN"),
    (
        "bad prefix",
        lambda c: c.search(vector=GOOD, namespace="team-a"),
        memcluster.InvalidName,
        "tuple",
    ),
    ("bad limit", lambda c: c.list(limit=0), memcluster.InvalidArgument, "limit"),
]


@pytest.fixture
def coll(db: memcluster.Database) -> memcluster.Collection:
    c = db.create_collection("m", dim=3, shards=2)
    c.put(NS, "existing", vector=GOOD, metadata={"a": 1})
    return c


@pytest.mark.parametrize(
    ("call", "error", "message"), [c[1:] for c in BAD_WRITES], ids=[c[0] for c in BAD_WRITES]
)
def test_bad_write_is_rejected_and_writes_nothing(
    coll: memcluster.Collection, call: Call, error: type[Exception], message: str
) -> None:
    before = coll.describe().stats
    with pytest.raises(error, match=message):
        call(coll)
    after = coll.describe().stats
    assert after.last_seq == before.last_seq
    assert after.items == before.items == 1


@pytest.mark.parametrize(
    ("call", "error", "message"), [c[1:] for c in BAD_READS], ids=[c[0] for c in BAD_READS]
)
def test_bad_read_is_rejected_with_its_error(
    coll: memcluster.Collection, call: Call, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call(coll)
    assert coll.count() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name!", "dim": 3}, "collection name"),
        ({"name": "", "dim": 3}, "collection name"),
        ({"name": "ok", "dim": 0}, "dim"),
        ({"name": "ok", "dim": 100_000}, "dim"),
        ({"name": "ok", "dim": 3, "metric": "hamming"}, "metric"),
        ({"name": "ok", "dim": 3, "shards": 0}, "shards"),
        ({"name": "ok", "dim": 3, "eviction": "random"}, "eviction"),
        ({"name": "ok", "dim": 3, "capacity_items": -5}, "capacity_items"),
        ({"name": "ok", "dim": 3, "ttl_s": 0}, "ttl_s"),
    ],
)
def test_bad_collection_config_is_rejected(
    db: memcluster.Database, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(memcluster.InvalidArgument, match=message):
        db.create_collection(**kwargs)
    assert db.list_collections() == []


def test_unknown_collection_says_how_to_find_one(db: memcluster.Database) -> None:
    with pytest.raises(memcluster.CollectionNotFound, match="list_collections"):
        db.collection("nope")


def test_bad_input_never_escapes_the_error_tree(tmp_path: Any) -> None:
    """Every rejection above is a MemclusterError, so a server can map it to a 4xx."""
    with memcluster.open(tmp_path, Config(background=False)) as db:
        c = db.create_collection("m", dim=3)
        for _, call, _, _ in BAD_WRITES + BAD_READS:
            with pytest.raises(memcluster.RequestError):
                call(c)
