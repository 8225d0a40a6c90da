"""The background thread that keeps shards healthy: indexing, TTL sweeps, snapshots, fsyncs.

One thread serves every shard of a process. It loops over the shards calling
:meth:`Shard.maintain`, and sleeps ``maintenance_interval_s`` only when no shard reported more
work, so a burst of writes is indexed as fast as the graph allows. An error in one shard is
logged and does not stop the others.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from memcluster.core.config import Config

log = logging.getLogger("memcluster.maintenance")


class Maintained(Protocol):
    """Anything with background work: a collection shard, the coordination shard."""

    name: str

    def maintain(self) -> bool:
        """One step of background work; True if there may be more to do right away."""
        ...


class Maintainer:
    """Runs ``shard.maintain()`` for the shards that ``shards()`` returns, until stopped."""

    def __init__(self, shards: Callable[[], Sequence[Maintained]], config: Config) -> None:
        self._shards = shards
        self._config = config
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="memcluster-maintenance", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to end and wait for the current step to finish."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            more = False
            for shard in self._shards():
                if self._stop.is_set():
                    return
                try:
                    more |= shard.maintain()
                except Exception:
                    log.exception("%s: background step failed", shard.name)
            if not more:
                self._stop.wait(self._config.maintenance_interval_s)
