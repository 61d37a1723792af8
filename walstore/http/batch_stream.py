"""``POST /events/batch`` bodies checked as they arrive, so that a large batch is never held
whole next to its parse.

The server hands a large batch body (over ``max_body_bytes``, or chunked) to
``BatchStreamParser.feed`` piece by piece as the socket gives it, and ``finish()`` at the
end of the body returns what ``validation.parse_batch_with_tracking`` returns for the whole
body. Each element of ``events`` is checked as soon as its last byte is here, and its text
is then dropped: what the parser keeps is the checked events (their payloads as they will
be stored), not the body. It is still all or nothing: nothing is appended before
``finish()`` returns, and an error anywhere fails the whole batch.

How. The top level (``{``, keys, ``:``, ``,``, ``}``) is walked here; each value is
parsed by the standard library's C scanner (``JSONDecoder.raw_decode``), which says where
the value ends. When a piece ends inside a value the scan fails, and it is tried again
once at least as many more bytes have come as the failed try had (or the body ended), so a
value that arrives in many pieces is scanned a bounded number of times its size, not once
per piece. An event is then checked against its own bytes exactly as in a whole body: the
orjson fast path when its text is what orjson would write (``json_text.is_canonical``),
the exact walk (``json_text.load_object``) otherwise.

Errors have the whole-body path's codes, found in body order: an event that breaks a rule
is reported when it arrives, before a malformed byte further on would have been seen.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Generator
from typing import Final

from walstore.errors import ValidationError
from walstore.event import NewEvent, Tracking
from walstore.http.validation import (
    BATCH_FIELDS,
    add_batch_event,
    batch_event,
    check_batch_size,
    tracking_from_value,
)
from walstore.json_text import check_unicode, duplicate_key_error, value_at

# Finds where a value ends (and parses it) at C speed; the strict rules are applied to what
# it found, by batch_event and value_at.
_SCANNER: Final = json.JSONDecoder()
_WS: Final = re.compile(r"[ \t\n\r]*")
# A value cut off by the end of a piece is tried again after at least this many more bytes
# (or as many as the failed try had, if more): a body fed byte by byte is not rescanned per byte.
MIN_RETRY_BYTES: Final = 16 * 1024
# Consumed text is dropped once this much of it has piled up in front of the unread rest.
_COMPACT_CHARS: Final = 1 << 20

_Walk = Generator[None, None, None]


class BatchStreamParser:
    """A batch body, fed in pieces: ``feed(piece)`` as they come, ``finish()`` at its end.

    Both raise ``ValidationError`` (the codes of ``validation.parse_batch_with_tracking``)
    as soon as the body is known to be refused; the parser must not be used after that.
    """

    __slots__ = (
        "_base",
        "_bytes_in",
        "_decoder",
        "_eof",
        "_events",
        "_failed",
        "_keys",
        "_max_events",
        "_need",
        "_pending",
        "_pending_bytes",
        "_pos",
        "_seen_ids",
        "_text",
        "_tracking",
        "_walk",
    )

    def __init__(self, *, max_events: int) -> None:
        self._max_events = max_events
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._bytes_in = 0  # body bytes decoded so far: error offsets
        # The unread text is _text[_pos:]; _base chars before _text were consumed and dropped.
        self._text = ""
        self._pos = 0
        self._base = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._need = 0  # pending bytes to collect before the walk resumes
        self._eof = False
        self._failed = False
        self._keys: set[str] = set()
        self._events: list[NewEvent] = []
        self._seen_ids: dict[str, int] = {}
        self._tracking: Tracking | None = None
        self._walk = self._walk_body()

    @property
    def events_checked(self) -> int:
        """Events of the batch checked so far."""
        return len(self._events)

    def feed(self, piece: bytes) -> None:
        """The body's next bytes."""
        if self._eof:
            raise RuntimeError("feed() after finish()")
        if not piece:
            return
        self._pending.append(piece)
        self._pending_bytes += len(piece)
        if self._pending_bytes >= self._need:
            self._resume()

    def finish(self) -> tuple[list[NewEvent], Tracking | None]:
        """The body has ended: its events (1..max_events, or none with a tracking) and its
        tracking."""
        if self._eof:
            raise RuntimeError("finish() called twice")
        self._eof = True
        self._resume()
        if "events" not in self._keys:
            raise ValidationError("missing field 'events'", code="missing_field", field="events")
        if not self._events and self._tracking is None:
            raise ValidationError("a batch needs at least one event", code="empty_batch", field="events")
        return self._events, self._tracking

    # ------------------------------------------------------------------ driving the walk

    def _resume(self) -> None:
        if self._failed:
            raise RuntimeError("the parser refused the body already")
        try:
            self._absorb()
            next(self._walk)
        except StopIteration:
            # The walk ends only at the end of the body (it checks what follows the object).
            assert self._eof, "the batch walk ended before the body did"
        except BaseException:
            self._failed = True
            raise
        else:
            assert not self._eof, "the batch walk waits for bytes after the body ended"

    def _absorb(self) -> None:
        """Decode the pending bytes onto the unread text."""
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._need = 0
        carried = len(self._decoder.getstate()[0])  # bytes of a character cut by a piece
        try:
            decoded = self._decoder.decode(data, final=self._eof)
        except UnicodeDecodeError as exc:
            at = self._bytes_in - carried + exc.start
            raise ValidationError(f"malformed JSON: not UTF-8 at byte {at}", code="invalid_json") from None
        self._bytes_in += len(data)
        pos = self._pos
        self._base += pos
        self._text = self._text[pos:] + decoded
        self._pos = 0

    def _more(self, at_least: int) -> _Walk:
        """Wait until ``at_least`` more bytes have come (or the body has ended)."""
        assert not self._eof, "waiting for bytes after the end of the body"
        self._need = at_least
        yield

    # ------------------------------------------------------------------ the walk

    def _walk_body(self) -> _Walk:
        char = yield from self._next_char()
        if char != "{":
            if not char:
                raise ValidationError("malformed JSON: the body is empty", code="invalid_json")
            yield from self._value_end()  # malformed JSON is invalid_json before it is the wrong shape
            raise ValidationError("the body must be a JSON object", code="invalid_body")
        self._pos += 1
        char = yield from self._next_char()
        if char == "}":
            self._pos += 1
        else:
            while True:
                yield from self._member(char)
                char = yield from self._next_char()
                self._pos += 1
                if char == ",":
                    char = yield from self._next_char()
                    continue
                if char != "}":
                    self._pos -= 1
                    raise self._expected("',' or '}'")
                break
        char = yield from self._next_char()
        if char:
            raise ValidationError(
                f"malformed JSON: extra data after the object at char {self._base + self._pos}", code="invalid_json"
            )

    def _member(self, char: str) -> _Walk:
        if char != '"':
            raise self._expected("a key")
        _, start, _ = yield from self._value_end()
        key, _ = value_at(self._text, start)
        assert isinstance(key, str)
        if key in self._keys:
            raise duplicate_key_error(key)
        if key not in BATCH_FIELDS:
            raise ValidationError(f"unknown field {key!r}", code="unknown_field", field=key)
        self._keys.add(key)
        if (yield from self._next_char()) != ":":
            raise self._expected("':'")
        self._pos += 1
        char = yield from self._next_char()
        if key == "events" and char == "[":
            yield from self._events_array()
            return
        _, start, _ = yield from self._value_end()
        value, _ = value_at(self._text, start)  # strict: a repeated key, an integer too long
        if key == "events":
            raise ValidationError("'events' must be an array", code="invalid_field", field="events")
        if value is not None:  # "tracking": null is no tracking
            check_unicode(value)
            self._tracking = tracking_from_value(value)

    def _events_array(self) -> _Walk:
        self._pos += 1  # the "["
        char = yield from self._next_char()
        if char == "]":
            self._pos += 1
            return
        while True:
            check_batch_size(len(self._events) + 1, self._max_events)
            value, start, end = yield from self._value_end()
            event = batch_event(value, self._text[start:end].encode("utf-8"), len(self._events))
            add_batch_event(self._events, self._seen_ids, event)
            char = yield from self._next_char()
            self._pos += 1
            if char == "]":
                return
            if char != ",":
                self._pos -= 1
                raise self._expected("',' or ']'")
            self._compact()
            yield from self._next_char()

    # ------------------------------------------------------------------ tokens

    def _next_char(self) -> Generator[None, None, str]:
        """The next character after whitespace, without consuming it ("" at the end)."""
        while True:
            match = _WS.match(self._text, self._pos)
            assert match is not None  # the pattern matches the empty string
            self._pos = pos = match.end()
            if pos < len(self._text):
                return self._text[pos]
            if self._eof:
                return ""
            yield from self._more(1)

    def _value_end(self) -> Generator[None, None, tuple[object, int, int]]:
        """The scanner's parse of the value at the current position, where it starts and
        where it ends; the position moves past it. A value the scanner refuses at the end of
        the body is ``invalid_json``."""
        while True:
            text = self._text
            start = self._pos
            try:
                value, end = _SCANNER.raw_decode(text, start)
            except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
                if self._eof:
                    value_at(text, start)  # raises the strict parser's own error
                    raise ValidationError(f"malformed JSON at char {self._base + start}", code="invalid_json") from None
                yield from self._more(max(len(text) - start, MIN_RETRY_BYTES))
                continue
            if end == len(text) and not self._eof:
                # A number may go on in the next piece ("12" of "123").
                yield from self._more(1)
                continue
            self._pos = end
            return value, start, end

    def _expected(self, what: str) -> ValidationError:
        pos = self._pos
        found = repr(self._text[pos]) if pos < len(self._text) else "the end"
        return ValidationError(
            f"malformed JSON: expected {what} at char {self._base + pos}, found {found}", code="invalid_json"
        )

    def _compact(self) -> None:
        """Drop consumed text once it is most of the buffer (each char is copied O(1) times)."""
        pos = self._pos
        if pos > _COMPACT_CHARS and 2 * pos > len(self._text):
            self._base += pos
            self._text = self._text[pos:]
            self._pos = 0
