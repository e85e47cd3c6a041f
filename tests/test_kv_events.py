"""KV events on dpcore's wire: the message, the Worker SDK calls, and the controller's index."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from dpcore import wire
from dpcore.cacheindex import CLEARED, REMOVED, STORED, KvEventBatch
from dpcore.errors import WireError
from dpcore.manager import PolicyManager
from dpcore.runtime.controller import Controller
from dpcore.runtime.local import wait_for
from dpcore.sdk import Worker


def test_round_trip_keeps_order_parents_and_capacity():
    events = [[STORED, None, [1, 2, 3]], [REMOVED, [3]], [CLEARED], [STORED, 7, [(1 << 64) - 1, -(1 << 63)]]]
    b = wire.decode_rank_message(wire.encode_kv(3, epoch=9, seq=4, events=events, capacity=100))
    assert b == KvEventBatch(3, 9, 4, ((STORED, None, (1, 2, 3)), (REMOVED, (3,)), (CLEARED,), (STORED, 7, ((1 << 64) - 1, -(1 << 63)))), 100)
    assert wire.message_type(wire.encode_kv(0, epoch=1, seq=0, events=[])) == wire.KV


@pytest.mark.parametrize(
    ("events", "why"),
    [
        ([[STORED, None, [1.5]]], "64-bit integers"),
        ([[STORED, "p", [1]]], "parent"),
        ([[REMOVED]], "bad event"),
        ([[9, [1]]], "bad event"),
        ([[STORED, None, list(range(wire.MAX_KV_KEYS + 1))]], "at most"),
        ([[CLEARED]] * (wire.MAX_KV_EVENTS + 1), "at most"),
        ([[STORED, None, list(range(40_000))], [REMOVED, list(range(40_000))]], "at most"),
        ("nope", "list"),
    ],
)
def test_bad_batches_are_clear_wire_errors(events, why):
    buf = msgpack.packb({"v": wire.VERSION, "t": wire.KV, "rank": 0, "epoch": 1, "seq": 0, "cap": 0, "ev": events})
    with pytest.raises(WireError, match=why):
        wire.decode_rank_message(buf)


def test_negative_seq_and_missing_fields_are_wire_errors():
    for h in ({"rank": 0, "epoch": 1, "seq": -1, "cap": 0, "ev": []}, {"rank": 0, "epoch": 1, "ev": []}):
        with pytest.raises(WireError, match="kv"):
            wire.decode_rank_message(msgpack.packb({"v": wire.VERSION, "t": wire.KV, **h}))


@pytest.fixture
def controller():
    c = Controller(PolicyManager.from_method("round_robin", dp_size=2), heartbeat_timeout_s=5.0)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def test_worker_events_reach_the_index_and_a_gap_asks_for_a_resync(controller):
    c = controller
    idx = c.manager.cache
    ctx = zmq.Context()
    eps = c.endpoints
    try:
        with Worker(0, dispatch_endpoint=eps.dispatch[0], report_endpoint=eps.report, zmq_ctx=ctx, epoch=5) as w:
            w.kv_capacity_blocks = 1000
            w.kv_stored([11, 12, 13])
            w.kv_stored([14], parent=13)
            w.kv_removed([14])
            assert w.kv_flush()
            wait_for(lambda: idx.match(0, [11, 12, 13, 14]) == 3)
            assert c.manager.ctx.cache.state(0) == "exact" and idx.stats()["batches"] == 1
            # A batch lost on the way: the controller sees the gap, forgets rank 0's cache, and
            # asks rank 0 (only) to resync.
            w._kv_seq += 1
            w.kv_stored([21])
            w.kv_flush()
            wait_for(lambda: idx.match(0, [11]) is None)
            wait_for(lambda: bool(w.recv(0.05)) or bool(w.controls))
            ctl = w.controls.popleft()
            assert ctl.op == wire.KV_RESYNC and ctl.data == {"rank": 0}
            assert w.kv_resync([(None, [11, 12]), (12, [31])])
            wait_for(lambda: idx.match(0, [11, 12, 31]) == 3)
            st = c.consistent_stats()["kv_events"]
            assert st["gaps"] == 1 and st["resyncs_asked"] == 1 and st["exact_ranks"] == 1
    finally:
        ctx.term()


def test_a_batch_from_another_life_is_not_applied(controller):
    c = controller
    ctx = zmq.Context()
    eps = c.endpoints
    try:
        with Worker(1, dispatch_endpoint=eps.dispatch[1], report_endpoint=eps.report, zmq_ctx=ctx, epoch=7) as w:
            push = ctx.socket(zmq.PUSH)
            push.linger = 0
            push.connect(eps.report)
            push.send(wire.encode_kv(1, epoch=6, seq=0, events=[[STORED, None, [1]]]))
            w.kv_stored([2])
            w.kv_flush()
            wait_for(lambda: c.manager.cache.match(1, [2]) == 1)
            assert c.manager.cache.match(1, [1]) == 0
            assert c.consistent_stats()["kv_events"]["stale_lives"] == 1
            push.close()
    finally:
        ctx.term()


def test_worker_splits_a_long_chain_into_full_batches():
    class Sent(list):
        def send(self, frame, flags=0):
            self.append(wire.decode_rank_message(frame))

    w = Worker.__new__(Worker)  # the SDK's batching, without sockets
    w.rank, w.epoch, w.kv_capacity_blocks, w.kv_dropped_batches = 0, 1, 0, 0
    w._kv, w._kv_keys, w._kv_seq = [], 0, 0
    w._tx = sent = Sent()
    keys = list(range(wire.MAX_KV_KEYS + 10))
    w.kv_stored(keys)
    w.kv_flush()
    assert [b.seq for b in sent] == [0, 1]
    (first,), (second,) = sent[0].events, sent[1].events
    assert first[2] == tuple(keys[: wire.MAX_KV_KEYS]) and second[1] == keys[wire.MAX_KV_KEYS - 1]


#: Bound on what waits for processes and their reports (generous: the suite runs on loaded machines).
STARTUP_S = 60.0


@pytest.mark.e2e
def test_mock_ranks_publish_their_real_cache_end_to_end():
    import subprocess
    import sys

    from dpcore.sdk import Client

    c = Controller(PolicyManager.from_method("cache_aware", dp_size=2), heartbeat_timeout_s=5.0)
    c.start()
    eps = c.endpoints
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dpcore", "--log-level", "warning", "mock-worker", "--rank", str(r),
             "--dispatch", eps.dispatch[r], "--report", eps.report, "--speedup", "50", "--kv-events",
             "--kv-capacity", "4096", "--block-size", "64", "--exit-with-parent"],
        )  # fmt: skip
        for r in range(2)
    ]
    idx = c.manager.cache
    try:
        # Two Python processes start (seconds on a loaded machine): a generous bound.
        wait_for(lambda: all(c.ledger.reported[r] for r in range(2)), STARTUP_S, "both mock ranks to report")
        with Client(eps.ingress) as client:
            prompts = [tuple(range(1000 * p, 1000 * p + 8)) for p in range(8)]  # 8 blocks, 512 tokens each
            for i, bh in enumerate(prompts):
                client.submit(f"p{i}", num_tokens=512, block_hashes=bh, max_new_tokens=4)
            replies = client.wait_all(STARTUP_S)
            assert len(replies) == len(prompts) and {r.kind for r in replies} == {"out"}
            # The ranks' caches (4096 tokens = 64 blocks each) hold every prompt where it ran.
            wait_for(lambda: all(idx.known(r) for r in range(2)), STARTUP_S, "the index to know both ranks")
            served = {r.rid: r.rank for r in replies}
            wait_for(lambda: all(idx.match(served[f"p{i}"], bh) == 8 for i, bh in enumerate(prompts)), STARTUP_S)
            for i, bh in enumerate(prompts):
                assert idx.match(1 - served[f"p{i}"], bh) == 0
            # A follow-up of prompt 0 goes where the rank says it is cached, and says so.
            client.submit("again", num_tokens=576, block_hashes=(*prompts[0], 9), max_new_tokens=4)
            (again,) = client.wait_all(STARTUP_S)
            assert again.rank == served["p0"] and c.books.decision_reasons.get(("cache_aware", "prefix_hit")) == 1
            # Evictions are published too: fill rank 0's cache with new prompts.
            for i in range(12):
                client.submit(f"fill{i}", num_tokens=512, block_hashes=tuple(range(90_000 + 100 * i, 90_000 + 100 * i + 8)), max_new_tokens=4, routed_dp_rank=0)
            assert len(client.wait_all(STARTUP_S)) == 12
            wait_for(lambda: idx.blocks(0) <= 64 and c.stats()["kv_events"]["batches"] > 4, STARTUP_S)
            st = c.consistent_stats()["kv_events"]
            assert st["exact_ranks"] == 2 and st["gaps"] == 0 and st["overflows"] == 0
            assert idx.blocks(0) <= 4096 // 64
    finally:
        c.stop()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
