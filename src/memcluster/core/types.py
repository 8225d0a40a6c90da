"""Value types shared by every layer: memories, search hits, collection configs.

They are msgspec Structs, so the same classes are validated, encoded to JSON or msgpack and
documented on every protocol. Vectors are numpy ``float32`` arrays in results; on input any
sequence of numbers is accepted and validated by the shard.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class Metric(enum.StrEnum):
    """Similarity metric of a collection. Every score is "higher is better"."""

    COSINE = "cosine"
    """Cosine similarity in [-1, 1]. Vectors are stored L2-normalised."""
    DOT = "dot"
    """Inner product."""
    L2 = "l2"
    """Negative squared Euclidean distance (0 is an exact match)."""


class Eviction(enum.StrEnum):
    """What a full collection does with a new write."""

    NONE = "none"
    """Reject the write with ``CapacityExceeded``."""
    LRU = "lru"
    """Delete the least recently used memories (reads and writes count as uses)."""
    LFU = "lfu"
    """Delete the least frequently used memories (ties: least recently used)."""
    TTL = "ttl"
    """Delete the memories closest to expiry; memories without TTL are never evicted."""


class Durability(enum.StrEnum):
    """When a write is acknowledged relative to the disk."""

    FSYNC = "fsync"
    """fsync before the acknowledgement (group commit shares one fsync among concurrent
    writers). An acknowledged write survives a crash of the process and of the machine."""
    BATCH = "batch"
    """Written to the OS before the acknowledgement, fsynced by the background step every
    ``wal_batch_sync_interval_s``. Survives a crash of the process, not of the machine."""
    NONE = "none"
    """Unsafe: never fsynced except at close and snapshots. Survives a crash of the process,
    may lose anything on a crash of the machine. For tests and scratch data."""


class Sharding(enum.StrEnum):
    """How memories are spread over a collection's shards."""

    HASH = "hash"
    """Stable hash of (namespace, key)."""


class CollectionConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything that defines a collection. Fixed at creation."""

    name: str
    dim: int
    metric: Metric = Metric.COSINE
    shards: int = 1
    sharding: Sharding = Sharding.HASH
    ttl_s: float | None = None
    """Default time to live of a memory written without its own ``ttl_s``."""
    capacity_items: int | None = None
    """Most live memories in the collection. Enforced per shard as ceil(capacity / shards)."""
    capacity_bytes: int | None = None
    """Most bytes of memories (vector + text + metadata + names), per shard as above."""
    namespace_capacity_items: int | None = None
    """Most live memories under one exact namespace, per shard as above."""
    eviction: Eviction = Eviction.NONE
    durability: Durability | None = None
    """Acknowledgement level; None takes the process default (``Config.durability``)."""


class Memory(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One memory: text, embedding and metadata under (namespace, key).

    On writes, ``ttl_s`` and ``if_version`` are options of that write (``if_version=0``:
    only if absent; ``N``: only if the stored version is N). On reads, ``version``,
    ``created_at``, ``updated_at`` and ``expires_at`` (seconds since the epoch) are filled.
    """

    namespace: tuple[str, ...]
    key: str
    text: str | None = None
    vector: Any = None
    """Write: any sequence of ``dim`` numbers. Read: a numpy float32 array (or None when the
    read did not ask for vectors)."""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    ttl_s: float | None = None
    if_version: int | None = None
    lease: int | None = None
    """Write: attach the memory to this lease (``grant_lease``): it is deleted when the lease
    ends. Read: the lease it is attached to, if any."""
    version: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    expires_at: float | None = None


class Hit(msgspec.Struct, frozen=True):
    """One search result: the memory and its score (higher is better)."""

    memory: Memory
    score: float


class Page(msgspec.Struct, frozen=True):
    """One page of a list: memories in (namespace, key) order and the cursor of the next page
    (None when this is the last)."""

    items: list[Memory]
    next_cursor: str | None


class CollectionStats(msgspec.Struct, frozen=True, kw_only=True):
    """A collection's live size, summed over its shards."""

    items: int
    bytes: int
    indexed_items: int
    """Memories already in the ANN graph; the rest are in the exact buffer."""
    last_seq: list[int]
    """Per shard: the sequence number of the last applied write."""


class CollectionInfo(msgspec.Struct, frozen=True):
    """A collection's config and stats."""

    config: CollectionConfig
    stats: CollectionStats


class EventOp(enum.StrEnum):
    """What a change-feed event reports."""

    PUT = "put"
    DELETE = "delete"
    EXPIRE = "expire"
    """Deleted because its TTL passed."""
    EVICT = "evict"
    """Deleted to make room (capacity eviction)."""


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One applied write, as the change feed delivers it.

    ``version`` is the change's sequence number in its shard (for a put, the memory's new
    version); events of one shard arrive in that order. ``cursor`` resumes a subscription
    right after this event. Puts carry the memory's text and metadata (and its vector when
    the subscription asked for vectors); deletes carry only the address.
    """

    collection: str
    namespace: tuple[str, ...]
    key: str
    op: EventOp
    version: int
    time: float
    shard: int
    cursor: str
    text: str | None = None
    metadata: dict[str, Any] | None = None
    vector: Any = None


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """A message of a topic: what ``publish`` sent, with its position.

    ``seq`` orders the messages of every topic of a database; ``cursor`` resumes a
    subscription right after this message.
    """

    topic: str
    payload: Any
    seq: int
    time: float
    cursor: str
