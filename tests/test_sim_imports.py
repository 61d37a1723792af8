"""The simulator uses the product and is never part of it (docs/architecture.md): nothing in
walstore/ imports walstore.sim but the CLI's command, and the planted-bug switches are read
only where they are planted and set only by the simulator."""

from __future__ import annotations

import ast
from pathlib import Path

import walstore

PACKAGE = Path(walstore.__file__).parent
PLANTED_IN = {
    "election/membership.py",
    "replication/replica_core.py",
    "replication/follower.py",
    "replication/follower_core.py",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _modules() -> list[tuple[str, Path]]:
    return [(str(p.relative_to(PACKAGE)), p) for p in sorted(PACKAGE.rglob("*.py"))]


def test_only_the_cli_imports_the_simulator() -> None:
    users = {
        rel
        for rel, path in _modules()
        if not rel.startswith("sim/")
        and any(n == "walstore.sim" or n.startswith("walstore.sim.") for n in _imports(path))
    }
    assert users == {"cli.py"}


def test_planted_bugs_are_read_only_where_planted() -> None:
    users = {rel for rel, path in _modules() if "walstore.planted_bugs" in _imports(path)}
    assert users - {rel for rel in users if rel.startswith("sim/")} == PLANTED_IN
    for rel, path in _modules():
        if rel.startswith("sim/") or rel == "planted_bugs.py":
            continue
        assert "planted_bugs.enable" not in path.read_text(), f"{rel} turns a planted bug on"
