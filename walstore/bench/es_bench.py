"""Application-level benchmarks: an eventsourcing application on walstore against the same
application on eventsourcing's own PostgreSQL module, in one run.

Two workloads, each measured on both systems one after the other:

- **bank commands**: a bank-account application (open, deposit, transfer between two
  accounts saved atomically) driven by ``threads`` threads for ``seconds``; commands/s and
  the p50/p99 of one command. A command whose save loses a race (IntegrityError) is
  retried from a fresh read and counted once, with its retries inside its latency.
- **projection catch-up**: ``notifications`` events are inserted through the recorder,
  then read back in order once with ``select_notifications`` pages and once with
  ``subscribe``; events/s of each read.

walstore runs as one node (every append acknowledged after fdatasync); PostgreSQL 15 runs
with fsync and synchronous_commit on (``peers.PostgresServer``). Both are driven by the
same Python process, so client-side CPU (eventsourcing's mapper, the drivers) is in both.
"""

from __future__ import annotations

import functools
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from walstore.bench import peers
from walstore.bench.http_bench import WalstoreServers, _bench_dir, _machine_notes
from walstore.bench.report import Measurement, Row, print_table
from walstore.errors import BenchError, ConfigError

Out = Callable[[str], object]

DEFAULT_THREADS: Final = 16
DEFAULT_SECONDS: Final = 10.0
DEFAULT_ACCOUNTS: Final = 2_000
DEFAULT_NOTIFICATIONS: Final = 1_000_000
# one insert_events call of the catch-up population; walstore's default batch limit
POPULATE_BATCH: Final = 10_000
# one select_notifications page, the same for both systems
PAGE: Final = 10_000
STATE_BYTES: Final = 100
# share of each command kind in the bank mix (the rest are transfers)
OPEN_SHARE: Final = 0.1
DEPOSIT_SHARE: Final = 0.5
# a command that keeps losing races gives up after this many attempts (counted as an error)
MAX_ATTEMPTS: Final = 20
BANK_TARGET_RATIO: Final = 1.0


@functools.cache
def _bank_classes() -> tuple[type[Any], type[Any]]:
    """The application and its aggregate, defined on first use so that importing this
    module (the CLI does) needs no eventsourcing; once, since eventsourcing registers each
    class under its topic and refuses a second class for the same topic."""
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Account(Aggregate):
        @event("Opened")
        def __init__(self, owner: str) -> None:
            self.owner = owner
            self.balance = 0

        @event("Deposited")
        def deposit(self, amount: int) -> None:
            self.balance += amount

        @event("Withdrawn")
        def withdraw(self, amount: int) -> None:
            self.balance -= amount

    class Bank(Application[uuid.UUID]):
        def open(self, owner: str) -> uuid.UUID:
            account = Account(owner)
            self.save(account)
            return account.id

        def deposit(self, account_id: uuid.UUID, amount: int) -> None:
            account: Account = self.repository.get(account_id)
            account.deposit(amount)
            self.save(account)

        def transfer(self, source: uuid.UUID, target: uuid.UUID, amount: int) -> None:
            debit: Account = self.repository.get(source)
            credit: Account = self.repository.get(target)
            debit.withdraw(amount)
            credit.deposit(amount)
            self.save(debit, credit)  # one atomic recording of both accounts' events

        def balance(self, account_id: uuid.UUID) -> int:
            return int(self.repository.get(account_id).balance)

    return Bank, Account


@dataclass(slots=True)
class _Tally:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    conflicts: int = 0


def run_bank(
    env: Mapping[str, str], *, threads: int, seconds: float, accounts: int, seed: int = 1
) -> tuple[Measurement, int]:
    """The bank mix on the persistence ``env`` describes: (measurement, races retried).

    Accounts are opened before the clock starts; every thread then picks commands at
    random until ``seconds`` have passed. Money is conserved, and checked at the end: a
    store that lost or doubled a save fails the run rather than reporting a rate."""
    from eventsourcing.persistence import IntegrityError

    bank_cls, _ = _bank_classes()
    app = bank_cls(env=dict(env))
    try:
        ids = [app.open(f"owner-{i}") for i in range(accounts)]
        for account_id in ids:
            app.deposit(account_id, 1_000)
        expected_total = 1_000 * len(ids)
        lock = threading.Lock()
        deadline = time.perf_counter() + seconds
        tallies = [_Tally() for _ in range(threads)]
        deposited = [0] * threads

        def worker(k: int) -> None:
            rng = random.Random(seed * 1_000 + k)
            tally = tallies[k]
            while time.perf_counter() < deadline:
                kind = rng.random()
                started = time.perf_counter()
                for _attempt in range(MAX_ATTEMPTS):
                    try:
                        if kind < OPEN_SHARE:
                            new_id = app.open(f"owner-{k}-{rng.random()}")
                            with lock:
                                ids.append(new_id)
                        elif kind < OPEN_SHARE + DEPOSIT_SHARE:
                            app.deposit(rng.choice(ids), 10)
                            deposited[k] += 10
                        else:
                            source, target = rng.sample(ids, 2)
                            app.transfer(source, target, 1)
                        tally.latencies_s.append(time.perf_counter() - started)
                        break
                    except IntegrityError:
                        tally.conflicts += 1  # lost a race for an account: read again, retry
                else:
                    tally.errors += 1

        workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
        started = time.perf_counter()
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        elapsed = time.perf_counter() - started
        total = sum(app.balance(account_id) for account_id in ids)
        if total != expected_total + sum(deposited):
            raise BenchError("bank", f"money not conserved: {total} != {expected_total + sum(deposited)}", "")
    finally:
        app.close()
    latencies = sorted(x for t in tallies for x in t.latencies_s)
    measurement = Measurement(
        ops_ok=len(latencies),
        errors=sum(t.errors for t in tallies),
        seconds=elapsed,
        p50_ms=_ms(peers.percentile(latencies, 50)),
        p99_ms=_ms(peers.percentile(latencies, 99)),
    )
    return measurement, sum(t.conflicts for t in tallies)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _stored_events(count: int, start: int) -> Iterator[Any]:
    from eventsourcing.persistence import StoredEvent

    state = b"x" * STATE_BYTES
    for i in range(start, start + count):
        yield StoredEvent(originator_id=uuid.uuid4(), originator_version=1, topic=f"bench:Event{i % 4}", state=state)


def run_catch_up(env: Mapping[str, str], *, notifications: int) -> tuple[Measurement, Measurement, float]:
    """Insert ``notifications`` events through the application recorder, then read them
    all back in order: (select_notifications, subscribe, insert events/s)."""
    from eventsourcing.application import Application

    app = Application[uuid.UUID](env=dict(env))
    recorder = app.recorder
    try:
        started = time.perf_counter()
        done = 0
        while done < notifications:
            n = min(POPULATE_BATCH, notifications - done)
            recorder.insert_events(list(_stored_events(n, done)))
            done += n
        insert_rate = notifications / (time.perf_counter() - started)
        last = recorder.max_notification_id()
        if last is None:
            raise BenchError("catch-up", "the recorder holds no notifications after the inserts", "")

        started = time.perf_counter()
        seen = 0
        position: int | None = None
        while True:
            page = recorder.select_notifications(start=position, limit=PAGE, inclusive_of_start=False)
            if not page:
                break
            seen += len(page)
            position = page[-1].id
        select = Measurement(
            seen, notifications - seen if seen < notifications else 0, time.perf_counter() - started, None, None
        )

        started = time.perf_counter()
        got = 0
        with recorder.subscribe(gt=None) as subscription:
            for notification in subscription:
                got += 1
                if notification.id >= last:
                    break
        subscribe = Measurement(
            got, 0 if got >= notifications else notifications - got, time.perf_counter() - started, None, None
        )
    finally:
        app.close()
    return select, subscribe, insert_rate


def walstore_env(url: str) -> dict[str, str]:
    return {"PERSISTENCE_MODULE": "walstore.eventsourcing", "WALSTORE_URLS": url}


def postgres_env(server: peers.PostgresServer, pool_size: int) -> dict[str, str]:
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": "postgres",
        "POSTGRES_HOST": peers.HOST,
        "POSTGRES_PORT": str(server.port),
        "POSTGRES_USER": "postgres",
        "POSTGRES_PASSWORD": "",
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": "0",
        "CREATE_TABLE": "y",
    }


def run_es_bench(
    out: Out = print,
    *,
    base_dir: Path | None = None,
    threads: int = DEFAULT_THREADS,
    seconds: float = DEFAULT_SECONDS,
    accounts: int = DEFAULT_ACCOUNTS,
    notifications: int = DEFAULT_NOTIFICATIONS,
) -> list[Row]:
    """Both workloads on walstore, then on PostgreSQL; prints the table, returns its rows."""
    if threads < 1 or seconds <= 0 or accounts < 2 or notifications < 1:
        raise ConfigError("threads, seconds, accounts (>= 2) and notifications must be positive")
    try:
        import eventsourcing.postgres  # noqa: F401  (psycopg is the peer's driver)
    except ImportError as exc:
        raise ConfigError(f"the eventsourcing bench needs walstore[eventsourcing] and psycopg: {exc}") from None
    for tool in ("initdb", "postgres", "pg_isready", "psql"):
        peers.find_postgres_tool(tool)
    results: dict[str, tuple[Measurement, Measurement, Measurement]] = {}
    notes_extra: list[str] = []
    with _bench_dir(base_dir) as work:
        out(
            f"walstore bench eventsourcing: {threads} threads, {seconds:g} s of bank commands, "
            f"{notifications:,} notifications, in {work}"
        )
        with WalstoreServers(work / "walstore", 1) as servers:
            out("  walstore: bank commands")
            bank, races_w = run_bank(
                walstore_env(servers.leader_url), threads=threads, seconds=seconds, accounts=accounts
            )
            out("  walstore: projection catch-up")
            select, subscribe, insert_w = run_catch_up(walstore_env(servers.leader_url), notifications=notifications)
            results["walstore"] = (bank, select, subscribe)
        with peers.PostgresServer(work, clients=threads + 4) as server:
            env = postgres_env(server, threads)
            out("  PostgreSQL: bank commands")
            bank, races_p = run_bank(env, threads=threads, seconds=seconds, accounts=accounts)
            out("  PostgreSQL: projection catch-up")
            select, subscribe, insert_p = run_catch_up(env, notifications=notifications)
            results["postgres"] = (bank, select, subscribe)
            version = server.version()
        notes_extra = [
            f"PostgreSQL {version} through eventsourcing.postgres (psycopg pool of {threads}); "
            "fsync=on, synchronous_commit=on",
            f"bank: {accounts} accounts opened first; mix {OPEN_SHARE:.0%} open, {DEPOSIT_SHARE:.0%} deposit, "
            f"{1 - OPEN_SHARE - DEPOSIT_SHARE:.0%} transfer; races retried: walstore {races_w}, PostgreSQL {races_p}; "
            "latency per command including its retries",
            f"catch-up: {notifications:,} events inserted in batches of {POPULATE_BATCH:,} "
            f"(walstore {insert_w:,.0f}/s, PostgreSQL {insert_p:,.0f}/s), read in pages of {PAGE:,}",
        ]
        notes = _machine_notes(
            work,
            seconds,
            f"the eventsourcing application, {threads} threads in this process",
            notes_extra,
            latency_source="p50/p99 nearest-rank over every command's time",
        )
    w, p = results["walstore"], results["postgres"]
    rows = [
        Row(
            "eventsourcing",
            "bank commands",
            threads,
            "cmds/s",
            w[0],
            "PostgreSQL",
            "the same application",
            p[0],
            BANK_TARGET_RATIO,
        ),
        Row("eventsourcing", "catch-up select", 1, "events/s", w[1], "PostgreSQL", "select_notifications", p[1]),
        Row("eventsourcing", "catch-up subscribe", 1, "events/s", w[2], "PostgreSQL", "subscribe", p[2]),
    ]
    print_table("eventsourcing application: walstore vs PostgreSQL", rows, notes, out)
    return rows


__all__: Sequence[str] = ("run_bank", "run_catch_up", "run_es_bench")
