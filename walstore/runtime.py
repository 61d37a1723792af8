"""What a node takes from the world outside its own code: peer sockets, threads for blocking
calls, the wall clock, and random identity bits.

In production every node runs on ``REAL``: TCP through trio, blocking disk calls in worker
threads, the WAL writer in a thread of its own, ``time.time_ns``, ``secrets``. The
deterministic simulator (``walstore.sim``) runs several nodes in one trio run on a virtual
clock and gives each a ``Runtime`` of its own: an in-memory network it can drop, delay,
reorder and partition, blocking calls run inline (the simulated disk never blocks), the
writer as a task, and time and randomness drawn from the run's seed. The node's code is the
same code in both; only these seams differ (docs/simulation.md).

The current runtime is a context variable: ``Node.run`` sets it, and every task the node
starts inherits it (trio copies the spawner's context into each new task), so the seams do
not have to be threaded through every constructor. No trio import at module level: the
WAL's codec modules use ``current()`` and must stay free of trio (docs/architecture.md).
"""

from __future__ import annotations

import contextvars
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import trio

T = TypeVar("T")


class Network(Protocol):
    """Peer connections: what ``replication.transport`` dials and listens with."""

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        """A byte stream to host:port; OSError when it cannot be reached."""

    async def listen(self, host: str, port: int) -> tuple[list[trio.abc.Listener[Any]], int]:
        """Listeners on host:port (0: any free port) and the port bound."""

    def remote_name(self, stream: trio.abc.Stream) -> str:
        """host:port of the other end of an accepted stream, for log lines."""


class TcpNetwork:
    """The production network: TCP through trio."""

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        import trio

        return await trio.open_tcp_stream(host, port)

    async def listen(self, host: str, port: int) -> tuple[list[trio.abc.Listener[Any]], int]:
        import trio

        listeners = await trio.open_tcp_listeners(port, host=host)
        return list(listeners), listeners[0].socket.getsockname()[1]

    def remote_name(self, stream: trio.abc.Stream) -> str:
        try:
            host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        except (OSError, AttributeError):
            return "?"
        return f"{host}:{port}"


async def _in_thread(fn: Callable[..., T], *args: object) -> T:
    import trio

    return await trio.to_thread.run_sync(fn, *args)


@dataclass(frozen=True)
class Runtime:
    """One node's seams (see the module docstring)."""

    network: Network
    # A blocking call (a metadata fsync, opening the log): a worker thread in production.
    run_sync: Callable[..., Awaitable[Any]]
    wall_time_ns: Callable[[], int]
    # Health and metrics ages (never a safety decision; those use trio's clock).
    monotonic: Callable[[], float]
    token_hex: Callable[[int], str]
    # The WAL writer as a task of the event loop instead of a thread (the simulator).
    inline_writer: bool = False
    # Inline writer only: virtual seconds each write + fdatasync round takes (latency spikes).
    disk_delay_s: Callable[[], float] | None = None
    # The client and probe HTTP ports (the simulator drives the node's service directly).
    serve_http: bool = True


REAL = Runtime(
    network=TcpNetwork(),
    run_sync=_in_thread,
    wall_time_ns=time.time_ns,
    monotonic=time.monotonic,
    token_hex=secrets.token_hex,
)

_current: contextvars.ContextVar[Runtime] = contextvars.ContextVar("walstore_runtime", default=REAL)


def current() -> Runtime:
    """The runtime of the node whose task is running (``REAL`` outside any simulation)."""
    return _current.get()


def use(runtime: Runtime) -> contextvars.Token[Runtime]:
    """Make ``runtime`` current in this task and the tasks it starts from now on."""
    return _current.set(runtime)


def reset(token: contextvars.Token[Runtime]) -> None:
    """Undo a ``use`` (when the node's run returns)."""
    _current.reset(token)
