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

import time
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypedDict, TypeVar, Unpack

import zmq

from dpcore import security, wire
from dpcore.errors import DpcoreError, WireError
from dpcore.hashing import DEFAULT_BLOCK_SIZE, block_hashes
from dpcore.sdk import endpoints
from dpcore.wire import Reply

__all__ = ["BaseClient", "Client", "ControllerUnavailableError", "MessageTooLargeError", "Reply", "RequestFields"]

#: How long requests queued at close() may still take to reach the controller.
_SEND_LINGER_MS = 1000


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


class BaseClient(Generic[_Ctx]):
    """Socket setup and request encoding shared by :class:`Client` and
    :class:`~dpcore.sdk.asyncclient.AsyncClient` (the parameters: :class:`Client`)."""

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
        it with :meth:`Client.send_raw` or :meth:`~dpcore.sdk.asyncclient.AsyncClient.submit_encoded`."""
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


class Client(BaseClient["zmq.Context[Any]"]):
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
