"""walstore.eventsourcing against a real node: the eventsourcing library's own abstract test
cases (``eventsourcing.tests.persistence`` and ``eventsourcing.tests.application``),
subclassed the way the library's sqlite and postgres tests do, plus the properties of this
module the library does not test (exact state bytes, namespaces kept apart, snapshots,
version bases, atomic 10,000-event inserts, subscriptions that stop, errors).

Every test gets a fresh ``walstore serve`` process (OS-given ports, its own DATA_DIR in a
temporary directory, stopped by its pid): the library's tests expect notification ids to
start at 1 for a new recorder, and walstore's ids are its global log indexes.
"""

from __future__ import annotations

import base64
import gc
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, ClassVar
from unittest import TestCase
from uuid import UUID, uuid4

import httpx
import orjson
import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    DataError,
    InfrastructureFactory,
    IntegrityError,
    Notification,
    OperationalError,
    ProgrammingError,
    StoredEvent,
    Tracking,
)
from eventsourcing.tests.application import ApplicationTestCase, ExampleApplicationTestCase
from eventsourcing.tests.persistence import (
    AggregateRecorderTestCase,
    ApplicationRecorderTestCase,
    InfrastructureFactoryTestCase,
    NonInterleavingNotificationIDsBaseCase,
    ProcessRecorderTestCase,
    TrackingRecorderTestCase,
)
from eventsourcing.utils import Environment
from served_node import ServedNode

from walstore.client import Client
from walstore.eventsourcing import (
    WalstoreAggregateRecorder,
    WalstoreApplicationRecorder,
    WalstoreDatastore,
    WalstoreFactory,
    WalstoreProcessRecorder,
    WalstoreSnapshotRecorder,
    WalstoreSubscription,
    WalstoreTrackingRecorder,
    WalstoreUnavailableError,
    escape,
)

pytestmark = pytest.mark.slow


def _start_node(env: dict[str, str]) -> tuple[ServedNode, tempfile.TemporaryDirectory[str]]:
    tmp = tempfile.TemporaryDirectory(prefix="walstore-es-")
    node = ServedNode([sys.executable, "-m", "walstore", "serve"], Path(tmp.name), env={**os.environ, **env})
    try:
        node.start()
    except BaseException:
        node.stop()
        tmp.cleanup()
        raise
    return node, tmp


class WithNode(TestCase):
    """A fresh single node for each test (or, with ``node_per_test`` False, one for the
    class), and a datastore on it (namespace ``test``)."""

    namespace = "test"
    node_env: ClassVar[dict[str, str]] = {}
    node_per_test: ClassVar[bool] = True
    class_node: ClassVar[ServedNode | None] = None

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        if not cls.node_per_test:
            node, tmp = _start_node(cls.node_env)
            cls.class_node = node
            cls.addClassCleanup(tmp.cleanup)
            cls.addClassCleanup(node.stop)

    def setUp(self) -> None:
        if self.class_node is not None:
            self.node = self.class_node
        else:
            self.node, tmp = _start_node(self.node_env)
            self.addCleanup(tmp.cleanup)
            # cleanups run last in, first out: the node stops after every client a test
            # (or its library tearDown) opened is closed, so its drain waits for none
            self.addCleanup(self.node.stop)
        self.datastore = WalstoreDatastore(self.node.url, namespace=self.namespace, retry_deadline=10.0)
        self.addCleanup(self.datastore.close)
        self.node_started()
        super().setUp()

    def node_started(self) -> None:
        """What a test case needs of the node before the library's setUp runs."""


class WithTextOriginatorID:
    def new_originator_id(self) -> UUID | str:
        return "test-" + str(uuid4())


# -- the library's recorder test cases -------------------------------------------------------


class TestAggregateRecorder(WithNode, AggregateRecorderTestCase):
    def create_recorder(self) -> WalstoreAggregateRecorder:
        return WalstoreAggregateRecorder(self.datastore)


class TestAggregateRecorderWithTextOriginatorID(WithTextOriginatorID, TestAggregateRecorder):
    pass


class TestApplicationRecorder(WithNode, ApplicationRecorderTestCase[WalstoreApplicationRecorder]):
    def create_recorder(self) -> WalstoreApplicationRecorder:
        return WalstoreApplicationRecorder(self.datastore)

    def test_insert_subscribe(self) -> None:
        super().optional_test_insert_subscribe()


class TestApplicationRecorderWithTextOriginatorID(WithTextOriginatorID, TestApplicationRecorder):
    pass


class TestTrackingRecorder(WithNode, TrackingRecorderTestCase):
    def create_recorder(self) -> WalstoreTrackingRecorder:
        return WalstoreTrackingRecorder(self.datastore)


class TestProcessRecorder(WithNode, ProcessRecorderTestCase):
    def create_recorder(self) -> WalstoreProcessRecorder:
        return WalstoreProcessRecorder(self.datastore)


class TestProcessRecorderWithTextOriginatorID(WithTextOriginatorID, TestProcessRecorder):
    pass


class TestNonInterleavingNotificationIDs(WithNode, NonInterleavingNotificationIDsBaseCase):
    # two threads race to insert 10,000 events each, every insert one atomic batch
    insert_num = 10_000

    def create_recorder(self) -> WalstoreApplicationRecorder:
        return WalstoreApplicationRecorder(self.datastore)


class TestInfrastructureFactory(WithNode, InfrastructureFactoryTestCase[WalstoreFactory]):
    # the factory's tests build recorders and mappers but store nothing: one node will do
    node_per_test = False

    def expected_factory_class(self) -> type[WalstoreFactory]:
        return WalstoreFactory

    def expected_aggregate_recorder_class(self) -> type[WalstoreAggregateRecorder]:
        return WalstoreAggregateRecorder

    def expected_application_recorder_class(self) -> type[WalstoreApplicationRecorder]:
        return WalstoreApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[WalstoreTrackingRecorder]:
        return WalstoreTrackingRecorder

    class WalstoreTrackingRecorderSubclass(WalstoreTrackingRecorder):
        pass

    def tracking_recorder_subclass(self) -> type[WalstoreTrackingRecorder]:
        return self.WalstoreTrackingRecorderSubclass

    def expected_process_recorder_class(self) -> type[WalstoreProcessRecorder]:
        return WalstoreProcessRecorder

    def node_started(self) -> None:
        # InfrastructureFactoryTestCase.setUp (next in line) builds the factory from this
        self.env = Environment("TestCase")
        self.env[InfrastructureFactory.PERSISTENCE_MODULE] = WalstoreFactory.__module__
        self.env[WalstoreFactory.WALSTORE_URLS] = self.node.url

    def test_snapshot_recorder(self) -> None:
        recorder = self.factory.aggregate_recorder("snapshots")
        self.assertIsInstance(recorder, WalstoreSnapshotRecorder)

    def test_construct_raises_environment_error_when_urls_missing(self) -> None:
        del self.env[WalstoreFactory.WALSTORE_URLS]
        with self.assertRaises(EnvironmentError) as cm:
            InfrastructureFactory.construct(self.env)
        self.assertEqual(
            cm.exception.args[0],
            "walstore node URLs not found in environment with keys: TESTCASE_WALSTORE_URLS, WALSTORE_URLS",
        )

    def test_environment_error_raised_when_timeout_not_seconds(self) -> None:
        for key in (WalstoreFactory.WALSTORE_TIMEOUT, WalstoreFactory.WALSTORE_RETRY_DEADLINE):
            for bad in ("abc", "0", "-1"):
                self.env[key] = bad
                with self.assertRaises(EnvironmentError):
                    WalstoreFactory(self.env)
            del self.env[key]

    def test_namespace_is_the_application_name_unless_given(self) -> None:
        self.assertEqual(WalstoreFactory(self.env).datastore.namespace, "TestCase")
        self.env[WalstoreFactory.WALSTORE_NAMESPACE] = "shared"
        self.assertEqual(WalstoreFactory(self.env).datastore.namespace, "shared")


# -- the library's application test cases ----------------------------------------------------


class WithNodeEnviron(WithNode):
    """Applications read os.environ: the persistence module and the node's URL."""

    expected_factory_topic = "walstore.eventsourcing:WalstoreFactory"

    def node_started(self) -> None:
        os.environ["PERSISTENCE_MODULE"] = "walstore.eventsourcing"
        os.environ["WALSTORE_URLS"] = self.node.url
        self.addCleanup(self._close_applications_clients)

    def _close_applications_clients(self) -> None:
        # The library's application tests do not close their applications: their idle
        # keep-alive connections would hold the node's graceful stop for its grace period.
        gc.collect()
        for obj in gc.get_objects():
            if isinstance(obj, WalstoreDatastore) and obj.urls == [self.node.url]:
                obj.close()

    def tearDown(self) -> None:
        del os.environ["PERSISTENCE_MODULE"]
        del os.environ["WALSTORE_URLS"]
        super().tearDown()


class TestApplicationWithWalstore(WithNodeEnviron, ApplicationTestCase):
    pass


class TestExampleApplicationWithWalstore(WithNodeEnviron, ExampleApplicationTestCase):
    pass


# -- what the library's test cases do not cover -----------------------------------------------


def _event(originator_id: UUID | str, version: int, topic: str = "topic", state: bytes = b"{}") -> StoredEvent:
    return StoredEvent(originator_id=originator_id, originator_version=version, topic=topic, state=state)


class _CountingTransport(httpx.BaseTransport):
    """httpx's transport, counting the events the server's log reads (GET /events) carry."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.log_events_received = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method != "GET" or request.url.path != "/events":
            return response
        content = response.read()
        self.log_events_received += len(orjson.loads(content)["events"])
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    def close(self) -> None:
        self.inner.close()


class TestWalstoreMapping(WithNode):
    def recorder(self, namespace: str | None = None) -> WalstoreApplicationRecorder:
        if namespace is None:
            return WalstoreApplicationRecorder(self.datastore)
        datastore = WalstoreDatastore(self.node.url, namespace=namespace, retry_deadline=10.0)
        self.addCleanup(datastore.close)
        return WalstoreApplicationRecorder(datastore)

    def test_state_bytes_are_stored_exactly(self) -> None:
        recorder = self.recorder()
        states = [bytes(range(256)), b"", b"\xff\xfe not utf-8", b'{"json": "text"}', bytes(70_000)]
        originator_id = uuid4()
        ids = recorder.insert_events([_event(originator_id, 1 + i, state=s) for i, s in enumerate(states)])
        self.assertEqual(ids, [1, 2, 3, 4, 5])
        self.assertEqual([e.state for e in recorder.select_events(originator_id)], states)
        self.assertEqual([n.state for n in recorder.select_notifications(None, 10)], states)
        # walstore holds them as payload_base64, and what a plain reader sees is the same
        with Client(self.node.url) as client:
            (first,) = client.read_aggregate(recorder.aggregate_id(originator_id), limit=1)
        self.assertEqual(first.payload_bytes, states[0])
        self.assertEqual(first.raw["payload_base64"], base64.b64encode(states[0]).decode())
        self.assertEqual(first.type, "topic")
        self.assertEqual(first.aggregate_id, f"test:events:{originator_id}")

    def test_namespaces_share_a_node_apart(self) -> None:
        one, two = self.recorder("one"), self.recorder("two")
        # "one:events" escapes to a namespace that "one" is not a prefix of, and back
        tricky = self.recorder("one:events")
        originator_id = uuid4()
        self.assertEqual(one.insert_events([_event(originator_id, 1, "a")]), [1])
        self.assertEqual(two.insert_events([_event(originator_id, 1, "b"), _event(originator_id, 2, "b")]), [2, 3])
        self.assertEqual(tricky.insert_events([_event(originator_id, 1, "c")]), [4])
        self.assertEqual(one.insert_events([_event(originator_id, 2, "a")]), [5])
        self.assertEqual([n.id for n in one.select_notifications(None, 10)], [1, 5])
        self.assertEqual([n.id for n in two.select_notifications(None, 10)], [2, 3])
        self.assertEqual([n.id for n in tricky.select_notifications(None, 10)], [4])
        self.assertEqual([n.id for n in two.select_notifications(2, 10, inclusive_of_start=False)], [3])
        self.assertEqual([n.id for n in one.select_notifications(2, 10, stop=4)], [])
        self.assertEqual(
            (one.max_notification_id(), two.max_notification_id(), tricky.max_notification_id()), (5, 3, 4)
        )
        self.assertEqual([e.originator_version for e in one.select_events(originator_id)], [1, 2])
        self.assertEqual(one.select_notifications(None, 10, topics=["b"]), [])
        self.assertEqual(self.recorder("three").max_notification_id(), None)
        self.assertEqual(escape("one:events"), "one%3Aevents")

    def test_the_server_filters(self) -> None:
        """An application's reads get only its own events from the server, none of the
        neighbour's (so nothing is picked out on the client), also when the server's scan
        budget (10,000 events a request) ends a page before anything matched."""
        neighbour = self.recorder("neighbour")
        counting = _CountingTransport()
        datastore = WalstoreDatastore(self.node.url, namespace="test", transport=counting)
        self.addCleanup(datastore.close)
        recorder = WalstoreApplicationRecorder(datastore)
        originator_id = uuid4()
        recorder.insert_events([_event(originator_id, 1, "mine")])
        neighbour.insert_events([_event(uuid4(), 1 + i, "mine") for i in range(10_000)])
        neighbour.insert_events([_event(uuid4(), 1 + i, "mine") for i in range(2_000)])
        self.assertEqual(recorder.max_notification_id(), 1)  # 12,000 events back
        recorder.insert_events([_event(originator_id, 2, "other")])
        self.assertEqual([n.id for n in recorder.select_notifications(None, 10)], [1, 12_002])
        self.assertEqual([n.id for n in recorder.select_notifications(2, 10)], [12_002])
        self.assertEqual([n.id for n in recorder.select_notifications(None, 10, topics=["other"])], [12_002])
        self.assertEqual(recorder.select_notifications(2, 10, stop=12_001), [])
        self.assertEqual(recorder.max_notification_id(), 12_002)
        self.assertEqual(neighbour.max_notification_id(), 12_001)
        with recorder.subscribe(gt=1) as subscription:
            self.assertEqual(next(subscription).id, 12_002)
        # each read got its own events, and the read with stop one past it (12,002: the
        # API has no upper bound for a log read, so a page may end beyond stop)
        self.assertEqual(counting.log_events_received, 1 + 2 + 1 + 1 + 1 + 1)

    def test_text_ids_with_separators_round_trip(self) -> None:
        recorder = self.recorder("app/with:odd%name")
        originator_id = "a/b:c%d"
        recorder.insert_events([_event(originator_id, 1), _event(originator_id, 2)])
        self.assertEqual([e.originator_id for e in recorder.select_events(originator_id)], [originator_id] * 2)
        (n1, n2) = recorder.select_notifications(None, 10)
        self.assertEqual((n1.originator_id, n2.originator_version), (originator_id, 2))
        self.assertEqual(recorder.aggregate_prefix, "app%2Fwith%3Aodd%25name:events:")

    def test_versions_from_any_base(self) -> None:
        writer = self.recorder()
        zero, five = uuid4(), uuid4()
        writer.insert_events([_event(zero, 0), _event(five, 5), _event(five, 6)])
        # a process that has not seen them learns each base from the conflict its guess gets
        later = self.recorder("test")
        later.insert_events([_event(zero, 1), _event(zero, 2), _event(five, 7)])
        self.assertEqual([e.originator_version for e in later.select_events(zero)], [0, 1, 2])
        fresh = self.recorder("test")
        self.assertEqual([e.originator_version for e in fresh.select_events(five, gt=5)], [6, 7])
        self.assertEqual([e.originator_version for e in fresh.select_events(zero, lte=1, desc=True)], [1, 0])
        self.assertEqual([e.originator_version for e in fresh.select_events(zero, gt=0, lte=1)], [1])
        self.assertEqual(fresh.select_events(five, gt=7), [])
        for recorder in (writer, later, self.recorder("test")):
            with self.assertRaises(IntegrityError):
                recorder.insert_events([_event(zero, 2)])
            with self.assertRaises(IntegrityError):
                recorder.insert_events([_event(five, 4)])
        self.assertEqual(writer.max_notification_id(), 6)

    def test_two_writers_of_one_version(self) -> None:
        one, other = self.recorder(), self.recorder("test")
        originator_id = uuid4()
        one.insert_events([_event(originator_id, 1)])
        with self.assertRaises(IntegrityError):
            other.insert_events([_event(originator_id, 1, state=b"other")])
        other.insert_events([_event(originator_id, 2)])
        with self.assertRaises(IntegrityError):
            one.insert_events([_event(originator_id, 2, state=b"late")])
        self.assertEqual([e.state for e in one.select_events(originator_id)], [b"{}", b"{}"])

    def test_gaps_in_one_insert_are_refused(self) -> None:
        recorder = self.recorder()
        with self.assertRaises(ProgrammingError):
            recorder.insert_events([_event(uuid4(), 1), _event(uuid4(), 1), _event("x", 1), _event("x", 3)])
        self.assertIsNone(recorder.max_notification_id())

    def test_ten_thousand_events_are_one_atomic_batch(self) -> None:
        recorder = self.recorder()
        existing = uuid4()
        recorder.insert_events([_event(existing, 1)])
        big = uuid4()
        events = [_event(big, 1 + i, "big") for i in range(9_999)]
        with self.assertRaises(IntegrityError):
            recorder.insert_events([*events, _event(existing, 1)])  # the last one conflicts
        self.assertEqual(recorder.select_events(big), [])
        self.assertEqual(recorder.max_notification_id(), 1)
        ids = recorder.insert_events([*events, _event(existing, 2)])
        self.assertEqual(ids, list(range(2, 10_002)))
        self.assertEqual(len(recorder.select_notifications(None, 20_000, topics=["big"])), 9_999)
        self.assertEqual(recorder.select_events(big, desc=True, limit=1)[0].originator_version, 9_999)

    def test_topics_the_server_cannot_filter_by(self) -> None:
        recorder = self.recorder()
        with self.assertRaises(ProgrammingError):
            recorder.select_notifications(None, 10, topics=["a,b"])
        with self.assertRaises(DataError):  # walstore's event types are at most 256 bytes
            recorder.insert_events([_event(uuid4(), 1, topic="t" * 257)])

    def test_subscription_filters_and_stops_from_another_thread(self) -> None:
        recorder, neighbour = self.recorder(), self.recorder("neighbour")
        originator_id = uuid4()
        recorder.insert_events([_event(originator_id, 1, "a"), _event(originator_id, 2, "b")])
        neighbour.insert_events([_event(originator_id, 1, "a")])
        with recorder.subscribe(gt=None, topics=["a"]) as subscription:
            assert isinstance(subscription, WalstoreSubscription)
            first = next(subscription)
            recorder.insert_events([_event(originator_id, 3, "b"), _event(originator_id, 4, "a")])
            second = next(subscription)
            self.assertEqual([(n.id, n.topic) for n in (first, second)], [(1, "a"), (5, "a")])
            # nothing more will come: stop() from elsewhere ends the blocked iteration
            stopper = threading.Thread(target=subscription.stop)
            stopper.start()
            self.assertEqual(list(subscription), [])
            stopper.join()
        subscription._thread.join()  # the stream's reader ended too
        self.assertFalse(subscription._thread.is_alive())

    def test_subscription_resumes_after_gt(self) -> None:
        recorder = self.recorder()
        recorder.insert_events([_event(uuid4(), 1) for _ in range(3)])
        with recorder.subscribe(gt=2) as subscription:
            notification: Notification = next(subscription)
        self.assertEqual(notification.id, 3)

    def test_tracking_is_a_consumer_named_for_both_applications(self) -> None:
        downstream = WalstoreProcessRecorder(self.datastore)
        other_datastore = WalstoreDatastore(self.node.url, namespace="other", retry_deadline=10.0)
        self.addCleanup(other_datastore.close)
        other = WalstoreProcessRecorder(other_datastore)
        downstream.insert_events([_event(uuid4(), 1)], tracking=Tracking("up:stream", 7))
        other.insert_tracking(Tracking("up:stream", 3))
        with Client(self.node.url) as client:
            self.assertEqual(client.consumer_position("test:tracking:up%3Astream"), 7)
            self.assertEqual(client.consumer_position("other:tracking:up%3Astream"), 3)
        self.assertEqual((downstream.max_tracking_id("up:stream"), other.max_tracking_id("up:stream")), (7, 3))
        with self.assertRaises(IntegrityError):  # and nothing of it is stored
            downstream.insert_events([_event(uuid4(), 1)], tracking=Tracking("up:stream", 7))
        self.assertEqual(downstream.max_notification_id(), 1)
        with self.assertRaises(DataError):
            downstream.insert_tracking(Tracking("up:stream", 0))


class TestSnapshots(WithNode):
    def test_snapshots(self) -> None:
        snapshots = WalstoreSnapshotRecorder(self.datastore)
        events = WalstoreApplicationRecorder(self.datastore)
        originator_id = uuid4()
        self.assertIsNone(snapshots.insert_events([_event(originator_id, 2, state=b"v2")]))
        snapshots.insert_events([_event(originator_id, 4, state=b"v4"), _event(uuid4(), 9)])

        def versions(**kwargs: Any) -> list[int]:
            return [e.originator_version for e in snapshots.select_events(originator_id, **kwargs)]

        self.assertEqual(versions(), [2, 4])
        self.assertEqual(versions(desc=True, limit=1), [4])
        self.assertEqual(versions(desc=True, limit=1, lte=3), [2])
        self.assertEqual(versions(desc=True, limit=1, lte=1), [])
        self.assertEqual(versions(gt=2), [4])
        self.assertEqual(versions(lte=3), [2])
        self.assertEqual(versions(limit=1), [2])
        # at or below the newest: not stored (that one is newer), and no error
        snapshots.insert_events([_event(originator_id, 3, state=b"v3")])
        snapshots.insert_events([_event(originator_id, 4, state=b"v4 again")])
        self.assertEqual([e.state for e in snapshots.select_events(originator_id)], [b"v2", b"v4"])
        snapshots.insert_events([_event(originator_id, 10, state=b"v10")])
        self.assertEqual(versions(desc=True), [10, 4, 2])
        # snapshots are not the application's notifications
        self.assertIsNone(events.max_notification_id())
        self.assertEqual(events.select_events(originator_id), [])


class TestUnreachable(TestCase):
    def test_unreachable_cluster_is_an_operational_error(self) -> None:
        from walstore.election.etcd_process import free_ports

        (port,) = free_ports(1)  # nothing listens there
        datastore = WalstoreDatastore(f"http://127.0.0.1:{port}", namespace="x", timeout=0.5, retry_deadline=0.5)
        self.addCleanup(datastore.close)
        recorder = WalstoreProcessRecorder(datastore)
        calls: list[Any] = [
            lambda: recorder.insert_events([_event(uuid4(), 1)]),
            lambda: recorder.select_notifications(None, 1),
            lambda: recorder.max_notification_id(),
            lambda: recorder.max_tracking_id("up"),
        ]
        for call in calls:
            with self.assertRaises(OperationalError) as cm:
                call()
            self.assertIsInstance(cm.exception, WalstoreUnavailableError)


def test_an_application_on_walstore(tmp_path: Path) -> None:
    """The shortest use: the two environment variables, and an application."""
    with ServedNode([sys.executable, "-m", "walstore", "serve"], tmp_path) as node:
        env = {"PERSISTENCE_MODULE": "walstore.eventsourcing", "WALSTORE_URLS": node.url}
        with Application[UUID](env=env) as app:
            aggregate = Aggregate()
            aggregate.trigger_event(Aggregate.Event)
            app.save(aggregate)
            copy: Aggregate = app.repository.get(aggregate.id)
            assert copy.version == 2
            items = app.notification_log.select(start=1, limit=10)
            assert [n.id for n in items] == [1, 2]


del AggregateRecorderTestCase
del ApplicationRecorderTestCase
del TrackingRecorderTestCase
del ProcessRecorderTestCase
del NonInterleavingNotificationIDsBaseCase
del InfrastructureFactoryTestCase
del ApplicationTestCase
del ExampleApplicationTestCase
