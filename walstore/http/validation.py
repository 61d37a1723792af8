"""Validate HTTP requests: body bytes and query strings in, checked values out.

Pure (no trio, no I/O) so the fuzz target and unit tests call it directly. Every bad input
raises a ``walstore.errors.RequestError`` subclass with a stable ``code``; nothing else may
escape (the hypothesis test in tests/test_http_validation.py checks it).

Bodies (``POST /events`` and ``POST /events/batch``):

- ``Content-Type`` must be ``application/json``; the only parameter allowed is
  ``charset=utf-8`` (any case, optionally quoted). Anything else, or no header: 415
  ``unsupported_media_type``.
- JSON is strict RFC 8259 (``walstore.json_text``): NaN/Infinity, invalid UTF-8, escaped
  lone surrogates, trailing bytes, an empty body, nesting deeper than the parser allows
  (about 1,000 levels) and integers of more than ``MAX_INTEGER_DIGITS`` digits are 400
  ``invalid_json``. The top level must be an object (400 ``invalid_body``). A key twice in
  one object, anywhere in the body, is 400 ``duplicate_key`` naming it.
- An event object has exactly these fields; any other field is 400 ``unknown_field``
  (strict, so a typo such as ``expected_verison`` cannot silently turn a conditional append
  into an unconditional one):

  ========================  ======================================================
  ``type``                  required; non-empty string, <= MAX_TYPE_BYTES UTF-8 bytes
  ``aggregate_id``          required; non-empty string, <= MAX_AGGREGATE_ID_BYTES,
                            no "/", not "." or ".." (it is a URL path segment)
  ``payload``               required unless ``payload_base64``; a JSON object
  ``payload_base64``        instead of ``payload`` (both: 400): binary bytes in
                            standard, padded, canonical base64 (RFC 4648 section 4)
  ``metadata``              optional; a JSON object, default ``{}``
  ``id``                    optional; non-empty string <= MAX_ID_BYTES; absent -> uuid4
  ``expected_version``      optional; integer >= 0 (``true`` is not an integer),
                            0 = the aggregate must be new; or ``"exists"`` = the
                            aggregate must have at least one event
  ========================  ======================================================

  ``type``, ``aggregate_id`` and ``id`` may not contain control characters (Unicode Cc).
  ``null`` for an optional field means "absent". A missing required field is 400
  ``missing_field``; a present one of the wrong shape is 400 ``invalid_field``; both carry
  ``field`` (and ``event_index`` inside a batch).
- ``payload`` and ``metadata`` are stored as the client's own JSON text, with only the
  whitespace outside strings removed: numbers keep their exact text, keys their order,
  strings their escapes, and reads return that text. An idempotent repeat compares them by
  JSON value (``json_text.same_json_value``). Their sum over MAX_EVENT_BYTES is 413
  ``event_too_large``.
- A batch is ``{"events": [event, ...], "tracking": {"consumer", "position"}}`` with
  1..max_events events (the node's MAX_BATCH_EVENTS; 400 ``empty_batch`` /
  ``too_many_events``), or none when it has a ``tracking``; two events with the same
  ``id`` are 400 ``duplicate_id``. ``tracking`` is optional (``null`` = absent): a
  consumer name with the rules of an aggregate id and a position, an integer >= 1.

Query strings: ``from_version`` (>= 1; default 1 forward, the newest event backward),
``limit`` (1..MAX_READ_LIMIT, default DEFAULT_READ_LIMIT), ``direction`` (``forward`` |
``backward``), ``from_index`` (>= 1; default 1 forward, the last event backward),
``min_index`` (>= 0), ``types`` (comma-separated event types, each non-empty, at most
MAX_FILTER_TYPES) and ``aggregate_prefix`` (non-empty). Numbers are plain
ASCII decimal digits. A bad value or a repeated parameter is 400 ``invalid_query`` naming
the ``parameter``; unknown parameters are ignored (cache busters such as ``_=123``).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import unquote, unquote_plus

import orjson

from walstore.errors import PayloadTooLarge, UnsupportedMedia, ValidationError
from walstore.event import (
    EXISTS,
    MAX_AGGREGATE_ID_BYTES,
    MAX_BATCH_EVENTS,
    MAX_CONSUMER_BYTES,
    MAX_EVENT_BYTES,
    MAX_ID_BYTES,
    MAX_TYPE_BYTES,
    NewEvent,
    Tracking,
)
from walstore.json_text import Member, fast_object, is_canonical, load_object, stored_text
from walstore.service import Direction

# Versions and indexes are 64-bit on disk; keeping them signed leaves room for sentinels.
MAX_POSITION: Final = 2**63 - 1
_MAX_POSITION_DIGITS: Final = len(str(MAX_POSITION))
# One read answers at most this many events: 10k small events is a few MiB of JSON, which
# bounds the memory and the time one request can take; clients page with from_*.
MAX_READ_LIMIT: Final = 10_000
DEFAULT_READ_LIMIT: Final = 1000
# ``types=`` of a log read or subscription: each name is checked and kept in a set.
MAX_FILTER_TYPES: Final = 100

_EVENT_FIELDS: Final = frozenset(
    ("id", "type", "aggregate_id", "payload", "payload_base64", "metadata", "expected_version")
)
BATCH_FIELDS: Final = frozenset(("events", "tracking"))
_TRACKING_FIELDS: Final = frozenset(("consumer", "position"))
_EMPTY_OBJECT: Final = b"{}"


class _UuidSource:
    """Random (version 4) UUID strings, from os.urandom taken 4 KiB at a time.

    ``str(uuid.uuid4())`` costs ~4 us (a getrandom call, a UUID object, its formatting)
    for every event sent without an id; this costs ~1 us. The bits are the same
    kernel randomness, only fetched in bulk."""

    _BATCH = 256

    def __init__(self) -> None:
        self._pool = b""
        self._next = 0

    def new(self) -> str:
        if self._next == len(self._pool):
            self._pool = os.urandom(16 * self._BATCH)
            self._next = 0
        start = self._next
        self._next = start + 16
        h = self._pool[start : start + 16].hex()
        # version nibble 4; variant bits 10xx
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


_uuids = _UuidSource()
_JSON_MEDIA_TYPE: Final = "application/json"


@dataclass(frozen=True, slots=True)
class AggregateReadParams:
    from_version: int
    limit: int
    direction: Direction
    min_index: int | None


@dataclass(frozen=True, slots=True)
class LogReadParams:
    from_index: int
    limit: int
    min_index: int | None
    direction: Direction = "forward"
    types: frozenset[str] | None = None
    aggregate_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class SubscribeParams:
    from_index: int
    types: frozenset[str] | None = None
    aggregate_prefix: str | None = None


# ---------------------------------------------------------------------------- bodies


def check_content_type(content_type: str | None) -> None:
    """Accept ``application/json`` with at most ``charset=utf-8``; else 415."""
    if content_type == _JSON_MEDIA_TYPE:  # the common case: no parsing
        return
    if content_type is not None:
        media_type, *params = content_type.split(";")
        if media_type.strip().lower() == _JSON_MEDIA_TYPE and all(_is_utf8_charset(p) for p in params):
            return
    raise UnsupportedMedia(
        "Content-Type must be application/json (charset utf-8)",
        content_type=content_type,
    )


def _is_utf8_charset(param: str) -> bool:
    name, sep, value = param.partition("=")
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return bool(sep) and name.strip().lower() == "charset" and value.lower() in ("utf-8", "utf8")


def parse_append_request(body: bytes, content_type: str | None) -> NewEvent:
    """``POST /events``: one event."""
    check_content_type(content_type)
    fast = fast_object(body)
    if fast is not None:
        return _event_from_object(fast, _encoded(fast), None)
    text, members = load_object(body)
    return _event_from_object(_values(members), _spans(text, members), None)


def _values(members: dict[str, Member]) -> dict[str, object]:
    return {key: member.value for key, member in members.items()}


def _encoded(obj: dict[str, object]) -> Callable[[str], bytes]:
    """A member's text as sent, when ``fast_object`` vouched for orjson's encoding.

    Copied to a bytes object of its own size: orjson's result keeps the allocation of its
    output buffer, at least 4 KiB and up to ~10x the text (measured with orjson 3.13:
    a 1.6 KiB payload held 16 KiB), and these bytes live until the event is applied; a
    10,000-event batch held 155 MiB for 16 MiB of payloads."""
    return lambda key: bytes(memoryview(orjson.dumps(obj[key])))


def _spans(text: str, members: dict[str, Member]) -> Callable[[str], bytes]:
    return lambda key: stored_text(text, members[key])


_BATCH_ARRAYS: Final = frozenset(("events",))


def parse_batch_request(body: bytes, content_type: str | None, *, max_events: int = MAX_BATCH_EVENTS) -> list[NewEvent]:
    """``POST /events/batch``: ``{"events": [...]}``, 1..max_events events."""
    return parse_batch_with_tracking(body, content_type, max_events=max_events)[0]


def parse_batch_with_tracking(
    body: bytes, content_type: str | None, *, max_events: int = MAX_BATCH_EVENTS
) -> tuple[list[NewEvent], Tracking | None]:
    """``POST /events/batch``: ``{"events": [...], "tracking"?: {consumer, position}}``
    with 1..max_events events, or 0 with a tracking."""
    check_content_type(content_type)
    fast = fast_object(body)
    text = ""
    if fast is not None:
        obj: dict[str, object] = fast
    else:
        text, members = load_object(body, arrays_of_objects=_BATCH_ARRAYS)
        obj = _values(members)
    for key in obj:
        if key not in BATCH_FIELDS:
            raise ValidationError(f"unknown field {key!r}", code="unknown_field", field=key)
    if "events" not in obj:
        raise ValidationError("missing field 'events'", code="missing_field", field="events")
    items = obj["events"]
    if not isinstance(items, list):
        raise ValidationError("'events' must be an array", code="invalid_field", field="events")
    tracking = tracking_from_value(obj["tracking"]) if obj.get("tracking") is not None else None
    if not items and tracking is None:
        raise ValidationError("a batch needs at least one event", code="empty_batch", field="events")
    check_batch_size(len(items), max_events)
    events: list[NewEvent] = []
    seen_ids: dict[str, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValidationError(
                "each event must be a JSON object", code="invalid_field", field="events", event_index=i
            )
        if fast is not None:
            event = _event_from_object(item, _encoded(item), i)
        else:
            walked = cast(dict[str, Member], item)  # the exact path walks event objects
            event = _event_from_object(_values(walked), _spans(text, walked), i)
        add_batch_event(events, seen_ids, event)
    return events, tracking


def check_batch_size(count: int, max_events: int) -> None:
    """``too_many_events`` when a batch has (or, streaming, has reached) ``count`` > max."""
    if count > max_events:
        raise ValidationError(
            f"a batch holds at most {max_events} events, got {count}",
            code="too_many_events",
            field="events",
            limit=max_events,
        )


def add_batch_event(events: list[NewEvent], seen_ids: dict[str, int], event: NewEvent) -> None:
    """Append the batch's next event; ``duplicate_id`` if an earlier one has its id."""
    i = len(events)
    first = seen_ids.setdefault(event.id, i)
    if first != i:
        raise ValidationError(
            f"event id {event.id!r} appears twice in the batch (events {first} and {i})",
            code="duplicate_id",
            field="id",
            event_index=i,
        )
    events.append(event)


def batch_event(value: object, sent: bytes, index: int) -> NewEvent:
    """Element ``index`` of a batch's ``events`` array, checked: ``value`` is a parse of
    ``sent``, the element's bytes as they came (``walstore.http.batch_stream``)."""
    if not isinstance(value, dict):
        raise ValidationError(
            "each event must be a JSON object", code="invalid_field", field="events", event_index=index
        )
    if is_canonical(value, sent):
        return _event_from_object(value, _encoded(value), index)
    text, members = load_object(sent)
    return _event_from_object(_values(members), _spans(text, members), index)


def tracking_from_value(value: object) -> Tracking:
    """``{"consumer": name, "position": int >= 1}``; the name follows the aggregate id's
    rules (it is the path segment of ``GET /consumers/{consumer}``)."""
    if not isinstance(value, dict):
        raise ValidationError("'tracking' must be an object", code="invalid_field", field="tracking")
    for key in value:
        if key not in _TRACKING_FIELDS:
            raise ValidationError(f"unknown field 'tracking.{key}'", code="unknown_field", field=f"tracking.{key}")
    for key in ("consumer", "position"):
        if key not in value:
            raise ValidationError(f"missing field 'tracking.{key}'", code="missing_field", field=f"tracking.{key}")
    consumer = check_consumer(value["consumer"], "tracking.consumer")
    position = value["position"]
    if type(position) is not int or not 1 <= position <= MAX_POSITION:
        raise ValidationError(
            "tracking.position: must be an integer >= 1", code="invalid_field", field="tracking.position"
        )
    return Tracking(consumer, position)


def check_consumer(value: object, field: str = "consumer") -> str:
    """A consumer name: like an aggregate id (non-empty, <= MAX_CONSUMER_BYTES, no control
    characters, no "/", not "." or "..")."""
    try:
        name = _check_name(value, "consumer", MAX_CONSUMER_BYTES, None)
        _check_path_segment_of(name, "consumer")
    except ValidationError as exc:
        raise ValidationError(
            f"{field}: {exc.message.partition(': ')[2] or exc.message}", code="invalid_field", field=field
        ) from None
    return name


def _check_path_segment_of(value: str, field: str) -> None:
    if "/" in value:
        raise _invalid(field, "must not contain '/'", None)
    if value in (".", ".."):
        raise _invalid(field, f"{value!r} is a dot segment of a URL path", None)


def _invalid(field: str, message: str, index: int | None) -> ValidationError:
    if index is None:
        return ValidationError(f"{field}: {message}", code="invalid_field", field=field)
    return ValidationError(f"events[{index}].{field}: {message}", code="invalid_field", field=field, event_index=index)


def _event_from_object(obj: dict[str, object], text_of: Callable[[str], bytes], index: int | None) -> NewEvent:
    """Check one event; ``text_of(key)`` is the stored JSON text of member ``key``."""
    if not _EVENT_FIELDS.issuperset(obj):
        unknown = next(k for k in obj if k not in _EVENT_FIELDS)
        details: dict[str, object] = {"field": unknown}
        if index is not None:
            details["event_index"] = index
        raise ValidationError(f"unknown field {unknown!r}", code="unknown_field", **details)
    for required in ("type", "aggregate_id", "payload"):
        if required == "payload" and "payload_base64" in obj:
            continue
        if required not in obj:
            details = {"field": required}
            if index is not None:
                details["event_index"] = index
            raise ValidationError(f"missing field {required!r}", code="missing_field", **details)

    type_ = _check_name(obj["type"], "type", MAX_TYPE_BYTES, index)
    aggregate_id = _check_name(obj["aggregate_id"], "aggregate_id", MAX_AGGREGATE_ID_BYTES, index)
    _check_path_segment(aggregate_id, index)

    binary = "payload_base64" in obj
    if binary:
        if "payload" in obj:
            raise _invalid("payload_base64", "give payload or payload_base64, not both", index)
        payload_bytes = _base64_payload(obj["payload_base64"], index)
    elif not isinstance(obj["payload"], dict):
        raise _invalid("payload", "must be a JSON object", index)
    else:
        payload_bytes = text_of("payload")
    metadata = obj.get("metadata")
    if metadata is None:
        metadata_bytes = _EMPTY_OBJECT
    elif isinstance(metadata, dict):
        metadata_bytes = text_of("metadata")
    else:
        raise _invalid("metadata", "must be a JSON object", index)
    size = len(payload_bytes) + len(metadata_bytes)
    if size > MAX_EVENT_BYTES:
        raise PayloadTooLarge(
            f"payload and metadata are {size} bytes; the limit is {MAX_EVENT_BYTES}",
            code="event_too_large",
            limit=MAX_EVENT_BYTES,
        )

    raw_id = obj.get("id")
    event_id = _uuids.new() if raw_id is None else _check_name(raw_id, "id", MAX_ID_BYTES, index)

    expected = obj.get("expected_version")
    # bool is a subclass of int: `type() is int` keeps `true` out.
    if expected is not None and expected != EXISTS and (type(expected) is not int or not 0 <= expected <= MAX_POSITION):
        raise _invalid("expected_version", 'must be an integer >= 0 or the string "exists"', index)

    return NewEvent(
        id=event_id,
        type=type_,
        aggregate_id=aggregate_id,
        payload=payload_bytes,
        metadata=metadata_bytes,
        expected_version=expected,
        binary=binary,
    )


def _base64_payload(value: object, index: int | None) -> bytes:
    """Standard base64 with padding, and canonical: decoding and encoding again gives the
    same text, so what a client reads back is what it sent."""
    if not isinstance(value, str):
        raise _invalid("payload_base64", "must be a base64 string", index)
    if len(value) > 2 * MAX_EVENT_BYTES:  # base64 of MAX_EVENT_BYTES is 4/3 of it
        raise PayloadTooLarge(
            f"payload_base64 decodes to more than {MAX_EVENT_BYTES} bytes",
            code="event_too_large",
            limit=MAX_EVENT_BYTES,
        )
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise _invalid("payload_base64", "is not standard padded base64", index) from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise _invalid("payload_base64", "is not canonical base64 (non-zero trailing bits)", index)
    return raw


def _check_name(value: object, field: str, max_bytes: int, index: int | None) -> str:
    """A non-empty identifier string of at most ``max_bytes`` UTF-8 bytes, no control chars."""
    if not isinstance(value, str):
        raise _invalid(field, "must be a string", index)
    if not value:
        raise _invalid(field, "must not be empty", index)
    # UTF-8 never uses fewer bytes than characters: a cheap early out before encoding.
    if len(value) > max_bytes:
        raise _invalid(field, f"longer than {max_bytes} bytes", index)
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise _invalid(field, "is not valid Unicode (lone surrogate)", index) from None
    if size > max_bytes:
        raise _invalid(field, f"longer than {max_bytes} bytes", index)
    # isprintable() is a fast C scan; it is stricter than "no control characters" (it also
    # refuses e.g. a zero-width joiner), so only a False answer needs the exact check.
    if not value.isprintable() and _has_control_char(value):
        raise _invalid(field, "must not contain control characters", index)
    return value


def _has_control_char(value: str) -> bool:
    for ch in value:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return True
    return False


def _check_path_segment(aggregate_id: str, index: int | None) -> None:
    # It is a URL path segment of GET /events/{aggregate_id}: a client that normalises
    # paths (RFC 3986 dot segments) could never read "." or ".." back.
    if "/" in aggregate_id:
        raise _invalid("aggregate_id", "must not contain '/'", index)
    if aggregate_id in (".", ".."):
        raise _invalid("aggregate_id", f"{aggregate_id!r} is a dot segment of a URL path", index)


# ---------------------------------------------------------------------------- URLs


def parse_consumer_segment(segment: str) -> str:
    """The ``{consumer}`` of ``/consumers/{consumer}``, percent-decoded and checked."""
    try:
        consumer = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise ValidationError(
            "consumer in the path is not valid percent-encoded UTF-8", code="invalid_field", field="consumer"
        ) from None
    return check_consumer(consumer)


def parse_min_index_query(query: bytes | str) -> int | None:
    """``?min_index=N`` (the only parameter of ``GET /consumers/{consumer}``)."""
    return _optional_int_param(parse_query(query), "min_index", 0, MAX_POSITION)


def parse_aggregate_id_segment(segment: str) -> str:
    """The ``{aggregate_id}`` of ``/events/{aggregate_id}``, percent-decoded and checked
    with the same rules as the body field."""
    try:
        aggregate_id = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise ValidationError(
            "aggregate_id in the path is not valid percent-encoded UTF-8",
            code="invalid_field",
            field="aggregate_id",
        ) from None
    aggregate_id = _check_name(aggregate_id, "aggregate_id", MAX_AGGREGATE_ID_BYTES, None)
    _check_path_segment(aggregate_id, None)
    return aggregate_id


def parse_query(query: bytes | str) -> dict[str, str]:
    """``a=1&b=x+y`` -> ``{"a": "1", "b": "x y"}``; a repeated name is 400."""
    if not query:
        return {}
    if isinstance(query, bytes):
        try:
            query = query.decode("ascii")
        except UnicodeDecodeError:
            raise ValidationError("query string is not ASCII", code="invalid_query") from None
    params: dict[str, str] = {}
    for piece in query.split("&"):
        if not piece:
            continue
        raw_name, _, raw_value = piece.partition("=")
        try:
            name = unquote_plus(raw_name, errors="strict")
            value = unquote_plus(raw_value, errors="strict")
        except UnicodeDecodeError:
            raise ValidationError("query string is not valid percent-encoded UTF-8", code="invalid_query") from None
        if name in params:
            raise ValidationError(f"query parameter {name!r} given twice", code="invalid_query", parameter=name)
        params[name] = value
    return params


def _int_param(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    # str.isdigit() also accepts non-ASCII digits and int() accepts "_", "+" and spaces:
    # only plain ASCII digits are a number here.
    if raw.isascii() and raw.isdigit() and len(raw) <= _MAX_POSITION_DIGITS:
        value = int(raw)
        if low <= value <= high:
            return value
    raise ValidationError(
        f"query parameter {name!r} must be an integer in {low}..{high}, got {raw[:40]!r}",
        code="invalid_query",
        parameter=name,
    )


def _optional_int_param(params: dict[str, str], name: str, low: int, high: int) -> int | None:
    if name not in params:
        return None
    return _int_param(params, name, low, low, high)


def _direction_param(params: dict[str, str]) -> Direction:
    raw_direction = params.get("direction", "forward")
    if raw_direction == "forward":
        return "forward"
    if raw_direction == "backward":
        return "backward"
    raise ValidationError(
        f"query parameter 'direction' must be forward or backward, got {raw_direction[:40]!r}",
        code="invalid_query",
        parameter="direction",
    )


def _filter_params(params: dict[str, str]) -> tuple[frozenset[str] | None, str | None]:
    """``types=A,B`` (event types, at most MAX_FILTER_TYPES) and ``aggregate_prefix=P``;
    an empty value or an empty name in the list is 400 ``invalid_query``."""
    types: frozenset[str] | None = None
    raw = params.get("types")
    if raw is not None:
        names = raw.split(",")
        if len(names) > MAX_FILTER_TYPES:
            raise ValidationError(
                f"query parameter 'types' names at most {MAX_FILTER_TYPES} types",
                code="invalid_query",
                parameter="types",
            )
        for name in names:
            _query_name(name, "types", MAX_TYPE_BYTES)
        types = frozenset(names)
    prefix = params.get("aggregate_prefix")
    if prefix is not None:
        _query_name(prefix, "aggregate_prefix", MAX_AGGREGATE_ID_BYTES)
    return types, prefix


def _query_name(value: str, parameter: str, max_bytes: int) -> None:
    try:
        _check_name(value, parameter, max_bytes, None)
    except ValidationError as exc:
        raise ValidationError(
            f"query parameter {parameter!r}: {exc.message.partition(': ')[2] or exc.message}",
            code="invalid_query",
            parameter=parameter,
        ) from None


def parse_aggregate_read_query(query: bytes | str) -> AggregateReadParams:
    """``GET /events/{aggregate_id}?from_version&limit&direction&min_index``."""
    params = parse_query(query)
    direction = _direction_param(params)
    # Backward without a starting point means "from the newest event": MAX_POSITION is past
    # any version, and the service clamps it to the aggregate's current version.
    default_from = 1 if direction == "forward" else MAX_POSITION
    return AggregateReadParams(
        from_version=_int_param(params, "from_version", default_from, 1, MAX_POSITION),
        limit=_int_param(params, "limit", DEFAULT_READ_LIMIT, 1, MAX_READ_LIMIT),
        direction=direction,
        min_index=_optional_int_param(params, "min_index", 0, MAX_POSITION),
    )


def parse_log_read_query(query: bytes | str) -> LogReadParams:
    """``GET /events?from_index&limit&min_index&direction&types&aggregate_prefix``.
    Backward without ``from_index`` starts at the last event (MAX_POSITION, clamped by
    the store)."""
    params = parse_query(query)
    direction = _direction_param(params)
    types, prefix = _filter_params(params)
    return LogReadParams(
        from_index=_int_param(params, "from_index", 1 if direction == "forward" else MAX_POSITION, 1, MAX_POSITION),
        limit=_int_param(params, "limit", DEFAULT_READ_LIMIT, 1, MAX_READ_LIMIT),
        min_index=_optional_int_param(params, "min_index", 0, MAX_POSITION),
        direction=direction,
        types=types,
        aggregate_prefix=prefix,
    )


def parse_subscribe_query(query: bytes | str, *, last_event_id: str | None = None) -> SubscribeParams:
    """``GET /subscribe?from_index``. Without ``from_index``, an SSE client's reconnect
    header ``Last-Event-ID: N`` (the index of the last event it saw) resumes at N + 1."""
    params = parse_query(query)
    types, prefix = _filter_params(params)
    if "from_index" not in params and last_event_id is not None:
        resume = {"last_event_id": last_event_id.strip()}
        from_index = _int_param(resume, "last_event_id", 0, 0, MAX_POSITION - 1) + 1
    else:
        from_index = _int_param(params, "from_index", 1, 1, MAX_POSITION)
    return SubscribeParams(from_index=from_index, types=types, aggregate_prefix=prefix)
