"""A receive socket that makes SGLang's own event loop block when idle.

SGLang's controller loop asks for the next message with ``NOBLOCK`` and, when there is
none, asks again at once: a full core spent spinning while idle. Its socket is an
attribute (``recv_from_tokenizer``), so the adapter wraps it instead of touching SGLang's
code: a ``NOBLOCK`` receive that finds nothing waits in ``poll`` until a message arrives, or
until *timeout_ms* passes (then it reports "nothing" as before, so the loop feeds its
watchdog). While requests flow, the first ``NOBLOCK`` receive succeeds and nothing waits.

A frame that carries block hashes from the tokenizer
(:mod:`dpcore_sglang.tokenizer_hashes`) is split here: the hashes go to the adapter, SGLang
decodes the rest as usual. A frame of ended requests (:mod:`dpcore_sglang.output_lengths`)
goes to the adapter's recorder whole; SGLang gets "no message now" and asks again.
A single request with a route header (:mod:`dpcore_sglang.forward`) is not decoded at all
when the adapter forwards: SGLang's dispatcher gets a marker and the adapter sends the
request's bytes on.

With SGLang's default pickle IPC it also keeps an undecodable frame from killing the server
(upstream lets the exception end the loop and the process): the frame is logged, counted
and dropped. Deserialising is still pickle, SGLang's own format, so whoever can write to
the tokenizer socket can still run code in the controller; only SGLang can change that.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from typing import Any

import zmq

from dpcore_sglang.forward import FORWARDED
from dpcore_sglang.output_lengths import MAGIC as ENDED
from dpcore_sglang.tokenizer_hashes import MAGIC, Carried

log = logging.getLogger("dpcore_sglang")


class BlockingReceiver:
    """Wraps a zmq socket; everything but ``recv``/``recv_pyobj`` passes through.

    :param sock: The controller's PULL socket.
    :param timeout_ms: Longest wait per idle receive; ``None``: do not wait (SGLang's own spin).
    :param carried: Where block hashes that come with a request go (default: a
        :class:`~dpcore_sglang.tokenizer_hashes.Carried` that refuses them all).
    """

    def __init__(self, sock: zmq.Socket, timeout_ms: int | None = 1000, carried: Carried | None = None) -> None:
        self._sock = sock
        self._timeout_ms = timeout_ms
        self.carried = Carried(0) if carried is None else carried
        #: Whether requests with a route header are handed on as FORWARDED (the adapter
        #: routes them to SGLang's dispatcher), not decoded.
        self.forward = False
        #: What recv() returns for a request to forward (SGLang's msgpack IPC decodes it
        #: into the adapter's marker type); set by the adapter with ``forward``.
        self.mark = b""
        self.bad_frames = 0
        self.idle_waits = 0
        #: Takes a frame of ended requests (``--dpcore-record``); ``None``: they are dropped.
        self.ended: Callable[[bytes], None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _wait(self, flags: int, copy: bool = True, track: bool = False) -> Any:
        sock = self._sock
        try:
            return sock.recv(flags, copy=copy, track=track)
        except zmq.Again:
            if not flags & zmq.NOBLOCK or self._timeout_ms is None:
                raise
            self.idle_waits += 1
            if not sock.poll(self._timeout_ms, zmq.POLLIN):
                raise
            return sock.recv(flags, copy=copy, track=track)

    def recv(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
        """What SGLang's msgpack IPC reads (``io_struct.sock_recv``): the message's bytes."""
        frame = self._wait(flags, copy, track)
        if type(frame) is bytes and frame.startswith(MAGIC):
            try:
                rest = self.carried.split(frame, self.forward)
                return self.mark if rest is None else rest
            except ValueError as exc:
                self._bad(len(frame), exc)
        if type(frame) is bytes and frame.startswith(ENDED):
            self._ended(frame)
        return frame

    def recv_pyobj(self, flags: int = 0) -> Any:
        try:  # the busy path, inlined: a message is already waiting
            frame = self._sock.recv(flags)
        except zmq.Again:
            frame = self._wait(flags)
        return self.decode(frame)

    def decode(self, frame: bytes) -> Any:
        """The message in a pickle-IPC *frame* (SGLang's default), its block hashes kept; for
        a request to forward as received, :data:`~dpcore_sglang.forward.FORWARDED`."""
        if frame.startswith(ENDED):
            self._ended(frame)
        try:
            if frame.startswith(MAGIC):
                rest = self.carried.split(frame, self.forward)
                return FORWARDED if rest is None else pickle.loads(rest)
            return pickle.loads(frame)  # SGLang's own IPC format, as recv_pyobj does
        except Exception as exc:
            self._bad(len(frame), exc)

    def _ended(self, frame: bytes) -> None:
        if self.ended is not None:
            self.ended(frame)
        raise zmq.Again  # not a message for SGLang: its loop goes round and asks again

    def _bad(self, size: int, exc: Exception) -> None:
        self.bad_frames += 1
        log.error(
            "dpcore: dropped an undecodable message from the tokenizer (%d so far, %d bytes): %r",
            self.bad_frames,
            size,
            exc,
        )
        # SGLang's loop treats a ZMQError as "no message now" and goes round again.
        raise zmq.Again() from exc
