"""A sans-IO HTTP/1.1 request parser: bytes in, request heads and whole bodies out.

It replaces h11 on the server's hot path. h11 is correct and general (both roles, every
framing, an event per chunk) and cost ~30 % of a small request's CPU; this parser does
one thing, a server reading requests. A typical head (request line and 4 headers, CRLF
line ends) is checked by one ``translate()`` over the whole head and then costs a
partition per header line. Parsing such a GET or a small POST, body included, measured
7-8 us against h11's 48-55 us (timeit on the shared 2-core development machine).

It has no networking: ``feed(bytes)``, then ``next_head()`` and ``next_body()``;
``server.py`` drives it from trio sockets.

What it accepts follows h11 (``_abnf.py``, ``_readers.py``, ``_headers.py``), which the
tests use as an oracle:

- request line ``method SP target SP HTTP/d.d``: the method a token, the target visible
  ASCII; a version other than 1.0 and 1.1 is 505.
- header lines ``name ":" OWS value OWS``: the name a token (no space before the colon),
  optional whitespace around the value stripped. Lines end in CRLF or a bare LF.
- HTTP/1.1 needs exactly one Host; HTTP/1.0 at most one.
- ``Content-Length``: digits only (at most 20), repeated values must agree (a comma list
  of equal values counts as one). ``Transfer-Encoding``: only ``chunked`` (else 501).
  A POST, PUT or PATCH with neither is 411 (h11 takes it as an empty body).
- Chunked bodies: chunk-size lines and chunk data end in CRLF; chunk extensions are
  ignored (bounded by ``MAX_CHUNK_LINE_BYTES``); trailers are checked like headers,
  bounded by ``max_header_bytes`` and dropped.

Where it is stricter than h11, on purpose (RFC 9112 lets a server refuse each with 400):
control characters other than HTAB in header values (h11 lets most through); obsolete
line folding (h11 joins folded lines; we refuse them); ``Transfer-Encoding`` together with
``Content-Length`` and ``Transfer-Encoding`` in an HTTP/1.0 request (the ambiguities that
request smuggling lives on).

Limits: a head (request line, headers and the blank line) over ``max_header_bytes`` is
431, whether it is complete or still arriving. A body over ``max_body_bytes`` (or, for a
POST to a path in ``large_bodies``, that path's own limit: 413 ``batch_too_large``) is 413: a
``Content-Length`` over the limit is refused from the head alone, a chunked body as soon
as a chunk-size line takes it over, before the chunk's data is read. Nothing is buffered
beyond a bounded head, one bounded chunk line and a body under the limit.

Every error is an ``HttpParseError`` carrying the status to answer; after one, the
connection is unusable (the server answers and closes). Arbitrary bytes raise nothing else.
"""

from __future__ import annotations

import re
from typing import Final

from walstore.errors import RequestError

# A chunk-size line with extensions: real clients send none; 4 KiB is generous and keeps a
# client from making us buffer an endless line.
MAX_CHUNK_LINE_BYTES: Final = 4096
# h11's CONTENT_LENGTH_MAX_DIGITS: up to 10^20 - 1, well past any limit, and int() of it is cheap.
MAX_CONTENT_LENGTH_DIGITS: Final = 20

_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
# RFC 9110 field-vchar: VCHAR / obs-text. No CTLs (h11 allows most; we don't).
_FIELD_VCHAR: Final = rb"[\x21-\x7e\x80-\xff]"
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\r?")
_HEADER_LINE: Final = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*((?:" + _FIELD_VCHAR + rb"+(?:[ \t]+" + _FIELD_VCHAR + rb"+)*)?)[ \t]*\r?"
)
# What translate(None, ...) deletes: a head (fast path) and a header name must be empty after it.
_HEAD_BYTES: Final = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100)) + b" \t\r\n"
_TOKEN_BYTES: Final = b"-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_BLANK_LINE: Final = re.compile(rb"\n\r?\n")
# h11's chunk_header; the extension limited to visible characters, SP and HTAB.
_CHUNK_LINE: Final = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[\t\x20-\x7e\x80-\xff]*)?[ \t]*")

# Header names seen before, as sent -> lowercased (valid tokens only): a dict hit replaces
# a token check and a lower() per header (~0.1 us each). Bounded, so junk names cannot
# grow it; a name not cached is only slower.
MAX_CACHED_NAMES: Final = 512
_NAMES: dict[bytes, bytes] = {}
# Interned method names: decoding the same few bytes on every request is wasted work.
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}
# Header names the parser acts on; every other header is only collected.
_HOST: Final = b"host"
_CONTENT_LENGTH: Final = b"content-length"
# Methods whose requests carry a body: without Content-Length or chunked framing, 411.
_BODY_METHODS: Final = frozenset(("POST", "PUT", "PATCH"))
_TRANSFER_ENCODING: Final = b"transfer-encoding"
_CONNECTION: Final = b"connection"
_EXPECT: Final = b"expect"
_CONTENT_TYPE: Final = b"content-type"
_SPECIAL: Final = frozenset((_HOST, _CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _EXPECT, _CONTENT_TYPE))

# Parser states.
_HEAD: Final = 0  # between requests: waiting for a head
_LENGTH_BODY: Final = 1  # Content-Length body: _remaining bytes to come
_CHUNK_SIZE: Final = 2  # chunked: a chunk-size line next
_CHUNK_DATA: Final = 3  # chunked: _remaining bytes of chunk data to come
_CHUNK_END: Final = 4  # chunked: the CRLF after chunk data
_TRAILERS: Final = 5  # chunked: trailer lines up to a blank line


class HttpParseError(RequestError):
    """The request is malformed or over a limit: answer ``status`` and close.

    ``code`` is the JSON error code of the answer; ``limit`` the byte limit exceeded
    (413, 431). A RequestError like every other client error, with the status per
    instance: one parser raises 400, 413, 431, 501 and 505."""

    def __init__(self, status: int, code: str, message: str, *, limit: int | None = None) -> None:
        if limit is None:
            super().__init__(message, code=code)
        else:
            super().__init__(message, code=code, limit=limit)
        self.http_status = status
        self.status = status
        self.limit = limit


def _bad(message: str) -> HttpParseError:
    return HttpParseError(400, "bad_http_request", message)


class RequestHead:
    """The request line and headers. Header names are lowercase bytes, values as sent
    (without surrounding whitespace). ``content_length`` is 0 for a chunked body."""

    __slots__ = (
        "chunked",
        "content_length",
        "content_type",
        "expect_continue",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        http_version: bytes,
        headers: list[tuple[bytes, bytes]],
        content_length: int,
        chunked: bool,
        keep_alive: bool,
        expect_continue: bool,
        content_type: str | None,
    ) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.content_type = content_type

    def __repr__(self) -> str:
        return f"RequestHead({self.method} {self.target!r} HTTP/{self.http_version.decode()}, {self.headers!r})"


def _split_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Header or trailer lines (each without its LF, maybe with its CR) as (lowercase
    name, value) pairs, checked one by one against h11's grammar."""
    fields: list[tuple[bytes, bytes]] = []
    for raw in lines:
        field = _HEADER_LINE.fullmatch(raw)
        if field is None:
            if raw[:1] in (b" ", b"\t"):
                raise _bad("obsolete line folding is not supported")
            raise _bad(f"illegal header line: {raw[:100]!r}")
        name, value = field.groups()
        fields.append((name.lower(), value))
    return fields


def _comma_values(value: bytes) -> list[bytes]:
    """h11's get_comma_header for one value: lowercased, split, stripped, empties dropped."""
    return [item for item in (part.strip(b" \t") for part in value.lower().split(b",")) if item]


def _content_length(value: bytes, seen: bytes | None) -> bytes:
    parts = {part.strip(b" \t") for part in value.split(b",")} if b"," in value else {value}
    if len(parts) != 1:
        raise _bad("conflicting Content-Length values")
    length = parts.pop()
    if not length.isdigit() or len(length) > MAX_CONTENT_LENGTH_DIGITS:
        raise _bad(f"bad Content-Length: {value[:40]!r}")
    if seen is not None and seen != length:
        raise _bad("conflicting Content-Length headers")
    return length


class RequestParser:
    """Parses the requests of one connection, pipelined ones included.

    ``feed()`` what the socket gave; ``next_head()`` until it returns a head (None: feed
    more); then ``next_body()`` until it returns the body (None: feed more). After an
    ``HttpParseError`` the parser must not be used again.
    """

    __slots__ = (
        "_body_size",
        "_buf",
        "_limit",
        "_parts",
        "_pos",
        "_remaining",
        "_scan",
        "_state",
        "large_bodies",
        "max_body_bytes",
        "max_header_bytes",
    )

    def __init__(
        self, max_header_bytes: int, max_body_bytes: int, large_bodies: dict[bytes, int] | None = None
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        # POST targets (path, no query) with a body limit of their own: /events/batch
        self.large_bodies = large_bodies or {}
        self._limit = max_body_bytes  # the current request's body limit
        # Unconsumed input is _buf[_pos:]. The common case, a whole request in one read,
        # keeps the bytes object the socket gave: no copy until the head is sliced.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        # where the search for the blank line (or a chunk line's end) resumes: a head
        # dribbled byte by byte is scanned once, not once per byte
        self._scan = 0
        self._state = _HEAD
        self._remaining = 0  # body or chunk bytes still to come
        self._body_size = 0  # body bytes declared so far (chunked)
        self._parts: list[bytes] = []

    @property
    def has_buffered(self) -> bool:
        """Bytes are waiting that no head or body has consumed yet (a pipelined request)."""
        return self._pos < len(self._buf)

    @property
    def body_started(self) -> bool:
        """Some of the current request's body (framing included) has arrived: a client
        that sent ``Expect: 100-continue`` and then its body needs no 100."""
        return self._state != _HEAD and (self._pos < len(self._buf) or bool(self._parts) or self._body_size > 0)

    def feed(self, data: bytes) -> None:
        if not data:
            return
        buf = self._buf
        if self._pos >= len(buf):
            self._buf = data
            self._pos = 0
            self._scan = 0
            return
        if isinstance(buf, bytes):
            buf = bytearray(memoryview(buf)[self._pos :])
        elif self._pos:
            del buf[: self._pos]
        self._scan -= self._pos
        self._pos = 0
        buf += data
        self._buf = buf

    def feed_eof(self) -> None:
        """The client closed its side: fine between requests, an error inside one."""
        if self._state != _HEAD:
            raise _bad("connection closed inside the request body")
        if self._pos < len(self._buf):
            raise _bad("connection closed inside the request head")

    # ------------------------------------------------------------------ heads

    def next_head(self) -> RequestHead | None:
        """The next request's head, or None when it has not arrived whole yet."""
        if self._state != _HEAD:
            raise RuntimeError("next_head() before the previous request's body was read")
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            return None
        if buf[pos] < 0x21:
            # h11's "obviously invalid request line": also catches the empty line that
            # would otherwise end a head with no request line in it.
            raise _bad("illegal request line")
        match = _BLANK_LINE.search(buf, max(pos, self._scan))
        limit = self.max_header_bytes
        if match is None:
            if len(buf) - pos > limit:
                raise self._head_too_large()
            self._scan = max(pos, len(buf) - 2)
            return None
        end = match.end()
        if end - pos > limit:
            raise self._head_too_large()
        head = buf if pos == 0 and end == len(buf) and type(buf) is bytes else bytes(buf[pos:end])
        if end == len(buf):
            # All consumed: drop the read buffer (up to 64 KiB) now, not at the next read,
            # which on an idle keep-alive connection may be a minute away.
            self._buf = b""
            end = 0
        self._pos = self._scan = end
        return self._parse_head(head)

    def _head_too_large(self) -> HttpParseError:
        limit = self.max_header_bytes
        return HttpParseError(431, "headers_too_large", f"request head over the {limit}-byte limit", limit=limit)

    def _parse_head(self, head: bytes) -> RequestHead:
        # Fast path, for heads whose every line ends in CRLF and that hold no control
        # characters but HTAB: then one translate() has checked every value, and a line
        # needs only a partition and a token check of its name (measured 2x faster than a
        # regex per line). Anything else takes the regex path, which also finds the error.
        crlf = head.count(b"\r\n")
        fast = head.count(b"\n") == crlf and head.count(b"\r") == crlf and not head.translate(None, _HEAD_BYTES)
        lines = head.split(b"\r\n" if fast else b"\n")
        line = _REQUEST_LINE.fullmatch(lines[0])
        if line is None:
            raise _bad(f"illegal request line: {lines[0][:100]!r}")
        raw_method, target, version = line.groups()
        if version != b"1.1" and version != b"1.0":
            raise HttpParseError(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
        http11 = version == b"1.1"
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        # The last two lines are the blank line's pieces.
        fields: list[tuple[bytes, bytes]] = []
        if fast:
            names = _NAMES
            for raw in lines[1:-2]:
                name, colon, value = raw.partition(b":")
                lower = names.get(name)
                if lower is None or not colon:
                    if not colon or not name or name.translate(None, _TOKEN_BYTES):
                        fields = _split_fields(lines[1:-2])  # raises the precise error
                        break
                    lower = name.lower()
                    if len(names) < MAX_CACHED_NAMES:
                        names[name] = lower
                fields.append((lower, value.strip(b" \t")))
        else:
            fields = _split_fields(lines[1:-2])

        hosts = 0
        length: bytes | None = None
        chunked = False
        keep_alive = http11
        expect_continue = False
        content_type: str | None = None
        for name, value in fields:
            if name not in _SPECIAL:
                continue
            if name == _CONTENT_TYPE:
                content_type = value.decode("latin-1")
            elif name == _HOST:
                hosts += 1
            elif name == _CONNECTION:
                if b"close" in value.lower() and b"close" in _comma_values(value):
                    keep_alive = False
            elif name == _CONTENT_LENGTH:
                length = _content_length(value, length)
            elif name == _TRANSFER_ENCODING:
                if chunked:
                    raise HttpParseError(501, "bad_http_request", "multiple Transfer-Encoding headers")
                if value.lower() != b"chunked":
                    raise HttpParseError(
                        501, "bad_http_request", f"unsupported Transfer-Encoding {value[:40]!r}: only chunked"
                    )
                chunked = True
            elif http11 and b"100-continue" in _comma_values(value):  # expect (ignored in 1.0)
                expect_continue = True
        if hosts != 1 and (hosts > 1 or http11):
            raise _bad("an HTTP/1.1 request needs exactly one Host header" if http11 else "more than one Host header")

        content_length = 0
        self._limit = self.max_body_bytes
        if self.large_bodies and method == "POST":
            limit = self.large_bodies.get(target.partition(b"?")[0])
            if limit is not None:
                self._limit = limit
        if chunked:
            if length is not None:
                raise _bad("both Transfer-Encoding and Content-Length")
            if not http11:
                raise _bad("Transfer-Encoding in an HTTP/1.0 request")
            self._state = _CHUNK_SIZE
            self._body_size = 0
        elif length is not None:
            content_length = int(length)
            if content_length > self._limit:
                raise self._body_too_large(content_length)
            if content_length:
                self._state = _LENGTH_BODY
                self._remaining = content_length
        elif method in _BODY_METHODS:
            # RFC 9112 reads no framing as "no body", but a client that sent one anyway
            # would have it taken for the next request; and an event store never wants
            # an empty write. 411 says what is missing (RFC 9110 15.5.12).
            raise HttpParseError(
                411, "length_required", f"a {method} request needs Content-Length or Transfer-Encoding: chunked"
            )
        return RequestHead(
            method, target, version, fields, content_length, chunked, keep_alive, expect_continue, content_type
        )

    def _body_too_large(self, size: int) -> HttpParseError:
        limit = self._limit
        if limit != self.max_body_bytes:  # a large-body target's own limit: a batch
            return HttpParseError(
                413, "batch_too_large", f"a batch body of {size}+ bytes is over the {limit}-byte limit", limit=limit
            )
        return HttpParseError(
            413, "payload_too_large", f"request body of {size}+ bytes is over the {limit}-byte limit", limit=limit
        )

    # ------------------------------------------------------------------ bodies

    def next_body(self) -> bytes | None:
        """The whole body of the request whose head was returned last (b"" when it has
        none), or None when more must be fed."""
        state = self._state
        if state == _HEAD:
            return b""
        if state == _LENGTH_BODY:
            buf = self._buf
            pos = self._pos
            remaining = self._remaining
            available = len(buf) - pos
            if available >= remaining and not self._parts:
                # the common case: the body came with its head
                end = pos + remaining
                self._state = _HEAD
                body = buf[pos:end]
                if end == len(buf):
                    self._buf = b""
                    end = 0
                self._pos = self._scan = end
                return body if type(body) is bytes else bytes(body)
            take = min(available, remaining)
            if take:
                self._parts.append(bytes(buf[pos : pos + take]))
                self._pos = pos + take
                self._remaining = remaining = remaining - take
            if remaining:
                return None
            return self._finish_body()
        return self._next_chunked()

    def next_body_piece(self) -> tuple[bytes, bool]:
        """Streaming instead of ``next_body``: the body bytes that came since the last call
        (perhaps b"") and whether that was the end of the body. Nothing of the body is kept
        here once returned: a large batch is parsed as it arrives, not buffered whole."""
        body = self.next_body()
        if body is not None:
            return body, True
        parts = self._parts
        if not parts:
            return b"", False
        self._parts = []
        return (parts[0] if len(parts) == 1 else b"".join(parts)), False

    def _finish_body(self) -> bytes:
        if self._pos == len(self._buf):
            self._buf = b""
            self._pos = self._scan = 0
        parts = self._parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._parts = []
        self._state = _HEAD
        return body

    def _next_chunked(self) -> bytes | None:
        buf = self._buf
        while True:
            pos = self._pos
            available = len(buf) - pos
            state = self._state
            if state == _CHUNK_DATA:
                take = min(available, self._remaining)
                if take:
                    self._parts.append(bytes(buf[pos : pos + take]))
                    self._pos = pos + take
                    self._remaining -= take
                if self._remaining:
                    return None
                self._state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n", max(pos, self._scan))
                if end < 0:
                    if available > MAX_CHUNK_LINE_BYTES:
                        raise _bad(f"chunk-size line over {MAX_CHUNK_LINE_BYTES} bytes")
                    self._scan = max(pos, len(buf) - 1)
                    return None
                if end - pos > MAX_CHUNK_LINE_BYTES:
                    raise _bad(f"chunk-size line over {MAX_CHUNK_LINE_BYTES} bytes")
                line = _CHUNK_LINE.fullmatch(buf, pos, end)
                if line is None:
                    raise _bad(f"illegal chunk-size line: {bytes(buf[pos : min(end, pos + 40)])!r}")
                size = int(line.group(1), 16)
                self._pos = self._scan = end + 2
                self._body_size += size
                if self._body_size > self._limit:
                    raise self._body_too_large(self._body_size)
                if size:
                    self._state = _CHUNK_DATA
                    self._remaining = size
                else:
                    self._state = _TRAILERS
            elif state == _CHUNK_END:
                if available < 2:
                    if available and buf[pos] != 0x0D:
                        raise _bad("chunk data not followed by CRLF")
                    return None
                if buf[pos : pos + 2] != b"\r\n":
                    raise _bad("chunk data not followed by CRLF")
                self._pos = self._scan = pos + 2
                self._state = _CHUNK_SIZE
            else:  # _TRAILERS
                return self._read_trailers(buf, pos, available)

    def _read_trailers(self, buf: bytes | bytearray, pos: int, available: int) -> bytes | None:
        if not available:
            return None
        first = buf[pos]
        if first == 0x0A or (first == 0x0D and available >= 2 and buf[pos + 1] == 0x0A):
            self._pos = self._scan = pos + (1 if first == 0x0A else 2)
            return self._finish_body()
        if first == 0x0D:
            if available < 2:
                return None
            raise _bad("malformed trailer section")
        match = _BLANK_LINE.search(buf, max(pos, self._scan))
        if match is None:
            if available > self.max_header_bytes:
                raise self._trailers_too_large()
            self._scan = max(pos, len(buf) - 2)
            return None
        end = match.end()
        if end - pos > self.max_header_bytes:
            raise self._trailers_too_large()
        _split_fields(bytes(buf[pos:end]).split(b"\n")[:-2])
        self._pos = self._scan = end
        return self._finish_body()

    def _trailers_too_large(self) -> HttpParseError:
        limit = self.max_header_bytes
        return HttpParseError(431, "headers_too_large", f"trailers over the {limit}-byte limit", limit=limit)
