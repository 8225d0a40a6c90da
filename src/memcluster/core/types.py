"""Value types shared by every layer: memories, search hits, collection configs.

They are msgspec Structs, so the same classes are validated, encoded to JSON or msgpack and
documented on every protocol. Vectors are numpy ``float32`` arrays in results; on input any
sequence of numbers is accepted and validated by the shard.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
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


class Replication(enum.StrEnum):
    """How a shard's replicas stay in step (DESIGN.md §6)."""

    LEADER = "leader"
    """One leader takes the shard's writes and streams its log to the followers."""
    CHAIN = "chain"
    """Writes enter at the head and flow to the tail, which acknowledges."""
    MULTI = "multi"
    """Every replica takes writes; conflicts resolve last-writer-wins."""


class Ack(enum.StrEnum):
    """When a write to a replicated shard is acknowledged."""

    ALL = "all"
    """Once every in-sync replica has it (durable on each): survives any failover."""
    MAJORITY = "majority"
    """Once a majority of the replicas has it."""
    LEADER = "leader"
    """Once the leader has it (asynchronous replication): a failover can lose the writes of
    the last moments."""


class Sharding(enum.StrEnum):
    """How memories are spread over a collection's shards."""

    HASH = "hash"
    """A stable hash of (namespace, key), or of the namespace's first parts (see
    ``CollectionConfig.shard_key``). Even spread; a key's shard is fixed by its name."""
    RANGE = "range"
    """By the number in one metadata field (``range_field``) against ``boundaries``: memories
    with nearby values share a shard, and a filter on that field searches only the shards
    its range overlaps."""
    VECTOR = "vector"
    """By the nearest of ``centroids`` to the memory's vector: similar memories share a
    shard, and a search may probe only the ``nprobe`` shards nearest the query (faster,
    approximate)."""


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
    shard_key: str = "key"
    """Hash sharding only: what the hash covers.

    ``"key"``: (namespace, key), spreading memories evenly (``hashing.shard_of``).
    ``"namespace"``: the whole namespace, so a namespace's memories share one shard.
    ``"namespace:N"``: the first N namespace parts (all of them if fewer), so one agent's
    memories share a shard and a search whose namespace prefix has at least N parts touches
    only that shard. ``"namespace:2"`` with namespaces ``(team, agent, ...)`` keeps each
    agent on one shard; a search under ``("team-a",)`` still touches every shard.
    """
    range_field: str | None = None
    """Range sharding only: the top-level metadata field that places a memory. Every memory
    put into the collection must hold a finite number there (bools are not numbers)."""
    boundaries: list[float] | None = None
    """Range sharding only: ``shards - 1`` strictly ascending finite numbers. Shard i holds
    values in ``[boundaries[i-1], boundaries[i])``; shard 0 starts at -inf, the last one
    ends at +inf. ``[10, 20]`` with 3 shards: ``< 10``, ``[10, 20)``, ``>= 20``."""
    centroids: list[list[float]] | None = None
    """Vector sharding only: ``shards`` rows of ``dim`` finite numbers. A memory goes to the
    shard of its nearest centroid under the metric (cosine: highest cosine; dot: highest
    inner product; l2: smallest distance; ties: the lowest shard). ``sharding.kmeans`` of a
    sample of the data computes good ones."""
    nprobe: int | None = None
    """Vector sharding only: how many shards (those whose centroids are nearest the query) a
    search probes unless it says otherwise; None probes all of them (exact)."""
    range_shards: list[int] | None = None
    """Range sharding only: the shard of each value interval, in value order (interval i is
    ``[boundaries[i-1], boundaries[i])``); None: interval i is shard i. A split gives the
    upper half of a shard's interval to a new shard, numbered ``shards``."""
    split_items: int | None = None
    """Range sharding in a cluster: a shard holding more memories than this is split at the
    median of its values (None: never)."""
    train_after: int | None = None
    """Vector sharding in a cluster, without ``centroids``: every memory goes to shard 0
    until it holds this many; then k-means on a sample learns one centroid per shard and
    the memories move to their nearest centroid's shard."""
    replication_factor: int = 1
    """Copies of each shard, on distinct nodes (a cluster with at least that many nodes)."""
    replication: Replication = Replication.LEADER
    ack: Ack = Ack.ALL
    """When writes are acknowledged, for replicated collections."""


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


class SearchResult(list[Hit]):
    """The hits of a search, best first: a list, plus ``missing_shards`` (as
    "collection/NNNN"), the shards that could not answer a search made with
    ``allow_partial=True`` (always empty otherwise)."""

    def __init__(
        self,
        hits: Iterable[Hit] = (),
        missing_shards: Iterable[str] = (),
        session: str | None = None,
    ) -> None:
        super().__init__(hits)
        self.missing_shards: list[str] = list(missing_shards)
        self.session = session
        """A ``consistency="session"`` search in a cluster: the session token, updated with
        what this search saw (see ``memcluster.core.session``)."""


class Written(list[int]):
    """The versions a ``put_many`` gave, in order: a list, plus ``session``, the token of a
    session that includes these writes (in a cluster; None on one node)."""

    def __init__(self, versions: Iterable[int] = (), session: str | None = None) -> None:
        super().__init__(versions)
        self.session = session


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

    ``version`` is the change's sequence number in its shard; events of one shard arrive in
    that order. For a put it is the memory's new version, except in range and vector sharded
    collections once memories moved into the shard, where versions run ahead of sequence
    numbers (so that a moved memory's version never goes back). ``cursor`` resumes a subscription
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
