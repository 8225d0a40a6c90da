"""The binary protocol: pinned frame bytes, the sans-IO decoder, then client and server over
real loopback sockets, with a toy dispatcher standing in for the node.

Every end-to-end test runs its own event loop with ``asyncio.run`` under a 4.5 s deadline,
binds its server to 127.0.0.1 port 0, and closes everything it opened (warnings are errors,
so a leaked transport or an unretrieved task exception fails the test).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing, asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcluster.core.api import CountReply, Empty, ErrorBody, SearchCall
from memcluster.core.errors import (
    InvalidArgument,
    MemclusterError,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    Timeout,
    Unauthenticated,
    Unreachable,
    VersionConflict,
)
from memcluster.transport.connection import BinaryServer, Connection, Dispatcher
from memcluster.transport.frames import (
    HELLO_FRAME_BYTES_MAX,
    MAX_FRAME_BYTES_DEFAULT,
    PROTOCOL_VERSION,
    Envelope,
    FrameDecoder,
    Hello,
    Welcome,
    check_welcome,
    choose_version,
    decode_body,
    encode_frame,
)

T = TypeVar("T")

GOLDEN = Path(__file__).parent / "golden" / "frames-v1.hex"
DEADLINE_S = 4.5


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run one test's event loop, failing it if it takes longer than ``DEADLINE_S``."""

    async def bounded() -> T:
        async with asyncio.timeout(DEADLINE_S):
            return await main

    return asyncio.run(bounded())


def golden_frames() -> list[bytes]:
    """The frames that ``tests/golden/frames-v1.hex`` pins, built by today's code."""
    search = SearchCall(
        collection="memories",
        vector=np.array([0.5, -1.0, 2.0], dtype=np.float32),
        k=3,
        namespace=("team-a",),
    )
    return [
        encode_frame(7, "search", search),
        encode_frame(0, "hello", Hello(versions=[1], api_key=None)),
        encode_frame(9, "item", CountReply(count=3)),
        encode_frame(9, "end", Empty()),
        encode_frame(9, "cancel", Empty()),
    ]


def read_golden() -> list[bytes]:
    lines = GOLDEN.read_text().splitlines()
    return [bytes.fromhex(line) for line in lines if line.strip() and not line.startswith("#")]


def fields(envelope: Envelope) -> tuple[int, str, bytes]:
    return envelope.id, envelope.kind, bytes(envelope.body)


# -- the toy dispatcher ------------------------------------------------------------------------


class Echo(msgspec.Struct):
    tag: int
    text: str = ""


class Sleep(msgspec.Struct):
    tag: int
    delay_s: float


class Feed(msgspec.Struct):
    """The body of the toy's one streaming kind, ``feed``."""

    tag: int
    n: int | None = None
    """How many items; None: without end."""
    fail_at: int | None = None
    """Raise VersionConflict instead of yielding item ``fail_at``."""
    bug_at: int | None = None
    """Raise KeyError (a bug) instead of yielding item ``bug_at``."""
    pad: int = 0
    """Characters of padding in every item."""
    delay_s: float = 0.0
    """Sleep before each item."""


class Item(msgspec.Struct):
    tag: int
    seq: int
    text: str = ""


class Toy:
    """A dispatcher with one behaviour per kind; it counts calls and concurrent calls.

    echo: returns its body. sleep: sleeps ``delay_s``, then echoes the tag. big: echoes the tag
    with 2 KiB of text. vector: returns its SearchCall body. whoami: returns the session.
    conflict: raises VersionConflict(expected=3, actual=5). bug: raises KeyError.
    feed (a stream, see :class:`Feed`): yields ``Item(tag, 0)``, ``Item(tag, 1)``, ...; it
    records per tag how many items it produced, and which feeds were closed (their
    ``finally`` ran).
    """

    def __init__(self, *, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self.finished: list[int] = []
        self.produced: dict[int, int] = {}
        self.closed: list[int] = []

    def hello(self, hello: Hello) -> object:
        if self.api_key is not None and hello.api_key != self.api_key:
            raise Unauthenticated("toy: unknown API key; pass the key the server was given")
        return f"session of {hello.api_key}"

    async def call(self, session: object, envelope: Envelope) -> Any:
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._call(session, envelope)
        finally:
            self.active -= 1

    async def _call(self, session: object, envelope: Envelope) -> Any:
        match envelope.kind:
            case "echo":
                return decode_body(envelope, Echo)
            case "sleep":
                sleep = decode_body(envelope, Sleep)
                await asyncio.sleep(sleep.delay_s)
                self.finished.append(sleep.tag)
                return Echo(tag=sleep.tag)
            case "big":
                return Echo(tag=decode_body(envelope, Echo).tag, text="r" * 2048)
            case "vector":
                return decode_body(envelope, SearchCall)
            case "whoami":
                return Echo(tag=0, text=str(session))
            case "conflict":
                raise VersionConflict("toy: version 3 expected, 5 stored", expected=3, actual=5)
            case "bug":
                missing: dict[str, Echo] = {}
                return missing[envelope.kind]  # KeyError: a bug, as the dispatcher sees it
            case _:
                raise InvalidArgument(f"toy: unknown kind {envelope.kind!r}")

    def is_stream(self, kind: str) -> bool:
        return kind == "feed"

    async def stream(self, session: object, envelope: Envelope) -> AsyncIterator[Any]:
        feed = decode_body(envelope, Feed)
        self.produced[feed.tag] = 0
        try:
            for seq in itertools.count() if feed.n is None else range(feed.n):
                if seq == feed.fail_at:
                    raise VersionConflict(
                        "toy: feed version 3 expected, 5 stored", expected=3, actual=5
                    )
                if seq == feed.bug_at:
                    missing: dict[int, Item] = {}
                    yield missing[seq]  # KeyError: a bug
                if feed.delay_s:
                    await asyncio.sleep(feed.delay_s)
                self.produced[feed.tag] = seq + 1
                yield Item(tag=feed.tag, seq=seq, text="x" * feed.pad)
        finally:
            self.closed.append(feed.tag)


class Plain:
    """A dispatcher without the streaming methods (as the node's was): the toy's hello and
    call only."""

    def __init__(self) -> None:
        self.toy = Toy()

    def hello(self, hello: Hello) -> object:
        return self.toy.hello(hello)

    async def call(self, session: object, envelope: Envelope) -> Any:
        return await self.toy.call(session, envelope)


@asynccontextmanager
async def serving(dispatcher: Dispatcher, **options: Any) -> AsyncIterator[BinaryServer]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = await BinaryServer.start(dispatcher, sock, node="toy-node", **options)
    try:
        yield server
    finally:
        await server.close(grace_s=1.0)


async def connect(server: BinaryServer, **options: Any) -> Connection:
    return await Connection.open("127.0.0.1", server.port, **options)


async def raw_connect(
    port: int, *, receive_buffer_bytes: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain socket that speaks whatever bytes the test writes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def read_until_eof(reader: asyncio.StreamReader) -> list[Envelope]:
    decoder = FrameDecoder()
    envelopes: list[Envelope] = []
    while data := await reader.read(1 << 16):
        envelopes.extend(decoder.feed(data))
    return envelopes


async def close_raw(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()


async def eventually(condition: Any, what: str, timeout_s: float = 2.0) -> None:
    """Poll ``condition()`` until it is true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {timeout_s} s: {what}")
        await asyncio.sleep(0.005)


async def read_until(
    reader: asyncio.StreamReader,
    decoder: FrameDecoder,
    frames: list[Envelope],
    condition: Callable[[list[Envelope]], bool],
) -> None:
    """Read frames into ``frames`` until ``condition(frames)`` holds."""
    while not condition(frames):
        data = await reader.read(1 << 16)
        assert data, "the server closed the connection"
        frames.extend(decoder.feed(data))


async def collect(items: AsyncIterator[T], into: list[T]) -> None:
    """Append the items of ``items`` to ``into``, which keeps them if the iteration raises."""
    async for item in items:
        into.append(item)


async def stalled(count: Callable[[], int], what: str, quiet_s: float = 0.2) -> int:
    """Wait until ``count()`` has not changed for ``quiet_s``; return it. Fails after 2 s."""
    deadline = time.monotonic() + 2.0
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            pytest.fail(f"still advancing after 2 s: {what}")
        await asyncio.sleep(0.01)
        if count() != last:
            last, since = count(), time.monotonic()
    return last


HELLO_FRAME = encode_frame(0, "hello", Hello(versions=[PROTOCOL_VERSION]))


# -- frames: the pinned format -----------------------------------------------------------------


def test_golden_frames_match_the_pinned_bytes() -> None:
    assert golden_frames() == read_golden()


def test_golden_frames_decode_back_to_their_fields() -> None:
    search, hello, item, end, cancel = FrameDecoder().feed(b"".join(read_golden()))
    assert (search.id, search.kind, hello.id, hello.kind) == (7, "search", 0, "hello")
    assert [(frame.id, frame.kind) for frame in (item, end, cancel)] == [
        (9, "item"),
        (9, "end"),
        (9, "cancel"),
    ]
    assert decode_body(item, CountReply) == CountReply(count=3)
    assert bytes(end.body) == bytes(cancel.body) == b"\x80"  # an empty map
    call = decode_body(search, SearchCall)
    assert call.collection == "memories"
    assert call.k == 3
    assert call.namespace == ("team-a",)
    assert call.filter is None
    assert isinstance(call.vector, np.ndarray)
    assert call.vector.dtype == np.float32
    assert call.vector.tolist() == [0.5, -1.0, 2.0]
    assert decode_body(hello, Hello) == Hello(protocol="memcluster", versions=[1], api_key=None)


def test_frame_is_a_big_endian_length_then_a_map_of_id_kind_body() -> None:
    frame = encode_frame(7, "ok", {"count": 3})
    assert frame == bytes.fromhex(
        "0000001a 83 a26964 07 a46b696e64 a26f6b a4626f6479 81a5636f756e7403"
    )


def test_encode_frame_forwards_a_raw_body_unchanged() -> None:
    (received,) = FrameDecoder().feed(encode_frame(5, "put", Echo(tag=1, text="x")))
    forwarded = encode_frame(9, "put", received.body)
    assert fields(FrameDecoder().feed(forwarded)[0]) == (9, "put", bytes(received.body))


# -- frames: the decoder -----------------------------------------------------------------------


def test_decoder_reassembles_frames_split_at_every_byte() -> None:
    frames = [*read_golden(), encode_frame(2**40, "ok", Echo(tag=-1, text="é" * 30))]
    stream = b"".join(frames)
    expected = [fields(envelope) for envelope in FrameDecoder().feed(stream)]
    assert len(expected) == len(frames)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        envelopes = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert [fields(envelope) for envelope in envelopes] == expected, cut
        assert decoder.buffered_bytes == 0
    decoder = FrameDecoder()
    one_by_one = [
        envelope for i in range(len(stream)) for envelope in decoder.feed(stream[i : i + 1])
    ]
    assert [fields(envelope) for envelope in one_by_one] == expected


def test_decoder_returns_every_frame_of_one_chunk_in_order() -> None:
    stream = b"".join(encode_frame(i, "echo", Echo(tag=i)) for i in range(500))
    decoder = FrameDecoder()
    envelopes = decoder.feed(stream)
    assert [envelope.id for envelope in envelopes] == list(range(500))
    assert [decode_body(envelope, Echo).tag for envelope in envelopes] == list(range(500))
    assert decoder.buffered_bytes == 0


def test_decoder_holds_a_partial_frame_until_the_rest_arrives() -> None:
    frame = encode_frame(1, "echo", Echo(tag=1, text="x" * 100))
    decoder = FrameDecoder()
    assert decoder.feed(frame[:2]) == []
    assert decoder.buffered_bytes == 2
    assert decoder.feed(frame[2:50]) == []
    assert decoder.buffered_bytes == 50
    (envelope,) = decoder.feed(frame[50:] + frame[:10])
    assert decode_body(envelope, Echo) == Echo(tag=1, text="x" * 100)
    assert decoder.buffered_bytes == 10


def test_decoder_reassembles_a_large_frame_from_small_chunks() -> None:
    text = "v" * 300_000  # over the size at which a frame is decoded in place, not copied
    frame = encode_frame(3, "echo", Echo(tag=3, text=text))
    decoder = FrameDecoder()
    envelopes = [
        envelope
        for offset in range(0, len(frame), 4096)
        for envelope in decoder.feed(memoryview(frame)[offset : offset + 4096])
    ]
    assert [decode_body(envelope, Echo) for envelope in envelopes] == [Echo(tag=3, text=text)]


def test_decoder_refuses_a_length_over_the_limit_and_stays_failed() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as caught:
        decoder.feed(struct.pack(">I", 99_999_999) + b"\x00" * 10)
    assert str(caught.value) == (
        "binary protocol: frame of 99999999 bytes is over the limit of 67108864"
    )
    assert MAX_FRAME_BYTES_DEFAULT == 67_108_864
    assert decoder.buffered_bytes == 0
    with pytest.raises(ProtocolError, match="unusable after an earlier error"):
        decoder.feed(encode_frame(1, "echo", Echo(tag=1)))


def test_decoder_refuses_a_frame_that_is_not_an_envelope() -> None:
    decoder = FrameDecoder()
    assert len(decoder.feed(HELLO_FRAME + encode_frame(1, "echo", Echo(tag=1)))) == 2
    array = msgspec.msgpack.encode([1, 2, 3])
    with pytest.raises(ProtocolError) as caught:
        decoder.feed(struct.pack(">I", len(array)) + array)
    assert str(caught.value) == (
        "binary protocol: frame 3 is not a msgpack envelope {id, kind, body}: "
        "Expected `object`, got `array`"
    )


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (msgspec.msgpack.encode({"id": 1, "kind": "echo"}), "missing required field `body`"),
        (msgspec.msgpack.encode({"id": "1", "kind": "echo", "body": 1}), "at `$.id`"),
        (b"\xc1", "MessagePack data is malformed"),
        (b"", "truncated"),
    ],
)
def test_decoder_names_what_is_wrong_with_a_bad_envelope(payload: bytes, message: str) -> None:
    pattern = r"frame 1 is not a msgpack envelope .*" + re.escape(message)
    with pytest.raises(ProtocolError, match=pattern):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
_bodies = st.recursive(
    _leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
_frames = st.lists(
    st.tuples(st.integers(min_value=0, max_value=2**63), st.text(max_size=12), _bodies),
    max_size=8,
)


@settings(deadline=None)
@given(frames=_frames, cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12))
def test_decoder_yields_the_same_envelopes_however_the_stream_is_chunked(
    frames: list[tuple[int, str, Any]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(id_, kind, body) for id_, kind, body in frames)
    bounds = [0, *sorted({cut % (len(stream) + 1) for cut in cuts}), len(stream)]
    decoder = FrameDecoder()
    envelopes = [
        envelope
        for start, end in itertools.pairwise(bounds)
        for envelope in decoder.feed(stream[start:end])
    ]
    expected = [(id_, kind, msgspec.msgpack.encode(body)) for id_, kind, body in frames]
    assert [fields(envelope) for envelope in envelopes] == expected
    assert decoder.buffered_bytes == 0


def test_decode_body_of_the_wrong_type_raises_invalid_argument_naming_kind_and_path() -> None:
    bad_k = {"collection": "m", "vector": [1.0], "k": "ten"}
    (envelope,) = FrameDecoder().feed(encode_frame(3, "search", bad_k))
    with pytest.raises(InvalidArgument) as caught:
        decode_body(envelope, SearchCall)
    assert str(caught.value) == "search: Expected `int`, got `str` - at `$.k`"
    bad_vector = {"collection": "m", "vector": msgspec.msgpack.Ext(1, b"abc")}
    (envelope,) = FrameDecoder().feed(encode_frame(4, "search", bad_vector))
    with pytest.raises(InvalidArgument, match=r"^search: vector extension of 3 bytes"):
        decode_body(envelope, SearchCall)


def test_version_negotiation_picks_the_highest_shared_version() -> None:
    assert choose_version(Hello(versions=[0, 1, 7])) == 1
    with pytest.raises(
        ProtocolError, match=r"client speaks versions \[2, 3\], server speaks \[1\]"
    ):
        choose_version(Hello(versions=[3, 2]))
    with pytest.raises(ProtocolError, match="names protocol 'http'"):
        choose_version(Hello(protocol="http", versions=[1]))
    check_welcome(Welcome(version=1, node="n", max_frame_bytes=1))
    with pytest.raises(ProtocolError, match="chose version 2"):
        check_welcome(Welcome(version=2, node="n", max_frame_bytes=1))


# -- end to end: handshake ---------------------------------------------------------------------


def test_handshake_returns_the_servers_welcome() -> None:
    async def main() -> None:
        async with serving(Toy(), max_frame_bytes=1 << 20) as server:
            async with await connect(server) as conn:
                assert conn.welcome == Welcome(version=1, node="toy-node", max_frame_bytes=1 << 20)
                assert await conn.request("echo", Echo(tag=5, text="hi"), Echo) == Echo(5, "hi")
                assert server.connections == 1
            assert conn.closed

    run(main())


def test_hello_refused_by_the_dispatcher_raises_unauthenticated_at_open() -> None:
    async def main() -> None:
        async with serving(Toy(api_key="secret")) as server:
            with pytest.raises(Unauthenticated, match="toy: unknown API key"):
                await connect(server, api_key="wrong")
            with pytest.raises(Unauthenticated):
                await connect(server)
            async with await connect(server, api_key="secret") as conn:
                reply = await conn.request("whoami", None, Echo)
                assert reply.text == "session of secret"

    run(main())


def test_hello_with_no_shared_version_gets_a_protocol_error_and_the_connection_closes() -> None:
    async def main() -> None:
        async with serving(Toy()) as server:
            reader, writer = await raw_connect(server.port)
            writer.write(encode_frame(0, "hello", Hello(versions=[2, 3])))
            (reply,) = await read_until_eof(reader)
            await close_raw(writer)
            error = decode_body(reply, ErrorBody)
            assert (reply.id, reply.kind, error.code) == (0, "error", "protocol_error")
            assert "client speaks versions [2, 3], server speaks [1]" in error.message

    run(main())


def test_first_frame_other_than_hello_gets_a_protocol_error() -> None:
    async def main() -> None:
        toy = Toy()
        async with serving(toy) as server:
            reader, writer = await raw_connect(server.port)
            writer.write(encode_frame(1, "echo", Echo(tag=1)))
            (reply,) = await read_until_eof(reader)
            await close_raw(writer)
            error = decode_body(reply, ErrorBody)
            assert (reply.kind, error.code) == ("error", "protocol_error")
            assert "the first frame must have kind 'hello', not 'echo'" in error.message
            assert toy.calls == 0

    run(main())


def test_client_that_says_nothing_is_disconnected_after_the_handshake_timeout() -> None:
    async def main() -> None:
        async with serving(Toy(), handshake_timeout_s=0.1) as server:
            reader, writer = await raw_connect(server.port)
            (reply,) = await read_until_eof(reader)
            await close_raw(writer)
            assert decode_body(reply, ErrorBody).message == "binary protocol: no hello within 0.1 s"

    run(main())


def test_frames_before_the_welcome_are_limited_to_64_kib_and_after_it_to_max_frame_bytes() -> None:
    async def main() -> None:
        async with serving(Toy()) as server:
            reader, writer = await raw_connect(server.port)
            writer.write(struct.pack(">I", HELLO_FRAME_BYTES_MAX + 1))
            (reply,) = await read_until_eof(reader)
            await close_raw(writer)
            assert decode_body(reply, ErrorBody).message == (
                f"binary protocol: frame of {HELLO_FRAME_BYTES_MAX + 1} bytes is over the limit "
                f"of {HELLO_FRAME_BYTES_MAX}"
            )
            async with await connect(server) as conn:
                big = Echo(tag=1, text="b" * (1 << 20))
                assert await conn.request("echo", big, Echo) == big

    run(main())


def test_requests_pipelined_behind_the_hello_are_served() -> None:
    async def main() -> None:
        async with serving(Toy()) as server:
            reader, writer = await raw_connect(server.port)
            writer.write(HELLO_FRAME + encode_frame(1, "echo", Echo(tag=1)))
            writer.write_eof()  # half-close: the server still answers what it read
            welcome, reply = await read_until_eof(reader)
            await close_raw(writer)
            assert welcome.kind == "welcome"
            assert (reply.id, reply.kind, decode_body(reply, Echo)) == (1, "ok", Echo(tag=1))

    run(main())


# -- end to end: requests ----------------------------------------------------------------------


def test_thousand_pipelined_requests_each_get_their_own_reply_out_of_order(seed: int) -> None:
    """Goal: replies are matched to requests by id, whatever order they come back in.
    Method: 1000 concurrent requests on one connection; each sleeps a random 0-20 ms in the
    dispatcher, so they finish in a shuffled order; each must get back its own tag."""
    rng = random.Random(seed)
    delays = [rng.uniform(0, 0.02) for _ in range(1000)]

    async def main() -> None:
        toy = Toy()
        async with serving(toy) as server, await connect(server) as conn:
            replies = await asyncio.gather(
                *(
                    conn.request("sleep", Sleep(tag=tag, delay_s=delay), Echo)
                    for tag, delay in enumerate(delays)
                )
            )
            assert [reply.tag for reply in replies] == list(range(1000))
            assert toy.finished != sorted(toy.finished), "replies did not come out of order"
            assert toy.max_active > 100, "requests were not in flight together"
            assert conn.pending == 0

    run(main())


def test_vectors_cross_the_wire_as_float32_arrays() -> None:
    async def main() -> None:
        async with serving(Toy()) as server, await connect(server) as conn:
            vector = np.linspace(-1, 1, 384, dtype=np.float32)
            call = SearchCall(collection="m", vector=vector, k=3)
            reply = await conn.request("vector", call, SearchCall)
            assert isinstance(reply.vector, np.ndarray)
            assert reply.vector.dtype == np.float32
            assert np.array_equal(reply.vector, vector)

    run(main())


def test_dispatcher_error_arrives_as_the_same_exception_with_its_details() -> None:
    async def main() -> None:
        async with serving(Toy()) as server, await connect(server) as conn:
            with pytest.raises(VersionConflict) as caught:
                await conn.request("conflict", None, Echo)
            assert str(caught.value) == "toy: version 3 expected, 5 stored"
            assert (caught.value.expected, caught.value.actual) == (3, 5)
            assert await conn.request("echo", Echo(tag=2), Echo) == Echo(tag=2)

    run(main())


def test_body_of_the_wrong_type_is_an_invalid_argument_and_the_connection_stays_open() -> None:
    async def main() -> None:
        async with serving(Toy()) as server, await connect(server) as conn:
            with pytest.raises(InvalidArgument) as caught:
                await conn.request("echo", {"tag": "seven"}, Echo)
            assert str(caught.value) == "echo: Expected `int`, got `str` - at `$.tag`"
            assert await conn.request("echo", Echo(tag=2), Echo) == Echo(tag=2)

    run(main())


def test_dispatcher_bug_arrives_as_an_internal_error_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with serving(Toy()) as server, await connect(server) as conn:
            with pytest.raises(MemclusterError) as caught:
                await conn.request("bug", None, Echo)
            assert type(caught.value) is MemclusterError
            assert caught.value.code == "internal"
            assert str(caught.value) == (
                "internal error serving bug: KeyError: 'bug'; this is a bug, please report it"
            )
            assert await conn.request("echo", Echo(tag=2), Echo) == Echo(tag=2)

    with caplog.at_level(logging.ERROR, logger="memcluster.transport"):
        run(main())
    (record,) = caplog.records
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError


def test_request_over_the_servers_frame_limit_raises_payload_too_large_without_sending() -> None:
    async def main() -> None:
        toy = Toy()
        async with serving(toy, max_frame_bytes=1024) as server, await connect(server) as conn:
            with pytest.raises(PayloadTooLarge, match="over the frame limit of 1024 bytes"):
                await conn.request("echo", Echo(tag=1, text="x" * 2000), Echo)
            assert toy.calls == 0
            with pytest.raises(PayloadTooLarge, match=r"reply to big is .* over the frame limit"):
                await conn.request("big", Echo(tag=1), Echo)
            assert await conn.request("echo", Echo(tag=2), Echo) == Echo(tag=2)

    run(main())


def test_request_without_a_reply_in_time_raises_timeout_and_the_late_reply_is_dropped() -> None:
    async def main() -> None:
        async with serving(Toy()) as server, await connect(server) as conn:
            with pytest.raises(Timeout) as caught:
                await conn.request("sleep", Sleep(tag=1, delay_s=0.2), Echo, timeout_s=0.05)
            assert str(caught.value) == "binary protocol: no reply to sleep within 0.05 s"
            assert conn.pending == 0
            await eventually(lambda: server.in_flight == 0, "the slow request finished")
            assert await conn.request("echo", Echo(tag=2), Echo, timeout_s=1.0) == Echo(tag=2)
            assert not conn.closed

    run(main())


# -- end to end: failures ----------------------------------------------------------------------


def test_connecting_to_a_closed_port_raises_unreachable() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()

    async def main() -> None:
        with pytest.raises(Unreachable) as caught:
            await Connection.open("127.0.0.1", port)
        assert str(caught.value) == (
            f"binary protocol: cannot connect to 127.0.0.1:{port}: Connection refused; "
            "is the server running?"
        )

    run(main())


def test_garbage_bytes_get_a_protocol_error_frame_and_only_that_connection_closes() -> None:
    async def main() -> None:
        async with serving(Toy()) as server, await connect(server) as bystander:
            reader, writer = await raw_connect(server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            (reply,) = await read_until_eof(reader)
            await close_raw(writer)
            error = decode_body(reply, ErrorBody)
            assert (reply.id, reply.kind, error.code) == (0, "error", "protocol_error")
            assert error.message == (
                "binary protocol: frame of 1195725856 bytes is over the limit of 65536"
            )

            reader, writer = await raw_connect(server.port)
            writer.write(HELLO_FRAME)
            decoder = FrameDecoder()
            while not (welcome := decoder.feed(await reader.read(1 << 16))):
                pass
            assert welcome[0].kind == "welcome"
            writer.write(struct.pack(">I", 3) + b"abc")
            (reply,) = await read_until_eof(reader)
            await close_raw(writer)
            assert "frame 2 is not a msgpack envelope" in decode_body(reply, ErrorBody).message

            assert await bystander.request("echo", Echo(tag=1), Echo) == Echo(tag=1)
            async with await connect(server) as conn:
                assert await conn.request("echo", Echo(tag=2), Echo) == Echo(tag=2)

    run(main())


def test_truncated_frame_followed_by_a_disconnect_leaves_the_server_serving() -> None:
    async def main() -> None:
        async with serving(Toy()) as server:
            _, writer = await raw_connect(server.port)
            frame = encode_frame(1, "echo", Echo(tag=1, text="x" * 100))
            writer.write(HELLO_FRAME + frame[: len(frame) // 2])
            await writer.drain()
            await close_raw(writer)
            await eventually(lambda: server.connections == 0, "the server dropped the connection")
            async with await connect(server) as conn:
                assert await conn.request("echo", Echo(tag=2), Echo) == Echo(tag=2)

    run(main())


def test_client_that_disconnects_with_requests_in_flight_leaves_the_server_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        toy = Toy()
        async with serving(toy) as server:
            conn = await connect(server)
            requests = [
                asyncio.create_task(conn.request("sleep", Sleep(tag=i, delay_s=0.1), Echo))
                for i in range(10)
            ]
            await eventually(lambda: server.in_flight == 10, "10 requests in flight")
            await conn.close()
            for request in requests:
                with pytest.raises(Unreachable, match="lost \\(closed by this client\\)"):
                    await request
            await eventually(lambda: server.in_flight == 0, "in-flight requests finished")
            await eventually(lambda: server.connections == 0, "the connection was dropped")
            assert sorted(toy.finished) == list(range(10))
            async with await connect(server) as again:
                assert await again.request("echo", Echo(tag=2), Echo) == Echo(tag=2)

    with caplog.at_level(logging.INFO, logger="memcluster.transport"):
        run(main())
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_server_that_closes_the_connection_fails_waiting_requests_with_unreachable() -> None:
    """Goal: requests waiting on a connection that the server drops raise Unreachable, and so
    does every later request. Method: a fake server that welcomes, then hangs up on the first
    request."""

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        writer.write(encode_frame(0, "welcome", Welcome(version=1, node="f", max_frame_bytes=99)))
        await reader.read(1 << 16)
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, await Connection.open("127.0.0.1", port) as conn:
            with pytest.raises(Unreachable, match="lost \\(the server closed it\\)"):
                await conn.request("echo", Echo(tag=1), Echo)
            assert conn.closed
            with pytest.raises(Unreachable):
                await conn.request("echo", Echo(tag=1), Echo)

    run(main())


def test_server_that_sends_garbage_fails_waiting_requests_with_unreachable() -> None:
    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        writer.write(encode_frame(0, "welcome", Welcome(version=1, node="f", max_frame_bytes=99)))
        await reader.read(1 << 16)
        writer.write(struct.pack(">I", 2) + b"\xc1\xc1")
        await reader.read(1 << 16)
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, await Connection.open("127.0.0.1", port) as conn:
            with pytest.raises(Unreachable, match="frame 2 is not a msgpack envelope"):
                await conn.request("echo", Echo(tag=1), Echo)

    run(main())


def test_server_that_chose_an_unknown_version_or_never_answers_fails_the_open() -> None:
    async def newer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        writer.write(encode_frame(0, "welcome", Welcome(version=9, node="f", max_frame_bytes=99)))
        await reader.read(1 << 16)
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await reader.read(1 << 16)
        writer.close()

    async def main() -> None:
        for handler, error, message in [
            (newer, ProtocolError, "chose version 9"),
            (silent, Unreachable, "accepted the connection but sent no welcome within 0.2 s"),
        ]:
            server = await asyncio.start_server(handler, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            async with server:
                with pytest.raises(error, match=message):
                    await Connection.open("127.0.0.1", port, connect_timeout_s=0.2)

    run(main())


def test_close_is_idempotent_and_fails_waiting_requests_with_unreachable() -> None:
    async def main() -> None:
        async with serving(Toy()) as server:
            conn = await connect(server)
            waiting = asyncio.create_task(conn.request("sleep", Sleep(tag=1, delay_s=0.3), Echo))
            await eventually(lambda: server.in_flight == 1, "the request is in flight")
            await conn.close()
            await conn.close()
            assert conn.closed
            with pytest.raises(Unreachable, match=r"connection to 127\.0\.0\.1:\d+ lost"):
                await waiting
            with pytest.raises(Unreachable):
                await conn.request("echo", Echo(tag=1), Echo)

    run(main())


# -- end to end: backpressure and shutdown -----------------------------------------------------


def test_client_that_never_reads_replies_cannot_push_more_than_max_in_flight_calls() -> None:
    """Goal: a client that floods requests and never reads replies cannot make the server run
    more than ``max_in_flight`` calls at once, nor read its requests without bound.
    Method: a raw socket with a small receive buffer writes 10,000 requests whose replies are
    2 KiB each (20 MB, far more than the socket buffers hold) and reads nothing for 0.3 s:
    the server must be stuck with exactly 8 calls in flight, having started only a fraction of
    the requests. Then the client reads, and every reply must arrive."""
    count = 10_000

    async def main() -> None:
        toy = Toy()
        async with serving(toy, max_in_flight=8) as server:
            reader, writer = await raw_connect(server.port, receive_buffer_bytes=16 << 10)
            writer.write(HELLO_FRAME)
            writer.write(b"".join(encode_frame(i, "big", Echo(tag=i)) for i in range(1, count + 1)))
            # Wait until the server is stuck (not a fixed sleep: a loaded machine is slower).
            await eventually(lambda: server.in_flight == 8, "8 calls stuck in flight")
            await asyncio.sleep(0.1)
            assert toy.max_active <= 8
            assert server.in_flight == 8
            # The kernel buffers some replies (here about 1,900: a 4 MiB send buffer); the
            # server must have stopped well before the last request.
            assert toy.calls < count, "the server kept reading requests"

            decoder = FrameDecoder()
            replies: dict[int, Envelope] = {}
            while len(replies) < count + 1:
                data = await reader.read(1 << 18)
                assert data, "the server closed the connection"
                replies.update((envelope.id, envelope) for envelope in decoder.feed(data))
            await close_raw(writer)
            assert toy.calls == count
            assert toy.max_active <= 8
            assert all(replies[i].kind == "ok" for i in range(1, count + 1))
            assert decode_body(replies[count], Echo).tag == count

    run(main())


def test_close_waits_for_a_request_in_flight_and_its_reply() -> None:
    async def main() -> None:
        toy = Toy()
        async with serving(toy) as server:
            conn = await connect(server)
            request = asyncio.create_task(conn.request("sleep", Sleep(tag=1, delay_s=0.3), Echo))
            await eventually(lambda: server.in_flight == 1, "the request is in flight")
            closing = asyncio.create_task(server.close(grace_s=3.0))
            await asyncio.sleep(0.05)
            with pytest.raises(Unreachable, match="cannot connect"):
                await connect(server, connect_timeout_s=1.0)
            assert not request.done()
            assert not closing.done()
            assert await request == Echo(tag=1)
            await closing
            assert server.in_flight == 0
            assert server.connections == 0
            with pytest.raises(Unreachable):
                await conn.request("echo", Echo(tag=2), Echo)
            await conn.close()

    run(main())


def test_close_cancels_requests_still_running_after_the_grace_period() -> None:
    async def main() -> None:
        async with serving(Toy()) as server:
            conn = await connect(server)
            request = asyncio.create_task(conn.request("sleep", Sleep(tag=1, delay_s=30), Echo))
            await eventually(lambda: server.in_flight == 1, "the request is in flight")
            started = time.monotonic()
            await server.close(grace_s=0.2)
            assert time.monotonic() - started < 1.5
            assert server.in_flight == 0
            with pytest.raises(Unreachable):
                await request
            await conn.close()

    run(main())


# -- end to end: streams -----------------------------------------------------------------------


def test_stream_of_1000_items_arrives_in_order_interleaved_with_100_requests() -> None:
    """Goal: a stream's items arrive complete and in order while ordinary requests share its
    connection. Method: the consumer sends a request on the same connection after every
    tenth item, so replies and items interleave on the wire for the whole stream."""

    async def main() -> None:
        toy = Toy()
        async with serving(toy) as server, await connect(server) as conn:
            items: list[Item] = []
            replies: list[Echo] = []
            async for item in conn.stream("feed", Feed(tag=7, n=1000), Item):
                items.append(item)
                if item.seq % 10 == 0:
                    replies.append(await conn.request("echo", Echo(tag=item.seq), Echo))
            assert items == [Item(tag=7, seq=seq) for seq in range(1000)]
            assert [reply.tag for reply in replies] == list(range(0, 1000, 10))
            assert (conn.streams, conn.pending) == (0, 0)
            await eventually(lambda: server.in_flight == 0, "the stream task finished")
            assert toy.closed == [7]

    run(main())


def test_concurrent_streams_on_one_connection_each_get_their_own_items() -> None:
    async def main() -> None:
        toy = Toy()
        async with serving(toy) as server, await connect(server) as conn:

            async def consume(tag: int) -> list[Item]:
                feed = Feed(tag=tag, n=50 * tag, pad=tag)
                return [item async for item in conn.stream("feed", feed, Item)]

            *streams, replies = await asyncio.gather(
                *(consume(tag) for tag in range(1, 9)),
                asyncio.gather(*(conn.request("echo", Echo(tag=i), Echo) for i in range(50))),
            )
            for tag, items in enumerate(streams, start=1):
                assert items == [Item(tag, seq, "x" * tag) for seq in range(50 * tag)]
            assert replies == [Echo(tag=i) for i in range(50)]
            assert sorted(toy.closed) == list(range(1, 9))
            assert conn.streams == 0

    run(main())


def test_error_mid_stream_arrives_as_its_exception_after_the_items_before_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        toy = Toy()
        async with serving(toy, max_frame_bytes=4096) as server, await connect(server) as conn:
            seen: list[Item] = []
            with pytest.raises(VersionConflict) as conflict:
                await collect(conn.stream("feed", Feed(tag=1, n=10, fail_at=4), Item), seen)
            assert [item.seq for item in seen] == [0, 1, 2, 3]
            assert str(conflict.value) == "toy: feed version 3 expected, 5 stored"
            assert (conflict.value.expected, conflict.value.actual) == (3, 5)

            seen.clear()
            with pytest.raises(MemclusterError) as bug:
                await collect(conn.stream("feed", Feed(tag=2, n=10, bug_at=2), Item), seen)
            assert [item.seq for item in seen] == [0, 1]
            assert (type(bug.value), bug.value.code) == (MemclusterError, "internal")
            assert str(bug.value) == (
                "internal error serving feed: KeyError: 2; this is a bug, please report it"
            )

            seen.clear()
            with pytest.raises(InvalidArgument, match=r"^feed: Expected `int`, got `str`"):
                await collect(conn.stream("feed", {"tag": "three"}, Item), seen)
            assert seen == []

            big = Feed(tag=4, n=3, pad=5000)
            with pytest.raises(PayloadTooLarge, match=r"item 1 of the feed stream is \d+ bytes"):
                await collect(conn.stream("feed", big, Item), seen)
            assert seen == []

            assert await conn.request("echo", Echo(tag=5), Echo) == Echo(tag=5)
            assert conn.streams == 0
            await eventually(lambda: server.in_flight == 0, "the stream tasks finished")
            assert sorted(toy.closed) == [1, 2, 4]

    with caplog.at_level(logging.ERROR, logger="memcluster.transport"):
        run(main())
    (record,) = caplog.records
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError


def test_leaving_a_stream_early_stops_its_producer_and_the_connection_keeps_working() -> None:
    """Goal: a consumer that leaves a stream (break, aclose, its task cancelled) makes the
    server stop and close the producer, without disturbing the connection. Method: endless
    feeds, left in each of the three ways; the toy records each feed whose ``finally`` ran."""

    async def main() -> None:
        toy = Toy()
        async with serving(toy) as server, await connect(server) as conn:
            async for item in conn.stream("feed", Feed(tag=1), Item):
                if item.seq == 2:
                    break
            await eventually(lambda: toy.closed == [1], "the producer of feed 1 was closed")

            async with aclosing(conn.stream("feed", Feed(tag=2), Item)) as items:
                async for item in items:
                    if item.seq == 5:
                        break
            assert conn.streams == 0  # forgotten at once; the cancel is on its way
            await eventually(lambda: toy.closed == [1, 2], "the producer of feed 2 was closed")

            async def wait_forever() -> None:
                async for _ in conn.stream("feed", Feed(tag=3, delay_s=30), Item):
                    pytest.fail("no item expected")

            waiting = asyncio.create_task(wait_forever())
            await eventually(lambda: 3 in toy.produced, "feed 3 started")
            waiting.cancel()
            with suppress(asyncio.CancelledError):
                await waiting
            await eventually(lambda: toy.closed == [1, 2, 3], "the producer of feed 3 was closed")

            await eventually(lambda: server.in_flight == 0, "no stream runs on the server")
            assert server.streams == 0
            produced = dict(toy.produced)
            await asyncio.sleep(0.05)
            assert toy.produced == produced, "a producer went on after its stream was left"
            assert await conn.request("echo", Echo(tag=4), Echo) == Echo(tag=4)
            items_ = [item.seq async for item in conn.stream("feed", Feed(tag=5, n=3), Item)]
            assert items_ == [0, 1, 2]
            assert (conn.streams, conn.pending, conn.closed) == (0, 0, False)

    run(main())


def test_cancel_gets_an_end_frame_and_a_cancel_naming_no_running_stream_is_ignored() -> None:
    """Goal: pin the wire behaviour of cancel. Method: a raw client starts an endless stream,
    cancels an id that was never used, reads a few items, cancels the stream (the final frame
    must be "end", after any items already on their way), then cancels it again and sends a
    request: only that request's reply may follow."""

    async def main() -> None:
        toy = Toy()
        async with serving(toy) as server:
            reader, writer = await raw_connect(server.port)
            decoder = FrameDecoder()
            frames: list[Envelope] = []
            writer.write(HELLO_FRAME + encode_frame(1, "feed", Feed(tag=1, delay_s=0.001)))
            writer.write(encode_frame(99, "cancel", Empty()))
            await read_until(reader, decoder, frames, lambda got: len(got) >= 4)
            writer.write(encode_frame(1, "cancel", Empty()) + encode_frame(2, "echo", Echo(2)))
            await read_until(reader, decoder, frames, lambda got: (1, "end") in ids(got[1:]))
            await read_until(reader, decoder, frames, lambda got: (2, "ok") in ids(got[1:]))
            writer.write(encode_frame(1, "cancel", Empty()) + encode_frame(3, "echo", Echo(3)))
            await read_until(reader, decoder, frames, lambda got: (3, "ok") in ids(got[1:]))
            await close_raw(writer)

            welcome, *rest = ids(frames)
            assert welcome == (0, "welcome")
            stream = [kind for id_, kind in rest if id_ == 1]
            assert stream[-1] == "end"
            assert set(stream[:-1]) == {"item"}
            assert [id_ for id_, kind in rest if id_ != 1] == [2, 3]
            assert toy.closed == [1]

    def ids(frames: list[Envelope]) -> list[tuple[int, str]]:
        return [(frame.id, frame.kind) for frame in frames]

    run(main())


def test_connection_lost_mid_stream_raises_unreachable_after_the_items_received() -> None:
    """Goal: a consumer sees a lost connection as Unreachable, after the items that did
    arrive, whether the server drops the connection or the client closes it. Method: a fake
    server that sends three items and hangs up; then the real server, and a client that
    closes its connection under a consumer (the server must then close the producer)."""

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        writer.write(encode_frame(0, "welcome", Welcome(version=1, node="f", max_frame_bytes=99)))
        await reader.read(1 << 16)
        writer.write(b"".join(encode_frame(1, "item", Item(tag=1, seq=seq)) for seq in range(3)))
        writer.close()

    async def main() -> None:
        fake_server = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = fake_server.sockets[0].getsockname()[1]
        async with fake_server, await Connection.open("127.0.0.1", port) as conn:
            seen: list[Item] = []
            with pytest.raises(Unreachable, match=r"lost \(the server closed it\)"):
                await collect(conn.stream("feed", Feed(tag=1), Item), seen)
            assert seen == [Item(tag=1, seq=seq) for seq in range(3)]
            assert conn.closed
            with pytest.raises(Unreachable):
                await anext(conn.stream("feed", Feed(tag=1), Item))

        toy = Toy()
        async with serving(toy) as server:
            conn = await connect(server)
            first = asyncio.Event()

            async def consume() -> None:
                async for _ in conn.stream("feed", Feed(tag=2, delay_s=0.01), Item):
                    first.set()

            consumer = asyncio.create_task(consume())
            await first.wait()
            await conn.close()
            with pytest.raises(Unreachable, match=r"lost \(closed by this client\)"):
                await consumer
            await eventually(lambda: toy.closed == [2], "the server closed the producer")
            await eventually(lambda: server.in_flight == 0, "no stream runs on the server")

    run(main())


def test_server_close_ends_endless_streams_at_once_while_requests_finish() -> None:
    """Goal: shutting down does not wait for streams (they may never end): each consumer
    raises Unreachable promptly, while a request in flight still gets its reply. Method: a
    busy stream and an idle one, and a request sleeping 0.5 s, then close with 3 s of grace:
    both streams must end well before the request does."""

    async def main() -> None:
        toy = Toy()
        async with serving(toy) as server, await connect(server) as conn:
            counts = {1: 0, 2: 0}

            async def consume(feed: Feed) -> None:
                async for _ in conn.stream("feed", feed, Item):
                    counts[feed.tag] += 1

            busy = asyncio.create_task(consume(Feed(tag=1, delay_s=0.002)))
            idle = asyncio.create_task(consume(Feed(tag=2, delay_s=30)))
            request = asyncio.create_task(conn.request("sleep", Sleep(tag=3, delay_s=0.5), Echo))
            await eventually(lambda: counts[1] >= 3 and server.in_flight == 3, "all started")

            started = time.monotonic()
            closing = asyncio.create_task(server.close(grace_s=3.0))
            for consumer in (busy, idle):
                with pytest.raises(Unreachable, match="toy-node is shutting down; the feed"):
                    await consumer
            assert time.monotonic() - started < 0.3
            assert not request.done()
            assert sorted(toy.closed) == [1, 2]
            assert await request == Echo(tag=3)
            await closing
            assert time.monotonic() - started < 1.5
            assert (server.in_flight, server.connections) == (0, 0)

    run(main())


def test_streams_beyond_max_streams_are_refused_as_overloaded() -> None:
    """Goal: a connection runs at most ``max_streams`` streams; one more is refused at once.
    Method: two slow endless feeds hold both places. (Slow, because this task stops consuming
    them while it waits on the same connection: fast ones would fill their client buffers and
    stall the connection, as documented.)"""

    async def main() -> None:
        async with serving(Toy(), max_streams=2) as server, await connect(server) as conn:
            one = conn.stream("feed", Feed(tag=1, delay_s=0.05), Item)
            two = conn.stream("feed", Feed(tag=2, delay_s=0.05), Item)
            assert (await anext(one), await anext(two)) == (Item(1, 0), Item(2, 0))
            with pytest.raises(Overloaded, match="2 streams are running on this connection"):
                await anext(conn.stream("feed", Feed(tag=3), Item))
            await one.aclose()
            await eventually(lambda: server.streams == 1, "stream 1 ended on the server")
            assert [item.seq async for item in conn.stream("feed", Feed(4, n=2), Item)] == [0, 1]
            await two.aclose()

    run(main())


def test_dispatcher_without_stream_methods_serves_every_kind_as_a_request() -> None:
    """Goal: the node's dispatcher, which has only hello and call, keeps working; a stream
    asked of it gets whatever call answers. Method: a dispatcher with the toy's hello and
    call only."""

    async def main() -> None:
        async with serving(Plain()) as server, await connect(server) as conn:
            assert await conn.request("echo", Echo(tag=1), Echo) == Echo(tag=1)
            with pytest.raises(InvalidArgument, match="toy: unknown kind 'feed'"):
                await anext(conn.stream("feed", Feed(tag=1), Item))
            with pytest.raises(ProtocolError, match="kind 'ok' in the echo stream"):
                await anext(conn.stream("echo", Echo(tag=2), Item))
            assert conn.streams == 0
            assert await conn.request("echo", Echo(tag=3), Echo) == Echo(tag=3)

    run(main())


def test_stream_producer_waits_for_a_client_that_does_not_read() -> None:
    """Goal: a client that stops reading a stream's items stops its producer, instead of
    making the server buffer them. Method: a raw socket with a small receive buffer asks for
    an endless feed of 1 KiB items and reads nothing: the producer must come to a halt (after
    filling the socket buffers, a few MiB at most), and go on once the client reads."""

    async def main() -> None:
        toy = Toy()
        async with serving(toy) as server:
            reader, writer = await raw_connect(server.port, receive_buffer_bytes=16 << 10)
            writer.write(HELLO_FRAME + encode_frame(1, "feed", Feed(tag=1, pad=1024)))
            halted = await stalled(lambda: toy.produced.get(1, 0), "the producer of feed 1")
            # The socket buffers hold a few thousand 1 KiB items (about 3,700 on Linux with
            # default settings); 50,000 would be 50 MiB held for one client.
            assert 0 < halted < 50_000
            assert server.in_flight == 1
            for _ in range(100):
                assert await reader.read(1 << 16)
            await eventually(lambda: toy.produced[1] > halted, "the producer went on")
            await close_raw(writer)
            await eventually(lambda: toy.closed == [1], "the producer was closed")

    run(main())


def test_stream_consumer_that_pauses_stops_its_producer_and_stalls_its_connection() -> None:
    """Goal: a consumer that stops taking items slows its producer down through TCP, with
    the documented price: its connection stalls, and other connections do not. Method: a
    client holding 64 items per stream; the consumer takes 10 items and pauses. The producer
    must halt, a request on the same connection must time out, one on another connection
    must not; once the consumer goes on, everything does."""

    async def main() -> None:
        toy = Toy()
        async with (
            serving(toy) as server,
            await connect(server, stream_buffer_items=64) as conn,
            await connect(server) as other,
        ):
            items = conn.stream("feed", Feed(tag=1, pad=1024), Item)
            assert [(await anext(items)).seq for _ in range(10)] == list(range(10))
            halted = await stalled(lambda: toy.produced[1], "the producer of feed 1")
            assert halted < 50_000  # 64 held by the client, the rest in the socket buffers
            with pytest.raises(Timeout):
                await conn.request("echo", Echo(tag=1), Echo, timeout_s=0.1)
            assert await other.request("echo", Echo(tag=2), Echo) == Echo(tag=2)

            for seq in range(10, halted + 100):
                assert (await anext(items)).seq == seq
            assert toy.produced[1] > halted
            await items.aclose()
            assert await conn.request("echo", Echo(tag=3), Echo, timeout_s=1.0) == Echo(tag=3)
            await eventually(lambda: toy.closed == [1], "the producer was closed")

    run(main())
