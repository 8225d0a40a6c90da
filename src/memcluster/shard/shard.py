"""One shard replica: the WAL, the in-memory state and the indexes, with one writer at a time.

Write path (``put``, ``delete``, ``delete_where``, TTL sweeps, evictions)::

    validate (caller) -> lock -> check conditions -> choose evictions -> Record(seq..)
        -> wal.append -> apply to memory -> unlock -> wait for fsync (group commit) -> ack

Every change goes through :meth:`Shard._apply`, the same function that replays the WAL, so a
recovered shard and a replica fed the same records reach the same state. Apply is idempotent by
sequence number: a record at or below ``applied_seq`` is skipped. Time-dependent decisions
(timestamps, expiry, eviction victims) are made before the record is written and stored in it.

A write is visible to readers of this process once applied, which is just before its fsync
completes; it is acknowledged only after. If an fsync fails the shard is failed: it refuses
every later write with ``StorageError`` (its memory may hold a write the disk does not).

Memory layout: a memory lives in an integer *slot*. Per slot, numpy columns hold the vector
(one contiguous ``(capacity, dim)`` float32 array), version, timestamps, liveness, LRU/LFU
counters and namespace id; Python lists hold key, text and metadata (as JSON bytes);
:class:`~memcluster.index.metadata.MetadataColumns` holds metadata in typed columns for filters.
Freed slots are reused. Slots are the labels of the HNSW graph.

Search: a slot is *sealed* when the graph holds its current vector; fresh or updated slots are
in the exact buffer (``in_buffer``) until the background step (:meth:`maintain`) inserts them.
A search merges graph results (re-checked against liveness, expiry, filter and buffer) with an
exact scan of the buffer. Small shards and selective filters are scanned exactly instead.

Lock order: the graph's internal lock may be taken while holding the shard lock, never the
reverse; the background step calls the graph's ``add`` without holding the shard lock.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from memcluster.core.clock import Clock
from memcluster.core.codec import (
    DeleteOp,
    DeleteReason,
    FenceOp,
    LeasedPutOp,
    MergeOp,
    Op,
    OriginOp,
    PutOp,
    Record,
    StampedDeleteOp,
    StampedPutOp,
    VersionOp,
)
from memcluster.core.config import Config
from memcluster.core.errors import (
    CapacityExceeded,
    CorruptionError,
    CursorExpired,
    InvalidArgument,
    InvalidState,
    MemclusterError,
    StaleToken,
    StorageError,
    VersionConflict,
)
from memcluster.core.types import (
    CollectionConfig,
    Durability,
    Eviction,
    Hit,
    Memory,
    Replication,
)
from memcluster.index.filters import Filter
from memcluster.index.metadata import MetadataColumns
from memcluster.index.vector import HnswIndex, VectorIndex, exact_topk, topk
from memcluster.shard.lww import Lww, LwwState
from memcluster.storage.snapshot import SnapshotStore
from memcluster.storage.wal import Wal

Change = tuple[int, float, PutOp | DeleteOp]
"""One applied change for the feed: (seq, the record's time, the operation)."""

log = logging.getLogger("memcluster.shard")

Key = tuple[tuple[str, ...], str]
Slots = npt.NDArray[np.int64]
INF = math.inf
_meta_decoder = msgspec.json.Decoder(dict[str, Any])


class PreparedPut(msgspec.Struct, frozen=True):
    """One validated write: what the collection hands a shard."""

    namespace: tuple[str, ...]
    key: str
    text: str | None
    vector: npt.NDArray[np.float32]
    metadata: bytes
    ttl_s: float | None
    if_version: int | None
    lease: int = 0
    created_at: float | None = None
    """Set when the memory moves here from another shard (range and vector sharding): its
    creation time there, which the move keeps."""


class ShardState(msgspec.Struct, array_like=True):
    """What a snapshot stores (``state.bin``); arrays as raw little-endian bytes."""

    seq: int
    dim: int
    n: int
    free: list[int]
    keys: list[str | None]
    namespaces: list[tuple[str, ...]]
    ns_id: bytes
    texts: list[str | None]
    metas: list[bytes | None]
    vectors: bytes
    version: bytes
    created_at: bytes
    updated_at: bytes
    expires_at: bytes
    sealed: bytes
    idem: list[tuple[str, list[int]]]
    leases: list[tuple[int, int]] = msgspec.field(default_factory=list)
    """(slot, lease) of every memory attached to a lease."""
    fences: list[tuple[str, int]] = msgspec.field(default_factory=list)
    """(lock, highest fencing token written under it): see ``FenceOp``."""
    version_offset: int = 0
    """How far versions run ahead of seqs: see ``VersionOp``."""
    lww: LwwState | None = None
    """``multi`` collections: stamps, tombstones, version vector, clock."""


def _grow(array: npt.NDArray[Any], capacity: int, fill: Any) -> npt.NDArray[Any]:
    # np.empty + one copy: filling the whole new array first doubled the time writers wait.
    out = np.empty((capacity, *array.shape[1:]), dtype=array.dtype)
    old = array.shape[0]
    out[:old] = array
    out[old:] = fill
    return out


class Shard:
    """A shard replica. Thread-safe: writes are serialized, reads take the same lock briefly."""

    def __init__(
        self,
        coll: CollectionConfig,
        config: Config,
        wal: Wal,
        clock: Clock,
        *,
        index: VectorIndex,
        snapshots: SnapshotStore | None = None,
        name: str = "shard",
    ) -> None:
        """An empty shard. Use :meth:`open` to recover one from its WAL and snapshots."""
        self.coll = coll
        self.config = config
        self.name = name
        self._wal = wal
        self._clock = clock
        self._index = index
        self._snapshots = snapshots
        self.lock = threading.Lock()
        """Serializes writers; readers hold it briefly. Batches take it in shard order."""
        self._seal_lock = threading.Lock()
        # The change feed: recent changes in memory, older ones from the WAL (read under
        # _wal_read_lock, which truncation also takes, as Wal.records requires).
        self._feed: list[Change] = []
        self._feed_listeners: frozenset[Callable[[], None]] = frozenset()
        """Replaced, never changed in place: read without the lock."""
        self._wal_read_lock = threading.Lock()
        self._failed: str | None = None
        self._closed = False
        self.durability = coll.durability or config.durability
        s = coll.shards
        self._cap_items = None if coll.capacity_items is None else -(-coll.capacity_items // s)
        self._cap_bytes = None if coll.capacity_bytes is None else -(-coll.capacity_bytes // s)
        self._cap_ns = (
            None
            if coll.namespace_capacity_items is None
            else -(-coll.namespace_capacity_items // s)
        )
        self.applied_seq = 0
        self.write_gate: Callable[[], None] | None = None
        self.visible_upto: Callable[[], int] | None = None
        """The highest seq the change feed may deliver (a replicated shard's leader: what its
        replicas acknowledged, so no subscriber sees a write that a failover could undo).
        Called under the lock."""
        self.on_written: Callable[[Record], None] | None = None
        """Called under the lock after each record this shard writes itself (not those
        :meth:`write_replicated` takes from a leader): a replicated shard's leader ships it."""
        """Called under the lock before every client write; raising refuses the write. A
        cluster node uses it to stop writes to a shard it is handing over, atomically with
        the handover's last read of the log."""
        self._wal_bytes_at_snapshot = wal.bytes_total()
        self._last_batch_sync = clock.monotonic()
        self._last_write_mono = clock.monotonic()
        self.last_written = Record(0, 0.0, [])
        self.lww: Lww | None = Lww() if coll.replication is Replication.MULTI else None
        """``multi`` collections: last-writer-wins state (:mod:`memcluster.shard.lww`); its
        ``me`` names this replica (a cluster sets it to the node id before any write)."""
        self._init_arrays(0)

    # -- layout ----------------------------------------------------------------------------

    def _init_arrays(self, capacity: int) -> None:
        dim = self.coll.dim
        self._cap = capacity
        self._n = 0
        self._free: list[int] = []
        self._vectors = np.zeros((capacity, dim), dtype=np.float32)
        self._alive = np.zeros(capacity, dtype=bool)
        self._version = np.zeros(capacity, dtype=np.int64)
        self._created = np.zeros(capacity, dtype=np.float64)
        self._updated = np.zeros(capacity, dtype=np.float64)
        self._expires = np.full(capacity, INF, dtype=np.float64)
        self._access = np.zeros(capacity, dtype=np.float64)
        self._hits = np.zeros(capacity, dtype=np.int64)
        self._nbytes = np.zeros(capacity, dtype=np.int64)
        self._ns = np.zeros(capacity, dtype=np.int32)
        self._in_buffer = np.zeros(capacity, dtype=bool)
        self._in_graph = np.zeros(capacity, dtype=bool)
        self._keys: dict[Key, int] = {}
        self._slot_key: list[str | None] = [None] * capacity
        self._slot_text: list[str | None] = [None] * capacity
        self._slot_meta: list[bytes | None] = [None] * capacity
        self._slot_lease: dict[int, int] = {}
        self._fences: dict[str, int] = {}
        self._version_offset = 0
        """A put at seq s gets version s + this (0 unless memories moved in: ``VersionOp``)."""
        """The highest fencing token written under each lock (``FenceOp``)."""
        """slot -> the lease its memory is attached to (only attached slots)."""
        self._ns_ids: dict[tuple[str, ...], int] = {}
        self._ns_list: list[tuple[str, ...]] = []
        self._ns_count: dict[int, int] = {}
        self._columns = MetadataColumns(capacity)
        self._pending_deletes: set[int] = set()
        self._idem: OrderedDict[str, list[int]] = OrderedDict()
        self.live_count = 0
        self.live_bytes = 0
        self._ttl_count = 0
        self._buffer_count = 0

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self._cap:
            return
        # Grow by a quarter: the slack is what costs memory per item at rest, and copying
        # the arrays a few more times during a bulk load is cheap next to indexing them.
        cap = max(needed, self._cap + self._cap // 4, 1024)
        self._vectors = _grow(self._vectors, cap, 0.0)
        self._alive = _grow(self._alive, cap, False)
        self._version = _grow(self._version, cap, 0)
        self._created = _grow(self._created, cap, 0.0)
        self._updated = _grow(self._updated, cap, 0.0)
        self._expires = _grow(self._expires, cap, INF)
        self._access = _grow(self._access, cap, 0.0)
        self._hits = _grow(self._hits, cap, 0)
        self._nbytes = _grow(self._nbytes, cap, 0)
        self._ns = _grow(self._ns, cap, 0)
        self._in_buffer = _grow(self._in_buffer, cap, False)
        self._in_graph = _grow(self._in_graph, cap, False)
        extra = cap - self._cap
        self._slot_key.extend([None] * extra)
        self._slot_text.extend([None] * extra)
        self._slot_meta.extend([None] * extra)
        self._columns.resize(cap)
        self._cap = cap

    def _alloc(self) -> int:
        if self._free:
            return self._free.pop()
        self._ensure_capacity(self._n + 1)
        self._n += 1
        return self._n - 1

    def _ns_of(self, namespace: tuple[str, ...]) -> int:
        ns_id = self._ns_ids.get(namespace)
        if ns_id is None:
            ns_id = len(self._ns_list)
            self._ns_ids[namespace] = ns_id
            self._ns_list.append(namespace)
        return ns_id

    def _item_bytes(self, op: PutOp) -> int:
        size = len(op.vector) + len(op.metadata) + len(op.key.encode())
        size += sum(len(part.encode()) for part in op.namespace)
        if op.text is not None:
            size += len(op.text.encode())
        return size

    # -- apply (the only place state changes) ------------------------------------------------

    def _apply(self, record: Record) -> None:
        """Apply a record; a no-op if it was applied already. Caller holds the lock."""
        if record.last_seq <= self.applied_seq:
            return
        if record.seq != self.applied_seq + 1:
            raise CorruptionError(
                f"{self.name}: record seq {record.seq} does not follow applied seq"
                f" {self.applied_seq}: the log has a gap"
            )
        versions: list[int] = []
        changed: list[Change] = []
        lww = self.lww
        for i, op in enumerate(record.ops):
            if isinstance(op, StampedPutOp | StampedDeleteOp) and lww is not None:
                key = (op.namespace, op.key)
                stamp = (op.hlc, op.origin, int(isinstance(op, StampedDeleteOp)))
                lww.observe(op.hlc)
                if not lww.wins(key, stamp):
                    if isinstance(op, StampedPutOp):
                        versions.append(op.hlc)  # its version, for an idempotent resend
                    continue  # a newer write of this key is here already
                lww.stamps[key] = stamp
                if isinstance(op, StampedPutOp):
                    self._apply_put(op, op.hlc)
                    versions.append(op.hlc)
                elif key in self._keys:
                    self._apply_delete(op)
                else:
                    continue  # a tombstone for a memory this replica never had
                changed.append((record.seq + i, record.ts, op))
            elif isinstance(op, StampedPutOp | StampedDeleteOp):
                raise CorruptionError(
                    f"{self.name}: record for seq {record.seq + i} holds a multi-leader write,"
                    " which only replication='multi' collections take"
                )
            elif isinstance(op, PutOp):
                version = record.seq + i + self._version_offset
                self._apply_put(op, version)
                versions.append(version)
                changed.append((record.seq + i, record.ts, op))
            elif isinstance(op, DeleteOp):
                self._apply_delete(op)
                changed.append((record.seq + i, record.ts, op))
            elif isinstance(op, FenceOp):
                self._fences[op.lock] = max(self._fences.get(op.lock, 0), op.token)
            elif isinstance(op, VersionOp):
                self._version_offset = max(self._version_offset, op.offset)
            elif isinstance(op, OriginOp | MergeOp):
                pass  # bookkeeping of multi-leader records: below
            else:
                raise CorruptionError(
                    f"{self.name}: record for seq {record.seq + i} holds a coordination"
                    f" operation ({type(op).__name__}), which no collection shard writes"
                )
        if record.idem is not None:
            self._remember_idem(record.idem, versions)
        if lww is not None and record.origin is not None:
            lww.logged(record, record.seq)
        if lww is not None and record.vv is not None:
            lww.merged(record.vv)
        self.applied_seq = record.last_seq
        self._feed.extend(changed)
        if len(self._feed) > 2 * self.config.feed_buffer_events:
            del self._feed[: len(self._feed) - self.config.feed_buffer_events]
        for listener in self._feed_listeners:
            listener()

    # -- change feed ---------------------------------------------------------------------------

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every applied record, under the shard lock: it must be
        quick and must not block (set an Event, schedule a wake-up)."""
        with self.lock:
            self._feed_listeners = self._feed_listeners | {callback}

    def unlisten(self, callback: Callable[[], None]) -> None:
        with self.lock:
            self._feed_listeners = self._feed_listeners - {callback}

    def notify_feed(self) -> None:
        """Wake the feed's listeners: more changes became visible (``visible_upto`` moved).
        Call it without the lock."""
        for listener in self._feed_listeners:  # without the lock: a writer may wait under it
            listener()

    def changes(self, after_seq: int, limit: int) -> list[Change]:
        """Up to ``limit`` changes (seq, time, op) with seq > ``after_seq``, in seq order.

        Recent ones come from memory, older ones from the WAL. CursorExpired when
        ``after_seq`` is older than the WAL still holds (the message and ``oldest_seq`` say
        where history starts)."""
        with self.lock:
            self._check_readable()
            upto = self.applied_seq
            if self.visible_upto is not None:
                upto = min(upto, self.visible_upto())
            if after_seq >= upto:
                return []
            feed = self._feed
            if feed and feed[0][0] <= after_seq + 1:
                start = bisect.bisect_right(feed, after_seq, key=lambda c: c[0])
                end = bisect.bisect_right(feed, upto, key=lambda c: c[0])
                return feed[start : min(start + limit, end)]
        with self._wal_read_lock:
            first = self._wal.first_seq()
            if after_seq + 1 < first:
                raise CursorExpired(
                    f"{self.name}: changes after seq {after_seq} are no longer retained; the"
                    f" oldest is seq {first} (feed_retention_events ="
                    f" {self.config.feed_retention_events})",
                )
            out: list[Change] = []
            for record in self._wal.records(after_seq):
                if record.seq > upto:
                    break
                for i, op in enumerate(record.ops):
                    seq = record.seq + i
                    if after_seq < seq <= upto and isinstance(op, PutOp | DeleteOp):
                        out.append((seq, record.ts, op))
                if len(out) >= limit:
                    break
            return out[:limit]

    def records_after(self, after_seq: int, limit: int) -> list[Record]:
        """Up to ``limit`` WAL records holding seqs above ``after_seq``, in order (what a
        shard transfer ships). CursorExpired when the WAL no longer reaches back there."""
        with self._wal_read_lock:
            first = self._wal.first_seq()
            if after_seq + 1 < first:
                raise CursorExpired(
                    f"{self.name}: the WAL starts at seq {first}, after {after_seq + 1}:"
                    " start the transfer again from a new snapshot"
                )
            out: list[Record] = []
            for record in self._wal.records(after_seq):
                out.append(record)
                if len(out) >= limit:
                    break
            return out

    def apply_records(self, records: Sequence[Record]) -> None:
        """Log and apply records shipped from another copy of this shard (a transfer), then
        make them durable. Records already applied are skipped; the rest must follow on."""
        token = -1
        with self.lock:
            self._check_writable(gate=False)
            for record in records:
                if record.last_seq > self.applied_seq:
                    token = self._write(record, replicated=True)
        if token >= 0:
            self._wal.sync(token)

    # -- multi-leader exchange (replication="multi") ------------------------------------------

    def _multi(self) -> Lww:
        if self.lww is None:
            raise InvalidState(f"{self.name}: not a replica of a replication='multi' collection")
        return self.lww

    def stamp_of(self, namespace: tuple[str, ...], key: str) -> tuple[int, str, int] | None:
        """``multi`` collections: the stamp (hlc, origin, 1 for a delete) of what this
        replica holds for the key, its tombstone included; None if never written here (or
        not a ``multi`` shard)."""
        with self.lock:
            return None if self.lww is None else self.lww.stamp_of((namespace, key))

    def version_vector(self, durable: bool = False) -> dict[str, int]:
        """Which writes this replica holds: origin -> the highest ``oseq`` applied. With
        ``durable``, made durable first (what another replica may count on after a crash
        here: every record applied is fsynced before the vector is returned)."""
        with self.lock:
            vv = dict(self._multi().vv)
        if durable:
            self._wal.sync_all()
        return vv

    def missing(self, other: Mapping[str, int], limit: int) -> list[Record] | None:
        """Up to ``limit`` records held here that a replica at version vector ``other``
        lacks, in an order it can apply (each origin's in ``oseq`` order, without gaps);
        None when some are gone from the WAL here (send :meth:`state_page` instead).
        Only durable records leave: a replica never ships a write it could still lose in a
        crash, which would let it reuse that ``oseq`` for another write."""
        with self.lock:
            start = self._multi().start_for(dict(other))
            end = self.applied_seq
        if start is None:
            return None
        if start == 0:
            return []
        self._wal.sync_all()
        want = dict(other)
        out: list[Record] = []
        with self._wal_read_lock:
            if start < self._wal.first_seq():
                return None
            for record in self._wal.records(start - 1):
                if record.last_seq > end or len(out) >= limit:
                    break
                if record.origin is not None and record.oseq == want.get(record.origin, 0) + 1:
                    want[record.origin] = record.oseq
                    out.append(record)
        return out

    def apply_remote(self, records: Sequence[Record]) -> None:
        """Log and apply records from another replica (:meth:`missing` or
        :meth:`state_page`), then make them durable. A record its origin's ``oseq`` says
        was applied already is skipped, and so is one that would leave a gap."""
        token = -1
        with self.lock:
            self._check_writable(gate=False)
            lww = self._multi()
            for record in records:
                if record.origin is not None and not lww.accepts(record):
                    continue
                local = msgspec.structs.replace(record, seq=self.applied_seq + 1)
                token = self._write(local, replicated=True)
        if token >= 0:
            self._wal.sync(token)

    def state_page(
        self, after: Key | None, limit: int
    ) -> tuple[list[Op], Key | None, dict[str, int]]:
        """One page of this replica's whole state for a replica too far behind for
        :meth:`missing`: every key after ``after`` (in key order, up to ``limit``) as the
        stamped put or tombstone it holds; the last key given (None: that was the last
        page); and the version vector now (a receiver keeps the one of its first page)."""
        with self.lock:
            lww = self._multi()
            keys = sorted(lww.stamps)
            start = 0 if after is None else bisect.bisect_right(keys, after)
            page = keys[start : start + limit]
            ops: list[Op] = []
            for key in page:
                hlc, origin, deleted = lww.stamps[key]
                slot = self._keys.get(key)
                if deleted or slot is None:
                    ops.append(StampedDeleteOp(*key, DeleteReason.USER, hlc, origin))
                    continue
                ops.append(
                    StampedPutOp(
                        key[0],
                        key[1],
                        self._slot_text[slot],
                        self._vectors[slot].astype("<f4").tobytes(),
                        self._slot_meta[slot] or b"{}",
                        float(self._created[slot]),
                        float(self._updated[slot]),
                        None if self._expires[slot] == INF else float(self._expires[slot]),
                        hlc,
                        origin,
                    )
                )
            last = page[-1] if page and start + limit < len(keys) else None
            vv = dict(lww.vv)
        self._wal.sync_all()  # the vector names only writes this replica cannot lose
        return ops, last, vv

    # -- resharding (a cluster splitting a range shard, or placing by new centroids) -------

    def live_puts(self) -> list[PutOp]:
        """Every live memory, as the put that would recreate it (timestamps kept)."""
        with self.lock:
            self._check_readable()
            now = self._clock.time()
            n = self._n
            slots = np.flatnonzero(self._alive[:n] & (self._expires[:n] > now)).tolist()
            return [
                PutOp(
                    self._ns_list[self._ns[s]],
                    self._slot_key[s] or "",
                    self._slot_text[s],
                    self._vectors[s].astype("<f4").tobytes(),
                    self._slot_meta[s] or b"{}",
                    float(self._created[s]),
                    float(self._updated[s]),
                    None if self._expires[s] == INF else float(self._expires[s]),
                )
                for s in slots
            ]

    @property
    def version_high(self) -> int:
        """No memory here has a higher version: where versions of memories moving out of this
        shard must continue from."""
        return self.applied_seq + self._version_offset

    def import_puts(self, puts: Sequence[PutOp], version_floor: int = 0) -> None:
        """Write memories moved here from another shard of the collection, as they were
        (timestamps kept; new versions, above ``version_floor``). Durable on return."""
        token = -1
        step = self.config.batch_items_max
        with self.lock:
            self._check_writable()
            now = self._clock.time()
            for start in range(0, len(puts), step):
                ops: list[Op] = []
                if version_floor > self.version_high:
                    ops.append(VersionOp(version_floor - self.applied_seq))
                ops.extend(puts[start : start + step])
                token = self._write(Record(self.applied_seq + 1, now, ops))
        if token >= 0:
            self._wal.sync(token)

    def locate(self, keys: Sequence[Key]) -> list[tuple[int, float]]:
        """For each (namespace, key): (its version, updated_at), (0, 0.0) if absent."""
        with self.lock:
            self._check_readable()
            return [(0, 0.0) if f is None else (f[0], f[2]) for f in self.located(keys)]

    def delete_versions(self, items: Sequence[tuple[tuple[str, ...], str, int]]) -> int:
        """Delete each (namespace, key) only while it is still at that version (an older copy
        that a memory moving between shards left behind); a newer write is never undone.
        Durable on return; returns how many were deleted."""
        with self.lock:
            self._check_writable()
            now = self._clock.time()
            ops: list[Op] = []
            for namespace, key, version in items:
                slot = self._keys.get((namespace, key))
                if slot is not None and int(self._version[slot]) == version:
                    ops.append(DeleteOp(namespace, key, DeleteReason.MOVED))
            if not ops:
                return 0
            token = self._write(Record(self.applied_seq + 1, now, ops))
        self.commit(token)
        return len(ops)

    def delete_moved(self, keys: Sequence[tuple[tuple[str, ...], str]]) -> int:
        """Delete memories that now live in another shard (allowed while the shard is frozen
        for the move). Durable on return; returns how many were here."""
        token = -1
        step = self.config.batch_items_max
        with self.lock:
            self._check_writable(gate=False)
            present = [k for k in keys if k in self._keys]
            now = self._clock.time()
            for start in range(0, len(present), step):
                ops: list[Op] = [
                    DeleteOp(ns, key, DeleteReason.MOVED)
                    for ns, key in present[start : start + step]
                ]
                token = self._write(Record(self.applied_seq + 1, now, ops))
        if token >= 0:
            self._wal.sync(token)
        return len(present)

    def oldest_seq(self) -> int:
        """The lowest seq the change feed can still deliver."""
        with self._wal_read_lock:
            return self._wal.first_seq()

    def _apply_put(self, op: PutOp, version: int) -> None:
        dim = self.coll.dim
        if len(op.vector) != 4 * dim:
            raise CorruptionError(
                f"{self.name}: the put of version {version} has a {len(op.vector) // 4}-d vector,"
                f" dim={dim}"
            )
        k = (op.namespace, op.key)
        slot = self._keys.get(k)
        if slot is None:
            slot = self._alloc()
            self._keys[k] = slot
            self._slot_key[slot] = op.key
            ns_id = self._ns_of(op.namespace)
            self._ns[slot] = ns_id
            self._ns_count[ns_id] = self._ns_count.get(ns_id, 0) + 1
            self._alive[slot] = True
            self._hits[slot] = 0
            self.live_count += 1
        else:
            self.live_bytes -= int(self._nbytes[slot])
            if self._expires[slot] != INF:
                self._ttl_count -= 1
        self._vectors[slot] = np.frombuffer(op.vector, dtype="<f4")
        self._version[slot] = version
        self._created[slot] = op.created_at
        self._updated[slot] = op.updated_at
        self._expires[slot] = INF if op.expires_at is None else op.expires_at
        if op.expires_at is not None:
            self._ttl_count += 1
        self._access[slot] = op.updated_at
        self._hits[slot] += 1
        nbytes = self._item_bytes(op)
        self._nbytes[slot] = nbytes
        self.live_bytes += nbytes
        self._slot_text[slot] = op.text
        self._slot_meta[slot] = op.metadata
        if isinstance(op, LeasedPutOp):
            self._slot_lease[slot] = op.lease
        else:
            self._slot_lease.pop(slot, None)
        self._columns.set(slot, _meta_decoder.decode(op.metadata), op.created_at, op.updated_at)
        if not self._in_buffer[slot]:
            self._in_buffer[slot] = True
            self._buffer_count += 1

    def _apply_delete(self, op: DeleteOp) -> None:
        slot = self._keys.pop((op.namespace, op.key), None)
        if slot is None:
            return
        self._alive[slot] = False
        self.live_count -= 1
        self.live_bytes -= int(self._nbytes[slot])
        if self._expires[slot] != INF:
            self._ttl_count -= 1
        ns_id = int(self._ns[slot])
        self._ns_count[ns_id] -= 1
        self._nbytes[slot] = 0
        self._expires[slot] = INF
        self._version[slot] = 0
        self._slot_key[slot] = None
        self._slot_text[slot] = None
        self._slot_meta[slot] = None
        self._slot_lease.pop(slot, None)
        self._columns.clear(slot)
        if self._in_buffer[slot]:
            self._in_buffer[slot] = False
            self._buffer_count -= 1
        if self._in_graph[slot]:
            self._pending_deletes.add(slot)
        self._free.append(slot)

    def _remember_idem(self, idem: str, versions: list[int]) -> None:
        self._idem[idem] = versions
        self._idem.move_to_end(idem)
        while len(self._idem) > self.config.idempotency_keys_max:
            self._idem.popitem(last=False)

    # -- writing -------------------------------------------------------------------------------

    def _check_writable(self, *, gate: bool = True) -> None:
        if self._closed:
            raise InvalidState(f"{self.name}: closed; open the database again")
        if self._failed is not None:
            raise StorageError(f"{self.name}: refuses writes after a failure: {self._failed}")
        if gate and self.write_gate is not None:
            self.write_gate()

    def write_replicated(self, record: Record) -> int:
        """Log and apply a record of this shard's leader (this copy is a follower); returns
        the WAL token for :meth:`commit`. Caller holds the lock."""
        self._check_writable(gate=False)
        if record.seq != self.applied_seq + 1:
            raise CorruptionError(
                f"{self.name}: replicated record seq {record.seq} does not follow applied seq"
                f" {self.applied_seq}"
            )
        return self._write(record, replicated=True)

    def wal_first_seq(self) -> int:
        """The lowest seq the WAL still holds (a follower further behind needs a snapshot)."""
        with self._wal_read_lock:
            return self._wal.first_seq()

    def _write(self, record: Record, *, replicated: bool = False) -> int:
        """Log and apply one record; returns the WAL token. Caller holds the lock. In a
        ``multi`` collection a record this replica writes first is stamped here (see
        :meth:`_stamped`); ``last_written`` is the record as written."""
        if self.lww is not None and not replicated:
            record = self._stamped(record, self.lww)
        self.last_written = record
        self._last_write_mono = self._clock.monotonic()
        try:
            token = self._wal.append(record)
        except StorageError as exc:
            self._failed = str(exc)
            raise
        try:
            self._apply(record)
        except BaseException as exc:
            # The log holds a record that memory does not: stop rather than diverge.
            self._failed = f"apply of seq {record.seq} failed: {exc!r}"
            raise
        if self.on_written is not None and not replicated:
            self.on_written(record)
        return token

    def _stamped(self, record: Record, lww: Lww) -> Record:
        """``record`` as a ``multi`` replica writes it: its origin and oseq, and every put and
        delete stamped. Puts and user deletes take a new HLC stamp; an expiry or eviction
        takes the stamp of the put it removes, so it never removes a newer write of that key
        from another replica."""
        hlc = lww.tick(record.ts)
        ops: list[Op] = []
        for op in record.ops:
            if isinstance(op, LeasedPutOp | FenceOp | VersionOp | OriginOp | MergeOp):
                raise InvalidArgument(
                    f"{self.name}: a replication='multi' collection takes no leases, fencing"
                    " tokens or moves; use replication='leader' for them"
                )
            if isinstance(op, PutOp):
                ops.append(
                    StampedPutOp(
                        op.namespace,
                        op.key,
                        op.text,
                        op.vector,
                        op.metadata,
                        op.created_at,
                        op.updated_at,
                        op.expires_at,
                        hlc,
                        lww.me,
                    )
                )
            elif isinstance(op, DeleteOp) and op.reason in (
                DeleteReason.EXPIRED,
                DeleteReason.EVICTED,
            ):
                stamp = lww.stamp_of((op.namespace, op.key))
                assert stamp is not None, "a live memory has its put's stamp"
                assert not stamp[2], "a live memory has no tombstone"
                ops.append(StampedDeleteOp(op.namespace, op.key, op.reason, stamp[0], stamp[1]))
            elif isinstance(op, DeleteOp):
                ops.append(StampedDeleteOp(op.namespace, op.key, op.reason, hlc, lww.me))
            else:
                ops.append(op)
        return msgspec.structs.replace(record, ops=[OriginOp(lww.me, lww.next_oseq()), *ops])

    def commit(self, token: int) -> None:
        """Wait until the write with this WAL token is durable, as the durability level asks.
        Called without the lock, so concurrent writers share one fsync."""
        if self.durability is Durability.FSYNC:
            try:
                self._wal.sync(token)
            except StorageError as exc:
                self._failed = str(exc)
                raise

    def _current_version(self, slot: int | None, now: float) -> int:
        if slot is None or self._expires[slot] <= now:
            return 0
        return int(self._version[slot])

    def put(self, items: Sequence[PreparedPut], idem: str | None = None) -> list[int]:
        """Write ``items`` atomically (one record); returns their versions in order.

        Raises VersionConflict if any ``if_version`` does not match (nothing is written),
        CapacityExceeded if the shard is full and may not evict. A repeated ``idem`` returns the
        versions recorded the first time without writing again. (namespace, key) pairs must be
        distinct within one call.
        """
        with self.lock:
            planned = self.plan_put(items, idem)
            if isinstance(planned, list):
                return planned
            token, versions = self.write_planned(planned)
        self.commit(token)
        return versions

    def plan_put(
        self,
        items: Sequence[PreparedPut],
        idem: str | None,
        fence: tuple[str, int] | None = None,
        version_floor: int = 0,
    ) -> list[int] | Record:
        """Check ``items`` and build their record without writing it. Caller holds ``lock``.

        ``version_floor``: the versions given must be above it (the memories' versions in the
        shards they move from), which a ``VersionOp`` ensures when this shard's seqs are behind.

        Returns the recorded versions when ``idem`` was seen already. Raises VersionConflict,
        CapacityExceeded, or StaleToken when ``fence`` (lock, token) is below a token already
        written under that lock; nothing has changed then. Multi-shard batches plan on every
        shard before writing to any, so a rejected batch writes nowhere.
        """
        self._check_writable()
        if idem is not None and idem in self._idem:
            return list(self._idem[idem])
        if self.lww is not None:
            self._check_multi(items, fence)
        fence_ops = self._fence_ops(fence)
        now = self._clock.time()
        puts: list[PutOp] = []
        for item in items:
            slot = self._keys.get((item.namespace, item.key))
            current = self._current_version(slot, now)
            if item.if_version is not None and item.if_version != current:
                raise VersionConflict(
                    f"{self.name}: {item.namespace}/{item.key!r} is at version {current},"
                    f" the write expected {item.if_version} (0 = absent); read it again and"
                    " retry with its current version",
                    expected=item.if_version,
                    actual=current,
                )
            ttl = item.ttl_s if item.ttl_s is not None else self.coll.ttl_s
            if current and slot is not None:
                created = float(self._created[slot])
            else:
                created = now if item.created_at is None else item.created_at
            fields = (
                item.namespace,
                item.key,
                item.text,
                item.vector.astype("<f4", copy=False).tobytes(),
                item.metadata,
                created,
                now,
                None if ttl is None else now + ttl,
            )
            puts.append(LeasedPutOp(*fields, item.lease) if item.lease else PutOp(*fields))
        self._check_paths(items)
        ops: list[Op] = []
        if version_floor > self.version_high:
            ops.append(VersionOp(version_floor - self.applied_seq))
        ops.extend(fence_ops)
        ops.extend(self._victims(puts, now))
        ops.extend(puts)
        return Record(seq=self.applied_seq + 1, ts=now, ops=ops, idem=idem)

    def _check_multi(self, items: Sequence[PreparedPut], fence: tuple[str, int] | None) -> None:
        """InvalidArgument for what a ``multi`` collection cannot do: every replica takes
        writes concurrently, so there is no single current version to compare with."""
        what = None
        if fence is not None:
            what = "writes under a lock's fencing token"
        elif any(item.if_version is not None for item in items):
            what = "compare-and-set (if_version)"
        elif any(item.lease for item in items):
            what = "memories attached to a lease"
        if what is not None:
            raise InvalidArgument(
                f"{self.name}: {what} needs a single writer: create the collection with"
                " replication='leader' or 'chain'; replication='multi' resolves concurrent"
                " writes last-writer-wins instead"
            )

    def _fence_ops(self, fence: tuple[str, int] | None) -> list[Op]:
        """The FenceOp a write under ``fence`` records (none if its token is recorded
        already); StaleToken if a higher token of that lock wrote here. Caller holds ``lock``."""
        if fence is None:
            return []
        name, token = fence
        highest = self._fences.get(name, 0)
        if token < highest:
            raise StaleToken(
                f"{self.name}: lock {name!r} token {token} is stale: token {highest} of that"
                " lock has written here since; acquire the lock again"
            )
        return [] if token == highest else [FenceOp(name, token)]

    def _check_paths(self, items: Sequence[PreparedPut]) -> None:
        """CapacityExceeded if the items would take the shard past ``metadata_paths_max``."""
        new: set[str] = set()
        for item in items:
            if item.metadata != b"{}":
                new.update(self._columns.new_paths(_meta_decoder.decode(item.metadata)))
        limit = self.config.metadata_paths_max
        if new and self._columns.path_count() + len(new) > limit:
            raise CapacityExceeded(
                f"{self.name}: metadata would have {self._columns.path_count() + len(new)}"
                f" distinct keys (paths), over metadata_paths_max={limit}; use fixed key names"
                ' and put varying names in values, e.g. {"tag": "x"} not {"x": true}'
            )

    def write_planned(self, record: Record) -> tuple[int, list[int]]:
        """Log and apply a record from :meth:`plan_put` or :meth:`plan_delete`: (WAL token,
        versions of its puts).
        Caller holds ``lock`` since planning; then calls :meth:`commit` without it."""
        token = self._write(record)
        if self.lww is not None:  # stamped: a put's version is its HLC stamp
            return token, [op.hlc for op in self.last_written.ops if isinstance(op, StampedPutOp)]
        offset = self._version_offset  # what the record's VersionOp, if any, set
        return token, [
            record.seq + i + offset for i, op in enumerate(record.ops) if isinstance(op, PutOp)
        ]

    def located(self, keys: Sequence[Key]) -> list[tuple[int, float, float] | None]:
        """For each (namespace, key): None if this shard has no slot for it, else (its
        current version, 0 if expired; created_at; updated_at). Caller holds ``lock``.

        Collections whose keys may live in any shard (range and vector sharding) ask every
        shard, under all their locks, where a memory is before moving it."""
        now = self._clock.time()
        out: list[tuple[int, float, float] | None] = []
        for k in keys:
            slot = self._keys.get(k)
            if slot is None:
                out.append(None)
            else:
                version = self._current_version(slot, now)
                out.append((version, float(self._created[slot]), float(self._updated[slot])))
        return out

    def plan_delete(
        self, keys: Sequence[Key], after: Record | None = None, *, moved: bool = False
    ) -> tuple[Record | None, int]:
        """A record deleting each of ``keys`` this shard holds (live: a user delete, or with
        ``moved`` a move's, which the change feed skips; expired: an expiry), and how many
        were live; (None, 0) when it holds none. Caller holds ``lock``, writes the record with
        :meth:`write_planned` and then commits without it.

        ``after``: a planned record that will be written first (its seq is taken into
        account, and keys it deletes already are left out)."""
        self._check_writable()
        now = self._clock.time()
        gone: set[Key] = set()
        if after is not None:
            gone = {(op.namespace, op.key) for op in after.ops if isinstance(op, DeleteOp)}
        ops: list[Op] = []
        live = 0
        for namespace, key in keys:
            slot = self._keys.get((namespace, key))
            if slot is None or (namespace, key) in gone:
                continue
            existed = bool(self._expires[slot] > now)
            live += existed
            if not existed:
                reason = DeleteReason.EXPIRED
            else:
                reason = DeleteReason.MOVED if moved else DeleteReason.USER
            ops.append(DeleteOp(namespace, key, reason))
        if not ops:
            return None, 0
        seq = (self.applied_seq if after is None else after.last_seq) + 1
        return Record(seq, now, ops), live

    def delete(
        self, namespace: tuple[str, ...], key: str, fence: tuple[str, int] | None = None
    ) -> bool:
        """Delete one memory; True if a live (unexpired) memory was deleted. ``fence``: as
        in :meth:`plan_put`."""
        with self.lock:
            self._check_writable()
            if self.lww is not None and fence is not None:
                self._check_multi([], fence)
            ops = self._fence_ops(fence)
            now = self._clock.time()
            slot = self._keys.get((namespace, key))
            if slot is None and self.lww is None:
                return False
            # multi: a tombstone even for a memory this replica has not received yet, so
            # the put does not come back when it arrives.
            existed = slot is not None and bool(self._expires[slot] > now)
            reason = DeleteReason.USER if existed or slot is None else DeleteReason.EXPIRED
            ops.append(DeleteOp(namespace, key, reason))
            token = self._write(Record(self.applied_seq + 1, now, ops))
        self.commit(token)
        return existed

    def delete_where(self, prefix: tuple[str, ...], flt: Filter) -> int:
        """Delete every live memory under ``prefix`` matching ``flt``; returns how many.

        Deletes are written in records of at most ``batch_items_max`` operations; each record
        is atomic, so a crash in the middle leaves a prefix of the deletes applied.
        """
        total = 0
        with self.lock:
            self._check_writable()
            now = self._clock.time()
            slots = np.flatnonzero(self._match(prefix, flt, now))
            token = -1
            step = self.config.batch_items_max
            for start in range(0, len(slots), step):
                ops: list[Op] = [
                    DeleteOp(self._ns_list[self._ns[s]], self._slot_key[s] or "")
                    for s in slots[start : start + step].tolist()
                ]
                token = self._write(Record(self.applied_seq + 1, now, ops))
                total += len(ops)
        if token >= 0:
            self.commit(token)
        return total

    # -- capacity ----------------------------------------------------------------------------

    def _victims(self, puts: list[PutOp], now: float) -> list[DeleteOp]:
        """Deletes that make room for ``puts``, or CapacityExceeded. Caller holds the lock."""
        if self._cap_items is None and self._cap_bytes is None and self._cap_ns is None:
            return []
        protected: set[int] = set()
        new_items = 0
        delta_bytes = 0
        new_per_ns: dict[tuple[str, ...], int] = {}
        for p in puts:
            slot = self._keys.get((p.namespace, p.key))
            delta_bytes += self._item_bytes(p)
            if slot is None:
                new_items += 1
                new_per_ns[p.namespace] = new_per_ns.get(p.namespace, 0) + 1
            else:
                protected.add(slot)
                delta_bytes -= int(self._nbytes[slot])
        chosen: list[int] = []
        chosen_set: set[int] = set()
        n = self._n
        candidates = self._alive[:n].copy()
        if protected:
            candidates[list(protected)] = False

        def take(mask: npt.NDArray[np.bool_], need_items: int, need_bytes: int, what: str) -> None:
            mask = mask & candidates
            if chosen_set:
                mask[list(chosen_set)] = False
            order = self._eviction_order(np.flatnonzero(mask), now)
            got_items = 0
            got_bytes = 0
            for slot in order.tolist():
                if got_items >= need_items and got_bytes >= need_bytes:
                    break
                chosen.append(slot)
                chosen_set.add(slot)
                got_items += 1
                got_bytes += int(self._nbytes[slot])
            if got_items < need_items or got_bytes < need_bytes:
                policy = self.coll.eviction
                hint = (
                    "raise the capacity, delete memories, or create the collection with"
                    " eviction='lru', 'lfu' or 'ttl'"
                    if policy is Eviction.NONE
                    else f"eviction '{policy}' found too few memories to evict"
                )
                raise CapacityExceeded(f"{self.name}: {what} is full; {hint}")

        if self._cap_ns is not None:
            for namespace, added in new_per_ns.items():
                ns_id = self._ns_ids.get(namespace)
                count = 0 if ns_id is None else self._ns_count.get(ns_id, 0)
                need = count + added - self._cap_ns
                if need > 0:
                    in_ns = self._ns[:n] == ns_id if ns_id is not None else np.zeros(n, dtype=bool)
                    take(in_ns, need, 0, f"namespace {namespace} (limit {self._cap_ns} per shard)")
        freed_items = len(chosen)
        freed_bytes = int(self._nbytes[chosen].sum()) if chosen else 0
        need_items = 0
        need_bytes = 0
        if self._cap_items is not None:
            need_items = self.live_count + new_items - freed_items - self._cap_items
        if self._cap_bytes is not None:
            need_bytes = self.live_bytes + delta_bytes - freed_bytes - self._cap_bytes
        if need_items > 0 or need_bytes > 0:
            limits = f"{self._cap_items} items / {self._cap_bytes} bytes per shard"
            take(np.ones(n, dtype=bool), max(need_items, 0), max(need_bytes, 0), f"({limits})")
        return [
            DeleteOp(
                self._ns_list[self._ns[s]],
                self._slot_key[s] or "",
                DeleteReason.EXPIRED if self._expires[s] <= now else DeleteReason.EVICTED,
            )
            for s in chosen
        ]

    def _eviction_order(self, slots: Slots, now: float) -> Slots:
        """Slots in the order to evict them: expired ones first, then by policy."""
        expired = self._expires[slots] <= now
        policy = self.coll.eviction
        first = slots[expired][np.argsort(self._expires[slots[expired]], kind="stable")]
        rest = slots[~expired]
        if policy is Eviction.NONE:
            rest = rest[:0]
        elif policy is Eviction.LRU:
            rest = rest[np.argsort(self._access[rest], kind="stable")]
        elif policy is Eviction.LFU:
            rest = rest[np.lexsort((self._access[rest], self._hits[rest]))]
        elif policy is Eviction.TTL:
            rest = rest[self._expires[rest] != INF]
            rest = rest[np.argsort(self._expires[rest], kind="stable")]
        else:  # pragma: no cover
            raise AssertionError(policy)
        return np.concatenate([first, rest])

    # -- reading -------------------------------------------------------------------------------

    def _check_readable(self) -> None:
        if self._closed:
            raise InvalidState(f"{self.name}: closed; open the database again")

    def _memory(self, slot: int, include_vector: bool) -> Memory:
        expires = float(self._expires[slot])
        return Memory(
            namespace=self._ns_list[self._ns[slot]],
            key=self._slot_key[slot] or "",
            text=self._slot_text[slot],
            vector=self._vectors[slot].copy() if include_vector else None,
            metadata=_meta_decoder.decode(self._slot_meta[slot] or b"{}"),
            version=int(self._version[slot]),
            created_at=float(self._created[slot]),
            updated_at=float(self._updated[slot]),
            expires_at=None if expires == INF else expires,
            lease=self._slot_lease.get(slot),
        )

    def _touch(self, slots: Slots | list[int], now: float) -> None:
        self._access[slots] = now
        self._hits[slots] += 1

    def get(self, namespace: tuple[str, ...], key: str) -> Memory | None:
        """The live memory at (namespace, key), with its vector, or None."""
        with self.lock:
            return self.get_held(namespace, key)

    def get_held(self, namespace: tuple[str, ...], key: str) -> Memory | None:
        """:meth:`get` for a caller that holds ``lock`` already."""
        self._check_readable()
        now = self._clock.time()
        slot = self._keys.get((namespace, key))
        if slot is None or self._expires[slot] <= now:
            return None
        self._touch([slot], now)
        return self._memory(slot, include_vector=True)

    def _prefix_mask(self, prefix: tuple[str, ...]) -> npt.NDArray[np.bool_] | None:
        if not prefix:
            return None
        depth = len(prefix)
        ids = [i for i, ns in enumerate(self._ns_list) if ns[:depth] == prefix]
        return np.isin(self._ns[: self._n], np.asarray(ids, dtype=np.int32))

    def _match(self, prefix: tuple[str, ...], flt: Filter, now: float) -> npt.NDArray[np.bool_]:
        """Mask over slots [0, n) of live, unexpired memories under prefix matching flt."""
        n = self._n
        mask = self._alive[:n] & (self._expires[:n] > now)
        in_prefix = self._prefix_mask(prefix)
        if in_prefix is not None:
            mask &= in_prefix
        if not flt.is_empty:
            mask &= flt.evaluate(self._columns, n)
        return mask

    def count(self, prefix: tuple[str, ...], flt: Filter) -> int:
        """How many live memories under ``prefix`` match ``flt``."""
        with self.lock:
            self._check_readable()
            return int(self._match(prefix, flt, self._clock.time()).sum())

    def list_page(
        self, prefix: tuple[str, ...], flt: Filter, after: Key | None, limit: int
    ) -> list[Memory]:
        """Up to ``limit`` matching memories in (namespace, key) order, after ``after``."""
        with self.lock:
            self._check_readable()
            slots = np.flatnonzero(self._match(prefix, flt, self._clock.time())).tolist()
            ns_list, ns_col, keys = self._ns_list, self._ns, self._slot_key
            candidates: Iterable[tuple[Key, int]] = (
                ((ns_list[ns_col[s]], keys[s] or ""), s) for s in slots
            )
            if after is not None:
                candidates = (c for c in candidates if c[0] > after)
            page = heapq.nsmallest(limit, candidates)
            return [self._memory(s, include_vector=False) for _, s in page]

    def search(
        self,
        query: npt.NDArray[np.float32],
        k: int,
        prefix: tuple[str, ...],
        flt: Filter,
        include_vectors: bool = False,
    ) -> list[Hit]:
        """The k best live memories under ``prefix`` matching ``flt``, best first."""
        with self.lock:
            self._check_readable()
            now = self._clock.time()
            slots, found = self._search_slots(query, k, prefix, flt, now)
            self._touch(slots, now)
            return [
                Hit(self._memory(s, include_vectors), float(score))
                for s, score in zip(slots.tolist(), found.tolist(), strict=True)
            ]

    def _exact(
        self, candidates: Slots, query: npt.NDArray[np.float32], k: int
    ) -> tuple[Slots, npt.NDArray[np.float32]]:
        if len(candidates) == 0:
            return candidates, np.empty(0, dtype=np.float32)
        if len(candidates) == self._n:
            matrix = self._vectors[: self._n]
        else:
            matrix = self._vectors[candidates]
        pos, s = exact_topk(matrix, query, k, self.coll.metric)
        return candidates[pos], s

    def _search_slots(
        self,
        query: npt.NDArray[np.float32],
        k: int,
        prefix: tuple[str, ...],
        flt: Filter,
        now: float,
    ) -> tuple[Slots, npt.NDArray[np.float32]]:
        """Plan and run a search. Caller holds the lock.

        Unfiltered searches on a sealed shard cost O(k) beyond the graph query: results are
        checked slot by slot, and the buffer is scanned only when it is not empty. Filtered
        searches compute the filter mask once and scan exactly when it is selective.
        """
        n = self._n
        filtered = bool(prefix) or not flt.is_empty
        sealed_count = len(self._index)
        mask: npt.NDArray[np.bool_] | None = None
        if filtered:
            mask = self._match(prefix, flt, now)
            matching = int(mask.sum())
            exact = matching <= self.config.exact_filter_items_max
        else:
            matching = self.live_count
            exact = matching <= self.config.exact_items_max
        if exact or matching == 0 or sealed_count == 0:
            if mask is None:
                mask = self._match(prefix, flt, now)
            return self._exact(np.flatnonzero(mask), query, k)
        selectivity = matching / max(self.live_count, 1)
        want = (
            k + 8
            if not filtered
            else math.ceil(k / selectivity * self.config.hnsw_overfetch_factor)
        )
        ef = self.config.hnsw_ef_search
        while True:
            want = min(want, sealed_count)
            labels, found = self._index.search(query, want, max(ef, want))
            in_range = labels < n
            labels, found = labels[in_range], found[in_range]
            if mask is not None:
                keep = mask[labels] & ~self._in_buffer[labels]
            else:
                keep = (
                    self._alive[labels] & ~self._in_buffer[labels] & (self._expires[labels] > now)
                )
            labels, found = labels[keep], found[keep]
            if len(labels) >= k or want >= sealed_count:
                break
            if want * 2 > max(4 * k, self.config.exact_filter_items_max):
                # The graph keeps returning filtered-out or dead slots: scan exactly.
                if mask is None:
                    mask = self._match(prefix, flt, now)
                return self._exact(np.flatnonzero(mask), query, k)
            want *= 2
        if self._buffer_count == 0:
            return labels[:k], found[:k]
        buffered = np.flatnonzero(self._in_buffer[:n])
        if mask is not None:
            buffered = buffered[mask[buffered]]
        else:
            buffered = buffered[self._expires[buffered] > now]
        b_slots, b_scores = self._exact(buffered, query, k)
        all_slots = np.concatenate([labels, b_slots])
        all_scores = np.concatenate([found, b_scores])
        best = topk(all_scores, k)
        return all_slots[best], all_scores[best]

    # -- background work ---------------------------------------------------------------------

    def maintain(self) -> bool:
        """One step of background work; True if there may be more to do right away.

        In order: the periodic fsync of ``batch`` durability, a TTL sweep (expired memories
        become delete records), moving one chunk of the exact buffer into the graph, and a
        snapshot when enough WAL has accumulated. Safe to call from one thread at a time while
        other threads read and write.
        """
        if self._closed or self._failed is not None:
            return False
        more = False
        if self.durability is Durability.BATCH:
            mono = self._clock.monotonic()
            if mono - self._last_batch_sync >= self.config.wal_batch_sync_interval_s:
                self._last_batch_sync = mono
                self._wal.sync_all()
        more |= self.sweep_expired()
        more |= self.seal()
        if self._wal.bytes_total() - self._wal_bytes_at_snapshot >= self.config.snapshot_wal_bytes:
            self.snapshot()
        return more

    def sweep_expired(self) -> bool:
        """Write deletes for expired memories; True if more remain."""
        with self.lock:
            if self._ttl_count == 0:
                return False
            try:
                self._check_writable()  # closed, failed, or frozen for a handover
            except MemclusterError:
                return False
            now = self._clock.time()
            n = self._n
            expired = np.flatnonzero(self._alive[:n] & (self._expires[:n] <= now))
            if len(expired) == 0:
                return False
            batch = expired[: self.config.expire_batch_items_max]
            ops: list[Op] = [
                DeleteOp(self._ns_list[self._ns[s]], self._slot_key[s] or "", DeleteReason.EXPIRED)
                for s in batch.tolist()
            ]
            self._write(Record(self.applied_seq + 1, now, ops))
            return len(expired) > len(batch)

    def leases(self) -> set[int]:
        """The leases that memories of this shard are attached to."""
        with self.lock:
            return set(self._slot_lease.values())

    def reap_leases(self, alive: set[int]) -> int:
        """Delete the memories attached to a lease not in ``alive`` (it ended); how many.

        The database calls this from its background step, and so after a crash too: a
        lease that ended while memories still referenced it cannot leave them behind."""
        with self.lock:
            try:
                self._check_writable()  # closed, failed, or not this node's to write
            except MemclusterError:
                return 0
            dead = [slot for slot, lease in self._slot_lease.items() if lease not in alive]
            if not dead:
                return 0
            dead = dead[: self.config.expire_batch_items_max]
            ops: list[Op] = [
                DeleteOp(self._ns_list[self._ns[s]], self._slot_key[s] or "", DeleteReason.EXPIRED)
                for s in dead
            ]
            token = self._write(Record(self.applied_seq + 1, self._clock.time(), ops))
        self.commit(token)
        return len(dead)

    def seal(self) -> bool:
        """Move one chunk of the exact buffer into the graph; True if more remain.

        The graph insertion runs without the shard lock, so writes never wait for it. A slot
        written again during the insertion keeps its place in the buffer (its version changed).
        """
        with self._seal_lock:
            with self.lock:
                if self._closed:
                    return False
                deletes = np.fromiter(self._pending_deletes, dtype=np.int64)
                self._pending_deletes.clear()
                n = self._n
                chunk = np.flatnonzero(self._in_buffer[:n])[: self.config.seal_chunk_items]
                vectors = self._vectors[chunk]
                versions = self._version[chunk].copy()
                self._in_graph[chunk] = True
                remaining = int(self._in_buffer[:n].sum()) - len(chunk)
            if len(deletes):
                self._index.mark_deleted(deletes)
            if len(chunk) == 0:
                return False
            # While writes arrive, leave them a core; once they pause, index on every core.
            idle = self._clock.monotonic() - self._last_write_mono > self.config.seal_idle_s
            threads = (os.cpu_count() or 1) if idle else self.config.hnsw_threads
            self._index.add(vectors, chunk.astype(np.int64), threads)
            with self.lock:
                same = self._in_buffer[chunk] & (self._version[chunk] == versions)
                self._in_buffer[chunk[same]] = False
                self._buffer_count -= int(same.sum())
                gone = chunk[~self._alive[chunk]]
                self._pending_deletes.update(gone.tolist())
            return remaining > 0

    def indexed_count(self) -> int:
        """Live memories whose current vector is in the graph."""
        with self.lock:
            n = self._n
            return int((self._alive[:n] & ~self._in_buffer[:n]).sum())

    # -- snapshots and recovery ----------------------------------------------------------------

    def snapshot(self) -> int | None:
        """Write a snapshot of the current state, then drop the WAL it makes unnecessary.

        Returns its seq (None without a snapshot store or when nothing was written yet).
        """
        if self._snapshots is None:
            return None
        with self._seal_lock:
            with self.lock:
                self._check_readable()
                if self.applied_seq == 0:
                    return None
                state = self._state()
                self._wal.roll()
                wal_bytes = self._wal.bytes_total()
            files: dict[str, Any] = {"state.bin": msgspec.msgpack.encode(state)}
            if isinstance(self._index, HnswIndex):
                index = self._index
                files["graph.hnsw"] = lambda path: index.save(path)
            self._snapshots.write(state.seq, files)
        self._snapshots.prune(self.config.snapshots_kept)
        kept = self._snapshots.seqs()
        if kept:
            # Keep feed_retention_events of history for change-feed cursors.
            floor = max(0, self.applied_seq - self.config.feed_retention_events)
            with self._wal_read_lock:
                self._wal.truncate_before(min(kept[0], floor))
                first = self._wal.first_seq()
            if self.lww is not None:
                with self.lock:
                    self.lww.forget_before(first)
        self._wal_bytes_at_snapshot = wal_bytes
        log.info("%s: snapshot at seq %d", self.name, state.seq)
        return state.seq

    def _state(self) -> ShardState:
        n = self._n
        return ShardState(
            seq=self.applied_seq,
            dim=self.coll.dim,
            n=n,
            free=list(self._free),
            keys=self._slot_key[:n],
            namespaces=list(self._ns_list),
            ns_id=self._ns[:n].tobytes(),
            texts=self._slot_text[:n],
            metas=self._slot_meta[:n],
            vectors=self._vectors[:n].tobytes(),
            version=self._version[:n].tobytes(),
            created_at=self._created[:n].tobytes(),
            updated_at=self._updated[:n].tobytes(),
            expires_at=self._expires[:n].tobytes(),
            sealed=(self._alive[:n] & self._in_graph[:n] & ~self._in_buffer[:n]).tobytes(),
            idem=list(self._idem.items()),
            leases=sorted(self._slot_lease.items()),
            fences=sorted(self._fences.items()),
            version_offset=self._version_offset,
            lww=None if self.lww is None else self.lww.state(),
        )

    def _load_state(self, state: ShardState) -> None:
        if state.dim != self.coll.dim:
            raise CorruptionError(f"{self.name}: snapshot has dim {state.dim}, not {self.coll.dim}")
        n = state.n
        self._init_arrays(n)
        self._n = n
        self._free = list(state.free)
        self._vectors[:] = np.frombuffer(state.vectors, dtype=np.float32).reshape(n, state.dim)
        self._version[:] = np.frombuffer(state.version, dtype=np.int64)
        self._created[:] = np.frombuffer(state.created_at, dtype=np.float64)
        self._updated[:] = np.frombuffer(state.updated_at, dtype=np.float64)
        self._expires[:] = np.frombuffer(state.expires_at, dtype=np.float64)
        self._ns[:] = np.frombuffer(state.ns_id, dtype=np.int32)
        self._ns_list = list(state.namespaces)
        self._ns_ids = {ns: i for i, ns in enumerate(self._ns_list)}
        self._slot_key[:n] = state.keys
        self._slot_text[:n] = state.texts
        self._slot_meta[:n] = state.metas
        sealed = np.frombuffer(state.sealed, dtype=bool)
        for slot in range(n):
            key = state.keys[slot]
            if key is None:
                continue
            self._alive[slot] = True
            self._keys[(self._ns_list[self._ns[slot]], key)] = slot
            self._nbytes[slot] = (
                4 * state.dim
                + len(state.metas[slot] or b"")
                + len(key.encode())
                + sum(len(p.encode()) for p in self._ns_list[self._ns[slot]])
                + len((state.texts[slot] or "").encode())
            )
            meta = _meta_decoder.decode(state.metas[slot] or b"{}")
            self._columns.set(slot, meta, float(self._created[slot]), float(self._updated[slot]))
        alive = self._alive[:n]
        self._access[:n] = self._updated[:n]
        self._hits[:n] = alive
        self.live_count = int(alive.sum())
        self.live_bytes = int(self._nbytes[:n].sum())
        self._ttl_count = int((alive & (self._expires[:n] != INF)).sum())
        ns_ids, counts = np.unique(self._ns[:n][alive], return_counts=True)
        self._ns_count = dict(zip(ns_ids.tolist(), counts.tolist(), strict=True))
        self._in_buffer[:n] = alive & ~sealed
        self._buffer_count = int(self._in_buffer[:n].sum())
        self._in_graph[:n] = True  # the saved graph may hold any slot: re-mark the dead ones
        self._pending_deletes = set(np.flatnonzero(~alive).tolist())
        self._idem = OrderedDict((k, list(v)) for k, v in state.idem)
        self._slot_lease = dict(state.leases)
        self._fences = dict(state.fences)
        self._version_offset = state.version_offset
        if self.lww is not None and state.lww is not None:
            self.lww.load(state.lww)
        self.applied_seq = state.seq

    @classmethod
    def open(
        cls,
        coll: CollectionConfig,
        config: Config,
        wal: Wal,
        clock: Clock,
        *,
        snapshots: SnapshotStore | None,
        name: str = "shard",
    ) -> Shard:
        """Recover a shard: the newest valid snapshot, then every WAL record after it."""

        def new_index(path: Path | None = None, capacity: int = 1024) -> VectorIndex:
            if not config.graph:
                from memcluster.index.vector import ExactIndex

                return ExactIndex(coll.dim, coll.metric)
            return HnswIndex(
                coll.dim,
                coll.metric,
                m=config.hnsw_m,
                ef_construction=config.hnsw_ef_construction,
                capacity=capacity,
                path=path,
            )

        manifest = snapshots.latest() if snapshots is not None else None
        shard = cls(coll, config, wal, clock, index=new_index(), snapshots=snapshots, name=name)
        if manifest is not None and snapshots is not None:
            where = snapshots.path(manifest.seq)
            state = msgspec.msgpack.decode((where / "state.bin").read_bytes(), type=ShardState)
            shard._load_state(state)
            if config.graph and "graph.hnsw" in manifest.files:
                shard._index = new_index(where / "graph.hnsw", max(state.n, 1))
            else:
                shard._in_buffer[: shard._n] = shard._alive[: shard._n]
                shard._buffer_count = shard.live_count
        if shard.lww is not None:  # which records of each origin the WAL still holds
            for record in wal.records(after_seq=0):
                if record.last_seq > shard.applied_seq:
                    break
                if record.origin is not None:
                    shard.lww.logged(record, record.seq)
                if record.vv is not None:
                    shard.lww.merged(record.vv)
        for record in wal.records(after_seq=shard.applied_seq):
            if record.seq != shard.applied_seq + 1:
                raise CorruptionError(
                    f"{name}: the WAL continues at seq {record.seq} but the state is at"
                    f" {shard.applied_seq}: records are missing (no snapshot covers them)"
                )
            shard._apply(record)
        shard._wal_bytes_at_snapshot = wal.bytes_total()
        return shard

    # -- lifecycle ---------------------------------------------------------------------------

    def validate(self) -> None:
        """Assert every invariant of the in-memory state (tests call it after each step).

        The key map and the slot columns describe the same memories; the counters equal what
        they count; free slots are dead; buffered slots are alive.
        """
        with self.lock:
            n = self._n
            alive = self._alive[:n]
            assert len(self._keys) == self.live_count == int(alive.sum())
            for (namespace, key), slot in self._keys.items():
                assert alive[slot]
                assert self._slot_key[slot] == key
                assert self._ns_list[self._ns[slot]] == namespace
                if self.lww is None:
                    assert self._version[slot] <= self.applied_seq + self._version_offset
                else:  # multi: a memory's version is its put's stamp, which the key holds
                    stamp = self.lww.stamps.get((namespace, key))
                    assert stamp is not None
                    assert stamp[2] == 0
                    assert self._version[slot] == stamp[0]
            if self._free:
                assert not alive[self._free].any()
            assert len(set(self._free)) == len(self._free)
            assert len(self._free) == n - self.live_count
            assert self.live_bytes == int(self._nbytes[:n][alive].sum())
            assert self._buffer_count == int(self._in_buffer[:n].sum())
            assert not (self._in_buffer[:n] & ~alive).any()
            assert self._ttl_count == int((alive & (self._expires[:n] != INF)).sum())
            for ns_id, count in self._ns_count.items():
                assert count == int((alive & (self._ns[:n] == ns_id)).sum())
            assert not self._columns.occupied[:n][~alive].any()
            assert len(self._idem) <= self.config.idempotency_keys_max
            if self.lww is not None:  # every live stamp is a live memory
                live = {k for k, s in self.lww.stamps.items() if not s[2]}
                assert live == set(self._keys)

    def stats(self) -> Mapping[str, int]:
        with self.lock:
            n = self._n
            return {
                "items": self.live_count,
                "bytes": self.live_bytes,
                "indexed_items": int((self._alive[:n] & ~self._in_buffer[:n]).sum()),
                "last_seq": self.applied_seq,
            }

    def close(self) -> None:
        """Sync the WAL and stop serving. Idempotent."""
        with self._seal_lock, self.lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._wal.close()
            except MemclusterError as exc:
                log.error("%s: closing the WAL failed: %s", self.name, exc)
