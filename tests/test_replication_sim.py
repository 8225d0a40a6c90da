"""A seeded simulation of leader-follower replication (``replication/leader.py``).

Three replicas, a linearizable configuration store standing in for etcd (compare-and-set,
node leases on a virtual clock), a controller that fails over once a leader's lease has
expired, clients writing to the leader they last heard of, and a network that drops, delays
and duplicates messages. Faults: crashes with restarts (the log and epoch survive, the rest
does not), partitions between nodes, and nodes (often the leader) cut off from etcd. After
the faults the network heals and the run settles. A failing seed replays exactly
(``MEMCLUSTER_SEED``).

Invariants: no acknowledged write is ever missing from a later leader's log (checked at
every failover) and, once settled, there is a leader and every in-sync replica's log equals
its log. Runs with the in-sync rule or epoch fencing disabled must break them for some seed,
or the checks mean nothing.

Strong reads are linearizable: clients also read at the leader they last heard of, which
answers (as ``cluster/replicas.py`` does) only while its etcd lease is certainly valid and
once everything it holds is acknowledged. A read must contain every write acknowledged
before it, and only writes the final log keeps; reads never go back. Runs that skip the
lease check or the acknowledgement barrier must break this.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

import pytest
from msgspec.structs import replace

from memcluster.replication.leader import (
    Ack,
    Action,
    Config,
    ConfigUpdate,
    Entry,
    Event,
    Gone,
    MemoryLog,
    Message,
    Propose,
    Receive,
    Replica,
    Reply,
    Send,
    Status,
    StatusRequest,
    Tick,
    Write,
    failover,
    repair_chain,
)

NODES = ("a", "b", "c")
LEASE_TTL = 2.0
LEASE_SAFETY = 0.75
"""As ``cluster/membership.py``: a lease counts as certainly valid for this share of the TTL
after the last renewal etcd confirmed."""
TICK = 0.05
RUNS = 100


class Violation(AssertionError):
    pass


@dataclass(order=True)
class _Item:
    time: float
    order: int
    what: tuple[object, ...] = field(compare=False)


class Sim:
    def __init__(
        self,
        seed: int,
        *,
        ack: Ack = Ack.ALL,
        in_sync_rule: bool = True,
        fencing: bool = True,
        lease_reads: bool = True,
        read_barrier: bool = True,
        chain: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.queue: list[_Item] = []
        self.counter = itertools.count()
        self.config = Config(version=1, epoch=1, leader="a", replicas=NODES, in_sync=NODES)
        self.ack = ack
        self.in_sync_rule = in_sync_rule
        self.fencing = fencing
        self.lease_reads = lease_reads
        self.chain = chain
        self.read_barrier = read_barrier
        self.reads: list[tuple[float, list[tuple[int, bytes]]]] = []
        self.replicas = {n: self._replica(n, [], 0) for n in NODES}
        self.up = set(NODES)
        self.cut: set[frozenset[str]] = set()  # node pairs that cannot talk
        self.off_etcd: set[str] = set()
        self.isolated: set[str] = set()
        self.quiet_until = 0.0
        """Until then, clients only read."""
        """Nodes cut off from etcd, the other nodes and the controller alike."""
        self.renewed = dict.fromkeys(NODES, 0.0)
        self.acked: dict[int, bytes] = {}  # seq -> payload acknowledged to a client
        self.requests = itertools.count(1)
        self.payloads: dict[int, bytes] = {}
        self.statuses: list[Status] = []
        self.failing_over: int | None = None
        self.known_leader: str | None = None

    def _replica(self, node: str, log: list[Entry], epoch: int) -> Replica:
        return Replica(
            node,
            self.config,
            ack=self.ack,
            ack_timeout=0.3,
            in_sync_rule=self.in_sync_rule,
            fencing=self.fencing,
            log=log,
            epoch=epoch,
            chain=self.chain,
        )

    # -- plumbing --------------------------------------------------------------------------

    def at(self, delay: float, *what: object) -> None:
        heapq.heappush(self.queue, _Item(self.now + delay, next(self.counter), what))

    def deliver(self, node: str, event: Event) -> None:
        if node not in self.up:
            return
        self.act(node, self.replicas[node].handle(event))

    def act(self, node: str, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.send(node, action.to, action.message)
            elif isinstance(action, Reply):
                if action.error == "":
                    if (
                        action.seq in self.acked
                        and self.acked[action.seq] != self.payloads[action.request]
                    ):
                        raise Violation(f"seq {action.seq} acknowledged twice, differently")
                    self.acked[action.seq] = self.payloads[action.request]
            elif isinstance(action, Propose):
                if node in self.off_etcd:
                    continue  # cannot reach etcd: the proposal is lost
                if action.expected == self.config.version and action.config.epoch == (
                    self.config.epoch
                ):
                    self.set_config(action.config)

    def send(self, sender: str, to: str, message: Message) -> None:
        if frozenset((sender, to)) in self.cut or self.rng.random() < 0.05:
            return
        if sender in self.isolated or to in self.isolated:
            return
        copies = 2 if self.rng.random() < 0.03 else 1
        for _ in range(copies):
            self.at(self.rng.uniform(0.001, 0.04), "msg", sender, to, message)

    def set_config(self, config: Config) -> None:
        self.config = config
        for n in NODES:
            if n not in self.off_etcd:
                self.at(0.001, "config", n, config)

    # -- the controller (failover once the leader's lease expired) --------------------------

    def control(self) -> None:
        for n in NODES:
            if n in self.up and n not in self.off_etcd:
                self.renewed[n] = self.now
                if self.replicas[n].config.version < self.config.version:
                    self.deliver(n, ConfigUpdate(self.config))  # its watch catches up
        leader = self.config.leader
        if self.failing_over is not None:
            return
        expired = [n for n in self.config.replicas if self.now - self.renewed[n] > LEASE_TTL]
        if self.chain and not expired and leader is not None:
            # A member back (or never in): it joins at the end, and the tail feeds it.
            missing = [n for n in NODES if n not in self.config.replicas and n in self.up]
            missing = [n for n in missing if self.now - self.renewed[n] < LEASE_TTL]
            if missing:
                self.set_config(
                    replace(
                        self.config,
                        version=self.config.version + 1,
                        replicas=(*self.config.replicas, missing[0]),
                    )
                )
            return
        if (
            leader is None
            or self.now - self.renewed[leader] > LEASE_TTL
            or (self.chain and expired)
        ):
            self.failing_over = self.config.epoch + 1
            self.statuses = []
            for n in self.config.replicas:
                self.send("controller", n, StatusRequest(epoch=self.failing_over))
            self.at(0.3, "decide")

    def decide(self) -> None:
        if self.chain:
            dead = {n for n in NODES if self.now - self.renewed[n] > LEASE_TTL}
            new = repair_chain(self.config, self.statuses, dead)
        else:
            new = failover(self.config, self.statuses, self.ack)
        self.failing_over = None
        if new.leader is not None:
            log = _entries(self.replicas[new.leader])
            for seq, payload in self.acked.items():  # the invariant that matters
                if seq > len(log) or log[seq - 1].payload != payload:
                    raise Violation(
                        f"acknowledged write {seq} is not in new leader {new.leader}'s log"
                    )
        self.set_config(new)

    # -- running ---------------------------------------------------------------------------

    def run(self, until: float, faults: bool = True) -> None:
        self.at(0.0, "tick")
        while self.queue and self.queue[0].time <= until:
            item = heapq.heappop(self.queue)
            self.now = item.time
            kind, *rest = item.what
            if kind == "tick":
                self.control()
                for n in NODES:
                    self.deliver(n, Tick(self.now))
                if faults:
                    self.fault()
                    self.client()
                self.at(TICK, "tick")
            elif kind == "msg":
                sender, to, message = rest
                if to == "controller":
                    if isinstance(message, Status) and message.epoch == self.failing_over:
                        self.statuses.append(message)
                elif frozenset((sender, to)) not in self.cut:
                    self.deliver(str(to), Receive(str(sender), message))  # type: ignore[arg-type]
            elif kind == "config":
                node, config = rest
                self.deliver(str(node), ConfigUpdate(config))  # type: ignore[arg-type]
            elif kind == "decide":
                self.decide()
            elif kind == "restart":
                self.restart(str(rest[0]))

    def client(self) -> None:
        # Clients learn the leader late (a cached route), so they also write to old leaders.
        if self.known_leader is None or self.rng.random() < 0.1:
            self.known_leader = self.config.leader
        leader = self.known_leader
        roll = self.rng.random()
        if roll < 0.3:
            # A strong read, at the leader this client believes in (stale ones included).
            self.read(leader if roll < 0.2 else self.rng.choice(NODES))
            return
        if leader is None or roll < 0.45 or self.now < self.quiet_until:
            return
        request = next(self.requests)
        payload = f"w{request}".encode()
        self.payloads[request] = payload
        self.deliver(leader, Write(request, payload))

    def read(self, node: str | None) -> None:
        """A strong read at ``node``, served as the production driver serves it, or not."""
        if node is None or node not in self.up:
            return
        replica = self.replicas[node]
        if not (replica.is_tail if self.chain else replica.is_leader):
            return  # it knows it does not serve strong reads: the client asks elsewhere
        if self.lease_reads and self.now - self.renewed[node] >= LEASE_SAFETY * LEASE_TTL:
            return  # its lease may have expired: no strong read
        log = _entries(replica)
        if self.read_barrier and replica.committed() < replica.last[0]:
            return  # (the driver waits; here the client gives up and reads again later)
        result = [(e.seq, e.payload) for e in log]
        have = dict(result)
        for seq, payload in self.acked.items():
            if have.get(seq) != payload:
                raise Violation(f"stale read at {node}: acknowledged write {seq} missing")
        if self.reads and len(result) < len(self.reads[-1][1]):
            raise Violation(f"a read at {node} went back in time")
        self.reads.append((self.now, result))

    def fault(self) -> None:
        r = self.rng.random()
        if r < 0.004 and len(self.up) == 3:
            victim = self.rng.choice(NODES)
            self.up.discard(victim)
            self.at(self.rng.uniform(0.5, 4.0), "restart", victim)
        elif r < 0.008:
            pair = frozenset(self.rng.sample(NODES, 2))
            self.cut.add(pair)
        elif r < 0.016:
            self.off_etcd.add(self.config.leader or self.rng.choice(NODES))  # the worst case
        elif r < 0.019:
            isolated = self.config.leader or self.rng.choice(NODES)  # a leader alone
            if self.chain:  # (for chains: the tail, which serves the strong reads)
                members = [n for n in self.config.replicas if n in self.config.in_sync]
                isolated = members[-1] if members else isolated
            self.isolated.add(isolated)
            self.off_etcd.add(isolated)
            # Idle when it is cut off: only a lease check keeps it from serving stale reads
            # once another leader takes writes (with writes pending, the barrier would).
            self.quiet_until = self.now + LEASE_TTL + 0.5
        elif r < 0.03:
            self.cut.clear()
            self.off_etcd.clear()
            self.isolated.clear()

    def restart(self, node: str) -> None:
        """The node comes back with its durable state (log, epoch) and etcd's config."""
        if node in self.up:
            return
        old = self.replicas[node]
        self.replicas[node] = self._replica(node, _entries(old), old.epoch)
        self.up.add(node)
        self.deliver(node, ConfigUpdate(self.config))

    def settle(self) -> None:
        """Heal everything, let replication finish, and check the replicas agree."""
        self.cut.clear()
        self.off_etcd.clear()
        self.isolated.clear()
        for n in NODES:
            self.restart(n)
        self.run(self.now + 15.0, faults=False)
        leader = self.config.leader
        if leader is None:
            raise Violation("no leader after the network healed")
        log = [(e.seq, e.payload) for e in _entries(self.replicas[leader])]
        for seq, payload in self.acked.items():
            if seq > len(log) or log[seq - 1][1] != payload:
                raise Violation(f"acknowledged write {seq} missing from the final leader")
        for n in self.config.in_sync:
            theirs = [(e.seq, e.payload) for e in _entries(self.replicas[n])]
            if theirs != log:
                raise Violation(f"in-sync replica {n} differs from leader {leader}")
        for at, result in self.reads:
            if result != log[: len(result)]:
                raise Violation(f"the read at {at:.2f} saw writes the final log does not keep")


def _entries(replica: Replica) -> list[Entry]:
    assert isinstance(replica.log, MemoryLog)
    return list(replica.log.entries)


def _simulate(seed: int, **options: object) -> Sim:
    sim = Sim(seed, **options)  # type: ignore[arg-type]
    sim.run(40.0)
    sim.settle()
    return sim


@pytest.mark.parametrize("ack", [Ack.ALL, Ack.MAJORITY])
def test_no_acknowledged_write_is_lost_across_failovers(ack: Ack, seed: int) -> None:
    failovers = 0
    for i in range(RUNS):
        run_seed = seed + i
        try:
            sim = _simulate(run_seed, ack=ack)
        except Violation as exc:
            raise AssertionError(f"seed {run_seed}: {exc}") from exc
        failovers += sim.config.epoch - 1
        assert sim.acked, f"seed {run_seed}: nothing was acknowledged"
    print(f"{failovers} failovers over {RUNS} runs")
    assert failovers > 0  # the faults did force leaders out


@pytest.mark.parametrize("broken", ["in_sync_rule", "fencing"])
def test_the_checks_catch_a_broken_rule(broken: str, seed: int) -> None:
    """Acknowledging without the slow in-sync followers, or followers obeying an old epoch's
    leader, must lose an acknowledged write (or leave replicas apart) in some run."""
    caught = 0
    for i in range(2 * RUNS):
        try:
            _simulate(seed + i, **{broken: False})
        except Violation:
            caught += 1
    print(f"{caught} of {2 * RUNS} runs caught the broken {broken}")
    assert caught > 0


@pytest.mark.parametrize("broken", ["lease_reads", "read_barrier"])
def test_the_checks_catch_strong_reads_without_lease_or_barrier(broken: str, seed: int) -> None:
    """A leader serving strong reads after its lease may have expired (a new leader may be
    taking writes), or before its writes are acknowledged (a failover may undo them), must
    be caught returning a non-linearizable read in some run."""
    caught = 0
    for i in range(RUNS):
        try:
            _simulate(seed + i, **{broken: False})
        except Violation:
            caught += 1
    print(f"{caught} of {RUNS} runs caught strong reads without the {broken}")
    assert caught > 0


def test_leader_only_acknowledgement_can_lose_the_unreplicated_tail(seed: int) -> None:
    """``ack="leader"`` answers before any follower has the write: the documented price is
    that a failover may lose the tail the old leader had not replicated. The simulation
    shows it does (so the guarantee of ``all`` and ``majority`` above is not free)."""
    lost = 0
    for i in range(RUNS):
        try:
            _simulate(seed + i, ack=Ack.LEADER)
        except Violation:
            lost += 1
    print(f"{lost} of {RUNS} runs lost an acknowledged write under ack=leader")
    assert lost > 0


def test_chain_replication_loses_no_acknowledged_write(seed: int) -> None:
    """Chain replication (head to tail, acknowledged at the tail, strong reads at the tail)
    under the same faults: a member whose lease expires is cut out of the chain (the first
    in-sync survivor leads), a member back joins at the end and is fed by the tail; no
    acknowledged write is lost, reads are linearizable, the chain agrees once settled."""
    repairs = 0
    for i in range(RUNS):
        run_seed = seed + i
        try:
            sim = _simulate(run_seed, chain=True)
        except Violation as exc:
            raise AssertionError(f"seed {run_seed}: {exc}") from exc
        repairs += sim.config.epoch - 1
        assert sim.acked, f"seed {run_seed}: nothing was acknowledged"
        assert sim.reads, f"seed {run_seed}: no strong read was served"
    print(f"{repairs} chain repairs over {RUNS} runs")
    assert repairs > 0


@pytest.mark.parametrize("broken", ["fencing", "lease_reads"])
def test_the_chain_checks_catch_a_broken_rule(broken: str, seed: int) -> None:
    """As for leader-follower: followers obeying an old epoch, or a tail serving strong
    reads after its lease may have expired, must be caught in some run (rarely, for chains:
    hence the many runs)."""
    caught = 0
    runs = 6 * RUNS
    for i in range(runs):
        try:
            _simulate(seed + i, chain=True, **{broken: False})
        except Violation:
            caught += 1
            if caught >= 3:
                break
    print(f"{caught} chain runs (of at most {runs}) caught the broken {broken}")
    assert caught > 0


def test_a_follower_whose_node_left_is_proposed_out_at_once() -> None:
    """A follower whose node's lease ended (a graceful stop) will never acknowledge: the
    leader proposes it out of the in-sync set at once, not after ``ack_timeout``; a chain
    leaves that to the controller."""
    config = Config(
        version=1, epoch=1, leader="a", replicas=("a", "b", "c"), in_sync=("a", "b", "c")
    )
    for chain in (False, True):
        leader = Replica("a", config, ack=Ack.ALL, ack_timeout=5.0, log=MemoryLog(), chain=chain)
        leader.handle(Tick(0.0))
        actions = leader.handle(Gone(frozenset({"b"})))
        proposals = [a for a in actions if isinstance(a, Propose)]
        if chain:
            assert proposals == []
        else:
            assert [p.config.in_sync for p in proposals] == [("a", "c")]
