"""The shard hash is part of the data format: its values are pinned."""

from __future__ import annotations

from memcluster.core.hashing import key_hash, shard_of


def test_key_hash_values_are_stable() -> None:
    # Changing these breaks every existing multi-shard collection: never update them.
    assert key_hash(("team-a", "agent-7"), "m1") == GOLDEN_M1
    assert shard_of(("team-a", "agent-7"), "m1", 4) == GOLDEN_M1 % 4


def test_namespace_boundaries_matter() -> None:
    assert key_hash(("ab", "c"), "k") != key_hash(("a", "bc"), "k")
    assert key_hash(("a",), "bk") != key_hash(("ab",), "k")


def test_shards_are_balanced() -> None:
    counts = [0] * 8
    for i in range(8000):
        counts[shard_of(("ns",), f"key-{i}", 8)] += 1
    assert min(counts) > 850, counts
    assert max(counts) < 1150, counts


GOLDEN_M1 = 10647393847058488244
