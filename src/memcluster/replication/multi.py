"""Multi-leader replication of one shard: who syncs with whom, and when a write is
acknowledged. A sans-IO state machine (DESIGN.md §6, ``docs/design/replication.md``).

Every replica of a ``replication="multi"`` shard takes writes. The data side (stamps,
last-writer-wins, version vectors, which records a peer lacks) is the shard's
(:mod:`memcluster.shard.lww`); this module schedules the two exchanges a replica has with
each peer, and counts acknowledgements:

* **push**: after a local write, send the peer the records it lacks as far as this replica
  knows (the version vector the peer reported last); the peer applies them and answers with
  its version vector. One push per peer in flight; writes during it mark the peer dirty, and
  another push follows.
* **pull** (anti-entropy): every ``interval_s``, and at once for a peer whose version vector
  is unknown, ask the peer for what this replica lacks, giving its version vector; the peer
  answers with records, or with a page of its whole state when its WAL no longer reaches
  back. Pulls also carry writes of a third replica that died before pushing them here.
* **acknowledgement**: a write is acknowledged with ``W`` copies once ``W - 1`` peers have
  reported a version vector holding its ``oseq`` (this replica made it durable already).

A failed exchange backs off (doubling from ``interval_s`` to ``backoff_max_s``); a peer that
shows it is up again (it sends an exchange, or its node is back in the cluster) is tried at
once, so a write waiting for its copy does not wait out the backoff.

The driver (``memcluster.cluster.multi`` in production, the seeded simulator in
``tests/test_multi_sim.py``) carries out the actions.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

import msgspec

from memcluster.core.codec import MergeOp, Op, Record

Key = tuple[tuple[str, ...], str]


class Kind(enum.Enum):
    PUSH = "push"
    PULL = "pull"


class Exchange(msgspec.Struct, frozen=True):
    """Start one exchange with ``peer``."""

    kind: Kind
    peer: str


class MultiShard(Protocol):
    """What a replica's shard offers the exchanges (``memcluster.shard.shard.Shard``)."""

    def version_vector(self, durable: bool = False) -> dict[str, int]: ...

    def missing(self, other: dict[str, int], limit: int) -> list[Record] | None: ...

    def apply_remote(self, records: Sequence[Record]) -> None: ...

    def state_page(
        self, after: Key | None, limit: int
    ) -> tuple[list[Op], Key | None, dict[str, int]]: ...


class PullRequest(msgspec.Struct, frozen=True):
    vv: dict[str, int]
    """What the puller holds."""
    after: Key | None = None
    paging: bool = False
    """A state transfer in progress: the next page after ``after``."""


class PullReply(msgspec.Struct, frozen=True):
    vv: dict[str, int]
    """What the answering replica held when it answered."""
    records: list[Record] = []
    page: list[Op] | None = None
    """A page of the whole state (instead of records: the WAL no longer reaches back)."""
    last: Key | None = None
    """With ``page``: its last key, None if it was the last page."""


def answer_pull(shard: MultiShard, request: PullRequest, limit: int) -> PullReply:
    """What a replica answers a pull: the records the puller lacks, or a state page. The
    version vector it reports is durable here (the puller counts this replica as a copy of
    what it names)."""
    if not request.paging:
        records = shard.missing(request.vv, limit)
        if records is not None:
            return PullReply(vv=shard.version_vector(durable=True), records=records)
    ops, last, vv = shard.state_page(request.after, limit)
    return PullReply(vv=vv, page=ops, last=last)


def answer_push(shard: MultiShard, records: Sequence[Record]) -> dict[str, int]:
    """Apply pushed records; the durable version vector after (what the pusher learns, and
    counts this replica as a copy of)."""
    shard.apply_remote(records)
    return shard.version_vector(durable=True)


class _Peer:
    def __init__(self) -> None:
        self.known: dict[str, int] | None = None
        """The version vector the peer reported last (None: not heard from yet)."""
        self.dirty = True
        self.pushing = False
        self.pulling = False
        self.next_pull = 0.0
        self.backoff = 0.0
        self.paging = False
        self.page_after: Key | None = None
        self.page_vv: dict[str, int] = {}


class MultiSync:
    """The exchanges of one replica (on node ``me``, writing as ``origin``) with its peers
    (the other replicas' nodes)."""

    def __init__(
        self,
        me: str,
        peers: list[str],
        *,
        origin: str | None = None,
        interval_s: float = 1.0,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.me = me
        self.origin = me if origin is None else origin
        self.interval_s = interval_s
        self.backoff_max_s = backoff_max_s
        self._peers: dict[str, _Peer] = {}
        self.set_peers(peers)

    def set_peers(self, peers: list[str]) -> None:
        """The shard's other replicas now (a new configuration)."""
        wanted = [p for p in peers if p != self.me]
        self._peers = {p: self._peers.get(p) or _Peer() for p in wanted}

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    def wrote(self) -> None:
        """A write was taken here: every peer has something to receive."""
        for peer in self._peers.values():
            peer.dirty = True

    def due(self, now: float) -> list[Exchange]:
        """The exchanges to start now (each is then in flight until its outcome comes)."""
        out: list[Exchange] = []
        for name, peer in self._peers.items():
            if peer.backoff and now < peer.next_pull:
                continue  # failing: wait out the backoff for both kinds
            if peer.dirty and not peer.pushing and peer.known is not None:
                peer.dirty = False
                peer.pushing = True
                out.append(Exchange(Kind.PUSH, name))
            if not peer.pulling and (peer.known is None or now >= peer.next_pull):
                peer.pulling = True
                out.append(Exchange(Kind.PULL, name))
        return out

    def pull_request(self, peer: str, vv: dict[str, int]) -> PullRequest:
        """The request of a pull from ``peer`` by a replica at version vector ``vv``."""
        state = self._peers[peer]
        return PullRequest(vv=vv, after=state.page_after, paging=state.paging)

    def records_of(self, exchange: Exchange, reply: PullReply, wall_s: float) -> list[Record]:
        """The records a pull's answer gives to apply (``Shard.apply_remote``); once they
        are applied, :meth:`pulled` (or :meth:`failed` if that failed). A state page becomes
        one record stamped ``wall_s``, whose version vector is set on the last page only
        (the one the giver had at the first page: what the pages together hold), so a
        transfer cut short merges what it got and claims nothing."""
        peer = self._peers.get(exchange.peer)
        if peer is None:
            return []
        if reply.page is None:
            return reply.records
        page_vv = peer.page_vv if peer.paging else reply.vv
        ops = [*reply.page, MergeOp(dict(page_vv))] if reply.last is None else reply.page
        return [Record(seq=0, ts=wall_s, ops=ops)] if ops else []

    def pulled(self, exchange: Exchange, reply: PullReply, now: float, limit: int) -> None:
        """The records of a pull's answer were applied: the pull is done."""
        peer = self._peers.get(exchange.peer)
        if peer is None:
            return
        if reply.page is None:
            self.done(exchange, now, reply.vv, more=len(reply.records) >= limit)
            return
        if not peer.paging:
            peer.paging, peer.page_vv = True, dict(reply.vv)
        if reply.last is None:
            peer.paging, peer.page_after, peer.page_vv = False, None, {}
        else:
            peer.page_after = reply.last
        self.done(exchange, now, {}, more=True)

    def done(self, exchange: Exchange, now: float, vv: dict[str, int], more: bool = False) -> None:
        """An exchange succeeded; ``vv``: the peer's version vector when it answered.
        ``more``: a pull that may not have brought everything (pull again at once)."""
        peer = self._peers.get(exchange.peer)
        if peer is None:
            return
        peer.known = _max(peer.known, vv)
        peer.backoff = 0.0
        if exchange.kind is Kind.PUSH:
            peer.pushing = False
        else:
            peer.pulling = False
            peer.next_pull = now if more else now + self.interval_s

    def alive(self, peer: str) -> None:
        """``peer`` showed it is up (it sent us an exchange, or its node is back in the
        cluster): end its backoff, so writes waiting for its copy do not wait it out."""
        state = self._peers.get(peer)
        if state is not None and state.backoff:
            state.backoff = 0.0
            state.next_pull = 0.0

    def failed(self, exchange: Exchange, now: float) -> None:
        """An exchange failed (the peer is down, cut off, or refused): back off."""
        peer = self._peers.get(exchange.peer)
        if peer is None:
            return
        if exchange.kind is Kind.PUSH:
            peer.pushing = False
            peer.dirty = True
        else:
            peer.pulling = False
            peer.paging, peer.page_after, peer.page_vv = False, None, {}
        peer.backoff = min(self.backoff_max_s, max(self.interval_s, 2 * peer.backoff))
        peer.next_pull = now + peer.backoff

    def known(self, peer: str) -> dict[str, int] | None:
        """The version vector ``peer`` reported last."""
        state = self._peers.get(peer)
        return None if state is None or state.known is None else dict(state.known)

    def copies(self, oseq: int) -> int:
        """How many replicas (this one included) are known to hold this replica's own write
        number ``oseq``."""
        return 1 + sum(
            1
            for peer in self._peers.values()
            if peer.known is not None and peer.known.get(self.origin, 0) >= oseq
        )


def _max(a: dict[str, int] | None, b: dict[str, int]) -> dict[str, int]:
    """Pointwise maximum of two version vectors (a peer's never goes back, but answers can
    arrive out of order)."""
    out = dict(a or {})
    for origin, oseq in b.items():
        if oseq > out.get(origin, 0):
            out[origin] = oseq
    return out


def write_quorum(ack: str, replicas: int) -> int:
    """``W`` of an acknowledgement policy: "all" = every replica, "majority", "leader" (for
    ``multi``: the replica that took the write, alone)."""
    if ack == "all":
        return replicas
    if ack == "majority":
        return replicas // 2 + 1
    return 1
