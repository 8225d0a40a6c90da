"""The binary protocol over asyncio streams: a multiplexing client and a bounded server.

Both ends drive the sans-IO :mod:`memcluster.transport.frames` with bytes read from the socket
in chunks of :data:`READ_CHUNK_BYTES`. TCP_NODELAY is set on both ends: frames are written
whole, so Nagle's algorithm would only add latency.

Client: :class:`Connection`
---------------------------

::

    Connection.open() ──hello/welcome──> open ──close()───────────> closed
                                          │                            ^
                                          └──EOF, reset, bad frame──> lost

* :meth:`Connection.open` connects, sends :class:`~memcluster.transport.frames.Hello` and waits
  for the :class:`~memcluster.transport.frames.Welcome`, all within ``connect_timeout_s``.
  Failing to connect raises :class:`~memcluster.core.errors.Unreachable`; a refused hello
  raises the server's error (``Unauthenticated``, ``ProtocolError``, ...).
* :meth:`Connection.request` gives each request the next id, writes its frame, and waits on a
  future that the connection's **reader task** completes when the reply with that id arrives.
  Any number of requests may be in flight at once from any number of tasks: they are
  pipelined on the one socket and their replies may come back in any order.
* Backpressure on the client: ``request`` awaits ``drain()`` after writing, so senders slow
  down to the pace at which the socket accepts bytes.
* Write coalescing (both ends): the first frame written in an event-loop iteration goes to
  the socket at once; frames written after it in the same iteration are joined and written
  together just after it. A lone request pays no added latency, and a thousand pipelined
  requests cost two system calls per iteration instead of a thousand.
* A timeout (``timeout_s``) raises :class:`~memcluster.core.errors.Timeout`; the request stays
  sent, and its late reply is dropped when it comes.
* The connection is **lost** when the server closes it, the socket fails, or the server sends
  bytes that are not frames. Every request waiting then, and every later request, raises
  :class:`~memcluster.core.errors.Unreachable`: a request already sent may or may not have
  been applied. A lost connection is never reopened; open a new one.
* :meth:`Connection.close` is idempotent: it fails waiting requests (and streams) with
  ``Unreachable``, cancels and awaits the reader task, and closes the socket.

Streams on the client
~~~~~~~~~~~~~~~~~~~~~

:meth:`Connection.stream` is an async generator: when iteration starts it sends the request
(with the next id, like :meth:`~Connection.request`), then yields the items as they arrive.
The reader task appends each frame of a stream to that stream's buffer (a deque) and wakes
its consumer; it never waits for a consumer while it routes the frames of a chunk, so one
slow consumer does not delay frames already read for others. ``"end"`` finishes the
iteration, ``"error"`` raises the server's error, a lost connection raises ``Unreachable``;
each comes after the items received before it. Leaving the iteration early (``break``, an
exception, ``aclose()``, or the generator being garbage collected) sends ``"cancel"`` and
forgets the stream; its frames still in flight are dropped when they come.

A stream's buffer holds at most ``stream_buffer_items`` items (plus those of the chunk being
routed). When a consumer falls that far behind, the reader stops reading the socket until it
has taken half of them: the kernel's buffers fill, the server's ``drain()`` waits, and the
producer stops. That is what makes a slow consumer slow down its producer instead of growing
the client's memory, and it has a price: while the reader waits, **nothing** on the
connection moves, neither other streams nor replies to requests. So a task must not wait for
another request or stream of the same connection while it holds a stream it is not consuming;
and long-lived subscriptions belong on a connection of their own, where only their own
consumer can stall them.

Server: :class:`BinaryServer`
-----------------------------

The caller binds and listens on the socket (so it can report "port in use" clearly and use
port 0) and passes a :class:`Dispatcher`, which checks each hello and serves each request.
Every connection goes through these states::

    handshake ──welcome──> serving ──EOF, bad frame, server closing──> draining ──> closed
        │                                                                ^
        └──refused (error frame), EOF, no hello in time───────────────────┘

* **handshake**: the first frame must be a hello (of at most
  :data:`~memcluster.transport.frames.HELLO_FRAME_BYTES_MAX` bytes), within
  ``handshake_timeout_s``. The server
  picks the protocol version, asks :meth:`Dispatcher.hello` for a session (or a refusal), and
  answers welcome, or an error frame before it closes the connection.
* **serving**: a reader loop feeds chunks to the frame decoder and starts one task per request
  in the connection's :class:`asyncio.TaskGroup`. Each task awaits :meth:`Dispatcher.call`,
  encodes the reply (``"ok"``, or ``"error"`` for a :class:`MemclusterError`; any other
  exception is a bug, logged and reported as code ``internal``), writes it and awaits
  ``drain()``. A request whose kind the dispatcher streams (:class:`StreamingDispatcher`)
  gets a stream task instead (below); a ``"cancel"`` frame is handled by the reader itself.
* **draining**: the reader has stopped, and so has every stream; requests in flight finish
  and their replies are written; then the socket is closed (after at most
  :data:`CLOSE_FLUSH_TIMEOUT_S` for the last bytes to leave).

Backpressure on the server
~~~~~~~~~~~~~~~~~~~~~~~~~~

At most ``max_in_flight`` requests per connection are served at once. When that many are in
flight, the reader loop waits for one to finish before it starts the next request and
before it reads more bytes. So a client that floods requests and never reads the replies
cannot grow the server's memory without bound: its replies fill the socket buffers, the
tasks writing them wait in ``drain()`` and stay in flight, the reader stops, the kernel's
receive buffer fills, and TCP flow control stops the client. What the server holds for one
connection is bounded by ``max_in_flight`` requests and replies, ``max_streams`` streams with
one burst of items each, one chunk of decoded frames, and asyncio's stream buffers.

Errors on a connection stay on that connection: garbage bytes, an oversized frame or a bad
envelope get a best-effort ``protocol_error`` frame (id 0) and the connection is closed. A
client that disconnects mid-request does not disturb its requests in flight; they finish,
and their replies, having nowhere to go, are dropped (with a debug log).

Streams on the server
~~~~~~~~~~~~~~~~~~~~~

A stream task iterates :meth:`StreamingDispatcher.stream` and writes each item as an
``"item"`` frame. After every :data:`STREAM_BURST_ITEMS` items or :data:`STREAM_BURST_BYTES`
bytes it gives the event loop a turn, so that a producer that never waits cannot starve the
connection's other work, and awaits ``drain()``, so that a client that does not read stops the
producer. The items of a burst go out in one write (at once if the producer waits
meanwhile), and the server holds at most one burst of a stream beyond what the socket buffers
hold. (Between two turns ``drain()`` would be pointless: the items written since the last one
are still in the writer's coalescing buffer, which drain does not see.) The final frame is
``"end"`` when the producer is exhausted, ``"error"`` for a :class:`MemclusterError` it
raises (any other exception is a bug: logged, code ``internal``). A stream counts toward
:attr:`BinaryServer.in_flight` while it runs.

Streams do not take the request slots of ``max_in_flight``: they may never end, and a reader
waiting for a slot held by an endless stream could never read the ``"cancel"`` that frees
it. Instead at most ``max_streams`` streams run per connection, and one more is refused at
once with ``overloaded``. A stream is stopped early, its producer cancelled (the exception
lands where it waits) and closed (an async generator's ``finally`` runs), in three cases:

* by the client's ``"cancel"``: the final frame is ``"end"``;
* when the reader stops (the client half-closed the connection or sent a bad frame) or the
  server shuts down: the final frame is an ``"error"`` with code ``unreachable``, which the
  client raises as :class:`~memcluster.core.errors.Unreachable`, as it would a dropped
  connection;
* when a write fails because the client is gone: nothing more is written.

Items share the connection's byte stream with everything else, so a stream producing faster
than the client reads delays the replies queued behind its items, and a stream whose
consumer has paused the client's reader (above) holds up the whole connection. Clients
should give long subscriptions a connection of their own.

Graceful shutdown
~~~~~~~~~~~~~~~~~

:meth:`BinaryServer.close` stops accepting connections, stops every connection's reader
(requests not yet started are dropped unanswered), stops every stream at once (streams may
never end, so waiting for them would always take the whole grace period; each ends with its
``unreachable`` error frame), lets requests in flight finish and their replies be written
for up to ``grace_s``, then cancels whatever still runs and closes every connection. The
server owns one task per connection; each owns its request and stream tasks; close awaits
them all, so nothing outlives the server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Any, Final, Protocol, TypeGuard, TypeVar, assert_never

from memcluster.core.api import Empty, ErrorBody
from memcluster.core.errors import (
    ERROR_TABLE,
    InvalidArgument,
    MemclusterError,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    Timeout,
    Unreachable,
    error_from_wire,
)
from memcluster.transport.frames import (
    CANCEL,
    END,
    ERROR,
    HEADER_BYTES,
    HELLO,
    HELLO_FRAME_BYTES_MAX,
    ITEM,
    MAX_FRAME_BYTES_DEFAULT,
    OK,
    PROTOCOL_VERSION,
    WELCOME,
    Envelope,
    FrameDecoder,
    Hello,
    Welcome,
    check_welcome,
    choose_version,
    decode_body,
    encode_frame,
    error_body,
)

T = TypeVar("T")

log = logging.getLogger("memcluster.transport")

READ_CHUNK_BYTES: Final = 256 << 10
"""How much one read from a socket asks for (also the stream buffer's pause threshold)."""

CLOSE_FLUSH_TIMEOUT_S: Final = 5.0
"""How long closing a connection waits for its last bytes to leave before aborting it."""

STREAM_BUFFER_ITEMS_DEFAULT: Final = 1024
"""Default of ``stream_buffer_items``: how far a stream's consumer may fall behind before the
client stops reading its connection (see "Streams on the client")."""

MAX_STREAMS_DEFAULT: Final = 64
"""Default of ``max_streams``: the streams a server runs at once per connection."""

STREAM_BURST_ITEMS: Final = 32
STREAM_BURST_BYTES: Final = 64 << 10
"""A stream task gives the event loop a turn and awaits ``drain()`` after this many items or
bytes (whichever comes first): often enough to be fair to the connection's other work and to
stop soon for a client that does not read, seldom enough that the items between two turns go
out in one write (a turn per item costs ten times the throughput)."""

_INTERNAL_CODE: Final = ERROR_TABLE[MemclusterError].code


def _peer_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _os_reason(exc: OSError) -> str:
    """The human part of a connect error: "Connection refused", not "[Errno 111] Connect call
    failed ('127.0.0.1', 7701)"."""
    if isinstance(exc, ssl.SSLError | socket.gaierror):
        return exc.strerror or str(exc)
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class _FrameWriter:
    """Coalesces the frames written during one event-loop iteration into few socket writes.

    Each ``transport.write`` costs a system call when the transport's buffer is empty, and with
    many requests in flight dozens of frames are written per iteration. So the first frame of
    an iteration goes to the transport at once (no added latency for a lone request), and the
    frames that follow it in the same iteration are queued and handed over together by a
    callback scheduled with ``call_soon``: at most two writes per iteration, however many
    frames. ``drain`` is the stream's: it waits while the transport's buffer is over its
    high-water mark.
    """

    def __init__(self, stream: asyncio.StreamWriter) -> None:
        self.stream = stream
        self._loop = asyncio.get_running_loop()
        self._frames: list[bytes] = []
        self._burst = False
        """A frame went out in this iteration and :meth:`flush` is scheduled."""

    def is_closing(self) -> bool:
        return self.stream.is_closing()

    def write(self, frame: bytes) -> None:
        if self._burst:
            self._frames.append(frame)
        elif not self.stream.is_closing():  # else the peer is gone (uvloop would raise)
            self._burst = True
            self._loop.call_soon(self.flush)
            self.stream.write(frame)

    def flush(self) -> None:
        """Hand the queued frames to the transport; end the burst."""
        self._burst = False
        frames = self._frames
        if not frames:
            return
        self._frames = []
        if not self.stream.is_closing():  # else the peer is gone and so is the data's purpose
            self.stream.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def drain(self) -> None:
        await self.stream.drain()

    async def close(self, name: str) -> None:
        """Flush, close, and wait up to :data:`CLOSE_FLUSH_TIMEOUT_S` for the buffered bytes to
        leave (a peer that stopped reading could hold them forever); then abort."""
        self.flush()
        stream = self.stream
        stream.close()
        try:
            async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT_S):
                await stream.wait_closed()
        except TimeoutError:
            log.debug("binary protocol: %s did not take its last bytes; aborting", name)
            stream.transport.abort()
        except OSError:
            pass  # the connection had failed already: nothing left to flush
        except asyncio.CancelledError:
            stream.transport.abort()
            raise


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- client ------------------------------------------------------------------------------------


class _ClientStream:
    """The client's side of one stream: frames the reader task received and the consumer has
    not taken yet, in order (the final ``"end"`` or ``"error"`` frame included)."""

    __slots__ = ("frames", "lost", "waiter")

    def __init__(self) -> None:
        self.frames: collections.deque[Envelope] = collections.deque()
        self.lost = False
        """The connection is gone: after the buffered frames, the consumer raises Unreachable."""
        self.waiter: asyncio.Future[None] | None = None
        """Set while the consumer waits for a frame; the reader completes it."""

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection:
    """One client connection to a binary protocol server, shared by any number of tasks.

    Create it with :meth:`open`. Safe to use from many tasks of one event loop at once (not
    from several threads or loops).
    """

    welcome: Welcome
    """The server's welcome: the protocol version, the node's name and its frame limit."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder,
        welcome: Welcome,
        peer: str,
        stream_buffer_items: int = STREAM_BUFFER_ITEMS_DEFAULT,
    ) -> None:
        """Internal: use :meth:`open`, which does the handshake first."""
        self.welcome = welcome
        self._reader = reader
        self._writer = _FrameWriter(writer)
        self._decoder = decoder
        self._peer = peer
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[Envelope | None]] = {}
        """Futures of the requests waiting for a reply, by id. ``None`` means "lost"."""
        self._streams: dict[int, _ClientStream] = {}
        """Streams whose final frame has not arrived, by id."""
        self._stream_buffer_items = stream_buffer_items
        self._full: set[_ClientStream] = set()
        """Streams holding ``stream_buffer_items`` frames or more; the reader waits while any
        does (it is removed once its consumer took half of them, or left)."""
        self._room = asyncio.Event()
        """Set exactly when ``_full`` is empty: the reader may read."""
        self._room.set()
        self._next_id = 1
        self._closed = False
        self._lost_reason: str | None = None
        self._reader_task = asyncio.create_task(
            self._read_replies(), name=f"memcluster.transport reader for {peer}"
        )

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        api_key: str | None = None,
        ssl: ssl.SSLContext | None = None,
        connect_timeout_s: float = 5.0,
        max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT,
        stream_buffer_items: int = STREAM_BUFFER_ITEMS_DEFAULT,
    ) -> Connection:
        """Connect to ``host:port`` and do the handshake, both within ``connect_timeout_s``.

        Raises :class:`Unreachable` when the connection cannot be made (refused, unknown host,
        TLS failure, no welcome in time), the server's error when it refuses the hello (e.g.
        :class:`~memcluster.core.errors.Unauthenticated`), and :class:`ProtocolError` when the
        peer does not speak this protocol or chose a version this client does not speak.
        ``max_frame_bytes`` limits the replies this client accepts. ``stream_buffer_items``
        (at least 1) is how many items of one stream the client holds for a consumer that
        falls behind before it stops reading the connection (see "Streams on the client").
        """
        if stream_buffer_items < 1:
            raise InvalidArgument(
                f"binary protocol: stream_buffer_items must be at least 1, got "
                f"{stream_buffer_items}"
            )
        peer = _peer_name(host, port)
        deadline = asyncio.get_running_loop().time() + connect_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ssl, limit=READ_CHUNK_BYTES
                )
        except TimeoutError:
            raise Unreachable(
                f"binary protocol: cannot connect to {peer}: no answer within "
                f"{connect_timeout_s} s; is the server running?"
            ) from None
        except OSError as exc:
            raise Unreachable(
                f"binary protocol: cannot connect to {peer}: {_os_reason(exc)}; "
                "is the server running?"
            ) from exc
        _set_nodelay(writer)
        decoder = FrameDecoder(max_frame_bytes)
        try:
            async with asyncio.timeout_at(deadline):
                welcome = await _client_handshake(reader, writer, decoder, peer, api_key)
        except BaseException as exc:
            writer.transport.abort()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if isinstance(exc, TimeoutError):
                raise Unreachable(
                    f"binary protocol: {peer} accepted the connection but sent no welcome "
                    f"within {connect_timeout_s} s; is it a memcluster binary endpoint?"
                ) from None
            if isinstance(exc, OSError):
                raise Unreachable(
                    f"binary protocol: connection to {peer} lost during the handshake: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            raise
        return cls(reader, writer, decoder, welcome, peer, stream_buffer_items)

    @property
    def closed(self) -> bool:
        """True once the connection was closed or lost; every request then raises Unreachable."""
        return self._closed

    @property
    def peer(self) -> str:
        """``host:port`` of the server."""
        return self._peer

    @property
    def pending(self) -> int:
        """Requests waiting for their reply."""
        return len(self._pending)

    @property
    def streams(self) -> int:
        """Streams started and neither ended by the server nor left by their consumer."""
        return len(self._streams)

    async def request(
        self, kind: str, body: Any, reply_type: type[T], *, timeout_s: float | None = None
    ) -> T:
        """Send one request and return its reply body, decoded as ``reply_type``.

        Raises the server's error for an ``"error"`` reply (rebuilt by
        :func:`~memcluster.core.errors.error_from_wire`, so ``VersionConflict`` keeps its
        ``expected`` and ``actual``); :class:`Timeout` when no reply came within ``timeout_s``
        (``None``: wait as long as the connection lives); :class:`Unreachable` when the
        connection is or gets lost; :class:`PayloadTooLarge`, without sending anything, for a
        frame over the server's ``max_frame_bytes``; :class:`ProtocolError` for a reply that
        is not ``reply_type``. Cancelling the calling task abandons the request (the reply is
        dropped when it comes).
        """
        request_id, frame = self._new_request(kind, body)
        future: asyncio.Future[Envelope | None] = self._loop.create_future()
        self._pending[request_id] = future
        try:
            if timeout_s is None:
                self._writer.write(frame)
                await self._writer.drain()
                envelope = await future
            else:
                try:
                    async with asyncio.timeout(timeout_s) as deadline:
                        self._writer.write(frame)
                        await self._writer.drain()
                        envelope = await future
                except TimeoutError:
                    if not deadline.expired():
                        raise  # the socket's own ETIMEDOUT: handled below, as a lost connection
                    raise Timeout(
                        f"binary protocol: no reply to {kind} within {timeout_s} s"
                    ) from None
        except OSError as exc:
            raise self._unreachable(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)
        if envelope is None:
            raise self._unreachable()
        if envelope.kind == OK:
            try:
                return decode_body(envelope, reply_type)
            except InvalidArgument as exc:
                raise ProtocolError(
                    f"binary protocol: the reply of {self._peer} to {kind} is not a "
                    f"{getattr(reply_type, '__name__', reply_type)}: {exc}"
                ) from exc
        if envelope.kind == ERROR:
            error = _decode_error(envelope, self._peer)
            raise error_from_wire(error.code, error.message, error.details)
        raise ProtocolError(
            f"binary protocol: the reply of {self._peer} to {kind} has kind "
            f"{envelope.kind!r}; expected 'ok' or 'error'"
        )

    async def stream(self, kind: str, body: Any, item_type: type[T]) -> AsyncGenerator[T, None]:
        """Send a streaming request and yield its items, decoded as ``item_type``, in order.

        An async generator: nothing is sent until iteration starts. The iteration finishes
        when the server ends the stream. It raises the server's error for an ``"error"``
        frame, after the items sent before it; :class:`Unreachable` when the connection is or
        gets lost (after the items already received), which includes the server shutting down;
        :class:`PayloadTooLarge`, without sending anything, for a request over the server's
        ``max_frame_bytes``; :class:`ProtocolError` for an item that is not ``item_type``.
        There is no timeout: a subscription may be quiet for as long as it likes; wrap the
        iteration in :func:`asyncio.timeout` to bound it.

        Leaving the iteration early (``break``, an exception in the loop's body, cancelling
        the consuming task, :meth:`aclose`) cancels the stream on the server. After a ``break``
        the cancel is sent when the generator is garbage collected, which CPython does at
        once; ``async with contextlib.aclosing(conn.stream(...)) as items`` makes it
        deterministic. Any number of streams and requests may run on one connection at once,
        but a consumer that falls ``stream_buffer_items`` behind stalls them all (see "Streams
        on the client").
        """
        stream_id, frame = self._new_request(kind, body)
        stream = _ClientStream()
        self._streams[stream_id] = stream
        try:
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except OSError as exc:
                raise self._unreachable(f"{type(exc).__name__}: {exc}") from exc
            while True:
                envelope = await self._next_frame(stream)
                if envelope is None:
                    raise self._unreachable()
                if envelope.kind == ITEM:
                    try:
                        item = decode_body(envelope, item_type)
                    except InvalidArgument as exc:
                        raise ProtocolError(
                            f"binary protocol: an item of {self._peer}'s {kind} stream is not "
                            f"a {getattr(item_type, '__name__', item_type)}: {exc}"
                        ) from exc
                    yield item
                elif envelope.kind == END:
                    return
                elif envelope.kind == ERROR:
                    error = _decode_error(envelope, self._peer)
                    raise error_from_wire(error.code, error.message, error.details)
                else:
                    raise ProtocolError(
                        f"binary protocol: {self._peer} sent a frame of kind {envelope.kind!r} "
                        f"in the {kind} stream; expected 'item', 'end' or 'error'"
                    )
        finally:
            self._make_room(stream)
            stream.frames.clear()
            if self._streams.pop(stream_id, None) is not None:
                # The consumer left before the final frame: stop the producer. No drain():
                # this may run in a generator being finalized, and the frame is tiny.
                self._writer.write(encode_frame(stream_id, CANCEL, Empty()))

    async def close(self) -> None:
        """Close the connection; requests and streams still waiting raise Unreachable.
        Idempotent."""
        if not self._closed:
            self._lost("closed by this client")
        self._reader_task.cancel()
        await asyncio.wait({self._reader_task})
        transport = self._writer.stream.transport
        if transport.get_write_buffer_size():
            # Only requests that already failed with Unreachable are unsent: do not wait for a
            # server that stopped reading to take them.
            transport.abort()
        await self._writer.close(self._peer)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _new_request(self, kind: str, body: Any) -> tuple[int, bytes]:
        """The next id and the frame of a request (or stream) with it; checks the frame limit."""
        if self._closed:
            raise self._unreachable()
        request_id = self._next_id
        self._next_id = request_id + 1
        frame = encode_frame(request_id, kind, body)
        if len(frame) - HEADER_BYTES > self.welcome.max_frame_bytes:
            raise PayloadTooLarge(
                f"binary protocol: {kind} request of {len(frame) - HEADER_BYTES} bytes is over "
                f"the frame limit of {self.welcome.max_frame_bytes} bytes of {self._peer}; "
                "send smaller batches"
            )
        return request_id, frame

    async def _next_frame(self, stream: _ClientStream) -> Envelope | None:
        """The stream's next frame, waiting for the reader if need be; None once it is lost."""
        while not stream.frames:
            if stream.lost:
                return None
            stream.waiter = self._loop.create_future()
            try:
                await stream.waiter
            finally:
                stream.waiter = None
        envelope = stream.frames.popleft()
        if stream in self._full and len(stream.frames) <= self._stream_buffer_items // 2:
            self._make_room(stream)
        return envelope

    def _deliver(self, stream_id: int, stream: _ClientStream, envelope: Envelope) -> None:
        """The reader's half: buffer a stream's frame, wake its consumer; never waits."""
        if envelope.kind != ITEM:
            del self._streams[stream_id]  # the final frame: the server is done with this id
        stream.frames.append(envelope)
        if len(stream.frames) >= self._stream_buffer_items and stream not in self._full:
            self._full.add(stream)
            self._room.clear()
        stream.wake()

    def _make_room(self, stream: _ClientStream) -> None:
        """The stream's buffer is no longer full; let the reader go on if no other is."""
        self._full.discard(stream)
        if not self._full:
            self._room.set()

    def _unreachable(self, reason: str | None = None) -> Unreachable:
        reason = reason or self._lost_reason or "closed"
        return Unreachable(
            f"binary protocol: connection to {self._peer} lost ({reason}); a request already "
            "sent may or may not have been applied"
        )

    def _lost(self, reason: str) -> None:
        """Mark the connection closed, wake every waiting request, and close the socket."""
        if self._lost_reason is None:
            self._lost_reason = reason
        self._closed = True
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_result(None)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.lost = True
            stream.wake()
        self._writer.stream.close()

    async def _read_replies(self) -> None:
        """The reader task: route each reply to the future of its request and each frame of a
        stream to its buffer, until EOF; pause while a stream's buffer is full."""
        reason = "the server closed it"
        try:
            while True:
                while self._full:
                    await self._room.wait()
                data = await self._reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                for envelope in self._decoder.feed(data):
                    future = self._pending.pop(envelope.id, None)
                    if future is not None:
                        if not future.done():
                            future.set_result(envelope)
                    elif (stream := self._streams.get(envelope.id)) is not None:
                        self._deliver(envelope.id, stream, envelope)
                    elif envelope.id == 0 and envelope.kind == ERROR:
                        # The server reports why it is about to close the connection.
                        error = _decode_error(envelope, self._peer)
                        reason = f"the server reported {error.code}: {error.message}"
                    # Otherwise: the late reply of a request that timed out or was cancelled,
                    # or a frame of a stream its consumer left.
        except ProtocolError as exc:
            log.warning("binary protocol: %s sent a bad frame: %s", self._peer, exc)
            reason = str(exc)
        except OSError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            log.exception("binary protocol: bug in the reader of %s", self._peer)
            reason = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            self._lost(reason)


async def _client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    decoder: FrameDecoder,
    peer: str,
    api_key: str | None,
) -> Welcome:
    writer.write(encode_frame(0, HELLO, Hello(versions=[PROTOCOL_VERSION], api_key=api_key)))
    await writer.drain()
    envelopes: list[Envelope] = []
    while not envelopes:
        data = await reader.read(READ_CHUNK_BYTES)
        if not data:
            raise Unreachable(
                f"binary protocol: {peer} closed the connection during the handshake; is it a "
                "memcluster binary endpoint?"
            )
        try:
            envelopes = decoder.feed(data)
        except ProtocolError as exc:
            raise ProtocolError(
                f"binary protocol: {peer} did not answer the hello with a frame ({exc}); is it "
                "a memcluster binary endpoint (not the HTTP port)?"
            ) from exc
    first = envelopes[0]
    if first.kind == ERROR:
        error = _decode_error(first, peer)
        raise error_from_wire(error.code, error.message, error.details)
    if first.kind != WELCOME:
        raise ProtocolError(
            f"binary protocol: {peer} answered the hello with kind {first.kind!r}, not 'welcome'"
        )
    try:
        welcome = decode_body(first, Welcome)
    except InvalidArgument as exc:
        raise ProtocolError(f"binary protocol: bad welcome from {peer}: {exc}") from exc
    check_welcome(welcome)
    return welcome


def _decode_error(envelope: Envelope, peer: str) -> ErrorBody:
    try:
        return decode_body(envelope, ErrorBody)
    except InvalidArgument as exc:
        return ErrorBody(
            code=ERROR_TABLE[ProtocolError].code,
            message=f"binary protocol: {peer} sent an error reply that is not an ErrorBody: {exc}",
        )


# -- server ------------------------------------------------------------------------------------


class Dispatcher(Protocol):
    """What a :class:`BinaryServer` serves: the node's request handling, seen from the wire.

    Both methods run on the server's event loop. ``call`` runs concurrently with itself: up to
    ``max_in_flight`` calls per connection, on any number of connections. A dispatcher that
    also has the two methods of :class:`StreamingDispatcher` serves streams too.
    """

    def hello(self, hello: Hello) -> object:
        """Check the handshake (api key); return the session object passed to every call.
        Raises a MemclusterError (e.g. Unauthenticated) to refuse."""
        ...

    async def call(self, session: object, envelope: Envelope) -> Any:
        """Serve one request; return the reply body (a msgspec Struct). Raises
        MemclusterError for error replies.

        Decode the body with :func:`~memcluster.transport.frames.decode_body`, whose
        ``InvalidArgument`` becomes an error reply. Any other exception is treated as a bug:
        logged, and reported to the client as code ``internal``. Cancelled only when the
        server's shutdown grace period runs out.
        """
        ...


class StreamingDispatcher(Dispatcher, Protocol):
    """A :class:`Dispatcher` that also serves streams: requests answered by many items.

    Both methods are optional for a dispatcher: :class:`BinaryServer` looks them up when it
    starts, and without them every request is an ordinary one.
    """

    def is_stream(self, kind: str) -> bool:
        """Whether requests of ``kind`` are streams (served by :meth:`stream`, not ``call``).
        Called by the connection's reader for every request, so it must be cheap and must not
        raise."""
        ...

    def stream(self, session: object, envelope: Envelope) -> AsyncIterator[Any]:
        """Serve one streaming request: an async generator of its items (msgspec Structs).

        Runs concurrently with itself and with ``call``: up to ``max_streams`` streams per
        connection. The server asks for the next item only once the socket has room for the
        previous ones, so a slow client slows the producer. A :class:`MemclusterError` raised
        while iterating ends the stream with that error after the items already yielded (so
        validate the request before the first ``yield``); any other exception is a bug,
        logged and reported as code ``internal``. When the client cancels, the server shuts
        down or the client goes away, the task iterating is cancelled (``CancelledError``
        where the generator waits; do not swallow it) and the generator is closed
        (``GeneratorExit`` at its ``yield``), so ``finally`` blocks and ``async with`` release
        what it holds.
        """
        ...


def _streams_of(dispatcher: Dispatcher) -> TypeGuard[StreamingDispatcher]:
    return callable(getattr(dispatcher, "is_stream", None)) and callable(
        getattr(dispatcher, "stream", None)
    )


class BinaryServer:
    """Serves the binary protocol on a listening socket; see the module docstring."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        node: str,
        port: int,
        max_frame_bytes: int,
        max_in_flight: int,
        handshake_timeout_s: float,
        max_streams: int = MAX_STREAMS_DEFAULT,
    ) -> None:
        """Internal: use :meth:`start`."""
        self._dispatcher = dispatcher
        self._streaming = dispatcher if _streams_of(dispatcher) else None
        """The dispatcher if it serves streams."""
        self._node = node
        self._port = port
        self._max_frame_bytes = max_frame_bytes
        self._max_in_flight = max_in_flight
        self._max_streams = max_streams
        self._handshake_timeout_s = handshake_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        """One task per connection, owned by the server and awaited by :meth:`close`."""
        self._in_flight = 0
        self._streams = 0
        self._closing = False
        self._closed = asyncio.Event()

    @classmethod
    async def start(
        cls,
        dispatcher: Dispatcher,
        sock: socket.socket,
        *,
        node: str,
        ssl: ssl.SSLContext | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT,
        max_in_flight: int = 256,
        handshake_timeout_s: float = 10.0,
        max_streams: int = MAX_STREAMS_DEFAULT,
    ) -> BinaryServer:
        """Serve on ``sock``, which is bound and listening; the server takes ownership of it.

        ``max_frame_bytes`` limits the frames clients may send (and the replies the server
        writes: a larger reply becomes a ``PayloadTooLarge`` error). ``max_in_flight`` limits
        the requests served at once per connection (the backpressure bound).
        ``handshake_timeout_s`` limits how long a new connection may take to say hello.
        ``max_streams`` limits the streams running at once per connection (when
        ``dispatcher`` is a :class:`StreamingDispatcher`); one more is refused with
        ``Overloaded``.
        """
        if max_in_flight < 1:
            raise InvalidArgument(
                f"binary protocol: max_in_flight must be at least 1, got {max_in_flight}"
            )
        if max_streams < 1:
            raise InvalidArgument(
                f"binary protocol: max_streams must be at least 1, got {max_streams}"
            )
        if max_frame_bytes < 1:
            raise InvalidArgument(
                f"binary protocol: max_frame_bytes must be at least 1, got {max_frame_bytes}"
            )
        self = cls(
            dispatcher,
            node=node,
            port=sock.getsockname()[1],
            max_frame_bytes=max_frame_bytes,
            max_in_flight=max_in_flight,
            handshake_timeout_s=handshake_timeout_s,
            max_streams=max_streams,
        )
        self._server = await asyncio.start_server(
            self._accept, sock=sock, ssl=ssl, limit=READ_CHUNK_BYTES
        )
        return self

    @property
    def port(self) -> int:
        """The port the server listens on (useful after binding port 0)."""
        return self._port

    @property
    def node(self) -> str:
        return self._node

    @property
    def in_flight(self) -> int:
        """Requests and streams being served right now, over all connections (including
        writing replies and final frames)."""
        return self._in_flight

    @property
    def streams(self) -> int:
        """Streams being served right now, over all connections (part of :attr:`in_flight`)."""
        return self._streams

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._connections)

    async def close(self, grace_s: float = 10.0) -> None:
        """Shut down gracefully: stop accepting and reading, stop every stream (its client
        gets an ``unreachable`` error), let requests in flight finish and their replies be
        written for up to ``grace_s``, cancel the rest, close every connection. Idempotent; a
        second call waits for the first to finish."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._server is not None:
                self._server.close()
            for connection in self._connections:
                connection.shut_down()
            if self._tasks:
                _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
                if late:
                    log.warning(
                        "binary protocol: %d connections still busy after the grace period of "
                        "%s s; cancelling their requests",
                        len(late),
                        grace_s,
                    )
                    for task in late:
                        task.cancel()
                    await asyncio.wait(late)
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            self._closed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's connection callback: hand the connection to a task the server owns.

        The connection is served in a separate task rather than in this callback's own task
        because asyncio (3.11) treats a cancelled callback task as an error, and shutdown
        cancels connections that outlive the grace period.
        """
        if self._closing:
            writer.transport.abort()
            return
        connection = _ServerConnection(self, reader, writer)
        self._connections.add(connection)
        task = asyncio.create_task(connection.serve(), name=f"memcluster.transport {connection}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Stop(enum.Enum):
    """Why a stream was stopped before its producer was exhausted."""

    CANCELLED = "cancelled"
    """The client sent ``"cancel"``: the final frame is ``"end"``."""
    SHUTDOWN = "shutdown"
    """The server is closing: the final frame is an ``unreachable`` error."""
    HANGUP = "hangup"
    """The connection's reader stopped (EOF or a bad frame): an ``unreachable`` error."""


class _ServerStream:
    """A stream of a server connection, from its request until its producer stopped."""

    __slots__ = ("kind", "started", "stop", "task")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.task: asyncio.Task[None] | None = None
        self.started = False
        """The task has begun: cancelling it now runs its handlers (before, it would not)."""
        self.stop: _Stop | None = None
        """Why the stream was stopped; None while it may run on."""

    def halt(self, stop: _Stop) -> None:
        """Stop the producer; the first reason wins and decides the final frame."""
        if self.stop is not None:
            return
        self.stop = stop
        if self.started and self.task is not None:
            self.task.cancel()


class _ServerConnection:
    """One client connection of a :class:`BinaryServer`: handshake, reader loop, request and
    stream tasks."""

    def __init__(
        self, server: BinaryServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = _FrameWriter(writer)
        peer = writer.get_extra_info("peername")
        self._peer = _peer_name(str(peer[0]), int(peer[1])) if peer else "unknown peer"
        self._decoder = FrameDecoder(min(HELLO_FRAME_BYTES_MAX, server._max_frame_bytes))
        """Limited to small frames until the handshake succeeds."""
        self._slots = asyncio.Semaphore(server._max_in_flight)
        """One slot per request in flight; the reader waits for a free slot (backpressure)."""
        self._streams: dict[int, _ServerStream] = {}
        """Streams whose producer may still run, by id: the ids a cancel can name."""
        self._stream_tasks = 0
        """Stream tasks not yet done (including those writing their final frame): the number
        ``max_streams`` limits."""
        self._reading: asyncio.Task[None] | None = None
        self._stop = False

    def __repr__(self) -> str:
        return f"connection from {self._peer}"

    def shut_down(self) -> None:
        """Start draining because the server closes: stop every stream, read no more requests;
        those in flight continue."""
        self._stop_streams(_Stop.SHUTDOWN)
        self._stop = True
        if self._reading is not None:
            self._reading.cancel()

    def _stop_streams(self, stop: _Stop) -> None:
        for stream in list(self._streams.values()):
            stream.halt(stop)

    async def serve(self) -> None:
        _set_nodelay(self._writer.stream)
        try:
            async with asyncio.TaskGroup() as requests:
                if not self._stop:
                    self._reading = requests.create_task(self._read(requests))
        except asyncio.CancelledError:
            # The server's grace period is over: no flushing, no goodbye.
            self._writer.stream.transport.abort()
            raise
        except Exception:
            # Request tasks and the reader catch everything, so this is a bug in this module.
            log.exception("binary protocol: bug serving %s", self)
        finally:
            self._server._connections.discard(self)
            await self._writer.close(repr(self))

    async def _read(self, requests: asyncio.TaskGroup) -> None:
        """Do the handshake, then read requests and start a task for each, until EOF."""
        handshake = await self._handshake()
        if handshake is None:
            return
        session, envelopes = handshake
        streaming = self._server._streaming
        try:
            while True:
                for envelope in envelopes:
                    if envelope.kind == CANCEL:
                        stream = self._streams.get(envelope.id)
                        if stream is not None:
                            stream.halt(_Stop.CANCELLED)
                    elif streaming is not None and streaming.is_stream(envelope.kind):
                        await self._start_stream(requests, streaming, session, envelope)
                    else:
                        await self._slots.acquire()
                        requests.create_task(self._serve_one(session, envelope))
                data = await self._reader.read(READ_CHUNK_BYTES)
                if not data:
                    return
                envelopes = self._decoder.feed(data)
        except ProtocolError as exc:
            log.info("binary protocol: closing %s: %s", self, exc)
            await self._write(encode_frame(0, ERROR, error_body(exc)))
        except OSError as exc:
            log.debug("binary protocol: %s failed: %s", self, exc)
        finally:
            # Nobody can cancel these streams any more, and they may never end on their own.
            self._stop_streams(_Stop.HANGUP)

    async def _handshake(self) -> tuple[object, list[Envelope]] | None:
        """Session and the requests pipelined behind the hello, or None if refused or gone."""
        server = self._server
        try:
            async with asyncio.timeout(server._handshake_timeout_s):
                envelopes: list[Envelope] = []
                while not envelopes:
                    data = await self._reader.read(READ_CHUNK_BYTES)
                    if not data:
                        return None
                    envelopes = self._decoder.feed(data)
            first = envelopes[0]
            if first.kind != HELLO:
                raise ProtocolError(
                    f"binary protocol: the first frame must have kind 'hello', not "
                    f"{first.kind!r}; is this a memcluster client?"
                )
            try:
                hello = decode_body(first, Hello)
            except InvalidArgument as exc:
                raise ProtocolError(f"binary protocol: bad hello: {exc}") from exc
            version = choose_version(hello)
            session = server._dispatcher.hello(hello)
        except TimeoutError:
            error = error_body(
                ProtocolError(f"binary protocol: no hello within {server._handshake_timeout_s} s")
            )
        except MemclusterError as exc:
            error = error_body(exc)
        except OSError as exc:
            log.debug("binary protocol: %s failed during the handshake: %s", self, exc)
            return None
        except Exception as exc:
            log.exception("binary protocol: internal error checking the hello of %s", self)
            error = _internal_error(HELLO, exc)
        else:
            self._decoder.max_frame_bytes = server._max_frame_bytes
            welcome = Welcome(
                version=version, node=server._node, max_frame_bytes=server._max_frame_bytes
            )
            await self._write(encode_frame(0, WELCOME, welcome))
            return session, envelopes[1:]
        log.info("binary protocol: refused %s: %s", self, error.message)
        await self._write(encode_frame(0, ERROR, error))
        return None

    async def _serve_one(self, session: object, envelope: Envelope) -> None:
        """One request task: call the dispatcher, write the reply, free the slot."""
        server = self._server
        server._in_flight += 1
        try:
            try:
                body = await server._dispatcher.call(session, envelope)
                frame = encode_frame(envelope.id, OK, body)
                if len(frame) - HEADER_BYTES > server._max_frame_bytes:
                    raise PayloadTooLarge(
                        f"binary protocol: the reply to {envelope.kind} is "
                        f"{len(frame) - HEADER_BYTES} bytes, over the frame limit of "
                        f"{server._max_frame_bytes}; ask for fewer results"
                    )
            except MemclusterError as exc:
                frame = encode_frame(envelope.id, ERROR, error_body(exc))
            except Exception as exc:
                log.exception("binary protocol: internal error serving %s", envelope.kind)
                frame = encode_frame(envelope.id, ERROR, _internal_error(envelope.kind, exc))
            await self._write(frame)
        finally:
            server._in_flight -= 1
            self._slots.release()

    async def _start_stream(
        self,
        requests: asyncio.TaskGroup,
        streaming: StreamingDispatcher,
        session: object,
        envelope: Envelope,
    ) -> None:
        """Start a task producing the stream ``envelope`` asks for, or refuse it at once."""
        server = self._server
        error: MemclusterError
        if envelope.id in self._streams:
            error = InvalidArgument(
                f"binary protocol: id {envelope.id} is already a running stream of this "
                "connection; ids must be unique among the requests in flight"
            )
        elif self._stream_tasks >= server._max_streams:
            error = Overloaded(
                f"binary protocol: {self._stream_tasks} streams are running on this "
                f"connection, the limit of {server._max_streams}; cancel one or open another "
                "connection"
            )
        else:
            stream = _ServerStream(envelope.kind)
            self._streams[envelope.id] = stream
            self._stream_tasks += 1
            stream.task = requests.create_task(
                self._serve_stream(streaming, session, envelope, stream)
            )
            stream.task.add_done_callback(lambda _: self._forget_stream(envelope.id, stream))
            return
        await self._write(encode_frame(envelope.id, ERROR, error_body(error)))

    def _forget_stream(self, stream_id: int, stream: _ServerStream) -> None:
        self._stream_tasks -= 1
        if self._streams.get(stream_id) is stream:  # only if the task never got to run
            del self._streams[stream_id]

    async def _serve_stream(
        self,
        streaming: StreamingDispatcher,
        session: object,
        envelope: Envelope,
        stream: _ServerStream,
    ) -> None:
        """One stream task: produce and write the items, then the final frame."""
        server = self._server
        server._in_flight += 1
        server._streams += 1
        stream.started = True
        try:
            final = await self._produce(streaming, session, envelope, stream)
            if final is not None:
                await self._write(final)
        finally:
            server._in_flight -= 1
            server._streams -= 1

    async def _produce(
        self,
        streaming: StreamingDispatcher,
        session: object,
        envelope: Envelope,
        stream: _ServerStream,
    ) -> bytes | None:
        """Iterate the producer, writing each item; return the final frame, or None when the
        client is gone."""
        server = self._server
        sent = 0
        burst_bytes = 0
        try:
            try:
                if stream.stop is None:  # else it was cancelled before it began
                    items = streaming.stream(session, envelope)
                    try:
                        async for item in items:
                            frame = encode_frame(envelope.id, ITEM, item)
                            if len(frame) - HEADER_BYTES > server._max_frame_bytes:
                                raise PayloadTooLarge(
                                    f"binary protocol: item {sent + 1} of the {envelope.kind} "
                                    f"stream is {len(frame) - HEADER_BYTES} bytes, over the "
                                    f"frame limit of {server._max_frame_bytes}"
                                )
                            burst_bytes += len(frame)
                            turn = (
                                sent % STREAM_BURST_ITEMS == STREAM_BURST_ITEMS - 1
                                or burst_bytes >= STREAM_BURST_BYTES
                            )
                            if not await self._write_item(frame, turn=turn):
                                return None
                            sent += 1
                            if turn:
                                burst_bytes = 0
                            if stream.stop is not None:  # a producer that swallowed the cancel
                                break
                    finally:
                        await _aclose(items)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                # Our own cancel (halt) is handled here; the server's (grace period over) is not.
                if stream.stop is None or task is None or task.uncancel() > 0:
                    raise
            finally:
                # From here on a cancel naming this id is ignored: the final frame is coming.
                if self._streams.get(envelope.id) is stream:
                    del self._streams[envelope.id]
        except MemclusterError as exc:
            return encode_frame(envelope.id, ERROR, error_body(exc))
        except Exception as exc:
            log.exception("binary protocol: internal error streaming %s", envelope.kind)
            return encode_frame(envelope.id, ERROR, _internal_error(envelope.kind, exc))
        error: Unreachable
        match stream.stop:
            case None | _Stop.CANCELLED:
                return encode_frame(envelope.id, END, Empty())
            case _Stop.SHUTDOWN:
                error = Unreachable(
                    f"binary protocol: {server._node} is shutting down; the {envelope.kind} "
                    f"stream ended after {sent} items; subscribe again, to another node if need "
                    "be"
                )
            case _Stop.HANGUP:
                error = Unreachable(
                    f"binary protocol: the connection is closing (the client closed its side "
                    f"or sent a bad frame); the {envelope.kind} stream ended after {sent} items"
                )
            case never:
                assert_never(never)
        return encode_frame(envelope.id, ERROR, error_body(error))

    async def _write_item(self, frame: bytes, *, turn: bool) -> bool:
        """Write one item of a stream; with ``turn`` (at the end of a burst, see
        :data:`STREAM_BURST_ITEMS`), give the event loop a turn and wait while the socket is
        full (the stream's backpressure). False when the client is gone."""
        writer = self._writer
        if writer.is_closing():
            return False
        try:
            writer.write(frame)
            if turn:
                # The writer's coalesced frames reach the transport (so that drain() sees
                # them), and the connection's other tasks run.
                await asyncio.sleep(0)
                await writer.drain()
        except OSError as exc:
            log.debug("binary protocol: stopped a stream of %s: %s", self, exc)
            return False
        return True

    async def _write(self, frame: bytes) -> None:
        """Write a frame and wait until the socket takes it; a dead client is not an error."""
        writer = self._writer
        if writer.is_closing():
            log.debug("binary protocol: dropped a frame for %s: closed", self)
            return
        try:
            writer.write(frame)
            await writer.drain()
        except OSError as exc:
            log.debug("binary protocol: dropped a frame for %s: %s", self, exc)


async def _aclose(items: AsyncIterator[Any]) -> None:
    """Close an async generator (run its ``finally``); other iterators have nothing to close."""
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


def _internal_error(kind: str, exc: Exception) -> ErrorBody:
    return ErrorBody(
        code=_INTERNAL_CODE,
        message=(
            f"internal error serving {kind}: {type(exc).__name__}: {exc}; this is a bug, "
            "please report it"
        ),
    )
