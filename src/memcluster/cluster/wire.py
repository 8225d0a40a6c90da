"""The node-to-node operations of the binary protocol: shard-level reads and writes, and
shard transfer. Clients never send them; nodes send them to the node holding a shard.

Each request names the collection and the shard numbers it is for; the receiving node answers
from those shards only, or with ``WrongNode`` if it does not hold one of them (the sender
looks the owner up again). Bodies are msgpack like the public operations (vectors as float32
extension values).
"""

from __future__ import annotations

from typing import Any

import msgspec

from memcluster.core.codec import Record
from memcluster.core.types import CollectionConfig, Event, Hit, Memory
from memcluster.replication.leader import Append, AppendAck, StatusRequest
from memcluster.replication.multi import PullRequest

Key = tuple[tuple[str, ...], str]


class ShardPut(msgspec.Struct, kw_only=True):
    collection: str
    batches: dict[int, list[Memory]]
    idempotency_key: str | None = None
    fence: tuple[str, int] | None = None
    """(lock, token): refused (StaleToken) by a shard where a higher token of the lock wrote."""
    ack: str | None = None
    """This write's acknowledgement policy (all, majority, leader); None: the collection's."""
    version_floors: dict[int, int] = {}
    """Per shard: versions given there must be above this (memories moving in keep counting
    up from their version in the shard they leave)."""
    w: int | None = None
    """``replication="multi"``: acknowledge once this many replicas hold the write."""


class ShardPutReply(msgspec.Struct):
    versions: dict[int, list[int]]
    seqs: dict[int, int] = {}
    """Per shard: its applied seq after the write (for session tokens)."""


class ShardGet(msgspec.Struct, kw_only=True):
    collection: str
    shards: list[int]
    namespace: tuple[str, ...]
    key: str
    eventual: bool = False
    session: dict[int, int] | None = None
    """A session read: per shard, the seq the replica must have applied to answer (it waits
    briefly for it, else refuses with WrongNode)."""


class ShardGetReply(msgspec.Struct):
    memory: Memory | None
    seqs: dict[int, int] = {}
    """A session read: the applied seq of each shard that answered."""
    stamp: tuple[int, str, int] | None = None
    """A ``multi`` collection's eventual read of one shard: the stamp (hlc, origin, 1 for a
    delete) of what the replica holds for the key, a tombstone included (None: never written
    there), so a quorum read picks the same winner as the replicas, and tells a newer delete
    from a missed put."""


class ShardDelete(msgspec.Struct, kw_only=True):
    collection: str
    deletes: dict[int, list[Key]]
    """Per shard, the memories to delete there."""
    fence: tuple[str, int] | None = None


class FenceCheck(msgspec.Struct, kw_only=True):
    """Does ``token`` hold lock ``lock`` now? (asked of the coordination shard's node)"""

    lock: str
    token: int


class ShardLocate(msgspec.Struct, kw_only=True):
    """Where are these memories? (range and vector collections, before writing)"""

    collection: str
    shards: list[int]
    keys: list[Key]


class Located(msgspec.Struct):
    found: dict[int, list[tuple[int, int, float]]]
    """Per shard: (index in keys, version, updated_at) of the memories it holds."""


class ShardDeleteVersions(msgspec.Struct, kw_only=True):
    """Delete older copies of moved memories, each only while still at that version."""

    collection: str
    deletes: dict[int, list[tuple[tuple[str, ...], str, int]]]


class ShardScope(msgspec.Struct, kw_only=True):
    """count, delete_where, stats: over ``shards``, a namespace prefix and a filter."""

    collection: str
    shards: list[int]
    namespace: tuple[str, ...] = ()
    filter: dict[str, Any] | None = None


class ShardCount(msgspec.Struct):
    count: int


class ShardSearch(msgspec.Struct, kw_only=True):
    collection: str
    shards: list[int]
    vector: Any
    k: int
    namespace: tuple[str, ...] = ()
    filter: dict[str, Any] | None = None
    include_vectors: bool = False
    eventual: bool = False
    """Served by whichever replica receives it (a follower too), without waiting."""
    session: dict[int, int] | None = None
    """A session read: as ``ShardGet.session``."""


class ShardHits(msgspec.Struct):
    hits: list[Hit]
    seqs: dict[int, int] = {}
    """A session read: the applied seq of each shard that answered."""


class ShardList(msgspec.Struct, kw_only=True):
    collection: str
    shards: list[int]
    namespace: tuple[str, ...] = ()
    filter: dict[str, Any] | None = None
    after: Key | None = None
    limit: int


class ShardItems(msgspec.Struct):
    items: list[Memory]


class ShardStats(msgspec.Struct):
    stats: dict[int, dict[str, int]]


class ShardRef(msgspec.Struct, kw_only=True):
    collection: str
    """The collection, or ``#coordination`` for the coordination shard."""
    shard: int


class TransferBegin(msgspec.Struct):
    transfer: str
    seq: int
    """The snapshot's seq; 0: no snapshot, the copy starts empty and takes the whole WAL."""
    files: dict[str, int]
    """The snapshot's files and their sizes."""


class TransferRead(msgspec.Struct, kw_only=True):
    transfer: str
    name: str
    offset: int
    size: int


class TransferRef(msgspec.Struct, kw_only=True):
    transfer: str


class Chunk(msgspec.Struct):
    data: bytes


class Tail(msgspec.Struct, kw_only=True):
    collection: str
    shard: int
    after: int
    limit: int


class TailReply(msgspec.Struct):
    records: list[bytes]
    """Encoded WAL records (``codec.encode_record``)."""
    applied: int
    """The source's applied seq when it read them."""


class Seq(msgspec.Struct):
    seq: int


class Pull(msgspec.Struct, kw_only=True):
    """Sent by the controller to a move's target: copy the shard from ``source``."""

    config: CollectionConfig | None
    """None for the coordination shard."""
    shard: int
    source: str
    """The source node's binary endpoint, ``mc://HOST:PORT``."""


class ShardSubscribe(msgspec.Struct, kw_only=True):
    """A stream of one shard's change feed from ``cursor`` (the collection's cursor: a seq
    per shard, of which this node reads shard ``shard``), as :class:`ShardFeedItem` items:
    the events, and how far the shard was read when nothing matched."""

    collection: str
    shard: int
    cursor: str
    namespace: tuple[str, ...] = ()
    filter: dict[str, Any] | None = None
    include_vectors: bool = False


class Rehome(msgspec.Struct, kw_only=True):
    """Sent by the controller to a shard's node: place the shard's memories by ``config``
    (a range split, or centroids learned), copying to the other shards the ones that now
    belong there (``shard.rehome``), or deleting them here once ``config`` is in force
    (``shard.rehome_finish``)."""

    config: CollectionConfig
    shard: int


class Rehomed(msgspec.Struct):
    moved: dict[int, int]
    """Memories copied, per target shard."""


class Import(msgspec.Struct, kw_only=True):
    """Memories moved into ``shard`` from another shard of the collection."""

    collection: str
    shard: int
    record: bytes
    version_floor: int = 0
    """The versions given to these memories must be above this (their shard's highest)."""
    """An encoded WAL record whose ops are the puts (``codec.encode_record``)."""


class Sample(msgspec.Struct, kw_only=True):
    collection: str
    shard: int
    size: int
    field: str | None = None


class SampleReply(msgspec.Struct):
    vectors: Any
    """Up to ``size`` random memories' vectors: float32, row after row (the wire's vector
    extension is flat; reshape to (n, dim))."""
    values: list[float]
    """Their ``field`` metadata values (numbers only), when a field was asked for."""
    items: int
    """How many memories the shard holds."""


class Leases(msgspec.Struct):
    """Lease ids: asked about (which are alive?) and answered (these are)."""

    leases: list[int]


class Done(msgspec.Struct):
    pass


class ShardFeedItem(msgspec.Struct):
    """An item of a ``shard.subscribe`` stream: an event of the shard, or (``event`` None) the
    news that the shard's feed was read up to ``position`` without another event (changes
    filtered out, or moved to another shard). A reopened stream resumes from the last
    ``position``, so a filtered subscription keeps its place across a move."""

    event: Event | None
    position: int
    """The shard's seq after this item: the event's version, or how far the feed was read."""


# -- replication (a replicated shard's leader and followers) -------------------------------


class ReplAppend(msgspec.Struct, kw_only=True):
    """Leader to follower: ``append`` for this shard; the reply is an ``AppendAck``."""

    collection: str
    shard: int
    sender: str
    append: Append


class ReplAck(msgspec.Struct, kw_only=True):
    """Chain replication, to the predecessor: how far the tail is (reply: ``Done``)."""

    collection: str
    shard: int
    sender: str
    ack: AppendAck


class ReplStatus(msgspec.Struct, kw_only=True):
    """Controller to replica during a failover: adopt the epoch, say how far you are
    (reply: ``Status``)."""

    collection: str
    shard: int
    request: StatusRequest


class ReplicaInfo(msgspec.Struct, kw_only=True):
    """One replica's state on its node, for ``memcluster status``."""

    collection: str
    shard: int
    epoch: int
    leading: bool
    last: int
    """Its last seq."""
    committed: int
    """Leading: the highest seq acknowledged to writers (0 on followers)."""
    acked: dict[str, int]
    """Leading: the highest seq each follower acknowledged this epoch. A ``multi``
    replica: its version vector (origin -> the highest of its records held here)."""
    state: str
    """The host's state of the shard: active (leading), follower, ready, incoming, ..."""


class ReplicaInfos(msgspec.Struct):
    replicas: list[ReplicaInfo]


class Empty(msgspec.Struct):
    pass


class History(msgspec.Struct):
    """A replica's epoch history: (epoch, first seq) pairs and the highest epoch adopted."""

    epochs: list[tuple[int, int]]
    adopted: int


class ReplResync(msgspec.Struct, kw_only=True):
    """Leader to follower: my log no longer reaches back to where yours ends (or yours
    diverged): copy the shard from ``source`` (snapshot plus log tail)."""

    collection: str
    shard: int
    source: str


class MultiPush(msgspec.Struct, kw_only=True):
    """``multi.push``: records of a ``multi`` shard that the receiver lacks, as far as the
    sender knows; the reply is the receiver's version vector after applying them."""

    collection: str
    shard: int
    sender: str
    records: list[Record]


class MultiPull(msgspec.Struct, kw_only=True):
    """``multi.pull``: ask a replica of a ``multi`` shard for what the sender lacks (the reply
    is a ``replication.multi.PullReply``)."""

    collection: str
    shard: int
    sender: str
    request: PullRequest


class VersionVector(msgspec.Struct):
    vv: dict[str, int]
