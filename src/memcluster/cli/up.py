"""``memcluster up``: etcd and N nodes on this machine, for development and tests."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import BinaryIO

import click

from memcluster.cluster.coordinator import EtcdCoordinator
from memcluster.cluster.view import ClusterView, cluster_view


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_etcd(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    etcd = shutil.which("etcd")
    if etcd is None:
        raise click.ClickException(
            "etcd is not on PATH: install it (`make etcd` installs Debian's etcd-server)"
        )
    client, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    data.mkdir(parents=True, exist_ok=True)
    with (data / "etcd.log").open("ab") as log:  # the child keeps its own copy
        proc = _popen_etcd(etcd, data, client, peer, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{client}/health", timeout=1) as reply:
                if b'"true"' in reply.read():
                    return proc, client
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise click.ClickException(f"etcd did not start; see {data / 'etcd.log'}")


def _popen_etcd(
    etcd: str, data: Path, client: str, peer: str, log: BinaryIO
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            etcd,
            "--name=memcluster",
            f"--data-dir={data / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=memcluster={peer}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _start_node(
    data: Path, name: str, etcd: str, cluster: str, ports: tuple[int, int]
) -> tuple[subprocess.Popen[str], str]:
    with (data / f"{name}.log").open("ab") as log:  # the child keeps its own copy
        proc = _popen_node(data, name, etcd, cluster, log, ports)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening "):
        proc.kill()
        raise click.ClickException(f"node {name} did not start; see {data / (name + '.log')}")
    return proc, line.split()[1] + " " + line.split()[2]


def _popen_node(
    data: Path, name: str, etcd: str, cluster: str, log: BinaryIO, ports: tuple[int, int]
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memcluster.cli.main",
            "node",
            "--data",
            str(data / name),
            "--etcd",
            etcd,
            "--name",
            name,
            "--cluster",
            cluster,
            "--http-port",
            str(ports[0]),
            "--peer-port",
            str(ports[1]),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )


def _stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@click.command("up")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 16))
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default="./memcluster-cluster",
    show_default=True,
    help="Directory for etcd's and every node's data (kept across runs).",
)
@click.option("--cluster", default="default", show_default=True, help="Cluster name in etcd.")
@click.option(
    "--port",
    "base_port",
    default=7700,
    show_default=True,
    help="Node nI listens on HTTP PORT+2(I-1) and binary PORT+2(I-1)+1; 0: any free ports.",
)
def up_command(nodes: int, data: Path, cluster: str, base_port: int) -> None:
    """Start etcd (found on PATH) and NODES nodes on loopback, until Ctrl-C.

    Prints each node's endpoints and a one-line health summary; Ctrl-C stops the nodes
    (each leaves the cluster at once) and then etcd. Logs go to DATA/*.log. Any node
    answers any request: connect a client to any of them. Data is kept in DATA across runs.

    \b
    Examples:
      memcluster up --nodes 3                 # node n1 on http://127.0.0.1:7700, mc://...:7701
      memcluster up --nodes 3 --data /tmp/mc-cluster --port 0
    """
    data = data.resolve()
    etcd, etcd_url = _start_etcd(data)
    children: list[subprocess.Popen[str]] = []
    try:
        click.echo(f"etcd       {etcd_url}")
        for i in range(1, nodes + 1):
            ports = (0, 0) if base_port == 0 else (base_port + 2 * i - 2, base_port + 2 * i - 1)
            proc, endpoints = _start_node(data, f"n{i}", etcd_url, cluster, ports)
            children.append(proc)
            click.echo(f"node n{i}    {endpoints}")
        view = _wait_for(etcd_url, cluster, nodes)
        click.echo(
            f"cluster {cluster} up: {len(view.nodes)}/{nodes} nodes, controller"
            f" {view.controller or 'electing'}; `memcluster status --etcd {etcd_url}"
            f" --cluster {cluster}` for details; Ctrl-C stops everything",
        )
        sys.stdout.flush()
        stop = _wait_for_signal(children)
        if stop is not None:
            click.echo(f"a node exited ({stop}); stopping the cluster", err=True)
    finally:
        for proc in children:
            _stop(proc)
        _stop(etcd)
    click.echo("stopped")


def _wait_for(etcd: str, cluster: str, nodes: int) -> ClusterView:
    async def read() -> ClusterView:
        coord = EtcdCoordinator(etcd)
        try:
            deadline = time.monotonic() + 15
            while True:
                view = await cluster_view(coord, cluster)
                if (len(view.nodes) >= nodes and view.controller) or time.monotonic() > deadline:
                    return view
                await asyncio.sleep(0.2)
        finally:
            await coord.close()

    return asyncio.run(read())


def _wait_for_signal(children: list[subprocess.Popen[str]]) -> str | None:
    """Block until SIGINT/SIGTERM (None) or until a node exits (its description)."""
    stopping = False

    def handle(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    while not stopping:
        for proc in children:
            if proc.poll() is not None:
                return f"pid {proc.pid}, exit code {proc.returncode}"
        time.sleep(0.2)
    return None
