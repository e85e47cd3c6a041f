"""Per-rank connection evidence, from ZMQ socket monitors on the ranks' dispatch sockets.

A load report names its rank, but every rank sends to the one shared report socket, so
the frame itself proves nothing: without CURVE any process that reaches that socket can
send one. Each rank's dispatch socket, though, is that rank's own. A rank process connects
a PULL socket to it before it says hello; the kernel closes that connection when the
process exits; a restarted process opens a new one.

libzmq's socket monitor (``zmq_socket_monitor(3)``; pyzmq ``Socket.get_monitor_socket``,
``zmq.utils.monitor.parse_monitor_message``) reports, on an inproc PAIR socket the loop
polls with the rest (no extra thread):

* ``ZMQ_EVENT_ACCEPTED``: a connection was accepted; the value is its file descriptor;
* ``ZMQ_EVENT_HANDSHAKE_SUCCEEDED`` (libzmq >= 4.3): its ZMTP handshake completed, so the
  peer is a ZMQ socket of a type that may talk to a PUSH (a PULL), and under CURVE it passed
  authentication; the value is 0;
* ``ZMQ_EVENT_DISCONNECTED``: a connection closed (also one that failed its handshake);
  the value is its file descriptor.

From these the controller knows, per rank:

* whether any connection to its dispatch socket is open (:meth:`ConnectionWatch.connected`):
  reports for a rank nobody is connected as are not signs of life;
* whether the rank really reconnected since its current life began
  (:meth:`ConnectionWatch.reconnected`): a connection that was open when the life began
  has closed, and a new one completed its handshake after that, within a window. A
  process that is not the rank cannot close the rank's connection, so a forged report with
  a new epoch gets no such evidence, even when its sender opens connections of its own.

Events are stamped when the loop reads them (a stalled loop reads them late, together with
the reports that came meanwhile). Before judging a rank, the loop reads that rank's
pending events, so a connection accepted just before the report is seen.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import zmq
from zmq.utils.monitor import parse_monitor_message

#: What the monitors report (everything else stays inside libzmq).
EVENTS = int(zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
#: Monitor events read per rank per call: a storm of connections cannot hold the loop.
EVENTS_PER_READ = 256

_ACCEPTED = int(zmq.EVENT_ACCEPTED)
_HANDSHAKE = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)


class ConnectionWatch:
    """Connections to each rank's dispatch socket, and whether a rank really reconnected.

    :param sockets: The dispatch sockets, one per rank (bound by the controller).
    """

    def __init__(self, sockets: Sequence[zmq.Socket]) -> None:  # type: ignore[type-arg]
        self.monitors: list[zmq.Socket] = []  # type: ignore[type-arg]
        try:
            for s in sockets:
                m = s.get_monitor_socket(EVENTS)
                m.linger = 0
                self.monitors.append(m)
        except BaseException:
            self.close()
            raise
        #: monitor socket -> rank (the loop looks its poll events up here).
        self.rank_of = {m: r for r, m in enumerate(self.monitors)}
        n = len(self.monitors)
        now = time.monotonic()
        # Per rank: open connections (fd -> when accepted); when the current life began; whether
        # a connection older than that life closed since; when a handshake followed that close.
        self._open: list[dict[int, float]] = [{} for _ in range(n)]
        self._life_began = [now] * n
        self._old_closed = [False] * n
        self._handshake_at: list[float | None] = [None] * n

    def read(self, rank: int) -> None:
        """Apply the monitor events waiting for *rank* (never blocks)."""
        mon = self.monitors[rank]
        conns = self._open[rank]
        for _ in range(EVENTS_PER_READ):
            try:
                frames = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                ev = parse_monitor_message(frames)
            except (RuntimeError, ValueError):  # libzmq writes these frames; never expected
                continue
            kind, value, now = int(ev["event"]), int(ev["value"]), time.monotonic()
            if kind == _ACCEPTED:
                conns[value] = now
            elif kind == _DISCONNECTED:
                born = conns.pop(value, None)
                if born is not None and born <= self._life_began[rank]:
                    self._old_closed[rank] = True
                    self._handshake_at[rank] = None  # only a handshake after this close counts
            elif kind == _HANDSHAKE:
                self._handshake_at[rank] = now

    def connected(self, rank: int) -> bool:
        """Whether some connection to *rank*'s dispatch socket is open."""
        if not self._open[rank]:
            self.read(rank)
        return bool(self._open[rank])

    def reconnected(self, rank: int, now: float, window_s: float) -> bool:
        """Whether *rank* reconnected since its current life began: a connection older than
        the life closed, and a new handshake followed, at most *window_s* before *now*."""
        self.read(rank)
        at = self._handshake_at[rank]
        return self._old_closed[rank] and at is not None and now - at <= window_s

    def begin_life(self, rank: int, now: float) -> None:
        """*rank* began a new life: connections open now are its; evidence so far is used."""
        self.read(rank)
        self._life_began[rank] = now
        self._old_closed[rank] = False
        self._handshake_at[rank] = None

    def open_connections(self) -> list[int]:
        """Open connections per rank (for the status snapshot)."""
        return [len(c) for c in self._open]

    def close(self) -> None:
        for m in self.monitors:
            m.close(linger=0)
        self.monitors = []
