"""The ``walstore`` command line: a thin click shell over functions that do the work.

walstore wal verify DIR                      exit 0 clean, 1 corrupt, 3 repairable
walstore wal dump DIR [--from-index N] [--json]
walstore bench wal [--dir DIR] [--replay-records N]
walstore member list [--json]                who votes (the member records in etcd)
walstore member replace NODE_ID              a node whose disk is gone rejoins as a learner
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from walstore.errors import CorruptionError, StorageError

if TYPE_CHECKING:
    from walstore.client import WalstoreClient


@click.group()
def main() -> None:
    """walstore: a replicated, durable event store."""


@main.group()
def wal() -> None:
    """Inspect a write-ahead log directory (read-only; stop the node or use a copy)."""


@wal.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def verify(directory: Path) -> None:
    """Check every segment and record of DIRECTORY without changing it.

    Exit 0 when clean, 1 for corruption (the node would refuse to start), 3 for crash
    leftovers the node repairs at start-up (torn tail, incomplete batch).
    """
    from walstore.wal.tools import verify as run_verify

    report = run_verify(directory)
    for line in report.lines():
        click.echo(line, err=report.exit_code == 1)
    sys.exit(report.exit_code)


@wal.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--from-index", type=click.IntRange(min=1), default=1, show_default=True, help="First index to print.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dump(directory: Path, from_index: int, as_json: bool) -> None:
    """Print the records of DIRECTORY from an index (EVENT bodies decoded)."""
    from walstore.wal.tools import dump_records, record_json, record_line

    try:
        with dump_records(directory, from_index) as (notes, records):
            for note in notes:
                click.echo(f"note: {note}", err=True)
            out = sys.stdout
            for path, rec in records:
                if as_json:
                    out.write(orjson.dumps(record_json(path, rec)).decode() + "\n")
                else:
                    out.write(record_line(path, rec) + "\n")
    except (CorruptionError, StorageError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except BrokenPipeError:  # `walstore wal dump DIR | head`
        sys.stderr.close()
        sys.exit(0)


@main.group()
def bench() -> None:
    """Measure this machine."""


@bench.command("wal")
@click.option(
    "--dir",
    "base_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("."),
    show_default=True,
    help="Where to put the temporary test directory (the disk being measured).",
)
@click.option("--replay-records", type=click.IntRange(min=1000), default=1_000_000, show_default=True)
@click.option("--seconds", type=click.FloatRange(min=0.2), default=3.0, show_default=True, help="Per measurement.")
def bench_wal(base_dir: Path, replay_records: int, seconds: float) -> None:
    """Raw disk ceiling vs. the WAL: appends/s and MB/s at 1, 16, 256 writers; replay speed."""
    from walstore.bench.wal_bench import run_wal_bench

    run_wal_bench(base_dir, replay_records=replay_records, seconds=seconds, out=click.echo)


def _bench_options(fn: Callable[..., None]) -> Callable[..., None]:
    fn = click.option(
        "--seconds",
        type=click.FloatRange(min=1),
        default=8.0,
        show_default=True,
        help="Per row (whole seconds for wrk and pgbench).",
    )(fn)
    return click.option(
        "--dir",
        "base_dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=Path("."),
        show_default=True,
        help="Where data goes (the disk being measured; the postgres user must reach it).",
    )(fn)


@bench.command("http")
@_bench_options
def bench_http(seconds: float, base_dir: Path) -> None:
    """One node vs PostgreSQL 15: POSTs at 1/16/64 connections, batches, reads."""
    from walstore.bench.http_bench import run_http_bench

    run_http_bench(seconds, click.echo, base_dir=base_dir)


@bench.command("cluster")
@_bench_options
def bench_cluster(seconds: float, base_dir: Path) -> None:
    """A 3-node cluster vs a 3-member etcd (JSON gateway puts) at the same concurrency."""
    from walstore.bench.http_bench import run_cluster_bench

    run_cluster_bench(seconds, click.echo, base_dir=base_dir)


@bench.command("all")
@_bench_options
@click.pass_context
def bench_all(ctx: click.Context, seconds: float, base_dir: Path) -> None:
    """The WAL, single-node and cluster benchmarks, one after the other."""
    ctx.invoke(bench_wal, base_dir=base_dir, replay_records=1_000_000, seconds=3.0)
    from walstore.bench.http_bench import run_all_benches

    run_all_benches(seconds, click.echo, base_dir=base_dir)


# -- the node ------------------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


@main.command()
@click.option("--node-id", help="NODE_ID (default event-store-0)")
@click.option("--http-host", help="HTTP_HOST (default 0.0.0.0)")
@click.option("--http-port", type=int, help="HTTP_PORT (default 8080)")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), help="DATA_DIR (default /data/wal)")
@click.option("--etcd-endpoints", help="ETCD_ENDPOINTS, comma-separated host:port (default localhost:2379)")
@click.option("--peer-host", help="PEER_HOST (default 0.0.0.0)")
@click.option("--peer-port", type=int, help="PEER_PORT (default 7070)")
@click.option("--peers", help="PEERS: id=host:port,... for every member, this node included")
@click.option("--cluster-size", type=int, help="CLUSTER_SIZE: peers derived from the StatefulSet's DNS names")
@click.option("--cluster-id", help="CLUSTER_ID (default event-store)")
@click.option("--lease-ttl-s", type=float, help="LEASE_TTL_S (default 2)")
@click.option("--probe-port", type=int, help="PROBE_PORT: health and /metrics only, own connection cap (default off)")
@click.option("--log-level", help="LOG_LEVEL (default INFO)")
def serve(**flags: object) -> None:
    """Run one node. Every flag has an environment variable; flags win.

    With no peers the node runs alone and leads itself (no etcd needed). SIGTERM or
    SIGINT: refuse new writes, hand the leadership over if it leads, stop accepting,
    answer the requests in flight, close idle connections cleanly, sync, exit 0.
    """
    import logging

    import trio

    from walstore.config import from_env
    from walstore.errors import ConfigError, WalstoreError
    from walstore.node import Node

    try:
        config = from_env(None, **flags)
    except ConfigError as e:
        click.echo(f"walstore: bad configuration: {e}", err=True)
        sys.exit(2)
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s {config.node_id} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(Node(config).run_until_signalled)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            sys.exit(0)
        # One failure can surface through several nurseries: report each error once.
        known = list({id(leaf): leaf for leaf in _leaves(e) if isinstance(leaf, WalstoreError)}.values())
        if not known:
            raise
        for leaf in known:
            click.echo(f"walstore: {type(leaf).__name__}: {leaf}", err=True)
        sys.exit(1)


def _client(url: str) -> WalstoreClient:
    from walstore.client import WalstoreClient

    return WalstoreClient(url)


def _print(obj: object, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())
    else:
        for line in lines:
            click.echo(line)


URL = click.option("--url", default="http://127.0.0.1:8080", show_default=True, envvar="WALSTORE_URL")
JSON = click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")


def _request_errors(fn: Callable[..., None]) -> Callable[..., None]:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        from walstore.client import ClientError

        try:
            fn(*args, **kwargs)
        except ClientError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:
            click.echo(f"error: cannot reach the server: {e}", err=True)
            sys.exit(1)

    return wrapper


@main.command()
@URL
@JSON
@_request_errors
def status(url: str, as_json: bool) -> None:
    """Show a node's status: role, leader, term, commit index, peers."""
    s = _client(url).status()
    lines = [
        f"node        {s['id']} ({s.get('role', '?')})",
        f"leader      {s['leader_id']}",
        f"term        {s['term']}",
        f"commit      {s['commit_index']}",
        f"applied     {s['last_applied']}",
        f"ready       {s.get('ready')}",
    ]
    for p in s.get("peers", []):
        state = "up" if p["connected"] else "DOWN"
        lines.append(f"peer        {p['id']} {p['address']} {state} match={p['match_index']} lag={p['lag']}")
    _print(s, as_json, lines)


@main.command()
@URL
@JSON
@click.option("--type", "type_", required=True, help="Event type")
@click.option("--aggregate", "aggregate_id", required=True, help="Aggregate id")
@click.option("--payload", default="{}", show_default=True, help="JSON object")
@click.option("--metadata", default="{}", show_default=True, help="JSON object")
@click.option("--id", "event_id", help="Client-chosen event id (idempotent retries)")
@click.option("--expected-version", type=int, help="0 = aggregate must be new")
@_request_errors
def append(
    url: str,
    as_json: bool,
    type_: str,
    aggregate_id: str,
    payload: str,
    metadata: str,
    event_id: str | None,
    expected_version: int | None,
) -> None:
    """Append one event."""
    try:
        body: dict[str, object] = {
            "type": type_,
            "aggregate_id": aggregate_id,
            "payload": orjson.loads(payload),
            "metadata": orjson.loads(metadata),
        }
    except orjson.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON: {e}") from None
    if event_id is not None:
        body["id"] = event_id
    if expected_version is not None:
        body["expected_version"] = expected_version
    r = _client(url).append(body)
    _print(r, as_json, [f"appended {r['event_id']} at index {r['index']}, version {r['version']}"])


@main.command()
@URL
@JSON
@click.argument("aggregate_id", required=False)
@click.option("--from-version", type=int)
@click.option("--from-index", type=int)
@click.option("--limit", type=int)
@click.option("--direction", type=click.Choice(["forward", "backward"]))
@_request_errors
def read(
    url: str,
    as_json: bool,
    aggregate_id: str | None,
    from_version: int | None,
    from_index: int | None,
    limit: int | None,
    direction: str | None,
) -> None:
    """Read one aggregate's events, or the global log without AGGREGATE_ID."""
    client = _client(url)
    if aggregate_id:
        r = client.read(aggregate_id, from_version=from_version, limit=limit, direction=direction)
    else:
        r = client.read_log(from_index=from_index, limit=limit)
    lines = [
        f"{e['index']:>8} {e['aggregate_id']}@{e['version']} {e['type']} {orjson.dumps(e['payload']).decode()}"
        for e in r["events"]
    ]
    _print(r, as_json, lines or ["(no events)"])


@main.command()
@URL
@click.option("--from-index", type=int, default=1, show_default=True)
def tail(url: str, from_index: int) -> None:
    """Follow the global log (Server-Sent Events): catch-up, then live."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80)
    conn.request("GET", f"/subscribe?from_index={from_index}")
    resp = conn.getresponse()
    try:
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("data:"):
                click.echo(line[5:].strip())
    except KeyboardInterrupt:
        pass


@main.group()
def member() -> None:
    """The cluster's members: who votes, and replacing one whose disk is gone.

    Reads and writes the member records in etcd (ETCD_ENDPOINTS, CLUSTER_ID, and
    CLUSTER_SIZE or PEERS as for `serve`). Exit 0 on success, 1 when etcd refuses or
    cannot be reached, 2 for bad arguments.
    """


_ETCD = click.option("--etcd-endpoints", help="ETCD_ENDPOINTS, comma-separated host:port (default localhost:2379)")
_CLUSTER_ID = click.option("--cluster-id", help="CLUSTER_ID (default event-store)")


def _member_call(
    etcd_endpoints: str | None, cluster_id: str | None, action: Callable[..., Awaitable[object]]
) -> object:
    """Run ``action(election, config)`` against etcd; one line and exit 1 or 2 on failure."""
    import trio

    from walstore.config import from_env
    from walstore.election.etcd import EtcdElection
    from walstore.errors import ConfigError, ElectionError

    overrides = {k: v for k, v in {"etcd_endpoints": etcd_endpoints, "cluster_id": cluster_id}.items() if v}
    try:
        config = from_env(None, **overrides)
        election = EtcdElection(list(config.etcd_endpoints), config.cluster_id)
    except (ConfigError, ElectionError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)

    async def run() -> object:
        async with election:
            return await action(election, config)

    try:
        return trio.run(run)
    except BaseException as e:
        # The election's nursery wraps what failed in an ExceptionGroup.
        known = [leaf for leaf in _leaves(e) if isinstance(leaf, ElectionError)]
        if not known:
            raise
        click.echo(f"error: {known[0]}", err=True)
        sys.exit(1)


@member.command("list")
@_ETCD
@_CLUSTER_ID
@JSON
def member_list(etcd_endpoints: str | None, cluster_id: str | None, as_json: bool) -> None:
    """Every recorded member: its data directory's incarnation and whether it votes."""

    async def action(election: Any, config: Any) -> object:
        return await election.read_members()

    members: Any = _member_call(etcd_endpoints, cluster_id, action)
    rows = [
        {"node_id": m.node_id, "incarnation": m.incarnation, "voter": m.voter, "revision": m.revision}
        for m in sorted(members.values(), key=lambda m: m.node_id)
    ]
    lines = [f"{'NODE':<24} {'INCARNATION':<34} ROLE"]
    lines += [
        f"{r['node_id']:<24} {r['incarnation'] or '(replaced)':<34} {'voter' if r['voter'] else 'learner'}"
        for r in rows
    ]
    _print(rows, as_json, lines)


@member.command("replace")
@click.argument("node_id")
@_ETCD
@_CLUSTER_ID
@click.option(
    "--cluster-size",
    type=click.IntRange(1, 15),
    help="Members in the cluster (default: from CLUSTER_SIZE or PEERS, else the recorded members)",
)
def member_replace(etcd_endpoints: str | None, cluster_id: str | None, node_id: str, cluster_size: int | None) -> None:
    """Declare NODE_ID's disk gone for good: its old incarnation stops voting, and its
    next start (on a new, empty disk) joins as a learner, catches up and becomes a voter.

    Refused if it would leave fewer voters than a majority. See docs/membership.md for
    the procedure."""
    from walstore.election.membership import replace

    async def action(election: Any, config: Any) -> object:
        size = cluster_size or (config.cluster_size if config.cluster_size > 1 else len(await election.read_members()))
        return await replace(election, node_id, size)

    record: Any = _member_call(etcd_endpoints, cluster_id, action)
    click.echo(f"{record.node_id}: old incarnation no longer votes; its next start joins as a learner")


@main.group()
def cluster() -> None:
    """A local cluster for trying walstore out."""


@cluster.command("up")
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--etcd-endpoints", help="Use this etcd instead of starting one")
@click.option("--lease-ttl-s", type=float, default=2.0, show_default=True)
def cluster_up(nodes: int, directory: Path, etcd_endpoints: str | None, lease_ttl_s: float) -> None:
    """Start etcd and NODES nodes on free loopback ports until Ctrl-C or SIGTERM."""
    from walstore.local_cluster import LocalCluster, run_until_signalled

    run_until_signalled(
        LocalCluster(directory, nodes, etcd_endpoints=etcd_endpoints, lease_ttl_s=lease_ttl_s), click.echo
    )


if __name__ == "__main__":  # pragma: no cover
    main()
