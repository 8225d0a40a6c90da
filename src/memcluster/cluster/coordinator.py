"""The ``Coordinator`` boundary: the part of etcd v3 the cluster uses, and its in-memory twin.

The cluster keeps its metadata in etcd (DESIGN.md §5): node membership on leases, collection
configs, the shard map and the controller election. This module is the only one that talks
to etcd; everything above it sees the :class:`Coordinator` protocol, implemented by
:class:`EtcdCoordinator` (aetcd, a real etcd) and :class:`MemoryCoordinator` (a client of a
:class:`MemoryEtcd`, the twin used by tests and seeded simulations).

The model (etcd v3's; both implementations keep it exactly)
-----------------------------------------------------------

* **Revision.** The store has one revision counter, 1 on an empty store. Every request that
  changes something (a put; a delete that deleted; a transaction whose chosen branch changed
  something; a lease ending that deleted keys) increases it by one, and all the changes of
  that request carry the new revision. A request that changes nothing leaves it alone.
* **KeyValue.** ``mod_revision`` is the revision of the key's last change, ``create_revision``
  that of its creation (a key deleted and put again is created again); ``lease`` 0 means none.
* **Leases.** A lease lives its TTL (whole seconds: a fraction is rounded up, and etcd raises
  it to its minimum, 2 s by default) after it was granted or last kept alive. When it ends,
  by expiry or revoke, every key attached to it is deleted in one revision, and watchers see
  the deletes. Expiry is late, never early: etcd checks leases every 500 ms; the twin ends
  them when it next looks at the clock (any call, or :meth:`MemoryEtcd.tick`).
* **Transactions.** ``txn(compare, success, failure)`` runs ``success`` if every
  :class:`Compare` holds (the key's ``mod_revision`` equals the given one, 0 meaning "absent"),
  else ``failure``; atomically, in one revision. It is the one conditional write: every change
  of the shard map is a txn conditioned on the ``mod_revision`` it read.
* **Watches.** ``watch_prefix`` yields every change under a prefix in revision order; the
  events of one revision come in the order of the request's ops (a lease's deletes in key
  order). A delete event's ``kv`` holds only the key and the revision of the delete. The
  idiom that misses nothing: ``kvs, rev = await c.get_prefix(p)``, then
  ``c.watch_prefix(p, start_revision=rev + 1)``.

Errors
------

* :class:`~memcluster.core.errors.Unreachable` (retryable): etcd refused or dropped the
  connection, or did not answer within ``timeout_s``; the twin while :meth:`partitioned
  <MemoryCoordinator.partition>`. A write may or may not have been applied. A watch ends with
  it when its stream breaks: start a new one from the last revision seen + 1.
* :class:`~memcluster.core.errors.LeaseExpired`: the lease does not exist (expired, revoked,
  or never granted); from ``put``, ``txn`` (nothing applied), ``keepalive`` and ``revoke``.
* :class:`~memcluster.core.errors.InvalidArgument`: an empty key or prefix, a TTL that is not
  positive, the same key twice in one branch of a txn, a request over etcd's size limit.
* :class:`~memcluster.core.errors.CursorExpired`: a watch's ``start_revision`` was compacted.
* :class:`~memcluster.core.errors.InvalidState`: the coordinator was closed.
* :class:`~memcluster.core.errors.Overloaded`: etcd rejected the request as too many.

Concurrency: the methods may run concurrently in tasks of one event loop. A coordinator
belongs to the loop that first used it (gRPC channels are bound to their loop).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import math
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import aetcd  # type: ignore[import-untyped]  # (aetcd.exceptions and aetcd.rpc come with it)
import msgspec

from memcluster.core.clock import Clock
from memcluster.core.errors import (
    CursorExpired,
    InvalidArgument,
    InvalidState,
    LeaseExpired,
    MemclusterError,
    Overloaded,
    Unreachable,
)

LEASE_TTL_S_MAX = 9_000_000_000
"""etcd's largest lease TTL (``MaxLeaseTTL``), in seconds."""


class KeyValue(msgspec.Struct, frozen=True):
    """A key as stored: its value, the revisions of its last change and creation, its lease
    (0: none)."""

    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


class WatchEvent(msgspec.Struct, frozen=True):
    """One change. For ``"delete"``, ``kv`` has the key, an empty value, ``mod_revision`` =
    ``revision`` and ``create_revision`` = ``lease`` = 0 (as etcd sends it)."""

    kind: Literal["put", "delete"]
    kv: KeyValue
    revision: int


class Compare(msgspec.Struct, frozen=True):
    """Holds when ``key``'s ``mod_revision`` equals ``mod_revision`` (0: the key is absent)."""

    key: bytes
    mod_revision: int


class Put(msgspec.Struct, frozen=True):
    """A put inside a txn; ``lease`` None attaches no lease."""

    key: bytes
    value: bytes
    lease: int | None = None


class Delete(msgspec.Struct, frozen=True):
    """A delete of one key inside a txn (a no-op if the key is absent)."""

    key: bytes


Op = Put | Delete


class Coordinator(Protocol):
    """What the cluster needs from etcd v3. Errors and ordering: see the module docstring."""

    async def get(self, key: bytes) -> KeyValue | None:
        """The key's current value, or None if it is absent. A linearizable read."""
        ...

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key that starts with ``prefix`` (non-empty), sorted by key, and the store
        revision they were read at (a watch from that revision + 1 misses nothing)."""
        ...

    async def put(self, key: bytes, value: bytes, *, lease: int | None = None) -> int:
        """Set ``key`` (non-empty) to ``value``, attached to ``lease`` (None: no lease; a key
        attached to another lease is moved). Returns the new revision. Raises LeaseExpired if
        the lease does not exist (nothing written)."""
        ...

    async def delete(self, key: bytes) -> bool:
        """Delete ``key``; whether it existed (absent: no new revision)."""
        ...

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> bool:
        """Atomically: if every compare holds, apply ``success``, else ``failure``, in one
        revision. Returns whether the compares held (no compares: they hold). A key may appear
        at most once per branch (InvalidArgument); a Put on a lease that does not exist fails
        the whole txn with LeaseExpired."""
        ...

    async def grant_lease(self, ttl_s: float) -> int:
        """A new lease (a positive id) living ``ttl_s`` in (0, LEASE_TTL_S_MAX], rounded up to
        whole seconds and to the server's minimum TTL."""
        ...

    async def keepalive(self, lease: int) -> float:
        """Restart the lease's TTL from now; returns the seconds it now has left (its TTL).
        Raises LeaseExpired if the lease is gone."""
        ...

    async def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys in one revision. LeaseExpired if it is gone."""
        ...

    def watch_prefix(
        self, prefix: bytes, start_revision: int | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        """Every change to keys under ``prefix`` (non-empty), in revision order, from
        ``start_revision`` (>= 1; earlier changes replayed) or, if None, from the revision
        after the one current when iteration starts. Lease-end deletes are delete events.

        An async generator: the watch starts at the first ``__anext__`` and is cancelled
        when the generator is closed (use ``contextlib.aclosing``). It ends when the
        coordinator is closed, and raises Unreachable when its stream breaks and
        CursorExpired when ``start_revision`` was compacted.
        """
        ...

    async def close(self) -> None:
        """Close the connection and end the watches; idempotent. Leases are left to expire."""
        ...


# -- shared checks ----------------------------------------------------------------------


def _check_key(key: bytes, what: str = "key") -> None:
    if not isinstance(key, bytes) or not key:
        raise InvalidArgument(f"coordinator: {what} must be non-empty bytes, got {key!r}")


def _check_lease_id(lease: int | None) -> None:
    if lease is not None and (not isinstance(lease, int) or lease <= 0):
        raise InvalidArgument(f"coordinator: a lease id is a positive int, got {lease!r}")


def _lease_ttl(ttl_s: float, min_ttl_s: int = 1) -> int:
    if not isinstance(ttl_s, int | float) or not 0 < ttl_s <= LEASE_TTL_S_MAX:
        raise InvalidArgument(
            f"coordinator: ttl_s must be in (0, {LEASE_TTL_S_MAX}] seconds, got {ttl_s!r}"
        )
    return max(math.ceil(ttl_s), min_ttl_s)


def _check_txn(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> None:
    for c in compare:
        _check_key(c.key)
        if c.mod_revision < 0:
            raise InvalidArgument(f"coordinator: compare mod_revision {c.mod_revision} < 0")
    for branch in (success, failure):
        seen: set[bytes] = set()
        for op in branch:
            _check_key(op.key)
            if isinstance(op, Put):
                _check_lease_id(op.lease)
            if op.key in seen:
                raise InvalidArgument(f"coordinator: key {op.key!r} twice in one txn branch")
            seen.add(op.key)


def _check_start_revision(start_revision: int | None) -> None:
    if start_revision is not None and start_revision < 1:
        raise InvalidArgument(f"coordinator: start_revision must be >= 1, got {start_revision}")


# -- etcd ---------------------------------------------------------------------------------

MESSAGE_BYTES_MAX = 64 * 1024 * 1024
"""Largest gRPC reply accepted (a ``get_prefix`` of the whole shard map must fit)."""
RECONNECT_BACKOFF_MS_MAX = 1000
"""Longest wait between reconnection attempts, so a restarted etcd is found within a second
(gRPC's default grows to 120 s)."""

_UNREACHABLE_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}


class EtcdCoordinator:
    """A :class:`Coordinator` on a real etcd (v3 API, >= 3.4) through aetcd.

    ``endpoint`` is ``http://HOST:PORT`` (PORT defaults to 2379). aetcd speaks plaintext gRPC
    to one endpoint: no TLS, no client-side failover between etcd members. Every unary call
    waits at most ``timeout_s``; watches have no deadline. The connection is opened by the
    first call.
    """

    def __init__(self, endpoint: str, *, timeout_s: float = 5.0) -> None:
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        if parts.scheme != "http" or not parts.hostname:
            raise InvalidArgument(
                f"coordinator: etcd endpoint {endpoint!r} must be http://HOST:PORT"
                " (aetcd has no TLS)"
            )
        if not timeout_s > 0:
            raise InvalidArgument(f"coordinator: timeout_s must be > 0, got {timeout_s!r}")
        self.endpoint = f"http://{parts.hostname}:{parts.port or 2379}"
        self._timeout_s = timeout_s
        self._closed = False
        self._client = aetcd.Client(
            host=parts.hostname,
            port=parts.port or 2379,
            timeout=timeout_s,
            options={
                "grpc.max_receive_message_length": MESSAGE_BYTES_MAX,
                "grpc.max_reconnect_backoff_ms": RECONNECT_BACKOFF_MS_MAX,
            },
        )

    def __repr__(self) -> str:
        return f"EtcdCoordinator({self.endpoint!r})"

    @contextlib.contextmanager
    def _mapped(self, action: str, lease: int | None = None) -> Iterator[None]:
        """Turn aetcd's and gRPC's exceptions into the error tree, naming the endpoint."""
        if self._closed:
            raise InvalidState(f"etcd at {self.endpoint}: {action}: the coordinator is closed")
        try:
            yield
        except aetcd.exceptions.RevisionCompactedError as e:
            raise CursorExpired(
                f"etcd at {self.endpoint}: {action}: revisions before"
                f" {e.compacted_revision} were compacted; re-read and watch from there"
            ) from e
        except aetcd.exceptions.WatchTimeoutError as e:
            raise Unreachable(
                f"etcd at {self.endpoint}: {action}: no answer within {self._timeout_s} s"
            ) from e
        except (aetcd.exceptions.ClientError, aetcd.rpc.AioRpcError, TimeoutError) as e:
            raise self._translate(e, action, lease) from e

    def _translate(self, e: BaseException, action: str, lease: int | None) -> MemclusterError:
        # aetcd maps a few gRPC codes to its own classes and wraps the rest in a plain
        # ClientError whose __cause__ is the gRPC error; read the code from either.
        rpc = e if isinstance(e, aetcd.rpc.AioRpcError) else e.__cause__
        code = rpc.code().name if isinstance(rpc, aetcd.rpc.AioRpcError) else None
        details = str(rpc.details() if isinstance(rpc, aetcd.rpc.AioRpcError) else e)
        where = f"etcd at {self.endpoint}: {action}"
        if isinstance(e, TimeoutError) or code == "DEADLINE_EXCEEDED":
            return Unreachable(f"{where}: no answer within {self._timeout_s} s")
        if code in _UNREACHABLE_CODES or isinstance(
            e, aetcd.exceptions.ConnectionFailedError | aetcd.exceptions.ConnectionTimeoutError
        ):
            return Unreachable(f"{where}: unreachable ({details})")
        if code == "NOT_FOUND" and "lease" in details:
            which = f"lease {lease}" if lease is not None else "a lease"
            return LeaseExpired(f"{where}: {which} does not exist (expired or revoked)")
        if code == "RESOURCE_EXHAUSTED":
            return Overloaded(f"{where}: {details}")
        if code == "INVALID_ARGUMENT":
            return InvalidArgument(f"{where}: {details}")
        return MemclusterError(f"{where}: {details}")

    async def get(self, key: bytes) -> KeyValue | None:
        _check_key(key)
        with self._mapped("get"):
            kv = await self._client.get(key)
        return None if kv is None else _from_aetcd(kv)

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        _check_key(prefix, "prefix")
        with self._mapped("get_prefix"):
            found = await self._client.get_prefix(prefix, sort_order="ascend", sort_target="key")
        return [_from_aetcd(kv) for kv in found], int(found.header.revision)

    async def put(self, key: bytes, value: bytes, *, lease: int | None = None) -> int:
        _check_key(key)
        _check_lease_id(lease)
        with self._mapped("put", lease):
            reply = await self._client.put(key, value, lease=lease)
        return int(reply.header.revision)

    async def delete(self, key: bytes) -> bool:
        _check_key(key)
        with self._mapped("delete"):
            reply = await self._client.delete(key)
        return reply is not None

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> bool:
        _check_txn(compare, success, failure)
        t = self._client.transactions
        with self._mapped("txn"):
            succeeded, _ = await self._client.transaction(
                compare=[t.mod(c.key) == c.mod_revision for c in compare],
                success=[self._op(op) for op in success],
                failure=[self._op(op) for op in failure],
            )
        return bool(succeeded)

    def _op(self, op: Op) -> Any:
        t = self._client.transactions
        if isinstance(op, Put):
            return t.put(op.key, op.value, lease=op.lease or 0)
        return t.delete(op.key)

    async def grant_lease(self, ttl_s: float) -> int:
        ttl = _lease_ttl(ttl_s)
        with self._mapped("grant_lease"):
            lease = await self._client.lease(ttl)
        return int(lease.id)

    async def keepalive(self, lease: int) -> float:
        _check_lease_id(lease)
        with self._mapped("keepalive", lease):
            reply = await self._client.refresh_lease(lease)
        # etcd answers a keepalive of an unknown lease with TTL 0, not with an error.
        if reply is None or reply.TTL <= 0:
            raise LeaseExpired(
                f"etcd at {self.endpoint}: keepalive: lease {lease} does not exist"
                " (expired or revoked)"
            )
        return float(reply.TTL)

    async def revoke(self, lease: int) -> None:
        _check_lease_id(lease)
        with self._mapped("revoke", lease):
            await self._client.revoke_lease(lease)

    async def watch_prefix(
        self, prefix: bytes, start_revision: int | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        _check_key(prefix, "prefix")
        _check_start_revision(start_revision)
        with self._mapped("watch"):
            watch = await self._client.watch_prefix(prefix, start_revision=start_revision)
        try:
            events = aiter(watch)
            while not self._closed:
                with self._mapped("watch"):
                    try:
                        event = await anext(events)
                    except StopAsyncIteration:  # the client was closed
                        return
                kv = _from_aetcd(event.kv)
                kind: Literal["put", "delete"] = "put" if event.kind == "PUT" else "delete"
                yield WatchEvent(kind, kv, kv.mod_revision)
        finally:
            if not self._closed:
                # After a broken stream aetcd has dropped the watch already (ClientError), and
                # a concurrent close() leaves it without a watcher (AttributeError).
                with contextlib.suppress(aetcd.exceptions.ClientError, AttributeError):
                    await watch.cancel()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.close()


def _from_aetcd(kv: Any) -> KeyValue:
    return KeyValue(
        key=bytes(kv.key),
        value=bytes(kv.value),
        mod_revision=int(kv.mod_revision),
        create_revision=int(kv.create_revision),
        lease=int(kv.lease),
    )


# -- the in-memory twin -------------------------------------------------------------------


@dataclasses.dataclass
class _Lease:
    ttl_s: int
    deadline: float
    """Clock.monotonic() at which it ends."""
    keys: set[bytes]


class MemoryEtcd:
    """The twin's server: one store shared by the :class:`MemoryCoordinator` clients of one
    simulated cluster. Leases run on ``clock`` (monotonic time); they end when a client call
    or :meth:`tick` finds them past their deadline, so a test moves a ManualClock and then
    calls ``tick()`` (or any method) to see the expiry.

    ``min_lease_ttl_s`` is etcd's default minimum TTL. The watch history keeps at least the
    last ``history_events_max`` events; older revisions are compacted (a watch from them
    raises CursorExpired).
    """

    def __init__(
        self, clock: Clock, *, min_lease_ttl_s: int = 2, history_events_max: int = 100_000
    ) -> None:
        assert min_lease_ttl_s >= 1, min_lease_ttl_s
        assert history_events_max >= 1, history_events_max
        self.clock = clock
        self.revision = 1
        self.compacted = 0
        """Events of revisions <= this are gone from the history."""
        self._min_lease_ttl_s = min_lease_ttl_s
        self._history_events_max = history_events_max
        self._kvs: dict[bytes, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 1
        self._history: list[WatchEvent] = []
        self._waiters: set[asyncio.Future[None]] = set()

    def client(self) -> MemoryCoordinator:
        """A new client of this store (each can be partitioned on its own)."""
        return MemoryCoordinator(self)

    def tick(self) -> None:
        """End every lease whose deadline has passed, in deadline order (ties: by id)."""
        now = self.clock.monotonic()
        ended = sorted((lease.deadline, lid) for lid, lease in self._leases.items())
        for deadline, lid in ended:
            if deadline > now:
                break
            self._end_lease(lid)

    def validate(self) -> None:
        """Check the invariants; AssertionError names the broken one."""
        for key, kv in self._kvs.items():
            assert kv.key == key, f"{key!r} stored as {kv.key!r}"
            assert 0 < kv.create_revision <= kv.mod_revision <= self.revision, f"{kv} revisions"
            assert kv.lease == 0 or key in self._leases[kv.lease].keys, f"{key!r} not on lease"
        for lid, lease in self._leases.items():
            assert all(self._kvs[k].lease == lid for k in lease.keys), f"lease {lid} keys"
        revisions = [e.revision for e in self._history]
        assert revisions == sorted(revisions), "history out of order"
        assert all(self.compacted < r <= self.revision for r in revisions), "history range"

    # -- state changes, each one request (the caller checked reachability and arguments) --

    def _check_leases(self, ops: Sequence[Op], action: str) -> None:
        for op in ops:
            if isinstance(op, Put) and op.lease is not None and op.lease not in self._leases:
                raise LeaseExpired(
                    f"etcd at memory: {action}: lease {op.lease} does not exist"
                    " (expired or revoked)"
                )

    def _apply(self, ops: Sequence[Op]) -> None:
        """Apply ``ops`` as one request: at most one new revision."""
        revision = self.revision + 1
        events: list[WatchEvent] = []
        for op in ops:
            old = self._kvs.get(op.key)
            if old is not None and old.lease:
                self._leases[old.lease].keys.discard(op.key)
            if isinstance(op, Put):
                lease = op.lease or 0
                created = old.create_revision if old is not None else revision
                kv = KeyValue(op.key, op.value, revision, created, lease)
                self._kvs[op.key] = kv
                if lease:
                    self._leases[lease].keys.add(op.key)
                events.append(WatchEvent("put", kv, revision))
            elif old is not None:
                del self._kvs[op.key]
                events.append(WatchEvent("delete", KeyValue(op.key, b"", revision, 0, 0), revision))
        if events:
            self.revision = revision
            self._history.extend(events)
            self._compact()
            self._notify()

    def _end_lease(self, lid: int) -> None:
        lease = self._leases.pop(lid)
        # Detach first, so _apply does not look the ended lease up.
        keys = sorted(lease.keys)
        for key in keys:
            self._kvs[key] = msgspec.structs.replace(self._kvs[key], lease=0)
        self._apply([Delete(key) for key in keys])

    def _compact(self) -> None:
        excess = len(self._history) - self._history_events_max
        if excess <= 0:
            return
        # Drop down to half the limit at once (amortized O(1)), at a revision boundary.
        cut = len(self._history) - self._history_events_max // 2
        while cut < len(self._history) and self._history[cut].revision == (
            self._history[cut - 1].revision
        ):
            cut += 1
        self.compacted = self._history[cut - 1].revision
        del self._history[:cut]

    def _mod_revision(self, key: bytes) -> int:
        kv = self._kvs.get(key)
        return 0 if kv is None else kv.mod_revision

    def _events_since(self, revision: int, prefix: bytes) -> list[WatchEvent]:
        start = bisect.bisect_left(self._history, revision, key=lambda e: e.revision)
        return [e for e in self._history[start:] if e.kv.key.startswith(prefix)]

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def _changed(self) -> None:
        """Wait until the next change (or a client's partition or close)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)


class MemoryCoordinator:
    """A :class:`Coordinator` client of a :class:`MemoryEtcd`, with fault injection:
    :meth:`partition` makes every call, and every watch at its next step, raise Unreachable
    (nothing is applied) until :meth:`heal`. Leases keep running on the server meanwhile, as
    they would in etcd."""

    def __init__(self, server: MemoryEtcd) -> None:
        self.server = server
        self.partitioned = False
        self._closed = False

    def __repr__(self) -> str:
        return "MemoryCoordinator()"

    def partition(self) -> None:
        """Cut this client off from the store."""
        self.partitioned = True
        self.server._notify()

    def heal(self) -> None:
        """Reconnect this client."""
        self.partitioned = False

    def _enter(self, action: str) -> MemoryEtcd:
        if self._closed:
            raise InvalidState(f"etcd at memory: {action}: the coordinator is closed")
        if self.partitioned:
            raise Unreachable(f"etcd at memory: {action}: unreachable (partitioned)")
        self.server.tick()
        return self.server

    async def get(self, key: bytes) -> KeyValue | None:
        _check_key(key)
        return self._enter("get")._kvs.get(key)

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        _check_key(prefix, "prefix")
        server = self._enter("get_prefix")
        found = sorted(
            (kv for key, kv in server._kvs.items() if key.startswith(prefix)), key=lambda kv: kv.key
        )
        return found, server.revision

    async def put(self, key: bytes, value: bytes, *, lease: int | None = None) -> int:
        _check_key(key)
        _check_lease_id(lease)
        server = self._enter("put")
        ops = [Put(key, value, lease)]
        server._check_leases(ops, "put")
        server._apply(ops)
        return server.revision

    async def delete(self, key: bytes) -> bool:
        _check_key(key)
        server = self._enter("delete")
        existed = key in server._kvs
        server._apply([Delete(key)])
        return existed

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> bool:
        _check_txn(compare, success, failure)
        server = self._enter("txn")
        held = all(server._mod_revision(c.key) == c.mod_revision for c in compare)
        ops = success if held else failure
        server._check_leases(ops, "txn")
        server._apply(ops)
        return held

    async def grant_lease(self, ttl_s: float) -> int:
        server = self.server
        ttl = _lease_ttl(ttl_s, server._min_lease_ttl_s)
        self._enter("grant_lease")
        lid = server._next_lease
        server._next_lease += 1
        server._leases[lid] = _Lease(ttl, server.clock.monotonic() + ttl, set())
        return lid

    def _lease(self, lid: int, action: str) -> _Lease:
        _check_lease_id(lid)
        lease = self._enter(action)._leases.get(lid)
        if lease is None:
            raise LeaseExpired(
                f"etcd at memory: {action}: lease {lid} does not exist (expired or revoked)"
            )
        return lease

    async def keepalive(self, lease: int) -> float:
        found = self._lease(lease, "keepalive")
        found.deadline = self.server.clock.monotonic() + found.ttl_s
        return float(found.ttl_s)

    async def revoke(self, lease: int) -> None:
        self._lease(lease, "revoke")
        self.server._end_lease(lease)

    async def watch_prefix(
        self, prefix: bytes, start_revision: int | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        _check_key(prefix, "prefix")
        _check_start_revision(start_revision)
        server = self._enter("watch")
        following = server.revision + 1 if start_revision is None else start_revision
        while True:
            if self._closed:
                return
            if self.partitioned:
                raise Unreachable("etcd at memory: watch: unreachable (partitioned)")
            if following <= server.compacted:
                raise CursorExpired(
                    f"etcd at memory: watch: revisions up to {server.compacted} were"
                    f" compacted (asked for {following}); re-read and watch from there"
                )
            batch = server._events_since(following, prefix)
            following = max(following, server.revision + 1)
            for event in batch:
                if self._closed:
                    return
                if self.partitioned:
                    raise Unreachable("etcd at memory: watch: unreachable (partitioned)")
                yield event
            if not batch:
                await server._changed()

    async def close(self) -> None:
        self._closed = True
        self.server._notify()


# -- election -----------------------------------------------------------------------------


async def campaign(coord: Coordinator, key: bytes, node_id: str, lease: int) -> bool:
    """Try once to hold the election ``key``: put ``node_id`` there on ``lease`` if the key is
    absent. True if this node holds it now, also when it held it already with this lease, so
    retrying after Unreachable is safe. The holder keeps it while it keeps the lease alive;
    it resigns by revoking the lease (or deleting the key). Others watch the key and campaign
    again when it is deleted."""
    value = node_id.encode()
    if await coord.txn([Compare(key, 0)], [Put(key, value, lease)]):
        return True
    held = await coord.get(key)
    return held is not None and held.value == value and held.lease == lease


async def leader(coord: Coordinator, key: bytes) -> str | None:
    """The node id holding the election ``key``, or None if nobody does."""
    held = await coord.get(key)
    return None if held is None else held.value.decode()
