"""Replicated shards on a node (DESIGN.md §6): the driver of the sans-IO
:class:`memcluster.replication.leader.Replica` for each shard of a collection with
``replication_factor > 1``.

* **The log is the shard's WAL** (:class:`ShardLog`): one WAL record is one entry. Which
  epoch wrote each entry comes from a small file next to the shard (:class:`EpochHistory`,
  like Kafka's leader-epoch checkpoint): ``(epoch, first seq)`` pairs, written and fsynced
  before the first record of a new epoch. It also keeps the highest epoch the replica
  adopted, so a restart cannot forget a fence.
* **On the leader**, every record the shard writes reaches the replica through
  ``Shard.on_written`` (under the shard's lock, so in log order); the replica sends it to the
  followers, pipelined and batched. The writer then waits (:meth:`ReplicaDriver.wait`) until
  the collection's ``ack`` is met. Strong reads wait until what they could see is
  acknowledged (:meth:`ReplicaDriver.barrier`).
* **On a follower**, the leader's ``repl.append`` requests are applied to the shard, made
  durable, and acknowledged in the reply.
* **In-sync changes** that the leader proposes are etcd txns on the shard's entry,
  conditioned on its mod revision; the new entry comes back through the shard map's watch.
* **A follower whose log diverged** (it led an epoch whose last writes were never
  acknowledged) or that fell behind what the leader's WAL still holds copies the shard again
  from the leader: snapshot plus log tail, as a move does (``repl.resync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import msgspec

from memcluster.cluster import wire
from memcluster.cluster.coordinator import Compare, Coordinator, Put
from memcluster.cluster.host import Hosted, State, shard_name
from memcluster.cluster.keys import ShardAssignment, assignment_key, encode
from memcluster.core.codec import Record, decode_record, encode_record
from memcluster.core.errors import (
    CursorExpired,
    MemclusterError,
    ShardUnavailable,
    Timeout,
    WrongNode,
)
from memcluster.replication.leader import (
    Ack,
    Action,
    Append,
    AppendAck,
    Config,
    ConfigUpdate,
    Entry,
    Gone,
    Propose,
    Receive,
    Replica,
    Send,
    Status,
    StatusRequest,
    Tick,
    Write,
)
from memcluster.storage.files import fsync_path

log = logging.getLogger("memcluster.replication")

TICK_S = 0.1
"""How often a leader checks for late followers and re-sends what may have been lost."""

ACK_TIMEOUT_S = 2.0
"""A follower that acknowledges nothing for this long leaves the in-sync set."""

WRITE_TIMEOUT_S = 10.0
"""Longest a write waits for its acknowledgements before failing with Timeout."""

CACHE_ENTRIES = 4096
CACHE_BYTES = 32 << 20
"""Recent entries kept in memory (at most this many, and bytes), so followers that keep up
are fed without reading the WAL."""

ShardId = tuple[str, int]


class Replicable(Protocol):
    """What a replicated shard offers its driver: a collection shard
    (:class:`~memcluster.shard.shard.Shard`) or the coordination shard
    (:class:`~memcluster.shard.coord.CoordShard`)."""

    lock: threading.Lock
    on_written: Callable[[Record], None] | None
    visible_upto: Callable[[], int] | None

    @property
    def applied_seq(self) -> int: ...

    def records_after(self, after_seq: int, limit: int) -> list[Record]: ...

    def write_replicated(self, record: Record) -> int: ...

    def commit(self, token: int) -> None: ...

    def wal_first_seq(self) -> int: ...

    def notify_feed(self) -> None: ...


class Diverged(Exception):
    """This replica's log holds entries the leader's does not (an old leader's, never
    acknowledged): the shard must be copied again."""


class EpochHistory:
    """Which epoch wrote which part of a shard's log, and the highest epoch adopted.

    A JSON file ``{"adopted": E, "epochs": [[epoch, first_seq], ...]}``, replaced atomically
    (write, fsync, rename, fsync the directory) whenever it changes, which is once per epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.adopted = 0
        self.epochs: list[tuple[int, int]] = []
        if path.exists():
            data = msgspec.json.decode(path.read_bytes())
            self.adopted = int(data["adopted"])
            self.epochs = [(int(e), int(s)) for e, s in data["epochs"]]

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        payload = {"adopted": self.adopted, "epochs": self.epochs}
        with tmp.open("wb") as f:
            f.write(msgspec.json.encode(payload))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        fsync_path(self.path.parent)

    def epoch_at(self, seq: int) -> int:
        """The epoch of the entry holding ``seq`` (0 before any)."""
        found = 0
        for epoch, first in self.epochs:
            if first > seq:
                break
            found = epoch
        return found

    def note(self, first: int, epoch: int) -> None:
        """Entries from ``first`` on are (or will be) of ``epoch``."""
        if self.epochs and self.epochs[-1][0] == epoch and self.epochs[-1][1] <= first:
            return
        self.epochs = [(e, s) for e, s in self.epochs if s < first]
        self.epochs.append((epoch, first))
        self.adopted = max(self.adopted, epoch)
        self._save()

    def adopt(self, epoch: int) -> None:
        if epoch > self.adopted:
            self.adopted = epoch
            self._save()

    def replace(self, epochs: list[tuple[int, int]], upto: int) -> None:
        """Take the leader's history for a log copied from it up to seq ``upto``."""
        self.epochs = [(e, s) for e, s in epochs if s <= upto]
        self._save()


class ShardLog:
    """A shard's WAL as the replica's :class:`~memcluster.replication.leader.Log`. Called
    with the driver's lock held (and, for appends on a follower, the shard's)."""

    def __init__(self, shard: Replicable, history: EpochHistory) -> None:
        self.shard = shard
        self.history = history
        self.token = -1
        """WAL token of the last record appended as a follower (the driver commits it)."""
        self._recent: deque[Entry] = deque()
        self._recent_bytes = 0

    def last(self) -> tuple[int, int]:
        seq = self.shard.applied_seq
        return (seq, self.history.epoch_at(seq) if seq else 0)

    def epoch_at(self, seq: int) -> int | None:
        if seq == 0:
            return 0
        if seq > self.shard.applied_seq:
            return None
        return self.history.epoch_at(seq)

    def after(self, seq: int, limit: int) -> list[Entry]:
        recent = self._recent
        if recent and recent[0].first <= seq + 1 <= recent[-1].seq:
            start = next(i for i, e in enumerate(recent) if e.seq > seq)
            return [recent[i] for i in range(start, min(len(recent), start + limit))]
        try:
            records = self.shard.records_after(seq, limit)
        except CursorExpired:
            return []  # compacted away: the driver sends a resync instead
        return [self._entry(r) for r in records]

    def _entry(self, record: Record) -> Entry:
        return Entry(
            record.last_seq,
            self.history.epoch_at(record.last_seq),
            encode_record(record),
            len(record.ops),
        )

    def append(self, entry: Entry) -> None:
        if entry.seq > self.shard.applied_seq:  # a follower: the leader's record
            self.history.note(entry.first, entry.epoch)
            self.token = self.shard.write_replicated(decode_record(entry.payload))
        recent = self._recent
        if recent and recent[-1].seq >= entry.seq:
            recent.clear()
            self._recent_bytes = 0
        recent.append(entry)
        self._recent_bytes += len(entry.payload)
        while len(recent) > CACHE_ENTRIES or (self._recent_bytes > CACHE_BYTES and recent):
            self._recent_bytes -= len(recent.popleft().payload)

    def truncate(self, seq: int) -> None:
        if seq < self.shard.applied_seq:
            raise Diverged(f"entries after seq {seq} differ from the leader's")


def _config(assignment: ShardAssignment, revision: int) -> Config:
    return Config(
        version=revision,
        epoch=assignment.epoch,
        leader=assignment.leader,
        replicas=assignment.replicas,
        in_sync=assignment.in_sync,
    )


class ReplicaDriver:
    """Drives one replicated shard's replica on this node. Thread-safe: the shard's writers,
    the peer handlers and the event loop all call in."""

    def __init__(
        self,
        *,
        node_id: str,
        shard_id: ShardId,
        hosted: Hosted,
        shard: Replicable,
        assignment: ShardAssignment,
        revision: int,
        ack: Ack,
        cluster: str,
        coord: Coordinator,
        peer_url: Callable[[str], str | None],
        request: Callable[..., Awaitable[msgspec.Struct]],
        resync: Callable[[ShardId, str], None],
        loop: asyncio.AbstractEventLoop,
        lease_valid: Callable[[], bool] = lambda: True,
        on_role: Callable[[bool], None] = lambda leading: None,
        chain: bool = False,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.node_id = node_id
        self.shard_id = shard_id
        self.name = shard_name(shard_id)
        self.hosted = hosted
        self.shard = shard
        self.cluster = cluster
        self.coord = coord
        self._peer_url = peer_url
        self._request = request
        self._resync = resync
        self.loop = loop
        self.write_timeout_s = write_timeout_s
        self.lease_valid = lease_valid
        self._on_role = on_role
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.history = EpochHistory(hosted.path / "epochs.json")
        self.log = ShardLog(shard, self.history)
        self.replica = Replica(
            node_id,
            _config(assignment, revision),
            ack=ack,
            ack_timeout=ack_timeout_s,
            log=self.log,
            epoch=self.history.adopted,
            chain=chain,
        )
        self.resyncing = False
        self._down: tuple[frozenset[str], bool, int] = (frozenset(), False, 0)
        self._closed = False
        self._notified = 0
        self._tasks: set[asyncio.Future[None]] = set()
        shard.on_written = self._written
        shard.visible_upto = self._visible
        hosted.replication = self
        self._ticker = asyncio.run_coroutine_threadsafe(self._tick_forever(), loop)

    # -- the leader's writers --------------------------------------------------------------

    def _written(self, record: Record) -> None:
        """The shard wrote ``record`` (we hold its lock): replicate it."""
        write = Write(record.last_seq, encode_record(record), len(record.ops), record.last_seq)
        with self._lock:
            actions = self.replica.handle(write)
        self._act(actions)

    def _visible(self) -> int:
        """What the change feed may deliver (the shard's lock is held)."""
        with self._lock:
            return self.replica.committed()

    def wait(self, seq: int, ack: Ack | None = None, w: int | None = None) -> None:
        """``w`` is for ``multi`` shards (the router refuses it for others)."""
        deadline = time.monotonic() + self.write_timeout_s
        if self._closed:
            raise WrongNode(
                f"shard {self.name}: this node stopped replicating it (it is shutting down,"
                " or its copy is being replaced); the write may or may not have been applied:"
                " route again"
            )
        with self._changed:
            while self.replica.committed(ack) < seq:
                r = self.replica
                if not (r.is_leader or (r.chain and r.is_tail)) or self._closed:
                    raise WrongNode(
                        f"shard {self.name}: this node stopped leading it (now epoch"
                        f" {self.replica.epoch}) before the write was acknowledged; it may or"
                        " may not have been applied: route again (writes with an idempotency"
                        " key are safe to resend)"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(
                        f"shard {self.name}: the write at seq {seq} was not acknowledged by"
                        f" the replicas within {self.write_timeout_s:g} s (committed up to"
                        f" {self.replica.committed()}); it may or may not be applied"
                    )
                self._changed.wait(min(left, 0.05))

    def barrier(self) -> None:
        if not self.lease_valid():
            raise ShardUnavailable(
                f"shard {self.name}: this node cannot confirm its etcd lease, so another"
                " replica may lead the shard by now: no strong read here; retry (the router"
                " finds the leader) or read with consistency='eventual'"
            )
        target = self.shard.applied_seq
        if target:
            self.wait(target)

    # -- actions ---------------------------------------------------------------------------

    def _act(self, actions: list[Action]) -> None:
        """Carry out the replica's actions (any thread); replies are read by ``wait``."""
        with self._changed:
            self._changed.notify_all()
            if self.replica.epoch > self.history.adopted:
                self.history.adopt(self.replica.epoch)
            committed = self.replica.committed()
            advanced = committed > self._notified
            self._notified = committed
        if advanced and not self._closed:  # the change feed may deliver more now
            self.loop.call_soon_threadsafe(self.shard.notify_feed)
        for action in actions:
            if isinstance(action, Send) and isinstance(action.message, Append):
                self._spawn(self._send(action.to, action.message))
            elif isinstance(action, Send) and isinstance(action.message, AppendAck):
                self._spawn(self._send_ack(action.to, action.message))  # chain: upstream
            elif isinstance(action, Propose):
                self._spawn(self._propose(action))

    def _spawn(self, job: Awaitable[None]) -> None:
        async def run() -> None:
            await job

        def start() -> None:
            if self._closed:
                return
            task = asyncio.ensure_future(run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self.loop.call_soon_threadsafe(start)

    async def _send(self, to: str, message: Append) -> None:
        url = self._peer_url(to)
        if url is None:
            return  # its node is down: the next tick's probe tries again
        if not message.entries and message.prev[0] < message.leader_last:
            await self._send_resync(to, url)
            return
        body = wire.ReplAppend(
            collection=self.shard_id[0], shard=self.shard_id[1], sender=self.node_id, append=message
        )
        try:
            reply = await self._request(url, "repl.append", body, AppendAck, timeout_s=5.0)
        except MemclusterError as exc:
            log.debug("shard %s: append to %s failed: %s", self.name, to, exc)
            return
        assert isinstance(reply, AppendAck)
        with self._lock:
            actions = self.replica.handle(Receive(to, reply))
        self._act(actions)

    async def _send_ack(self, to: str, message: AppendAck) -> None:
        """Chain: tell the predecessor how far the tail is (it passes it on to the head)."""
        url = self._peer_url(to)
        if url is None:
            return
        body = wire.ReplAck(
            collection=self.shard_id[0], shard=self.shard_id[1], sender=self.node_id, ack=message
        )
        try:
            await self._request(url, "repl.ack", body, wire.Done, timeout_s=5.0)
        except MemclusterError as exc:
            log.debug("shard %s: chain ack to %s failed: %s", self.name, to, exc)

    def on_ack(self, b: wire.ReplAck) -> wire.Done:
        """Chain: the successor's news of the tail's position."""
        with self._lock:
            actions = self.replica.handle(Receive(b.sender, b.ack))
        self._act(actions)
        return wire.Done()

    def serves_strong(self) -> bool:
        """Whether strong reads are served here: the leader, or a chain's tail."""
        with self._lock:
            return self.replica.is_tail if self.replica.chain else self.replica.is_leader

    async def _send_resync(self, to: str, url: str) -> None:
        """Our WAL no longer holds what ``to`` lacks: it copies the shard from us."""
        own = self._peer_url(self.node_id)
        if own is None:
            return
        log.warning("shard %s: %s is behind what the log holds; it copies the shard", self.name, to)
        body = wire.ReplResync(collection=self.shard_id[0], shard=self.shard_id[1], source=own)
        with contextlib.suppress(MemclusterError):
            await self._request(url, "repl.resync", body, wire.Done, timeout_s=5.0)

    async def _propose(self, p: Propose) -> None:
        c = p.config
        entry = ShardAssignment(
            epoch=c.epoch, replicas=c.replicas, leader=c.leader, in_sync=c.in_sync
        )
        key = assignment_key(self.cluster, self.shard_id)
        try:
            done = await self.coord.txn([Compare(key, p.expected)], [Put(key, encode(entry))])
        except MemclusterError as exc:
            log.warning("shard %s: in-sync change failed: %s", self.name, exc)
            done = False
        if done:
            log.info("shard %s: in-sync set is now %s", self.name, ", ".join(c.in_sync))
        else:  # the map moved on: the watch brings the new entry; let the replica propose again
            with self._lock:
                actions = self.replica.handle(ConfigUpdate(self.replica.config))
            self._act(actions)

    async def _tick_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(TICK_S)
            with self._lock:  # followers too: a new leader's clock must be current
                actions = self.replica.handle(Tick(time.monotonic()))
            self._act(actions)

    # -- the map and the peers -------------------------------------------------------------

    def nodes_down(self, down: frozenset[str]) -> None:
        """The shard's replicas whose nodes are not in the cluster now: a leader stops
        waiting for them at once (a follower that stopped gracefully costs no write a
        timeout)."""
        with self._lock:
            seen = (down, self.replica.is_leader, self.replica.epoch)
            if seen == self._down:
                return
            self._down = seen
            actions = self.replica.handle(Gone(down))
        self._act(actions)

    def update(self, assignment: ShardAssignment, revision: int) -> State:
        """A new shard-map entry: returns the state the host should give the shard. (Not
        under the shard's lock: a writer may hold it while waiting for acknowledgements.)"""
        with self._lock:
            was_leader = self.replica.is_leader
            actions = self.replica.handle(ConfigUpdate(_config(assignment, revision)))
            leader = self.replica.is_leader
            if leader and self.history.epoch_at(self.shard.applied_seq + 1) != self.replica.epoch:
                # Records written from here on are of this epoch (noted before any is).
                self.history.note(self.shard.applied_seq + 1, self.replica.epoch)
                log.info("shard %s: leading epoch %d", self.name, self.replica.epoch)
        self._act(actions)
        if leader != was_leader:
            self._on_role(leader)
        return State.ACTIVE if leader else State.FOLLOWER

    def on_append(self, b: wire.ReplAppend) -> AppendAck:
        """A leader's entries (on the peer pool): apply, make durable, acknowledge."""
        if self.resyncing:
            raise WrongNode(f"shard {self.name} is being copied again here; retry shortly")
        with self.shard.lock, self._lock:
            self.log.token = -1
            try:
                actions = self.replica.handle(Receive(b.sender, b.append))
            except Diverged as exc:
                log.warning("shard %s: %s; copying it again from %s", self.name, exc, b.sender)
                self.resyncing = True
                url = self._peer_url(b.sender)
                if url is not None:
                    self._resync(self.shard_id, url)
                raise WrongNode(f"shard {self.name} diverged here and is being copied") from None
            token = self.log.token
            epoch = self.replica.epoch
            last = self.replica.last[0]
        if token >= 0:
            self.shard.commit(token)  # durable before acknowledged
        reply = next(
            (
                a.message
                for a in actions
                if isinstance(a, Send) and isinstance(a.message, AppendAck) and a.to == b.sender
            ),
            None,
        )
        self._act([a for a in actions if not (isinstance(a, Send) and a.message is reply)])
        if reply is not None:
            return reply
        # Fenced (an older epoch's leader): our epoch tells it to step down.
        return AppendAck(epoch=epoch, node=self.node_id, ok=False, last_seq=last)

    def on_status(self, b: wire.ReplStatus) -> Status:
        """The controller's failover question: adopt its epoch (durably), say how far we are."""
        with self._lock:
            actions = self.replica.handle(Receive("controller", b.request))
        self._act(actions)  # persists the adopted epoch before we answer
        for action in actions:
            if isinstance(action, Send) and isinstance(action.message, Status):
                return action.message
        raise AssertionError(actions)  # pragma: no cover: a StatusRequest always answers

    def info(self) -> wire.ReplicaInfo:
        """Role, epoch, last seq, committed seq and each follower's acknowledged seq."""
        with self._lock:
            r = self.replica
            return wire.ReplicaInfo(
                collection=self.shard_id[0],
                shard=self.shard_id[1],
                epoch=r.epoch,
                leading=r.is_leader,
                last=r.last[0],
                committed=r.committed(),
                acked=r.follower_acks(),
                state=self.hosted.state.value,
            )

    def close(self) -> None:
        """Stop driving (the shard leaves the node, or the node stops). The shard stops
        taking writes first, and the driver stays attached, so a write already past the
        gate fails in :meth:`wait` (WrongNode) instead of being acknowledged unreplicated;
        a new driver replaces it."""
        self.hosted.state = State.FOLLOWER  # refuse writes from here on
        self._closed = True
        self._ticker.cancel()
        self.shard.visible_upto = lambda: 0  # nothing new for the change feed here
        for task in list(self._tasks):
            self.loop.call_soon_threadsafe(task.cancel)
        with self._changed:
            self._changed.notify_all()


__all__ = ["Diverged", "EpochHistory", "ReplicaDriver", "ShardLog", "StatusRequest"]
