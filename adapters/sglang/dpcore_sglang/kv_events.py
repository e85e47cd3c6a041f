"""SGLang's own KV events, per DP rank, into dpcore's exact cache index.

With ``--kv-events-config '{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:5557", "bind": true}'``
every DP rank's scheduler publishes what its radix cache stores and evicts (SGLang 0.5.23):

* ``SchedulerKvEventsPublisher.init_kv_events``
  (``sglang/srt/managers/scheduler_components/kv_events_publisher.py``) makes one publisher per
  independent KV cache, indexed by ``select_kv_publisher_dp_rank`` (the attention-DP rank
  under DP attention), and ``publish_kv_events`` sends the cache's queued events as one
  ``KVEventBatch(ts, events, attn_dp_rank)`` per scheduler step;
* ``ZmqEventPublisher`` (``sglang/srt/disaggregation/kv_events.py``) binds a PUB socket at the
  configured endpoint with the port offset by that rank (``offset_endpoint_port``) and sends
  ``[topic, seq as 8 big-endian bytes, msgpack payload]``; ``seq`` counts from 0 per
  publisher (a scheduler restart starts again at 0);
* ``KVCacheEventRecorder`` (``sglang/srt/mem_cache/events.py``) emits ``BlockStored`` per
  ``page_size`` page (``block_hashes``, ``parent_block_hash``, the page's ``token_ids``),
  coalescing a chain of pages into one event; ``BlockRemoved`` per evicted radix node;
  ``AllBlocksCleared`` when the cache is flushed.

The pages in each batch become dpcore block keys in :mod:`dpcore_sglang.page_map`.

A missing sequence number (ZMQ drops a PUB message when the subscriber's queue is full), or a
subscription that starts after the scheduler published, is a gap. With ``replay_endpoint`` in
the config (and ``buffer_steps`` covering the gap), the adapter asks that rank's publisher for
the missing batches (:mod:`dpcore_sglang.kv_replay`) and the rank stays exact. Without it, or
when the replay does not come within :data:`~dpcore_sglang.kv_replay.REPLAY_WAIT_S` or no
longer holds the first missing batch, the rank is "unknown" in the index (policies then use
their own estimate) until its cache is cleared or its scheduler restarts; each such gap is
counted by reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import zmq

from dpcore.cacheindex import CacheIndex, KvEventBatch
from dpcore_sglang.kv_replay import (
    BACKLOG,
    BAD_REPLY,
    END,
    INCOMPLETE,
    MAX_HELD_BATCHES,
    NO_REPLAY,
    NOT_BUFFERED,
    RANK_UNKNOWN,
    REASONS,
    REPLAY_WAIT_S,
    RESTART,
    TIMEOUT,
    Replay,
)
from dpcore_sglang.page_map import PageMapper

log = logging.getLogger("dpcore_sglang")

#: Batches read per rank per :meth:`SglangKvEvents.poll` at most (bounded work per dispatch).
MAX_BATCHES_PER_POLL = 64
#: Batches SGLang's publisher keeps for replay unless configured (``KVEventsConfig.buffer_steps``).
DEFAULT_BUFFER_STEPS = 10_000


def subscriber_endpoint(endpoint: str, rank: int) -> str:
    """Where rank *rank*'s publisher is reachable: SGLang's ``offset_endpoint_port`` (port +
    rank for tcp, ``_dp<rank>`` suffix for inproc), with a wildcard host made loopback."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        if host in ("*", "0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"tcp://{host}:{int(port) + rank}"
    if rank and endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith(("ipc://", "inproc://")):
        return endpoint
    raise ValueError(f"KV events endpoint {endpoint!r}: expected tcp://, ipc:// or inproc://")


class SglangKvEvents:
    """One SUB socket per DP rank on SGLang's KV event publishers, feeding *index*.

    Call :meth:`poll` on the thread that makes decisions (the adapter does, before each
    dispatch): it reads what arrived, without blocking.

    A gap in a rank's sequence (or a first batch after 0: the subscription started late) is
    repaired from the publisher's replay buffer when *replay_endpoint* is given
    (:mod:`dpcore_sglang.kv_replay`): the batches that arrive meanwhile are held, the missing
    ones are applied in order as the replay brings them, then the held ones, and the index
    never sees the gap. Until then the rank keeps what the index held (a few batches behind,
    as events always are). A gap that cannot be repaired leaves the rank unknown, counted by
    reason in :attr:`not_repaired`.

    :param index: The manager's cache index.
    :param endpoint: ``endpoint`` of SGLang's ``--kv-events-config`` (rank 0's).
    :param dp_size: Number of DP ranks.
    :param block_size: dpcore's block size for requests.
    :param topic: ``topic`` of SGLang's config.
    :param capacity_blocks: Per-rank cache capacity in dpcore blocks (0: not known).
    :param replay_endpoint: ``replay_endpoint`` of SGLang's config (rank 0's), or ``None``.
    :param buffer_steps: ``buffer_steps`` of SGLang's config: batches its replay buffer holds.
    :param replay_wait_s: Seconds a replay may go unanswered (> 0).
    """

    def __init__(
        self,
        index: CacheIndex,
        endpoint: str,
        dp_size: int,
        block_size: int,
        *,
        topic: str = "",
        zmq_ctx: zmq.Context | None = None,  # type: ignore[type-arg]
        capacity_blocks: int = 0,
        replay_endpoint: str | None = None,
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        replay_wait_s: float = REPLAY_WAIT_S,
    ) -> None:
        import msgspec
        from sglang.srt.disaggregation.kv_events import KVEventBatch

        if not replay_wait_s > 0:
            raise ValueError(f"replay_wait_s must be > 0, got {replay_wait_s}")
        if buffer_steps < 0:
            raise ValueError(f"buffer_steps must be >= 0, got {buffer_steps}")
        self.index = index
        self._decode = msgspec.msgpack.Decoder(KVEventBatch).decode
        self._decode_error = msgspec.DecodeError
        self._ctx = zmq_ctx or zmq.Context.instance()
        self.capacity_blocks = capacity_blocks
        self.mappers = [PageMapper(block_size) for _ in range(dp_size)]
        self._epoch = [1] * dp_size
        #: Next seq to apply per rank; last seq its stream brought (a replay can run ahead).
        self._next: list[int | None] = [None] * dp_size
        self._live: list[int | None] = [None] * dp_size
        self._socks = []
        for r in range(dp_size):
            s = self._ctx.socket(zmq.SUB)
            s.linger = 0
            s.setsockopt(zmq.SUBSCRIBE, topic.encode())
            s.connect(subscriber_endpoint(endpoint, r))
            self._socks.append(s)
        self._replay_at = [None if replay_endpoint is None else subscriber_endpoint(replay_endpoint, r) for r in range(dp_size)]
        self.buffer_steps = buffer_steps
        self.replay_wait_s = replay_wait_s
        self._replays: list[Replay | None] = [None] * dp_size
        #: Frames that were not SGLang KV event batches; batches whose seq skipped some;
        #: publisher restarts seen (seq went back); gaps repaired from a replay.
        self.bad_frames = self.gaps = self.restarts = self.repaired = 0
        #: Replay requests sent (a long answer cut short is asked again from where it stopped).
        self.replay_requests = 0
        #: Gaps not repaired, by reason (:data:`dpcore_sglang.kv_replay.REASONS`).
        self.not_repaired: dict[str, int] = dict.fromkeys(REASONS, 0)

    @classmethod
    def from_server_args(cls, server_args: Any, index: CacheIndex, dp_size: int, block_size: int) -> SglangKvEvents | None:
        """Subscribe as SGLang's ``--kv-events-config`` says, or ``None`` when it publishes nothing."""
        raw = getattr(server_args, "kv_events_config", None)
        if not raw:
            return None
        from sglang.srt.disaggregation.kv_events import KVEventsConfig

        cfg = KVEventsConfig.from_cli(raw)
        if cfg.publisher != "zmq":
            return None
        log.info(
            "dpcore: subscribing to SGLang KV events at %s (+rank); gaps %s",
            cfg.endpoint,
            f"repaired from {cfg.replay_endpoint} (+rank)" if cfg.replay_endpoint else "not repaired (no replay_endpoint)",
        )
        return cls(
            index, cfg.endpoint, dp_size, block_size, topic=cfg.topic,
            replay_endpoint=cfg.replay_endpoint, buffer_steps=cfg.buffer_steps,
        )

    def poll(self) -> int:
        """Apply every batch that arrived (at most :data:`MAX_BATCHES_PER_POLL` per rank from
        its stream, as many from a replay); returns how many were read."""
        done = 0
        replays = self._replays
        for r, s in enumerate(self._socks):
            replay = replays[r]
            if replay is not None:
                done += self._read_replay(r, replay)
            for _ in range(MAX_BATCHES_PER_POLL):
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.handle(r, frames)
                done += 1
        return done

    def handle(self, rank: int, frames: Sequence[bytes]) -> bool:
        """One ``[topic, seq, payload]`` message from *rank*'s publisher; returns whether the
        index applied it (a batch held during a replay is not, yet)."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self.bad_frames += 1
            return False
        seq = int.from_bytes(frames[1], "big", signed=True)
        try:
            batch = self._decode(frames[2])
        except self._decode_error:
            self.bad_frames += 1
            return False
        if seq < 0:
            self.bad_frames += 1
            return False
        last = self._live[rank]
        self._live[rank] = seq
        replay = self._replays[rank]
        if last is not None and seq <= last:
            # The scheduler restarted: a new publisher counts from 0 again (its first batches
            # may have gone before the subscription reconnected), its cache is empty. What a
            # replay would bring is gone with the old cache.
            if replay is not None:
                replay.close()
                self._replays[rank] = None
                self.not_repaired[RESTART] += 1
            self.restarts += 1
            self._epoch[rank] += 1
            self._next[rank] = None
            self.mappers[rank].reset()
        elif replay is not None:
            if len(replay.held) < MAX_HELD_BATCHES:
                replay.held.append((seq, batch))
                return False
            self._end_replay(rank, replay, BACKLOG)
            again = self._replays[rank]  # a further gap among the held batches
            if again is not None:
                again.held.append((seq, batch))
                return False
        return self._take(rank, seq, batch)

    def _take(self, rank: int, seq: int, batch: Any, *, gap_counted: bool = False) -> bool:
        expect = self._next[rank]
        if expect is not None and seq < expect:
            return False  # a replay brought it already (the live copy came late)
        if seq > (expect or 0):
            if not gap_counted:
                self.gaps += 1
                if self._ask_replay(rank, expect, seq, batch):
                    return False
            self.mappers[rank].reset()  # the pages it missed are parents of what comes next
        return self._apply(rank, seq, batch)

    def _apply(self, rank: int, seq: int, batch: Any) -> bool:
        """Give the index *rank*'s batch *seq*, its pages as dpcore blocks; the next is *seq* + 1."""
        self._next[rank] = seq + 1
        events = self.mappers[rank].translate(batch.events)
        return self.index.apply(KvEventBatch(rank, self._epoch[rank], seq, events, self.capacity_blocks))

    def _ask_replay(self, rank: int, expect: int | None, seq: int, batch: Any) -> bool:
        """Ask *rank*'s publisher for the batches from *expect* (0 when none was seen yet);
        returns whether a replay is now in flight (else the gap is counted as not repaired)."""
        endpoint = self._replay_at[rank]
        start = expect or 0
        if endpoint is None:
            reason = NO_REPLAY
        elif expect is not None and not self.index.known(rank):
            reason = RANK_UNKNOWN
        elif seq - start >= self.buffer_steps:  # the buffer holds the newest buffer_steps only
            reason = NOT_BUFFERED
        else:
            self._replays[rank] = Replay(self._ctx, endpoint, start, (seq, batch), self.replay_wait_s)
            self.replay_requests += 1
            self._next[rank] = start
            return True
        self.not_repaired[reason] += 1
        return False

    def _read_replay(self, rank: int, replay: Replay) -> int:
        """Apply what *rank*'s replay brought so far, without blocking; returns how many
        answers were read.

        The answer runs from the first missing batch to the newest the publisher had, so it
        also fills gaps among the batches held meanwhile; it is read until it reaches the
        gap's end and the held batches continue from there (or to its end marker).
        """
        n = 0
        while n < MAX_BATCHES_PER_POLL:
            try:
                answer = replay.recv()
            except ValueError:
                self.bad_frames += 1
                self._end_replay(rank, replay, BAD_REPLY)
                return n
            if answer is None:
                if replay.expired():
                    self._end_replay(rank, replay, TIMEOUT)
                return n
            n += 1
            seq, payload = answer
            expect = self._next[rank] or 0
            if expect > seq != END:
                continue
            if seq != expect:  # the end, or a batch skipped (no longer buffered, or dropped)
                if seq != END and replay.start < expect < replay.gap_end:
                    # Part of a long answer was dropped on the way after some of it came.
                    replay.ask(expect)
                    self.replay_requests += 1
                    return n
                self._end_replay(rank, replay, INCOMPLETE)
                return n
            try:
                batch = self._decode(payload)
            except self._decode_error:
                self.bad_frames += 1
                self._end_replay(rank, replay, BAD_REPLY)
                return n
            self._apply(rank, seq, batch)
            replay.replayed(seq)
            held = replay.held
            if seq + 1 >= replay.gap_end and (not held or held[0][0] == seq + 1):
                # Caught up with the live stream: the rest of the answer is not needed (and
                # its end marker may never come: see kv_replay).
                self._end_replay(rank, replay, INCOMPLETE)
                return n
        return n

    def _end_replay(self, rank: int, replay: Replay, reason: str) -> None:
        """The replay is over: repaired if it reached the gap's end (*reason* unused), else
        given up for *reason* (the held batch across the gap makes the index call the rank
        unknown)."""
        if (self._next[rank] or 0) >= replay.gap_end:
            self.repaired += 1
            self._release(rank, replay)
        else:
            self.not_repaired[reason] += 1
            self._release(rank, replay, gap_counted=True)

    def _release(self, rank: int, replay: Replay, *, gap_counted: bool = False) -> None:
        """End *rank*'s replay and apply the batches held meanwhile, in order (a further gap
        among them asks for another replay, which holds the rest)."""
        replay.close()
        self._replays[rank] = None
        held = replay.held
        first = gap_counted
        while held:
            again = self._replays[rank]
            if again is not None:
                again.held.extend(held)
                return
            seq, batch = held.popleft()
            self._take(rank, seq, batch, gap_counted=first)
            first = False

    def stats(self) -> dict[str, Any]:
        """The index's counters, and this stream's under ``sglang``."""
        return {
            **self.index.stats(),
            "sglang": {
                "gaps": self.gaps,
                "gaps_repaired": self.repaired,
                "gaps_not_repaired": dict(self.not_repaired),
                "replay_requests": self.replay_requests,
                "replays_in_flight": sum(r is not None for r in self._replays),
                "restarts": self.restarts,
                "bad_frames": self.bad_frames,
            },
        }

    def close(self) -> None:
        for s in self._socks:
            s.close(linger=0)
        self._socks.clear()
        for r, replay in enumerate(self._replays):
            if replay is not None:
                replay.close()
                self._replays[r] = None
