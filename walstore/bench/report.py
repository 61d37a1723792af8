"""Results of the HTTP benchmarks and the table that prints them.

One ``Row`` is one workload measured twice, on walstore and on its comparison peer
(PostgreSQL 15 for one node, etcd 3.4 for a 3-node cluster), under the same concurrency and
for the same number of seconds. The table shows both rates, both latency percentiles and
the ratio walstore / peer, plus whether the issue's target ratio was met. Pure: formatting
only, no processes, so the table can be tested on made-up numbers.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

NOTE_WIDTH = 110  # notes wrap here; the table itself is about this wide


@dataclass(frozen=True, slots=True)
class Measurement:
    """One load run against one system.

    ``ops`` are requests (wrk) or transactions (pgbench); ``items_per_op`` is how many
    events one of them carries (1, or the batch size), so events/s = ops/s * items_per_op.
    Latencies are per operation, in milliseconds; None when the tool gave none.
    """

    ops_ok: int
    errors: int
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    items_per_op: int = 1

    @property
    def ops_per_s(self) -> float:
        return self.ops_ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def items_per_s(self) -> float:
        return self.ops_per_s * self.items_per_op


@dataclass(frozen=True, slots=True)
class Row:
    """One workload on walstore and on its peer. ``unit`` names what ``rate`` counts:
    ``events/s`` (items) or ``req/s`` (operations)."""

    section: str
    workload: str
    connections: int
    unit: str
    walstore: Measurement
    peer_name: str
    peer_workload: str
    peer: Measurement
    target_ratio: float | None = None

    def rate(self, m: Measurement) -> float:
        return m.items_per_s if self.unit == "events/s" else m.ops_per_s

    @property
    def ratio(self) -> float:
        peer = self.rate(self.peer)
        return self.rate(self.walstore) / peer if peer > 0 else math.inf

    @property
    def target_met(self) -> bool | None:
        return None if self.target_ratio is None else self.ratio >= self.target_ratio


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


_HEADERS = (
    "workload",
    "conns",
    "unit",
    "walstore",
    "p50 ms",
    "p99 ms",
    "peer",
    "p50 ms",
    "p99 ms",
    "ratio",
    "target",
    "errors w/p",
)


def _cells(row: Row) -> tuple[str, ...]:
    target = "" if row.target_ratio is None else f">={row.target_ratio:g} {'met' if row.target_met else 'MISSED'}"
    ratio = "inf" if math.isinf(row.ratio) else f"{row.ratio:.2f}"
    return (
        row.workload,
        str(row.connections),
        row.unit,
        _num(row.rate(row.walstore)),
        _ms(row.walstore.p50_ms),
        _ms(row.walstore.p99_ms),
        _num(row.rate(row.peer)),
        _ms(row.peer.p50_ms),
        _ms(row.peer.p99_ms),
        ratio,
        target,
        f"{row.walstore.errors}/{row.peer.errors}",
    )


def format_table(title: str, rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    """A fixed-width table: one line per row, the peer's workload listed under it, then
    the notes (machine, durations, configuration) that a reader needs to trust the numbers."""
    peers = sorted({row.peer_name for row in rows})
    header = list(_HEADERS)
    if len(peers) == 1:
        header[6] = peers[0]
    body = [_cells(row) for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        # the workload name reads left-aligned, numbers right-aligned
        return "  ".join(
            c.ljust(w) if i in (0, 2, 10) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [title, "=" * len(title), line(header), line(["-" * w for w in widths])]
    out.extend(line(cells) for cells in body)
    out.append("")
    described: set[tuple[str, str]] = set()
    for row in rows:
        key = (row.workload, row.peer_workload)
        if key not in described:
            described.add(key)
            out.append(f"  {row.workload}: {row.peer_name} runs {row.peer_workload}")
    for note in notes:
        out.extend(textwrap.wrap(note, NOTE_WIDTH, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(out).rstrip() + "\n"


def print_table(
    title: str, rows: Sequence[Row], notes: Sequence[str] = (), out: Callable[[str], object] = print
) -> None:
    out(format_table(title, rows, notes))


def rows_json(rows: Sequence[Row]) -> list[dict[str, object]]:
    """Rows as plain data (for ``--json`` or a results file)."""

    def m(x: Measurement, rate: float) -> dict[str, object]:
        return {
            "rate": rate,
            "p50_ms": x.p50_ms,
            "p99_ms": x.p99_ms,
            "ok": x.ops_ok,
            "errors": x.errors,
            "seconds": x.seconds,
            "items_per_op": x.items_per_op,
        }

    return [
        {
            "section": r.section,
            "workload": r.workload,
            "connections": r.connections,
            "unit": r.unit,
            "walstore": m(r.walstore, r.rate(r.walstore)),
            "peer_name": r.peer_name,
            "peer_workload": r.peer_workload,
            "peer": m(r.peer, r.rate(r.peer)),
            "ratio": r.ratio,
            "target_ratio": r.target_ratio,
            "target_met": r.target_met,
        }
        for r in rows
    ]
