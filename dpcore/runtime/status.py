"""The controller's status channel: a snapshot of policy, liveness and loads on request.

The controller owns the load ledger; an HTTP front (another process) needs it for
``/get_load``, ``/server_info`` and ``/health``. Rather than share memory, the controller
binds one ROUTER socket, polls it in its loop, and answers each question with a msgpack
snapshot, sent ``NOBLOCK`` (a slow asker loses its answer; the loop never waits). The asker
side is :class:`AsyncStatusClient` (``zmq.asyncio`` DEALER, one id per question; late
answers to abandoned questions are dropped).

Frames: request ``[header{v, t="status?", id}]``; answer ``[header{v, t="status", id, data}]``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from dpcore.errors import DpcoreError, WireError
from dpcore.sdk import endpoints

if TYPE_CHECKING:
    import zmq.asyncio

    from dpcore.manager import PolicyManager

VERSION = 1
ASK = "status?"
ANSWER = "status"
#: Questions answered per loop turn; the rest wait for the next turn.
MAX_PER_TURN = 64


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


def _unpack(buf: bytes, t: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(buf, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        msg = f"status: not a msgpack frame ({type(exc).__name__})"
        raise WireError(msg) from None
    if type(obj) is not dict or obj.get("v") != VERSION or obj.get("t") != t:
        msg = f"status: expected a v{VERSION} {t!r} map, got {obj!r:.80}"
        raise WireError(msg)
    return obj


class StatusServer:
    """The controller side. The controller polls :attr:`socket` in its loop
    (:meth:`Controller.add_socket <dpcore.runtime.controller.Controller.add_socket>`) and
    calls :meth:`handle` when it is readable.

    :param ctx: The controller's ZMQ context.
    :param endpoint: Where to bind (``tcp://127.0.0.1:0`` picks a port).
    :param source: Builds the snapshot; called once per turn that has questions.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, source: Callable[[], Mapping[str, Any]]) -> None:  # type: ignore[type-arg]
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        try:
            self.endpoint = endpoints.bind(self.socket, endpoint)
        except BaseException:
            self.socket.close(linger=0)
            raise
        self._source = source
        self.answered = 0
        self.bad = 0

    def handle(self) -> int:
        """Answer the waiting questions (at most :data:`MAX_PER_TURN`); returns how many."""
        sock = self.socket
        data: Mapping[str, Any] | None = None
        n = 0
        while n < MAX_PER_TURN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            n += 1
            try:
                if len(frames) != 2:
                    raise WireError(f"status: expected 2 frames, got {len(frames)}")
                ask = _unpack(frames[1], ASK)
            except WireError:
                self.bad += 1
                continue
            if data is None:  # one snapshot serves every question of this turn
                data = self._source()
            answer = _pack({"v": VERSION, "t": ANSWER, "id": ask.get("id"), "data": data})
            try:
                sock.send_multipart((frames[0], answer), zmq.NOBLOCK)
            except zmq.Again:
                continue
            self.answered += 1
        return n

    def close(self) -> None:
        self.socket.close(linger=0)


class AsyncStatusClient:
    """The front side: ``await get()`` returns the controller's latest snapshot.

    Answers are cached for *max_age_s*, so a burst of ``/health`` polls costs the controller
    one snapshot.
    """

    def __init__(self, endpoint: str, *, ctx: zmq.asyncio.Context, max_age_s: float = 0.05) -> None:
        endpoints.check(endpoint, "status endpoint")
        self.endpoint = endpoint
        self.max_age_s = max_age_s
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.linger = 0
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
            deadline = loop.time() + timeout_s
            try:
                await asyncio.wait_for(self._sock.send(_pack({"v": VERSION, "t": ASK, "id": qid})), timeout_s)
                while True:
                    buf = await asyncio.wait_for(self._sock.recv(), max(0.0, deadline - loop.time()))
                    try:
                        ans = _unpack(buf, ANSWER)
                    except WireError:
                        continue
                    if ans.get("id") == qid:  # older answers belong to abandoned questions
                        break
            except asyncio.TimeoutError:
                msg = f"controller status endpoint {self.endpoint} did not answer within {timeout_s:g}s"
                raise StatusUnavailableError(msg) from None
            data = ans.get("data")
            if type(data) is not dict:
                msg = f"controller status answer is not a map: {data!r:.80}"
                raise StatusUnavailableError(msg)
            self._cached, self._cached_at = data, loop.time()
            return data

    def close(self) -> None:
        self._sock.close(linger=0)
