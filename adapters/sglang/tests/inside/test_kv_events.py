"""SGLang's KV events into dpcore's cache index, with SGLang's own event classes, encoder and
ZMQ publisher (the pinned venv)."""

from __future__ import annotations

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
from dpcore_sglang.kv_events import PageMapper, SglangKvEvents

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
    assert f.match(TOKENS) is None and f.kv.gaps == 1
    assert f.send(AllBlocksCleared(), stored(TOKENS[:4], 4)[0])
    assert f.match(TOKENS) == 1


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sglangs_publisher_per_dp_rank_end_to_end():
    base = free_port()
    while True:  # rank 1 publishes on base + 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
                break
            except OSError:
                base = free_port()
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
