"""One node's server process: the HTTP API and the binary protocol on one uvloop event loop.

Lifecycle of :func:`serve`::

    bind both ports ──► start HTTP (uvicorn) and binary servers ──► "ready" callback
        │ (port in use: a clear error, nothing started)              │
        ▼                                                            ▼
                                                     SIGTERM / SIGINT (or ``stop`` set)
                                                                     │
    health says "stopping", /v1/ready answers 503 ◄──────────────────┘
    both servers stop accepting; in-flight requests finish (up to ``shutdown_grace_s``)
    the request threads drain; the caller then closes the store, which syncs every WAL

The store is opened (and its directory locked) by the caller, so a second process on the same
data directory is refused before any port is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, cast

import msgspec
import uvicorn

from memcluster.core.api import OPERATIONS
from memcluster.core.config import Config
from memcluster.core.errors import InvalidArgument, InvalidState
from memcluster.node.auth import Auth, Principal
from memcluster.node.http import build_app
from memcluster.node.service import Service, Store
from memcluster.transport.connection import BinaryServer
from memcluster.transport.frames import Envelope, Hello, decode_body

log = logging.getLogger("memcluster.node")


class Listen(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how a node listens."""

    host: str = "127.0.0.1"
    http_port: int = 7700
    peer_port: int = 7701
    """The binary protocol's port (clients with ``mc://`` and, later, other nodes)."""
    tls_cert: str | None = None
    """PEM certificate; with ``tls_key``, both protocols use TLS."""
    tls_key: str | None = None


def bind(host: str, port: int, flag: str) -> socket.socket:
    """A listening TCP socket, or InvalidState saying which port is taken and what to do."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidArgument(f"cannot listen on host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InvalidState(
                f"port {port} on {host} is in use by another process: stop it, or pass another"
                f" port with {flag}"
            ) from None
        raise InvalidState(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


Internal = Mapping[str, tuple[type[msgspec.Struct], Callable[[Any], Awaitable[msgspec.Struct]]]]
"""Node-to-node operations a cluster node serves besides the public ones: kind -> (request
type, handler). See :mod:`memcluster.cluster.wire`."""
InternalStreams = Mapping[str, tuple[type[msgspec.Struct], Callable[[Any], AsyncIterator[Any]]]]
"""Node-to-node streams: kind -> (request type, handler returning the items)."""


class _Dispatcher:
    """Adapts the binary protocol's requests to :class:`Service`."""

    def __init__(self, service: Service, internal: Internal, streams: InternalStreams) -> None:
        self._service = service
        self._internal = internal
        self._streams = streams

    def hello(self, hello: Hello) -> object:
        return self._service.auth.authenticate(hello.api_key)

    async def call(self, session: object, envelope: Envelope) -> Any:
        assert isinstance(session, Principal)
        internal = self._internal.get(envelope.kind)
        if internal is not None:
            self._service.auth.authorize_internal(session, envelope.kind)
            return await internal[1](decode_body(envelope, internal[0]))
        op = OPERATIONS.get(envelope.kind)
        if op is None:
            raise InvalidArgument(
                f"unknown operation {envelope.kind!r}; known operations: {', '.join(OPERATIONS)}"
            )
        request = decode_body(envelope, op.request)
        collection = getattr(request, "collection", None)
        return await self._service.run(session, envelope.kind, collection, request)

    def is_stream(self, kind: str) -> bool:
        op = OPERATIONS.get(kind)
        return kind in self._streams or (op is not None and op.stream)

    async def stream(self, session: object, envelope: Envelope) -> AsyncIterator[Any]:
        assert isinstance(session, Principal)
        internal = self._streams.get(envelope.kind)
        if internal is not None:
            self._service.auth.authorize_internal(session, envelope.kind)
            items = internal[1](decode_body(envelope, internal[0]))
            async with contextlib.aclosing(cast(AsyncGenerator[Any, None], items)):
                async for item in items:
                    yield item
            return
        op = OPERATIONS[envelope.kind]
        request = decode_body(envelope, op.request)
        collection = getattr(request, "collection", "")
        events = await self._service.stream(session, envelope.kind, collection, request)
        # aclosing: a cancelled stream stops its feed reader now, not when collected.
        async with contextlib.aclosing(cast(AsyncGenerator[Any, None], events)):
            async for event in events:
                if event is not None:  # heartbeats are for HTTP; TCP keepalive covers this
                    yield event


def _tls(listen: Listen) -> ssl.SSLContext | None:
    if listen.tls_cert is None and listen.tls_key is None:
        return None
    if listen.tls_cert is None or listen.tls_key is None:
        raise InvalidArgument("TLS needs both a certificate and a key (--tls-cert, --tls-key)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(listen.tls_cert, listen.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot load the TLS certificate and key: {exc}") from None
    return context


async def serve(
    store: Store,
    config: Config,
    listen: Listen,
    *,
    node: str,
    auth: Auth,
    ready: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
    internal: Internal | None = None,
    internal_streams: InternalStreams | None = None,
) -> None:
    """Serve ``store`` until SIGTERM/SIGINT (or ``stop``), then shut down gracefully.

    ``ready(http_port, peer_port)`` is called once both ports accept connections (useful with
    port 0). Returns after every in-flight request has finished or the grace period passed.
    """
    tls = _tls(listen)
    http_sock = bind(listen.host, listen.http_port, "--http-port")
    try:
        peer_sock = bind(listen.host, listen.peer_port, "--peer-port")
    except BaseException:
        http_sock.close()
        raise
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = _catch_signals(loop, stop)
    service = Service(
        store,
        node=node,
        auth=auth,
        threads=config.request_threads,
        waiters=config.coord_waiters_max,
    )
    binary: BinaryServer | None = None
    try:
        app = build_app(service, request_bytes_max=config.request_bytes_max)
        http = _Uvicorn(
            uvicorn.Config(
                app,
                loop="none",
                http="httptools",
                lifespan="off",
                log_config=None,
                access_log=False,
                server_header=False,
                limit_concurrency=config.http_concurrency_max,
                timeout_graceful_shutdown=max(1, round(config.shutdown_grace_s)),
                ssl_certfile=listen.tls_cert if tls else None,
                ssl_keyfile=listen.tls_key if tls else None,
            )
        )
        binary = await BinaryServer.start(
            _Dispatcher(service, internal or {}, internal_streams or {}),
            peer_sock,
            node=node,
            ssl=tls,
            max_frame_bytes=config.request_bytes_max,
            max_in_flight=config.connection_in_flight_max,
        )
        async with asyncio.TaskGroup() as tasks:
            http_task = tasks.create_task(http.serve(sockets=[http_sock]))
            while not http.started and not http_task.done():
                await asyncio.sleep(0.01)
            if http.started:
                http_port = http_sock.getsockname()[1]
                log.info(
                    "serving http on %s:%d, binary on %s:%d",
                    listen.host,
                    http_port,
                    listen.host,
                    binary.port,
                )
                if ready is not None:
                    ready(http_port, binary.port)
                stopped = tasks.create_task(stop.wait())
                await asyncio.wait([stopped, http_task], return_when=asyncio.FIRST_COMPLETED)
            log.info("shutting down: finishing in-flight requests")
            service.stopping = True
            http.should_exit = True
            stop.set()
            await binary.close(config.shutdown_grace_s)
    finally:
        if binary is not None:
            await binary.close(0)
        peer_sock.close()
        http_sock.close()
        await loop.run_in_executor(None, service.close)
        for sig in signals:
            loop.remove_signal_handler(sig)


def _catch_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> list[signal.Signals]:
    """Turn SIGTERM and SIGINT into ``stop``; only possible on the main thread."""
    caught = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        caught.append(sig)
    return caught
