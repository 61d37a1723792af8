"""Check a recorded history against the nodes' final logs: promises 1-4 of docs/fault-model.md.

Inputs. ``history`` is the list of operation records ``harness.history`` writes (one JSON
object per line)::

    {"op": "append", "key", "aggregate", "id", "expected_version", "node", "start", "end",
     "status": "ok" | "fail" | "info", "index", "version", "http_status", "error_code"}
    {"op": "read", "aggregate", "from_version", "limit", "min_index", "node", "start", "end",
     "status", "events": [[id, index, version], ...], "http_status", "error_code"}

``key`` names one logical append: the load client puts it into the event's payload under
``KEY_FIELD``, and a retry of the same append reuses it, so an event is attributed to its
operation even when the server chose the id. ``final_logs`` maps a node id to that node's
whole log as event dicts (``GET /events`` or ``harness.cluster.events_from_dump``):
``{id, aggregate_id, version, index, payload, ...}`` in index order.

What is checked (no search needed: the log's order is visible):

1. lost ack: every ``ok`` append is in the final log of every required node (default: all
   given) at the index and version it was acknowledged with, under its id; with an
   ``expected_version`` E its version is E + 1.
2. duplicate: no event id and no append key twice in a log. phantom: every event belongs
   to some append in the history. failed_present: an append whose every attempt got a
   definite failure does not appear (``info`` attempts may or may not appear).
3. divergent: all logs agree (id, aggregate, version) at every index they both hold; logs
   are compared with the longest one, so a node that is behind is not divergent, only
   ``behind`` (and its missing acks are lost acks if it is required). index_gap: a log's
   indexes run 1, 2, 3 ...; version_gap: each aggregate's versions run 1, 2, 3 ... in log
   order.
4. stale_read: an ``ok`` read returned a window of its aggregate that matches the final log
   version for version, and holds every event of that aggregate at an index <= its
   ``min_index`` (unless the read hit its ``limit``).

Each violation names the event id, index and nodes it is about; at most
``MAX_REPORTED_PER_KIND`` are kept per kind, but every one is counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from walstore.errors import ValidationError

# The payload field the load client stores its append key in.
KEY_FIELD = "history_key"
MAX_REPORTED_PER_KIND = 100

KINDS = (
    "lost",
    "wrong_position",
    "duplicate",
    "phantom",
    "failed_present",
    "divergent",
    "index_gap",
    "version_gap",
    "stale_read",
)


@dataclass(slots=True)
class Violation:
    kind: str
    message: str
    event_id: str | None = None
    index: int | None = None
    nodes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = f" at index {self.index}" if self.index is not None else ""
        who = f" on {','.join(self.nodes)}" if self.nodes else ""
        ident = f" event {self.event_id}" if self.event_id else ""
        return f"{self.kind}:{ident}{where}{who}: {self.message}"


@dataclass(slots=True)
class Report:
    operations: int = 0
    appends: int = 0
    reads: int = 0
    acknowledged: int = 0
    failed: int = 0
    info: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    violations: list[Violation] = field(default_factory=list)
    behind: dict[str, int] = field(default_factory=dict)  # node -> events it lacks vs the longest log
    log_lengths: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    @property
    def lost(self) -> int:
        return self.counts["lost"]

    @property
    def duplicates(self) -> int:
        return self.counts["duplicate"]

    @property
    def divergent(self) -> int:
        return self.counts["divergent"]

    @property
    def phantoms(self) -> int:
        return self.counts["phantom"]

    def of_kind(self, kind: str) -> list[Violation]:
        return [v for v in self.violations if v.kind == kind]

    def summary(self, max_lines: int = 20) -> str:
        head = (
            f"{self.operations} operations ({self.appends} appends: {self.acknowledged} ok, {self.failed} fail, "
            f"{self.info} info; {self.reads} reads); logs {self.log_lengths}; behind {self.behind}"
        )
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items() if v) or "no violations"
        lines = [head, counts, *(str(v) for v in self.violations[:max_lines])]
        if len(self.violations) > max_lines:
            lines.append(f"... {len(self.violations) - max_lines} more")
        return "\n".join(lines)

    def assert_ok(self) -> None:
        if not self.ok:
            raise AssertionError("history check failed:\n" + self.summary())


class _Collector:
    """Counts violations and keeps a bounded, de-duplicated sample of them: the same fault
    seen on several replicas becomes one violation naming every node."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self._seen: dict[tuple[str, str | None, int | None, str], Violation] = {}
        self._kept: dict[str, int] = defaultdict(int)

    def add(self, kind: str, message: str, *, event_id: str | None = None, index: int | None = None,
            node: str | None = None, dedupe: bool = True) -> None:  # fmt: skip
        key = (kind, event_id, index, message)
        existing = self._seen.get(key) if dedupe else None
        if existing is not None:
            if node is not None and node not in existing.nodes:
                existing.nodes.append(node)
            return
        self.report.counts[kind] += 1
        violation = Violation(kind, message, event_id, index, [node] if node is not None else [])
        if dedupe:
            self._seen[key] = violation
        if self._kept[kind] < MAX_REPORTED_PER_KIND:
            self._kept[kind] += 1
            self.report.violations.append(violation)


class _Event(NamedTuple):
    id: str
    aggregate: str
    version: int
    log_index: int
    key: str | None


class _Append(NamedTuple):
    key: str
    aggregate: str
    id: str | None
    expected_version: int | None
    status: str
    log_index: int | None
    version: int | None
    error_code: str | None


class _Read(NamedTuple):
    aggregate: str
    from_version: int
    limit: int
    min_index: int
    events: tuple[tuple[str, int, int], ...]
    node: str


_STATUSES = frozenset(("ok", "fail", "info"))


def _bad(what: str, record: object) -> ValidationError:
    return ValidationError(f"history: {what}: {str(record)[:200]}")


def _opt_int(record: Mapping[str, Any], name: str) -> int | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer or null", record)
    return value


def _str(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string", record)
    return value


def _parse_history(history: Iterable[Mapping[str, Any]], report: Report) -> tuple[list[_Append], list[_Read]]:
    appends: list[_Append] = []
    reads: list[_Read] = []
    for record in history:
        if type(record) is not dict and not isinstance(record, Mapping):
            raise _bad("each operation must be an object", record)
        report.operations += 1
        status = record.get("status")
        if status not in _STATUSES:
            raise _bad("status must be ok, fail or info", record)
        op = record.get("op")
        if op == "append":
            # The hot loop of a 20,000-operation check: plain gets and type() tests.
            report.appends += 1
            if status == "ok":
                report.acknowledged += 1
            elif status == "fail":
                report.failed += 1
            else:
                report.info += 1
            get = record.get
            key, aggregate, raw_id = get("key"), get("aggregate"), get("id")
            expected, log_index, version = get("expected_version"), get("index"), get("version")
            if type(key) is not str or type(aggregate) is not str:
                raise _bad("key and aggregate must be strings", record)
            if raw_id is not None and type(raw_id) is not str:
                raise _bad("id must be a string or null", record)
            for value in (expected, log_index, version):
                if value is not None and type(value) is not int:
                    raise _bad("expected_version, index and version must be integers or null", record)
            if status == "ok" and (log_index is None or version is None):
                raise _bad("an ok append needs its index and version", record)
            code = get("error_code")
            code = None if code is None else str(code)
            appends.append(_Append(key, aggregate, raw_id, expected, status, log_index, version, code))
        elif op == "read":
            report.reads += 1
            if status != "ok":
                continue
            raw_events = record.get("events")
            if not isinstance(raw_events, list):
                raise _bad("an ok read needs its events", record)
            events = []
            for item in raw_events:
                if not isinstance(item, list | tuple) or len(item) != 3:
                    raise _bad("read events are [id, index, version]", record)
                event_id, index, version = item
                if type(event_id) is not str or type(index) is not int or type(version) is not int:
                    raise _bad("read events are [id, index, version]", record)
                events.append((event_id, index, version))
            reads.append(
                _Read(
                    aggregate=_str(record, "aggregate"),
                    from_version=_opt_int(record, "from_version") or 1,
                    limit=_opt_int(record, "limit") or 1_000_000_000,
                    min_index=_opt_int(record, "min_index") or 0,
                    events=tuple(events),
                    node=str(record.get("node", "?")),
                )
            )
        else:
            raise _bad("op must be append or read", record)
    return appends, reads


def _parse_log(node: str, events: Sequence[Mapping[str, Any]]) -> list[_Event]:
    out: list[_Event] = []
    append = out.append
    for event in events:
        try:
            event_id, aggregate = event["id"], event["aggregate_id"]
            version, index = event["version"], event["index"]
        except (KeyError, TypeError, IndexError):
            raise ValidationError(f"final log of {node}: event without id/aggregate_id/version/index") from None
        # type() rather than isinstance: a bool is not a version (and it is faster).
        if type(event_id) is not str or type(aggregate) is not str:
            raise ValidationError(f"final log of {node}: id and aggregate_id must be strings")
        if type(version) is not int or type(index) is not int:
            raise ValidationError(f"final log of {node}: version and index must be integers")
        payload = event.get("payload")
        key = payload.get(KEY_FIELD) if type(payload) is dict else None
        append(_Event(event_id, aggregate, version, index, key if type(key) is str else None))
    return out


def check(
    history: Iterable[Mapping[str, Any]],
    final_logs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    complete_nodes: Collection[str] | None = None,
) -> Report:
    """Check ``history`` against every node's final log. ``complete_nodes``: the nodes that
    must hold every acknowledged append (default: all of ``final_logs``); pass the nodes
    that finished and caught up when a node was left dead or partitioned."""
    report = Report()
    found = _Collector(report)
    appends, reads = _parse_history(history, report)
    logs = {node: _parse_log(node, events) for node, events in final_logs.items()}
    required = list(logs) if complete_nodes is None else list(complete_nodes)
    missing = [n for n in required if n not in logs]
    if missing:
        raise ValidationError(f"complete_nodes {missing} have no final log")

    by_key: dict[str, list[_Append]] = defaultdict(list)
    key_of_id: dict[str, str] = {}
    may_appear: dict[str, bool] = {}  # key -> some attempt was ok or info
    for a in appends:
        by_key[a.key].append(a)
        may_appear[a.key] = may_appear.get(a.key, False) or a.status != "fail"
        if a.id is not None:
            key_of_id.setdefault(a.id, a.key)

    # Per node: shape of the log, then duplicates / phantoms / failed-but-present.
    positions: dict[str, dict[str, _Event]] = {}  # node -> key -> event
    for node, log in logs.items():
        report.log_lengths[node] = len(log)
        positions[node] = _check_one_log(node, log, by_key, may_appear, key_of_id, found)

    # 3: one order. Compare every log with the longest; the longest is also the reference
    # for reads, since every replica's log must be a prefix of it.
    reference_node = max(sorted(logs), key=lambda n: len(logs[n]), default=None)
    reference = logs[reference_node] if reference_node is not None else []
    for node, log in logs.items():
        if node == reference_node:
            continue
        report.behind[node] = len(reference) - len(log)
        first_bad: int | None = None
        bad = 0
        for mine, theirs in zip(log, reference, strict=False):
            if (mine.id, mine.aggregate, mine.version) != (theirs.id, theirs.aggregate, theirs.version):
                bad += 1
                if first_bad is None:
                    first_bad = mine.log_index
                    found.add(
                        "divergent",
                        f"{node} has {mine.id} ({mine.aggregate} v{mine.version}) where {reference_node} has "
                        f"{theirs.id} ({theirs.aggregate} v{theirs.version})",
                        event_id=mine.id,
                        index=mine.log_index,
                        node=node,
                        dedupe=False,
                    )
        if bad > 1:
            # Count every disagreeing index, but report each node's divergence once.
            report.counts["divergent"] += bad - 1

    # 1: every acknowledged append, on every required node, where it was acknowledged.
    for a in appends:
        if a.status != "ok":
            continue
        if a.expected_version is not None and a.version != a.expected_version + 1:
            found.add(
                "wrong_position",
                f"acknowledged with version {a.version} but expected_version was {a.expected_version}",
                event_id=a.id,
                index=a.log_index,
            )
        for node in required:
            event = positions[node].get(a.key)
            if event is None:
                found.add(
                    "lost",
                    f"acknowledged append {a.key} ({a.aggregate} v{a.version}) is missing",
                    event_id=a.id,
                    index=a.log_index,
                    node=node,
                )
            elif (event.log_index, event.version, event.aggregate) != (a.log_index, a.version, a.aggregate) or (
                a.id is not None and event.id != a.id
            ):
                found.add(
                    "wrong_position",
                    f"acknowledged as {a.id} {a.aggregate} v{a.version} at {a.log_index}, log has {event.id} "
                    f"{event.aggregate} v{event.version} at {event.log_index}",
                    event_id=a.id,
                    index=a.log_index,
                    node=node,
                )

    # 4: reads are windows of the final history and see what they asked for.
    if reads:
        _check_reads(reads, reference, found)
    return report


def _check_one_log(
    node: str,
    log: list[_Event],
    by_key: Mapping[str, list[_Append]],
    may_appear: Mapping[str, bool],
    key_of_id: Mapping[str, str],
    found: _Collector,
) -> dict[str, _Event]:
    seen_ids: dict[str, int] = {}
    seen_keys: dict[str, _Event] = {}
    next_version: dict[str, int] = {}
    index_gap_reported = False
    for position, event in enumerate(log, start=1):
        if event.log_index != position and not index_gap_reported:
            index_gap_reported = True  # every later index is off too: one report per log
            found.add(
                "index_gap",
                f"log position {position} holds index {event.log_index}",
                event_id=event.id,
                index=event.log_index,
                node=node,
            )
        expected = next_version.get(event.aggregate, 1)
        if event.version != expected:
            found.add(
                "version_gap",
                f"{event.aggregate} goes from v{expected - 1} to v{event.version}",
                event_id=event.id,
                index=event.log_index,
                node=node,
            )
        next_version[event.aggregate] = event.version + 1
        if event.id in seen_ids:
            found.add(
                "duplicate",
                f"event id also at index {seen_ids[event.id]}",
                event_id=event.id,
                index=event.log_index,
                node=node,
            )
        else:
            seen_ids[event.id] = event.log_index
        key = event.key if event.key is not None else key_of_id.get(event.id)
        appearable = may_appear.get(key) if key is not None else None
        if key is None or appearable is None:
            found.add("phantom", "no client appended this event", event_id=event.id, index=event.log_index, node=node)
            continue
        if key in seen_keys:
            found.add(
                "duplicate",
                f"append {key} also at index {seen_keys[key].log_index} (as {seen_keys[key].id})",
                event_id=event.id,
                index=event.log_index,
                node=node,
            )
            continue
        seen_keys[key] = event
        if not appearable:
            codes = sorted({a.error_code or "?" for a in by_key[key]})
            found.add(
                "failed_present",
                f"append {key} got only definite failures ({', '.join(codes)}) but is in the log",
                event_id=event.id,
                index=event.log_index,
                node=node,
            )
    return seen_keys


def _check_reads(reads: list[_Read], reference: list[_Event], found: _Collector) -> None:
    by_aggregate: dict[str, list[_Event]] = defaultdict(list)
    for event in reference:
        by_aggregate[event.aggregate].append(event)
    for read in reads:
        # Versions are gap-free (or version_gap is reported), so version v is element v-1.
        final = by_aggregate.get(read.aggregate, [])
        version = read.from_version
        problem: str | None = None
        for event_id, index, got_version in read.events:
            truth = final[version - 1] if 0 < version <= len(final) else None
            if got_version != version:
                problem = f"read returned v{got_version} where v{version} was next"
            elif truth is None:
                problem = f"read returned {event_id} as v{version}, the final log has no such version"
            elif (truth.id, truth.log_index) != (event_id, index):
                problem = f"read returned {event_id}@{index} as v{version}, final log has {truth.id}@{truth.log_index}"
            if problem is not None:
                found.add("stale_read", problem, event_id=event_id, index=index, node=read.node, dedupe=False)
                break
            version += 1
        if problem is not None or len(read.events) >= read.limit:
            continue
        # Everything at or below min_index must have been visible to the read; indexes grow
        # with versions, so the first event the read did not return is the one to look at.
        if version - 1 < len(final) and final[version - 1].log_index <= read.min_index:
            truth = final[version - 1]
            found.add(
                "stale_read",
                f"read of {read.aggregate} with min_index {read.min_index} ended before v{truth.version} "
                f"(index {truth.log_index})",
                event_id=truth.id,
                index=truth.log_index,
                node=read.node,
                dedupe=False,
            )
