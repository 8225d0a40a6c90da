"""memcluster: a distributed memory cluster for AI agents.

Memories (text, embedding, JSON metadata) under (namespace, key), found by meaning in
milliseconds. Embedded in one process::

    import memcluster
    with memcluster.open("./data") as db:
        coll = db.create_collection("memories", dim=384)
        coll.put(namespace=("team-a", "agent-7"), key="m1", text="...", vector=vec)
        hits = coll.search(vector=query, k=10, namespace=("team-a",))

or on a server (``memcluster serve``), with the same collection methods::

    db = memcluster.connect("http://127.0.0.1:7700")   # or "mc://127.0.0.1:7701"
    async with memcluster.AsyncClient("mc://127.0.0.1:7701") as client: ...

Errors are one tree under :class:`MemclusterError`; :func:`is_retryable` says which ones a
retry can fix.
"""

from memcluster.client.embedded import Collection, Database, open
from memcluster.client.remote import AsyncClient, AsyncCollection
from memcluster.client.sync import Client, connect
from memcluster.core.api import Consistency
from memcluster.core.config import Config
from memcluster.core.errors import (
    AlreadyExists,
    CapacityExceeded,
    CollectionExists,
    CollectionNotFound,
    CorruptionError,
    CursorExpired,
    DimensionMismatch,
    FatalError,
    InvalidArgument,
    InvalidFilter,
    InvalidMetadata,
    InvalidName,
    InvalidState,
    InvalidVector,
    LeaseExpired,
    MemclusterError,
    NotFound,
    NotLeader,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    RequestError,
    RetryableError,
    ShardUnavailable,
    StaleToken,
    StorageError,
    Timeout,
    Unauthenticated,
    Unreachable,
    VersionConflict,
    is_retryable,
)
from memcluster.core.types import (
    CollectionConfig,
    CollectionInfo,
    CollectionStats,
    Durability,
    Event,
    EventOp,
    Eviction,
    Hit,
    Memory,
    Metric,
    Page,
)

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncCollection",
    "CapacityExceeded",
    "Client",
    "Collection",
    "CollectionConfig",
    "CollectionExists",
    "CollectionInfo",
    "CollectionNotFound",
    "CollectionStats",
    "Config",
    "Consistency",
    "CorruptionError",
    "CursorExpired",
    "Database",
    "DimensionMismatch",
    "Durability",
    "Event",
    "EventOp",
    "Eviction",
    "FatalError",
    "Hit",
    "InvalidArgument",
    "InvalidFilter",
    "InvalidMetadata",
    "InvalidName",
    "InvalidState",
    "InvalidVector",
    "LeaseExpired",
    "MemclusterError",
    "Memory",
    "Metric",
    "NotFound",
    "NotLeader",
    "Overloaded",
    "Page",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "RequestError",
    "RetryableError",
    "ShardUnavailable",
    "StaleToken",
    "StorageError",
    "Timeout",
    "Unauthenticated",
    "Unreachable",
    "VersionConflict",
    "connect",
    "is_retryable",
    "open",
]
