"""SGLang's KV events into dpcore's cache index, with SGLang's own event classes, encoder and
ZMQ publisher (the pinned venv)."""

from __future__ import annotations

import json
import socket
import time

import msgspec
import zmq
from sglang.srt.disaggregation.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)
from sglang.srt.mem_cache.utils import get_hash_str, hash_str_to_int64

from dpcore.cacheindex import CacheIndex
from dpcore.hashing import block_hashes
from dpcore_sglang import kv_events
from dpcore_sglang.kv_events import SglangKvEvents
from dpcore_sglang.metrics import kv_event_families
from dpcore_sglang.page_map import PageMapper
from dpcore_sglang.testing import free_port

ENCODE = msgspec.msgpack.Encoder().encode  # what ZmqEventPublisher sends as the payload
TOKENS = list(range(1000, 1024))


def pages(tokens, page_size, parent=None):
    """SGLang's page hashes for *tokens* (as its radix cache computes them), chained from *parent*."""
    out = get_hash_str(tokens, parent, page_size)
    return [hash_str_to_int64(h) for h in out], out[-1]


def stored(tokens, page_size, parent_hash=None, parent_str=None, **kw):
    hashes, last = pages(tokens, page_size, parent_str)
    ev = BlockStored(block_hashes=hashes, parent_block_hash=parent_hash, token_ids=list(tokens), block_size=page_size, lora_id=None, **kw)
    return ev, hashes, last


class Feed:
    """SglangKvEvents fed frames by hand (no sockets), as its SUB socket would."""

    def __init__(self, block_size=4, dp_size=1):
        self.index = CacheIndex(dp_size)
        self.kv = SglangKvEvents(self.index, "inproc://unused", dp_size, block_size, zmq_ctx=zmq.Context.instance())
        self.seq = [0] * dp_size

    def send(self, *events, rank=0, seq=None):
        s = self.seq[rank] if seq is None else seq
        self.seq[rank] = s + 1
        frames = [b"", s.to_bytes(8, "big"), ENCODE(KVEventBatch(ts=time.time(), events=list(events)))]
        return self.kv.handle(rank, frames)

    def match(self, tokens, rank=0, block_size=4):
        return self.index.match(rank, block_hashes(tokens, block_size))


def test_stored_pages_become_dpcore_blocks_for_any_page_size():
    for page_size in (1, 2, 3, 4, 8):
        f = Feed(block_size=4)
        ev, _, _ = stored(TOKENS[:12] if page_size != 8 else TOKENS[:16], page_size)
        assert f.send(ev)
        assert f.match(TOKENS) == (3 if page_size != 8 else 4), page_size
        assert f.kv.mappers[0].unmapped == 0


def test_a_chain_stored_in_two_events_continues_the_prefix():
    f = Feed(block_size=4)
    ev1, h1, last = stored(TOKENS[:6], 3)  # 6 tokens: one dpcore block and half of the next
    ev2, _, _ = stored(TOKENS[6:12], 3, parent_hash=h1[-1], parent_str=last)
    f.send(ev1)
    assert f.match(TOKENS) == 1
    f.send(ev2)
    assert f.match(TOKENS) == 3


def test_removed_pages_remove_the_blocks_ending_in_them():
    f = Feed(block_size=4)
    ev, hashes, _ = stored(TOKENS[:12], 2)
    f.send(ev)
    f.send(BlockRemoved(block_hashes=hashes[4:]))  # tokens 8..11: the third block
    assert f.match(TOKENS) == 2
    f.send(BlockRemoved(block_hashes=hashes[2:4]))  # tokens 4..7: the second block ends in them
    assert f.match(TOKENS) == 1


def test_all_cleared_is_empty_and_trusted():
    f = Feed(block_size=4)
    f.send(stored(TOKENS[:8], 1)[0])
    f.send(AllBlocksCleared())
    assert f.match(TOKENS) == 0 and f.index.state(0) == "exact"


def test_a_sequence_gap_makes_the_rank_unknown_until_a_clear():
    f = Feed(block_size=4)
    f.send(stored(TOKENS[:8], 1)[0])
    assert not f.send(stored([7] * 4, 1)[0], seq=5)  # batches 1-4 lost
    assert f.match(TOKENS) is None and f.kv.gaps == 1 and f.kv.not_repaired["no_replay"] == 1
    assert f.send(AllBlocksCleared(), stored(TOKENS[:4], 4)[0])
    assert f.match(TOKENS) == 1


def test_the_operators_kv_events_config_says_where_to_ask_for_replays():
    from sglang.srt.server_args import ServerArgs

    base = {"publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "kv"}
    with_replay = json.dumps({**base, "replay_endpoint": "tcp://*:5657", "buffer_steps": 500})
    kv = SglangKvEvents.from_server_args(ServerArgs(model_path="dummy", kv_events_config=with_replay), CacheIndex(2), 2, 4)
    without = SglangKvEvents.from_server_args(ServerArgs(model_path="dummy", kv_events_config=json.dumps(base)), CacheIndex(2), 2, 4)
    try:
        assert kv._replay_at == ["tcp://127.0.0.1:5657", "tcp://127.0.0.1:5658"] and kv.buffer_steps == 500
        assert without._replay_at == [None, None] and without.buffer_steps == 10_000  # SGLang's default
    finally:
        kv.close()
        without.close()


def test_gaps_are_counted_in_stats_and_metrics():
    f = Feed(block_size=4)
    f.send(stored(TOKENS[:8], 1)[0])
    f.send(stored([7] * 4, 1)[0], seq=3)
    assert f.kv.stats()["sglang"]["gaps_not_repaired"]["no_replay"] == 1
    samples = {(s.name, tuple(s.labels.values())): s.value for fam in kv_event_families(f.kv) for s in fam.samples}
    assert samples[("dpcore_kv_event_gaps_total", ())] == 1
    assert samples[("dpcore_kv_event_gaps_repaired_total", ())] == 0
    assert samples[("dpcore_kv_event_gaps_not_repaired_total", ("no_replay",))] == 1
    assert samples[("dpcore_kv_event_gaps_not_repaired_total", ("timeout",))] == 0


def test_a_rank_restart_starts_a_new_exact_life():
    f = Feed(block_size=4, dp_size=2)
    f.send(stored(TOKENS[:8], 1)[0], rank=1)
    f.send(stored(TOKENS[:8], 1)[0], rank=1)  # seq 1
    assert f.match(TOKENS, rank=1) == 2
    assert f.send(stored(TOKENS[:4], 2)[0], rank=1, seq=0)  # a new publisher: seq 0 again
    assert f.match(TOKENS, rank=1) == 1 and f.kv.restarts == 1
    assert f.match(TOKENS, rank=0) is None  # rank 0 never published


def test_lora_salted_and_host_tier_pages_are_skipped():
    f = Feed(block_size=4)
    f.send(stored(TOKENS[:8], 1, cache_salt="s")[0], stored(TOKENS[:8], 1, medium="CPU_PINNED")[0])
    assert f.match(TOKENS) == 0 and f.kv.mappers[0].skipped == 16


def test_bad_frames_are_counted_not_raised():
    f = Feed()
    assert not f.kv.handle(0, [b"", b"\0" * 8, b"\xc1"])
    assert not f.kv.handle(0, [b"", b"\0" * 8])
    assert f.kv.bad_frames == 2 and f.index.state(0) == "unknown"


def test_page_map_stays_bounded():
    m = PageMapper(4, max_pages=10)
    ev, _, _ = stored(TOKENS[:12], 1)
    m.translate([ev])
    assert len(m) == 0  # over its bound: reset rather than grow


def two_ports() -> int:
    """A free port whose successor is free too (rank 1 binds base + 1)."""
    while True:
        base = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
                return base
            except OSError:
                continue


def test_sglangs_publisher_per_dp_rank_end_to_end():
    base = two_ports()
    index = CacheIndex(2)
    kv = SglangKvEvents(index, f"tcp://127.0.0.1:{base}", 2, 4)
    pub = ZmqEventPublisher(attn_dp_rank=1, endpoint=f"tcp://127.0.0.1:{base}", bind=True)
    try:
        time.sleep(0.5)  # let the subscription reach the publisher before its first batch
        pub.publish(KVEventBatch(ts=time.time(), events=[stored(TOKENS[:12], 1)[0]]))
        deadline = time.monotonic() + 10
        while index.match(1, block_hashes(TOKENS, 4)) != 3:
            kv.poll()
            assert time.monotonic() < deadline, kv.mappers[1].unmapped
            time.sleep(0.01)
        assert index.state(0) == "unknown"
    finally:
        pub.shutdown()
        kv.close()


# ---------------------------------------------------------------- gaps repaired by SGLang's replay
#
# Each test runs SGLang's real ZmqEventPublisher (PUB and, where named, its replay ROUTER) on
# loopback. The lost batch is made by LossySubscriber, which receives the frames of the named
# seqs from its SUB socket and discards them: to the adapter that is exactly what a PUB drop
# looks like (a seq missing from the stream), and unlike a queue overflow it loses the same
# batch on every run. test_a_real_pub_drop_is_repaired makes ZMQ drop batches itself.

WAIT_S = 0.5  # the adapter's replay wait where the test waits it out
NO_WAIT_S = 60.0  # where it must not run out (a loaded host answers late, not never)


class LossySubscriber(SglangKvEvents):
    """SglangKvEvents that discards the live batches whose seq is in *lose*."""

    def __init__(self, *args, lose=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.lose = set(lose)

    def handle(self, rank, frames):
        if len(frames) == 3 and int.from_bytes(frames[1], "big") in self.lose:
            return False
        return super().handle(rank, frames)


class Rig:
    """One rank: SGLang's publisher (with a replay ROUTER unless *replay* is False) and the
    adapter's subscriber; ``replay_at`` overrides where the adapter asks for replays."""

    def __init__(self, *, replay=True, buffer_steps=100, replay_at=None, lose=(), adapter_buffer_steps=None, wait_s=NO_WAIT_S):
        self.port, self.replay_port = free_port(), free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.replay = f"tcp://127.0.0.1:{self.replay_port}" if replay else None
        self.buffer_steps = buffer_steps
        self.pub = self.start_publisher()
        self.index = CacheIndex(1)
        self.kv = LossySubscriber(
            self.index, self.endpoint, 1, 4, lose=lose, replay_endpoint=replay_at or self.replay,
            buffer_steps=adapter_buffer_steps or buffer_steps, replay_wait_s=wait_s,
        )
        self.longest_poll = 0.0
        time.sleep(0.5)  # let the subscription reach the publisher before its first batch

    def start_publisher(self):
        deadline = time.monotonic() + 10
        while True:
            try:
                return ZmqEventPublisher(
                    attn_dp_rank=0, endpoint=self.endpoint, replay_endpoint=self.replay, buffer_steps=self.buffer_steps, bind=True
                )
            except zmq.ZMQError:  # a restart: the old publisher's sockets close asynchronously
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def publish(self, *events):
        self.pub.publish(KVEventBatch(ts=time.time(), events=list(events)))

    def poll_until(self, done, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not done():
            t0 = time.perf_counter()
            self.kv.poll()
            self.longest_poll = max(self.longest_poll, time.perf_counter() - t0)
            assert time.monotonic() < deadline, (self.kv.stats(), self.kv._next, self.kv._replays)
            time.sleep(0.005)

    def applied(self, seq):
        """Whether the adapter has taken seq *seq* (applied it, or given up a gap past it)."""
        return (self.kv._next[0] or 0) > seq and self.kv._replays[0] is None

    def match(self, tokens):
        return self.index.match(0, block_hashes(tokens, 4))

    def close(self):
        self.pub.shutdown()
        self.kv.close()


def chain(n_pages, page_size=4, tokens=TOKENS):
    """SGLang's events storing *tokens* as *n_pages* one-page events, each extending the last."""
    out, parent_hash, parent_str = [], None, None
    for i in range(n_pages):
        ev, hashes, parent_str = stored(tokens[i * page_size : (i + 1) * page_size], page_size, parent_hash, parent_str)
        parent_hash = hashes[-1]
        out.append(ev)
    return out


def test_a_dropped_batch_is_repaired_from_the_replay():
    rig = Rig(lose={2})
    try:
        for ev in chain(6):  # seq 0..5, one page (one dpcore block) each; seq 2 lost on the way
            rig.publish(ev)
        rig.poll_until(lambda: rig.applied(5))
        assert rig.match(TOKENS) == 6  # every page, those after the lost one included
        assert rig.index.state(0) == "exact" and rig.index.gaps == 0
        assert (rig.kv.gaps, rig.kv.repaired) == (1, 1)
        assert sum(rig.kv.not_repaired.values()) == 0
    finally:
        rig.close()


def test_a_late_subscription_is_caught_up_from_the_replay():
    rig = Rig(lose={0, 1, 2})  # as if subscribed after the scheduler published three batches
    try:
        for ev in chain(4):
            rig.publish(ev)
        rig.poll_until(lambda: rig.applied(3))
        assert rig.match(TOKENS) == 4 and rig.index.state(0) == "exact"
        assert (rig.kv.gaps, rig.kv.repaired) == (1, 1)
    finally:
        rig.close()


def test_a_gap_older_than_the_replay_buffer_is_not_repaired():
    # The publisher keeps 2 batches; the adapter is told 100, so it asks and reads the answer.
    rig = Rig(lose={1}, buffer_steps=2, adapter_buffer_steps=100)
    try:
        evs = chain(6)
        rig.publish(evs[0])
        rig.publish(evs[1])  # lost
        rig.poll_until(lambda: rig.applied(0))
        for ev in evs[2:]:  # seq 2..5: the buffer holds 4 and 5 when the replay is served
            rig.publish(ev)
        time.sleep(0.3)  # all of them published before the gap is seen
        rig.poll_until(lambda: rig.applied(5))
        assert rig.match(TOKENS) is None and rig.index.state(0) == "unknown"
        assert rig.kv.not_repaired["incomplete"] == 1 and rig.kv.repaired == 0
    finally:
        rig.close()


def test_a_gap_longer_than_the_buffer_is_not_asked_for():
    rig = Rig(lose={1, 2, 3}, buffer_steps=2)
    try:
        for ev in chain(5):
            rig.publish(ev)
        rig.poll_until(lambda: rig.applied(4))
        assert rig.match(TOKENS) is None and rig.kv.not_repaired["not_buffered"] == 1
    finally:
        rig.close()


def test_without_a_replay_endpoint_a_gap_leaves_the_rank_unknown():
    rig = Rig(replay=False, lose={1})
    try:
        for ev in chain(3):
            rig.publish(ev)
        rig.poll_until(lambda: rig.applied(2))
        assert rig.match(TOKENS) is None and rig.index.state(0) == "unknown"
        assert rig.kv.not_repaired["no_replay"] == 1 and rig.kv.repaired == 0
        rig.publish(AllBlocksCleared(), stored(TOKENS[:8], 4)[0])  # a flush: exact again
        rig.poll_until(lambda: rig.applied(3))
        assert rig.match(TOKENS) == 2
    finally:
        rig.close()


def test_a_replay_that_never_answers_gives_the_rank_up_after_the_wait():
    # Nothing listens where the adapter asks (a publisher that died): the request is queued,
    # never answered.
    rig = Rig(lose={1}, replay_at=f"tcp://127.0.0.1:{free_port()}", wait_s=WAIT_S)
    try:
        for ev in chain(3):
            rig.publish(ev)
        rig.poll_until(lambda: rig.kv._replays[0] is not None)
        asked = time.monotonic()
        assert rig.match(TOKENS) == 1  # what it held before the gap, while the replay is awaited
        rig.poll_until(lambda: rig.applied(2))
        assert time.monotonic() - asked >= WAIT_S * 0.9
        assert rig.match(TOKENS) is None and rig.kv.not_repaired["timeout"] == 1
        assert rig.longest_poll < WAIT_S  # polled all along, never blocked for the wait
    finally:
        rig.close()


def test_batches_held_past_the_bound_give_the_rank_up(monkeypatch):
    monkeypatch.setattr(kv_events, "MAX_HELD_BATCHES", 3)
    rig = Rig(lose={1}, replay_at=f"tcp://127.0.0.1:{free_port()}")  # never answered
    try:
        for ev in chain(6):
            rig.publish(ev)
        rig.poll_until(lambda: rig.applied(5))  # given up long before the wait is over
        assert rig.match(TOKENS) is None and rig.kv.not_repaired["backlog"] == 1
    finally:
        rig.close()


def test_a_restart_during_a_replay_is_a_new_life():
    replay = f"tcp://127.0.0.1:{free_port()}"
    router = zmq.Context.instance().socket(zmq.ROUTER)  # the old publisher's replay: never answers
    router.linger = 0
    router.bind(replay)
    rig = Rig(replay=False, lose={1}, replay_at=replay)
    try:
        for ev in chain(6):
            rig.publish(ev)
        for _ in range(14):  # seq 6..19: a new life's first seqs cannot pass for the old one's
            rig.publish(AllBlocksCleared())
        rig.poll_until(lambda: rig.kv._replays[0] is not None)
        assert router.poll(5000)
        _ident, empty, start = router.recv_multipart()
        assert (empty, int.from_bytes(start, "big")) == (b"", 1)  # SGLang's request framing
        # The scheduler restarts: a new publisher (this time with its replay ROUTER), seq from 0.
        rig.pub.shutdown()
        router.close(linger=0)
        rig.replay = replay
        rig.pub = rig.start_publisher()
        other = list(range(2000, 2032))
        new = chain(8, tokens=other)
        # The subscription reconnects in its own time: the first batches of the new life may be
        # missed, and are then replayed from the new publisher.
        published = 0
        while rig.kv.restarts == 0 and published < len(new):
            rig.publish(new[published])
            published += 1
            pause = time.monotonic() + 0.2
            rig.poll_until(lambda: rig.kv.restarts == 1 or time.monotonic() > pause)  # noqa: B023 - this pause
        for ev in new[published:]:
            rig.publish(ev)
        rig.poll_until(lambda: rig.applied(len(new) - 1))
        assert rig.kv.restarts == 1 and rig.kv.not_repaired["restart"] == 1, (published, rig.kv.stats()["sglang"], rig.kv._next)
        assert rig.index.state(0) == "exact" and rig.match(other) == 8 and rig.match(TOKENS) == 0
        assert rig.kv.gaps == 1 + rig.kv.repaired  # the old life's, and the new life's start if missed
    finally:
        rig.close()
        router.close(linger=0)


def next_page(tokens, page_size=4):
    """``(parent_hash, parent_str)`` for a page following *tokens*."""
    hashes, last = pages(tokens, page_size)
    return hashes[-1], last


def test_a_real_pub_drop_is_repaired():
    # ZMQ drops for real: the publisher's PUB and the adapter's SUB hold one message each
    # (SGLang's hwm=1 and a context whose sockets default to RCVHWM 1), and a burst of 12 kB
    # batches, sent while the adapter does not read, overflows them and the kernel's buffers.
    ctx = zmq.Context()
    ctx.setsockopt(zmq.RCVHWM, 1)
    port, replay_port = free_port(), free_port()
    endpoint, replay = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}"
    pub = ZmqEventPublisher(attn_dp_rank=0, endpoint=endpoint, replay_endpoint=replay, hwm=1, bind=True)
    index = CacheIndex(1)
    kv = SglangKvEvents(index, endpoint, 1, 4, zmq_ctx=ctx, replay_endpoint=replay)
    try:
        time.sleep(0.5)
        filler = BlockStored(
            block_hashes=[1], parent_block_hash=None, token_ids=list(range(4096)), block_size=4096, lora_id=None,
            medium="CPU_PINNED",  # not indexed: the bytes are the point
        )
        burst = 2000
        for _ in range(burst):
            pub.publish(KVEventBatch(ts=time.time(), events=[filler]))
        while pub._event_queue.qsize():  # all of it sent (or dropped) before the adapter reads
            time.sleep(0.05)
        time.sleep(0.5)
        pub.publish(KVEventBatch(ts=time.time(), events=[stored(TOKENS[:12], 4)[0]]))  # seq 2000
        deadline = time.monotonic() + 60
        while index.match(0, block_hashes(TOKENS, 4)) != 3 or kv.stats()["sglang"]["replays_in_flight"]:
            kv.poll()
            assert time.monotonic() < deadline, kv.stats()["sglang"]
            time.sleep(0.001)
        assert kv.gaps >= 1 and kv.repaired == kv.gaps and index.state(0) == "exact", kv.stats()["sglang"]
    finally:
        pub.shutdown()
        kv.close()
        ctx.destroy(linger=0)


def test_an_answer_cut_short_is_asked_again_from_where_it_stopped():
    # SGLang's ROUTER drops the tail of a long answer when its queue for the peer is full; this
    # ROUTER answers the first request with a hole in it, then the second in full.
    replay = f"tcp://127.0.0.1:{free_port()}"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    router.bind(replay)
    rig = Rig(replay=False, lose={1, 2, 3, 4}, replay_at=replay)
    evs = chain(6)

    def answer(seqs):
        assert router.poll(5000)
        ident, _, start = router.recv_multipart()
        for s in seqs:
            router.send_multipart([ident, b"", b"", s.to_bytes(8, "big"), ENCODE(KVEventBatch(ts=0.0, events=[evs[s]]))])
        router.send_multipart([ident, b"", b"", ZmqEventPublisher.END_SEQ, b""])
        return int.from_bytes(start, "big")

    try:
        for ev in evs:
            rig.publish(ev)
        rig.poll_until(lambda: rig.kv._replays[0] is not None)
        assert answer([1, 2, 4, 5]) == 1  # 3 dropped on the way
        rig.poll_until(lambda: rig.kv.replay_requests == 2)
        assert answer([3, 4, 5]) == 3
        rig.poll_until(lambda: rig.applied(5))
        assert rig.match(TOKENS) == 6 and rig.index.state(0) == "exact" and rig.kv.repaired == 1
    finally:
        rig.close()
        router.close(linger=0)


def test_sglangs_controller_catches_a_late_subscription_up_from_the_replay(controller):
    # SGLang's real controller process with the adapter, and SGLang's publisher for rank 1 in
    # this process. The publisher stores a prompt's pages before the controller subscribes
    # (PUB sends them to nobody: lost for real); the first batch the controller sees is seq 3
    # or later, it asks the replay ROUTER for those before it, and places the prompt on rank 1.
    from dpcore_sglang.config import AdapterConfig
    from dpcore_sglang.testing import make_request, scrape

    endpoint, replay = f"tcp://127.0.0.1:{two_ports()}", f"tcp://127.0.0.1:{two_ports()}"
    pub = ZmqEventPublisher(attn_dp_rank=1, endpoint=endpoint, replay_endpoint=replay, bind=True)
    prompt = list(range(5000, 6024))
    try:
        pub.publish(KVEventBatch(ts=time.time(), events=[stored(prompt, 1)[0]]))
        pub.publish(KVEventBatch(ts=time.time(), events=[stored([1] * 4, 1)[0]]))
        pub.publish(KVEventBatch(ts=time.time(), events=[stored([2] * 4, 1)[0]]))
        metrics = free_port()
        config = json.dumps({"publisher": "zmq", "endpoint": endpoint, "replay_endpoint": replay})
        h = controller(
            dp_size=2, sglang_method="round_robin", adapter=AdapterConfig(method="cache_aware", metrics_port=metrics),
            server_args={"kv_events_config": config},
        )
        # The adapter reads events before each dispatch: publish and dispatch until the
        # subscription is up, the gap seen and the replay's answer read.
        deadline = time.monotonic() + 30
        for i in range(1000):
            pub.publish(KVEventBatch(ts=time.time(), events=[stored([3 + i] * 4, 1)[0]]))  # seq 3...
            time.sleep(0.2)
            h.send(make_request(f"tick{i}", 64, first_token=90_000 + 100 * i))
            assert len(h.deliveries(1)) == 1
            m = scrape(metrics)
            if m.get(("dpcore_kv_event_gaps_repaired_total", ())) or time.monotonic() > deadline:
                break
        assert m[("dpcore_kv_event_gaps_total", ())] == 1
        assert m[("dpcore_kv_event_gaps_repaired_total", ())] == 1
        assert sum(v for (name, _), v in m.items() if name == "dpcore_kv_event_gaps_not_repaired_total") == 0
        h.send(make_request("probe", len(prompt), first_token=prompt[0]))
        (probe,) = h.deliveries(1)
        assert probe.rank == 1  # where the replayed batch says the prompt is cached
    finally:
        pub.shutdown()
