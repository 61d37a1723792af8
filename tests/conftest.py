"""Session-wide test wiring: the real-process cluster fixtures, and the fault matrix's
results table printed once at the end of the run (rows come from ``chaos_report``)."""

from __future__ import annotations

import pytest
from chaos_report import render_table

pytest_plugins = ["harness.cluster", "client_fixtures"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    table = render_table()
    if table:
        terminalreporter.write_sep("=", "fault matrix")
        terminalreporter.write_line(table)
