"""The coordination shard: leases, locks with fencing tokens, semaphores and counters.

Agents coordinate through a shard like any other: its operations are records in a WAL
(:mod:`memcluster.core.codec`: ``LeaseGrantOp`` ... ``CounterOp``). They are applied by a
deterministic state machine, :class:`CoordState`. So they survive a crash the way memories do,
and in a cluster they will be replicated and served by the shard's leader like any other
record.

State and rules::

    leases     id -> (ttl_s, expires_at, owner)   id = seq of its LeaseGrantOp
    locks      name -> (token, lease)             token = seq of its LockGrantOp
    permits    name -> {token: lease}, limit      token = seq of its PermitGrantOp
    counters   key -> int

    a lease ends when revoked or when its expiry passes (the writer records LeaseEndOp);
    ending a lease frees every lock and permit held under it
    a lock has at most one holder; a semaphore at most ``limit`` permits held

**Fencing tokens** are sequence numbers, so they only grow, across restarts too: the WAL
gives every operation a larger seq than the last. A fenced write (``fence=(name, token)``)
is accepted only while ``token`` holds lock ``name``. It is checked and written while the
coordination lock is held, so no newer grant can come between the check and the write.

**Waiting is fair.** Each lock and semaphore keeps a FIFO queue of waiters. A waiter
registers and then blocks, off the lock. Whoever frees the lock (a release, a revoke, the
expiry sweep) writes the grant for the queue's head and wakes it. The waiter then fsyncs up
to its grant's record before returning the token, so a token handed out is durable. Waiters
are not persisted: they are blocked calls, and a restart fails them.

Time decisions (expiry) are made by the writer and recorded, so replay reaches the same
state on any replica. Expired leases are swept by :meth:`CoordShard.maintain`, called by the
database's maintenance thread every ``maintenance_interval_s``, and on every call that reads
lease state.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import assert_never

import msgspec

from memcluster.core import validation
from memcluster.core.clock import Clock
from memcluster.core.codec import (
    CoordOp,
    CounterOp,
    DeleteOp,
    DeleteReason,
    FenceOp,
    LeaseEndOp,
    LeaseGrantOp,
    LeaseRenewOp,
    LockGrantOp,
    LockReleaseOp,
    MergeOp,
    OriginOp,
    PermitGrantOp,
    PermitReleaseOp,
    PublishOp,
    PutOp,
    Record,
    VersionOp,
)
from memcluster.core.config import Config
from memcluster.core.errors import (
    CorruptionError,
    CursorExpired,
    InvalidArgument,
    InvalidState,
    LeaseExpired,
    StaleToken,
    Timeout,
    WrongNode,
)
from memcluster.storage.snapshot import SnapshotStore
from memcluster.storage.wal import FileWal, Wal

log = logging.getLogger("memcluster.coord")


class LeaseInfo(msgspec.Struct, frozen=True, array_like=True):
    ttl_s: float
    expires_at: float
    owner: str


class CoordState(msgspec.Struct):
    """The coordination state machine. Mutated only by :meth:`apply`; also the snapshot."""

    applied_seq: int = 0
    leases: dict[int, LeaseInfo] = msgspec.field(default_factory=dict)
    locks: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)
    """name -> (token, lease)."""
    permits: dict[str, dict[int, int]] = msgspec.field(default_factory=dict)
    """name -> {token: lease}."""
    limits: dict[str, int] = msgspec.field(default_factory=dict)
    """name -> permits of the semaphore, as its latest grant said."""
    counters: dict[str, int] = msgspec.field(default_factory=dict)

    def apply(self, record: Record) -> None:
        """Apply a record; a no-op if it was applied already (replay is idempotent)."""
        if record.last_seq <= self.applied_seq:
            return
        if record.seq != self.applied_seq + 1:
            raise CorruptionError(
                f"coordination: record seq {record.seq} does not follow applied seq"
                f" {self.applied_seq}: the log has a gap"
            )
        for i, op in enumerate(record.ops):
            if isinstance(op, PutOp | DeleteOp | FenceOp | VersionOp | OriginOp | MergeOp):
                raise CorruptionError(
                    f"coordination: record for seq {record.seq + i} holds a memory operation"
                )
            self._apply_op(record.seq + i, op)
        self.applied_seq = record.last_seq

    def _apply_op(self, seq: int, op: CoordOp) -> None:
        match op:
            case LeaseGrantOp():
                self.leases[seq] = LeaseInfo(op.ttl_s, op.expires_at, op.owner)
            case LeaseRenewOp():
                info = self.leases.get(op.lease)
                if info is not None:
                    self.leases[op.lease] = LeaseInfo(info.ttl_s, op.expires_at, info.owner)
            case LeaseEndOp():
                self._end_lease(op.lease)
            case LockGrantOp():
                self.locks[op.name] = (seq, op.lease)
            case LockReleaseOp():
                if self.locks.get(op.name, (0, 0))[0] == op.token:
                    del self.locks[op.name]
            case PermitGrantOp():
                self.permits.setdefault(op.name, {})[seq] = op.lease
                self.limits[op.name] = op.permits
            case PermitReleaseOp():
                held = self.permits.get(op.name)
                if held is not None:
                    held.pop(op.token, None)
                    if not held:
                        del self.permits[op.name]
                        self.limits.pop(op.name, None)
            case CounterOp():
                self.counters[op.key] = op.value
            case PublishOp():
                pass  # a message changes no state; subscribers read it from the log
            case _:
                assert_never(op)

    def _end_lease(self, lease: int) -> None:
        if self.leases.pop(lease, None) is None:
            return
        for name in [n for n, (_, held_by) in self.locks.items() if held_by == lease]:
            del self.locks[name]
        for name in list(self.permits):
            held = self.permits[name]
            for token in [t for t, held_by in held.items() if held_by == lease]:
                del held[token]
            if not held:
                del self.permits[name]
                self.limits.pop(name, None)

    def validate(self) -> None:
        """Check the invariants; AssertionError names the broken one."""
        for name, (token, lease) in self.locks.items():
            assert lease in self.leases, f"lock {name} held under ended lease {lease}"
            assert token <= self.applied_seq, f"lock {name} token {token} from the future"
        for name, held in self.permits.items():
            assert held, f"semaphore {name} kept without holders"
            assert len(held) <= self.limits[name], f"semaphore {name} over its limit"
            for lease in held.values():
                assert lease in self.leases, f"semaphore {name} held under ended lease {lease}"


class _Waiter:
    """A blocked acquire: granted by whoever frees the lock or permit."""

    __slots__ = ("event", "lease", "permits", "sync_token", "token", "ttl_s")

    def __init__(self, ttl_s: float, lease: int | None, permits: int = 1) -> None:
        self.event = threading.Event()
        self.ttl_s = ttl_s
        self.lease = lease
        self.permits = permits
        self.token = 0
        self.sync_token = 0


_STATE_FILE = "state.bin"


class CoordShard:
    """Leases, locks, semaphores and counters of one database, on their own WAL.

    Thread-safe. Blocking calls (``acquire_lock``, ``acquire_semaphore``) wait off the lock.
    """

    def __init__(
        self, wal: Wal, snapshots: SnapshotStore | None, config: Config, clock: Clock
    ) -> None:
        self.name = "coordination"
        self.config = config
        self._wal = wal
        self._snapshots = snapshots
        self._clock = clock
        self.lock = threading.Lock()
        self.state = CoordState()
        self._lock_queues: dict[str, collections.deque[_Waiter]] = {}
        self._permit_queues: dict[str, collections.deque[_Waiter]] = {}
        self._wal_bytes_at_snapshot = 0
        self._closed = False
        # Topic messages for subscribers: recent ones in memory, older ones from the WAL.
        self._messages: list[tuple[int, float, PublishOp]] = []
        self._messages_floor = 0
        """Every message with seq >= this is in ``_messages`` (set after recovery)."""
        self._listeners: frozenset[Callable[[], None]] = frozenset()
        """Replaced, never changed in place: read without the lock."""
        self._wal_read_lock = threading.Lock()
        self.write_gate: Callable[[], None] | None = None
        """Called under the lock before every write; raising refuses it (a cluster node
        handing the coordination shard over, see ``memcluster.cluster.host``)."""
        self._handing_over = False
        self.on_written: Callable[[Record], None] | None = None
        """Called under the lock after each record this shard writes itself: a replicated
        coordination shard's leader ships it (see ``memcluster.cluster.replicas``)."""
        self.visible_upto: Callable[[], int] | None = None
        """The highest seq topic subscribers may see (what the replicas acknowledged)."""
        self.replicated: Callable[[int], None] | None = None
        """Blocks until the write ending at the given seq is acknowledged by the replicas;
        every answer waits for it, so no token, lease or count a failover undoes is given."""
        if snapshots is not None:
            manifest = snapshots.latest()
            if manifest is not None:
                data = (snapshots.path(manifest.seq) / _STATE_FILE).read_bytes()
                self.state = msgspec.msgpack.decode(data, type=CoordState)
        self._messages_floor = self.state.applied_seq + 1
        for record in wal.records(self.state.applied_seq):
            self._apply(record)
        self._wal_bytes_at_snapshot = wal.bytes_total()

    @classmethod
    def open(cls, path: Path, config: Config, clock: Clock) -> CoordShard:
        """Open (creating) the coordination shard in directory ``path``; recovery runs here."""
        wal = FileWal.open(path / "wal", config)
        try:
            return cls(wal, SnapshotStore(path / "snapshots"), config, clock)
        except BaseException:
            wal.close()
            raise

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            for queue in (*self._lock_queues.values(), *self._permit_queues.values()):
                for waiter in queue:
                    waiter.event.set()
        self._wal.sync_all()
        self._wal.close()

    # -- writing -----------------------------------------------------------------------------

    def _write(self, ops: list[CoordOp]) -> tuple[int, int]:
        """Append and apply a record. Caller holds the lock. Returns (first seq, sync token)."""
        if self._closed:
            raise InvalidState("coordination: the database is closed; open it again")
        if self.write_gate is not None:
            self.write_gate()
        record = Record(self.state.applied_seq + 1, self._clock.time(), list(ops))
        token = self._wal.append(record)
        self._apply(record)
        if self.on_written is not None:
            self.on_written(record)
        return record.seq, token

    def write_replicated(self, record: Record) -> int:
        """Log and apply a record of this shard's leader (this copy follows); returns the WAL
        token for :meth:`commit`. Caller holds the lock."""
        if self._closed:
            raise InvalidState("coordination: closed")
        if record.seq != self.state.applied_seq + 1:
            raise CorruptionError(
                f"coordination: replicated record seq {record.seq} does not follow applied"
                f" seq {self.state.applied_seq}"
            )
        token = self._wal.append(record)
        self._apply(record)
        return token

    def commit(self, token: int) -> None:
        """Make the write with this WAL token durable."""
        if token:
            self._wal.sync(token)

    def wal_first_seq(self) -> int:
        with self._wal_read_lock:
            return self._wal.first_seq()

    def notify_feed(self) -> None:
        """Wake topic subscribers: more messages became visible. Call it without the lock."""
        for listener in self._listeners:  # without the lock: a writer may wait under it
            listener()

    def _apply(self, record: Record) -> None:
        self.state.apply(record)
        published = [
            (record.seq + i, record.ts, op)
            for i, op in enumerate(record.ops)
            if isinstance(op, PublishOp)
        ]
        if published:
            self._messages.extend(published)
            if len(self._messages) > 2 * self.config.feed_buffer_events:
                del self._messages[: len(self._messages) - self.config.feed_buffer_events]
                self._messages_floor = self._messages[0][0]
            for listener in self._listeners:
                listener()

    def _expire(self) -> int:
        """End every lease past its expiry and hand freed locks to waiters. Caller holds the
        lock. Returns the sync token to wait for (0: nothing written)."""
        now = self._clock.time()
        ended = sorted(i for i, info in self.state.leases.items() if info.expires_at <= now)
        if not ended:
            return 0
        _, token = self._write([LeaseEndOp(i, DeleteReason.EXPIRED) for i in ended])
        return max(token, self._grant_waiters())

    def _grant_waiters(self) -> int:
        """Grant freed locks and permits to the heads of their queues. Caller holds the lock."""
        token = 0
        for name, queue in self._lock_queues.items():
            while queue and name not in self.state.locks:
                token = max(token, self._grant_lock(name, queue.popleft()))
        for name, queue in self._permit_queues.items():
            while queue and len(self.state.permits.get(name, {})) < queue[0].permits:
                token = max(token, self._grant_permit(name, queue.popleft()))
        for queues in (self._lock_queues, self._permit_queues):
            for name in [n for n, q in queues.items() if not q]:
                del queues[name]
        return token

    def _lease_ops(self, waiter: _Waiter, owner: str) -> tuple[list[CoordOp], int]:
        """Ops that create the waiter's implicit lease (if it brought none), and the lease id
        they will have."""
        if waiter.lease is not None:
            return [], waiter.lease
        now = self._clock.time()
        grant = LeaseGrantOp(waiter.ttl_s, now + waiter.ttl_s, owner)
        return [grant], self.state.applied_seq + 1

    def _grant_lock(self, name: str, waiter: _Waiter) -> int:
        ops, lease = self._lease_ops(waiter, f"lock:{name}")
        if lease not in self.state.leases and not ops:
            waiter.event.set()  # its lease ended while it waited: token stays 0
            return 0
        seq, sync_token = self._write([*ops, LockGrantOp(name, lease)])
        waiter.token = seq + len(ops)
        waiter.sync_token = sync_token
        waiter.event.set()
        return sync_token

    def _grant_permit(self, name: str, waiter: _Waiter) -> int:
        ops, lease = self._lease_ops(waiter, f"semaphore:{name}")
        if lease not in self.state.leases and not ops:
            waiter.event.set()
            return 0
        seq, sync_token = self._write([*ops, PermitGrantOp(name, waiter.permits, lease)])
        waiter.token = seq + len(ops)
        waiter.sync_token = sync_token
        waiter.event.set()
        return sync_token

    def _sync(self, token: int) -> None:
        if token:
            self._wal.sync(token)
        if self.replicated is not None:
            self.replicated(self.state.applied_seq)

    # -- leases ------------------------------------------------------------------------------

    def _check_lease(self, lease: int) -> LeaseInfo:
        info = self.state.leases.get(lease)
        if info is None:
            raise LeaseExpired(
                f"lease {lease} does not exist or has expired: grant a new one with"
                " grant_lease(ttl_s)"
            )
        return info

    def grant_lease(self, ttl_s: float) -> int:
        """A new lease that ends ``ttl_s`` seconds from now unless kept alive; its id."""
        ttl = _positive_ttl(ttl_s, self.config)
        with self.lock:
            self._sync(self._expire())  # an expiry is durable before anyone hears of it
            lease, token = self._write([LeaseGrantOp(ttl, self._clock.time() + ttl)])
        self._sync(token)
        return lease

    def keepalive(self, lease: int) -> float:
        """Extend ``lease`` by its TTL from now; returns its new expiry (seconds since epoch).

        LeaseExpired if it has ended: whatever it held is gone and must be acquired again.
        """
        with self.lock:
            self._sync(self._expire())  # an expiry is durable before anyone hears of it
            info = self._check_lease(lease)
            expires_at = self._clock.time() + info.ttl_s
            _, token = self._write([LeaseRenewOp(lease, expires_at)])
        self._sync(token)
        return expires_at

    def revoke(self, lease: int) -> None:
        """End ``lease`` now, releasing what it holds. LeaseExpired if it has ended."""
        with self.lock:
            token = 0
            self._sync(self._expire())  # an expiry is durable before anyone hears of it
            self._check_lease(lease)
            _, token2 = self._write([LeaseEndOp(lease)])
            token3 = self._grant_waiters()
        self._sync(max(token, token2, token3))

    def lease_alive(self, lease: int) -> bool:
        with self.lock:
            self._sync(self._expire())
            return lease in self.state.leases

    # -- locks and semaphores --------------------------------------------------------------

    def _wait(self, waiter: _Waiter, queue_of: str, name: str, timeout_s: float) -> int:
        """Block until ``waiter`` is granted or ``timeout_s`` passes; its (durable) token."""
        if not waiter.event.wait(timeout_s):
            with self.lock:
                queues = self._lock_queues if queue_of == "lock" else self._permit_queues
                queue = queues.get(name)
                if waiter.token == 0 and queue is not None and waiter in queue:
                    queue.remove(waiter)
                    raise Timeout(
                        f"{queue_of} {name!r}: not acquired within {timeout_s} s ({len(queue)}"
                        " other waiters); retry later or raise timeout_s"
                    )
        if self._handing_over and waiter.token == 0:
            raise WrongNode(f"{queue_of} {name!r}: the coordination shard moved; ask again")
        if self._closed and waiter.token == 0:
            raise InvalidState(f"{queue_of} {name!r}: the database closed while waiting")
        if waiter.token == 0:
            raise LeaseExpired(f"{queue_of} {name!r}: the lease ended while waiting")
        self._sync(waiter.sync_token)
        return waiter.token

    def acquire_lock(
        self, name: str, ttl_s: float, timeout_s: float, lease: int | None = None
    ) -> int:
        """Wait (first come, first served) until lock ``name`` is free, take it, and return its
        fencing token. Held until released, or until its lease ends: ``lease`` if given,
        else an implicit one of ``ttl_s``. Timeout after ``timeout_s``."""
        validation.key(name, self.config)
        ttl = _positive_ttl(ttl_s, self.config)
        wait_s = _timeout(timeout_s, self.config)
        waiter = _Waiter(ttl, lease)
        with self.lock:
            token = 0
            self._sync(self._expire())  # an expiry is durable before anyone hears of it
            if lease is not None:
                self._check_lease(lease)
            queue = self._lock_queues.setdefault(name, collections.deque())
            if name not in self.state.locks and not queue:
                token = max(token, self._grant_lock(name, waiter))
            else:
                queue.append(waiter)
        self._sync(token)
        return self._wait(waiter, "lock", name, wait_s)

    def release_lock(self, name: str, token: int) -> None:
        """Release lock ``name`` held with ``token`` (its implicit lease ends with it).

        StaleToken if ``token`` no longer holds it (released, or its lease expired)."""
        with self.lock:
            sync = 0
            self._sync(self._expire())  # an expiry is durable before anyone hears of it
            held = self.state.locks.get(name)
            if held is None or held[0] != token:
                raise StaleToken(_stale("lock", name, token, held))
            ops: list[CoordOp] = [LockReleaseOp(name, token)]
            if self.state.leases[held[1]].owner == f"lock:{name}":
                ops.append(LeaseEndOp(held[1]))
            _, sync2 = self._write(ops)
            sync3 = self._grant_waiters()
        self._sync(max(sync, sync2, sync3))

    def check_fence(self, name: str, token: int) -> None:
        """StaleToken unless ``token`` holds lock ``name`` now (a cluster checks this before
        a fenced write on another node; the data shard then refuses lower tokens)."""
        with self.fenced(name, token):
            pass

    @contextmanager
    def fenced(self, name: str, token: int) -> Iterator[None]:
        """Run the body only while ``token`` holds lock ``name``; StaleToken otherwise.

        The coordination lock is held throughout, so no newer token can be granted between
        the check and a write made in the body."""
        with self.lock:
            self._sync(self._expire())
            held = self.state.locks.get(name)
            if held is None or held[0] != token:
                raise StaleToken(_stale("lock", name, token, held))
            yield

    def acquire_semaphore(
        self, name: str, permits: int, ttl_s: float, timeout_s: float, lease: int | None = None
    ) -> int:
        """Wait (FIFO) for one of ``permits`` permits of semaphore ``name``; its token."""
        validation.key(name, self.config)
        validation.int_in_range("permits", permits, 1, 1_000_000)
        ttl = _positive_ttl(ttl_s, self.config)
        wait_s = _timeout(timeout_s, self.config)
        waiter = _Waiter(ttl, lease, permits)
        with self.lock:
            token = 0
            self._sync(self._expire())  # an expiry is durable before anyone hears of it
            if lease is not None:
                self._check_lease(lease)
            queue = self._permit_queues.setdefault(name, collections.deque())
            if not queue and len(self.state.permits.get(name, {})) < permits:
                token = max(token, self._grant_permit(name, waiter))
            else:
                queue.append(waiter)
        self._sync(token)
        return self._wait(waiter, "semaphore", name, wait_s)

    def release_semaphore(self, name: str, token: int) -> None:
        """Give back the permit ``token`` of semaphore ``name``; StaleToken if it is not held."""
        with self.lock:
            sync = 0
            self._sync(self._expire())  # an expiry is durable before anyone hears of it
            held = self.state.permits.get(name, {})
            if token not in held:
                raise StaleToken(
                    f"semaphore {name!r}: permit {token} is not held (released, or its lease"
                    " expired)"
                )
            lease = held[token]
            ops: list[CoordOp] = [PermitReleaseOp(name, token)]
            if self.state.leases[lease].owner == f"semaphore:{name}":
                ops.append(LeaseEndOp(lease))
            _, sync2 = self._write(ops)
            sync3 = self._grant_waiters()
        self._sync(max(sync, sync2, sync3))

    # -- counters ----------------------------------------------------------------------------

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to counter ``key`` (absent = 0) and return the new value, atomically."""
        validation.key(key, self.config)
        validation.int_in_range("delta", delta, -(2**62), 2**62)
        with self.lock:
            value = self.state.counters.get(key, 0) + delta
            if not -(2**63) <= value < 2**63:
                raise InvalidArgument(f"counter {key!r} would overflow 64 bits")
            _, token = self._write([CounterOp(key, value)])
        self._sync(token)
        return value

    def counter(self, key: str) -> int:
        """The value of counter ``key`` (0 if it was never incremented)."""
        validation.key(key, self.config)
        with self.lock:
            return self.state.counters.get(key, 0)

    # -- topics ------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes) -> int:
        """Append a message (JSON bytes, validated by the caller) to ``topic``; its seq."""
        validation.key(topic, self.config)
        with self.lock:
            seq, token = self._write([PublishOp(topic, payload)])
        self._sync(token)
        return seq

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (quick, non-blocking) after every published message."""
        with self.lock:
            self._listeners = self._listeners | {callback}

    def unlisten(self, callback: Callable[[], None]) -> None:
        with self.lock:
            self._listeners = self._listeners - {callback}

    def messages(self, after_seq: int, limit: int) -> list[tuple[int, float, PublishOp]]:
        """Up to ``limit`` published messages (of every topic) with seq > ``after_seq``.

        CursorExpired when ``after_seq`` is older than the log still holds; InvalidState once
        the shard is closed (a cluster node handed it to another node: a subscriber follows
        it there)."""
        closed = "coordination: closed (the shard moved to another node, or the database closed)"
        with self.lock:
            if self._closed:
                raise InvalidState(closed)
            upto = self.state.applied_seq
            if self.visible_upto is not None:
                upto = min(upto, self.visible_upto())
            if after_seq >= upto:
                return []
            if after_seq + 1 >= self._messages_floor:
                recent = self._messages
                start = bisect.bisect_right(recent, after_seq, key=lambda m: m[0])
                end = bisect.bisect_right(recent, upto, key=lambda m: m[0])
                return recent[start : min(start + limit, end)]
        with self._wal_read_lock:
            if self._closed:  # closed since the lock was let go: its WAL is closed too
                raise InvalidState(closed)
            first = self._wal.first_seq()
            if after_seq + 1 < first:
                raise CursorExpired(
                    f"topics: messages after seq {after_seq} are no longer retained; the"
                    f" oldest is seq {first}"
                )
            out: list[tuple[int, float, PublishOp]] = []
            for record in self._wal.records(after_seq):
                if record.seq > upto:
                    break
                for i, op in enumerate(record.ops):
                    if after_seq < record.seq + i <= upto and isinstance(op, PublishOp):
                        out.append((record.seq + i, record.ts, op))
                if len(out) >= limit:
                    break
            return out[:limit]

    def oldest_seq(self) -> int:
        with self._wal_read_lock:
            return self._wal.first_seq()

    # -- handing the shard to another node (a cluster's shard transfer) ---------------------

    @property
    def applied_seq(self) -> int:
        return self.state.applied_seq

    def records_after(self, after_seq: int, limit: int) -> list[Record]:
        """Up to ``limit`` WAL records holding seqs above ``after_seq`` (what a transfer
        ships); CursorExpired when the WAL no longer reaches back there."""
        with self._wal_read_lock:
            first = self._wal.first_seq()
            if after_seq + 1 < first:
                raise CursorExpired(
                    f"coordination: the WAL starts at seq {first}, after {after_seq + 1}:"
                    " start the transfer again from a new snapshot"
                )
            out: list[Record] = []
            for record in self._wal.records(after_seq):
                out.append(record)
                if len(out) >= limit:
                    break
            return out

    def apply_records(self, records: Sequence[Record]) -> None:
        """Log and apply records shipped from the shard's previous holder, durably."""
        token = 0
        with self.lock:
            for record in records:
                if record.last_seq > self.state.applied_seq:
                    token = self._wal.append(record)
                    self._apply(record)
        self._sync(token)

    def handover(self, on: bool) -> None:
        """``on``: the shard is being handed over; wake every waiting acquire with WrongNode
        (its caller asks the new holder). ``off``: the handover was given up."""
        with self.lock:
            self._handing_over = on
            if on:
                for queue in (*self._lock_queues.values(), *self._permit_queues.values()):
                    for waiter in queue:
                        waiter.event.set()
                self._lock_queues.clear()
                self._permit_queues.clear()

    def stats(self) -> dict[str, int]:
        return {"items": 0, "bytes": 0, "indexed_items": 0, "last_seq": self.state.applied_seq}

    # -- background --------------------------------------------------------------------------

    def maintain(self) -> bool:
        """Expire leases (granting what they freed) and snapshot when the WAL has grown."""
        with self.lock:
            if self._closed:
                return False
            token = 0
            try:
                self._sync(self._expire())  # an expiry is durable before anyone hears of it
            except WrongNode:
                return False  # not this node's to write: being copied in, or handed over
        self._sync(token)
        if self._wal.bytes_total() - self._wal_bytes_at_snapshot >= self.config.snapshot_wal_bytes:
            self.snapshot()
        return False

    def snapshot(self) -> int | None:
        """Write the state as a snapshot and drop the WAL it covers; returns its seq (None
        without a snapshot store or before the first write)."""
        if self._snapshots is None:
            return None
        with self.lock:
            data = msgspec.msgpack.encode(self.state)
            seq = self.state.applied_seq
            if seq == 0:
                return None
            self._wal.roll()
        self._wal.sync_all()
        self._snapshots.write(seq, {_STATE_FILE: data})
        self._snapshots.prune(self.config.snapshots_kept)
        kept = self._snapshots.seqs()
        # The oldest kept snapshot must still be able to replay (a damaged newest one falls
        # back to it), and topics keep feed_retention_events of history.
        floor = max(0, seq - self.config.feed_retention_events)
        with self._wal_read_lock:
            self._wal.truncate_before(min(kept[0] if kept else seq, floor))
        self._wal_bytes_at_snapshot = self._wal.bytes_total()
        return seq


def _stale(what: str, name: str, token: int, held: tuple[int, int] | None) -> str:
    now = "is free" if held is None else f"is held by token {held[0]}"
    return (
        f"{what} {name!r}: token {token} does not hold it (it {now}): it was released or its"
        " lease expired; acquire it again"
    )


def _positive_ttl(ttl_s: object, config: Config) -> float:
    ttl = validation.ttl(ttl_s)
    if ttl is None or ttl <= 0 or ttl > config.lease_ttl_max_s:
        raise InvalidArgument(
            f"ttl_s is {ttl_s!r}; a lease needs 0 < ttl_s <= {config.lease_ttl_max_s}"
        )
    return ttl


def _timeout(timeout_s: object, config: Config) -> float:
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not 0 <= timeout_s <= config.lock_wait_max_s
    ):
        raise InvalidArgument(
            f"timeout_s is {timeout_s!r}; use 0 <= timeout_s <= {config.lock_wait_max_s}"
        )
    return float(timeout_s)
