"""The design lives in the repository (issue 12, item 6): every document the code and the
README point at exists, every relative link in them resolves, and nothing cites the
design notes that were never in the repository (DESIGN.md, STYLE.md, TESTING.md)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [
    *sorted((REPO / "walstore").rglob("*.py")),
    *sorted((REPO / "tests").rglob("*.py")),
    *sorted((REPO / "native").glob("*.[ch]")),
    REPO / "README.md",
    REPO / "Makefile",
    REPO / "Dockerfile",
    *sorted((REPO / "docs").glob("*.md")),
]
REQUIRED = ["architecture.md", "wal-format.md", "protocol.md", "fault-model.md", "operations.md", "openapi.yaml"]
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_documents_exist() -> None:
    for name in REQUIRED:
        assert (REPO / "docs" / name).is_file(), name


def test_no_reference_to_design_notes_outside_the_repository() -> None:
    gone = re.compile(r"\b(DESIGN|STYLE|TESTING)\.md\b")
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in SOURCES
        if path != Path(__file__).resolve()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if gone.search(line)
    ]
    assert not hits, hits


def test_every_docs_path_named_in_the_code_exists() -> None:
    named = re.compile(r"\bdocs/[\w.-]+\.(?:md|yaml)")
    missing = {
        f"{path.relative_to(REPO)}: {m.group(0)}"
        for path in SOURCES
        for m in named.finditer(path.read_text(errors="replace"))
        if not (REPO / m.group(0)).is_file()
    }
    assert not missing, sorted(missing)


def test_relative_links_in_markdown_resolve() -> None:
    broken = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for m in _LINK.finditer(path.read_text()):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, broken
