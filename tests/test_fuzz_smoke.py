"""The atheris harness runs, and the frames target holds its contract on chosen inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from walstore.fuzz import load
from walstore.protocol import PROTOCOL_VERSION, Append, Hello, encode_frame, encode_message


@pytest.mark.slow
def test_frames_target_fuzzes_for_three_seconds_and_exits_zero(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "walstore.fuzz", "--seconds", "3", "--target", "frames", "--artifacts", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("frames: ok ("), result.stdout
    assert "runs in" in result.stdout
    assert not list(tmp_path.glob("frames-crash-*"))


def test_bad_arguments_exit_two() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "walstore.fuzz", "--seconds", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--seconds must be at least 1" in result.stderr


HELLO = encode_message(Hello(PROTOCOL_VERSION, "fuzz", "peer", 1))
APPEND = encode_message(Append(1, 0, 0, 0, b"records"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x00" + HELLO + APPEND,  # raw into a client connection
        b"\x30" + HELLO + APPEND,  # raw into an open server connection (HELLO prefixed twice)
        b"\x10" + HELLO + APPEND[:-1],  # server, EOF mid-frame
        b"\x01" + bytes([0x04]) + APPEND[16:],  # a valid APPEND payload behind a valid frame
        b"\x01" + bytes([0x05]) + b"\x02" * 41,  # APPEND_ACK with a bad bool
        b"\x01\xff",  # unknown type
        b"\x02" + APPEND + APPEND + b"WS",  # frames straight into a decoder
        b"\x02" + encode_frame(0xEE, 0x80, b"any type and flags decode as frames"),
        b"\x02" + (2**32 - 1).to_bytes(4, "little") * 8,
    ],
)
def test_frames_target_accepts_hand_picked_inputs(data: bytes) -> None:
    load("frames")(data)  # raises only if the protocol breaks its contract


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x80POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x81POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nT: 1\r\n\r\n",
        b"\x82POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n",  # over the 256-byte body limit
        b"\x00GET / HTTP/2.0\r\n\r\n",
        b"\x83" + b"A" * 2000,  # a head that never ends
        b"\x00\xff\xfe\r\n\r\n",
    ],
)
def test_http_parser_target_accepts_hand_picked_inputs(data: bytes) -> None:
    load("http_parser")(data)  # raises only if the parser breaks its contract


def test_http_parser_target_catches_a_parser_that_breaks_its_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    from walstore.http import parser

    def broken_feed(self: parser.RequestParser, data: bytes) -> None:
        raise IndexError("a parser bug")

    monkeypatch.setattr(parser.RequestParser, "feed", broken_feed)
    with pytest.raises(IndexError):
        load("http_parser")(b"\x00GET / HTTP/1.1\r\n\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" + b'{"events":[{"type":"T","aggregate_id":"a","payload":{"n":1.10}}]}',
        b"\x03" + b'{"events":[],"tracking":{"consumer":"c","position":2}}',
        b"\x01" + b'{"events":[{"type":"T","aggregate_id":"a","payload":{"k":1,"k":2}}]}',
        b"\x02" + b'{"events":[{"type":"T","aggregate_id":"a","payload":{}}]} trailing',
        b"\x00\xff\xfe",
    ],
)
def test_http_batch_target_accepts_hand_picked_inputs(data: bytes) -> None:
    load("http_batch")(data)  # raises only if the streaming parser breaks its contract


def test_http_batch_target_catches_a_stream_that_differs_from_the_whole_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from walstore.http import validation

    real = validation.batch_event

    def respelling(value: object, sent: bytes, index: int) -> object:
        event = real(value, sent, index)
        return replace(event, payload=event.payload.replace(b"1.10", b"1.1"))

    monkeypatch.setattr("walstore.http.batch_stream.batch_event", respelling)
    with pytest.raises(AssertionError):
        load("http_batch")(b"\x00" + b'{"events":[{"type":"T","aggregate_id":"a","payload":{"n":1.10}}]}')


def test_artifacts_default_to_a_new_private_temp_directory(tmp_path: Path) -> None:
    from walstore.fuzz.__main__ import artifacts_dir

    first, second = artifacts_dir(None), artifacts_dir(None)
    try:
        assert first != second  # never a fixed path two runs share
        for path in (first, second):
            assert Path(path).is_dir()
            assert Path(path).parent == Path(tempfile.gettempdir())
            assert Path(path).name.startswith("walstore-fuzz-")
            assert Path(path).stat().st_mode & 0o077 == 0  # mkdtemp: only its owner
    finally:
        os.rmdir(first)
        os.rmdir(second)
    asked = tmp_path / "given" / "dir"
    assert artifacts_dir(str(asked)) == str(asked)
    assert asked.is_dir()
