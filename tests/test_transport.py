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
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcluster.core.api import ErrorBody, SearchCall
from memcluster.core.errors import (
    InvalidArgument,
    MemclusterError,
    PayloadTooLarge,
    ProtocolError,
    Timeout,
    Unauthenticated,
    Unreachable,
    VersionConflict,
)
from memcluster.transport.connection import BinaryServer, Connection
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


class Toy:
    """A dispatcher with one behaviour per kind; it counts calls and concurrent calls.

    echo: returns its body. sleep: sleeps ``delay_s``, then echoes the tag. big: echoes the tag
    with 2 KiB of text. vector: returns its SearchCall body. whoami: returns the session.
    conflict: raises VersionConflict(expected=3, actual=5). bug: raises KeyError.
    """

    def __init__(self, *, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self.finished: list[int] = []

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


@asynccontextmanager
async def serving(dispatcher: Toy, **options: Any) -> AsyncIterator[BinaryServer]:
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


HELLO_FRAME = encode_frame(0, "hello", Hello(versions=[PROTOCOL_VERSION]))


# -- frames: the pinned format -----------------------------------------------------------------


def test_golden_frames_match_the_pinned_bytes() -> None:
    assert golden_frames() == read_golden()


def test_golden_frames_decode_back_to_their_fields() -> None:
    search, hello = FrameDecoder().feed(b"".join(read_golden()))
    assert (search.id, search.kind, hello.id, hello.kind) == (7, "search", 0, "hello")
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
    assert len(expected) == 3
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
            await asyncio.sleep(0.3)
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
