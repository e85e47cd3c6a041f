"""The controller's status channel: a snapshot of policy, liveness and loads on request.

The controller owns the load ledger; an HTTP front (another process) needs it for
``/get_load``, ``/server_info`` and ``/health``. :class:`StatusServer` is a thread in the
controller's process with one ROUTER socket: for each batch of questions it has the
controller's loop build one msgpack snapshot (``call_soon``) and answers ``NOBLOCK`` (a slow
asker loses its answer). The loop gains no socket and never waits on an asker. The asker
side is :class:`AsyncStatusClient` (``zmq.asyncio`` DEALER, one id per question; late
answers to abandoned questions are dropped).

Frames: request ``[header{v, t="status?", id}]``; answer ``[header{v, t="status", id, data}]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from concurrent.futures import Future
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

import structlog

from dpcore import security, wire
from dpcore.errors import DpcoreError, WireError
from dpcore.runtime.supervise import Supervised
from dpcore.sdk import endpoints
from dpcore.wire import show

if TYPE_CHECKING:
    import zmq.asyncio

    from dpcore.manager import PolicyManager

#: The status messages are versioned with the rest of dpcore's wire.
VERSION = wire.VERSION
ASK = "status?"
ANSWER = "status"
#: Questions answered with one snapshot; the rest wait for the next one.
MAX_PER_TURN = 64
#: Largest question frame accepted (questions are a few bytes).
MAX_ASK_BYTES = 1 << 16
_log = structlog.get_logger("dpcore.status")


class StatusUnavailableError(DpcoreError):
    """The controller did not answer a status request in time."""


def snapshot(manager: PolicyManager, **extra: Any) -> dict[str, Any]:
    """What a status answer holds: the resolved chain, liveness and per-rank loads.

    *extra* (``dpcore serve`` adds ``counters=controller.stats()``) is added as is; it must
    be msgpack-able. Call it on the controller's loop thread.
    """
    ledger = manager.ledger
    res = manager.resolution
    return {
        "dp_size": manager.ctx.dp_size,
        "disaggregation_mode": manager.ctx.disaggregation_mode,
        "load_balance_method": ",".join(manager.chain),
        "requested": res.requested,
        "reason": res.reason,
        "active_ranks": list(ledger.active_ranks),
        "loads": ledger.snapshot(),
        **extra,
    }


def _pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj)  # type: ignore[no-any-return]


def unpack(buf: bytes, t: str) -> dict[str, Any]:
    """The v-current *t* map in *buf* (status and admin messages), or :class:`WireError`."""
    try:
        obj = msgpack.unpackb(buf, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        msg = f"status: not a msgpack frame ({type(exc).__name__})"
        raise WireError(msg) from None
    if type(obj) is not dict or obj.get("v") != VERSION or obj.get("t") != t:
        msg = f"status: expected a v{VERSION} {t!r} map, got {show(obj)}"
        raise WireError(msg)
    return obj


class StatusServer:
    """The controller side: a thread answering status questions on a ROUTER socket.

    The snapshot is built on the controller's loop thread (through *call_soon*, i.e.
    :meth:`Controller.call_soon <dpcore.runtime.controller.Controller.call_soon>`), so it is
    consistent and the loop needs no extra socket; this thread only waits for it. One
    snapshot answers every question that arrived meanwhile.

    :param endpoint: Where to bind (``tcp://127.0.0.1:0`` picks a port).
    :param source: Builds the snapshot (a msgpack-able mapping).
    :param call_soon: Runs a function on the thread that owns what *source* reads; default:
        call *source* on the status thread.
    :param ctx: ZMQ context to share; a private one is made (and terminated) otherwise.
    :param timeout_s: How long to wait for the loop thread before dropping the questions
        (their askers time out on their side).
    """

    def __init__(
        self,
        endpoint: str,
        source: Callable[[], Mapping[str, Any]],
        *,
        call_soon: Callable[[Callable[[], None]], None] | None = None,
        ctx: zmq.Context | None = None,  # type: ignore[type-arg]
        timeout_s: float = 2.0,
        curve: security.CurveArg = None,
        admin: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    ) -> None:
        #: Answers ``admin?`` requests (:class:`dpcore.runtime.admin.Admin`); ``None``: they are bad frames.
        self._admin = admin
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        keys = security.resolve(curve, security.CONTROLLER)
        self._zap = security.guard_for(self._ctx, keys, [endpoint])
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.maxmsgsize = MAX_ASK_BYTES
        security.server(self.socket, endpoint, keys, security.DOMAIN_SENDERS)
        try:
            self.endpoint = endpoints.bind(self.socket, endpoint)
        except BaseException:
            self.close()
            raise
        self._source = source
        self._call_soon = call_soon
        self.timeout_s = timeout_s
        self.answered = 0
        self.bad = 0
        #: Snapshots that could not be built or packed (their askers time out).
        self.failed = 0
        self._stop = threading.Event()
        #: The thread, restarted if it ever raises (see :mod:`dpcore.runtime.supervise`).
        self.thread = Supervised("dpcore-status", self._run, self._stop)

    def start(self) -> StatusServer:
        self.thread.start()
        return self

    def _snapshot(self) -> Mapping[str, Any] | None:
        if self._call_soon is None:
            return self._source()
        fut: Future[Mapping[str, Any]] = Future()

        def build() -> None:
            try:
                fut.set_result(self._source())
            except Exception as exc:  # reported to this thread, never raised in the loop
                fut.set_exception(exc)

        self._call_soon(build)
        try:
            return fut.result(self.timeout_s)
        except TimeoutError:  # the loop is stopping or stuck
            return None
        except Exception as exc:  # the source raised: say so, keep answering later questions
            self._failed(exc)
            return None

    def _failed(self, exc: Exception) -> None:
        self.failed += 1
        _log.error("status_snapshot_failed", error=f"{type(exc).__name__}: {exc}"[:300], count=self.failed)

    def _run(self) -> None:
        sock = self.socket
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            asks: list[tuple[bytes, Any]] = []
            while len(asks) < MAX_PER_TURN:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    if len(frames) != 2:
                        raise WireError(f"status: expected 2 frames, got {len(frames)}")
                    if self._admin is not None and self._answer_admin(frames):
                        continue
                    asks.append((frames[0], unpack(frames[1], ASK).get("id")))
                except WireError:
                    self.bad += 1
            data = self._snapshot() if asks else None
            if data is None:
                continue
            try:
                answers = [(peer, _pack({"v": VERSION, "t": ANSWER, "id": qid, "data": data})) for peer, qid in asks]
            except Exception as exc:  # e.g. a value msgpack cannot carry: never kills the thread
                self._failed(exc)
                continue
            for peer, answer in answers:
                try:
                    sock.send_multipart((peer, answer), zmq.NOBLOCK)
                except zmq.Again:
                    continue
                self.answered += 1

    def _answer_admin(self, frames: list[bytes]) -> bool:
        """Answer *frames* if they are an admin command (:mod:`dpcore.runtime.admin`)."""
        from dpcore.runtime import admin

        try:
            ask = unpack(frames[1], admin.ASK)
        except WireError:
            return False
        answer = {"v": VERSION, "t": admin.ANSWER, "id": ask.get("id"), **self._admin(ask)}  # type: ignore[misc]
        with contextlib.suppress(zmq.Again):
            self.socket.send_multipart((frames[0], _pack(answer)), zmq.NOBLOCK)
        return True

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self.thread.join(timeout_s)
        self.socket.close(linger=0)
        zap, self._zap = self._zap, None
        if zap is not None:
            zap.release()  # before term(): the handler's sockets live in this context
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


async def exchange(sock: Any, frame: bytes, qid: Any, t: str, timeout_s: float) -> dict[str, Any] | None:
    """Send *frame* on the DEALER *sock* and return the *t* answer with id *qid*, skipping
    late answers to abandoned questions; ``None`` when none came within *timeout_s*."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        await asyncio.wait_for(sock.send(frame), timeout_s)
        while True:
            buf = await asyncio.wait_for(sock.recv(), max(0.0, deadline - loop.time()))
            try:
                ans = unpack(buf, t)
            except WireError:
                continue
            if ans.get("id") == qid:
                return ans
    except asyncio.TimeoutError:
        return None


class AsyncStatusClient:
    """The front side: ``await get()`` returns the controller's latest snapshot.

    Answers are cached for *max_age_s*, so a burst of ``/health`` polls costs the controller
    one snapshot.
    """

    def __init__(
        self, endpoint: str, *, ctx: zmq.asyncio.Context, max_age_s: float = 0.05, curve: security.CurveArg = None
    ) -> None:
        endpoints.check(endpoint, "status endpoint")
        self.endpoint = endpoint
        self.max_age_s = max_age_s
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        security.client(self._sock, endpoint, security.resolve(curve))
        self._sock.connect(endpoint)
        self._ids = itertools.count()
        self._lock = asyncio.Lock()
        self._cached: dict[str, Any] | None = None
        self._cached_at = 0.0

    async def get(self, timeout_s: float = 2.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        async with self._lock:  # one question in flight; the others reuse its answer
            if self._cached is not None and loop.time() - self._cached_at <= self.max_age_s:
                return self._cached
            qid = next(self._ids)
            ans = await exchange(self._sock, _pack({"v": VERSION, "t": ASK, "id": qid}), qid, ANSWER, timeout_s)
            if ans is None:
                msg = f"controller status endpoint {self.endpoint} did not answer within {timeout_s:g}s"
                raise StatusUnavailableError(msg)
            data = ans.get("data")
            if type(data) is not dict:
                msg = f"controller status answer is not a map: {show(data)}"
                raise StatusUnavailableError(msg)
            self._cached, self._cached_at = data, loop.time()
            return data

    def close(self) -> None:
        self._sock.close(linger=0)
