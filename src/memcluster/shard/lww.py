"""Last-writer-wins bookkeeping of one replica of a ``multi`` (multi-leader) shard.

Every replica of a ``multi`` shard takes writes. Each write it takes is stamped with a
*hybrid logical clock* (HLC): milliseconds of wall time shifted left 16 bits, plus a counter
that keeps stamps strictly increasing on this replica even when the wall clock stalls or
steps back, and that moves past every stamp the replica has seen from others. A key's value
is the write with the highest stamp ``(hlc, origin, is_delete)``: the comparison is the same
on every replica, so replicas that applied the same set of writes, in any order, hold the
same data. A delete leaves a *tombstone* (its stamp), so an older put that arrives later does
not bring the memory back.

Replicas exchange whole WAL records. A record written here first gets ``origin`` (this
replica's name) and ``oseq`` (1, 2, ... among this origin's records); a replica applies an
origin's records in ``oseq`` order without gaps, so its *version vector* (origin -> highest
``oseq`` applied) says exactly which writes it holds. Two replicas compare version vectors to
find what the other lacks (anti-entropy), and any replica can pass on another origin's
records. A replica too far behind (the records it needs are no longer in the giver's WAL)
receives the giver's whole state instead: every key with its stamp, tombstones included,
which merges by the same rule (:class:`Lww` is a state-based CRDT as well).

This module holds the state and the rules; :class:`~memcluster.shard.shard.Shard` applies
records through them, and :mod:`memcluster.replication.multi` decides who syncs with whom.
"""

from __future__ import annotations

import bisect

import msgspec

from memcluster.core.codec import Record

Key = tuple[tuple[str, ...], str]
Stamp = tuple[int, str, int]
"""(hlc, origin, 1 for a delete / 0 for a put): higher wins."""

LOGICAL_BITS = 16


def hlc_of(wall_s: float) -> int:
    """The lowest HLC stamp of the wall-clock time ``wall_s`` (seconds since the epoch)."""
    return int(wall_s * 1000) << LOGICAL_BITS


class LwwState(msgspec.Struct, array_like=True):
    """What a snapshot keeps of :class:`Lww` (the origin index is rebuilt from the WAL)."""

    hlc: int
    vv: dict[str, int]
    stamps: list[tuple[tuple[str, ...], str, int, str, int]]
    """(namespace, key, hlc, origin, is_delete) of every key ever written."""


class Lww:
    """Stamps, tombstones, the version vector and the clock of one ``multi`` replica. Not
    thread-safe: the shard calls it under its lock."""

    def __init__(self, me: str = "local") -> None:
        self.me = me
        """This replica's origin name: its node id in a cluster."""
        self.hlc = 0
        """The highest stamp issued or seen."""
        self.vv: dict[str, int] = {}
        self.stamps: dict[Key, Stamp] = {}
        self._index: dict[str, tuple[int, list[int]]] = {}
        """origin -> (the first oseq listed, the local seq of each record from there on)."""

    # -- the clock -----------------------------------------------------------------------------

    def tick(self, wall_s: float) -> int:
        """A new stamp for a write taken here: above every stamp issued or seen."""
        self.hlc = max(self.hlc + 1, hlc_of(wall_s))
        return self.hlc

    def observe(self, hlc: int) -> None:
        """A stamp seen in another replica's write: later local stamps go above it."""
        if hlc > self.hlc:
            self.hlc = hlc

    # -- the rule ------------------------------------------------------------------------------

    def wins(self, key: Key, stamp: Stamp) -> bool:
        """Whether a write stamped ``stamp`` replaces what ``key`` holds."""
        current = self.stamps.get(key)
        return current is None or stamp > current

    def stamp_of(self, key: Key) -> Stamp | None:
        return self.stamps.get(key)

    # -- the log -------------------------------------------------------------------------------

    def next_oseq(self) -> int:
        """The ``oseq`` of the next record written here first."""
        return self.vv.get(self.me, 0) + 1

    def accepts(self, record: Record) -> bool | None:
        """For a record from another replica: True if it is the next one of its origin, False
        if it was applied already, None if records of its origin are missing before it."""
        assert record.origin is not None
        have = self.vv.get(record.origin, 0)
        if record.oseq <= have:
            return False
        return True if record.oseq == have + 1 else None

    def logged(self, record: Record, local_seq: int) -> None:
        """Record ``record`` (with an origin) as held here at ``local_seq``."""
        origin = record.origin
        assert origin is not None
        first, seqs = self._index.get(origin, (record.oseq, []))
        if record.oseq != first + len(seqs):  # after a state transfer: a new run
            first, seqs = record.oseq, []
        seqs.append(local_seq)
        self._index[origin] = (first, seqs)
        if record.oseq > self.vv.get(origin, 0):
            self.vv[origin] = record.oseq

    def merged(self, vv: dict[str, int]) -> None:
        """A state transfer holding the writes ``vv`` was applied."""
        for origin, oseq in vv.items():
            if oseq > self.vv.get(origin, 0):
                self.vv[origin] = oseq
                self._index[origin] = (oseq + 1, [])

    def start_for(self, other: dict[str, int]) -> int | None:
        """The local seq from which this replica's WAL holds every record a replica at
        version vector ``other`` lacks; 0 if it lacks nothing, None if some are gone from
        the WAL here (it needs a state transfer)."""
        start = 0
        for origin, have in self.vv.items():
            want = other.get(origin, 0) + 1
            if want > have:
                continue
            first, seqs = self._index.get(origin, (have + 1, []))
            if not first <= want < first + len(seqs):
                return None  # not (or no longer) in the WAL here
            seq = seqs[want - first]
            start = seq if start == 0 else min(start, seq)
        return start

    def own_upto(self, local_seq: int) -> int:
        """How many of this replica's own records are at or below ``local_seq``."""
        first, seqs = self._index.get(self.me, (self.vv.get(self.me, 0) + 1, []))
        return first - 1 + bisect.bisect_right(seqs, local_seq)

    def forget_before(self, local_seq: int) -> None:
        """Drop index entries of records below ``local_seq`` (gone from the WAL)."""
        for origin, (first, seqs) in list(self._index.items()):
            cut = bisect.bisect_left(seqs, local_seq)
            if cut:
                self._index[origin] = (first + cut, seqs[cut:])

    # -- snapshots -----------------------------------------------------------------------------

    def state(self) -> LwwState:
        return LwwState(
            hlc=self.hlc,
            vv=dict(self.vv),
            stamps=[(ns, key, s[0], s[1], s[2]) for (ns, key), s in self.stamps.items()],
        )

    def load(self, state: LwwState) -> None:
        self.hlc = state.hlc
        self.vv = dict(state.vv)
        self.stamps = {(ns, key): (h, o, d) for ns, key, h, o, d in state.stamps}
        self._index = {}
