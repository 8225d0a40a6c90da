"""Real server processes for end-to-end tests: start, read the ports, stop or kill -9."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """``memcluster serve`` in a child process on loopback, on ports the OS picks.

    ``http_url`` and ``mc_url`` come from the first line the server prints. Stop it with
    :meth:`stop` (SIGTERM: graceful) or :meth:`kill` (SIGKILL); only this child's PID is
    signalled.
    """

    def __init__(
        self, data: Path, *extra: str, command: str = "serve", start_timeout_s: float = 30.0
    ) -> None:
        self.data = data
        self.extra = extra
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memcluster.cli.main",
                command,
                "--data",
                str(data),
                "--http-port",
                "0",
                "--peer-port",
                "0",
                *(["--quiet"] if command == "serve" else []),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + start_timeout_s
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if not line.startswith("listening "):
            self.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"server did not start: {line!r} {err[-2000:]}")
        _, self.http_url, self.mc_url = line.split()[:3]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait, return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        self._close_pipes()
        return code

    def kill(self) -> None:
        """SIGKILL: no shutdown, no WAL sync beyond what was acknowledged."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._close_pipes()

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and not self.proc.stderr.closed else ""

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
