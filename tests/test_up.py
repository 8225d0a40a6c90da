"""`memcluster up`: etcd and N nodes start, register and elect a controller; Ctrl-C stops
everything."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from memcluster.cluster.coordinator import EtcdCoordinator
from memcluster.cluster.view import cluster_view


def test_up_starts_a_cluster_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memcluster.cli.main",
            "up",
            "--nodes",
            "2",
            "--data",
            str(tmp_path / "c"),
            "--cluster",
            "t",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not (lines and lines[-1].startswith("cluster t up")):
            assert time.monotonic() < deadline, lines
            line = proc.stdout.readline()
            assert line, (lines, proc.stderr.read() if proc.stderr else "")
            lines.append(line.strip())
        etcd_url = lines[0].split()[1]
        assert [line.split()[1] for line in lines[1:3]] == ["n1", "n2"]
        assert "2/2 nodes" in lines[-1]

        async def read() -> tuple[int, str | None]:
            coord = EtcdCoordinator(etcd_url)
            try:
                view = await cluster_view(coord, "t")
                return len(view.nodes), view.controller
            finally:
                await coord.close()

        nodes, controller = asyncio.run(read())
        assert nodes == 2
        assert controller in ("n1", "n2")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        rest = proc.stdout.read()
        assert "stopped" in rest
        port = urlsplit(etcd_url).port
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "etcd still listening"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
