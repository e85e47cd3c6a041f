"""Asking one SGLang KV event publisher to resend the batches a subscriber missed.

SGLang 0.5.23's ``ZmqEventPublisher`` (``sglang/srt/disaggregation/kv_events.py``) keeps its
last ``buffer_steps`` batches (``KVEventsConfig.buffer_steps``, default 10,000) as
``(seq, payload)`` and, when ``KVEventsConfig.replay_endpoint`` is set, binds a ROUTER there
with the port offset by the rank like the PUB endpoint (``offset_endpoint_port``). Its
``_service_replay`` reads ``[identity, b"", start seq (8 bytes, big-endian)]`` and answers
``[b"", topic, seq, payload]`` for every buffered batch whose seq is at least the start, then
``[b"", b"", seq -1, b""]``. The publisher's thread (``_publisher_thread``) checks for a
request between two published batches and waits at most 0.1 s for the next one, so an idle
publisher answers within about 0.1 s, a busy one after the batch it is sending.

The ROUTER is left at ZMQ's default high-water mark (``_socket_setup`` sets one on the PUB
socket only): it queues about 1,000 messages for a peer and drops the rest of a longer answer
when the connection does not drain fast enough, which a loaded host shows from a few thousand
batches on. An answer that skips a batch after bringing some is asked again from the first
batch still missing.

A :class:`Replay` is one such request in flight, read without blocking: the adapter's loop
polls it with the SUB sockets and holds the live batches that arrive meanwhile.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import zmq

#: Seconds a replay may go unanswered before the rank is given up as unknown (the publisher
#: answers between two batches; idle, within its 0.1 s queue wait).
REPLAY_WAIT_S = 1.0
#: Live batches held per rank while its replay is read; one more and the rank is given up.
MAX_HELD_BATCHES = 1024
#: Why a gap was not repaired (the label of ``dpcore_kv_event_gaps_not_repaired_total``).
NO_REPLAY = "no_replay"  # the publisher has no replay endpoint
NOT_BUFFERED = "not_buffered"  # the gap is longer than the publisher's buffer: not asked
INCOMPLETE = "incomplete"  # the answer skipped the first missing batch (no longer buffered) or ended early
TIMEOUT = "timeout"  # no complete answer within the wait
BACKLOG = "backlog"  # more live batches arrived than are held while waiting
RESTART = "restart"  # the rank's publisher restarted (seq back to 0) during the replay
BAD_REPLY = "bad_reply"  # the answer was not SGLang's replay framing
RANK_UNKNOWN = "rank_unknown"  # the rank was already unknown: nothing exact left to keep
REASONS = (NO_REPLAY, NOT_BUFFERED, INCOMPLETE, TIMEOUT, BACKLOG, RESTART, BAD_REPLY, RANK_UNKNOWN)

#: ``_service_replay``'s end marker: seq -1.
END = -1
_REPLY_FRAMES = 4  # b"", topic, seq, payload (the ROUTER routes on the identity frame, not sent on)


class Replay:
    """One replay request to a rank's publisher, from *start*, and the live batches held
    while it is answered (those the answer also brings are dropped from :attr:`held`).

    :param ctx: ZMQ context.
    :param endpoint: The rank's replay endpoint (already offset by rank).
    :param start: First missing seq.
    :param held: The live ``(seq, batch)`` that showed the gap.
    :param wait_s: Seconds without a complete answer before :attr:`expired`.
    """

    __slots__ = ("ctx", "endpoint", "wait_s", "sock", "start", "gap_end", "held", "deadline")

    def __init__(self, ctx: zmq.Context, endpoint: str, start: int, held: tuple[int, Any], wait_s: float) -> None:  # type: ignore[type-arg]
        self.ctx = ctx
        self.endpoint = endpoint
        self.wait_s = wait_s
        #: The seq of the live batch that showed the gap: the answer must reach it.
        self.gap_end = held[0]
        self.held: deque[tuple[int, Any]] = deque((held,))
        self.sock: zmq.Socket | None = None  # type: ignore[type-arg]
        self.ask(start)

    def ask(self, start: int) -> None:
        """Request the batches from *start* on a new socket (what the last one still brings
        is dropped with it)."""
        if self.sock is not None:
            self.sock.close(linger=0)
        self.start = start
        self.deadline = time.monotonic() + self.wait_s
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        # The publisher sends its whole answer at once; a full receive queue here would make
        # its ROUTER drop more of it. Its buffer (buffer_steps batches) bounds what can come.
        s.rcvhwm = 0
        s.connect(self.endpoint)
        self.sock = s
        # A connected DEALER queues the request until the publisher's ROUTER accepts it.
        s.send_multipart((b"", start.to_bytes(8, "big")), zmq.NOBLOCK)

    def replayed(self, seq: int) -> None:
        """The answer brought *seq*: the live copies up to it are not needed."""
        held = self.held
        while held and held[0][0] <= seq:
            held.popleft()

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def recv(self) -> tuple[int, bytes] | None:
        """The next answer ``(seq, payload)`` without blocking (``seq`` :data:`END` at the
        end), or ``None`` when none is waiting.

        :raises ValueError: the frames are not a replay answer.
        """
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)  # type: ignore[union-attr]
        except zmq.Again:
            return None
        if len(frames) != _REPLY_FRAMES or frames[0] or len(frames[2]) != 8:
            raise ValueError(f"replay answer of {len(frames)} frames, not [b'', topic, seq, payload]")
        return int.from_bytes(frames[2], "big", signed=True), frames[3]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
