"""The Coordinator boundary: one behaviour suite over the in-memory twin and a real etcd.

Goal: the twin (MemoryEtcd on a ManualClock) behaves as etcd does, so that cluster code tested
on the twin works on etcd. Method: every ``backend`` test runs once per implementation; its
scenario runs under ``asyncio.run`` with a deadline, on clients the backend opens and closes.
The etcd variant starts a real etcd child process (one per module, on loopback, free ports, a
tmp data dir); it fails, not skips, when ``etcd`` is not installed. Since the etcd store is
shared by the module, each test writes under a prefix of its own, leaves no key on a lease
behind, and compares revisions instead of fixing them. Lease time passes through
``backend.wait_s``: ManualClock.advance and tick() on the twin, a real sleep on etcd, whose
minimum TTL (2 s) sets the lease tests' pace. Then the twin's own fault injection, the etcd
client's error mapping, and the key layout.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path

import msgspec
import pytest

from memcluster.cluster import keys
from memcluster.cluster.coordinator import (
    Compare,
    Coordinator,
    Delete,
    EtcdCoordinator,
    MemoryCoordinator,
    MemoryEtcd,
    Put,
    WatchEvent,
    campaign,
    leader,
)
from memcluster.core.clock import ManualClock
from memcluster.core.errors import (
    CorruptionError,
    CursorExpired,
    InvalidArgument,
    InvalidName,
    InvalidState,
    LeaseExpired,
    Unreachable,
)
from memcluster.core.types import CollectionConfig

DEADLINE_S = 10.0
TTL_S = 2.0
"""etcd's minimum lease TTL with its default heartbeat and election timeout."""

Scenario = Callable[["Backend"], Awaitable[None]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EtcdProcess:
    """A single-member etcd on loopback, stopped by its PID."""

    def __init__(self, data_dir: Path) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            pytest.fail(
                "etcd is not on PATH: run `make test`, which installs Debian's etcd-server"
                " (or `make etcd`)"
            )
        client, peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self.log = data_dir.parent / "etcd.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    etcd,
                    "--name=t",
                    f"--data-dir={data_dir}",
                    f"--listen-client-urls={self.url}",
                    f"--advertise-client-urls={self.url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=t={peer_url}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as reply:
                    if b'"true"' in reply.read():
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                pytest.fail(f"etcd did not become healthy at {self.url}; its log ends:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
    yield server
    server.stop()


class Backend:
    """Clients of one store, a prefix for the test, and a way to let lease time pass."""

    def __init__(self, kind: str, prefix: bytes, etcd_url: str | None = None) -> None:
        self.kind = kind
        self.prefix = prefix
        self._etcd_url = etcd_url
        self.clock = ManualClock()
        self.server = MemoryEtcd(self.clock)
        self._clients: list[Coordinator] = []

    def client(self) -> Coordinator:
        """A new client; run() closes it."""
        client: Coordinator = (
            self.server.client() if self._etcd_url is None else EtcdCoordinator(self._etcd_url)
        )
        self._clients.append(client)
        return client

    async def wait_s(self, seconds: float) -> None:
        if self._etcd_url is None:
            self.clock.advance(seconds)
            self.server.tick()
        else:
            await asyncio.sleep(seconds)

    def run(self, scenario: Scenario) -> None:
        async def bounded() -> None:
            try:
                async with asyncio.timeout(DEADLINE_S):
                    await scenario(self)
            finally:
                for client in self._clients:
                    await client.close()
                self._clients.clear()

        asyncio.run(bounded())
        self.server.validate()


@pytest.fixture(params=["memory", "etcd"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The suite's fixture: see the module docstring."""
    prefix = f"/t/{request.node.name}/".encode()
    if request.param == "memory":
        return Backend("memory", prefix)
    server: EtcdProcess = request.getfixturevalue("etcd_server")
    return Backend("etcd", prefix, server.url)


async def next_event(events: AsyncIterator[WatchEvent]) -> WatchEvent:
    return await anext(events)


# -- the behaviour suite ------------------------------------------------------------------


def test_put_get_delete_and_get_prefix_track_revisions(backend: Backend) -> None:
    async def scenario(b: Backend) -> None:
        c = b.client()
        a, ab, other = b.prefix + b"x/a", b.prefix + b"x/ab", b.prefix + b"y"
        assert await c.get(a) is None
        r1 = await c.put(a, b"1")
        kv = await c.get(a)
        assert kv is not None
        assert (kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.lease) == (
            a,
            b"1",
            r1,
            r1,
            0,
        )
        r2 = await c.put(a, b"2")
        assert r2 == r1 + 1
        kv = await c.get(a)
        assert kv is not None
        assert (kv.value, kv.mod_revision, kv.create_revision) == (b"2", r2, r1)

        r3 = await c.put(other, b"o")
        r4 = await c.put(ab, b"3")
        found, revision = await c.get_prefix(b.prefix + b"x/")
        assert [(kv.key, kv.mod_revision) for kv in found] == [(a, r2), (ab, r4)]
        assert revision == r4 > r3

        assert await c.delete(a) is True
        assert await c.delete(a) is False
        assert await c.get(a) is None
        _, after_deletes = await c.get_prefix(b.prefix)
        assert after_deletes == r4 + 1, "the delete of an absent key made no revision"
        r6 = await c.put(a, b"again")
        kv = await c.get(a)
        assert kv is not None
        assert kv.create_revision == r6, "deleted then put = created again"

        with pytest.raises(InvalidArgument):
            await c.put(b"", b"x")
        with pytest.raises(InvalidArgument):
            await c.get_prefix(b"")

    backend.run(scenario)


def test_txn_applies_one_branch_by_mod_revision(backend: Backend) -> None:
    async def scenario(b: Backend) -> None:
        c = b.client()
        k, lost = b.prefix + b"k", b.prefix + b"lost"
        assert await c.txn([Compare(k, 0)], [Put(k, b"1")], [Put(lost, b"1")]) is True
        assert await c.get(lost) is None
        assert await c.txn([Compare(k, 0)], [Put(k, b"2")], [Put(lost, b"1")]) is False
        kv = await c.get(k)
        assert kv is not None
        assert kv.value == b"1"
        assert await c.get(lost) is not None

        _, before = await c.get_prefix(b.prefix)
        assert await c.txn([Compare(k, kv.mod_revision)], [Put(k, b"2"), Delete(lost)]) is True
        new = await c.get(k)
        _, revision = await c.get_prefix(b.prefix)
        assert new is not None
        assert new.value == b"2"
        assert new.mod_revision == revision == before + 1, "one txn, one revision"
        assert await c.get(lost) is None

        assert await c.txn([Compare(k, kv.mod_revision)], [Put(k, b"stale")]) is False
        now = await c.get(k)
        assert now is not None
        assert now.value == b"2"
        assert await c.txn([], [Delete(lost)]) is True
        assert (await c.get_prefix(b.prefix))[1] == revision, "a txn that changed nothing"

        with pytest.raises(InvalidArgument):
            await c.txn([], [Put(k, b"a"), Delete(k)])

    backend.run(scenario)


def test_an_expired_lease_deletes_its_keys_and_watchers_see_the_delete(backend: Backend) -> None:
    async def scenario(b: Backend) -> None:
        c = b.client()
        k = b.prefix + b"node"
        lease = await c.grant_lease(TTL_S)
        assert lease > 0
        put_at = await c.put(k, b"up", lease=lease)
        kv = await c.get(k)
        assert kv is not None
        assert kv.lease == lease
        async with aclosing(c.watch_prefix(b.prefix, start_revision=put_at)) as events:
            first = await next_event(events)
            assert (first.kind, first.kv.key, first.revision) == ("put", k, put_at)
            await b.wait_s(TTL_S)
            gone = await next_event(events)
        assert (gone.kind, gone.kv.key, gone.kv.value, gone.kv.lease) == ("delete", k, b"", 0)
        assert gone.revision == gone.kv.mod_revision > put_at
        assert await c.get(k) is None
        with pytest.raises(LeaseExpired):
            await c.keepalive(lease)
        with pytest.raises(LeaseExpired):
            await c.put(k, b"late", lease=lease)
        with pytest.raises(LeaseExpired):
            await c.txn([], [Put(k, b"late", lease)])
        assert await c.get(k) is None

    backend.run(scenario)


def test_keepalive_extends_a_lease_and_revoke_ends_it(backend: Backend) -> None:
    async def scenario(b: Backend) -> None:
        c = b.client()
        k = b.prefix + b"k"
        lease = await c.grant_lease(TTL_S)
        await c.put(k, b"v", lease=lease)
        await b.wait_s(TTL_S * 0.6)
        assert await c.keepalive(lease) == TTL_S
        await b.wait_s(TTL_S * 0.6)
        assert await c.get(k) is not None, "alive 1.2 TTL after the grant, thanks to keepalive"
        await c.revoke(lease)
        assert await c.get(k) is None
        with pytest.raises(LeaseExpired):
            await c.revoke(lease)
        with pytest.raises(LeaseExpired):
            await c.keepalive(lease)
        with pytest.raises(InvalidArgument):
            await c.grant_lease(0)

    backend.run(scenario)


def test_revoke_deletes_every_key_of_the_lease_in_one_revision_in_key_order(
    backend: Backend,
) -> None:
    async def scenario(b: Backend) -> None:
        c = b.client()
        lease = await c.grant_lease(30)
        await c.put(b.prefix + b"b", b"", lease=lease)
        last = await c.put(b.prefix + b"a", b"", lease=lease)
        async with aclosing(c.watch_prefix(b.prefix, start_revision=last + 1)) as events:
            await c.revoke(lease)
            deletes = [await next_event(events), await next_event(events)]
        assert [(e.kind, e.kv.key, e.revision) for e in deletes] == [
            ("delete", b.prefix + b"a", last + 1),
            ("delete", b.prefix + b"b", last + 1),
        ]

    backend.run(scenario)


def test_watch_replays_from_a_start_revision_then_follows(backend: Backend) -> None:
    async def scenario(b: Backend) -> None:
        c = b.client()
        p = b.prefix + b"w/"
        a, bee = p + b"a", p + b"b"
        r1 = await c.put(a, b"1")
        r2 = await c.put(bee, b"1")
        await c.put(b.prefix + b"elsewhere", b"1")
        r3 = r2 + 2
        assert await c.delete(a)
        _, read_at = await c.get_prefix(p)
        assert read_at == r3
        async with (
            aclosing(c.watch_prefix(p, start_revision=r1)) as replay,
            aclosing(c.watch_prefix(p, start_revision=read_at + 1)) as fresh,
        ):
            seen = [await next_event(replay) for _ in range(3)]
            assert [(e.kind, e.kv.key, e.revision) for e in seen] == [
                ("put", a, r1),
                ("put", bee, r2),
                ("delete", a, r3),
            ]
            r4 = await c.put(p + b"c", b"new")
            followed = await next_event(replay)
            assert (followed.kind, followed.kv.key, followed.kv.value) == ("put", p + b"c", b"new")
            assert followed.revision == followed.kv.mod_revision == r4
            assert await next_event(fresh) == followed, "rev + 1 after a read misses nothing"

    backend.run(scenario)


def test_campaign_elects_one_contender_until_its_lease_ends(backend: Backend) -> None:
    async def scenario(b: Backend) -> None:
        one, two = b.client(), b.client()
        key = b.prefix + b"controller"
        leases = {"n1": await one.grant_lease(30), "n2": await two.grant_lease(30)}
        clients = {"n1": one, "n2": two}
        assert await leader(one, key) is None
        won = await asyncio.gather(
            campaign(one, key, "n1", leases["n1"]), campaign(two, key, "n2", leases["n2"])
        )
        assert sorted(won) == [False, True]
        winner, loser = ("n1", "n2") if won[0] else ("n2", "n1")
        assert await leader(two, key) == winner
        assert await campaign(clients[winner], key, winner, leases[winner]) is True, "a retry"
        assert await campaign(clients[loser], key, loser, leases[loser]) is False

        await clients[winner].revoke(leases[winner])
        assert await leader(one, key) is None
        assert await campaign(clients[loser], key, loser, leases[loser]) is True
        assert await leader(one, key) == loser
        await clients[loser].revoke(leases[loser])

    backend.run(scenario)


def test_close_ends_watches_and_refuses_later_calls(backend: Backend) -> None:
    async def scenario(b: Backend) -> None:
        c = b.client()
        await c.put(b.prefix + b"k", b"v")
        events = c.watch_prefix(b.prefix, start_revision=1)
        async with aclosing(events):
            await next_event(events)  # the watch runs

            async def drain() -> list[WatchEvent]:
                return [e async for e in events]

            drained = asyncio.create_task(drain())
            await asyncio.sleep(0.05)
            await c.close()
            await drained  # ended, with or without the rest of the replay
        with pytest.raises(InvalidState, match="closed"):
            await c.get(b.prefix + b"k")
        await c.close()

    backend.run(scenario)


# -- the twin's own faults ----------------------------------------------------------------


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(DEADLINE_S):
            await main()

    asyncio.run(bounded())


def test_a_partitioned_twin_client_raises_unreachable_while_leases_run_on() -> None:
    clock = ManualClock()
    server = MemoryEtcd(clock)
    cut, other = server.client(), server.client()

    async def main() -> None:
        lease = await cut.grant_lease(TTL_S)
        await cut.put(b"/k", b"v", lease=lease)
        async with aclosing(cut.watch_prefix(b"/", start_revision=1)) as events:
            await next_event(events)
            cut.partition()
            with pytest.raises(Unreachable, match="partitioned"):
                await next_event(events)
        for call in (cut.get(b"/k"), cut.put(b"/k", b"w"), cut.keepalive(lease)):
            with pytest.raises(Unreachable, match="etcd at memory"):
                await call
        assert await other.get(b"/k") is not None, "only that client is cut off"
        clock.advance(TTL_S)
        cut.heal()
        with pytest.raises(LeaseExpired):
            await cut.keepalive(lease)
        assert await cut.get(b"/k") is None
        await cut.close()
        await other.close()

    run(main)
    server.validate()


def test_a_twin_watch_from_a_compacted_revision_raises_cursor_expired() -> None:
    server = MemoryEtcd(ManualClock(), history_events_max=4)
    c: MemoryCoordinator = server.client()

    async def main() -> None:
        for i in range(6):
            await c.put(b"/k", str(i).encode())
        assert server.compacted > 1
        with pytest.raises(CursorExpired, match="compacted"):
            await anext(c.watch_prefix(b"/", start_revision=1))
        async with aclosing(c.watch_prefix(b"/", start_revision=server.compacted + 1)) as events:
            assert (await next_event(events)).revision == server.compacted + 1
        await c.close()

    run(main)
    server.validate()


def test_etcd_coordinator_names_an_unreachable_endpoint() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    c = EtcdCoordinator(url, timeout_s=2)

    async def main() -> None:
        with pytest.raises(Unreachable, match=url):
            await c.get(b"/k")
        await c.close()

    run(main)
    with pytest.raises(InvalidArgument, match="TLS"):
        EtcdCoordinator("https://127.0.0.1:2379")


# -- the key layout -----------------------------------------------------------------------


def test_key_layout_is_pinned_and_parses_back() -> None:
    assert keys.node_key("prod", "n-1") == b"/memcluster/prod/nodes/n-1"
    assert keys.collection_key("prod", "mem") == b"/memcluster/prod/collections/mem"
    assert keys.shard_key("prod", "mem", 7) == b"/memcluster/prod/shards/mem/0007"
    assert keys.shards_prefix("prod", "mem") == b"/memcluster/prod/shards/mem/"
    assert keys.controller_key("prod") == b"/memcluster/prod/controller"
    assert keys.parse_node_key("prod", keys.node_key("prod", "n-1")) == "n-1"
    assert keys.parse_collection_key("prod", keys.collection_key("prod", "mem")) == "mem"
    assert keys.parse_shard_key("prod", keys.shard_key("prod", "mem", 9999)) == ("mem", 9999)
    for bad in ("", "a/b", "-x", "x" * 65):
        with pytest.raises(InvalidName):
            keys.node_key("prod", bad)
        with pytest.raises(InvalidName):
            keys.cluster_prefix(bad)
    with pytest.raises(InvalidArgument):
        keys.shard_key("prod", "mem", keys.SHARDS_MAX)
    with pytest.raises(InvalidArgument):
        keys.parse_shard_key("prod", b"/memcluster/prod/shards/mem/7")


def test_cluster_values_round_trip_and_bad_ones_are_corruption() -> None:
    node = keys.NodeInfo(
        id="n1", http_url="http://h:8080", peer_url="mc://h:7000", started_at=1.5, data_bytes=9
    )
    assignment = keys.ShardAssignment(
        epoch=3, replicas=("n1", "n2", "n3"), leader="n2", in_sync=("n2", "n1")
    )
    config = CollectionConfig(name="mem", dim=4, shards=2)
    key = keys.shard_key("c", "mem", 0)
    assert keys.decode(keys.encode(node), keys.NodeInfo, key) == node
    assert keys.decode(keys.encode(assignment), keys.ShardAssignment, key) == assignment
    assert keys.decode(keys.encode(config), CollectionConfig, key) == config
    newer = msgspec.json.encode({**msgspec.to_builtins(assignment), "added_later": 1})
    assert keys.decode(newer, keys.ShardAssignment, key) == assignment

    for broken in (
        {"epoch": 0, "replicas": []},
        {"epoch": 1, "replicas": ["n1", "n1"]},
        {"epoch": 1, "replicas": ["n1"], "in_sync": ["n2"]},
        {"epoch": 1, "replicas": ["n1", "n2"], "in_sync": ["n1"], "leader": "n2"},
    ):
        with pytest.raises(CorruptionError, match="/memcluster/c/shards/mem/0000"):
            keys.decode(msgspec.json.encode(broken), keys.ShardAssignment, key)
    with pytest.raises(CorruptionError):
        keys.decode(b"{", keys.NodeInfo, key)
