"""The fault matrix's results table: every fault test records one row, and the session ends
by printing them all (``tests/conftest.py`` calls ``render_table`` from its terminal-summary
hook), so one ``make chaos`` run shows what each fault cost and whether a promise broke.

Rows live in a plain module-level list: pytest imports this module once per session (the
``tests`` directory is on ``sys.path``), and every fault test module appends to the same list.
A row is recorded before the test asserts, so a failing row still shows its numbers. Under
pytest-xdist (``make test`` runs ``pytest -n``) each worker process has its own list: a worker
hands its rows to the controller when it finishes (``to_wire``/``from_wire``, through
``tests/conftest.py``), and the controller prints them all.

Columns: fault, operations, acknowledged (``ok`` appends), lost, duplicates, divergent
replicas (nodes whose log disagrees with the longest one), other violations (phantoms,
definite failures present, gaps, stale reads, wrong positions), time to new leader in
seconds (``-`` where the fault does not replace the leader), and a free-text note.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any

from walstore.checker import Report

# Kinds that have their own column; every other kind is summed under "other".
_OWN_COLUMNS = frozenset(("lost", "duplicate", "divergent"))
HEADERS = ("fault", "ops", "acked", "lost", "dups", "divergent replicas", "other violations", "new leader s", "note")


@dataclass(frozen=True, slots=True)
class Row:
    fault: str
    operations: int
    acknowledged: int
    lost: int
    duplicates: int
    divergent_replicas: int
    other_violations: int
    time_to_leader_s: float | None
    note: str

    def cells(self) -> tuple[str, ...]:
        leader = "-" if self.time_to_leader_s is None else f"{self.time_to_leader_s:.2f}"
        return (
            self.fault,
            str(self.operations),
            str(self.acknowledged),
            str(self.lost),
            str(self.duplicates),
            str(self.divergent_replicas),
            str(self.other_violations),
            leader,
            self.note,
        )


ROWS: list[Row] = []


def record_row(fault: str, report: Report, *, time_to_leader_s: float | None = None, note: str = "") -> Row:
    """Add one fault's outcome to the session's table; returns the row."""
    divergent_nodes = {node for v in report.of_kind("divergent") for node in v.nodes}
    row = Row(
        fault=fault,
        operations=report.operations,
        acknowledged=report.acknowledged,
        lost=report.lost,
        duplicates=report.duplicates,
        divergent_replicas=len(divergent_nodes),
        other_violations=sum(n for kind, n in report.counts.items() if kind not in _OWN_COLUMNS),
        time_to_leader_s=time_to_leader_s,
        note=note,
    )
    ROWS.append(row)
    return row


def to_wire(rows: list[Row] | None = None) -> list[list[Any]]:
    """The rows as plain lists (what execnet carries from an xdist worker to the controller)."""
    return [list(astuple(row)) for row in (ROWS if rows is None else rows)]


def from_wire(rows: list[list[Any]]) -> list[Row]:
    return [Row(*row) for row in rows]


def render_table(rows: list[Row] | None = None) -> str:
    """The rows as an aligned plain-text table; empty string when there are none."""
    chosen = ROWS if rows is None else rows
    if not chosen:
        return ""
    lines = [HEADERS, *(row.cells() for row in chosen)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]

    def fmt(cells: tuple[str, ...]) -> str:
        # Text columns left, numbers right; the note is last and is not padded.
        parts = [cells[0].ljust(widths[0])]
        parts += [cells[i].rjust(widths[i]) for i in range(1, len(cells) - 1)]
        parts.append(cells[-1])
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths[:-1]) + "  " + "-" * max(4, widths[-1])
    return "\n".join([fmt(HEADERS), rule, *(fmt(row.cells()) for row in chosen)])
