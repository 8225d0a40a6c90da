"""Commands that talk to a running server through the sync SDK (``memcluster.connect``).

``status``, ``collections [create|drop]``, ``put``, ``get``, ``search`` and ``import``. Each is
a thin layer: parse the command line, make one or a few SDK calls, print the result.

Every command takes the same three options (:func:`target_options`):

- ``--url``: ``http://HOST:7700`` (HTTP API) or ``mc://HOST:7701`` (binary protocol); default
  ``$MEMCLUSTER_URL``, else ``http://127.0.0.1:7700``.
- ``--api-key``: default ``$MEMCLUSTER_API_KEY``.
- ``--json``: one JSON document on stdout (vectors as arrays of numbers) instead of tables.

Namespaces are written ``team-a/agent-7`` on the command line. Exit codes: 0 success; 1 a
memcluster error (the message goes to stderr as ``memcluster CMD: MESSAGE``, never a
traceback), a memory that is not found, or a malformed import line; 2 a usage error.

``import`` and its idempotency keys
-----------------------------------
``import`` sends the file in batches of ``--batch`` lines through ``put_many``. Batch ``i``'s
idempotency key is ``import:<sha256>:<i>``, where the sha256 covers the file's non-blank lines
from the start through the end of batch ``i`` (line endings normalised to ``\\n``). So re-running
an interrupted import skips the batches the server already applied (the server returns their
recorded versions and writes nothing), and so does re-running after fixing a malformed line:
the fix changes only the keys of the batch that holds the line and of the batches after it,
which were never written. A different ``--batch`` gives different keys, so a key never names
two different sets of lines. Servers remember ``idempotency_keys_max`` keys per shard; an import
re-run after more batches than that writes its oldest batches again (a new version each).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, assert_never

import click
import msgspec
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

import memcluster
from memcluster.client.sync import Client, Collection
from memcluster.cluster.coordinator import EtcdCoordinator
from memcluster.cluster.dataplane import Peers
from memcluster.cluster.view import (
    ASK_TIMEOUT_S,
    ClusterView,
    ReplicaState,
    ShardView,
    cluster_view,
)
from memcluster.core import api
from memcluster.core.api import Consistency
from memcluster.core.config import Config
from memcluster.core.errors import MemclusterError
from memcluster.core.types import CollectionInfo, Eviction, Hit, Memory, Metric, Replication

DEFAULT_URL = "http://127.0.0.1:7700"
TEXT_SHOWN_CHARS_MAX = 60
"""Search tables cut text (and metadata JSON) to this many characters."""
IMPORT_BATCH_MAX = 10_000
"""Largest ``--batch``: the server's ``batch_items_max``."""

_json = msgspec.json.Encoder(enc_hook=api.json_enc_hook)


class Failure(Exception):
    """A command cannot finish; the message is printed as ``memcluster CMD: MESSAGE``, exit 1."""


@dataclass(frozen=True)
class Target:
    """Where a command sends its requests and how it prints the reply."""

    url: str
    api_key: str | None
    as_json: bool


# -- shared options, errors and output ---------------------------------------------------------


def target_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add ``--url``, ``--api-key`` and ``--json``; call ``command`` with ``target=Target(...)``.

    A subcommand of ``collections`` takes each option from its own command line, else from the
    group's (``memcluster collections --url X create ...``), else from the environment or
    default. A :class:`memcluster.MemclusterError` or :class:`Failure` becomes a one-line
    message on stderr and exit code 1.
    """

    @click.option(
        "--url",
        envvar="MEMCLUSTER_URL",
        show_envvar=True,
        default=DEFAULT_URL,
        show_default=True,
        help="Server address: http://HOST:7700 (HTTP API) or mc://HOST:7701 (binary protocol).",
    )
    @click.option(
        "--api-key", envvar="MEMCLUSTER_API_KEY", show_envvar=True, help="API key, if required."
    )
    @click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON document instead of tables."
    )
    @functools.wraps(command)
    def wrapper(*args: Any, url: str, api_key: str | None, as_json: bool, **kwargs: Any) -> None:
        ctx = click.get_current_context()
        target = Target(
            url=_pick(ctx, "url", url),
            api_key=_pick(ctx, "api_key", api_key),
            as_json=_pick(ctx, "as_json", as_json),
        )
        try:
            command(*args, target=target, **kwargs)
        except memcluster.Unreachable as exc:
            _exit_with(ctx, f"cannot reach {target.url}: is `memcluster serve` running? ({exc})")
        except (memcluster.MemclusterError, Failure) as exc:
            _exit_with(ctx, str(exc))

    return wrapper


def _pick(ctx: click.Context, name: str, value: Any) -> Any:
    if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
        return value
    parent = ctx.parent
    if parent is not None and parent.get_parameter_source(name) is ParameterSource.COMMANDLINE:
        return parent.params[name]
    return value


def _exit_with(ctx: click.Context, message: str) -> NoReturn:
    names: list[str] = []
    at: click.Context | None = ctx
    while at is not None and at.parent is not None:
        names.append(at.info_name or "")
        at = at.parent
    click.echo(" ".join(["memcluster", *reversed(names)]) + f": {message}", err=True)
    sys.exit(1)


@contextmanager
def connect(target: Target) -> Iterator[Client]:
    """A client for one command; closed when the command ends."""
    with memcluster.connect(target.url, api_key=target.api_key) as client:
        yield client


def print_json(value: Any) -> None:
    """``value`` as one JSON document on stdout; numpy arrays become arrays of numbers."""
    click.echo(_json.encode(value).decode())


def _console() -> Console:
    # Made per command so that it writes to the sys.stdout of this invocation.
    return Console(highlight=False)


_NUMERIC_COLUMNS = {"dim", "shards", "items", "bytes", "indexed", "score", "lag"}


def _table(*columns: str) -> Table:
    table = Table()
    for column in columns:
        table.add_column(column, justify="right" if column in _NUMERIC_COLUMNS else "left")
    return table


def _cell(value: object) -> Text:
    """A table cell shown as is: user text may contain [brackets] that rich reads as markup."""
    return Text(str(value))


def _cut(value: str, limit: int = TEXT_SHOWN_CHARS_MAX) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _ns(namespace: tuple[str, ...]) -> str:
    return "/".join(namespace)


def _iso(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _compact_json(value: Any) -> str:
    return _json.encode(value).decode()


# -- parameter types ---------------------------------------------------------------------------


class NamespaceType(click.ParamType[tuple[str, ...]]):
    """``team-a/agent-7`` -> ``("team-a", "agent-7")``; the server checks each part."""

    name = "NAMESPACE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(str(value).split("/"))


class JsonType(click.ParamType[Any]):
    """A JSON document of a given shape, inline or ``@FILE``; bad JSON is a usage error."""

    def __init__(self, shape: type[Any], name: str, what: str) -> None:
        self.shape = shape
        self.name = name
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        source = value
        if value.startswith("@"):
            try:
                source = Path(value[1:]).read_text()
            except OSError as exc:
                self.fail(f"cannot read {value[1:]!r}: {exc.strerror or exc}", param, ctx)
        try:
            return msgspec.json.decode(source, type=self.shape)
        except msgspec.DecodeError as exc:
            where = f"file {value[1:]!r} does not hold" if value.startswith("@") else "not"
            self.fail(f"{where} {self.what} ({exc})", param, ctx)


VECTOR = JsonType(list[float], "JSON_ARRAY", "a JSON array of numbers")
OBJECT = JsonType(dict[str, Any], "JSON_OBJECT", "a JSON object")
NAMESPACE = NamespaceType()


# -- status ------------------------------------------------------------------------------------


@click.command("status")
@target_options
@click.option(
    "--etcd", default=None, help="Show the cluster registered in this etcd instead of one node."
)
@click.option("--cluster", default="default", show_default=True, help="Cluster name (with --etcd).")
def status_command(target: Target, etcd: str | None, cluster: str) -> None:
    """Show the node's health and every collection's size, or a whole cluster with --etcd.

    With --etcd: the nodes (up, addresses, shards held), the controller, the collections and
    the shard map (each shard's epoch, leader, replicas, and whether it is available). For a
    collection with a replication factor above 1, each replica of each shard: its node and
    address, its role (leader or follower; head, follower or tail in a chain; peer in a multi
    collection), its state (in-sync; catching-up: not in the in-sync set, or being copied;
    down: its node is not up) and its lag: operations behind the leader (a multi peer: writes
    the others hold that it lacks), asked of the nodes ("?" when a node did not answer).

    \b
    Examples:
      memcluster status
      memcluster status --url mc://10.0.0.5:7701 --json
      memcluster status --etcd http://127.0.0.1:2379 --cluster default
    """
    if etcd is not None:
        _cluster_status(etcd, cluster, target)
        return
    with connect(target) as client:
        health = client.health()
        infos = _describe_all(client)
    if target.as_json:
        print_json({"health": health, "collections": infos})
        return
    console = _console()
    ready = "ready" if health.ready else "NOT ready"
    console.print(
        f"node [bold]{escape(health.node)}[/]: {escape(health.status)}, {ready},"
        f" memcluster {escape(health.version)}, {health.collections} collection(s)"
    )
    if infos:
        table = _table("collection", "dim", "metric", "shards", "items", "bytes", "indexed")
        for info in infos:
            c, s = info.config, info.stats
            table.add_row(
                _cell(c.name),
                str(c.dim),
                c.metric.value,
                str(c.shards),
                f"{s.items:,}",
                f"{s.bytes:,}",
                f"{s.indexed_items:,}",
            )
        console.print(table)


def _cluster_status(etcd: str, cluster: str, target: Target) -> None:
    async def read() -> ClusterView:
        coord = EtcdCoordinator(etcd)
        peers = Peers(api_key=target.api_key, max_frame_bytes=Config().request_bytes_max)
        try:
            return await cluster_view(coord, cluster, peers=peers)
        finally:
            await peers.close()
            await coord.close()

    try:
        view = asyncio.run(read())
    except* MemclusterError as group:
        _exit_with(click.get_current_context(), str(group.exceptions[0]))
    if target.as_json:
        print_json(view)
        return
    console = _console()
    console.print(
        f"cluster [bold]{escape(cluster)}[/]: {len(view.nodes)} node(s) up, controller"
        f" {escape(view.controller or 'none')}, etcd revision {view.revision}"
    )
    nodes = _table("node", "state", "http", "binary", "shards held", "data")
    for node in view.nodes:
        nodes.add_row(
            _cell(node.id),
            "draining" if node.id in view.draining else "up",
            _cell(node.http_url),
            _cell(node.peer_url),
            str(view.shards_held(node.id)),
            _size(node.data_bytes),
        )
    for down in view.down:
        nodes.add_row(_cell(down), "[red]down[/]", "-", "-", str(view.shards_held(down)), "-")
    console.print(nodes)
    if view.collections:
        colls = _table("collection", "dim", "metric", "shards", "sharding")
        for c in view.collections:
            colls.add_row(
                _cell(c.name), str(c.dim), c.metric.value, str(c.shards), c.sharding.value
            )
        console.print(colls)
    replicated = _replicated(view)
    shards = _table("collection", "shard", "epoch", "leader", "replicas", "state")
    for s in view.shards:
        if s.collection in replicated:
            continue  # in its own table, below
        a = s.assignment
        shards.add_row(
            _cell(s.collection),
            str(s.shard),
            str(a.epoch) if a else "-",
            _cell(a.leader or "-") if a else "-",
            _cell(",".join(a.replicas)) if a else "-",
            "ok" if s.available else ("unplaced" if a is None else "[red]unavailable[/]"),
        )
    if shards.row_count:
        console.print(shards)
    for name, title in replicated.items():
        console.print(_replicas_table(title, [s for s in view.shards if s.collection == name]))
    if view.silent:
        console.print(
            f"[yellow]{escape(', '.join(view.silent))}: no answer (asked with a"
            f" {ASK_TIMEOUT_S:g} s limit), so lags are shown as ?[/]"
        )


def _state_cell(state: ReplicaState) -> Text:
    match state:
        case ReplicaState.IN_SYNC:
            return Text(state.value, style="green")
        case ReplicaState.CATCHING_UP:
            return Text(state.value, style="yellow")
        case ReplicaState.DOWN:
            return Text(state.value, style="red")
        case _:
            assert_never(state)


def _replicated(view: ClusterView) -> dict[str, str]:
    """Collection -> the title of its replicas table, for each collection with a replication
    factor above 1, and the coordination shard when it has more than one replica."""
    factors = {c.name: c.replication_factor for c in view.collections}
    out = {name: f"{name}: replication factor {f}" for name, f in factors.items() if f > 1}
    for s in view.shards:
        if s.collection not in factors and s.assignment and len(s.assignment.replicas) > 1:
            out[s.collection] = f"{s.collection}: {len(s.assignment.replicas)} replicas"
    return out


def _replicas_table(title: str, shards: list[ShardView]) -> Table:
    """One row per replica, one section per shard: the shard's number and epoch on its
    first row (a shard without a live leader says so in red)."""
    table = _table("shard", "epoch", "node", "address", "role", "state", "lag")
    table.title = Text(title)
    table.title_justify = "left"
    for s in shards:
        if s.epoch is None:
            table.add_row(str(s.shard), "-", "-", "-", "-", "unplaced", "-", end_section=True)
            continue
        shard = Text(str(s.shard))
        if not s.available:
            shard.append(
                " no leader" if s.assignment and s.assignment.leader is None else " unavailable",
                style="red",
            )
        for i, r in enumerate(s.replicas):
            table.add_row(
                shard if i == 0 else "",
                str(s.epoch) if i == 0 else "",
                _cell(r.node),
                _cell(r.address or "-"),
                r.role.value,
                _state_cell(r.state),
                "?" if r.lag is None else f"{r.lag:,}",
                end_section=i == len(s.replicas) - 1,
            )
    return table


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:,.0f} B" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"


def _describe_all(client: Client) -> list[CollectionInfo]:
    infos = []
    for name in client.list_collections():
        try:
            infos.append(client.collection(name).describe())
        except memcluster.CollectionNotFound:
            continue  # dropped since the list was made
    return infos


# -- collections -------------------------------------------------------------------------------


@click.group("collections", invoke_without_command=True)
@click.pass_context
@target_options
def collections_group(ctx: click.Context, target: Target) -> None:
    """List collections, or create or drop one.

    \b
    Examples:
      memcluster collections
      memcluster collections create memories --dim 384 --metric cosine --shards 4
      memcluster collections drop memories --yes
    """
    if ctx.invoked_subcommand is not None:
        return
    with connect(target) as client:
        infos = _describe_all(client)
    if target.as_json:
        print_json(infos)
        return
    if not infos:
        click.echo("no collections; create one with `memcluster collections create NAME --dim N`")
        return
    table = _table("collection", "dim", "metric", "shards", "items")
    for info in infos:
        c = info.config
        table.add_row(
            _cell(c.name), str(c.dim), c.metric.value, str(c.shards), f"{info.stats.items:,}"
        )
    _console().print(table)


@collections_group.command("create")
@click.argument("name")
@click.option("--dim", type=click.IntRange(min=1), required=True, help="Vector dimension.")
@click.option(
    "--metric",
    type=click.Choice([m.value for m in Metric]),
    default=Metric.COSINE.value,
    show_default=True,
    help="Similarity metric.",
)
@click.option(
    "--shards", type=click.IntRange(min=1), default=1, show_default=True, help="Shard count."
)
@click.option(
    "--ttl-s",
    type=click.FloatRange(min=0, min_open=True),
    help="Default time to live of a memory, in seconds (default: forever).",
)
@click.option(
    "--capacity-items", type=click.IntRange(min=1), help="Most live memories (default: no limit)."
)
@click.option(
    "--eviction",
    type=click.Choice([e.value for e in Eviction]),
    default=Eviction.NONE.value,
    show_default=True,
    help="What a full collection does with a new write (none: reject it).",
)
@click.option(
    "--replication-factor",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Copies of each shard on distinct nodes (a cluster).",
)
@click.option(
    "--replication",
    type=click.Choice([r.value for r in Replication]),
    default=Replication.LEADER.value,
    show_default=True,
    help="How replicas stay in step: leader (leader-follower), chain (head to tail), or multi"
    " (every replica takes writes, last writer wins; reads use consistency quorum/eventual).",
)
@click.option(
    "--ack",
    type=click.Choice(["all", "majority", "leader"]),
    default="all",
    show_default=True,
    help="When a replicated write is acknowledged: all in-sync replicas, a majority, or the"
    " leader alone (multi: all replicas, a majority, or the one that took it).",
)
@target_options
def collections_create(
    target: Target,
    name: str,
    dim: int,
    metric: str,
    shards: int,
    ttl_s: float | None,
    capacity_items: int | None,
    eviction: str,
    replication_factor: int,
    replication: str,
    ack: str,
) -> None:
    """Create collection NAME for vectors of --dim numbers.

    \b
    Examples:
      memcluster collections create memories --dim 384
      memcluster collections create scratch --dim 8 --metric l2 --ttl-s 3600 \\
          --capacity-items 100000 --eviction lru
      memcluster collections create shared --dim 384 --shards 4 --replication-factor 3
      memcluster collections create notes --dim 384 --replication-factor 3 \\
          --replication multi --ack majority
    """
    with connect(target) as client:
        info = client.create_collection(
            name,
            dim,
            metric,
            shards,
            ttl_s=ttl_s,
            capacity_items=capacity_items,
            eviction=eviction,
            replication_factor=replication_factor,
            replication=replication,
            ack=ack,
        ).describe()
    if target.as_json:
        print_json(info)
        return
    c = info.config
    click.echo(f"created collection {c.name!r}: dim {c.dim}, {c.metric.value}, {c.shards} shard(s)")


@collections_group.command("drop")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@target_options
def collections_drop(target: Target, name: str, yes: bool) -> None:
    """Delete collection NAME and all its memories (asks first unless --yes).

    \b
    Example:
      memcluster collections drop scratch --yes
    """
    if not yes:
        click.confirm(f"drop collection {name!r} and all its memories?", abort=True, err=True)
    with connect(target) as client:
        client.drop_collection(name)
    if target.as_json:
        print_json({"dropped": name})
    else:
        click.echo(f"dropped collection {name!r}")


# -- put, get, search --------------------------------------------------------------------------


@click.command("put")
@click.argument("collection")
@click.argument("namespace", type=NAMESPACE)
@click.argument("key")
@click.option("--text", help="The memory's text.")
@click.option(
    "--vector", type=VECTOR, help="The embedding: a JSON array of numbers, or @FILE holding one."
)
@click.option("--metadata", type=OBJECT, help="A JSON object (or @FILE holding one).")
@click.option(
    "--ttl-s", type=click.FloatRange(min=0, min_open=True), help="Time to live, in seconds."
)
@click.option(
    "--if-version",
    type=click.IntRange(min=0),
    help="Write only if the stored version is N (0: only if absent).",
)
@target_options
def put_command(
    target: Target,
    collection: str,
    namespace: tuple[str, ...],
    key: str,
    text: str | None,
    vector: list[float] | None,
    metadata: dict[str, Any] | None,
    ttl_s: float | None,
    if_version: int | None,
) -> None:
    """Insert or replace the memory at NAMESPACE (such as team-a/agent-7) and KEY.

    Prints the memory's new version.

    \b
    Examples:
      memcluster put memories team-a/agent-7 m1 --text "likes ramen" \\
          --vector '[0.1, 0.3, 0.5]' --metadata '{"speaker": "Alice"}'
      memcluster put memories team-a/agent-7 m1 --vector @m1.json --if-version 1
    """
    with connect(target) as client:
        version = client.collection(collection).put(
            namespace, key, text, vector, metadata, ttl_s, if_version
        )
    if target.as_json:
        print_json({"version": version})
    else:
        click.echo(f"version {version}")


CONSISTENCY = click.option(
    "--consistency",
    type=click.Choice([c.value for c in Consistency]),
    default=Consistency.STRONG.value,
    show_default=True,
    help="In a cluster: strong (the leader), eventual (any replica), quorum (the newest of a"
    " majority of replicas: for replication=multi collections, which refuse strong).",
)


@click.command("get")
@click.argument("collection")
@click.argument("namespace", type=NAMESPACE)
@click.argument("key")
@click.option("--vectors", is_flag=True, help="Include the vector.")
@CONSISTENCY
@target_options
def get_command(
    target: Target,
    collection: str,
    namespace: tuple[str, ...],
    key: str,
    vectors: bool,
    consistency: str,
) -> None:
    """Print the memory at NAMESPACE (such as team-a/agent-7) and KEY; exit 1 if there is none.

    \b
    Examples:
      memcluster get memories team-a/agent-7 m1
      memcluster get memories team-a/agent-7 m1 --vectors --json
      memcluster get notes team-a/agent-7 m1 --consistency quorum
    """
    with connect(target) as client:
        memory = client.collection(collection).get(namespace, key, consistency)
    if memory is None:
        raise Failure(f"not found: {_ns(namespace)} {key!r} in collection {collection!r}")
    if not vectors:
        memory = msgspec.structs.replace(memory, vector=None)
    if target.as_json:
        print_json(memory)
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows: list[tuple[str, str]] = [
        ("namespace", _ns(memory.namespace)),
        ("key", memory.key),
        ("version", str(memory.version)),
        ("text", memory.text if memory.text is not None else ""),
        ("metadata", _compact_json(memory.metadata)),
        ("created", _iso(memory.created_at)),
        ("updated", _iso(memory.updated_at)),
        ("expires", _iso(memory.expires_at)),
    ]
    if memory.vector is not None:
        rows.append(("vector", _compact_json(memory.vector)))
    for name, value in rows:
        table.add_row(name, _cell(value))
    _console().print(table)


@click.command("search")
@click.argument("collection")
@click.option(
    "--vector",
    type=VECTOR,
    required=True,
    help="The query embedding: a JSON array of numbers, or @FILE holding one.",
)
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="How many hits."
)
@click.option("--namespace", type=NAMESPACE, help="Only memories under this namespace prefix.")
@click.option("--filter", "filter_", type=OBJECT, help="Metadata filter, a JSON object.")
@click.option("--vectors", is_flag=True, help="Include the hits' vectors.")
@CONSISTENCY
@target_options
def search_command(
    target: Target,
    collection: str,
    vector: list[float],
    k: int,
    namespace: tuple[str, ...] | None,
    filter_: dict[str, Any] | None,
    vectors: bool,
    consistency: str,
) -> None:
    """Find the K memories of COLLECTION most similar to --vector, best first.

    \b
    Examples:
      memcluster search memories --vector '[0.1, 0.3, 0.5]' -k 5
      memcluster search memories --vector @query.json --namespace team-a \\
          --filter '{"speaker": "Alice"}' --json
    """
    with connect(target) as client:
        hits = client.collection(collection).search(
            vector, k, namespace, filter_, include_vectors=vectors, consistency=consistency
        )
    if target.as_json:
        print_json(hits)
        return
    if not hits:
        click.echo("no matches")
        return
    _console().print(_hits_table(hits, vectors))


def _hits_table(hits: list[Hit], vectors: bool) -> Table:
    columns = ["score", "namespace", "key", "text", "metadata"]
    table = _table(*columns, *(["vector"] if vectors else []))
    for hit in hits:
        m = hit.memory
        row: list[str | Text] = [
            f"{hit.score:.4f}",
            _cell(_ns(m.namespace)),
            _cell(m.key),
            _cell(_cut(m.text or "")),
            _cell(_cut(_compact_json(m.metadata))),
        ]
        if vectors:
            row.append(_cell(_cut(_compact_json(m.vector))))
        table.add_row(*row)
    return table


# -- import ------------------------------------------------------------------------------------


class ImportLine(msgspec.Struct, forbid_unknown_fields=True):
    """One line of an import file."""

    key: str
    namespace: str | list[str]
    """``["team-a", "agent-7"]`` or ``"team-a/agent-7"``."""
    vector: list[float]
    text: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    ttl_s: float | None = None


_line_decoder = msgspec.json.Decoder(ImportLine)


@dataclass
class _Batch:
    index: int
    first_line: int
    last_line: int
    memories: list[Memory]
    idempotency_key: str


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("? items/s" if speed is None else f"{speed:,.0f} items/s")


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--collection", required=True, help="The collection to write to.")
@click.option(
    "--batch",
    "batch_items",
    type=click.IntRange(1, IMPORT_BATCH_MAX),
    default=500,
    show_default=True,
    help="Memories per put_many request.",
)
@click.option(
    "--create-dim",
    type=click.IntRange(min=1),
    help="Create the collection with this dim (cosine, 1 shard) if it does not exist;"
    " an existing one must have this dim.",
)
@target_options
def import_command(
    target: Target, file: Path, collection: str, batch_items: int, create_dim: int | None
) -> None:
    """Write the memories of a JSONL FILE, one JSON object per line, in batches.

    Each line: {"namespace": ["team-a", "agent-7"] or "team-a/agent-7", "key": "m1",
    "vector": [...], "text": "...", "metadata": {...}, "ttl_s": 3600} (text, metadata and
    ttl_s are optional; blank lines are skipped).

    Each batch carries an idempotency key derived from the file's content up to the end of
    the batch, so an interrupted import can be re-run: the batches already written are
    skipped. A malformed line stops the import before its batch is sent.

    \b
    Examples:
      memcluster import memories.jsonl --collection memories
      memcluster import memories.jsonl --collection memories --create-dim 384 --batch 1000
    """
    total = _count_lines(file)
    stderr = Console(stderr=True)
    columns = (
        TextColumn("importing"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    written = 0
    done_batches = 0
    started = time.monotonic()
    with (
        connect(target) as client,
        Progress(*columns, console=stderr, disable=target.as_json or not stderr.is_terminal) as bar,
    ):
        coll = _import_collection(client, collection, create_dim)
        task = bar.add_task("import", total=total)
        with file.open("rb") as lines:
            try:
                for batch in _batches(lines, batch_items, coll.config.dim):
                    try:
                        coll.put_many(batch.memories, idempotency_key=batch.idempotency_key)
                    except memcluster.MemclusterError as exc:
                        raise Failure(
                            f"{file}: batch {batch.index} (lines {batch.first_line}-"
                            f"{batch.last_line}) failed: {exc}"
                            + _progress_note(written, done_batches)
                        ) from None
                    written += len(batch.memories)
                    done_batches += 1
                    bar.advance(task, len(batch.memories))
            except MalformedLine as exc:
                raise Failure(f"{file}: {exc}{_progress_note(written, done_batches)}") from None
    seconds = time.monotonic() - started
    rate = written / seconds if seconds > 0 else 0.0
    if target.as_json:
        print_json(
            {"imported": written, "batches": done_batches, "seconds": seconds, "per_s": rate}
        )
    else:
        click.echo(f"imported {written:,} memories in {seconds:.2f} s ({rate:,.0f}/s)")


def _progress_note(written: int, batches: int) -> str:
    earlier = (
        f"{written:,} memories in {batches} earlier batch(es) are written"
        if batches
        else "nothing was written"
    )
    return (
        f". {earlier}; re-run the same command after fixing:"
        " finished batches are skipped by their idempotency keys"
    )


def _count_lines(file: Path) -> int:
    with file.open("rb") as lines:
        return sum(1 for raw in lines if raw.strip())


def _import_collection(client: Client, name: str, create_dim: int | None) -> Collection:
    try:
        coll = client.collection(name)
    except memcluster.CollectionNotFound:
        if create_dim is None:
            raise Failure(
                f"collection {name!r} does not exist: create it with"
                f" `memcluster collections create {name} --dim N` or pass --create-dim N"
            ) from None
        try:
            return client.create_collection(name, create_dim)
        except memcluster.CollectionExists:
            coll = client.collection(name)  # created meanwhile by someone else
    if create_dim is not None and coll.config.dim != create_dim:
        raise Failure(
            f"collection {name!r} exists with dim {coll.config.dim}, not --create-dim {create_dim}"
        )
    return coll


class MalformedLine(Exception):
    """A line of an import file that cannot be sent; the message starts with its number."""


def _batches(lines: BinaryIO, batch_items: int, dim: int) -> Iterator[_Batch]:
    """The file's batches, each parsed whole before it is yielded, so that a malformed line
    (MalformedLine) stops the import before its batch is sent."""
    content = hashlib.sha256()
    memories: list[Memory] = []
    seen: dict[tuple[tuple[str, ...], str], int] = {}
    first_line = 0
    index = 0
    line_no = 0
    for line_no, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not stripped:
            continue
        content.update(raw.rstrip(b"\r\n") + b"\n")
        parsed = _parse_line(stripped, dim)
        if isinstance(parsed, str):
            raise MalformedLine(f"line {line_no}: {parsed}")
        ident = (parsed.namespace, parsed.key)
        if ident in seen:
            raise MalformedLine(
                f"line {line_no}: {_ns(parsed.namespace)} {parsed.key!r} is also on line"
                f" {seen[ident]} of the same batch; a batch writes each memory once"
            )
        seen[ident] = line_no
        if not memories:
            first_line = line_no
        memories.append(parsed)
        if len(memories) == batch_items:
            yield _Batch(index, first_line, line_no, memories, _idem(content, index))
            memories, seen, index = [], {}, index + 1
    if memories:
        yield _Batch(index, first_line, line_no, memories, _idem(content, index))


def _idem(content: Any, index: int) -> str:
    # content: the running sha256; copy() reads the digest so far and keeps it running.
    return f"import:{content.copy().hexdigest()}:{index}"


def _parse_line(raw: bytes, dim: int) -> Memory | str:
    """The line as a Memory, or what is wrong with it. The server validates the rest (names,
    metadata limits); the checks here are those whose server message could not name the line."""
    try:
        line = _line_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        return str(exc)
    if len(line.vector) != dim:
        return f"vector has {len(line.vector)} numbers; the collection has dim {dim}"
    namespace = line.namespace.split("/") if isinstance(line.namespace, str) else line.namespace
    return Memory(
        namespace=tuple(namespace),
        key=line.key,
        text=line.text,
        vector=line.vector,
        metadata=line.metadata,
        ttl_s=line.ttl_s,
    )
