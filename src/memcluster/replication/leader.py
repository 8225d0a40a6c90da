"""Leader-follower replication of one shard, as a sans-IO state machine (DESIGN.md §6).

A :class:`Replica` takes events (a client write, a message, a tick, a new configuration
from etcd) and returns actions (messages to send, replies to clients, configuration changes
to propose to etcd). A driver does the I/O: ``memcluster.cluster.replicas`` in production
(asyncio, the binary protocol, the shard's WAL as the log), the seeded simulator of
``tests/test_replication_sim.py`` in tests. ``docs/design/replication.md`` tells the whole
story.

The model (PacificA, Kafka's ISR):

* **Configuration** (:class:`Config`) lives in etcd: epoch, leader, replicas, in-sync set, and
  a ``version`` (etcd's mod revision) that every change is conditioned on. Only the leader
  proposes in-sync changes; only the controller changes the epoch or the leader.
* **The leader** gives each write the next sequence number, appends it to its log and sends
  it to every follower. With ``ack="all"`` it answers the client once every replica of the
  in-sync set has it; with ``"majority"``, once a majority of the replicas has it (in-sync
  ones); with ``"leader"``, at once.
* **A follower that does not acknowledge** within ``ack_timeout`` (a write waits for it, or
  it stops answering the heartbeats an idle leader sends) is removed from the in-sync set by
  a proposal to etcd, and only once etcd accepted it are the writes it held up
  acknowledged: the in-sync set always holds every acknowledged write.
* **Epochs fence.** Every message carries the sender's epoch; a replica ignores a lower one
  and adopts a higher one. A follower accepts entries only from the leader of its epoch, and
  truncates a suffix that does not match the leader's log (entries of an old leader that
  were never acknowledged).
* **Failover** is the controller's (:func:`failover`): once the old leader's etcd lease has
  expired, it asks the in-sync replicas for their last entry, promotes the one with the
  highest, and raises the epoch. A replica that answered has adopted the new epoch, so the
  old leader can no longer collect the acknowledgements it needs.
* **A follower behind** (restarted, or just added) is sent the entries it lacks; once it has
  everything, the leader proposes it back into the in-sync set.

Sequence numbers start at 1. An entry covers ``count`` consecutive sequence numbers and is
named by its last one (a shard's WAL record of several operations is one entry). The log is a
:class:`Log`: :class:`MemoryLog` in the simulator, the shard's WAL in production.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Iterator, Sequence
from typing import Protocol

import msgspec

BATCH_ENTRIES = 256
"""Most entries in one Append (a follower far behind catches up over several)."""


class Ack(enum.StrEnum):
    ALL = "all"
    MAJORITY = "majority"
    LEADER = "leader"


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """Sequence numbers ``seq - count + 1 .. seq``, written by the leader of ``epoch``."""

    seq: int
    epoch: int
    payload: bytes
    count: int = 1

    @property
    def first(self) -> int:
        return self.seq - self.count + 1


class Log(Protocol):
    """A replica's log of entries, durable in production. Entries are in seq order, without
    gaps (each one's ``first`` is the previous one's ``seq + 1``)."""

    def last(self) -> tuple[int, int]:
        """(seq, epoch) of the last entry; (0, 0) when empty."""
        ...

    def epoch_at(self, seq: int) -> int | None:
        """The epoch of the entry ending at ``seq`` (0 for seq 0); None if no entry here
        ends there (or it is no longer kept)."""
        ...

    def after(self, seq: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries after ``seq`` (an entry's end); production logs raise
        when those were compacted away (the follower then needs a snapshot)."""
        ...

    def append(self, entry: Entry) -> None:
        """Add the entry that follows the last one."""
        ...

    def truncate(self, seq: int) -> None:
        """Drop every entry after ``seq`` (an entry's end): a suffix an old leader wrote."""
        ...


class MemoryLog:
    """A :class:`Log` in a list (the simulator's)."""

    def __init__(self, entries: Sequence[Entry] = ()) -> None:
        self.entries = list(entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def _index(self, seq: int) -> int | None:
        """Index of the entry ending at seq (count-1 entries: index seq - 1)."""
        i = seq - 1
        if 0 <= i < len(self.entries) and self.entries[i].seq == seq:
            return i
        return None

    def last(self) -> tuple[int, int]:
        return (self.entries[-1].seq, self.entries[-1].epoch) if self.entries else (0, 0)

    def epoch_at(self, seq: int) -> int | None:
        if seq == 0:
            return 0
        i = self._index(seq)
        return None if i is None else self.entries[i].epoch

    def after(self, seq: int, limit: int) -> list[Entry]:
        start = 0 if seq == 0 else self._index(seq)
        assert start is not None, f"no entry ends at {seq}"
        start += 1 if seq else 0
        return self.entries[start : start + limit]

    def append(self, entry: Entry) -> None:
        assert entry.count == 1, "the simulator's entries are single writes"
        assert entry.first == self.last()[0] + 1, (entry, self.last())
        self.entries.append(entry)

    def truncate(self, seq: int) -> None:
        del self.entries[seq:]


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """A shard's replica-set configuration, as etcd holds it."""

    version: int
    """Raised by every change (etcd's mod revision): proposals are conditioned on it."""
    epoch: int
    leader: str | None
    replicas: tuple[str, ...]
    in_sync: tuple[str, ...]


# -- messages ------------------------------------------------------------------------------


class Append(msgspec.Struct, frozen=True, kw_only=True):
    """Leader to follower: entries after ``prev`` (``(seq, epoch)`` of the entry before them;
    ``(0, 0)``: the start of the log). Empty entries: a heartbeat / probe."""

    epoch: int
    leader: str
    prev: tuple[int, int]
    entries: tuple[Entry, ...]
    leader_last: int
    """The leader's last seq: a follower's entries beyond it (an old leader's, never
    acknowledged) are dropped once it has caught up to it."""


class AppendAck(msgspec.Struct, frozen=True, kw_only=True):
    """Follower to leader: ``ok`` with its last seq, or not ``ok`` with the seq up to which
    its log may match (the leader then resends from there)."""

    epoch: int
    node: str
    ok: bool
    last_seq: int
    committed: int = 0
    """Chain replication: the highest seq the chain's tail has, as the sender knows it (sent
    upstream, to the head, which acknowledges writes up to it)."""
    log_end: int = -1
    """The sender's last seq (it may hold entries past ``last_seq`` that the receiver does
    not have: an old epoch's, not yet truncated). -1: not said."""


class StatusRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Controller to replica, during a failover: adopt ``epoch`` and say how far you are."""

    epoch: int


class Status(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    epoch: int
    last: tuple[int, int]
    """(seq, epoch) of the replica's last entry."""


Message = Append | AppendAck | StatusRequest | Status


# -- events and actions --------------------------------------------------------------------


class Write(msgspec.Struct, frozen=True):
    request: int
    payload: bytes
    count: int = 1
    """How many sequence numbers the write takes."""
    seq: int = 0
    """Its last sequence number when the log has it already (a shard's WAL, written by the
    shard before the replica hears of it); 0: the next ones."""


class Receive(msgspec.Struct, frozen=True):
    sender: str
    message: Message


class Tick(msgspec.Struct, frozen=True):
    now: float


class ConfigUpdate(msgspec.Struct, frozen=True):
    config: Config


class Gone(msgspec.Struct, frozen=True):
    """These replicas' nodes left the cluster (their etcd lease ended: a graceful stop or a
    failure seen by etcd): no acknowledgement will come from them, so the leader proposes
    them out of the in-sync set now instead of after ``ack_timeout``."""

    nodes: frozenset[str]


Event = Write | Receive | Tick | ConfigUpdate | Gone


class Send(msgspec.Struct, frozen=True):
    to: str
    message: Message


class Reply(msgspec.Struct, frozen=True):
    request: int
    seq: int
    """The write's sequence number; 0 when it failed (``error`` says why)."""
    error: str = ""


class Propose(msgspec.Struct, frozen=True):
    """Ask etcd to replace configuration ``expected`` (by version) with ``config``."""

    expected: int
    config: Config


Action = Send | Reply | Propose


# -- the replica ---------------------------------------------------------------------------


class Replica:
    """One replica of one shard on one node. Its ``log`` and ``epoch`` are its durable
    state (the driver persists them before acting on the returned actions); everything else
    is rebuilt after a restart."""

    def __init__(
        self,
        node: str,
        config: Config,
        *,
        ack: Ack = Ack.ALL,
        ack_timeout: float = 1.0,
        in_sync_rule: bool = True,
        fencing: bool = True,
        log: Log | Sequence[Entry] = (),
        epoch: int = 0,
        chain: bool = False,
    ) -> None:
        self.node = node
        self.chain = chain
        """Chain replication: entries flow head to tail, acknowledged at the tail."""
        self._tail_has = 0  # chain: the highest seq known to be at the tail
        self._adding: str | None = None  # a replica proposed into the in-sync set
        self.ack = ack
        self.ack_timeout = ack_timeout
        self.in_sync_rule = in_sync_rule
        """False only in tests: acknowledge without waiting for slow in-sync followers (the
        simulator must then find a lost write)."""
        self.fencing = fencing
        """False only in tests: accept messages of a lower epoch (the simulator must then
        find a lost write)."""
        self.log: Log = MemoryLog(log) if isinstance(log, Sequence) else log
        self.epoch = max(epoch, config.epoch)
        self.config = config
        self.now = 0.0
        self._pending: dict[int, int] = {}  # request -> seq
        self._acked: dict[str, int] = {}  # follower -> highest seq it acknowledged
        self._sent: dict[str, int] = {}  # follower -> highest seq sent to it
        self._waiting_since: dict[str, float] = {}  # follower -> since when it holds us up
        self._heard: dict[str, float] = {}  # follower -> when it last answered this epoch
        self._ends: dict[str, int] = {}  # follower -> its log's last seq, as it last said
        self._sender_last = 0  # the highest leader_last heard in this epoch
        self._proposed: int | None = None  # config version a proposal is based on

    # -- helpers ---------------------------------------------------------------------------

    @property
    def last(self) -> tuple[int, int]:
        return self.log.last()

    @property
    def is_leader(self) -> bool:
        return self.config.leader == self.node and self.config.epoch == self.epoch

    def _followers(self) -> list[str]:
        """Whom this replica sends entries: every other replica (leader-follower), or its
        successor in the chain."""
        if not self.chain:
            return [n for n in self.config.replicas if n != self.node]
        order = self.config.replicas
        if self.config.epoch != self.epoch:
            return []  # the chain of our epoch is not known yet
        if self.node not in order or self.node not in self.config.in_sync:
            # Only an in-sync member's log is a prefix of the head's: one catching up may
            # still hold an old epoch's suffix, and must not pass it on.
            return []
        i = order.index(self.node)
        return list(order[i + 1 : i + 2])

    def _predecessor(self) -> str | None:
        order = self.config.replicas
        if self.node not in order or order.index(self.node) == 0:
            return None
        return order[order.index(self.node) - 1]

    @property
    def is_tail(self) -> bool:
        """Chain: this replica is the last in-sync one (it answers strong reads; a write is
        acknowledged once it has it)."""
        members = [n for n in self.config.replicas if n in self.config.in_sync]
        return (
            self.chain
            and bool(members)
            and members[-1] == self.node
            and self.epoch == self.config.epoch
        )

    def _chain_committed(self) -> int:
        if not self.is_tail:
            return self._tail_has
        if self._adding is not None:  # the successor becomes the tail: what it has counts
            return min(self.last[0], self._acked.get(self._adding, 0))
        return self.last[0]

    def _has(self, node: str) -> int:
        return self.last[0] if node == self.node else self._acked.get(node, 0)

    # -- events ----------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        match event:
            case Write():
                return self._write(event)
            case Receive():
                return self._receive(event.sender, event.message)
            case Tick():
                self.now = event.now
                return self._tick()
            case ConfigUpdate():
                return self._config(event.config)
            case Gone():
                if not self.is_leader or self.chain:
                    return []  # a chain's links are cut by the controller
                for node in event.nodes & set(self._followers()):
                    self._waiting_since[node] = -math.inf
                return self._tick()
        raise AssertionError(event)  # pragma: no cover

    def _write(self, w: Write) -> list[Action]:
        if not self.is_leader:
            return [Reply(w.request, 0, f"not the leader of epoch {self.config.epoch}")]
        seq = w.seq or self.last[0] + w.count
        entry = Entry(seq, self.epoch, w.payload, w.count)
        self.log.append(entry)
        self._pending[w.request] = entry.seq
        for f in self._followers():
            self._waiting_since.setdefault(f, self.now)
        return self._replicate() + self._answer()

    def _replicate(self, probe: bool = False) -> list[Action]:
        """Send each follower the next entries it lacks, unless they are in flight already;
        ``probe`` (on a tick): resend to a follower that is behind, in case it was lost."""
        out: list[Action] = []
        last = self.last
        for f in self._followers():
            if f not in self._acked:
                # Not heard from in this epoch: probe at our last entry; the answer says
                # where its log ends, and the entries start from there.
                if f in self._sent and not probe:
                    continue
                self._sent[f] = -1
                message = Append(
                    epoch=self.epoch,
                    leader=self._head(),
                    prev=last,
                    entries=(),
                    leader_last=last[0],
                )
                out.append(Send(f, message))
                continue
            start = self._acked[f]
            if start >= last[0]:
                continue  # it has everything
            in_flight = self._sent.get(f, 0) > start
            if in_flight and not probe:
                continue
            batch = tuple(self.log.after(start, BATCH_ENTRIES))
            out.append(
                Send(
                    f,
                    Append(
                        epoch=self.epoch,
                        leader=self._head(),
                        prev=(start, self.log.epoch_at(start) or 0),
                        entries=batch,
                        leader_last=last[0],
                    ),
                )
            )
            self._sent[f] = batch[-1].seq if batch else start
        return out

    def _head(self) -> str:
        """The leader an Append names: this replica, or (chain) the head it forwards for."""
        if self.chain:
            return self.config.leader or self.node
        return self.node

    def _needed(self, ack: Ack | None = None) -> int:
        """The highest seq whose writes may be acknowledged now (under ``ack``, default the
        replica's)."""
        if self.chain:
            return min(self._chain_committed(), self.last[0])
        ack = ack or self.ack
        if ack is Ack.LEADER:
            return self.last[0]
        in_sync = [n for n in self.config.in_sync if n in self.config.replicas]
        if ack is Ack.ALL:
            if self._adding is not None and self._adding not in in_sync:
                in_sync.append(self._adding)  # (majority: any majority of the new set overlaps)
            if not self.in_sync_rule:
                return self.last[0]  # the deliberately broken rule the simulator must catch
            return min((self._has(n) for n in in_sync), default=0)
        # Majority: of the replicas, counting only in-sync ones (an out-of-sync replica may
        # lack earlier writes, so its copy of a later one proves nothing).
        counted = sorted((self._has(n) for n in in_sync), reverse=True)
        majority = len(self.config.replicas) // 2 + 1
        return counted[majority - 1] if len(counted) >= majority else 0

    def _answer(self) -> list[Action]:
        if not self.is_leader:
            return []
        upto = self._needed()
        done = sorted((seq, r) for r, seq in self._pending.items() if seq <= upto)
        for _, r in done:
            del self._pending[r]
        return [Reply(r, seq) for seq, r in done]

    def _receive(self, sender: str, m: Message) -> list[Action]:
        if isinstance(m, StatusRequest):
            if m.epoch > self.epoch:
                self._step_down(m.epoch)
            return [Send(sender, Status(node=self.node, epoch=self.epoch, last=self.last))]
        if isinstance(m, Status):
            return []
        if not self.fencing:  # (tests only) epochs ignored both ways
            return self._append(sender, m) if isinstance(m, Append) else self._ack(m)
        if m.epoch < self.epoch:
            return []  # fenced: an old leader's (or an old follower's) message
        if m.epoch > self.epoch:
            self._step_down(m.epoch)
        if isinstance(m, Append):
            return self._append(sender, m)
        return self._ack(m)

    def _step_down(self, epoch: int) -> None:
        """A newer epoch exists: whatever this replica led is over."""
        self.epoch = epoch
        self._pending.clear()  # never acknowledged: their clients time out and retry
        self._acked.clear()
        self._sent.clear()
        self._waiting_since.clear()
        self._heard.clear()
        self._ends.clear()
        self._sender_last = 0

    def _append(self, sender: str, m: Append) -> list[Action]:
        if (
            self.fencing
            and self.config.epoch == m.epoch
            and self.config.leader
            not in (
                None,
                m.leader,
            )
        ):
            return []  # not the leader of this epoch by our config
        if (
            self.chain
            and self.fencing
            and (self.config.epoch != m.epoch or sender != self._predecessor())
        ):
            return []  # entries come only from our predecessor in the chain of their epoch
        prev_seq, prev_epoch = m.prev
        mine = self.log.epoch_at(prev_seq)
        starts = not m.entries or m.entries[0].first == prev_seq + 1
        if mine is None or (prev_seq > 0 and mine != prev_epoch) or not starts:
            # Our log does not match there: it may up to our end, or before prev.
            hint = max(0, min(prev_seq - 1, self.last[0]))
            return [
                Send(sender, AppendAck(epoch=self.epoch, node=self.node, ok=False, last_seq=hint))
            ]
        for entry in m.entries:
            have = self.log.epoch_at(entry.seq) if entry.seq <= self.last[0] else None
            if entry.seq <= self.last[0] and have != entry.epoch:
                self._truncate(entry.first - 1)  # a divergent suffix of an old leader
                have = None
            if have is None:
                self.log.append(entry)
        last = m.entries[-1].seq if m.entries else prev_seq
        # Within an epoch the sender's log only grows: a delayed message's smaller
        # leader_last must not make us drop entries a newer message gave us.
        self._sender_last = max(self._sender_last, m.leader_last)
        if last >= self._sender_last and self.last[0] > last:
            after = self.log.after(last, 1)
            if after and after[0].epoch < m.epoch:
                # An older leader's suffix that this epoch's leader does not have (its own
                # entries, of this epoch, may already be here from a newer message: kept).
                self._truncate(last)
        ack = AppendAck(
            epoch=self.epoch,
            node=self.node,
            ok=True,
            last_seq=last,
            committed=self._chain_committed() if self.chain else 0,
            log_end=self.last[0],
        )
        forward = self._replicate() if self.chain else []  # on down the chain
        return [Send(sender, ack), *forward]

    def _truncate(self, seq: int) -> None:
        """Drop our entries after ``seq``; a successor that acknowledged any of them (chain)
        may hold them too, so it is probed again and truncated in turn."""
        self.log.truncate(seq)
        for f, acked in list(self._acked.items()):
            if acked > seq:
                del self._acked[f]
                self._sent.pop(f, None)

    def _ack(self, m: AppendAck) -> list[Action]:
        if self.chain:
            return self._chain_ack(m)
        if not self.is_leader:
            return []
        self._heard[m.node] = self.now
        self._ends[m.node] = m.log_end
        if not m.ok:  # its log differs: resend from where it may match
            self._acked[m.node] = min(self._acked.get(m.node, m.last_seq), m.last_seq)
            self._sent[m.node] = 0
            return self._replicate()
        self._acked[m.node] = max(self._acked.get(m.node, 0), m.last_seq)
        if self._acked[m.node] >= self.last[0]:
            self._waiting_since.pop(m.node, None)
        else:
            self._waiting_since[m.node] = self.now
        return self._admit() + self._replicate() + self._answer()

    def _chain_ack(self, m: AppendAck) -> list[Action]:
        """Chain: an acknowledgement from the successor (the log it has, and how far the tail
        is): feed it more, and pass a higher tail position upstream."""
        if m.node not in self._followers() or m.epoch != self.epoch:
            return []
        if m.log_end >= 0:
            self._ends[m.node] = m.log_end
        if not m.ok:
            self._acked[m.node] = min(self._acked.get(m.node, m.last_seq), m.last_seq)
            self._sent[m.node] = 0
            return self._replicate()
        self._acked[m.node] = max(self._acked.get(m.node, 0), m.last_seq)
        out: list[Action] = []
        if m.node in self.config.in_sync and m.committed > self._tail_has:
            self._tail_has = m.committed
            before = self._predecessor()
            if before is not None:
                up = AppendAck(
                    epoch=self.epoch,
                    node=self.node,
                    ok=True,
                    last_seq=self.last[0],
                    committed=self._chain_committed(),
                )
                out.append(Send(before, up))
        if self.is_tail:
            out += self._admit()  # the tail takes a caught-up successor into the chain
        return out + self._replicate() + self._answer()

    def _admit(self) -> list[Action]:
        """Propose taking a caught-up follower (one at a time) back into the in-sync set."""
        if self._proposed is not None:
            return []
        last = self.last[0]
        for f in self._followers():
            # Caught up, and holding nothing more (an old epoch's suffix not yet dropped).
            caught_up = self._acked.get(f, -1) >= last and self._ends.get(f, -1) == last
            if f not in self.config.in_sync and caught_up:
                return [self._propose(in_sync=(*self.config.in_sync, f))]
        return []

    def _propose(self, *, in_sync: tuple[str, ...]) -> Propose:
        self._proposed = self.config.version
        # A replica being taken in counts for acknowledgements from now on: etcd may name it
        # in sync before we hear so, and a write acknowledged without it would then be
        # missing from a member of the in-sync set.
        added = [n for n in in_sync if n not in self.config.in_sync]
        self._adding = added[0] if added else None
        new = msgspec.structs.replace(self.config, version=self.config.version + 1, in_sync=in_sync)
        return Propose(self.config.version, new)

    def _tick(self) -> list[Action]:
        if self.chain:  # links are cut by the controller (node leases), not by timeouts
            admit = self._admit() if self.is_tail else []
            return admit + self._replicate(probe=True) + self._answer()
        if not self.is_leader:
            return []
        out: list[Action] = []
        late = [
            f
            for f, since in self._waiting_since.items()
            if f in self.config.in_sync and self.now - since > self.ack_timeout
        ]
        if late and self._proposed is None and self.in_sync_rule:
            keep = tuple(n for n in self.config.in_sync if n not in late)
            # Under majority acknowledgements the in-sync set never shrinks below a majority:
            # writes need one, and so does choosing the next leader.
            if self.ack is not Ack.MAJORITY or len(keep) >= len(self.config.replicas) // 2 + 1:
                out.append(self._propose(in_sync=keep))
        if not out:
            out = self._admit()
        return out + self._heartbeats() + self._replicate(probe=True) + self._answer()

    def _heartbeats(self) -> list[Action]:
        """An idle in-sync follower is sent an empty Append every half ``ack_timeout``; one
        that stops answering then counts as holding writes up, and leaves the in-sync set
        after ``ack_timeout``, before a write has to wait for it."""
        out: list[Action] = []
        last = self.last
        for f in self._followers():
            if f not in self.config.in_sync or self._acked.get(f, -1) < last[0]:
                continue  # not in sync, or behind: the probes and write timers cover it
            heard = self._heard.setdefault(f, self.now)
            if self.now - heard > self.ack_timeout / 2 and f not in self._waiting_since:
                self._waiting_since[f] = heard
                message = Append(
                    epoch=self.epoch,
                    leader=self._head(),
                    prev=last,
                    entries=(),
                    leader_last=last[0],
                )
                out.append(Send(f, message))
        return out

    def _config(self, config: Config) -> list[Action]:
        if config.version < self.config.version:
            return []
        self.config = config
        self._proposed = None
        self._adding = None
        if config.epoch > self.epoch:
            self._step_down(config.epoch)
        if self.chain:
            return self._replicate() + self._answer()
        if not self.is_leader:
            return []
        return self._replicate() + self._answer()

    def committed(self, ack: Ack | None = None) -> int:
        """The highest seq that may be acknowledged now (0 unless leading), under ``ack``
        (default: the replica's; a write may ask for another). Reads at the leader wait for
        it to cover what they could see."""
        if self.chain:
            return self._needed() if self.is_leader or self.is_tail else 0
        return self._needed(ack) if self.is_leader else 0

    def follower_acks(self) -> dict[str, int]:
        """Leading: the highest seq each follower acknowledged in this epoch."""
        return dict(self._acked) if self.is_leader else {}

    def pending(self) -> dict[int, int]:
        """Client requests waiting for acknowledgement: request -> seq."""
        return dict(self._pending)


def repair_chain(config: Config, statuses: Sequence[Status], dead: Collection[str]) -> Config:
    """Chain replication's reconfiguration once members' leases expired (``dead``) or the
    chain has no head: the dead members leave, the others keep their order, in-sync ones
    first; the first in-sync one is the head (a chain's logs shrink from head to tail, so it
    has every acknowledged write). Epoch + 1.

    Every member that stays must have answered ``StatusRequest(config.epoch + 1)`` (so it
    adopted the epoch and ignores the old chain's messages, and a tail cut out cannot go on
    serving reads). Until they all have, only the epoch moves (members that adopted it must
    not be left ahead of etcd), and the controller asks again."""
    answered = {s.node for s in statuses}
    staying = [n for n in config.replicas if n not in dead]
    if any(n not in answered for n in staying):
        return msgspec.structs.replace(config, version=config.version + 1, epoch=config.epoch + 1)
    in_sync = tuple(n for n in staying if n in config.in_sync)
    catching_up = tuple(n for n in staying if n not in in_sync)
    head = in_sync[0] if in_sync else None
    return msgspec.structs.replace(
        config,
        version=config.version + 1,
        epoch=config.epoch + 1,
        leader=head,
        replicas=in_sync + catching_up if head else config.replicas,
        in_sync=in_sync if head else config.in_sync,
    )


def failover(config: Config, statuses: Sequence[Status], ack: Ack = Ack.ALL) -> Config:
    """The controller's next configuration once the leader's lease has expired (or the shard
    has no leader): epoch + 1, led by the in-sync replica with the highest last entry.

    ``statuses`` come from the replicas that adopted the new epoch
    (``StatusRequest(epoch=config.epoch + 1)``); having adopted it, they no longer accept
    anything from the old leader, which may answer too (it is then alive and fenced). The new
    epoch is written even when no leader can be chosen safely (``leader=None``: the shard
    waits, and the controller tries again), so that replicas which adopted it are not left
    ahead of etcd. No leader is chosen when no in-sync replica answered or, under ``majority``
    acknowledgements, when fewer in-sync replicas answered than it takes to meet every
    majority (an acknowledged write may be on just one of them)."""
    answered = {s.node for s in statuses if s.node in config.in_sync}
    candidates = [s for s in statuses if s.node in answered]
    enough = bool(candidates)
    if ack is Ack.MAJORITY:
        majority = len(config.replicas) // 2 + 1
        enough = enough and len(answered) >= len(config.replicas) - majority + 1
    leader = max(candidates, key=lambda s: (s.last[1], s.last[0], s.node)).node if enough else None
    return msgspec.structs.replace(
        config,
        version=config.version + 1,
        epoch=config.epoch + 1,
        leader=leader,
        in_sync=tuple(n for n in config.in_sync if n in answered) if leader else config.in_sync,
    )
