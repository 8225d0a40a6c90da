"""Encodings: the operation records that the WAL stores and replication ships, and JSON.

A :class:`Record` is one atomic write to one shard: a list of operations that consume
consecutive sequence numbers starting at ``Record.seq`` (operation ``i`` has sequence
``seq + i``). Records are msgpack-encoded as arrays (field order is the format; append new
fields at the end with defaults, never reorder):

    Record   = [seq, ts, ops, idem]
    PutOp    = ["p", namespace, key, text, vector, metadata, created_at, updated_at, expires_at]
    LeasedPutOp = ["pl", ...the fields of PutOp..., lease]   a put attached to a lease
    DeleteOp = ["d", namespace, key, reason]   reason: 0 user, 1 expired, 2 evicted,
                                               3 moved (the memory lives in another
                                               shard now; the change feed skips it)
    FenceOp  = ["f", lock, token]        writes under lock ``lock`` now need a token >= ``token``
    VersionOp = ["v", offset]            from here on a put's version is its seq + ``offset``

A ``multi`` (multi-leader) collection's shards stamp every write for last-writer-wins
(:mod:`memcluster.shard.lww`): a record's first operation names the replica it was first
written on and its number there (1, 2, ... per origin), and its puts and deletes carry their
hybrid-logical-clock stamp. A state transfer between replicas ends with the version vector
(origin -> oseq) of the writes it holds. Each of these operations takes a seq like any other::

    OriginOp        = ["o", origin, oseq]
    StampedPutOp    = ["sp", ...the fields of PutOp..., hlc, origin]
    StampedDeleteOp = ["sd", namespace, key, reason, hlc, origin]
    MergeOp         = ["mv", vv]

The coordination shard (leases, locks, semaphores, counters) writes its own operations into
records of the same format; its state machine is :mod:`memcluster.shard.coord`::

    LeaseGrantOp   = ["lg", ttl_s, expires_at, owner]      lease id = this op's seq
    LeaseRenewOp   = ["lk", lease, expires_at]
    LeaseEndOp     = ["le", lease, reason]                 revoked (USER) or EXPIRED
    LockGrantOp    = ["lo", name, lease]                   fencing token = this op's seq
    LockReleaseOp  = ["lr", name, token]
    PermitGrantOp  = ["so", name, permits, lease]          permit token = this op's seq
    PermitReleaseOp= ["sr", name, token]
    CounterOp      = ["ct", key, value]                    the counter's new value
    PublishOp      = ["tp", topic, payload]                a message on a topic (JSON bytes)

``vector`` is the raw little-endian float32 bytes; ``metadata`` is the memory's metadata as
UTF-8 JSON bytes (validated and size-checked once, at the edge, and never re-encoded). Every
decision that depends on time (timestamps, expiry, which memories to evict) is made once by the
writer and recorded, so replaying the log on any replica reaches the same state.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class DeleteReason(enum.IntEnum):
    """Why a delete happened (the change feed reports it)."""

    USER = 0
    EXPIRED = 1
    EVICTED = 2
    MOVED = 3
    """The memory now lives in another shard of its collection (a range split, centroids
    placed, or a put that changed its range field or vector): the copy here is removed, the
    memory is not. The change feed delivers no event for it (the put in its new shard is
    the event)."""


class PutOp(msgspec.Struct, frozen=True, array_like=True, tag="p"):
    """Insert or replace one memory."""

    namespace: tuple[str, ...]
    key: str
    text: str | None
    vector: bytes
    metadata: bytes
    created_at: float
    updated_at: float
    expires_at: float | None


class LeasedPutOp(PutOp, frozen=True, array_like=True, tag="pl"):
    """A put whose memory is attached to ``lease``: deleted when the lease ends. A subclass,
    so every reader of PutOp handles it, and plain puts keep their format."""

    lease: int


class DeleteOp(msgspec.Struct, frozen=True, array_like=True, tag="d"):
    """Remove one memory (a no-op when it is absent)."""

    namespace: tuple[str, ...]
    key: str
    reason: DeleteReason = DeleteReason.USER


class StampedPutOp(PutOp, frozen=True, array_like=True, tag="sp"):
    """A put to a ``multi`` collection, stamped for last-writer-wins: it replaces the memory
    only if its stamp ``(hlc, origin)`` is above the one the key holds (live or deleted)."""

    hlc: int
    origin: str


class StampedDeleteOp(DeleteOp, frozen=True, array_like=True, tag="sd"):
    """A delete in a ``multi`` collection: it removes the memory unless the key holds a
    higher stamp, and leaves a tombstone with its own stamp. At an equal stamp the delete
    wins, so an expiry or eviction (stamped with the stamp of the put it removes) removes
    exactly that put and never a newer one."""

    hlc: int = 0
    origin: str = ""


class OriginOp(msgspec.Struct, frozen=True, array_like=True, tag="o"):
    """The first operation of a record of a ``multi`` collection: the replica that first
    wrote the record and the record's number among that replica's records (1, 2, ...)."""

    origin: str
    oseq: int


class MergeOp(msgspec.Struct, frozen=True, array_like=True, tag="mv"):
    """The last operation of a state transfer between ``multi`` replicas: the transferred
    state holds every write of version vector ``vv`` (origin -> oseq)."""

    vv: dict[str, int]


class FenceOp(msgspec.Struct, frozen=True, array_like=True, tag="f"):
    """A write under lock ``lock`` with fencing token ``token`` (in a cluster, where the lock
    lives on another node): from here on the shard refuses writes under a lower token of that
    lock, so a holder whose lock was taken over cannot write after the new holder did."""

    lock: str
    token: int


class VersionOp(msgspec.Struct, frozen=True, array_like=True, tag="v"):
    """Versions run ahead of sequence numbers from here on: a put at seq ``s`` gets version
    ``s + offset``. Written before a memory moves in from another shard (range and vector
    sharding) whose version there is above this shard's seq, so a memory's version never
    goes back and an ``if_version`` read before the move cannot match a write after it."""

    offset: int


class LeaseGrantOp(msgspec.Struct, frozen=True, array_like=True, tag="lg"):
    """Create a lease; its id is the sequence number of this operation."""

    ttl_s: float
    expires_at: float
    owner: str = ""
    """What the lease was made for: "" for a user's lease, "lock:NAME" or "semaphore:NAME" for
    the implicit lease of a lock or permit acquired with only a TTL."""


class LeaseRenewOp(msgspec.Struct, frozen=True, array_like=True, tag="lk"):
    """Extend a lease (a keepalive)."""

    lease: int
    expires_at: float


class LeaseEndOp(msgspec.Struct, frozen=True, array_like=True, tag="le"):
    """End a lease, releasing every lock and permit held under it."""

    lease: int
    reason: DeleteReason = DeleteReason.USER


class LockGrantOp(msgspec.Struct, frozen=True, array_like=True, tag="lo"):
    """Grant lock ``name`` under ``lease``; the fencing token is this operation's seq."""

    name: str
    lease: int


class LockReleaseOp(msgspec.Struct, frozen=True, array_like=True, tag="lr"):
    name: str
    token: int


class PermitGrantOp(msgspec.Struct, frozen=True, array_like=True, tag="so"):
    """Grant one of ``permits`` permits of semaphore ``name``; the token is this op's seq."""

    name: str
    permits: int
    lease: int


class PermitReleaseOp(msgspec.Struct, frozen=True, array_like=True, tag="sr"):
    name: str
    token: int


class CounterOp(msgspec.Struct, frozen=True, array_like=True, tag="ct"):
    """Set counter ``key`` to ``value`` (an increment records its result: replay is exact)."""

    key: str
    value: int


class PublishOp(msgspec.Struct, frozen=True, array_like=True, tag="tp"):
    """A message published on ``topic``: ``payload`` is its JSON bytes."""

    topic: str
    payload: bytes


CoordOp = (
    LeaseGrantOp
    | LeaseRenewOp
    | LeaseEndOp
    | LockGrantOp
    | LockReleaseOp
    | PermitGrantOp
    | PermitReleaseOp
    | CounterOp
    | PublishOp
)
Op = (
    PutOp
    | LeasedPutOp
    | StampedPutOp
    | DeleteOp
    | StampedDeleteOp
    | OriginOp
    | MergeOp
    | FenceOp
    | VersionOp
    | CoordOp
)


class Record(msgspec.Struct, frozen=True, array_like=True):
    """One atomic write to a shard: ``ops`` take sequences ``seq .. seq + len(ops) - 1``."""

    seq: int
    ts: float
    ops: list[Op]
    idem: str | None = None
    """The idempotency key of the batch, if the caller gave one."""

    @property
    def origin(self) -> str | None:
        """``multi`` collections: the replica that first wrote this record (its OriginOp)."""
        first = self.ops[0] if self.ops else None
        return first.origin if isinstance(first, OriginOp) else None

    @property
    def oseq(self) -> int:
        """``multi`` collections: this record's number among its origin's (0: none)."""
        first = self.ops[0] if self.ops else None
        return first.oseq if isinstance(first, OriginOp) else 0

    @property
    def vv(self) -> dict[str, int] | None:
        """``multi`` collections, the end of a state transfer: what it holds (its MergeOp)."""
        last = self.ops[-1] if self.ops else None
        return last.vv if isinstance(last, MergeOp) else None

    @property
    def last_seq(self) -> int:
        return self.seq + len(self.ops) - 1


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)
_json_encoder = msgspec.json.Encoder()


def encode_record(record: Record) -> bytes:
    """The msgpack bytes of a record."""
    return _record_encoder.encode(record)


def decode_record(payload: bytes | memoryview) -> Record:
    """Parse a record; raises ``msgspec.DecodeError`` on malformed bytes."""
    return _record_decoder.decode(payload)


def to_json(value: Any) -> bytes:
    """JSON bytes of any msgspec-encodable value."""
    return _json_encoder.encode(value)


def from_json(data: bytes | str, type_: Any = Any) -> Any:
    """Parse JSON into ``type_`` (validated); raises ``msgspec.ValidationError``/``DecodeError``."""
    return msgspec.json.decode(data, type=type_)
