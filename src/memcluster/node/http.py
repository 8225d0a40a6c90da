"""The HTTP/JSON API: Litestar routes over :class:`memcluster.node.service.Service`.

Every route is a thin edge: Litestar decodes and validates the body into the struct that
:data:`memcluster.core.api.OPERATIONS` names for it, the handler authenticates the caller and
calls ``Service.run``, and errors become ``{"code", "message", "details"}`` bodies with the
status of the error table. Routes (the OpenAPI document at ``/openapi.json``, a docs page at
``/docs``)::

    GET    /v1/health                                   liveness (no key needed)
    GET    /v1/ready                                    200 when serving, 503 while stopping
    GET    /v1/collections                              names
    POST   /v1/collections                              create (body: the collection config)
    GET    /v1/collections/{name}                       config and stats
    DELETE /v1/collections/{name}                       drop
    POST   /v1/collections/{name}/memories              put a batch {memories, idempotency_key}
    POST   /v1/collections/{name}/memories/get          {namespace, key}
    POST   /v1/collections/{name}/memories/delete       {namespace, key}
    POST   /v1/collections/{name}/memories/delete_where {namespace, filter}
    POST   /v1/collections/{name}/memories/count        {namespace, filter}
    POST   /v1/collections/{name}/memories/list         {namespace, filter, limit, cursor}
    POST   /v1/collections/{name}/search                {vector, k, namespace, filter, ...}

No input can produce a 500: malformed JSON, wrong types and unknown fields are 400, an unknown
route 404, a body over ``request_bytes_max`` 413, and the engine's own checks give their 4xx.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
import numpy as np
from litestar import Litestar, Request, Response, delete, get, post
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import RedocRenderPlugin
from litestar.params import Body, FromPath, FromQuery, JSONBody
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from memcluster.core import api, session
from memcluster.core.api import OPERATIONS
from memcluster.core.errors import ERROR_TABLE, InvalidArgument, MemclusterError, error_details
from memcluster.core.types import CollectionConfig, CollectionInfo
from memcluster.node.service import Service

log = logging.getLogger("memcluster.node")


def _route(kind: str) -> str:
    return OPERATIONS[kind].path.replace("{collection}", "{collection:str}")


def _api_key(request: Request[Any, Any, Any]) -> str | None:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return request.headers.get("x-api-key")


def _error_response(status: int, code: str, message: str, details: dict[str, Any]) -> Response[Any]:
    return Response(
        content=api.ErrorBody(code=code, message=message, details=details), status_code=status
    )


def _on_memcluster_error(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    assert isinstance(exc, MemclusterError)
    info = ERROR_TABLE[type(exc)]
    if info.http_status >= 500 and not info.retryable:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
    return _error_response(info.http_status, info.code, str(exc), error_details(exc))


_STATUS_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "overloaded",
}


def _on_http_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    message = exc.detail
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list):
        problems = [
            f"{item.get('message')} at {item.get('key') or '$'}"
            for item in exc.extra
            if isinstance(item, dict)
        ]
        message = "request body is not valid: " + "; ".join(problems or [str(exc.detail)])
    elif status == 404:
        message = (
            f"no route {request.method} {request.url.path}; the API is described at /docs"
            " and /openapi.json"
        )
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs"
    elif status == 413:
        message = f"request body is too large: {exc.detail}; split the batch"
    elif status == 400:
        message = f"request body is not valid JSON or not the expected shape: {exc.detail}"
    return _error_response(status, _STATUS_CODES.get(status, "bad_request"), message, {})


def _on_bug(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("bug serving %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(
        500,
        "internal",
        f"internal error: {type(exc).__name__}: {exc}; this is a bug, please report it",
        {},
    )


_json = msgspec.json.Encoder(enc_hook=api.json_enc_hook)


def _subscribe_body(
    namespace: str | None, filter: str | None, cursor: str | None, include_vectors: bool
) -> api.SubscribeBody:
    try:
        return msgspec.convert(
            {
                "namespace": None if namespace is None else msgspec.json.decode(namespace),
                "filter": None if filter is None else msgspec.json.decode(filter),
                "cursor": cursor,
                "include_vectors": include_vectors,
            },
            api.SubscribeBody,
        )
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidArgument(
            f"subscribe: {exc}; pass namespace as a JSON array and filter as a JSON object"
        ) from None


def _session_in(request: Request[Any, Any, Any], body: Any) -> Any:
    """A session token in the Memcluster-Session header goes into a body that has none."""
    token = request.headers.get(session.HEADER.lower())
    if token and getattr(body, "session", "absent") in (None, msgspec.UNSET):
        return msgspec.structs.replace(body, session=token)
    return body


def _session_out(reply: Any) -> Any:
    """A reply carrying a session token also sends it in the Memcluster-Session header."""
    token = getattr(reply, "session", None)
    if isinstance(token, str):
        return Response(reply, headers={session.HEADER: token})
    return reply


def build_app(service: Service, *, request_bytes_max: int) -> Litestar:
    """The Litestar application serving ``service``."""

    async def call(
        request: Request[Any, Any, Any], kind: str, collection: str | None, body: msgspec.Struct
    ) -> Any:
        principal = service.auth.authenticate(_api_key(request))
        return await service.run(principal, kind, collection, body)

    @get("/v1/health", summary="Liveness: the node answers (no API key needed)")
    async def health() -> api.Health:
        return service.health()

    @get("/v1/ready", summary="Readiness: 200 while serving, 503 during shutdown")
    async def ready() -> Response[api.Health]:
        body = service.health()
        return Response(body, status_code=200 if body.ready else 503)

    @get(_route("collections.list"), summary="List collection names")
    async def list_collections(request: Request[Any, Any, Any]) -> api.CollectionList:
        result: api.CollectionList = await call(request, "collections.list", None, api.Empty())
        return result

    @post(_route("collections.create"), status_code=201, summary="Create a collection")
    async def create_collection(
        request: Request[Any, Any, Any], data: JSONBody[CollectionConfig]
    ) -> CollectionInfo:
        result: CollectionInfo = await call(request, "collections.create", None, data)
        return result

    @get(_route("collections.describe"), summary="A collection's config and stats")
    async def describe_collection(
        request: Request[Any, Any, Any], collection: FromPath[str]
    ) -> CollectionInfo:
        result: CollectionInfo = await call(
            request, "collections.describe", collection, api.Empty()
        )
        return result

    @delete(_route("collections.drop"), status_code=200, summary="Drop a collection and its data")
    async def drop_collection(
        request: Request[Any, Any, Any], collection: FromPath[str]
    ) -> api.Empty:
        result: api.Empty = await call(request, "collections.drop", collection, api.Empty())
        return result

    def rpc(kind: str, summary: str) -> HTTPRouteHandler:
        """A POST route whose JSON body is the operation's ``...Body`` struct; the collection,
        for operations on one, comes from the path."""
        op = OPERATIONS[kind]
        annotations: dict[str, Any] = {"request": Request[Any, Any, Any]}

        if "{collection}" in op.path:

            async def handler(request: Request[Any, Any, Any], collection: str, data: Any) -> Any:
                return _session_out(
                    await call(request, kind, collection, _session_in(request, data))
                )

            annotations["collection"] = FromPath[str]
        else:

            async def handler(request: Request[Any, Any, Any], data: Any) -> Any:  # type: ignore[misc]
                return await call(request, kind, None, data)

        annotations["data"] = Annotated[op.body, Body(media_type=RequestEncodingType.JSON)]
        annotations["return"] = op.reply
        handler.__annotations__ = annotations
        handler.__name__ = kind.replace(".", "_")
        return post(_route(kind), status_code=200, summary=summary)(handler)

    collection_routes = [
        rpc("put", "Put a batch of memories"),
        rpc("get", "Get one memory (null when absent)"),
        rpc("delete", "Delete one memory"),
        rpc("delete_where", "Delete by namespace and filter"),
        rpc("count", "Count by namespace and filter"),
        rpc("list", "One page of memories, in key order"),
        rpc("search", "The k memories nearest a vector"),
    ]

    @get(_route("feed_cursor"), summary="The change feed's current end, as a cursor")
    async def feed_cursor(
        request: Request[Any, Any, Any], collection: FromPath[str]
    ) -> api.CursorReply:
        result: api.CursorReply = await call(request, "feed_cursor", collection, api.Empty())
        return result

    @get(_route("subscribe"), summary="The change feed, as Server-Sent Events")
    async def subscribe(
        request: Request[Any, Any, Any],
        collection: FromPath[str],
        namespace: FromQuery[str | None] = None,
        filter: FromQuery[str | None] = None,
        cursor: FromQuery[str | None] = None,
        include_vectors: FromQuery[bool] = False,
    ) -> ServerSentEvent:
        """Query parameters: ``namespace`` (a JSON array), ``filter`` (a JSON object),
        ``cursor`` (an event's id; the ``Last-Event-ID`` header works too, as EventSource
        sends it on reconnect) and ``include_vectors``. Each event is ``event: change``
        with the Event as JSON ``data`` and its cursor as ``id``; a failure ends the stream
        with ``event: error``; idle streams get a comment every 15 s."""
        body = _subscribe_body(
            namespace, filter, cursor or request.headers.get("last-event-id"), include_vectors
        )
        return await _sse(request, "subscribe", collection, body, "change")

    @get(OPERATIONS["topics.subscribe"].path, summary="A topic's messages, as Server-Sent Events")
    async def topic_subscribe(
        request: Request[Any, Any, Any],
        topic: FromQuery[str],
        cursor: FromQuery[str | None] = None,
        group: FromQuery[str | None] = None,
    ) -> ServerSentEvent:
        """Each message is ``event: message`` with the Message as JSON ``data`` and its
        cursor as ``id`` (``Last-Event-ID`` resumes, as for the change feed)."""
        body = api.TopicBody(
            topic=topic, cursor=cursor or request.headers.get("last-event-id"), group=group
        )
        return await _sse(request, "topics.subscribe", None, body, "message")

    async def _sse(
        request: Request[Any, Any, Any],
        kind: str,
        collection: str | None,
        body: msgspec.Struct,
        event_name: str,
    ) -> ServerSentEvent:
        principal = service.auth.authenticate(_api_key(request))
        items = await service.stream(principal, kind, collection or "", body)

        async def messages() -> AsyncIterator[ServerSentEventMessage]:
            try:
                async for item in items:
                    if item is None:
                        yield ServerSentEventMessage(comment="keepalive")
                    else:
                        data = _json.encode(item).decode()
                        yield ServerSentEventMessage(data=data, event=event_name, id=item.cursor)
            except MemclusterError as exc:
                error = api.ErrorBody(code=exc.code, message=str(exc), details=error_details(exc))
                yield ServerSentEventMessage(data=_json.encode(error).decode(), event="error")

        return ServerSentEvent(messages())

    coordination_routes = [
        rpc("leases.grant", "Grant a lease of ttl_s seconds"),
        rpc("leases.keepalive", "Extend a lease by its TTL"),
        rpc("leases.revoke", "End a lease, releasing what it holds"),
        rpc("locks.acquire", "Wait (FIFO) for a lock; returns its fencing token"),
        rpc("locks.release", "Release a lock held with a token"),
        rpc("semaphores.acquire", "Wait (FIFO) for one of N permits; returns its token"),
        rpc("semaphores.release", "Give back a permit"),
        rpc("counters.incr", "Add delta to a counter; returns the new value"),
        rpc("counters.get", "A counter's value"),
        rpc("topics.publish", "Publish a JSON payload on a topic; returns its seq"),
    ]

    return Litestar(
        route_handlers=[
            *coordination_routes,
            subscribe,
            topic_subscribe,
            feed_cursor,
            health,
            ready,
            list_collections,
            create_collection,
            describe_collection,
            drop_collection,
            *collection_routes,
        ],
        exception_handlers={
            MemclusterError: _on_memcluster_error,
            HTTPException: _on_http_error,
            Exception: _on_bug,
        },
        openapi_config=OpenAPIConfig(
            title="memcluster",
            version=api.VERSION,
            description=(
                "Memories (text, vectors, metadata) for AI agents. Errors are"
                ' {"code", "message", "details"}; with API keys on, send'
                " 'Authorization: Bearer KEY'."
            ),
            path="/",
            render_plugins=[RedocRenderPlugin(path="/docs")],
        ),
        request_max_body_size=request_bytes_max,
        type_encoders={np.ndarray: lambda a: a.tolist(), np.generic: lambda x: x.item()},
        logging_config=None,
    )
