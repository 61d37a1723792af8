"""A follower's forwarder once its run has ended (the node is stopping, or its log failed and
the HTTP nursery is still answering): a forward is a definite 503, never a RuntimeError from
a closed nursery (a 500). Found by the simulator (docs/simulation.md)."""

from __future__ import annotations

import pytest
import trio

from walstore.config import PeerSpec
from walstore.errors import UnavailableError
from walstore.event import NewEvent
from walstore.replication.forward import Forwarder
from walstore.runtime import REAL, Runtime, use
from walstore.sim.network import SimNetwork
from walstore.sim.trace import Trace

EVENT = NewEvent(id="e1", type="t", aggregate_id="a", payload=b"{}", metadata=b"{}")
LEADER = PeerSpec("n1", "n1", 7000)


async def test_a_forward_after_the_forwarder_stopped_is_503_shutting_down() -> None:
    forwarder = Forwarder(node_id="n0", cluster_id="c", epoch=lambda: 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    with pytest.raises(UnavailableError) as info:
        await forwarder.forward(LEADER, [EVENT], 1.0)
    assert info.value.code == "shutting_down"


async def test_stopping_while_it_dials_is_503_and_closes_the_new_connection() -> None:
    import random

    net = SimNetwork(random.Random(1), Trace().note)
    listener = net.listen("n1", "n1", 7000)
    forwarder = Forwarder(node_id="n0", cluster_id="c", epoch=lambda: 1)
    runtime = Runtime(
        network=net.endpoint("n0"),
        run_sync=REAL.run_sync,
        wall_time_ns=REAL.wall_time_ns,
        monotonic=REAL.monotonic,
        token_hex=REAL.token_hex,
    )
    use(runtime)
    outcome: list[BaseException] = []
    answered = trio.Event()
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forwarder.run)
            await trio.sleep(0.01)

            async def forward() -> None:
                try:
                    await forwarder.forward(LEADER, [EVENT], 5.0)
                except UnavailableError as exc:
                    outcome.append(exc)
                answered.set()

            outer.start_soon(forward)
            server = await listener.accept()  # the dial is in the HELLO exchange now
            nursery.cancel_scope.cancel()  # the node stops meanwhile
        # Answer the HELLO so the dial completes after the stop.
        from walstore.protocol import PeerConnection

        conn = PeerConnection("c", "n1", "server")
        while not outcome:
            data = await server.receive_some(65536)
            if not data:
                break
            conn.receive_data(data)
            if conn.next_event() is not None:
                await server.send_all(conn.send_many([conn.hello(1)]))
                break
        with trio.fail_after(5):
            await answered.wait()
    assert isinstance(outcome[0], UnavailableError) and outcome[0].code == "shutting_down"
