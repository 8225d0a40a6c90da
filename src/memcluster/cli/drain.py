"""``memcluster drain NODE``: move every shard off a node before it is taken down."""

from __future__ import annotations

import asyncio
import sys
import time

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from memcluster.cluster.coordinator import EtcdCoordinator
from memcluster.cluster.keys import draining_key
from memcluster.cluster.view import cluster_view
from memcluster.core.errors import MemclusterError


async def _drain(
    etcd: str, cluster: str, node: str, undo: bool, wait: bool, timeout_s: float
) -> int:
    coord = EtcdCoordinator(etcd)
    try:
        key = draining_key(cluster, node)
        if undo:
            await coord.delete(key)
            click.echo(f"node {node} is no longer draining; the controller may place shards on it")
            return 0
        view = await cluster_view(coord, cluster)
        if node not in {n.id for n in view.nodes}:
            held = view.shards_held(node)
            why = (
                "and holds no shards"
                if held == 0
                else f"and its {held} shard(s) have their only copy there: start it again to"
                " drain it (shards move from a running node)"
            )
            click.echo(f"memcluster drain: node {node!r} is not up {why}", err=True)
            return 2
        await coord.put(key, b"draining")
        held = view.shards_held(node)
        click.echo(f"node {node} is draining: the controller moves its {held} shard(s) away")
        if not wait:
            return 0
        deadline = time.monotonic() + timeout_s
        with Progress(
            TextColumn("moving shards off " + node),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            transient=False,
        ) as progress:
            task = progress.add_task("drain", total=max(held, 1))
            while True:
                left = (await cluster_view(coord, cluster)).shards_held(node)
                progress.update(task, completed=max(held - left, 0) if held else 1)
                if left == 0:
                    break
                if time.monotonic() > deadline:
                    click.echo(
                        f"memcluster drain: {left} shard(s) still on {node} after {timeout_s} s;"
                        " `memcluster status --etcd ...` shows them, the controller's log why",
                        err=True,
                    )
                    return 1
                await asyncio.sleep(0.5)
        click.echo(f"node {node} holds no shards: it can be stopped")
        return 0
    finally:
        await coord.close()


@click.command("drain")
@click.argument("node")
@click.option("--etcd", required=True, help="etcd endpoint of the cluster, http://HOST:2379.")
@click.option("--cluster", default="default", show_default=True, help="Cluster name in etcd.")
@click.option("--undo", is_flag=True, help="Stop draining: the node may receive shards again.")
@click.option("--no-wait", is_flag=True, help="Mark the node and return at once.")
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, help="Seconds to wait.")
def drain_command(
    node: str, etcd: str, cluster: str, undo: bool, no_wait: bool, timeout_s: float
) -> None:
    """Move every shard off NODE (it keeps running; stop it afterwards).

    The controller copies each of NODE's shards to the least-loaded other node (snapshot plus
    WAL tail) and switches ownership; reads and writes continue meanwhile. Without --no-wait
    the command shows progress and returns when NODE holds nothing.

    \b
    Examples:
      memcluster drain n2 --etcd http://127.0.0.1:2379
      memcluster drain n2 --etcd http://127.0.0.1:2379 --undo
    """
    try:
        code = asyncio.run(_drain(etcd, cluster, node, undo, not no_wait, timeout_s))
    except* MemclusterError as group:
        click.echo(f"memcluster drain: {group.exceptions[0]}", err=True)
        sys.exit(2)
    sys.exit(code)
