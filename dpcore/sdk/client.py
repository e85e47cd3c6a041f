"""The client SDK: what a tokenizer or HTTP front end uses to send requests to dpcore.

A client binds its own PULL socket for replies (outputs from ranks, rejections and
failures from the controller) and PUSH-connects to the controller's ingress. Every request
ends in exactly one final reply: an ``out`` with ``final=True``, a ``rej`` or a ``fail``.
Replies that arrive for a request that already ended (a rank that finished a request just
as it died, say) are dropped and counted in :attr:`Client.stale`.

A request whose caller went away is given up with ``abort(rid, reason)``: its later replies
are dropped, and an ``abort`` message asks the rank holding it to drop it if it has not
started and to stop it if it has; the controller counts aborts by *reason*. Request ids
must be unique among a client's pending requests; reusing one after an abort is safe (its
late replies are told apart only by the rank stopping it, so a front that accepts
client-chosen ids should send unique ones of its own, as the HTTP front does).

Example::

    with Client("ipc:///tmp/dpcore-x/ingress") as c:
        c.submit("r1", token_ids=ids, payload=pack_token_ids(ids))
        for reply in c.wait_all(timeout_s=10):
            print(reply.kind, reply.rank, reply.meta)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar, Generic, TypedDict, TypeVar, Unpack

import zmq
import zmq.asyncio

from dpcore import security, wire
from dpcore.errors import DpcoreError, WireError
from dpcore.hashing import DEFAULT_BLOCK_SIZE, block_hashes
from dpcore.sdk import endpoints
from dpcore.wire import Reply

__all__ = [
    "CODE_CLIENT_TOO_SLOW", "AsyncClient", "Client", "ControllerUnavailableError", "MessageTooLargeError",
    "Reply", "ReplyStream", "RequestFields",
]  # fmt: skip

#: How long requests queued at close() may still take to reach the controller.
_SEND_LINGER_MS = 1000
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


class ControllerUnavailableError(DpcoreError):
    """The controller's ingress did not take a request within the send timeout."""


class MessageTooLargeError(DpcoreError):
    """A request frame is over the ingress frame limit (the controller would drop it)."""


class RequestFields(TypedDict, total=False):
    """The keywords of a request, for the clients' ``submit`` and ``encode`` (ranges and
    meanings: :func:`dpcore.wire.encode_request`)."""

    #: The prompt's tokens: only counted and hashed here (the engine's input goes in the payload).
    token_ids: Sequence[int] | None
    #: Prompt length when no *token_ids* are given.
    num_tokens: int | None
    #: Hashes of the prompt's leading blocks; default: hashed from *token_ids*.
    block_hashes: Sequence[int] | None
    #: A rank the caller already chose (SGLang's ``routed_dp_rank``).
    routed_dp_rank: Any
    #: SGLang's ``data_parallel_rank`` request field.
    data_parallel_rank: Any
    #: The PD bootstrap room that pairs a decode request with its prefill.
    bootstrap_room: int | None
    #: The prefill rank of a PD decode request.
    disagg_prefill_dp_rank: Any
    #: Output length cap, when the caller knows it.
    max_new_tokens: int | None


#: The ZMQ context type of a client: ``zmq.Context`` or ``zmq.asyncio.Context``.
_Ctx = TypeVar("_Ctx", bound="zmq.Context[Any]")


class _Base(Generic[_Ctx]):
    """Socket setup and request encoding shared by :class:`Client` and :class:`AsyncClient`
    (the parameters: :class:`Client`)."""

    #: The context a client makes (and terminates) when it is given none.
    _context_class: ClassVar[type[zmq.Context[Any]]]

    def __init__(
        self,
        ingress: str,
        *,
        zmq_ctx: _Ctx | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        reply_endpoint: str | None = None,
        send_timeout_s: float = 5.0,
        curve: security.CurveArg = None,
        max_message_bytes: int = wire.MAX_MESSAGE_BYTES,
    ) -> None:
        own_ctx = zmq_ctx is None
        ctx = self._context_class() if zmq_ctx is None else zmq_ctx
        endpoints.check(ingress, "ingress")
        self.ingress = ingress
        self.block_size = block_size
        self.send_timeout_s = send_timeout_s
        self._ctx = ctx
        self._own_ctx = own_ctx
        self._run_dir: str | None = None
        #: Replies dropped because their request had already ended.
        self.stale = 0
        #: Replies that could not be decoded.
        self.bad_replies = 0
        #: Abort messages that could not be sent at once (the ingress was full).
        self.aborts_unsent = 0
        self.max_message_bytes = max_message_bytes
        if reply_endpoint is None:
            reply_endpoint, self._run_dir = endpoints.reply_endpoint_like(ingress)
        self._curve = security.resolve(curve)
        self._zap = security.guard_for(ctx, self._curve, [reply_endpoint])
        self._rx = ctx.socket(zmq.PULL)
        self._rx.linger = 0
        self._rx.maxmsgsize = max_message_bytes
        security.server(self._rx, reply_endpoint, self._curve, security.DOMAIN_REPLIES)
        self._tx = ctx.socket(zmq.PUSH)
        # Requests submitted just before close() still leave (bounded: close never hangs).
        self._tx.linger = _SEND_LINGER_MS
        security.client(self._tx, ingress, self._curve)
        try:
            self.reply_endpoint = endpoints.bind(self._rx, reply_endpoint)
            self._tx.connect(ingress)
        except BaseException:
            self._close_sockets()
            raise
        self._open()

    def _open(self) -> None:
        """The client's own state, once its sockets are up."""
        raise NotImplementedError

    def encode(self, rid: str, **fields: Unpack[RequestFields]) -> bytes:
        """The request header :meth:`submit` sends (hashing the prompt's blocks). Pure CPU work
        and thread-safe: a caller with a big prompt can run it off its event loop, then send
        it with :meth:`Client.send_raw` or :meth:`AsyncClient.submit_encoded`."""
        token_ids = fields.pop("token_ids", None)
        num_tokens = fields.pop("num_tokens", None)
        bh = fields.pop("block_hashes", None)
        if num_tokens is None:
            if token_ids is None:
                msg = f"request {rid!r}: give token_ids or num_tokens"
                raise ValueError(msg)
            num_tokens = len(token_ids)
        if bh is None and token_ids is not None:
            # Only the leading blocks a controller accepts are hashed: placement looks at
            # prefixes, and a longer list would be refused (wire.Limits.max_block_hashes).
            cap = wire.DEFAULT_LIMITS.max_block_hashes * self.block_size
            bh = block_hashes(token_ids[:cap] if len(token_ids) > cap else token_ids, self.block_size)
        # The other fields go through as they are: an unknown keyword is a TypeError there.
        return wire.encode_request(rid, num_tokens=num_tokens, reply=self.reply_endpoint, block_hashes=bh, **fields)

    def _check_size(self, rid: str, header: bytes, payload: bytes) -> None:
        big = max(len(header), len(payload))
        if big > self.max_message_bytes:
            msg = (
                f"request {rid!r}: a frame of {big} bytes is over the ingress limit of "
                f"{self.max_message_bytes} bytes (--max-message-bytes)"
            )
            raise MessageTooLargeError(msg)

    def _decode(self, frames: list[bytes]) -> Reply | None:
        try:
            return wire.decode_reply(frames)
        except WireError:
            self.bad_replies += 1
            return None

    def _close_sockets(self) -> None:
        self._tx.close()
        self._rx.close(linger=0)
        zap, self._zap = getattr(self, "_zap", None), None
        if zap is not None:
            zap.release()  # before term(): the handler's sockets live in this context
        if self._own_ctx:
            self._ctx.term()
        endpoints.remove_run_dir(self._run_dir)
        self._run_dir = None


class Client(_Base["zmq.Context[Any]"]):
    """Blocking client.

    :param ingress: The controller's ingress endpoint.
    :param zmq_ctx: A ZMQ context to share; a private one is made (and terminated) otherwise.
    :param block_size: Tokens per hashed block (must match the engine's cache block size
        for ``cache_aware`` to see real prefixes).
    :param reply_endpoint: Where this client listens; default: a fresh endpoint like the
        ingress (ipc in a private directory, or a random 127.0.0.1 port). For multi-node,
        pass ``tcp://<this host's address>:*``.
    :param send_timeout_s: How long :meth:`submit` may wait for the ingress to take a request.
    :param curve: CURVE keys for TCP (:mod:`dpcore.security`); default: from the environment,
        ``False``: none.
    :param max_message_bytes: Largest frame to send or accept; bigger requests raise
        :class:`MessageTooLargeError` (match the controller's ``--max-message-bytes``).
    """

    _context_class = zmq.Context

    def _open(self) -> None:
        self._tx.sndtimeo = int(self.send_timeout_s * 1000)
        self._poller = zmq.Poller()
        self._poller.register(self._rx, zmq.POLLIN)
        #: Requests submitted and not ended yet.
        self.pending: set[str] = set()

    def submit(self, rid: str, *, payload: bytes = b"", **fields: Unpack[RequestFields]) -> None:
        """Send one request (its keywords: :class:`RequestFields`). *token_ids* are only used
        to count and hash the prompt; put whatever the engine needs in *payload*."""
        self.send_raw(rid, self.encode(rid, **fields), payload)

    def send_raw(self, rid: str, header: bytes, payload: bytes = b"") -> None:
        """Send an already encoded request header (see :func:`dpcore.wire.encode_request`)."""
        self._check_size(rid, header, payload)
        try:
            self._tx.send_multipart((header, payload))
        except zmq.Again:
            msg = f"controller ingress {self.ingress} took no request for {self.send_timeout_s:g}s"
            raise ControllerUnavailableError(msg) from None
        self.pending.add(rid)

    def control(self, op: str, data: Any = None) -> None:
        """Ask the controller to broadcast a control message to every active rank."""
        try:
            self._tx.send(wire.encode_ctl(op, data))
        except zmq.Again:
            msg = f"controller ingress {self.ingress} took no control message for {self.send_timeout_s:g}s"
            raise ControllerUnavailableError(msg) from None

    def abort(self, rid: str, reason: str = wire.ABORT_CALLER) -> bool:
        """Give up request *rid*: drop its later replies and ask its rank to stop it.
        *reason* (one of :data:`dpcore.wire.ABORT_REASONS`) is counted by the controller.
        Returns whether the abort message left (it is never waited for)."""
        msg = wire.encode_abort(rid, self.reply_endpoint, reason)
        self.pending.discard(rid)
        try:
            self._tx.send(msg, zmq.NOBLOCK)
        except zmq.ZMQError:
            self.aborts_unsent += 1
            return False
        return True

    def poll(self, timeout_s: float = 0.0) -> list[Reply]:
        """Replies that arrived, waiting up to *timeout_s* for the first one."""
        out: list[Reply] = []
        if not self._poller.poll(max(0, int(timeout_s * 1000))):
            return out
        rx = self._rx
        pending = self.pending
        while True:
            try:
                frames = rx.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            reply = self._decode(frames)
            if reply is None:
                continue
            if reply.rid not in pending:
                self.stale += 1
                continue
            if reply.final:
                pending.discard(reply.rid)
            out.append(reply)

    def wait_all(self, timeout_s: float) -> list[Reply]:
        """Replies until every pending request ended or *timeout_s* passed."""
        deadline = time.monotonic() + timeout_s
        out: list[Reply] = []
        while self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            out.extend(self.poll(left))
        return out

    def close(self) -> None:
        self._close_sockets()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


class AsyncClient(_Base[zmq.asyncio.Context]):
    """The same client on ``zmq.asyncio``; :meth:`submit` returns a :class:`ReplyStream`.

    A background task (started by the first :meth:`submit`) reads replies and hands each
    to its request's stream. Call :meth:`close` (or use ``async with``) to stop it.

    :param max_unread_replies: The most replies one stream holds unread (1 .. 2**20); a stream
        that would hold more ends its request with ``client_too_slow`` (:class:`ReplyStream`),
        counted in :attr:`too_slow`. ``None`` (the default): no bound.
    The other parameters are :class:`Client`'s.
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
