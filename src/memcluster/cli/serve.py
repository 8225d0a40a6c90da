"""``memcluster serve``: run one node (HTTP API and binary protocol) over a data directory."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import click
import uvloop

import memcluster
from memcluster.core.config import Config
from memcluster.core.errors import MemclusterError
from memcluster.core.types import Durability
from memcluster.node.auth import Auth, load_keys
from memcluster.node.server import Listen, serve


def _usage(host: str, http_port: int, peer_port: int, secure: bool, keys: bool) -> str:
    http = f"{'https' if secure else 'http'}://{host}:{http_port}"
    mc = f"{'mcs' if secure else 'mc'}://{host}:{peer_port}"
    key = ', api_key="..."' if keys else ""
    return f"""memcluster is serving
  HTTP API   {http}/v1/   (docs: {http}/docs, OpenAPI: {http}/openapi.json)
  binary     {mc}

Try it:
  curl {http}/v1/health
  memcluster collections --url {http}
  python -c 'import memcluster; print(memcluster.connect("{mc}"{key}).list_collections())'

Stop with Ctrl-C (in-flight requests finish and the WAL is synced)."""


@click.command("serve")
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default="./memcluster-data",
    show_default=True,
    help="Data directory (created if missing). One server per directory.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--http-port", default=7700, show_default=True, help="HTTP API port (0: any free).")
@click.option(
    "--peer-port", default=7701, show_default=True, help="Binary protocol port (0: any free)."
)
@click.option(
    "--api-keys",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON file of API keys; without it, every request is allowed (local use).",
)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key.")
@click.option(
    "--durability",
    type=click.Choice([d.value for d in Durability]),
    default=Durability.FSYNC.value,
    show_default=True,
    help="Default acknowledgement level of collections that do not set their own.",
)
@click.option(
    "--request-bytes-max",
    default=Config().request_bytes_max,
    show_default=True,
    help="Largest request body / binary frame; larger ones get 413.",
)
@click.option("--node", default=None, help="This node's name in logs and health (default: host).")
@click.option("--quiet", is_flag=True, help="Print only the one 'listening' line, no usage.")
def serve_command(
    data: Path,
    host: str,
    http_port: int,
    peer_port: int,
    api_keys: Path | None,
    tls_cert: str | None,
    tls_key: str | None,
    durability: str,
    request_bytes_max: int,
    node: str | None,
    quiet: bool,
) -> None:
    """Serve a data directory over HTTP and the binary protocol, until Ctrl-C or SIGTERM.

    On SIGTERM or Ctrl-C, in-flight requests finish, every WAL is synced, and the process
    exits 0. The first line printed is `listening http://HOST:PORT mc://HOST:PORT`
    (scripts started with port 0 read the real ports from it).

    \b
    Examples:
      memcluster serve --data ./data
      memcluster serve --data ./data --http-port 0 --peer-port 0 --quiet
      memcluster serve --data ./data --api-keys keys.json --tls-cert c.pem --tls-key k.pem
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = Config(durability=Durability(durability), request_bytes_max=request_bytes_max)
    listen = Listen(
        host=host, http_port=http_port, peer_port=peer_port, tls_cert=tls_cert, tls_key=tls_key
    )
    try:
        auth = Auth(load_keys(api_keys) if api_keys is not None else None)
        db = memcluster.open(data, config)
    except MemclusterError as exc:
        click.echo(f"memcluster serve: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"memcluster serve: cannot open data directory {data}: {exc}", err=True)
        sys.exit(2)
    secure = tls_cert is not None

    def ready(http: int, peer: int) -> None:
        shown = host if host not in ("0.0.0.0", "::") else socket.gethostname()
        scheme, mc = ("https", "mcs") if secure else ("http", "mc")
        click.echo(f"listening {scheme}://{shown}:{http} {mc}://{shown}:{peer}", color=False)
        if not quiet:
            click.echo(_usage(shown, http, peer, secure, api_keys is not None))
        sys.stdout.flush()

    try:
        uvloop.run(serve(db, config, listen, node=node or host, auth=auth, ready=ready))
    except MemclusterError as exc:
        click.echo(f"memcluster serve: {exc}", err=True)
        sys.exit(2)
    finally:
        db.close()
    logging.getLogger("memcluster").info("stopped; every WAL is synced")
