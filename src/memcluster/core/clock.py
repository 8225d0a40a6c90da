"""Time, as the one thing every layer asks for and tests control.

``Clock.time()`` is wall time in seconds since the epoch: it stamps ``created_at`` and
computes ``expires_at``, which must survive a restart. ``Clock.monotonic()`` measures
intervals (deadlines, sync periods) and never goes backwards. ``ManualClock`` is the in-memory
twin: tests move it forward by hand, so TTL tests never sleep.
"""

from __future__ import annotations

import threading
import time as _time
from typing import Protocol


class Clock(Protocol):
    """A source of wall and monotonic time. Implementations are thread-safe."""

    def time(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never decreases."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return _time.time()

    def monotonic(self) -> float:
        return _time.monotonic()


class ManualClock:
    """A clock that moves only when told to. Both readings advance together."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (>= 0)."""
        assert seconds >= 0, "a clock never goes backwards"
        with self._lock:
            self._now += seconds
