"""The ``memcluster`` command: a thin layer over the library.

Commands today: ``demo`` (the embedded engine in action, what ``make up`` runs),
``inspect wal|snapshot PATH`` (offline dump of on-disk files), ``serve`` (run a node), and
the client commands of :mod:`memcluster.cli.data` that talk to a running node: ``status``,
``collections [create|drop]``, ``put``, ``get``, ``search`` and ``import``.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import click
import msgspec
import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

import memcluster
from memcluster.cli.data import (
    collections_group,
    get_command,
    import_command,
    put_command,
    search_command,
    status_command,
)
from memcluster.cli.drain import drain_command
from memcluster.cli.node import node_command
from memcluster.cli.serve import serve_command
from memcluster.cli.up import up_command
from memcluster.core.codec import DeleteOp, Op, PutOp
from memcluster.core.config import Config
from memcluster.core.errors import MemclusterError
from memcluster.shard.shard import ShardState
from memcluster.storage.snapshot import SnapshotStore
from memcluster.storage.wal import read_segment

console = Console()


@click.group()
@click.version_option(package_name="memcluster")
def main() -> None:
    """memcluster: memory for AI agents (text, embeddings, metadata), searched by meaning.

    Start with `memcluster demo`, or use the library: `memcluster.open("./data")`.
    """
    single_threaded_blas()


def single_threaded_blas() -> None:
    """Run numpy's BLAS on one thread in processes memcluster owns.

    A single query's scan is a memory-bound matrix-vector product: a second BLAS thread gains
    little, and when the other core is busy (the background indexer, another process) the two
    threads wait on each other and a 0.5 ms scan takes 5 ms (measured here). The embedded
    library leaves the host process's setting alone.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


DEMO_DIM = 256
DEMO_MEMORIES = [
    ("alice", "s1", "Alice loves spicy ramen and eats it every Friday", {"speaker": "Alice"}),
    ("alice", "s2", "Alice is training for the Berlin marathon in autumn", {"speaker": "Alice"}),
    ("alice", "s3", "Alice adopted a grey cat called Miso", {"speaker": "Alice"}),
    ("bob", "s1", "Bob cooks vegetarian curry for his friends", {"speaker": "Bob"}),
    ("bob", "s2", "Bob is learning the cello and practices at night", {"speaker": "Bob"}),
    ("bob", "s3", "Bob's dog chewed the marathon running shoes", {"speaker": "Bob"}),
]


def embed(text: str, dim: int = DEMO_DIM) -> npt.NDArray[np.float32]:
    """A toy embedding (hashed bag of words) so the demo runs without a model download.
    Real agents pass vectors from their embedding model."""
    vec = np.zeros(dim, dtype=np.float32)
    for word in re.findall(r"[a-z]+", text.lower()):
        if len(word) > 2:
            h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
            vec[h % dim] += 1.0
    return vec if vec.any() else np.ones(dim, dtype=np.float32)


@main.command()
@click.option("--data", default="./memcluster-demo", show_default=True, help="Data directory.")
def demo(data: str) -> None:
    """Store a few memories, search them by meaning, filter, count, and reopen.

    \b
    Example:
      memcluster demo --data /tmp/mc-demo
    """
    with memcluster.open(data) as db:
        if "demo" in db.list_collections():
            db.drop_collection("demo")
        coll = db.create_collection("demo", dim=DEMO_DIM, metric="cosine", shards=2)
        versions = coll.put_many(
            [
                memcluster.Memory(
                    namespace=("team-a", who), key=key, text=text, vector=embed(text), metadata=meta
                )
                for who, key, text, meta in DEMO_MEMORIES
            ]
        )
        console.print(f"[bold]stored[/] {len(versions)} memories in {data} (versions {versions})")
        query = "who loves ramen"
        table = Table(title=f"search: {query!r}, k=3")
        for col in ("score", "namespace", "key", "text"):
            table.add_column(col)
        for hit in coll.search(vector=embed(query), k=3):
            m = hit.memory
            table.add_row(f"{hit.score:.3f}", "/".join(m.namespace), m.key, m.text or "")
        console.print(table)
        hits = coll.search(vector=embed("marathon running"), k=2, filter={"speaker": "Bob"})
        console.print(
            "search 'marathon running' where speaker = Bob ->",
            [(h.memory.key, h.memory.text) for h in hits],
        )
        console.print("count under ('team-a', 'alice'):", coll.count(namespace=("team-a", "alice")))
    with memcluster.open(data) as db:
        got = db.collection("demo").get(("team-a", "bob"), "s2")
        console.print("after reopening, get(('team-a','bob'), 's2') ->", got.text if got else None)
    console.print(
        "\nNext: in Python, [bold]db = memcluster.open('./data')[/] and see README.md's quickstart."
    )


@main.group()
def inspect() -> None:
    """Dump on-disk files offline (the database need not be open)."""


@inspect.command("wal")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def inspect_wal(path: Path) -> None:
    """Print every record of a WAL segment, or of every segment in a WAL directory.

    \b
    Example:
      memcluster inspect wal ./data/collections/memories/shard-0000/wal
    """
    segments = sorted(path.glob("*.wal")) if path.is_dir() else [path]
    try:
        for segment in segments:
            console.print(f"[bold]{segment}[/]")
            for offset, record in read_segment(segment, Config()):
                ops = ", ".join(_describe(op) for op in record.ops)
                idem = f" idem={record.idem}" if record.idem else ""
                console.print(f"  @{offset} seq={record.seq}..{record.last_seq}{idem}: {ops}")
    except MemclusterError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(1)


def _describe(op: Op) -> str:
    if isinstance(op, PutOp):
        return f"put {'/'.join(op.namespace)}:{op.key}"
    if isinstance(op, DeleteOp):
        return f"delete {'/'.join(op.namespace)}:{op.key} ({op.reason.name.lower()})"
    fields = ", ".join(f"{f}={getattr(op, f)!r}" for f in op.__struct_fields__)
    return f"{type(op).__name__.removesuffix('Op').lower()}({fields})"


@inspect.command("snapshot")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def inspect_snapshot(path: Path) -> None:
    """Verify and summarise the snapshots in a shard's snapshots directory.

    \b
    Example:
      memcluster inspect snapshot ./data/collections/memories/shard-0000/snapshots
    """
    store = SnapshotStore(path)
    for seq in store.seqs():
        try:
            manifest = store.verify(seq)
        except MemclusterError as exc:
            console.print(f"[red]seq {seq}: damaged:[/] {exc}")
            continue
        files = ", ".join(f"{name} ({size} B)" for name, (size, _) in manifest.files.items())
        state = msgspec.msgpack.decode(
            (store.path(seq) / "state.bin").read_bytes(), type=ShardState
        )
        live = sum(1 for key in state.keys if key is not None)
        console.print(f"seq {seq}: ok, {live} memories, dim {state.dim}; files: {files}")


main.add_command(serve_command)
main.add_command(node_command)
main.add_command(up_command)
main.add_command(drain_command)
main.add_command(status_command)
main.add_command(collections_group)
main.add_command(put_command)
main.add_command(get_command)
main.add_command(search_command)
main.add_command(import_command)

if __name__ == "__main__":
    main()
