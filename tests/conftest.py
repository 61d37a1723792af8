"""Session-wide test wiring: the real-process cluster fixtures, and the fault matrix's
results table printed once at the end of the run (rows come from ``chaos_report``; under
pytest-xdist every worker sends its rows to the controller, which prints the table)."""

from __future__ import annotations

from typing import Any

import pytest
from chaos_report import ROWS, from_wire, render_table, to_wire

pytest_plugins = ["harness.cluster", "client_fixtures"]


# The key of this conftest's entry in an xdist worker's ``workeroutput``.
_CHAOS_ROWS = "walstore_chaos_rows"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # ``workeroutput`` exists only in an xdist worker: what it holds at the end reaches the
    # controller's ``pytest_testnodedown``.
    workeroutput: dict[str, Any] | None = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[_CHAOS_ROWS] = to_wire()


@pytest.hookimpl(optionalhook=True)  # an xdist hook: not there when pytest runs without -n
def pytest_testnodedown(node: Any, error: object) -> None:
    ROWS.extend(from_wire(getattr(node, "workeroutput", {}).get(_CHAOS_ROWS, [])))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    table = render_table()
    if table:
        terminalreporter.write_sep("=", "fault matrix")
        terminalreporter.write_line(table)
