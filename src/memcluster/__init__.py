"""memcluster: a distributed memory cluster for AI agents.

Memories (text, embedding, JSON metadata) under (namespace, key), found by meaning in
milliseconds. Embedded in one process today::

    import memcluster
    with memcluster.open("./data") as db:
        coll = db.create_collection("memories", dim=384)
        coll.put(namespace=("team-a", "agent-7"), key="m1", text="...", vector=vec)
        hits = coll.search(vector=query, k=10, namespace=("team-a",))

Errors are one tree under :class:`MemclusterError`; :func:`is_retryable` says which ones a
retry can fix.
"""

from memcluster.client.embedded import Collection, Database, open
from memcluster.core.config import Config
from memcluster.core.errors import (
    AlreadyExists,
    CapacityExceeded,
    CollectionExists,
    CollectionNotFound,
    CorruptionError,
    DimensionMismatch,
    FatalError,
    InvalidArgument,
    InvalidFilter,
    InvalidMetadata,
    InvalidName,
    InvalidState,
    InvalidVector,
    MemclusterError,
    NotFound,
    NotLeader,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    RetryableError,
    ShardUnavailable,
    StorageError,
    Timeout,
    VersionConflict,
    is_retryable,
)
from memcluster.core.types import (
    CollectionConfig,
    CollectionInfo,
    CollectionStats,
    Durability,
    Eviction,
    Hit,
    Memory,
    Metric,
    Page,
)

__all__ = [
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
