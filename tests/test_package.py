"""The package builds everywhere (issue 12, item 5).

``python -m build`` makes an sdist and, from that sdist, a wheel; each is installed into a
fresh virtualenv with nothing but the pinned dependencies and must serve, append and read
as ``walstore serve``. The version is written once; constraints.txt pins every runtime
dependency (the whole closure) and the build tools, and the Dockerfile installs with it.

Speed: the dependencies are installed offline from a wheel cache (``.venv/wheelhouse``,
or ``$WALSTORE_WHEELHOUSE``) filled from PyPI on the first run only, and the fresh venvs
are made without pip (the test's own pip installs into them with ``--python``).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version
from served_node import ServedNode

import walstore
from walstore.client import WalstoreClient

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Build products and local state never go into the copy the package is built from.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "data", "*.egg-info", "__pycache__", "*.so", "*.o", "_walstore_native.c",
    ".*_cache", ".hypothesis", "bench-results",
)  # fmt: skip


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt: not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in out, f"constraints.txt pins {name} twice"
        out[name] = Version(match.group(2))
    return out


def closure(roots: list[str]) -> Iterator[Requirement]:
    """``roots`` and every requirement they need, transitively, as the installed
    distributions of this environment declare them (extras not asked for are skipped)."""
    environment: dict[str, str] = {str(k): str(v) for k, v in default_environment().items()}
    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in roots]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        yield requirement
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(requirement.name) or []:
            for wanted in requirement.extras or {""}:
                todo.append((Requirement(text), wanted))


def test_the_version_is_written_once() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project
    assert project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "walstore.__version__"}
    for name in ("setup.py", "pyproject.toml"):
        assert walstore.__version__ not in (REPO / name).read_text(), f"{name} repeats the version"
    assert importlib.metadata.version("walstore") == walstore.__version__


def test_extras_are_split_by_purpose() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras) == {"test", "lint", "fuzz", "eventsourcing"}
    names = {key: {canonicalize_name(Requirement(r).name) for r in reqs} for key, reqs in extras.items()}
    assert {"ruff", "mypy"} <= names["lint"] and not {"ruff", "mypy"} & names["test"]
    assert names["fuzz"] == {"atheris"}
    assert {"pytest", "build", "schemathesis"} <= names["test"]
    # the persistence module's one dependency; the tests run the library's test cases
    assert names["eventsourcing"] == {"eventsourcing"} and "eventsourcing" in names["test"]


def test_constraints_pin_every_runtime_dependency_and_the_build_tools() -> None:
    pinned = pins()
    runtime = PYPROJECT["project"]["dependencies"]
    build = [*PYPROJECT["build-system"]["requires"], "pip"]
    for requirement in [*closure(runtime), *closure(build)]:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} has no pin in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, which {requirement} refuses"
        )


def test_the_dockerfile_installs_only_pinned_versions() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    dockerfile = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    # One logical line per instruction: join backslash continuations, then split on &&.
    commands = [c.strip() for c in re.sub(r"\\\n", " ", dockerfile).replace("&&", "\n").splitlines()]
    installs = [c for c in commands if re.search(r"\bpip install\b", c)]
    assert installs, "the Dockerfile installs nothing?"
    for command in installs:
        assert "-c constraints.txt" in command, f"unpinned: {command}"
        assert "--no-build-isolation" in command or "." not in command.split(), (
            f"building from source in an isolated env would fetch unpinned build tools: {command}"
        )
    # Every file the build reads is copied in, and the allow-list of the context admits it.
    copied = " ".join(c for c in commands if c.startswith("COPY") and "--from" not in c)
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    for needed in ("constraints.txt", "setup.py", "pyproject.toml", "MANIFEST.in", PYPROJECT["project"]["readme"]):
        assert needed in copied.split(), f"the Dockerfile does not COPY {needed}"
        assert needed in allowed, f".dockerignore keeps {needed} out of the build context"
    for folder in ("native", "walstore"):
        assert folder in allowed


def test_py_typed_ships_in_the_package() -> None:
    assert (REPO / "walstore" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["walstore"]


# ------------------------------------------------------------------ build, install, serve


def _pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], capture_output=True, text=True
    )
    assert done.returncode == 0, f"pip {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"


def wheelhouse() -> Path:
    """A directory with a wheel of every pinned package (filled from PyPI the first time)."""
    path = Path(os.environ.get("WALSTORE_WHEELHOUSE", REPO / ".venv" / "wheelhouse"))
    path.mkdir(parents=True, exist_ok=True)
    have = set()
    for wheel in path.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        have.add((name, version))
    missing = [f"{name}=={version}" for name, version in pins().items() if (name, version) not in have]
    if missing:
        _pip("wheel", "--no-deps", "-w", str(path), *missing)
    return path


def fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def install(python: Path, artifact: Path, wheels: Path) -> None:
    _pip(
        "--python", str(python), "install", "--no-index", "--find-links", str(wheels),
        "-c", str(CONSTRAINTS), str(artifact),
    )  # fmt: skip


def installed(python: Path) -> dict[str, Version]:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "list", "--format=freeze", "--exclude", "walstore"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    out: dict[str, Version] = {}
    for line in listing.splitlines():
        name, _, version = line.partition("==")
        out[canonicalize_name(name)] = Version(version)
    return out


def smoke(venv: Path, workdir: Path) -> None:
    """Serve, append, read with the installed ``walstore`` script, far from any source tree;
    then append and read with the installed ``walstore.client.Client``."""
    python = venv / "bin" / "python"
    where = subprocess.run(
        [str(python), "-c", "import walstore, walstore._native as n; print(walstore.__file__); print(n.module_path())"],
        cwd=workdir,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    payload = {"name": "Jo", "n": 1, "note": "é"}
    with ServedNode([str(venv / "bin" / "walstore"), "serve"], workdir) as node:
        with WalstoreClient(node.url) as client:
            written = client.append({"type": "Smoke", "aggregate_id": "pkg", "payload": payload})
            assert (written["index"], written["version"]) == (1, 1)
            read = client.read("pkg")
            # package data ships too: the API description served from inside the package
            assert client.request("GET", "/openapi.json").body["openapi"].startswith("3.1.")
        # The installed package's own Client (httpx and anyio came with the pinned install).
        code = (
            "import sys; from walstore.client import Client; c = Client(sys.argv[1]);"
            "print(c.append('pkg', 'Smoke', {'n': 2}).version, [e.version for e in c.read_aggregate('pkg')])"
        )
        installed = subprocess.run(
            [str(python), "-c", code, node.url], cwd=workdir, capture_output=True, text=True, timeout=60, check=False
        )
        assert installed.returncode == 0, installed.stderr
        assert installed.stdout.split("\n")[0] == "2 [1, 2]"
        assert node.stop() == 0, node.log_path.read_text()
    assert read["count"] == 1  # read before the installed Client appended the second
    assert read["events"][0]["payload"] == payload
    assert read["events"][0]["id"] == written["event_id"]


@pytest.mark.slow
def test_sdist_and_wheel_each_install_in_a_fresh_venv_and_serve(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCES)
    dist = tmp_path / "dist"
    # No --sdist/--wheel: build makes the sdist, then the wheel from the unpacked sdist, so
    # the wheel proves the sdist is complete. --no-isolation: this venv has the build tools.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
    )
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    assert parse_sdist_filename(sdist.name) == ("walstore", Version(walstore.__version__))
    assert parse_wheel_filename(wheel.name)[:2] == ("walstore", Version(walstore.__version__))

    with tarfile.open(sdist) as archive:
        members = {m.split("/", 1)[1] for m in archive.getnames() if "/" in m}
    assert {"native/build_native.py", "native/walstore_native.c", "native/walstore_native.h"} <= members
    assert {"walstore/py.typed", "walstore/http/openapi.json", "setup.py", "pyproject.toml", "README.md"} <= members
    assert not [m for m in members if m.endswith((".so", ".o")) or "_walstore_native.c" in m]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"walstore/py.typed", "walstore/http/openapi.json"} <= names
    assert [n for n in names if re.fullmatch(r"walstore/_walstore_native\..*so", n)]

    wheels = wheelhouse()
    pinned = pins()
    for artifact in (wheel, sdist):
        venv = tmp_path / f"venv-{artifact.suffix.lstrip('.')}"
        python = fresh_venv(venv)
        install(python, artifact, wheels)  # the sdist compiles native/ in an isolated build env
        for name, version in installed(python).items():
            assert pinned.get(name) == version, f"{name}=={version} installed, constraints.txt has {pinned.get(name)}"
        workdir = tmp_path / f"run-{artifact.suffix.lstrip('.')}"
        workdir.mkdir()
        smoke(venv, workdir)
