"""``memcluster node``: run one node of a cluster (a server that registers itself in etcd)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import click
import uvloop

from memcluster.cluster.controller import REREPLICATE_AFTER_S, Controller
from memcluster.cluster.coordinator import EtcdCoordinator
from memcluster.cluster.dataplane import DataPlane, Peers
from memcluster.cluster.host import ShardHost
from memcluster.cluster.keys import NodeInfo
from memcluster.cluster.membership import Member
from memcluster.cluster.shardmap import ShardMap
from memcluster.core.clock import SystemClock
from memcluster.core.config import Config
from memcluster.core.errors import MemclusterError
from memcluster.node.auth import Auth
from memcluster.node.server import Listen, serve
from memcluster.query.router import ClusterStore


async def _run(
    config: Config,
    listen: Listen,
    *,
    data: Path,
    node_id: str,
    etcd: str,
    cluster: str,
    advertise: str,
    coordination_replicas: int = 1,
    rereplicate_after_s: float = REREPLICATE_AFTER_S,
) -> None:
    loop = asyncio.get_running_loop()
    host = await loop.run_in_executor(None, ShardHost, data / "shards", config, SystemClock())
    coord = EtcdCoordinator(etcd)
    shard_map = ShardMap(coord, cluster)
    peers = Peers(max_frame_bytes=config.request_bytes_max)
    members: list[Member] = []  # strong reads need the membership lease, once it exists
    dataplane = DataPlane(
        host,
        shard_map,
        coord,
        peers,
        config,
        node_id=node_id,
        lease_valid=lambda: bool(members) and members[0].lease_valid(),
    )
    store = ClusterStore(
        node_id=node_id,
        shard_map=shard_map,
        dataplane=dataplane,
        peers=peers,
        coord=coord,
        loop=loop,
        config=config,
    )
    stop = asyncio.Event()
    ports: asyncio.Future[tuple[int, int]] = loop.create_future()
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(shard_map.run())
            await shard_map.loaded.wait()
            tasks.create_task(dataplane.run())
            server = tasks.create_task(
                serve(
                    store,
                    config,
                    listen,
                    node=node_id,
                    auth=Auth(None),
                    ready=lambda http, peer: ports.set_result((http, peer)),
                    stop=stop,
                    internal=dataplane.handlers,
                    internal_streams=dataplane.streams,
                )
            )
            http, peer = await ports
            info = NodeInfo(
                id=node_id,
                http_url=f"http://{advertise}:{http}",
                peer_url=f"mc://{advertise}:{peer}",
                started_at=time.time(),
            )
            member = Member(coord, cluster, info, lease_ttl_s=config.node_lease_ttl_s)
            members.append(member)
            tasks.create_task(member.run())
            await member.registered.wait()
            controller = Controller(
                coord,
                cluster,
                node_id,
                peers=peers,
                coordination_replicas=coordination_replicas,
                rereplicate_after_s=rereplicate_after_s,
            )
            controller.watch(shard_map)
            tasks.create_task(controller.run(lambda: member.lease))
            reporter = tasks.create_task(_report(member, host))
            click.echo(f"listening {info.http_url} {info.peer_url} node {node_id} up", color=False)
            sys.stdout.flush()
            await stop.wait()
            reporter.cancel()
            controller.stop()
            dataplane.stop()
            await member.leave()
            # Requests still in flight here re-route shards this node no longer serves (a
            # coordination call forwarded by another node, a write through this node): they
            # need the failover the lease revocation starts, so the map is followed until
            # the server has drained them, not frozen at the map before it.
            await asyncio.wait([server])
            shard_map.stop()
        # The server has drained its requests here (the task group waited for it).
    finally:
        await loop.run_in_executor(None, dataplane.close)
        await peers.close()
        await coord.close()
        await loop.run_in_executor(None, host.close)


async def _report(member: Member, host: ShardHost) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await member.report(await loop.run_in_executor(None, host.data_bytes))
        await asyncio.sleep(5.0)


@click.command("node")
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="This node's data directory.",
)
@click.option("--etcd", required=True, help="etcd endpoint, http://HOST:2379.")
@click.option("--cluster", default="default", show_default=True, help="Cluster name in etcd.")
@click.option("--name", "node_id", required=True, help="This node's id (stable across restarts).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--advertise", default=None, help="Address other nodes and clients use (default: host)."
)
@click.option("--http-port", default=7700, show_default=True, help="HTTP API port (0: any free).")
@click.option("--peer-port", default=7701, show_default=True, help="Binary protocol port (0: any).")
@click.option(
    "--lease-ttl",
    "lease_ttl_s",
    type=float,
    default=Config().node_lease_ttl_s,
    show_default=True,
    help="Seconds without a heartbeat after which the node counts as down.",
)
@click.option(
    "--coordination-replicas",
    type=click.IntRange(1, 7),
    default=1,
    show_default=True,
    help="Copies of the coordination shard (leases, locks, counters, topics) when the"
    " controller first places it; 3 keeps locks and counters through the loss of a node.",
)
@click.option(
    "--rereplicate-after",
    "rereplicate_after_s",
    type=click.FloatRange(0, None),
    default=REREPLICATE_AFTER_S,
    show_default=True,
    help="Seconds a node may stay down before its replicas are rebuilt on other nodes"
    " (this node applies it while it is the controller).",
)
def node_command(
    data: Path,
    etcd: str,
    cluster: str,
    node_id: str,
    host: str,
    advertise: str | None,
    http_port: int,
    peer_port: int,
    lease_ttl_s: float,
    coordination_replicas: int,
    rereplicate_after_s: float,
) -> None:
    """Run one node of cluster CLUSTER: serve DATA and register in etcd under a lease.

    The node renews its lease every third of `node_lease_ttl_s` (5 s): that is its
    heartbeat, and a node that stops renewing is seen as down when the lease expires. On
    SIGTERM or Ctrl-C it leaves at once (revokes its lease), then shuts down gracefully,
    following the shard map until its requests are done (so they reach new leaders).
    The node holds the shards the controller gives it under DATA/shards, and answers any
    request for any collection, forwarding to the nodes that hold the shards.

    \b
    Example:
      memcluster node --data ./n1 --etcd http://127.0.0.1:2379 --name n1 --http-port 7710
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = Config(node_lease_ttl_s=lease_ttl_s)
    listen = Listen(host=host, http_port=http_port, peer_port=peer_port)
    try:
        uvloop.run(
            _run(
                config,
                listen,
                data=data,
                node_id=node_id,
                etcd=etcd,
                cluster=cluster,
                advertise=advertise or host,
                coordination_replicas=coordination_replicas,
                rereplicate_after_s=rereplicate_after_s,
            )
        )
    except* MemclusterError as group:
        click.echo(f"memcluster node: {group.exceptions[0]}", err=True)
        sys.exit(2)
