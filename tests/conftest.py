"""Shared fixtures: a database with a manual clock and no background thread; a server
process; and ``store``, the same interface embedded, over HTTP and over the binary protocol."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import memcluster
from memcluster.core.clock import ManualClock
from memcluster.core.config import Config
from server_util import ServerProcess


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def config() -> Config:
    return Config(background=False)


@pytest.fixture
def db(tmp_path: Path, config: Config, clock: ManualClock) -> Iterator[memcluster.Database]:
    with memcluster.open(tmp_path / "data", config, clock=clock) as database:
        yield database


@pytest.fixture
def seed() -> int:
    """A seed for a randomized test: MEMCLUSTER_SEED if set, else random; always printed."""
    value = int(os.environ.get("MEMCLUSTER_SEED", random.randrange(2**32)))
    print(f"seed: MEMCLUSTER_SEED={value}")
    return value


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("server") / "data")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(params=["embedded", "http", "binary"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The same interface three ways: memcluster.open(), connect("http://"), connect("mc://")."""
    kind = request.param
    if kind == "embedded":
        with memcluster.open(tmp_path / "data") as db:
            yield db
        return
    server: ServerProcess = request.getfixturevalue("server")
    with memcluster.connect(server.http_url if kind == "http" else server.mc_url) as client:
        for name in client.list_collections():
            client.drop_collection(name)
        yield client
