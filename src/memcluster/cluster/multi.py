"""Multi-leader shards on a node (``replication="multi"``, DESIGN.md §6): the driver of
:class:`memcluster.replication.multi.MultiSync` for each replica held here.

Every replica of a ``multi`` shard is ACTIVE: it takes writes, stamps them
(:mod:`memcluster.shard.lww`) and acknowledges them once ``W`` replicas hold them (``ack``:
"all" = every replica, "majority", "leader" = this one alone). The driver pushes new records
to the peers at once and pulls from each peer every ``interval_s`` (anti-entropy), over
``multi.push`` and ``multi.pull`` on the binary protocol. No leader orders writes; the shard
map's ``leader`` is only the replica that admits new replicas into the in-sync set (once one
has everything it had when it checked) and serves the change feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable

import msgspec

from memcluster.cluster import wire
from memcluster.cluster.coordinator import Compare, Coordinator, Put
from memcluster.cluster.host import Hosted, State, shard_name
from memcluster.cluster.keys import ShardAssignment, assignment_key, encode
from memcluster.core.codec import Record
from memcluster.core.errors import InvalidArgument, MemclusterError, Timeout, WrongNode
from memcluster.replication.multi import (
    Exchange,
    Kind,
    MultiSync,
    PullReply,
    answer_pull,
    answer_push,
    write_quorum,
)
from memcluster.shard.shard import Shard

log = logging.getLogger("memcluster.multi")

ShardId = tuple[str, int]

BATCH_RECORDS = 256
"""Most records (or state-page keys) in one push or pull."""
INTERVAL_S = 0.5
"""How often each peer is pulled from when nothing else happens (anti-entropy)."""
WRITE_TIMEOUT_S = 10.0
"""How long a write waits for ``W`` copies before it reports a timeout (it stays written
here and reaches the others later)."""
EXCHANGE_TIMEOUT_S = 5.0


class MultiDriver:
    """Runs one ``multi`` replica's exchanges on the node's loop; :meth:`wait` is called on
    request threads."""

    def __init__(
        self,
        *,
        node_id: str,
        shard_id: ShardId,
        hosted: Hosted,
        shard: Shard,
        assignment: ShardAssignment,
        revision: int,
        ack: str,
        cluster: str,
        coord: Coordinator,
        peer_url: Callable[[str], str | None],
        request: Callable[..., Awaitable[msgspec.Struct]],
        loop: asyncio.AbstractEventLoop,
        interval_s: float = INTERVAL_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        assert shard.lww is not None, "a multi driver needs a replication='multi' shard"
        self.node_id = node_id
        self.shard_id = shard_id
        self.name = shard_name(shard_id)
        self.hosted = hosted
        self.shard = shard
        self.cluster = cluster
        self.coord = coord
        self.ack = ack
        self.loop = loop
        self.write_timeout_s = write_timeout_s
        self._peer_url = peer_url
        self._request = request
        # A new origin name for every replica instance (this node, this opening): a replica
        # dropped and created again here, or one that lost unsynced records in a crash,
        # never numbers new writes with an (origin, oseq) that peers hold already.
        self.origin = f"{node_id}~{secrets.token_hex(4)}"
        with shard.lock:
            shard.lww.me = self.origin
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.sync = MultiSync(
            node_id, list(assignment.replicas), origin=self.origin, interval_s=interval_s
        )
        self.assignment = assignment
        self.revision = revision
        self._closed = False
        self._down: frozenset[str] = frozenset()
        self._proposing = False
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        shard.on_written = self._written
        hosted.replication = self
        self._runner = asyncio.run_coroutine_threadsafe(self._run(), loop)

    # -- writers (request threads) -------------------------------------------------------------

    def _written(self, record: Record) -> None:
        """The shard wrote ``record`` here first (we hold its lock): push it."""
        with self._lock:
            self.sync.wrote()
        self.loop.call_soon_threadsafe(self._wake.set)

    def wait(self, seq: int, ack: object = None, w: int | None = None) -> None:
        """Block until the write that ended at ``seq`` is on ``W`` replicas: ``w``, else
        as ``ack`` (else the collection's) says: "all" is every replica whose node is up (a
        dead node's replica leaves the count once its etcd lease ends, as a dead follower
        leaves the in-sync set), "majority" a majority of all replicas, up or not."""
        policy = self.ack if ack is None else str(getattr(ack, "value", ack))
        with self._lock:
            replicas = len(self.sync.peers) + 1
        if w is not None and w > replicas:
            raise InvalidArgument(
                f"w={w}: shard {self.name} has {replicas} replicas; give 1 to {replicas}"
            )
        label = f"ack={policy!r}" if w is None else f"w={w}"

        def quorum() -> int:  # under self._lock: the peers and the down set may change
            if w is not None:
                return w
            every = len(self.sync.peers) + 1
            up = every - len(self._down & set(self.sync.peers))
            return write_quorum(policy, up if policy == "all" else every)

        with self._lock:
            if quorum() <= 1:
                return
        with self.shard.lock:
            assert self.shard.lww is not None
            oseq = self.shard.lww.own_upto(seq)
        deadline = time.monotonic() + self.write_timeout_s
        with self._changed:
            while (copies := self.sync.copies(oseq)) < (need := quorum()):
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise Timeout(
                        f"shard {self.name}: the write is on {copies} of {replicas} replicas,"
                        f" {label} needs {need}"
                        f"{'' if not self._closed else ' (this node stopped replicating it)'};"
                        " it stays written and reaches the others when they answer. Use"
                        " ack='majority' or a lower w to need fewer copies"
                    )
                self._changed.wait(min(left, 0.05))

    def barrier(self) -> None:
        """Nothing to wait for: a ``multi`` replica serves no strong reads."""

    def serves_strong(self) -> bool:
        return False

    # -- the exchanges (the loop) --------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closed:
            with self._lock:
                due = self.sync.due(time.monotonic())
            for exchange in due:
                task = asyncio.create_task(self._exchange(exchange))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)
            self._wake.clear()

    async def _exchange(self, exchange: Exchange) -> None:
        loop = asyncio.get_running_loop()
        url = self._peer_url(exchange.peer)
        try:
            if url is None:
                raise WrongNode(f"{exchange.peer} is not in the cluster map")
            coll, number = self.shard_id
            if exchange.kind is Kind.PUSH:
                with self._lock:
                    known = self.sync.known(exchange.peer) or {}
                records = await loop.run_in_executor(None, self.shard.missing, known, BATCH_RECORDS)
                if records is None:  # the peer needs a state transfer: its pulls bring it
                    with self._lock:
                        self.sync.done(exchange, time.monotonic(), known)
                    return
                body = wire.MultiPush(
                    collection=coll, shard=number, sender=self.node_id, records=records
                )
                reply = await self._request(
                    url, "multi.push", body, wire.VersionVector, EXCHANGE_TIMEOUT_S
                )
                assert isinstance(reply, wire.VersionVector)
                with self._lock:
                    self.sync.done(exchange, time.monotonic(), reply.vv)
            else:
                vv = await loop.run_in_executor(None, self.shard.version_vector)
                with self._lock:
                    request = self.sync.pull_request(exchange.peer, vv)
                pull = wire.MultiPull(
                    collection=coll, shard=number, sender=self.node_id, request=request
                )
                got = await self._request(url, "multi.pull", pull, PullReply, EXCHANGE_TIMEOUT_S)
                assert isinstance(got, PullReply)
                with self._lock:
                    records = self.sync.records_of(exchange, got, time.time())
                if records:
                    await loop.run_in_executor(None, self.shard.apply_remote, records)
                with self._lock:
                    self.sync.pulled(exchange, got, time.monotonic(), BATCH_RECORDS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one failed exchange must not stop the others
            with self._lock:
                self.sync.failed(exchange, time.monotonic())
            if isinstance(exc, MemclusterError | OSError):
                log.debug("shard %s: %s with %s failed: %s", self.name, exchange.kind, url, exc)
            else:
                log.exception("shard %s: %s with %s failed", self.name, exchange.kind, url)
        with self._changed:
            self._changed.notify_all()
        self._wake.set()
        await self._admit()

    async def _admit(self) -> None:
        """On the map's ``leader``: propose into the in-sync set each replica that holds
        everything this one holds (a new replica, once its transfer is done)."""
        a = self.assignment
        if a.leader != self.node_id or self._proposing or set(a.in_sync) >= set(a.replicas):
            return
        vv = await asyncio.get_running_loop().run_in_executor(None, self.shard.version_vector)
        with self._lock:
            ready = [
                p
                for p in a.replicas
                if p not in a.in_sync
                and (known := self.sync.known(p)) is not None
                and all(known.get(o, 0) >= n for o, n in vv.items())
            ]
        if not ready:
            return
        entry = msgspec.structs.replace(a, in_sync=(*a.in_sync, *ready))
        key = assignment_key(self.cluster, self.shard_id)
        self._proposing = True
        try:
            if await self.coord.txn([Compare(key, self.revision)], [Put(key, encode(entry))]):
                log.info("shard %s: in sync now: %s", self.name, ", ".join(entry.in_sync))
        except MemclusterError as exc:
            log.warning("shard %s: in-sync change failed: %s", self.name, exc)
        finally:
            self._proposing = False

    # -- answering peers (the peer pool) -------------------------------------------------------

    def on_push(self, b: wire.MultiPush) -> wire.VersionVector:
        self._alive(b.sender)
        return wire.VersionVector(answer_push(self.shard, b.records))

    def on_pull(self, b: wire.MultiPull) -> PullReply:
        self._alive(b.sender)
        return answer_pull(self.shard, b.request, BATCH_RECORDS)

    def _alive(self, peer: str) -> None:
        with self._lock:
            self.sync.alive(peer)
        self.loop.call_soon_threadsafe(self._wake.set)

    # -- the map -------------------------------------------------------------------------------

    def nodes_down(self, down: frozenset[str]) -> None:
        """The shard's replicas whose nodes are not in the cluster now."""
        with self._changed:
            for peer in self._down - down:
                self.sync.alive(peer)  # back in the cluster
            self._down = down
            self._changed.notify_all()
        self.loop.call_soon_threadsafe(self._wake.set)

    def update(self, assignment: ShardAssignment, revision: int) -> State:
        """A new shard-map entry: the peers may have changed. Every replica takes writes."""
        with self._lock:
            self.sync.set_peers(list(assignment.replicas))
            self.assignment = assignment
            self.revision = revision
        self.loop.call_soon_threadsafe(self._wake.set)
        return State.ACTIVE

    async def flush(self, timeout_s: float) -> bool:
        """Push until every peer that is up holds everything this replica holds (before it
        leaves the node: its own writes, and others' that only it may have); False if some
        peer did not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        loop = asyncio.get_running_loop()
        mine = await loop.run_in_executor(None, self.shard.version_vector)
        while time.monotonic() < deadline:
            with self._lock:
                self.sync.wrote()
                held = all(
                    all((self.sync.known(p) or {}).get(o, 0) >= n for o, n in mine.items())
                    for p in self.sync.peers
                    if p not in self._down
                )
            if held:
                return True
            self._wake.set()
            await asyncio.sleep(0.05)
        return False

    def info(self) -> wire.ReplicaInfo:
        acked = self.shard.version_vector()
        return wire.ReplicaInfo(
            collection=self.shard_id[0],
            shard=self.shard_id[1],
            epoch=self.assignment.epoch,
            leading=False,
            last=self.shard.applied_seq,
            committed=self.shard.version_vector().get(self.origin, 0),
            acked=acked,
            state=self.hosted.state.value,
        )

    def close(self) -> None:
        """Stop driving (the shard leaves the node, or the node stops)."""
        self._closed = True
        self._runner.cancel()
        for task in list(self._tasks):
            self.loop.call_soon_threadsafe(task.cancel)
        with self._changed:
            self._changed.notify_all()


__all__ = ["MultiDriver"]
