"""The ``walstore`` command line: a thin click shell over functions that do the work.

walstore serve                               run one node
walstore status [--cluster]                  one node, or one row per node
walstore append | read | tail                the event API, with safe retries and paging
walstore wal verify DIR                      exit 0 clean, 1 corrupt, 3 repairable
walstore wal dump DIR [--from-index N] [--json]
walstore bench wal [--dir DIR] [--replay-records N]
walstore member list [--json]                who votes (the member records in etcd)
walstore member replace NODE_ID              a node whose disk is gone rejoins as a learner
walstore cluster up|ps|stop|kill|start|restart --dir DIR   a local cluster to try and break

User errors never print a traceback: one line on stderr and one of the exit codes below.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import orjson

from walstore import __version__
from walstore.errors import CorruptionError, StorageError

if TYPE_CHECKING:
    from walstore.client import WalstoreClient

# The exit codes every client command keeps apart. 75 is sysexits' EX_TEMPFAIL: the one
# answer a script must treat differently, because retrying anything but the same event id
# could store the event twice.
EXIT_FAILED = 1  # definitely failed: refused (4xx), or nothing reached a server
EXIT_USAGE = 2  # bad flags, URL or configuration: nothing was tried
EXIT_OUTCOME_UNKNOWN = 75  # the append may or may not be stored: retry with the same --id

DEFAULT_URL = "http://127.0.0.1:8080"
COMMANDLINE = click.core.ParameterSource.COMMANDLINE

MAIN_HELP = f"""walstore: a replicated, durable event store.

\b
Client commands (status, append, read, tail) talk to --url, default {DEFAULT_URL},
or to WALSTORE_URL when --url is not given. Several URLs (repeat --url, or separate
them with spaces or commas in WALSTORE_URL) let append and tail move to another node
when one is down.

\b
Exit codes:
  0   done
  {EXIT_FAILED}   definitely failed: the server refused (4xx, or 503 until --timeout), a
      node is down, a port is in use; an append that exits {EXIT_FAILED} is not stored
  {EXIT_USAGE}   usage: a bad flag, URL or setting (nothing was tried)
  {EXIT_OUTCOME_UNKNOWN}  outcome unknown: an append may or may not be stored; retry it
      with the same --id (it prints the id), which never stores it twice
(`wal verify` has its own: 0 clean, 1 corrupt, 3 repairable.)
"""


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """One line on stderr and exit ``code``: how every user error ends."""
    click.echo(f"walstore: {message}", err=True)
    sys.exit(code)


@click.group(help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="walstore")
def main() -> None:
    pass


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


@bench.command("eventsourcing")
@_bench_options
@click.option("--threads", type=click.IntRange(min=1), default=16, show_default=True, help="Bank command threads.")
@click.option(
    "--notifications", type=click.IntRange(min=1), default=1_000_000, show_default=True, help="Catch-up events."
)
def bench_eventsourcing(seconds: float, base_dir: Path, threads: int, notifications: int) -> None:
    """An eventsourcing application on walstore vs on eventsourcing.postgres: bank commands, catch-up."""
    from walstore.bench.es_bench import run_es_bench

    run_es_bench(click.echo, base_dir=base_dir, threads=threads, seconds=seconds, notifications=notifications)


@bench.command("all")
@_bench_options
@click.pass_context
def bench_all(ctx: click.Context, seconds: float, base_dir: Path) -> None:
    """The WAL, single-node, cluster and eventsourcing benchmarks, one after the other."""
    ctx.invoke(bench_wal, base_dir=base_dir, replay_records=1_000_000, seconds=3.0)
    from walstore.bench.es_bench import run_es_bench
    from walstore.bench.http_bench import run_all_benches

    run_all_benches(seconds, click.echo, base_dir=base_dir)
    run_es_bench(click.echo, base_dir=base_dir, seconds=seconds)


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
        fail(f"bad configuration: {e}", EXIT_USAGE)
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
        leaves = _leaves(e)
        # A listener that cannot bind is a user error (another process has the port), not
        # a bug: say which ports were asked for. "address already in use" stays in the
        # line because the launchers look for it to retry with fresh ports.
        bind = next((leaf for leaf in leaves if isinstance(leaf, OSError) and leaf.errno in _BIND_ERRNOS), None)
        if bind is not None:
            fail(
                f"cannot listen on HTTP {config.http_host}:{config.http_port} and peer "
                f"{config.peer_host}:{config.peer_port}: {bind.strerror or bind} "
                f"[{errno.errorcode.get(bind.errno or 0, bind.errno)}]"
            )
        # One failure can surface through several nurseries: report each error once.
        known = list({id(leaf): leaf for leaf in leaves if isinstance(leaf, WalstoreError)}.values())
        if not known:
            raise
        for leaf in known:
            click.echo(f"walstore: {type(leaf).__name__}: {leaf}", err=True)
        sys.exit(1)


_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def _split_urls(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """--url may repeat, and WALSTORE_URL may list several URLs; each must be http://host:port."""
    from walstore.client import parse_url

    urls = tuple(u for item in value for u in item.replace(",", " ").split())
    for url in urls:
        try:
            parse_url(url)
        except ValueError as e:
            fail(f"bad --url: {e}", EXIT_USAGE)
    return urls or (DEFAULT_URL,)


URL = click.option(
    "--url",
    "urls",
    multiple=True,
    envvar="WALSTORE_URL",
    callback=_split_urls,
    help=f"http://HOST:PORT of a node; repeat for several [env WALSTORE_URL; default {DEFAULT_URL}]",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _client(url: str) -> WalstoreClient:
    from walstore.client import WalstoreClient

    return WalstoreClient(url, exact_numbers=True)


def _print(obj: object, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())
    else:
        for line in lines:
            click.echo(line)


def _one_url(urls: Sequence[str], command: str) -> str:
    if len(urls) > 1:
        fail(f"{command} talks to one node; got {len(urls)} URLs", EXIT_USAGE)
    return urls[0]


def _request_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """What can go wrong talking to a node, as one line and an exit code each."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        import http.client

        from walstore.client import ClientError, OutcomeUnknownError, UnreachableError

        try:
            fn(*args, **kwargs)
        except OutcomeUnknownError as e:
            fail(str(e), EXIT_OUTCOME_UNKNOWN)
        except ClientError as e:
            fail(str(e))
        except UnreachableError as e:
            fail(f"cannot reach the server: {e}")
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, BrokenPipeError):  # `walstore read | head`: the reader is done
                sys.stderr.close()
                sys.exit(0)
            fail(f"cannot reach the server: {type(e).__name__}: {e}")

    return wrapper


def _event_line(event: dict[str, Any]) -> str:
    payload = orjson.dumps(event.get("payload")).decode()
    return f"{event['index']:>8} {event['aggregate_id']}@{event['version']} {event['type']} {payload}"


# -- status ---------------------------------------------------------------------------------


@main.command()
@URL
@JSON
@click.option("--cluster", "whole_cluster", is_flag=True, help="One row per node (discovered, or every --url).")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    help="With --cluster: the nodes of the local cluster in DIR/cluster.json.",
)
@_request_errors
def status(urls: tuple[str, ...], as_json: bool, whole_cluster: bool, directory: Path | None) -> None:
    """Show a node's status: role, leader, term, commit index, peers.

    With --cluster: one row per node (role, term, leader, commit, applied, lag behind the
    leader's commit). The nodes are every --url given, or DIR/cluster.json's, or those the
    given node lists as peers (only a leader lists them; each is asked on the given node's
    HTTP port, the layout of the Kubernetes StatefulSet). Exit 1 if any node does not answer.
    """
    if directory is not None and not whole_cluster:
        fail("--dir needs --cluster", EXIT_USAGE)
    if directory is not None and click.get_current_context().get_parameter_source("urls") == COMMANDLINE:
        fail("--dir and --url both name the nodes: give one of them", EXIT_USAGE)
    if whole_cluster:
        _status_cluster(urls, as_json, directory)
        return
    s = _client(_one_url(urls, "status without --cluster")).status()
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


def _status_cluster(urls: Sequence[str], as_json: bool, directory: Path | None) -> None:
    from walstore.client import cluster_status

    names: dict[str, str] = {}
    if directory is not None:
        from walstore.local_cluster import ClusterDescriptionError, read_description

        try:
            names = {n["http"]: n["id"] for n in read_description(directory)["nodes"]}
        except ClusterDescriptionError as e:
            fail(str(e))
        urls = list(names)
    rows = cluster_status(urls, names=names)
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        for line in _table(rows):
            click.echo(line)
    if any(row["error"] for row in rows):
        sys.exit(EXIT_FAILED)


_COLUMNS = ("id", "url", "role", "term", "leader", "commit", "applied", "lag", "ready", "error")


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A boxed table, as ``etcdctl endpoint status -w table`` prints one."""
    cells = [[c.upper() for c in _COLUMNS]]
    cells += [["" if row.get(c) is None else str(row[c]) for c in _COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(_COLUMNS))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(r: list[str]) -> str:
        return "|" + "|".join(f" {v:<{w}} " for v, w in zip(r, widths, strict=True)) + "|"

    return [rule, line(cells[0]), rule, *(line(r) for r in cells[1:]), rule]


# -- append ---------------------------------------------------------------------------------

# Longer than the server's own append timeout (10 s, then 504), so that one slow commit
# or one failover (about 2 s here) is ridden out by retrying rather than reported.
DEFAULT_APPEND_TIMEOUT_S = 30.0


def _json_object_text(name: str, text: str) -> orjson.Fragment:
    """The user's JSON text, checked to be an object and sent exactly as typed (re-encoding
    a parsed value could change a number, which the server promises not to)."""
    from walstore.client import loads_exact

    try:
        value = loads_exact(text)
    except ValueError as e:
        fail(f"--{name} is not JSON: {e}", EXIT_USAGE)
    if not isinstance(value, dict):
        fail(f"--{name} must be a JSON object, got {text[:40]!r}", EXIT_USAGE)
    return orjson.Fragment(text.encode())


@main.command()
@URL
@JSON
@click.option("--type", "type_", required=True, help="Event type")
@click.option("--aggregate", "aggregate_id", required=True, help="Aggregate id")
@click.option("--payload", default="{}", show_default=True, help="JSON object, stored exactly as given")
@click.option("--metadata", default="{}", show_default=True, help="JSON object, stored exactly as given")
@click.option("--id", "event_id", help="Event id (default: a new UUID, printed); reuse it to retry")
@click.option("--expected-version", type=click.IntRange(min=0), help="0 = aggregate must be new")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_APPEND_TIMEOUT_S,
    show_default=True,
    help="Seconds to keep retrying 503/504/lost connections (the server itself gives up after 10)",
)
@_request_errors
def append(
    urls: tuple[str, ...],
    as_json: bool,
    type_: str,
    aggregate_id: str,
    payload: str,
    metadata: str,
    event_id: str | None,
    expected_version: int | None,
    timeout_s: float,
) -> None:
    """Append one event, retrying safely.

    The event gets an id before the first attempt (a new UUID unless --id), so every retry
    names the same event and the server stores it at most once. 503, 504 and lost
    connections are retried (honouring Retry-After, moving to the next --url when a node is
    down) until --timeout. Exit 0 stored; 1 not stored (refused with a 4xx, only 503s, or no
    server reachable); 75 outcome unknown: run again with the printed --id.
    """
    import uuid

    from walstore.client import Attempt, ClientError, UnreachableError, append_with_retry

    event_id = event_id or str(uuid.uuid4())
    body: dict[str, object] = {
        "id": event_id,
        "type": type_,
        "aggregate_id": aggregate_id,
        "payload": _json_object_text("payload", payload),
        "metadata": _json_object_text("metadata", metadata),
    }
    if expected_version is not None:
        body["expected_version"] = expected_version

    def on_retry(attempt: Attempt) -> None:
        click.echo(f"walstore: {attempt.error}; retrying event {event_id} in {attempt.retry_after_s:.1f}s", err=True)

    try:
        r = append_with_retry(urls, body, timeout_s=timeout_s, on_retry=on_retry)
    except ClientError as e:
        fail(f"event {event_id} not stored: {e}")
    except UnreachableError as e:
        fail(f"event {event_id} not stored: no server reachable ({e})")
    except KeyboardInterrupt:
        fail(f"interrupted: outcome unknown for event {event_id}; retry with --id {event_id}", EXIT_OUTCOME_UNKNOWN)
    _print(r, as_json, [f"appended {r['event_id']} at index {r['index']}, version {r['version']}"])


# -- read and tail --------------------------------------------------------------------------


def _reachable(urls: Sequence[str]) -> WalstoreClient:
    """A client for the first URL that answers: a read has no side effects, so any node will do."""
    import http.client

    from walstore.client import UnreachableError

    problems = []
    for url in urls:
        client = _client(url)
        try:
            client.request("GET", "/health/live", check=False)
            return client
        except (OSError, http.client.HTTPException) as e:
            problems.append(f"{url}: {type(e).__name__}: {e}")
    raise UnreachableError("; ".join(problems))


@main.command()
@URL
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line (JSON Lines).")
@click.argument("aggregate_id", required=False)
@click.option("--from-version", type=click.IntRange(min=1), help="With AGGREGATE_ID: first version to read.")
@click.option("--direction", type=click.Choice(["forward", "backward"]), help="With AGGREGATE_ID.")
@click.option("--from-index", type=click.IntRange(min=1), help="Without AGGREGATE_ID: first global index.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many events (default: all of them).")
@_request_errors
def read(
    urls: tuple[str, ...],
    as_json: bool,
    aggregate_id: str | None,
    from_version: int | None,
    from_index: int | None,
    limit: int | None,
    direction: str | None,
) -> None:
    """Read one aggregate's events, or the global log without AGGREGATE_ID.

    Pages through everything (the server answers at most 10,000 events per request), or
    the first --limit events.
    """
    from walstore.client import iter_aggregate, iter_log

    if aggregate_id is not None and from_index is not None:
        fail("--from-index reads the global log; with AGGREGATE_ID use --from-version", EXIT_USAGE)
    if aggregate_id is None and (from_version is not None or direction is not None):
        fail("--from-version and --direction need an AGGREGATE_ID", EXIT_USAGE)
    client = _reachable(urls)
    events: Iterator[dict[str, Any]]
    if aggregate_id is not None:
        events = iter_aggregate(
            client, aggregate_id, from_version=from_version, limit=limit, direction=direction or "forward"
        )
    else:
        events = iter_log(client, from_index=from_index or 1, limit=limit)
    count = 0
    for event in events:
        click.echo(orjson.dumps(event).decode() if as_json else _event_line(event))
        count += 1
    if count == 0 and not as_json:
        click.echo("(no events)")


# A node sends a heartbeat comment after 15 s of silence: three missed ones mean the
# connection is dead (a paused or cut-off node) even though no socket error says so.
TAIL_IDLE_TIMEOUT_S = 45.0


@main.command()
@URL
@click.option("--from-index", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line, exactly as the server sent it.")
@_request_errors
def tail(urls: tuple[str, ...], from_index: int, as_json: bool) -> None:
    """Follow the global log (Server-Sent Events): catch-up, then live, until Ctrl-C.

    When the node restarts or fails over, tail reconnects (to the next --url if there are
    several) with Last-Event-ID and carries on after the last event it printed. Exit 1 if
    no node answers at the start.
    """
    from walstore.client import follow, loads_exact

    def on_reconnect(url: str, reason: str) -> None:
        click.echo(f"walstore: lost {url} ({reason}); reconnecting", err=True)

    try:
        for message in follow(
            urls, from_index=from_index, idle_timeout_s=TAIL_IDLE_TIMEOUT_S, on_reconnect=on_reconnect
        ):
            if as_json:
                click.echo(message.data)
            else:
                try:
                    click.echo(_event_line(loads_exact(message.data)))
                except (ValueError, KeyError, TypeError):
                    click.echo(message.data)
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
    """A local cluster for trying walstore out, and breaking it on purpose.

    \b
    walstore cluster up --dir DIR            start etcd and 3 nodes, watch them (Ctrl-C stops all)
    walstore cluster ps --dir DIR            every process of it: pid, state, role
    walstore cluster kill node-1 --dir DIR   SIGKILL one node (a crash), and watch the failover
    walstore cluster start node-1 --dir DIR  bring it back on its old ports and data
    walstore cluster stop|restart NODE --dir DIR
    (NODE may also be etcd0: stop, kill and start work on the cluster's etcd too.)

    The commands act only on processes DIR/cluster.json says this cluster started, and
    only after checking each pid is still that process (its start time). Exit 1 when the
    action cannot be done (not running, already running, no cluster in DIR), 2 for usage.
    """


def _cluster_errors(fn: Callable[..., None]) -> Callable[..., None]:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        from walstore.errors import ConfigError, ElectionError
        from walstore.launcher import LaunchError  # ClusterError is one

        try:
            fn(*args, **kwargs)
        except (LaunchError, ConfigError, ElectionError) as e:
            fail(str(e).splitlines()[0])

    return wrapper


_DIR = click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The cluster's directory (holds cluster.json).",
)


@cluster.command("up")
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True)
@_DIR
@click.option("--etcd-endpoints", help="Use this etcd instead of starting one")
@click.option("--lease-ttl-s", type=float, default=2.0, show_default=True)
@_cluster_errors
def cluster_up(nodes: int, directory: Path, etcd_endpoints: str | None, lease_ttl_s: float) -> None:
    """Start etcd and NODES nodes on free loopback ports, and watch them until Ctrl-C or
    SIGTERM. A node that exits is reported; the others keep running. Run again on the same
    DIR to resume that cluster (same data, new ports)."""
    from walstore.local_cluster import LocalCluster, run_until_signalled

    run_until_signalled(
        LocalCluster(directory, nodes, etcd_endpoints=etcd_endpoints, lease_ttl_s=lease_ttl_s), click.echo
    )


@cluster.command("ps")
@_DIR
@JSON
@_cluster_errors
def cluster_ps(directory: Path, as_json: bool) -> None:
    """Every process of the cluster in DIR: pid, state (running, paused, exited), URL, role."""
    from walstore.local_cluster import process_rows

    rows = process_rows(directory.resolve())
    columns = ("name", "pid", "state", "url", "role", "term", "applied")
    cells = [[c.upper() for c in columns]] + [["-" if r[c] is None else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(f"{v:<{w}}" for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    _print(rows, as_json, lines)


def _node_action(name: str, sig: int, doc: str) -> None:
    @cluster.command(name, help=doc)
    @click.argument("node")
    @_DIR
    @_cluster_errors
    def action(node: str, directory: Path) -> None:
        from walstore.local_cluster import signal_node

        pid = signal_node(directory.resolve(), node, sig)
        click.echo(f"{node} (pid {pid}) {'killed' if sig == signal.SIGKILL else 'stopped'}")


_node_action("stop", signal.SIGTERM, "Stop NODE gracefully (SIGTERM; SIGKILL after 8 s).")
_node_action("kill", signal.SIGKILL, "Kill NODE with SIGKILL: a crash, no clean shutdown.")


@cluster.command("start")
@click.argument("node")
@_DIR
@_cluster_errors
def cluster_start(node: str, directory: Path) -> None:
    """Start a stopped NODE again, on its old ports and data directory."""
    from walstore.local_cluster import start_node

    pid, url = start_node(directory.resolve(), node)
    click.echo(f"{node} {url} (pid {pid})")


@cluster.command("restart")
@click.argument("node")
@_DIR
@click.option("--kill", "crash", is_flag=True, help="SIGKILL instead of a graceful stop.")
@_cluster_errors
def cluster_restart(node: str, directory: Path, crash: bool) -> None:
    """Stop NODE (if it runs) and start it again."""
    from walstore.local_cluster import ClusterError, signal_node, start_node

    with contextlib.suppress(ClusterError):  # not running: just start it
        signal_node(directory.resolve(), node, signal.SIGKILL if crash else signal.SIGTERM)
    pid, url = start_node(directory.resolve(), node)
    click.echo(f"{node} {url} (pid {pid})")


def _add_simulate() -> None:
    from walstore.sim.command import simulate

    main.add_command(simulate)


_add_simulate()

if __name__ == "__main__":  # pragma: no cover
    main()
