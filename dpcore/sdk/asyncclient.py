"""The client SDK on ``zmq.asyncio``: :class:`AsyncClient`, whose :meth:`~AsyncClient.submit`
returns a :class:`ReplyStream` of one request's replies (the HTTP front's client).

Sockets, request encoding and the one-final-reply rule are :class:`dpcore.sdk.client.Client`'s
(their common part is :class:`~dpcore.sdk.client.BaseClient`); this adds the per-request
streams, their bound on unread replies, and a reader task that routes replies to them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Unpack

import zmq
import zmq.asyncio

from dpcore import wire
from dpcore.sdk.client import BaseClient, ControllerUnavailableError, RequestFields
from dpcore.wire import Reply

__all__ = ["CODE_CLIENT_TOO_SLOW", "MAX_UNREAD_LIMIT", "AsyncClient", "ReplyStream"]

#: Replies with no waiting stream kept for :meth:`AsyncClient.poll`; older ones are dropped.
_UNCLAIMED_MAX = 4096
#: Forgotten request ids :class:`AsyncClient` remembers so that their late replies count as
#: stale instead of unclaimed; the oldest is dropped past this many (a request whose rank
#: never answers the abort would otherwise be remembered forever).
_FORGOTTEN_MAX = 4096
#: The largest bound :class:`AsyncClient` accepts for the replies one stream holds unread.
MAX_UNREAD_LIMIT = 1 << 20
#: The ``fail`` code of a request whose reader fell too far behind (:class:`ReplyStream`).
CODE_CLIENT_TOO_SLOW = "client_too_slow"

class ReplyStream:
    """The replies of one request, in order, ending with its final reply.

    With *max_unread*, a reader that leaves that many replies unread ends its request: the
    replies held are dropped, the request is aborted on its rank, and the next read gets a
    final ``fail`` reply with code :data:`CODE_CLIENT_TOO_SLOW`. So one caller that stops
    reading (an HTTP client that keeps its connection open and reads nothing) holds at most
    *max_unread* replies, not every token of its request.
    """

    def __init__(self, rid: str, max_unread: int | None = None) -> None:
        self.rid = rid
        #: Whether no reply will be routed here any more (its final one was read, or it overflowed).
        self.done = False
        self.max_unread = max_unread
        self._q: asyncio.Queue[Reply] = asyncio.Queue()

    def _put(self, reply: Reply) -> bool:
        """Hold *reply*; False when that would exceed :attr:`max_unread` (then the stream
        holds only a ``client_too_slow`` failure, and is done)."""
        q = self._q
        if self.max_unread is None or q.qsize() < self.max_unread:
            q.put_nowait(reply)
            return True
        while not q.empty():
            q.get_nowait()
        msg = f"the reader of request {self.rid!r} left {self.max_unread} replies unread"
        q.put_nowait(Reply("fail", self.rid, rank=reply.rank, code=CODE_CLIENT_TOO_SLOW, msg=msg))
        self.done = True
        return False

    async def next(self, timeout_s: float | None = None) -> Reply:
        """The next reply; raises :class:`TimeoutError` after *timeout_s*."""
        if self.done and self._q.empty():
            msg = f"request {self.rid!r} already ended"
            raise RuntimeError(msg)
        reply = await asyncio.wait_for(self._q.get(), timeout_s)
        if reply.final:
            self.done = True
        return reply

    async def collect(self, timeout_s: float | None = None) -> list[Reply]:
        """All replies up to and including the final one (one deadline for all)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        out = []
        while not self.done or not self._q.empty():
            left = None if deadline is None else max(0.0, deadline - loop.time())
            out.append(await self.next(left))
        return out

    def __aiter__(self) -> AsyncIterator[Reply]:
        return self

    async def __anext__(self) -> Reply:
        if self.done and self._q.empty():
            raise StopAsyncIteration
        return await self.next()


class AsyncClient(BaseClient[zmq.asyncio.Context]):
    """The same client on ``zmq.asyncio``; :meth:`submit` returns a :class:`ReplyStream`.

    A background task (started by the first :meth:`submit`) reads replies and hands each
    to its request's stream. Call :meth:`close` (or use ``async with``) to stop it.

    :param max_unread_replies: The most replies one stream holds unread (1 .. 2**20); a stream
        that would hold more ends its request with ``client_too_slow`` (:class:`ReplyStream`),
        counted in :attr:`too_slow`. ``None`` (the default): no bound.
    The other parameters are :class:`~dpcore.sdk.client.Client`'s.
    """

    _context_class = zmq.asyncio.Context

    def __init__(self, ingress: str, *, max_unread_replies: int | None = None, **kwargs: Any) -> None:
        if max_unread_replies is not None and not 1 <= max_unread_replies <= MAX_UNREAD_LIMIT:
            msg = f"max_unread_replies must be in 1..{MAX_UNREAD_LIMIT} or None, got {max_unread_replies}"
            raise ValueError(msg)
        self.max_unread_replies = max_unread_replies
        #: Requests ended because their reader left *max_unread_replies* replies unread.
        self.too_slow = 0
        #: The most replies one stream held unread so far.
        self.unread_peak = 0
        super().__init__(ingress, **kwargs)

    def _open(self) -> None:
        self._streams: dict[str, ReplyStream] = {}
        self._unclaimed: deque[Reply] = deque(maxlen=_UNCLAIMED_MAX)
        self._unclaimed_event = asyncio.Event()
        self._forgotten: dict[str, None] = {}
        self._reader: asyncio.Task[None] | None = None

    @property
    def pending(self) -> set[str]:
        return set(self._streams)

    async def submit(self, rid: str, *, payload: bytes = b"", **fields: Unpack[RequestFields]) -> ReplyStream:
        """Send one request (its keywords: :class:`RequestFields`); iterate the returned
        stream for its replies."""
        return await self.submit_encoded(rid, self.encode(rid, **fields), payload)

    async def submit_encoded(self, rid: str, hdr: bytes, payload: bytes = b"") -> ReplyStream:
        """Send a request whose header came from :meth:`encode`."""
        if rid in self._streams:
            msg = f"request id {rid!r} is already pending on this client"
            raise ValueError(msg)
        self._check_size(rid, hdr, payload)
        self._start()
        stream = ReplyStream(rid, self.max_unread_replies)
        self._forgotten.pop(rid, None)
        # Registered before sending, so a reply can never arrive before its stream exists.
        self._streams[rid] = stream
        try:
            await asyncio.wait_for(self._tx.send_multipart((hdr, payload)), self.send_timeout_s)
        except (asyncio.TimeoutError, zmq.Again):
            self._streams.pop(rid, None)
            msg = f"controller ingress {self.ingress} took no request for {self.send_timeout_s:g}s"
            raise ControllerUnavailableError(msg) from None
        except BaseException:
            self._streams.pop(rid, None)
            raise
        return stream

    def forget(self, rid: str) -> None:
        """Stop routing replies of *rid* (its caller went away); later ones count as stale.
        Its stream is done (it keeps the replies it already holds)."""
        stream = self._streams.pop(rid, None)
        if stream is None:
            return
        stream.done = True
        forgotten = self._forgotten
        if len(forgotten) >= _FORGOTTEN_MAX:
            del forgotten[next(iter(forgotten))]
        forgotten[rid] = None

    def abort(self, rid: str, reason: str = wire.ABORT_CALLER) -> None:
        """Give up request *rid*: :meth:`forget` it and ask its rank to stop it. *reason* (one
        of :data:`dpcore.wire.ABORT_REASONS`) is counted by the controller. Never waits: an
        abort the ingress cannot take at once is counted in :attr:`aborts_unsent`."""
        msg = wire.encode_abort(rid, self.reply_endpoint, reason)
        self.forget(rid)
        try:
            fut = self._tx.send(msg, zmq.NOBLOCK)
        except zmq.ZMQError:
            self.aborts_unsent += 1
            return

        def sent(f: Any) -> None:
            if f.cancelled() or f.exception() is not None:
                self.aborts_unsent += 1

        fut.add_done_callback(sent)

    async def control(self, op: str, data: Any = None) -> None:
        """Ask the controller to broadcast a control message to every active rank."""
        try:
            await asyncio.wait_for(self._tx.send(wire.encode_ctl(op, data)), self.send_timeout_s)
        except asyncio.TimeoutError:
            msg = f"controller ingress {self.ingress} took no control message for {self.send_timeout_s:g}s"
            raise ControllerUnavailableError(msg) from None

    async def poll(self, timeout_s: float = 0.0) -> list[Reply]:
        """Replies that no stream claimed (e.g. for requests sent with another tool)."""
        self._start()
        if not self._unclaimed:
            self._unclaimed_event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._unclaimed_event.wait(), timeout_s)
        out = list(self._unclaimed)
        self._unclaimed.clear()
        return out

    def _start(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        rx = self._rx
        streams = self._streams
        while True:
            frames = await rx.recv_multipart()
            reply = self._decode(frames)
            if reply is None:
                continue
            stream = streams.get(reply.rid)
            if stream is None:
                if reply.rid in self._forgotten:
                    self.stale += 1
                    if reply.final:
                        del self._forgotten[reply.rid]
                    continue
                self._unclaimed.append(reply)
                self._unclaimed_event.set()
                continue
            if reply.final:
                del streams[reply.rid]
            if not stream._put(reply):
                self.too_slow += 1
                if not reply.final:
                    self.abort(reply.rid, wire.ABORT_TOO_SLOW)
                continue
            n = stream._q.qsize()
            if n > self.unread_peak:
                self.unread_peak = n

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._close_sockets()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
