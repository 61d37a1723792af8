"""Fuzz targets: every boundary that takes bytes from outside, and what it may raise.

Each target is a plain function of one byte string (no atheris needed to call it, so a
test can replay a crash input directly). A target raises only when the code under test
breaks its contract; the contract of each boundary is one error family (docs/architecture.md, "Errors"):

    frames  peer bytes -> PeerConnection / FrameDecoder: only ProtocolError. Whatever
            decodes must encode back to the very same bytes (one encoding per message).
    wal     any bytes -> the native scanner and the record decoder: only WalstoreError;
            every record the C scanner accepts the Python decoder accepts too.
    http    any body -> walstore.http.validation: only RequestError; what it accepts
            is within the event limits.
    http_parser  any bytes -> walstore.http.parser.RequestParser: only HttpParseError,
            fed whole or in pieces (the first byte picks the split); no body over the limit.
    http_batch  any batch body -> walstore.http.batch_stream, fed in pieces (the first byte
            picks the split): only RequestError, and what it accepts is what the
            whole-body parser accepts, event for event.

The first input byte picks a mode (see each target), so one corpus reaches both the
raw-bytes paths and the paths behind a valid CRC, which random bytes alone never pass.

``load(name)`` imports the code under test lazily, so the harness can wrap the import in
``atheris.instrument_imports``; a part that is not there yet raises ImportError, which
the harness reports as an unavailable target.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace

Target = Callable[[bytes], None]

TARGET_NAMES = ("frames", "wal", "http", "http_parser", "http_batch")


def _chunks(data: bytes, seed: int) -> list[bytes]:
    """Split ``data`` into pieces of 1, 6, 11 or 16 bytes, as ``seed`` (0..3) says."""
    size = 1 + 5 * (seed % 4)
    return [data[i : i + size] for i in range(0, len(data), size)]


def _frames_target() -> Target:
    from walstore.errors import ProtocolError
    from walstore.protocol import (
        PROTOCOL_VERSION,
        FrameDecoder,
        Hello,
        Message,
        PeerConnection,
        Signal,
        encode_frame,
        encode_message,
    )

    hello = encode_message(Hello(PROTOCOL_VERSION, "fuzz", "peer", 1))

    def drain(conn: PeerConnection) -> list[Message]:
        out: list[Message] = []
        while not isinstance(event := conn.next_event(), Signal):
            out.append(event)
        return out

    def raw_into_connection(mode: int, data: bytes) -> None:
        conn = PeerConnection("fuzz", "me", "server" if mode & 0x10 else "client")
        if conn.role == "client":
            conn.send(conn.hello())
        if mode & 0x20:
            data = hello + data  # land the garbage on an open connection
        try:
            for chunk in [*_chunks(data, mode >> 2), b""]:
                conn.receive_data(chunk)
                drain(conn)
        except ProtocolError as exc:
            assert exc.reason, "a ProtocolError must say why"

    def payload_behind_a_valid_frame(data: bytes) -> None:
        if not data:
            return
        frame = encode_frame(data[0], 0, data[1:])
        conn = PeerConnection("fuzz", "me", "server")
        conn.receive_data(hello)
        drain(conn)
        conn.send(conn.hello())
        conn.receive_data(frame)
        try:
            for message in drain(conn):
                assert encode_message(message) == frame, f"{message!r} is not canonical"
        except ProtocolError:
            pass

    def raw_into_decoder(data: bytes) -> None:
        decoder = FrameDecoder()
        decoder.feed(data)
        consumed = 0
        try:
            while (frame := decoder.next_frame()) is not None:
                encoded = encode_frame(frame.type, frame.flags, frame.payload)
                assert data[consumed : consumed + len(encoded)] == encoded, "a frame must be its own bytes"
                consumed += len(encoded)
        except ProtocolError:
            return
        assert decoder.buffered_bytes == len(data) - consumed

    def target(data: bytes) -> None:
        if not data:
            return
        # Mode byte: bits 0-1 the path, 2-3 the chunk size, 4 the role, 5 a HELLO first.
        mode, rest = data[0], data[1:]
        if mode & 3 == 1:
            payload_behind_a_valid_frame(rest)
        elif mode & 3 == 2:
            raw_into_decoder(rest)
        else:
            raw_into_connection(mode, rest)

    return target


def _wal_target() -> Target:
    from walstore._native import scan
    from walstore.errors import WalstoreError
    from walstore.wal.record import KIND_EVENT, decode_record, encode_record

    def check(buf: bytes) -> None:
        try:
            result = scan(buf, 0, 1)
        except WalstoreError:
            return
        for i, offset in enumerate(result.offsets):
            record = decode_record(buf, offset)  # the C accepted it: Python must too
            assert record.index == 1 + i, (offset, record.index)
        try:
            decode_record(buf, 0)
        except WalstoreError:
            pass

    def valid_then_damaged(data: bytes) -> bytes:
        # Bodies cut from the input, encoded as a valid log, then one byte changed and
        # the tail cut, both at input-chosen places.
        if len(data) < 3:
            return data
        flip_at, cut, data = data[0] * 7, data[1] * 13, data[2:]
        records = []
        for index, start in enumerate(range(0, len(data), 37), start=1):
            records.append(encode_record(KIND_EVENT, 0, 1, index, data[start : start + 37]))
        log = bytearray(b"".join(records))
        if log and flip_at < len(log):
            log[flip_at] ^= 0x5A
        return bytes(log[: len(log) - cut] if cut < len(log) else log)

    def target(data: bytes) -> None:
        # Mode byte: bit 0 set = build a valid log from the input and damage it.
        if not data:
            return
        if data[0] & 1:
            check(valid_then_damaged(data[1:]))
        else:
            check(data[1:])

    return target


def _http_target() -> Target:
    from walstore.errors import RequestError
    from walstore.event import MAX_AGGREGATE_ID_BYTES, MAX_EVENT_BYTES, MAX_ID_BYTES, MAX_TYPE_BYTES, NewEvent
    from walstore.http.validation import parse_append_request

    # The HTTP layer passes the Content-Type along; accept either shape of the function.
    parse: Callable[..., NewEvent] = parse_append_request
    extra = ("application/json",) if "content_type" in inspect.signature(parse).parameters else ()

    def target(data: bytes) -> None:
        try:
            event = parse(data, *extra)
        except RequestError:
            return
        assert len(event.id.encode()) <= MAX_ID_BYTES
        assert len(event.aggregate_id.encode()) <= MAX_AGGREGATE_ID_BYTES
        assert len(event.type.encode()) <= MAX_TYPE_BYTES
        assert len(event.payload) + len(event.metadata) <= MAX_EVENT_BYTES

    return target


def _http_parser_target() -> Target:
    from walstore.http.parser import HttpParseError, RequestParser

    def target(data: bytes) -> None:
        if not data:
            return
        parser = RequestParser(max_header_bytes=512, max_body_bytes=256)
        in_body = False
        try:
            for piece in _chunks(data[1:], data[0]) if data[0] & 0x80 else [data[1:]]:
                parser.feed(piece)
                while True:
                    if not in_body:
                        if parser.next_head() is None:
                            break
                        in_body = True
                    body = parser.next_body()
                    if body is None:
                        break
                    assert len(body) <= 256, len(body)
                    in_body = False
            parser.feed_eof()
        except HttpParseError as error:
            assert error.status in (400, 413, 431, 501, 505), error.status

    return target


def _http_batch_target() -> Target:
    from walstore.errors import RequestError
    from walstore.http.batch_stream import BatchStreamParser
    from walstore.http.validation import parse_batch_with_tracking

    def target(data: bytes) -> None:
        if not data:
            return
        parser = BatchStreamParser(max_events=16)
        try:
            for piece in _chunks(data[1:], data[0]):
                parser.feed(piece)
            events, tracking = parser.finish()
        except RequestError:
            return
        whole, whole_tracking = parse_batch_with_tracking(data[1:], "application/json", max_events=16)
        assert tracking == whole_tracking
        # ids the client left out are generated anew by each parse: compare the rest
        assert [replace(e, id="") for e in events] == [replace(e, id="") for e in whole]

    return target


_LOADERS: dict[str, Callable[[], Target]] = {
    "frames": _frames_target,
    "wal": _wal_target,
    "http": _http_target,
    "http_parser": _http_parser_target,
    "http_batch": _http_batch_target,
}


def load(name: str) -> Target:
    """The target called ``name``; ImportError if the code it exercises is not there."""
    return _LOADERS[name]()
