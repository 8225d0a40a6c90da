"""Shared fixtures: a database with a manual clock and no background thread."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

import memcluster
from memcluster.core.clock import ManualClock
from memcluster.core.config import Config


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
