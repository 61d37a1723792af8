"""JSON request bodies read so that what a client stored comes back exactly as it sent it.

The event store keeps ``payload`` and ``metadata`` as the client's own JSON *text*, not as a
re-encoding of a parsed value:

- every number keeps its exact text (``18446744073709551616``, ``1.10``, ``1e400``);
- keys keep their order;
- strings keep their escapes.

Only insignificant whitespace outside strings is removed. A parser that turns numbers into
machine floats cannot give that back: orjson returns ``1.8446744073709552e+19`` for 2**64.

How. The standard library's C scanner parses each top-level member *value* with
``JSONDecoder.raw_decode``, which also reports where the value ends in the text. A small
walker goes over the one or two object levels around them (the event, the batch), so every
value comes with its span ``text[start:end]``. Parsing is strict, and anything refused is
``ValidationError`` with a stable code:

- the body is not UTF-8, or is not RFC 8259 JSON (NaN and Infinity included), or has
  trailing bytes, or nests too deep for the parser (about 1,000 levels): ``invalid_json``;
- a key appears twice in one object, anywhere in the document: ``duplicate_key`` naming the
  key. Which of two ``expected_version`` values would a client have meant?
- an escaped lone surrogate (``"\\ud800"``) is in a string: ``invalid_json``. It is valid
  JSON text but no Unicode string, and many clients cannot read it back.
- an integer of more than ``MAX_INTEGER_DIGITS`` digits (the limit of Python's int()):
  ``invalid_json``, with the limit.

The exact path costs several times what orjson does, so ``fast_object`` comes first: it
parses with orjson and re-encodes the whole body. When that gives back the client's bytes
(compact, or spaced as Python's json.dumps does), nothing was respelled and no key
repeated, and each value's orjson encoding *is* the client's text. The exact path runs only otherwise: big
integers, ``1.10``, ``\u00e9`` escapes, duplicate keys, or anything orjson refuses. The
exact path alone decides what is refused.

``same_json_value`` compares two stored texts by JSON value, ignoring key order and
number spelling (``1.10`` equals ``1.1``). Idempotent repeats of an event id use it.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

import orjson

from walstore.errors import ValidationError

# Python's int() refuses longer decimal strings (sys.int_info.default_max_str_digits) to
# bound its quadratic conversion; past it the value is refused, never changed.
MAX_INTEGER_DIGITS: Final = sys.int_info.default_max_str_digits
_WS: Final = re.compile(r"[ \t\n\r]*")
# A string (kept verbatim, escapes and all) or a run of insignificant whitespace (dropped).
_MINIFY: Final = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")|[ \t\n\r]+', re.DOTALL)
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# Validation needs the values of a few top-level fields only; numbers elsewhere are kept as
# text, so the C scanner's own int and float are enough here (an integer past int()'s digit
# limit is refused by it with that message).
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant)
# Comparing by value (idempotent repeats, rare) must not round: decimals exactly.
_VALUE_DECODER: Final = json.JSONDecoder(object_pairs_hook=_object, parse_float=Decimal, parse_constant=_constant)
# One member head: whitespace, a key without escapes, whitespace, ':', whitespace.
_PLAIN_KEY: Final = re.compile(r'[ \t\n\r]*"([^"\\]*)"[ \t\n\r]*:[ \t\n\r]*')
# After a member: whitespace and ',' or the closing bracket.
_AFTER: Final = re.compile(r"[ \t\n\r]*([,}\]])[ \t\n\r]*")
# Insignificant whitespace always touches a structural character (it only occurs between
# tokens, and a value's span starts and ends with its first and last token): a string
# with spaces ("John Doe") does not make the minifier run.
_MAYBE_INSIGNIFICANT_WS: Final = re.compile(r"[,:\[{][ \t\n\r]|[ \t\n\r][,:\]}]")


@dataclass(frozen=True, slots=True)
class Member:
    """One member of an object: its parsed value and where its text is."""

    value: object
    start: int
    end: int


def fast_object(body: bytes) -> dict[str, object] | None:
    """The body as orjson parses it, if re-encoding it gives back exactly what the client
    sent, compact or in the ``", "`` / ``": "`` style of Python's json.dumps; then
    ``orjson.dumps(value)`` of any member is that member's text as sent. None: use
    ``load_object`` (it also decides what is refused).

    Why the second comparison is sound: removing a space from a string would change the
    string's value, but both the text compared and orjson's re-encoding parse to the same
    value. So if they are equal, only spaces between tokens were removed."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and is_canonical(obj, body):
        return obj
    return None


def is_canonical(value: object, sent: bytes) -> bool:
    """Is ``sent`` (compact, or json.dumps-spaced) exactly orjson's encoding of ``value``,
    a parse of ``sent``? Then every member's orjson encoding is its text as sent.

    Any correct parser's value will do (orjson's, or the standard library's scanner in
    ``walstore.http.batch_stream``): for a value it cannot encode the same way (an integer
    past 64 bits, NaN, a lone surrogate, a repeated key) the answer is False, and the exact
    path decides."""
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested deeper than orjson encodes, a big int, a surrogate
        return False
    sent = sent.strip(b" \t\n\r")
    return encoded == sent or encoded == sent.replace(b", ", b",").replace(b": ", b":")


def decode_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"malformed JSON: not UTF-8 at byte {exc.start}", code="invalid_json") from None


def duplicate_key_error(key: str) -> ValidationError:
    return ValidationError(f"duplicate key {key!r} in a JSON object", code="duplicate_key", key=key)


def _error(exc: BaseException) -> ValidationError:
    if isinstance(exc, _DuplicateKey):
        return duplicate_key_error(exc.key)
    if isinstance(exc, RecursionError):
        return ValidationError("malformed JSON: nested too deeply", code="invalid_json")
    return ValidationError(f"malformed JSON: {exc}", code="invalid_json")


def value_at(text: str, pos: int) -> tuple[object, int]:
    """The strict parse of the JSON value at ``pos`` and the index after it; anything
    refused is ``ValidationError`` (``invalid_json``, ``duplicate_key``)."""
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError, _DuplicateKey) as exc:  # JSONDecodeError is a ValueError
        raise _error(exc) from None


def _skip(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _expect(text: str, pos: int, char: str, what: str) -> int:
    if pos >= len(text) or text[pos] != char:
        found = repr(text[pos]) if pos < len(text) else "the end"
        raise ValidationError(f"malformed JSON: expected {what} at char {pos}, found {found}", code="invalid_json")
    return pos + 1


def object_members(text: str, pos: int, *, arrays_of_objects: frozenset[str] = frozenset()) -> tuple[
    dict[str, Member], int
]:  # fmt: skip
    """The members of the object at ``pos`` (after whitespace) and the index after it.

    The value of a key in ``arrays_of_objects`` that is an array of objects becomes a list
    of member dicts of its own (a batch's events), so their members have spans too.
    ``invalid_body`` if there is no object at ``pos``."""
    pos = _skip(text, pos)
    if pos >= len(text) or text[pos] != "{":
        if pos < len(text):
            value_at(text, pos)  # malformed JSON is invalid_json before it is the wrong shape
        raise ValidationError("the body must be a JSON object", code="invalid_body")
    pos = _skip(text, pos + 1)
    members: dict[str, Member] = {}
    if pos < len(text) and text[pos] == "}":
        return members, pos + 1
    while True:
        head = _PLAIN_KEY.match(text, pos)
        if head is not None:  # the common case, in one regex step
            key, pos = head.group(1), head.end()
        else:  # a key with escapes, or malformed: the full parser decides
            pos = _skip(text, pos)
            if pos >= len(text) or text[pos] != '"':
                _expect(text, pos, '"', "a key")
            raw_key, pos = value_at(text, pos)
            assert isinstance(raw_key, str)
            key = raw_key
            pos = _skip(text, _expect(text, _skip(text, pos), ":", "':'"))
        if key in members:
            raise _error(_DuplicateKey(key))
        start = pos
        if key in arrays_of_objects and pos < len(text) and text[pos] == "[":
            value: object
            value, pos = _array_of_objects(text, pos)
        else:
            value, pos = value_at(text, pos)
        members[key] = Member(value, start, pos)
        after = _AFTER.match(text, pos)
        if after is not None and after.group(1) == ",":
            pos = after.end()
            continue
        if after is not None and after.group(1) == "}":
            return members, after.start(1) + 1
        return members, _expect(text, _skip(text, pos), "}", "',' or '}'")


def _array_of_objects(text: str, pos: int) -> tuple[list[object], int]:
    """An array whose object elements are walked (member dicts); others parsed as values."""
    items: list[object] = []
    pos = _skip(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return items, pos + 1
    while True:
        if pos < len(text) and text[pos] == "{":
            item, pos = object_members(text, pos)
            items.append(item)
        else:
            value, pos = value_at(text, pos)
            items.append(value)
        pos = _skip(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip(text, pos + 1)
            continue
        return items, _expect(text, pos, "]", "',' or ']'")


def load_object(body: bytes, *, arrays_of_objects: frozenset[str] = frozenset()) -> tuple[str, dict[str, Member]]:
    """The body's text and its top-level members; nothing but whitespace may follow."""
    text = decode_text(body)
    if not text.strip(" \t\n\r"):
        raise ValidationError("malformed JSON: the body is empty", code="invalid_json")
    members, end = object_members(text, 0, arrays_of_objects=arrays_of_objects)
    end = _skip(text, end)
    if end != len(text):
        raise ValidationError(f"malformed JSON: extra data after the object at char {end}", code="invalid_json")
    if _SURROGATE_ESCAPE.search(text) is not None:
        check_unicode([member.value for member in members.values()])
    return text, members


def stored_text(text: str, member: Member) -> bytes:
    """The member's JSON text as it will be stored: whitespace outside strings dropped,
    everything else exactly as sent (``load_object`` has checked it)."""
    raw = text[member.start : member.end]
    if _MAYBE_INSIGNIFICANT_WS.search(raw) is not None:
        raw = _MINIFY.sub(r"\1", raw)
    return raw.encode("utf-8")


def check_unicode(value: object) -> None:
    """Rare path (the text has a surrogate escape): every string must be real Unicode;
    ``invalid_json`` if one is not."""
    stack = [value]
    while stack:
        item = stack.pop()
        strings: list[str] = []
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, dict):
            strings.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, Member):
            stack.append(item.value)
        for s in strings:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValidationError(
                    "malformed JSON: a string holds an escaped lone surrogate", code="invalid_json"
                ) from None


def same_json_value(a: bytes, b: bytes) -> bool:
    """Do two stored JSON texts hold the same value (key order and number spelling aside)?"""
    if a == b:
        return True
    try:
        return bool(_VALUE_DECODER.decode(a.decode("utf-8")) == _VALUE_DECODER.decode(b.decode("utf-8")))
    except (ValueError, RecursionError, _DuplicateKey):
        return False
