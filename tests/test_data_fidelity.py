"""What a client stored comes back exactly as it was sent: generated JSON documents (big
and negative integers, decimals like 1.10, exponents, unicode and escapes, nesting, key
orders) round-trip through POST and GET, batch and SSE, on a real ``walstore serve``.

The oracle is the standard library parser with hooks that keep every number's text and
every object's key order, applied to what was sent and what came back; and, for documents
sent without whitespace, the exact bytes."""

from __future__ import annotations

import calendar
import http.client
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_single_node_process import Server
from walstore.json_text import fast_object, load_object, stored_text


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = tmp_path_factory.mktemp("fidelity")
    server = Server(root / "data", root / "server.log")
    server.start()
    try:
        yield server.port
    finally:
        server.kill()


def shape(text: str | bytes) -> Any:
    """A JSON value with numbers as ("num", exact text) and objects as ordered pairs."""
    return json.loads(
        text,
        object_pairs_hook=lambda pairs: ("obj", pairs),
        parse_int=lambda s: ("num", s),
        parse_float=lambda s: ("num", s),
    )


# -- generated JSON text -----------------------------------------------------------------

_digits = st.text("0123456789", min_size=1, max_size=30)
_integer = st.one_of(
    st.integers(-(10**40), 10**40).map(str),
    st.sampled_from(["18446744073709551616", "-9223372036854775809", "123456789012345678901234567890", "-0"]),
)
_fraction = st.builds(lambda i, f: f"{i}.{f}", _integer, _digits)  # 1.10 keeps its zero
_exponent = st.builds(
    lambda m, e, s, sign: f"{m}{e}{sign}{s}", st.one_of(_integer, _fraction), st.sampled_from("eE"), _digits.map(
        lambda d: d[:3]
    ), st.sampled_from(["", "+", "-"])
)  # fmt: skip
_number = st.one_of(_integer, _fraction, _exponent, st.just("1e400"))
_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_string = st.builds(lambda s, ascii_only: json.dumps(s, ensure_ascii=ascii_only), _text, st.booleans())
_scalar = st.one_of(_number, _string, st.sampled_from(["true", "false", "null"]))


def _object_text(pairs: list[tuple[str, str]], ws: str) -> str:
    return "{" + f",{ws}".join(f"{json.dumps(k)}:{ws}{v}" for k, v in pairs) + "}"


def _documents(ws: str) -> st.SearchStrategy[str]:
    values = st.recursive(
        _scalar,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(lambda items: "[" + f",{ws}".join(items) + "]"),
            st.lists(st.tuples(_text, inner), max_size=4, unique_by=lambda kv: kv[0]).map(
                lambda pairs: _object_text(pairs, ws)
            ),
        ),
        max_leaves=8,
    )
    return st.lists(st.tuples(_text, values), max_size=5, unique_by=lambda kv: kv[0]).map(
        lambda pairs: _object_text(pairs, ws)
    )


_STYLES = {ws: _documents(ws) for ws in ("", " ", "\n\t ")}


@st.composite
def json_documents(draw: st.DrawFn) -> str:
    """A JSON object's text, compact, json.dumps-spaced or with tabs and newlines (a
    composite, so that hypothesis shows it by this name rather than its whole tree)."""
    return draw(_STYLES[draw(st.sampled_from(list(_STYLES)))])


documents = json_documents()


# -- HTTP in a worker thread (raw bytes back) -------------------------------------------


def _request(port: int, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body.encode() if body is not None else None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _first_sse_data(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        while True:
            line = response.fp.readline()
            if line.startswith(b"data: "):
                return line[len(b"data: ") :].rstrip(b"\n")
    finally:
        conn.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=documents, metadata=documents)
def test_documents_round_trip_exactly_through_post_get_batch_and_sse(port: int, payload: str, metadata: str) -> None:
    aggregate = f"fidelity-{uuid.uuid4().hex}"
    event = f'{{"type":"Doc","aggregate_id":{json.dumps(aggregate)},"payload":{payload},"metadata":{metadata}}}'
    status, created = _request(port, "POST", "/events", event)
    assert status == 201, created
    batch = f'{{"events":[{event.replace("Doc", "Doc2", 1)},{event}]}}'
    status, answer = _request(port, "POST", "/events/batch", batch)
    assert status == 201, answer

    status, read = _request(port, "GET", f"/events/{aggregate}")
    assert status == 200
    events = shape(read)  # the whole answer, with every number's text and key order kept
    pairs = dict(events[1])
    found = pairs["events"]
    assert len(found) == 3
    for item in found:
        fields = dict(item[1])
        assert fields["payload"] == shape(payload)
        assert fields["metadata"] == shape(metadata)
    if not any(c in payload + metadata for c in " \n\t"):
        assert read.count(payload.encode()) >= 3 and read.count(metadata.encode()) >= 3

    first_index = json.loads(created)["index"]
    status, log = _request(port, "GET", f"/events?from_index={first_index}&limit=3")
    assert status == 200
    for item in dict(shape(log)[1])["events"]:
        assert dict(item[1])["payload"] == shape(payload)

    data = _first_sse_data(port, f"/subscribe?from_index={first_index}")
    fields = dict(shape(data)[1])
    assert fields["payload"] == shape(payload) and fields["metadata"] == shape(metadata)


def test_a_repeat_with_another_spelling_of_the_same_value_is_the_same_event(port: int) -> None:
    """Idempotency compares by JSON value: key order and number spelling aside."""
    first = '{"id":"same-1","type":"T","aggregate_id":"idem","payload":{"a":1.10,"b":[1,2]}}'
    again = '{"id":"same-1","type":"T","aggregate_id":"idem","payload":{"b":[1,2],"a":1.1}}'
    other = '{"id":"same-1","type":"T","aggregate_id":"idem","payload":{"b":[1,2],"a":1.2}}'
    status, one = _request(port, "POST", "/events", first)
    assert status == 201
    status, two = _request(port, "POST", "/events", again)
    assert status == 201 and json.loads(two) == json.loads(one)
    status, _ = _request(port, "POST", "/events", other)
    assert status == 409
    status, read = _request(port, "GET", "/events/idem")
    assert b'"payload":{"a":1.10,"b":[1,2]}' in read  # the first text is the one kept


@pytest.mark.parametrize(
    ("body", "code", "key"),
    [
        ('{"type":"T","aggregate_id":"a","aggregate_id":"b","payload":{}}', "duplicate_key", "aggregate_id"),
        ('{"type":"T","aggregate_id":"a","payload":{},"expected_version":0,"expected_version":3}',
         "duplicate_key", "expected_version"),
        ('{"type":"T","aggregate_id":"a","payload":{"x":{"k":1,"k":2}}}', "duplicate_key", "k"),
        ('{"type":"T","aggregate_id":".","payload":{}}', "invalid_field", None),
        ('{"type":"T","aggregate_id":"..","payload":{}}', "invalid_field", None),
    ],
)  # fmt: skip
def test_ambiguous_bodies_are_refused_and_change_nothing(port: int, body: str, code: str, key: str | None) -> None:
    before = json.loads(_request(port, "GET", "/status")[1])["commit_index"]
    status, answer = _request(port, "POST", "/events", body)
    error = json.loads(answer)["error"]
    assert status == 400 and error["code"] == code, answer
    if key is not None:
        assert error["key"] == key and key in error["message"]
    assert json.loads(_request(port, "GET", "/status")[1])["commit_index"] == before


def test_recorded_at_is_rfc3339_with_microseconds(port: int) -> None:
    status, _ = _request(port, "POST", "/events", '{"type":"T","aggregate_id":"t","payload":{}}')
    assert status == 201
    status, read = _request(port, "GET", "/events/t")
    event = json.loads(read)["events"][0]
    date, micros = event["recorded_at"].removesuffix("Z").split(".")
    assert len(micros) == 6 and event["recorded_at"].endswith("Z") and date[10] == "T"
    seconds = calendar.timegm(time.strptime(date, "%Y-%m-%dT%H:%M:%S"))
    assert seconds == event["timestamp"]


@settings(max_examples=300, deadline=None)
@given(doc=documents, spaced_strings=st.booleans())
def test_the_fast_path_stores_exactly_what_the_exact_path_stores(doc: str, spaced_strings: bool) -> None:
    """``fast_object`` may only answer when orjson's encoding is the client's text: then it
    must agree with the exact path byte for byte (strings with ", " and ": " inside them
    included, which the json.dumps-style comparison must not be fooled by)."""
    label = json.dumps("a, b: c" if spaced_strings else "ab")
    body = f'{{"type": {label}, "aggregate_id": "a", "payload": {doc}}}'.encode()
    text, members = load_object(body)
    exact = stored_text(text, members["payload"])
    fast = fast_object(body)
    if fast is not None:
        assert orjson.dumps(fast["payload"]) == exact
        assert fast["type"] == json.loads(label)
    assert shape(exact) == shape(doc)


def test_a_post_without_content_length_is_411_with_a_json_body(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411 ")
    assert json.loads(body)["error"]["code"] == "length_required"
