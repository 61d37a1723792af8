"""walstore.http.validation: every rule of the request contract, and that nothing but
RequestError ever escapes it (hypothesis, bounded)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore.errors import PayloadTooLarge, RequestError, UnsupportedMedia, ValidationError
from walstore.event import MAX_BATCH_EVENTS, MAX_EVENT_BYTES, MAX_ID_BYTES
from walstore.http.validation import (
    DEFAULT_READ_LIMIT,
    MAX_POSITION,
    MAX_READ_LIMIT,
    check_content_type,
    parse_aggregate_id_segment,
    parse_aggregate_read_query,
    parse_append_request,
    parse_batch_request,
    parse_log_read_query,
    parse_query,
    parse_subscribe_query,
)

JSON = "application/json"
_DROP = object()


def body(**fields: Any) -> bytes:
    event: dict[str, Any] = {"type": "UserCreated", "aggregate_id": "user-1", "payload": {"b": 1, "a": [1, 2]}}
    event.update(fields)
    return orjson.dumps({k: v for k, v in event.items() if v is not _DROP})


# ------------------------------------------------------------------ a valid event


def test_minimal_event_gets_defaults_and_its_payload_as_sent() -> None:
    event = parse_append_request(
        b'{"payload": {"b": 1, "a": {"d": 0, "c": 1}}, "type": "T", "aggregate_id": "a"}', JSON
    )
    assert event.type == "T"
    assert event.aggregate_id == "a"
    assert event.payload == b'{"b":1,"a":{"d":0,"c":1}}'  # as sent, keys in order; only whitespace goes
    assert event.metadata == b"{}"
    assert event.expected_version is None
    assert uuid.UUID(event.id).version == 4


def test_generated_ids_are_distinct_canonical_uuid4_strings() -> None:
    # 600 ids span three refills of the generator's random pool
    ids = [parse_append_request(body(), JSON).id for _ in range(600)]
    assert len(set(ids)) == len(ids)
    for event_id in ids:
        parsed = uuid.UUID(event_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == event_id  # lowercase, dashed: the canonical form


def test_full_event_keeps_every_field() -> None:
    event = parse_append_request(
        body(id="evt-1", metadata={"z": 1, "source": "api"}, expected_version=0), content_type=JSON
    )
    assert event.id == "evt-1"
    assert event.metadata == b'{"z":1,"source":"api"}'
    assert event.expected_version == 0


def test_null_optional_fields_mean_absent() -> None:
    event = parse_append_request(body(id=None, metadata=None, expected_version=None), JSON)
    assert event.metadata == b"{}"
    assert event.expected_version is None
    assert uuid.UUID(event.id)


def test_limits_count_utf8_bytes_not_characters() -> None:
    assert parse_append_request(body(aggregate_id="é" * 128), JSON).aggregate_id == "é" * 128  # 256 bytes
    with pytest.raises(ValidationError) as info:
        parse_append_request(body(aggregate_id="é" * 129), JSON)  # 258 bytes
    assert info.value.details["field"] == "aggregate_id"


def test_format_characters_are_not_control_characters() -> None:
    # A zero-width joiner makes str.isprintable() False, but it is no control character.
    assert parse_append_request(body(type="👩\u200d💻"), JSON).type == "👩\u200d💻"


# ------------------------------------------------------------------ content type


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        'application/json; charset="utf-8"',
        "application/json ; charset=utf8",
    ],
)
def test_json_content_types_are_accepted(content_type: str) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
        "application/json; charset=latin-1",
        "application/json; boundary=x",
        "application/json; charset",
    ],
)
def test_other_content_types_are_415(content_type: str | None) -> None:
    with pytest.raises(UnsupportedMedia) as info:
        parse_append_request(body(), content_type)
    assert info.value.http_status == 415
    assert info.value.code == "unsupported_media_type"


# ------------------------------------------------------------------ bad JSON


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"NaN",
        b'{"type": "T", "aggregate_id": "a", "payload": {"x": NaN}}',
        b'{"type": "T", "aggregate_id": "a", "payload": {"x": Infinity}}',
        b'{"type": "T", "aggregate_id": "a", "payload": {"x": -Infinity}}',
        b'{"type": "\xff", "aggregate_id": "a", "payload": {}}',
        b'{"type": "\xed\xa0\x80", "aggregate_id": "a", "payload": {}}',  # UTF-8-encoded surrogate
        b'{"type": "\\ud800", "aggregate_id": "a", "payload": {}}',
        b'{"type": "\\udc00x", "aggregate_id": "a", "payload": {}}',
        b"[" * 100_000,
        b'{"type": "T", "aggregate_id": "a", "payload": ' + b'{"a":' * 2000 + b"1" + b"}" * 2001,
        b'{"type": "T", "aggregate_id": "a", "payload": {}} trailing',
        b"{'type': 'T'}",
    ],
)
def test_malformed_json_is_400_invalid_json(raw: bytes) -> None:
    with pytest.raises(ValidationError) as info:
        parse_append_request(raw, JSON)
    assert info.value.http_status == 400
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"x"', b"null", b"true"])
def test_non_object_body_is_400_invalid_body(raw: bytes) -> None:
    with pytest.raises(ValidationError) as info:
        parse_append_request(raw, JSON)
    assert info.value.code == "invalid_body"


def test_deep_nesting_is_kept_until_the_parser_limit() -> None:
    payload = b'{"a":' * 300 + b"1" + b"}" * 300  # orjson could not re-encode this (254 levels)
    event = parse_append_request(b'{"type":"T","aggregate_id":"a","payload":' + payload + b"}", JSON)
    assert event.payload == payload
    too_deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    with pytest.raises(ValidationError) as info:
        parse_append_request(b'{"type":"T","aggregate_id":"a","payload":' + too_deep + b"}", JSON)
    assert info.value.code == "invalid_json" and "nested too deeply" in str(info.value)


# ------------------------------------------------------------------ fields


@pytest.mark.parametrize("field", ["type", "aggregate_id", "payload"])
def test_missing_required_field(field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_append_request(body(**{field: _DROP}), JSON)
    assert info.value.code == "missing_field"
    assert info.value.details == {"field": field}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("type", 1),
        ("type", None),
        ("type", ""),
        ("type", "x" * 257),
        ("type", "a\nb"),
        ("aggregate_id", "a/b"),
        ("aggregate_id", ""),
        ("aggregate_id", ["a"]),
        ("aggregate_id", "x" * 257),
        ("aggregate_id", "a\x00"),
        ("aggregate_id", "a\x7f"),
        ("aggregate_id", "a\u0085"),  # C1 control (NEL)
        ("payload", []),
        ("payload", "x"),
        ("payload", 1),
        ("payload", None),
        ("metadata", []),
        ("metadata", "x"),
        ("metadata", 0),
        ("id", ""),
        ("id", 5),
        ("id", "x" * (MAX_ID_BYTES + 1)),
        ("id", "a\tb"),
        ("id", {"a": 1}),
        ("expected_version", -1),
        ("expected_version", True),
        ("expected_version", False),
        ("expected_version", 1.0),
        ("expected_version", "1"),
        ("expected_version", 2**63),
    ],
)
def test_invalid_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        parse_append_request(body(**{field: value}), JSON)
    assert info.value.http_status == 400
    assert info.value.code == "invalid_field"
    assert info.value.details == {"field": field}
    assert field in info.value.message


def test_huge_id_is_rejected_before_encoding() -> None:
    with pytest.raises(ValidationError) as info:
        parse_append_request(body(id="x" * 500_000), JSON)
    assert info.value.details == {"field": "id"}


def test_unknown_field_is_400() -> None:
    with pytest.raises(ValidationError) as info:
        parse_append_request(body(expected_verison=3), JSON)
    assert info.value.code == "unknown_field"
    assert info.value.details == {"field": "expected_verison"}


def test_event_over_max_event_bytes_is_413() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        parse_append_request(body(payload={"x": "a" * MAX_EVENT_BYTES}), JSON)
    assert info.value.http_status == 413
    assert info.value.code == "event_too_large"


# ------------------------------------------------------------------ batches


def batch(*events: dict[str, Any], **top: Any) -> bytes:
    return orjson.dumps({"events": list(events), **top})


def event(**fields: Any) -> dict[str, Any]:
    return {"type": "T", "aggregate_id": "a", "payload": {}, **fields}


def test_batch_across_aggregates_with_own_expected_versions() -> None:
    events = parse_batch_request(
        batch(event(aggregate_id="a", expected_version=0), event(aggregate_id="b", expected_version=4)), JSON
    )
    assert [(e.aggregate_id, e.expected_version) for e in events] == [("a", 0), ("b", 4)]
    assert len({e.id for e in events}) == 2


def test_batch_limits() -> None:
    assert len(parse_batch_request(batch(*[event() for _ in range(MAX_BATCH_EVENTS)]), JSON)) == MAX_BATCH_EVENTS
    with pytest.raises(ValidationError) as info:
        parse_batch_request(batch(*[event() for _ in range(MAX_BATCH_EVENTS + 1)]), JSON)
    assert info.value.code == "too_many_events"
    with pytest.raises(ValidationError) as info:
        parse_batch_request(batch(), JSON)
    assert info.value.code == "empty_batch"


@pytest.mark.parametrize(
    ("raw", "code", "details"),
    [
        (b"{}", "missing_field", {"field": "events"}),
        (b'{"events": {}}', "invalid_field", {"field": "events"}),
        (b'{"events": [], "extra": 1}', "unknown_field", {"field": "extra"}),
        (b'{"events": [1]}', "invalid_field", {"field": "events", "event_index": 0}),
        (
            b'{"events": [{"type":"T","aggregate_id":"a","payload":{}},'
            b' {"type":"T","aggregate_id":"a/b","payload":{}}]}',
            "invalid_field",
            {"field": "aggregate_id", "event_index": 1},
        ),
        (
            b'{"events": [{"type":"T","aggregate_id":"a","payload":{}}, {"type":"T","aggregate_id":"a"}]}',
            "missing_field",
            {"field": "payload", "event_index": 1},
        ),
        (
            b'{"events": [{"type":"T","aggregate_id":"a","payload":{},"x":1}]}',
            "unknown_field",
            {"field": "x", "event_index": 0},
        ),
        (
            b'{"events": [{"type":"T","aggregate_id":"a","payload":{},"id":"e"},'
            b'{"type":"T","aggregate_id":"b","payload":{},"id":"e"}]}',
            "duplicate_id",
            {"field": "id", "event_index": 1},
        ),
    ],
)
def test_bad_batches(raw: bytes, code: str, details: dict[str, object]) -> None:
    with pytest.raises(ValidationError) as info:
        parse_batch_request(raw, JSON)
    assert info.value.code == code
    assert info.value.details == details


def test_batch_checks_content_type() -> None:
    with pytest.raises(UnsupportedMedia):
        parse_batch_request(batch(event()), "text/json")


# ------------------------------------------------------------------ query strings


def test_query_defaults() -> None:
    read = parse_aggregate_read_query(b"")
    assert (read.from_version, read.limit, read.direction, read.min_index) == (1, DEFAULT_READ_LIMIT, "forward", None)
    log = parse_log_read_query(b"")
    assert (log.from_index, log.limit, log.min_index) == (1, DEFAULT_READ_LIMIT, None)
    assert parse_subscribe_query(b"").from_index == 1


def test_backward_without_from_version_starts_at_the_newest() -> None:
    assert parse_aggregate_read_query(b"direction=backward").from_version == MAX_POSITION
    assert parse_aggregate_read_query(b"direction=backward&from_version=7").from_version == 7


def test_query_values() -> None:
    read = parse_aggregate_read_query(b"from_version=3&limit=10000&direction=backward&min_index=0&_=123")
    assert (read.from_version, read.limit, read.direction, read.min_index) == (3, MAX_READ_LIMIT, "backward", 0)
    log = parse_log_read_query("from_index=9&limit=1&min_index=12")
    assert (log.from_index, log.limit, log.min_index) == (9, 1, 12)


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        (b"from_version=0", "from_version"),
        (b"from_version=-1", "from_version"),
        (b"from_version=abc", "from_version"),
        (b"from_version=", "from_version"),
        (b"from_version=1.5", "from_version"),
        (b"from_version=1_0", "from_version"),
        (b"from_version=%2B1", "from_version"),
        (b"from_version=+1", "from_version"),  # "+" decodes to a space
        (b"from_version=%EF%BC%91", "from_version"),  # fullwidth digit one
        (b"from_version=99999999999999999999", "from_version"),
        (b"from_version=9223372036854775808", "from_version"),
        (b"limit=0", "limit"),
        (b"limit=10001", "limit"),
        (b"direction=up", "direction"),
        (b"direction=Forward", "direction"),
        (b"min_index=-1", "min_index"),
        (b"limit=1&limit=2", "limit"),
    ],
)
def test_bad_aggregate_query(query: bytes, parameter: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_aggregate_read_query(query)
    assert info.value.code == "invalid_query"
    assert info.value.details == {"parameter": parameter}


@pytest.mark.parametrize("query", [b"from_index=0", b"from_index=x", b"limit=100000", b"min_index=a"])
def test_bad_log_query(query: bytes) -> None:
    with pytest.raises(ValidationError) as info:
        parse_log_read_query(query)
    assert info.value.code == "invalid_query"


@pytest.mark.parametrize("query", [b"a=%FF", b"\xff=1", "a=%C3%28"])
def test_undecodable_query_is_400(query: bytes | str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_query(query)
    assert info.value.code == "invalid_query"


def test_query_decoding() -> None:
    assert parse_query(b"a=x+y&b=%2F%C3%A9&&c&d=") == {"a": "x y", "b": "/é", "c": "", "d": ""}


def test_subscribe_resumes_after_last_event_id() -> None:
    assert parse_subscribe_query(b"", last_event_id="7").from_index == 8
    assert parse_subscribe_query(b"", last_event_id="0").from_index == 1
    assert parse_subscribe_query(b"from_index=3", last_event_id="7").from_index == 3
    with pytest.raises(ValidationError):
        parse_subscribe_query(b"", last_event_id="x")


def test_aggregate_id_path_segment() -> None:
    assert parse_aggregate_id_segment("user%20123") == "user 123"
    assert parse_aggregate_id_segment("caf%C3%A9") == "café"
    for bad in ("a%2Fb", "%FF", "a%00", "", "x" * 257):
        with pytest.raises(ValidationError) as info:
            parse_aggregate_id_segment(bad)
        assert info.value.details["field"] == "aggregate_id"


# ------------------------------------------------------------------ nothing else escapes


json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
event_like = st.dictionaries(
    st.sampled_from(["type", "aggregate_id", "payload", "metadata", "id", "expected_version", "other"]),
    json_values,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_request_errors(raw: bytes) -> None:
    for parse in (parse_append_request, parse_batch_request):
        try:
            parse(raw, JSON)
        except RequestError:
            pass


@settings(max_examples=150, deadline=None)
@given(event_like)
def test_arbitrary_event_objects_raise_only_request_errors(obj: dict[str, Any]) -> None:
    try:
        raw = orjson.dumps(obj)
    except TypeError:
        return  # e.g. an integer outside 64 bits: not JSON orjson can write
    try:
        event = parse_append_request(raw, JSON)
    except RequestError:
        return
    assert orjson.loads(event.payload) == obj["payload"]
    assert orjson.loads(event.metadata) == (obj.get("metadata") or {})
    try:
        parse_batch_request(orjson.dumps({"events": [obj, obj]}), JSON)
    except RequestError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100), st.text(max_size=30))
def test_arbitrary_queries_raise_only_request_errors(raw: bytes, text: str) -> None:
    for query in (raw, text):
        for parse in (parse_aggregate_read_query, parse_log_read_query, parse_subscribe_query):
            try:
                parse(query)
            except RequestError:
                pass
        try:
            parse_aggregate_id_segment(text)
        except RequestError:
            pass
