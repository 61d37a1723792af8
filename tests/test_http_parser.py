"""walstore.http.parser without sockets: every acceptance rule (positive and negative),
input fed whole, byte by byte and in random splits, pipelining, limits, and h11 as the
oracle for valid requests. Arbitrary bytes raise nothing but HttpParseError."""

from __future__ import annotations

import random

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore.http.parser import (
    MAX_CHUNK_LINE_BYTES,
    HttpParseError,
    RequestHead,
    RequestParser,
)

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
POST = (
    b"POST /events?x=1 HTTP/1.1\r\nHost: example.org\r\nContent-Type: application/json\r\n"
    b'Content-Length: 11\r\nX-Trace:  a \t b  \r\n\r\n{"n": 123}\n'
)


def parser(max_header_bytes: int = MAX_HEAD, max_body_bytes: int = MAX_BODY) -> RequestParser:
    return RequestParser(max_header_bytes, max_body_bytes)


def parse_all(pieces: list[bytes], p: RequestParser | None = None) -> list[tuple[RequestHead, bytes]]:
    """Every complete request in ``pieces``, fed one piece at a time."""
    p = p or parser()
    out: list[tuple[RequestHead, bytes]] = []
    head: RequestHead | None = None
    for piece in pieces:
        p.feed(piece)
        while True:
            if head is None:
                head = p.next_head()
                if head is None:
                    break
            body = p.next_body()
            if body is None:
                break
            out.append((head, body))
            head = None
    return out


def parse_one(raw: bytes, **limits: int) -> tuple[RequestHead, bytes]:
    requests = parse_all([raw], parser(**limits))
    assert len(requests) == 1, requests
    return requests[0]


def rejects(raw: bytes, status: int = 400, **limits: int) -> HttpParseError:
    with pytest.raises(HttpParseError) as info:
        parse_all([raw], parser(**limits))
    assert info.value.status == status, info.value
    return info.value


def splits(raw: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randrange(1, 8))))
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]


def summary(requests: list[tuple[RequestHead, bytes]]) -> list[tuple[object, ...]]:
    return [
        (h.method, h.target, h.http_version, h.headers, h.content_length, h.chunked, h.keep_alive, b)
        for h, b in requests
    ]


# ------------------------------------------------------------------ a whole request


def test_a_typical_post_is_parsed() -> None:
    head, body = parse_one(POST)
    assert head.method == "POST"
    assert head.target == b"/events?x=1"
    assert head.http_version == b"1.1"
    assert head.headers == [
        (b"host", b"example.org"),
        (b"content-type", b"application/json"),
        (b"content-length", b"11"),
        (b"x-trace", b"a \t b"),
    ]
    assert (head.content_length, head.chunked, head.keep_alive, head.expect_continue) == (11, False, True, False)
    assert head.content_type == "application/json"
    assert body == b'{"n": 123}\n'


def test_a_get_without_body_has_an_empty_body_at_once() -> None:
    p = parser()
    p.feed(b"GET /health HTTP/1.1\r\nhost: a\r\n\r\n")
    head = p.next_head()
    assert head is not None
    assert (head.method, head.content_length, head.content_type) == ("GET", 0, None)
    assert p.next_body() == b""
    assert not p.has_buffered


@pytest.mark.parametrize("seed", range(20))
def test_byte_by_byte_and_random_splits_give_the_same_result(seed: int) -> None:
    chunked = (
        b"POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nx-t: 1\r\n\r\n"
    )
    raw = POST + b"GET / HTTP/1.0\r\n\r\n" + chunked + POST
    whole = summary(parse_all([raw]))
    assert len(whole) == 4
    assert whole[2][-1] == b"abc0123456789abcdef"
    assert summary(parse_all([bytes([b]) for b in raw])) == whole
    assert summary(parse_all(splits(raw, random.Random(seed)))) == whole


def test_pipelined_requests_stay_buffered_until_asked_for() -> None:
    p = parser()
    p.feed(POST + POST[:20])
    head = p.next_head()
    assert head is not None and p.next_body() == b'{"n": 123}\n'
    assert p.has_buffered
    assert p.next_head() is None  # the second head is incomplete
    p.feed(POST[20:])
    assert p.next_head() is not None and p.next_body() == b'{"n": 123}\n'
    assert not p.has_buffered


def test_bare_lf_line_ends_are_accepted_as_h11_does() -> None:
    head, body = parse_one(b"POST / HTTP/1.1\nHost: a\r\ncontent-length: 2\n\nhi")
    assert head.headers == [(b"host", b"a"), (b"content-length", b"2")]
    assert body == b"hi"


def test_obs_text_and_empty_values_are_accepted() -> None:
    head, _ = parse_one(b"GET / HTTP/1.1\r\nhost: a\r\nx-a: caf\xe9\r\nx-b:\r\nx-c:   \r\n\r\n")
    assert head.headers[1:] == [(b"x-a", b"caf\xe9"), (b"x-b", b""), (b"x-c", b"")]


# ------------------------------------------------------------------ the request line


@pytest.mark.parametrize(
    "line",
    [
        b"GARBAGE",
        b"GET /",
        b"GET  / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b"GET / http/1.1",
        b"G(T / HTTP/1.1",
        b"GET /a b HTTP/1.1",
        b"GET /\x01 HTTP/1.1",
        b"GET /\xff HTTP/1.1",
        b"GET / HTTP/10.1",
        b"GET / HTTP/1",
        b" GET / HTTP/1.1",
    ],
)
def test_bad_request_lines_are_400(line: bytes) -> None:
    error = rejects(line + b"\r\nhost: a\r\n\r\n")
    assert error.code == "bad_http_request"


@pytest.mark.parametrize("version", [b"0.9", b"1.2", b"2.0", b"9.9"])
def test_other_http_versions_are_505(version: bytes) -> None:
    error = rejects(b"GET / HTTP/%s\r\n\r\n" % version, 505)
    assert error.code == "http_version_not_supported"


def test_leading_empty_line_or_whitespace_is_400_before_the_head_is_complete() -> None:
    for start in (b"\r\n", b"\n", b" ", b"\t"):
        p = parser()
        p.feed(start)
        with pytest.raises(HttpParseError) as info:
            p.next_head()
        assert info.value.status == 400


def test_any_token_method_is_parsed() -> None:
    head, _ = parse_one(b"M-SEARCH * HTTP/1.1\r\nhost: a\r\n\r\n")
    assert (head.method, head.target) == ("M-SEARCH", b"*")


# ------------------------------------------------------------------ header lines


@pytest.mark.parametrize(
    "line",
    [
        b"bad header",
        b"name : value",
        b": value",
        b"na(me: value",
        b"x: a\x01b",
        b"x: a\x7fb",
        b"x: a\x00b",
        b"x: a\rb",
        b"x: a\x0bb",
    ],
)
def test_bad_header_lines_are_400(line: bytes) -> None:
    rejects(b"GET / HTTP/1.1\r\nhost: a\r\n" + line + b"\r\n\r\n")


def test_a_line_without_colon_is_400_even_when_it_spells_a_known_name() -> None:
    # Header names are cached after their first use; the cache must not skip the colon check.
    parse_one(b"GET / HTTP/1.1\r\nhost: a\r\nx-known: 1\r\n\r\n")
    rejects(b"GET / HTTP/1.1\r\nhost: a\r\nx-known\r\n\r\n")


def test_obsolete_line_folding_is_refused_with_a_clear_message() -> None:
    error = rejects(b"GET / HTTP/1.1\r\nhost: a\r\nx: one\r\n  two\r\n\r\n")
    assert "folding" in error.message


def test_names_are_lowercased_and_values_trimmed() -> None:
    head, _ = parse_one(b"GET / HTTP/1.1\r\nHOST:a\r\nX-Mixed-Case:\t v \t\r\n\r\n")
    assert head.headers == [(b"host", b"a"), (b"x-mixed-case", b"v")]


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nhost: a\r\nhost: a\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", True),
    ],
)
def test_host_rules(raw: bytes, ok: bool) -> None:
    if ok:
        parse_one(raw)
    else:
        assert "Host" in rejects(raw).message


# ------------------------------------------------------------------ Content-Length


@pytest.mark.parametrize("value", [b"-1", b"+1", b"1.0", b"0x10", b"1 2", b"\xd9\xa1", b"1" * 21])
def test_bad_content_length_is_400(value: bytes) -> None:
    rejects(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: " + value + b"\r\n\r\n")


@pytest.mark.parametrize(
    ("values", "ok"),
    [
        ([b"3", b"3"], True),
        ([b"3, 3"], True),
        ([b"3", b"4"], False),
        ([b"3, 4"], False),
        ([b"3", b"03"], False),  # as h11: equal values, byte for byte
    ],
)
def test_repeated_content_lengths_must_agree(values: list[bytes], ok: bool) -> None:
    raw = b"POST / HTTP/1.1\r\nhost: a\r\n" + b"".join(b"content-length: %s\r\n" % v for v in values) + b"\r\nabc"
    if ok:
        assert parse_one(raw)[1] == b"abc"
    else:
        assert "Content-Length" in rejects(raw).message


def test_content_length_over_the_limit_is_413_from_the_head_alone() -> None:
    p = parser(max_body_bytes=1000)
    p.feed(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1001\r\n\r\n")
    with pytest.raises(HttpParseError) as info:
        p.next_head()
    assert (info.value.status, info.value.code, info.value.limit) == (413, "payload_too_large", 1000)
    _, body = parse_one(
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\n" + b"x" * 1000, max_body_bytes=1000
    )
    assert len(body) == 1000


def test_a_body_arriving_in_pieces_is_joined() -> None:
    p = parser()
    p.feed(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n0123")
    assert p.next_head() is not None
    assert p.body_started
    assert p.next_body() is None
    p.feed(b"456")
    assert p.next_body() is None
    p.feed(b"789GET")
    assert p.next_body() == b"0123456789"
    assert p.has_buffered


# ------------------------------------------------------------------ Transfer-Encoding


@pytest.mark.parametrize(
    "headers",
    [
        b"transfer-encoding: gzip\r\n",
        b"transfer-encoding: gzip, chunked\r\n",
        b"transfer-encoding: chunked, chunked\r\n",
        b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
    ],
)
def test_other_transfer_codings_are_501(headers: bytes) -> None:
    rejects(b"POST / HTTP/1.1\r\nhost: a\r\n" + headers + b"\r\n", 501)


def test_transfer_encoding_with_content_length_is_400() -> None:
    rejects(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n")


def test_transfer_encoding_in_http_1_0_is_400() -> None:
    rejects(b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n")


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"PATCH"])
def test_a_body_method_without_framing_is_411(method: bytes) -> None:
    error = rejects(method + b" /events HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n\r\n", 411)
    assert error.code == "length_required" and "Content-Length" in str(error)
    rejects(method + b" /events HTTP/1.0\r\n\r\n", 411)


def test_framing_that_says_empty_is_not_411() -> None:
    head, body = parse_one(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n")
    assert (head.method, body) == ("POST", b"")
    head, body = parse_one(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
    assert (head.method, body) == ("POST", b"")
    head, body = parse_one(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")  # a GET needs none
    assert body == b""


def chunked_request(body: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\nhost: a\r\nTransfer-Encoding: Chunked\r\n\r\n" + body


def test_chunked_body_is_decoded_ignoring_extensions_and_dropping_trailers() -> None:
    head, body = parse_one(chunked_request(b'A;name="v"\r\n0123456789\r\n1\r\n!\r\n0\r\nx-sum: 1\r\nx-b: 2\r\n\r\n'))
    assert head.chunked and head.content_length == 0
    assert body == b"0123456789!"


def test_empty_chunked_body() -> None:
    assert parse_one(chunked_request(b"0\r\n\r\n"))[1] == b""
    assert parse_one(chunked_request(b"0\r\n\n"))[1] == b""  # the trailer section may end in a bare LF


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\n",
        b"-1\r\n",
        b"123456789012345678901\r\n",
        b"3\r\nabcX\r\n",
        b"3\r\nabc\n0\r\n\r\n",
        b"3 ;x\r\n",
        b"3;\x01\r\n",
        b"0\r\nbad trailer\r\n\r\n",
        b"0\r\n\rX",
    ],
)
def test_malformed_chunked_bodies_are_400(body: bytes) -> None:
    rejects(chunked_request(body))


def test_chunk_line_is_bounded_complete_or_not() -> None:
    endless = chunked_request(b"1;" + b"e" * MAX_CHUNK_LINE_BYTES)
    assert "chunk-size line" in rejects(endless).message
    assert "chunk-size line" in rejects(endless + b"\r\n").message


def test_chunked_body_over_the_limit_is_413_before_the_chunk_data() -> None:
    p = parser(max_body_bytes=1000)
    p.feed(chunked_request(b"258\r\n" + b"x" * 600 + b"\r\n"))
    assert p.next_head() is not None
    assert p.next_body() is None
    p.feed(b"258\r\n")  # 600 more declared: over, although none of it has arrived
    with pytest.raises(HttpParseError) as info:
        p.next_body()
    assert (info.value.status, info.value.limit) == (413, 1000)


def test_trailers_are_bounded_by_the_head_limit() -> None:
    error = rejects(chunked_request(b"0\r\nx: " + b"a" * 300), 431, max_header_bytes=256)
    assert error.code == "headers_too_large"


# ------------------------------------------------------------------ the head limit


def test_incomplete_head_over_the_limit_is_431() -> None:
    p = parser(max_header_bytes=100)
    p.feed(b"GET / HTTP/1.1\r\nx: " + b"a" * 60)
    assert p.next_head() is None
    p.feed(b"a" * 40)
    with pytest.raises(HttpParseError) as info:
        p.next_head()
    assert (info.value.status, info.value.code, info.value.limit) == (431, "headers_too_large", 100)


def test_complete_head_over_the_limit_is_431_and_at_the_limit_is_fine() -> None:
    raw = b"GET / HTTP/1.1\r\nhost: a\r\nx: " + b"a" * 50 + b"\r\n\r\n"
    rejects(raw, 431, max_header_bytes=len(raw) - 1)
    parse_one(raw, max_header_bytes=len(raw))


# ------------------------------------------------------------------ connection semantics


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"1.1", None, True),
        (b"1.1", b"close", False),
        (b"1.1", b"Keep-Alive, CLOSE", False),
        (b"1.1", b"closed", True),
        (b"1.1", b"keep-alive", True),
        (b"1.0", None, False),
        (b"1.0", b"keep-alive", False),  # as h11: HTTP/1.0 keep-alive is not offered
    ],
)
def test_keep_alive(version: bytes, connection: bytes | None, keep_alive: bool) -> None:
    raw = b"GET / HTTP/%s\r\nhost: a\r\n" % version
    if connection is not None:
        raw += b"connection: %s\r\n" % connection
    assert parse_one(raw + b"\r\n")[0].keep_alive is keep_alive


@pytest.mark.parametrize(
    ("version", "expect", "waiting"),
    [(b"1.1", b"100-continue", True), (b"1.1", b"100-Continue", True), (b"1.0", b"100-continue", False)],
)
def test_expect_continue(version: bytes, expect: bytes, waiting: bool) -> None:
    p = parser()
    p.feed(b"POST / HTTP/%s\r\nhost: a\r\ncontent-length: 2\r\nexpect: %s\r\n\r\n" % (version, expect))
    head = p.next_head()
    assert head is not None and head.expect_continue is waiting
    assert not p.body_started
    assert p.next_body() is None


def test_eof_is_an_error_only_inside_a_request() -> None:
    p = parser()
    p.feed_eof()
    p.feed(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET /")
    assert p.next_head() is not None
    with pytest.raises(HttpParseError):
        p.feed_eof()
    q = parser()
    q.feed(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nab")
    assert q.next_head() is not None and q.next_body() is None
    with pytest.raises(HttpParseError):
        q.feed_eof()


# ------------------------------------------------------------------ h11 as the oracle

_TOKEN_CHARS = "-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(_TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
targets = st.binary(min_size=1, max_size=30).map(lambda b: bytes(0x21 + x % 94 for x in b))
field_values = st.lists(
    st.binary(min_size=1, max_size=10).map(lambda b: bytes(0x21 + x % 94 if x < 200 else x for x in b)),
    max_size=3,
).map(b" \t".join)
whitespace = st.sampled_from([b"", b" ", b"\t", b"  "])
reserved = {b"host", b"content-length", b"transfer-encoding", b"connection", b"expect"}


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([b"1.0", b"1.1"]))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    lines = [draw(tokens) + b" " + draw(targets) + b" HTTP/" + version]
    headers = [(b"Host", draw(field_values))] if version == b"1.1" or draw(st.booleans()) else []
    for name, value in draw(st.lists(st.tuples(tokens, field_values), max_size=6)):
        if name.lower() not in reserved:
            headers.append((name, value))
    if draw(st.booleans()):
        headers.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive", b"Upgrade, Close"]))))
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["none", "length", "chunked"] if version == b"1.1" else ["none", "length"]))
    encoded = b""
    if framing == "length" or (framing == "none" and body):
        headers.append((b"Content-Length", b"%d" % len(body)))
        encoded = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    draw(st.randoms()).shuffle(headers)
    lines += [name + b":" + draw(whitespace) + value + draw(whitespace) for name, value in headers]
    return eol.join(lines) + eol + eol + encoded


def h11_parse(raw: bytes) -> tuple[h11.Request, bytes]:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(raw)
    request = connection.next_event()
    assert isinstance(request, h11.Request)
    body = b""
    while True:
        event = connection.next_event()
        if isinstance(event, h11.EndOfMessage):
            return request, body
        assert isinstance(event, h11.Data)
        body += event.data


@settings(max_examples=300, deadline=None)
@given(requests(), st.randoms())
def test_valid_requests_parse_as_h11_parses_them(raw: bytes, rng: random.Random) -> None:
    request, body = h11_parse(raw)
    ours = parse_all(splits(raw, rng) if len(raw) > 1 else [raw])
    assert len(ours) == 1
    head, our_body = ours[0]
    assert head.method.encode() == request.method
    assert head.target == request.target
    assert head.http_version == request.http_version
    assert head.headers == list(request.headers)
    assert our_body == body
    tokens = [t.strip().lower() for name, value in request.headers if name == b"connection" for t in value.split(b",")]
    closes = b"close" in tokens
    assert head.keep_alive is (request.http_version == b"1.1" and not closes)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.randoms())
def test_garbage_raises_only_http_parse_error(raw: bytes, rng: random.Random) -> None:
    try:
        parse_all(splits(raw, rng) if len(raw) > 1 else [raw], parser(max_header_bytes=128, max_body_bytes=64))
    except HttpParseError as error:
        assert error.status in (400, 413, 431, 501, 505)


@settings(max_examples=300, deadline=None)
@given(requests(), st.integers(min_value=0), st.binary(min_size=1, max_size=4), st.randoms())
def test_damaged_requests_raise_only_http_parse_error(raw: bytes, at: int, damage: bytes, rng: random.Random) -> None:
    at %= len(raw)
    damaged = raw[:at] + damage + raw[at + len(damage) :]
    try:
        parse_all(splits(damaged, rng), parser(max_header_bytes=256, max_body_bytes=32))
    except HttpParseError as error:
        assert error.status in (400, 413, 431, 501, 505)
