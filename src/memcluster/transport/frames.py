"""Framing of the binary protocol, sans-IO: bytes in, envelopes out, and the handshake rules.

Nothing here touches a socket or an event loop. :mod:`memcluster.transport.connection` drives
it over asyncio streams; tests drive it with plain bytes.

Frame format, version 1
-----------------------

A connection carries a stream of frames in each direction::

    frame    = length body                      length: u32, big-endian (network order)
    body     = msgpack map {"id": int, "kind": str, "body": any}      exactly length bytes

* ``length`` counts the bytes after itself. A receiver refuses a frame whose length exceeds
  its ``max_frame_bytes`` (default :data:`MAX_FRAME_BYTES_DEFAULT`, 64 MiB) before reading
  it, so a bad length cannot make it allocate gigabytes.
* The envelope is a msgpack map whose keys are written in the order ``id``, ``kind``,
  ``body``. Receivers look keys up by name and ignore keys they do not know, so a later
  version may add keys; a missing ``id``, ``kind`` or ``body`` is a protocol error.
* ``body`` is any msgpack value, usually a msgspec Struct of :mod:`memcluster.core.api`
  encoded as a map of its fields. numpy arrays are msgpack extension type 1: their
  little-endian float32 bytes (:data:`memcluster.core.api.VECTOR_EXT`).

A reply ``{"id": 7, "kind": "ok", "body": CountReply(count=3)}`` is these 30 bytes::

    00 00 00 1a                    length = 26
    83                             map of 3 entries
    a2 69 64  07                   "id"    7
    a4 6b 69 6e 64  a2 6f 6b       "kind"  "ok"
    a4 62 6f 64 79                 "body"
    81 a5 63 6f 75 6e 74  03       {"count": 3}

The receiver decodes the envelope once into :class:`Envelope`, leaving ``body`` as raw
msgpack bytes (:class:`msgspec.Raw`); whoever knows the body's type decodes it with
:func:`decode_body`. ``tests/golden/frames-v1.hex`` pins these bytes: changing them is a
protocol break and needs a new :data:`PROTOCOL_VERSION`.

Conversation
------------

::

    client                                      server
      | -- {0, "hello",   Hello} ----------------> |  first frame, always id 0
      | <------------- {0, "welcome", Welcome} --- |  or {0, "error", ErrorBody}, then close
      | -- {1, "search",  SearchCall} -----------> |
      | -- {2, "put",     PutCall} --------------> |  many requests in flight (pipelined)
      | <------------------- {2, "ok", PutReply} -- |  replies in any order, matched by id
      | <--------- {1, "error", ErrorBody} -------- |

* The client sends :class:`Hello` with every protocol version it speaks and its API key. The
  server picks the highest version both speak (:func:`choose_version`) and answers
  :class:`Welcome`, or an ``"error"`` frame (a ``protocol_error``, ``unauthenticated``, ...)
  and closes the connection. Until it has sent the welcome, the server accepts frames of at
  most :data:`HELLO_FRAME_BYTES_MAX` bytes; afterwards up to ``Welcome.max_frame_bytes``.
* A request is a frame whose ``kind`` is an operation of
  :data:`memcluster.core.api.OPERATIONS` and whose ``body`` is its request struct. Request ids
  are chosen by the client, unique among its requests in flight (the client counts from 1).
* Every request gets exactly one reply with the same ``id``: kind ``"ok"`` with the reply
  struct, or kind ``"error"`` with a :class:`memcluster.core.api.ErrorBody`, whose ``code``
  is a wire code of :data:`memcluster.core.errors.ERROR_TABLE`.
* A frame the server cannot parse gets a best-effort ``"error"`` frame with id 0 and code
  ``protocol_error``; then the server closes the connection, because it can no longer tell
  where the next frame starts.

Streams
-------

Some requests (a change feed, a topic subscription) produce many replies. Which kinds stream
is the server's knowledge (the dispatcher's ``is_stream``); the client asks for a stream the
same way it sends a request, and the two share one id space::

    client                                      server
      | -- {3, "watch",   WatchCall} ------------> |  a request whose kind streams
      | <----------------- {3, "item", Change} --- |  zero or more items, in order
      | -- {4, "get",     GetCall} --------------> |  ordinary requests go on meanwhile
      | <----------------- {3, "item", Change} --- |
      | <------------------- {4, "ok", Record} --- |  frames of different ids interleave
      | -- {3, "cancel",  {}} -------------------> |  optional: the client stops the stream
      | <---------------------- {3, "end", {}} --- |  exactly one final frame: "end" or "error"

* The server answers a streaming request with zero or more ``"item"`` frames (body: one
  item) and then exactly one final frame with the same id: ``"end"`` (body: an empty map,
  :class:`memcluster.core.api.Empty`) when the producer finished or was cancelled, or
  ``"error"`` (:class:`~memcluster.core.api.ErrorBody`) when it failed. Items of one stream
  arrive in the order produced; frames of different streams and replies to requests
  interleave freely. After the final frame the id is free again.
* An error while producing ends the stream after the items already sent. An item over the
  server's frame limit ends it with ``payload_too_large``. A server runs a limited number of
  streams per connection; it refuses one more at once, with ``overloaded``.
* The client stops a stream early with ``{id, "cancel", {}}``. The server stops the producer
  and sends ``"end"``; if the stream had already ended, its final frame is on the way and the
  cancel is ignored. A cancel for an id that is not a running stream (unknown, finished, or an
  ordinary request, which cannot be cancelled) is ignored. Items sent before the server saw
  the cancel still arrive, so a client drops frames for ids it no longer waits on.
* A stream the server ends on its own gets ``"error"`` with code ``unreachable`` (retryable):
  when the server shuts down (it does not wait for streams, which may never end) and when the
  client half-closes the connection (it could no longer cancel). A client treats this exactly
  like a lost connection: resubscribe, on another node if need be.
* Flow control is TCP's: the server produces items only while the socket takes them, so a
  client that stops reading stops the producer. There is no per-stream window, so a stream
  whose consumer falls behind holds up every other frame on its connection; long-lived
  subscriptions belong on a connection of their own.
"""

from __future__ import annotations

import struct
from typing import Any, Final, TypeVar

import msgspec

from memcluster.core.api import ErrorBody, enc_hook, ext_hook
from memcluster.core.errors import (
    InvalidArgument,
    MemclusterError,
    ProtocolError,
    error_details,
)

T = TypeVar("T")

PROTOCOL_VERSION: Final = 1
"""The newest version of the protocol this code speaks."""

SUPPORTED_VERSIONS: Final[tuple[int, ...]] = (PROTOCOL_VERSION,)
"""Every version this code speaks, oldest first."""

MAX_FRAME_BYTES_DEFAULT: Final = 64 << 20
"""Default limit on a frame's ``length`` (64 MiB), in both directions."""

HELLO_FRAME_BYTES_MAX: Final = 64 << 10
"""Limit on frames a server accepts before its welcome (64 KiB): an unauthenticated peer
cannot make it buffer a 64 MiB frame."""

HEADER_BYTES: Final = 4
"""Size of the length prefix of a frame."""

HELLO: Final = "hello"
"""Kind of the client's first frame (body :class:`Hello`)."""
WELCOME: Final = "welcome"
"""Kind of the server's answer to a hello it accepts (body :class:`Welcome`)."""
OK: Final = "ok"
"""Kind of a successful reply (body: the operation's reply struct)."""
ERROR: Final = "error"
"""Kind of an error reply (body :class:`memcluster.core.api.ErrorBody`); also ends a stream."""
ITEM: Final = "item"
"""Kind of one item of a stream (body: the item)."""
END: Final = "end"
"""Kind of the final frame of a stream that finished or was cancelled (body: an empty map)."""
CANCEL: Final = "cancel"
"""Kind of the client's request to stop a stream (body: an empty map)."""

_COPY_BYTES_MAX = 64 << 10
"""Frames up to this size are copied out of the received chunk (cheaper than a memoryview
for small frames); larger ones are decoded in place and their body references the chunk."""


class Envelope(msgspec.Struct, gc=False):
    """One received frame. ``body`` stays raw msgpack until :func:`decode_body` gives it a type.

    ``gc=False``: an envelope holds only an int, a str and a Raw, so it can never be part of a
    reference cycle, and the garbage collector need not track the many short-lived envelopes.
    """

    id: int
    kind: str
    body: msgspec.Raw


class _OutEnvelope(msgspec.Struct, gc=False):
    """The sending side of :class:`Envelope`: ``body`` is any encodable value (or a Raw, which
    is copied verbatim, so a received body can be forwarded without decoding it).

    ``gc=False`` is safe because one lives only inside :func:`encode_frame`: nothing else ever
    refers to it, so it cannot close a reference cycle.
    """

    id: int
    kind: str
    body: Any


class Hello(msgspec.Struct, kw_only=True):
    """The client's first frame (kind ``"hello"``, id 0)."""

    protocol: str = "memcluster"
    """Always ``"memcluster"``: a cheap check that the peer speaks this protocol at all."""
    versions: list[int]
    """Every protocol version the client speaks; the server picks the highest it shares."""
    api_key: str | None = None
    """The API key authenticating the connection; every request on it acts as this key."""


class Welcome(msgspec.Struct, kw_only=True):
    """The server's answer to an accepted hello (kind ``"welcome"``, id 0)."""

    version: int
    """The protocol version of the rest of the conversation."""
    node: str
    """The server node's name."""
    max_frame_bytes: int
    """The largest frame the server accepts; a client refuses to send larger ones."""


_encoder = msgspec.msgpack.Encoder(enc_hook=enc_hook)
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_body_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
_pack_length = struct.Struct(">I").pack
_unpack_length = struct.Struct(">I").unpack_from


def encode_frame(id: int, kind: str, body: Any) -> bytes:
    """The bytes of one frame: length prefix and envelope, the body encoded once, in place.

    ``body`` is anything msgspec encodes (Structs, dicts, lists, numbers, strings, numpy arrays
    and scalars through :func:`memcluster.core.api.enc_hook`), or a :class:`msgspec.Raw`
    holding msgpack bytes to forward as they are. Raises ``TypeError`` (or the hook's
    ``NotImplementedError``) for a value that cannot be encoded; that is the caller's bug.
    """
    payload = _encoder.encode(_OutEnvelope(id, kind, body))
    return _pack_length(len(payload)) + payload


def decode_body(envelope: Envelope, type_: type[T]) -> T:
    """Decode and validate ``envelope.body`` as ``type_``.

    Raises :class:`InvalidArgument` naming the kind and the place of the mismatch, e.g.
    ``search: Expected `int`, got `str` - at `$.k```. The frame itself was well formed, so
    this is the sender's mistake in one request, not a protocol error: a server replies with
    the error and keeps the connection open. Decoders are built once per type and cached.
    """
    decoder: msgspec.msgpack.Decoder[T] | None = _body_decoders.get(type_)
    if decoder is None:
        decoder = msgspec.msgpack.Decoder(type_, ext_hook=ext_hook)
        _body_decoders[type_] = decoder
    try:
        return decoder.decode(envelope.body)
    except (msgspec.DecodeError, ValueError) as exc:
        # ValueError: the ext hook refused an extension (a vector of 3 bytes, an unknown code).
        raise InvalidArgument(f"{envelope.kind}: {exc}") from exc


def error_body(exc: MemclusterError) -> ErrorBody:
    """The body of the ``"error"`` reply that reports ``exc``."""
    return ErrorBody(code=exc.code, message=str(exc), details=error_details(exc))


def choose_version(hello: Hello) -> int:
    """The version a server speaks with the client that sent ``hello``: the highest both speak.

    Raises :class:`ProtocolError` when the peer is not a memcluster client or no version is
    shared.
    """
    if hello.protocol != "memcluster":
        raise ProtocolError(
            f"binary protocol: hello names protocol {hello.protocol!r}, not 'memcluster'"
        )
    shared = set(hello.versions).intersection(SUPPORTED_VERSIONS)
    if not shared:
        raise ProtocolError(
            f"binary protocol: client speaks versions {sorted(hello.versions)}, server speaks "
            f"{list(SUPPORTED_VERSIONS)}; upgrade the older side"
        )
    return max(shared)


def check_welcome(welcome: Welcome) -> None:
    """Raise :class:`ProtocolError` if a server chose a version this client does not speak."""
    if welcome.version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            f"binary protocol: server {welcome.node!r} chose version {welcome.version}, this "
            f"client speaks {list(SUPPORTED_VERSIONS)}"
        )


class FrameDecoder:
    """Turns the bytes of one direction of a connection into :class:`Envelope` objects.

    Feed it whatever the socket returned, in order; it returns the frames completed by that
    data and keeps a partial frame for the next call. Each byte is copied at most twice (into
    the buffer of a partial frame, then into the completed frame), so a 64 MiB frame arriving
    in 256 KiB chunks costs linear, not quadratic, work; a chunk holding only whole frames is
    not copied into the buffer at all.

    After :class:`ProtocolError` the decoder is unusable (every later call raises again): the
    stream has lost its framing, so the caller closes the connection.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> None:
        if max_frame_bytes < 1:
            raise InvalidArgument(
                f"binary protocol: max_frame_bytes must be at least 1, got {max_frame_bytes}"
            )
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        """The start of an incomplete frame (empty between frames)."""
        self._needed = HEADER_BYTES
        """How many bytes ``_buffer`` must hold before parsing can complete a frame."""
        self._frames = 0
        """Frames decoded so far (error messages number frames from 1)."""
        self._failure: ProtocolError | None = None

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame accepted. A server raises it after the handshake (see
        :data:`HELLO_FRAME_BYTES_MAX`); the new limit applies to lengths not yet read."""
        return self._max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        if value < 1:
            raise InvalidArgument(
                f"binary protocol: max_frame_bytes must be at least 1, got {value}"
            )
        self._max_frame_bytes = value

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held until the rest arrives."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Envelope]:
        """Consume ``data``; return the frames it completes, in order (often none).

        Raises :class:`ProtocolError` when a length is over ``max_frame_bytes`` or a frame is
        not an envelope; frames completed earlier in the same ``data`` are lost with it.
        """
        if self._failure is not None:
            raise ProtocolError(
                f"binary protocol: the stream is unusable after an earlier error "
                f"({self._failure}); close the connection"
            )
        if self._buffer:
            self._buffer += data
            if len(self._buffer) < self._needed:
                return []
            data = bytes(self._buffer)
            self._buffer.clear()
        elif not isinstance(data, bytes):
            data = bytes(data)
        try:
            return self._parse(data)
        except ProtocolError as exc:
            self._failure = exc
            self._buffer = bytearray()
            raise

    def _parse(self, data: bytes) -> list[Envelope]:
        envelopes: list[Envelope] = []
        size = len(data)
        offset = 0
        needed = HEADER_BYTES
        while size - offset >= HEADER_BYTES:
            (length,) = _unpack_length(data, offset)
            if length > self._max_frame_bytes:
                raise ProtocolError(
                    f"binary protocol: frame of {length} bytes is over the limit of "
                    f"{self._max_frame_bytes}"
                )
            start = offset + HEADER_BYTES
            end = start + length
            if end > size:
                needed = end - offset
                break
            payload = data[start:end] if length <= _COPY_BYTES_MAX else memoryview(data)[start:end]
            try:
                envelopes.append(_envelope_decoder.decode(payload))
            except msgspec.DecodeError as exc:
                raise ProtocolError(
                    f"binary protocol: frame {self._frames + 1} is not a msgpack envelope "
                    f"{{id, kind, body}}: {exc}"
                ) from exc
            self._frames += 1
            offset = end
        if offset < size:
            self._buffer += memoryview(data)[offset:]
        self._needed = needed
        return envelopes
