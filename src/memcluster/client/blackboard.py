"""The blackboard: a namespace that agents share, with triggers on what gets written to it.

A board is a namespace of a collection. A **trigger** is a predicate over the writes to it: a
metadata filter (``where``), and/or a vector similarity at or above a threshold (``near=(vector,
min_score)``, scored with the collection's metric, as a search would score it). **Knowledge
sources** are handlers woken by the writes their trigger matches; they may write back::

    board = db.blackboard("memories", ("team-a", "board-1"))

    @board.on(where={"kind": "hypothesis"}, near=(vec, 0.8))
    def review(event):
        board.collection.put(("team-a", "board-1"), f"review-{event.key}", ...)

    board.start()          # one subscription per handler, each on its own thread
    ...
    board.stop()           # board.errors lists what the handlers raised

It works the same on every client (embedded, HTTP, binary), since it is built on
``subscribe``. ``where`` runs on the server, as the subscription's filter. ``near`` runs here,
on the vectors the subscription delivers. A trigger with ``near`` matches puts only, because
a delete carries no vector. A handler's exception is logged and appended to ``board.errors``
(and passed to ``on_error`` if given). It is never swallowed, and it does not stop the other
handlers or the handler's own later events.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from memcluster.core import validation
from memcluster.core.config import Config
from memcluster.core.errors import InvalidArgument, InvalidState, MemclusterError, is_retryable
from memcluster.core.types import CollectionConfig, Event, EventOp
from memcluster.index.vector import scores

log = logging.getLogger("memcluster.blackboard")

Handler = Callable[[Event], None]


class _Collection(Protocol):
    config: CollectionConfig

    def subscribe(
        self,
        namespace: Sequence[str] | None = None,
        filter: Mapping[str, Any] | None = None,
        cursor: str | None = None,
        include_vectors: bool = False,
        idle_timeout_s: float | None = None,
    ) -> Iterator[Event]: ...
    def feed_cursor(self) -> str: ...


class _Store(Protocol):
    def collection(self, name: str) -> Any: ...


class Trigger:
    """A predicate over the writes to a board."""

    def __init__(
        self,
        config: CollectionConfig,
        where: Mapping[str, Any] | None,
        near: tuple[Any, float] | None,
    ) -> None:
        self.where = None if where is None else dict(where)
        self.near = near
        self._config = config
        self._query: np.ndarray | None = None
        self._min_score = 0.0
        if near is not None:
            if (
                not isinstance(near, tuple | list)
                or len(near) != 2
                or np.ndim(near[0]) != 1
                or isinstance(near[1], bool)
                or not isinstance(near[1], int | float)
            ):
                raise InvalidArgument("near must be (vector, min_score), such as (embedding, 0.8)")
            self._query = validation.query_vector(near[0], config.dim, config.metric)
            self._min_score = float(near[1])

    def matches(self, event: Event) -> bool:
        """Whether a delivered event (already filtered by ``where``) passes ``near``."""
        if self._query is None:
            return True
        if event.op is not EventOp.PUT or event.vector is None:
            return False
        vector = np.asarray(event.vector, dtype=np.float32).reshape(1, -1)
        return float(scores(vector, self._query, self._config.metric)[0]) >= self._min_score


class Blackboard:
    """A board: namespace ``board`` of collection ``collection``. See the module docstring."""

    def __init__(
        self,
        store: _Store,
        collection: str,
        board: Sequence[str],
        on_error: Callable[[Handler, Event, BaseException], None] | None = None,
    ) -> None:
        self.collection = store.collection(collection)
        self.board = validation.namespace(board, Config())
        self.errors: list[tuple[Handler, Event, BaseException]] = []
        """(handler, event, exception) for every handler failure, in order."""
        self._on_error = on_error
        self._handlers: list[tuple[Handler, Trigger]] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def watch(
        self,
        where: Mapping[str, Any] | None = None,
        near: tuple[Any, float] | None = None,
        cursor: str | None = None,
        idle_timeout_s: float | None = None,
    ) -> Iterator[Event]:
        """The writes to the board that match ``where`` and ``near``, as they happen."""
        trigger = Trigger(self.collection.config, where, near)
        for event in self.collection.subscribe(
            namespace=self.board,
            filter=trigger.where,
            cursor=cursor,
            include_vectors=near is not None,
            idle_timeout_s=idle_timeout_s,
        ):
            if trigger.matches(event):
                yield event

    def on(
        self, where: Mapping[str, Any] | None = None, near: tuple[Any, float] | None = None
    ) -> Callable[[Handler], Handler]:
        """Register the decorated function as a knowledge source for matching writes."""
        trigger = Trigger(self.collection.config, where, near)

        def register(handler: Handler) -> Handler:
            self._handlers.append((handler, trigger))
            return handler

        return register

    def start(self) -> None:
        """Start every registered handler on its own thread, from now on."""
        self._stop.clear()
        ready = []
        for handler, trigger in self._handlers:
            started = threading.Event()
            thread = threading.Thread(
                target=self._serve,
                args=(handler, trigger, started),
                name=f"blackboard-{getattr(handler, '__name__', 'handler')}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
            ready.append(started)
        for started in ready:
            started.wait(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the handlers (each finishes the event it is handling)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()

    def _serve(self, handler: Handler, trigger: Trigger, started: threading.Event) -> None:
        # Subscriptions end every 0.2 s idle to check for stop(); the cursor carries over, so
        # nothing written in between is missed.
        try:
            cursor = self.collection.feed_cursor()
        finally:
            started.set()
        while not self._stop.is_set():
            try:
                events = self.collection.subscribe(
                    namespace=self.board,
                    filter=trigger.where,
                    cursor=cursor,
                    include_vectors=trigger.near is not None,
                    idle_timeout_s=0.2,
                )
                for event in events:
                    cursor = event.cursor
                    if trigger.matches(event):
                        self._call(handler, event)
                    if self._stop.is_set():
                        break
                close = getattr(events, "close", None)
                if close is not None:
                    close()
            except InvalidState:
                return  # the database or client was closed
            except MemclusterError as exc:
                if not is_retryable(exc):
                    raise
                log.warning("blackboard: subscription lost (%s); resuming from its cursor", exc)
                self._stop.wait(0.5)

    def _call(self, handler: Handler, event: Event) -> None:
        try:
            handler(event)
        except Exception as exc:
            log.exception("blackboard handler %s failed on %s", handler, event.key)
            self.errors.append((handler, event, exc))
            if self._on_error is not None:
                self._on_error(handler, event, exc)
