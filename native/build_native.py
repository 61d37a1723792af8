"""Build walstore's C extension, ``walstore._walstore_native`` (cffi, API mode, out of line).

setup.py names ``native/build_native.py:ffibuilder`` in ``cffi_modules``, so
``make build-native`` (an editable pip install) compiles it in place. Every ``native/*.c``
is compiled and every ``native/*.cdef`` is appended to the cdef, so a new C file joins the
build by being dropped next to this one. The cdef of walstore_native itself is the block
between the CDEF markers of walstore_native.h: one declaration, no copy to drift.

A hash of the sources is compiled in (``ws_source_hash()``); walstore/_native.py recomputes
it from a checkout and refuses a stale module. ``source_hash`` here and
``walstore._native._source_hash`` must stay identical (a test compares them).
"""

from __future__ import annotations

import hashlib
import os
import sys

import cffi  # type: ignore[import-untyped]

NATIVE_DIR = os.path.dirname(os.path.abspath(__file__))
MAIN_HEADER = "walstore_native.h"
CDEF_BEGIN = "/* CDEF-BEGIN */"
CDEF_END = "/* CDEF-END */"
_HASHED_SUFFIXES = (".c", ".h", ".cdef")


def hashed_files(native_dir: str) -> list[str]:
    """Names of the files whose bytes decide what the module contains, sorted."""
    return sorted(
        name
        for name in os.listdir(native_dir)
        if not name.startswith(".") and (name.endswith(_HASHED_SUFFIXES) or name == "build_native.py")
    )


def source_hash(native_dir: str) -> str:
    digest = hashlib.sha256()
    for name in hashed_files(native_dir):
        with open(os.path.join(native_dir, name), "rb") as f:
            data = f.read()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def c_sources(native_dir: str) -> list[str]:
    names = sorted(n for n in os.listdir(native_dir) if n.endswith(".c") and not n.startswith("."))
    return [os.path.join(native_dir, n) for n in names]


def cdef_text(native_dir: str) -> str:
    with open(os.path.join(native_dir, MAIN_HEADER), encoding="utf-8") as f:
        header = f.read()
    begin = header.index(CDEF_BEGIN) + len(CDEF_BEGIN)
    parts = [header[begin : header.index(CDEF_END)], "const char *ws_source_hash(void);\n"]
    for name in sorted(n for n in os.listdir(native_dir) if n.endswith(".cdef") and not n.startswith(".")):
        with open(os.path.join(native_dir, name), encoding="utf-8") as f:
            parts.append(f"\n/* {name} */\n{f.read()}\n")
    return "".join(parts)


def _includes(native_dir: str) -> str:
    headers = sorted(n for n in os.listdir(native_dir) if n.endswith(".h") and not n.startswith("."))
    return "".join(f'#include "{h}"\n' for h in headers)


def make_builder(native_dir: str = NATIVE_DIR) -> cffi.FFI:
    builder = cffi.FFI()
    builder.cdef(cdef_text(native_dir))
    prelude = (
        _includes(native_dir)
        + f'static const char WS_SOURCE_HASH[] = "{source_hash(native_dir)}";\n'
        + "const char *ws_source_hash(void) { return WS_SOURCE_HASH; }\n"
    )
    builder.set_source(
        "walstore._walstore_native",
        prelude,
        sources=c_sources(native_dir),
        include_dirs=[native_dir],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    # Standalone build into the current directory, for poking at the C without pip.
    ffibuilder.compile(verbose="-q" not in sys.argv)
