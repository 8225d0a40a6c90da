"""The public surface: what `import memcluster` offers is pinned."""

from __future__ import annotations

import memcluster


def test_public_names_are_pinned() -> None:
    assert sorted(memcluster.__all__) == [
        "AlreadyExists",
        "CapacityExceeded",
        "Collection",
        "CollectionConfig",
        "CollectionExists",
        "CollectionInfo",
        "CollectionNotFound",
        "CollectionStats",
        "Config",
        "CorruptionError",
        "Database",
        "DimensionMismatch",
        "Durability",
        "Eviction",
        "FatalError",
        "Hit",
        "InvalidArgument",
        "InvalidFilter",
        "InvalidMetadata",
        "InvalidName",
        "InvalidState",
        "InvalidVector",
        "MemclusterError",
        "Memory",
        "Metric",
        "NotFound",
        "NotLeader",
        "Overloaded",
        "Page",
        "PayloadTooLarge",
        "RequestError",
        "RetryableError",
        "ShardUnavailable",
        "StorageError",
        "Timeout",
        "VersionConflict",
        "is_retryable",
        "open",
    ]
    for name in memcluster.__all__:
        assert hasattr(memcluster, name), name
