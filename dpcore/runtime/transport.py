"""The controller's sockets: where it listens, how it wakes, how it answers senders.

All sockets are bound here (senders and ranks connect):

* **ingress** (PULL): ``req`` and ``ctl`` messages from any number of senders;
* **report** (PULL): load reports from the ranks;
* **dispatch[r]** (PUSH, one per rank, bounded ``SNDHWM``): see :mod:`dpcore.runtime.outbox`;
* a monitor per rank socket (:mod:`dpcore.runtime.connwatch`): who is connected as that rank;
* a socketpair that wakes the poller from other threads and from signal handlers;
* reply PUSH sockets, one per sender endpoint (LRU), for rejections and failures.

The poller is built here too, and only the loop thread polls it.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import structlog
import zmq
from attrs import frozen

from dpcore import security, wire
from dpcore.runtime.books import Books, rate_limited
from dpcore.runtime.connwatch import ConnectionWatch
from dpcore.sdk import endpoints as ep

#: How long rejections and failures may wait to reach a sender after the controller closes.
REPLY_LINGER_MS = 500
#: Reply sockets kept open (one per sender endpoint, LRU).
REPLY_SOCKETS = 256
#: Rejections/failures queued per sender: a shutdown or a dead rank can fail thousands at
#: once, possibly before the connection to that sender is even up. Frames are ~100 bytes.
REPLY_HWM = 1 << 16
#: Bytes read from the wake-up socketpair per system call.
WAKE_READ = 4096

# Plain ints: combining pyzmq's enum flags per message costs more than the send itself.
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
MORE_NOBLOCK = NOBLOCK | SNDMORE


@frozen
class ControllerEndpoints:
    """Where the controller listens. Ranks connect to ``dispatch[rank]`` and ``report``."""

    ingress: str
    report: str
    dispatch: tuple[str, ...]

    @classmethod
    def ipc(cls, run_dir: str, dp_size: int) -> ControllerEndpoints:
        return cls(
            ep.ipc(run_dir, "ingress"),
            ep.ipc(run_dir, "report"),
            tuple(ep.ipc(run_dir, f"rank{r}") for r in range(dp_size)),
        )

    @classmethod
    def tcp(cls, dp_size: int, host: str = "127.0.0.1", port_base: int = 0) -> ControllerEndpoints:
        """``port_base`` 0: random free ports; else ingress, report, rank 0, 1... from it."""
        if port_base == 0:
            return cls(f"tcp://{host}:*", f"tcp://{host}:*", tuple(f"tcp://{host}:*" for _ in range(dp_size)))
        return cls(
            f"tcp://{host}:{port_base}",
            f"tcp://{host}:{port_base + 1}",
            tuple(f"tcp://{host}:{port_base + 2 + r}" for r in range(dp_size)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"ingress": self.ingress, "report": self.report, "dispatch": list(self.dispatch)}


def send_frames(sock: zmq.Socket, frames: Sequence[Any]) -> bool:  # type: ignore[type-arg]
    """Send a multipart message without blocking and without copying received frames.

    Returns ``False`` when the socket is full (nothing was sent). Only the first part can
    be refused: ZMQ takes the remaining parts of a message it accepted.
    """
    last = len(frames) - 1
    try:
        sock.send(frames[0], MORE_NOBLOCK if last else NOBLOCK, copy=False)
    except zmq.Again:
        return False
    for i in range(1, last):
        sock.send(frames[i], SNDMORE, copy=False)
    if last:
        sock.send(frames[last], 0, copy=False)
    return True


class Transport:
    """Binds the controller's sockets; closes everything it made, also on a failed bind.

    :param endpoints: Where to listen; ``None``: ipc sockets under *run_dir*.
    :param run_dir: Directory for ipc sockets; ``None``: a fresh temporary one (removed on close).
    :param zmq_ctx: ZMQ context to use; ``None``: one of its own (terminated on close).
    :param sndhwm: Messages queued per rank socket.
    :param curve: CURVE keys for TCP endpoints (:mod:`dpcore.security`).
    :param max_message_bytes: Largest ingress frame accepted.
    """

    def __init__(
        self,
        dp_size: int,
        *,
        endpoints: ControllerEndpoints | None,
        run_dir: str | None,
        zmq_ctx: zmq.Context | None,  # type: ignore[type-arg]
        sndhwm: int,
        curve: security.CurveArg,
        max_message_bytes: int,
        books: Books,
        log: Any = None,
    ) -> None:
        self.books = books
        self.log = log if log is not None else structlog.get_logger("dpcore.controller")
        self._own_ctx = zmq_ctx is None
        self.ctx = zmq_ctx or zmq.Context()
        self._curve = security.resolve(curve, security.CONTROLLER)
        self.zap: security.ZapGuard | None = None
        self._run_dir: str | None = None
        self._replies: ep.PushCache | None = None
        self._wake_pair: tuple[socket.socket, ...] = ()
        self.conns: ConnectionWatch | None = None
        if endpoints is None:
            if run_dir is None:
                run_dir = self._run_dir = ep.make_run_dir()
            endpoints = ControllerEndpoints.ipc(run_dir, dp_size)
        self._socks: list[zmq.Socket] = []  # type: ignore[type-arg]
        try:
            eps = (endpoints.ingress, endpoints.report, *endpoints.dispatch)
            self.zap = security.guard_for(self.ctx, self._curve, eps)
            # Under CURVE each socket admits only its role's keys: senders on the ingress,
            # ranks on the report and rank sockets.
            ranks, senders = security.DOMAIN_RANKS, security.DOMAIN_SENDERS
            self.ingress = self._bind(zmq.PULL, endpoints.ingress, senders, maxmsgsize=max_message_bytes)
            self.reports = self._bind(zmq.PULL, endpoints.report, ranks, maxmsgsize=wire.MAX_REPORT_BYTES)
            self.dispatch = [self._bind(zmq.PUSH, e, ranks, sndhwm=sndhwm) for e in endpoints.dispatch]
            watch = self.conns = ConnectionWatch(self.dispatch)
        except BaseException:
            self.close()
            raise
        self.endpoints = ControllerEndpoints(
            self.ingress.last_endpoint.decode(),
            self.reports.last_endpoint.decode(),
            tuple(s.last_endpoint.decode() for s in self.dispatch),
        )
        # Bounded linger: a rejection or failure sent just before shutdown should still arrive.
        self._replies = ep.PushCache(
            self.ctx, size=REPLY_SOCKETS, linger_ms=REPLY_LINGER_MS, sndhwm=REPLY_HWM, curve=self._curve
        )
        wake_r, self._wake_w = socket.socketpair()
        self._wake_r = wake_r
        self._wake_pair = (wake_r, self._wake_w)
        for s in self._wake_pair:
            s.setblocking(False)
        self.wake_fd = wake_r.fileno()
        self.poller = zmq.Poller()
        self.poller.register(self.wake_fd, zmq.POLLIN)
        self.poller.register(self.reports, zmq.POLLIN)
        self.poller.register(self.ingress, zmq.POLLIN)
        for m in watch.monitors:
            self.poller.register(m, zmq.POLLIN)

    def _bind(self, kind: int, endpoint: str, domain: str, sndhwm: int | None = None, maxmsgsize: int = -1) -> zmq.Socket:  # type: ignore[type-arg]
        s = self.ctx.socket(kind)
        s.linger = 0
        if sndhwm is not None:
            s.sndhwm = sndhwm
        self._socks.append(s)
        s.maxmsgsize = maxmsgsize
        security.server(s, endpoint, self._curve, domain)
        ep.bind(s, endpoint)
        return s

    def wake(self) -> None:
        """Make the loop's next poll return (from any thread or a signal handler)."""
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already full of wake-ups, or closed: either way nothing to do

    def clear_wake(self) -> None:
        try:
            while self._wake_r.recv(WAKE_READ):
                pass
        except (BlockingIOError, OSError):
            pass

    def reply(self, endpoint: str, frame: bytes) -> None:
        """Send a rejection or failure to a sender; counted, never blocking, never raising."""
        try:
            self._replies.get(endpoint).send(frame, NOBLOCK)  # type: ignore[union-attr]
        except (zmq.Again, zmq.ZMQError) as exc:
            b = self.books
            b.undeliverable += 1
            if rate_limited(b.undeliverable):
                self.log.warning("reply_undeliverable", endpoint=endpoint, error=str(exc), count=b.undeliverable)

    def close(self) -> None:
        if self._replies is not None:
            self._replies.close()
        conns, self.conns = self.conns, None
        if conns is not None:
            for d in self.dispatch:
                d.disable_monitor()
            conns.close()
        for s in self._socks:
            s.close(linger=0)
        for w in self._wake_pair:
            w.close()
        zap, self.zap = self.zap, None
        if zap is not None:
            zap.release()  # before term(): the handler's sockets live in this context
        if self._own_ctx:
            self.ctx.term()
        ep.remove_run_dir(self._run_dir)
