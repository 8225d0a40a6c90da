"""Node membership through real etcd: a node registers on a lease, a killed node disappears
within the lease's TTL, and a stopped node leaves at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from click.testing import CliRunner

from memcluster.cli.main import main
from memcluster.cluster.coordinator import EtcdCoordinator, MemoryCoordinator, MemoryEtcd, leader
from memcluster.cluster.keys import (
    NodeInfo,
    ShardAssignment,
    collection_key,
    controller_key,
    decode,
    encode,
    shards_prefix,
)
from memcluster.cluster.membership import Member, MemberState, live_nodes
from memcluster.core.clock import SystemClock
from memcluster.core.config import Config
from memcluster.core.types import CollectionConfig
from server_util import ServerProcess
from test_coordinator import EtcdProcess

TTL_S = Config().node_lease_ttl_s


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
    yield server
    server.stop()


def _nodes(etcd: EtcdProcess, cluster: str) -> dict[str, NodeInfo]:
    async def read() -> dict[str, NodeInfo]:
        coord = EtcdCoordinator(etcd.url)
        try:
            return {n.id: n for n in await live_nodes(coord, cluster)}
        finally:
            await coord.close()

    return asyncio.run(read())


def _node(tmp_path: Path, etcd: EtcdProcess, name: str, cluster: str) -> ServerProcess:
    return ServerProcess(
        tmp_path / name,
        "--etcd",
        etcd.url,
        "--name",
        name,
        "--cluster",
        cluster,
        command="node",
    )


def test_a_node_registers_and_a_killed_node_disappears_within_its_lease(
    tmp_path: Path, etcd: EtcdProcess
) -> None:
    node = _node(tmp_path, etcd, "n1", "kill")
    try:
        info = _nodes(etcd, "kill")["n1"]
        assert (info.http_url, info.peer_url) == (node.http_url, node.mc_url)
        assert httpx.get(f"{info.http_url}/v1/health").json()["node"] == "n1"
        time.sleep(TTL_S)  # renewals keep it registered past one TTL
        assert "n1" in _nodes(etcd, "kill")
        node.kill()
        killed = time.monotonic()
        while "n1" in _nodes(etcd, "kill"):
            assert time.monotonic() - killed < TTL_S + 3, "still registered after its lease TTL"
            time.sleep(0.2)
    finally:
        node.kill()


def test_a_stopped_node_leaves_at_once(tmp_path: Path, etcd: EtcdProcess) -> None:
    node = _node(tmp_path, etcd, "n2", "stop")
    assert "n2" in _nodes(etcd, "stop")
    started = time.monotonic()
    assert node.stop() == 0
    assert "n2" not in _nodes(etcd, "stop")
    assert time.monotonic() - started < TTL_S  # revoked, not expired


def test_a_member_whose_lease_expired_registers_again() -> None:
    """With the in-memory twin: the lease is revoked behind the member's back (as if etcd
    had expired it during a pause); its next renewal fails and it joins with a new lease."""

    async def scenario() -> None:
        coord = MemoryCoordinator(MemoryEtcd(SystemClock()))
        info = NodeInfo(id="n", http_url="http://h:1", peer_url="mc://h:2", started_at=0.0)
        member = Member(coord, "c", info, lease_ttl_s=0.3)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(member.run())
            await member.registered.wait()
            first = member.lease
            assert first is not None
            await coord.revoke(first)
            assert await live_nodes(coord, "c") == []
            deadline = time.monotonic() + 5
            while member.lease == first or member.state is not MemberState.UP:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert [n.id for n in await live_nodes(coord, "c")] == ["n"]
            await member.leave()
        assert await live_nodes(coord, "c") == []

    asyncio.run(scenario())


def _controller_and_map(etcd: EtcdProcess, cluster: str) -> tuple[str | None, dict[str, str]]:
    async def read() -> tuple[str | None, dict[str, str]]:
        coord = EtcdCoordinator(etcd.url)
        try:
            holder = await leader(coord, controller_key(cluster))
            kvs, _ = await coord.get_prefix(shards_prefix(cluster))
            shard_map = {
                kv.key.decode().rsplit("shards/", 1)[1]: decode(
                    kv.value, ShardAssignment, kv.key
                ).leader
                or ""
                for kv in kvs
            }
            return holder, shard_map
        finally:
            await coord.close()

    return asyncio.run(read())


def test_the_controller_places_shards_and_moves_when_its_node_dies(
    tmp_path: Path, etcd: EtcdProcess
) -> None:
    async def create() -> None:
        coord = EtcdCoordinator(etcd.url)
        try:
            config = CollectionConfig(name="memories", dim=4, shards=4)
            await coord.put(collection_key("ctl", "memories"), encode(config))
        finally:
            await coord.close()

    nodes = {name: _node(tmp_path, etcd, name, "ctl") for name in ("a", "b")}
    try:
        # Both are up before the collection exists: placement spreads it over them.
        assert set(_nodes(etcd, "ctl")) == {"a", "b"}
        asyncio.run(create())
        deadline = time.monotonic() + 15
        while True:
            holder, shard_map = _controller_and_map(etcd, "ctl")
            if holder and len(shard_map) == 4:
                break
            assert time.monotonic() < deadline, (holder, shard_map)
            time.sleep(0.2)
        assert sorted(shard_map.values()) == ["a", "a", "b", "b"]
        assert holder is not None
        shown = CliRunner().invoke(
            main, ["status", "--etcd", etcd.url, "--cluster", "ctl", "--json"]
        )
        assert shown.exit_code == 0, shown.output
        view = msgspec.json.decode(shown.output)
        assert sorted(n["id"] for n in view["nodes"]) == ["a", "b"]
        assert view["controller"] == holder
        assert [s["collection"] for s in view["shards"]] == ["#coordination"] + ["memories"] * 4
        assert all(s["available"] for s in view["shards"])
        table = CliRunner().invoke(main, ["status", "--etcd", etcd.url, "--cluster", "ctl"])
        assert "shards held" in table.output
        nodes[holder].kill()
        survivor = "b" if holder == "a" else "a"
        killed = time.monotonic()
        while _controller_and_map(etcd, "ctl")[0] != survivor:
            assert time.monotonic() - killed < TTL_S + 5, "the controller did not move"
            time.sleep(0.2)
    finally:
        for node in nodes.values():
            node.kill()
