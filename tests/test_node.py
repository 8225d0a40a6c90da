"""The node in-process: graceful shutdown with a request in flight, on both protocols.

The server runs on a thread of this process (real sockets on loopback) over a store whose
writes take a known time, so "in flight when the stop came" is certain, not a race.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import uvloop

import memcluster
from memcluster import Memory
from memcluster.core.config import Config
from memcluster.node.auth import Auth
from memcluster.node.server import Listen, serve
from memcluster.node.service import StoreCollection

WRITE_S = 1.0


class _SlowCollection:
    def __init__(self, inner: Any, started: threading.Event) -> None:
        self._inner = inner
        self._started = started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def put_many(
        self,
        memories: Sequence[Memory],
        idempotency_key: str | None = None,
        fence: tuple[str, int] | None = None,
        ack: str | None = None,
        *,
        w: int | None = None,
    ) -> list[int]:
        self._started.set()
        time.sleep(WRITE_S)
        versions: list[int] = self._inner.put_many(memories, idempotency_key, fence, ack, w)
        return versions


class _SlowStore:
    """The embedded database, with put_many taking WRITE_S seconds."""

    def __init__(self, db: memcluster.Database) -> None:
        self.db = db
        self.write_started = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def collection(self, name: str) -> StoreCollection:
        return _SlowCollection(self.db.collection(name), self.write_started)


def _ready(ports: list[int], ready: threading.Event, http: int, peer: int) -> None:
    ports.extend([http, peer])
    ready.set()


@pytest.mark.parametrize("scheme", ["http", "mc"])
def test_stop_waits_for_the_request_in_flight_and_refuses_new_ones(
    tmp_path: Path, scheme: str
) -> None:
    db = memcluster.open(tmp_path / "data")
    db.create_collection("m", dim=2)
    store = _SlowStore(db)
    ports: list[int] = []
    ready = threading.Event()
    loop_box: list[asyncio.AbstractEventLoop] = []
    stop_box: list[asyncio.Event] = []

    async def main() -> None:
        loop_box.append(asyncio.get_running_loop())
        stop_box.append(asyncio.Event())
        await serve(
            store,
            Config(),
            Listen(http_port=0, peer_port=0),
            node="test",
            auth=Auth(None),
            ready=lambda http, peer: _ready(ports, ready, http, peer),
            stop=stop_box[0],
        )

    failures: list[BaseException] = []

    def run() -> None:
        try:
            uvloop.run(main())
        except BaseException as exc:
            failures.append(exc)
            ready.set()

    server = threading.Thread(target=run)
    server.start()
    assert ready.wait(30)
    assert not failures, failures
    url = f"http://127.0.0.1:{ports[0]}" if scheme == "http" else f"mc://127.0.0.1:{ports[1]}"
    results: list[object] = []
    with memcluster.connect(url, retries=0) as client:
        coll = client.collection("m")

        def write() -> None:
            try:
                results.append(coll.put(("a",), "k", vector=[1.0, 0.0]))
            except memcluster.MemclusterError as exc:
                results.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        assert store.write_started.wait(10)
        stopped_at = time.monotonic()
        loop_box[0].call_soon_threadsafe(stop_box[0].set)
        writer.join(30)
        server.join(30)
        assert not server.is_alive()
        assert time.monotonic() - stopped_at >= WRITE_S * 0.5
        # The request in flight finished and was answered; nothing new is accepted.
        assert isinstance(results[0], int), results
        with pytest.raises(memcluster.Unreachable):
            coll.count()
    db.close()
    with memcluster.open(tmp_path / "data") as reopened:
        assert reopened.collection("m").get(("a",), "k") is not None
