"""Routed ranks, bad input, dead ranks and idling: what upstream crashes or spins on."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest
from sglang.srt.managers.io_struct import AbortReq, BatchTokenizedGenerateReqInput
from sglang.srt.managers.utils import HEALTH_CHECK_RID_PREFIX

from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.testing import make_request

pytestmark = pytest.mark.sglang

TOTAL_REQUESTS = AdapterConfig(method="total_requests")


def send_around(h, bad, n: int = 3) -> None:
    """n good requests, *bad*, n good requests."""
    for i in range(n):
        h.send(make_request(f"before{i}"))
    h.send(bad)
    for i in range(n):
        h.send(make_request(f"after{i}"))


def test_routed_rank_is_honoured_and_counted(controller):
    h = controller(sglang_method="total_requests", adapter=TOTAL_REQUESTS)
    for i in range(3):
        h.send(make_request(f"routed{i}", routed_dp_rank=2))
    assert [d.rank for d in h.deliveries(3)] == [2, 2, 2]
    for i in range(3):
        h.send(make_request(f"plain{i}"))
    # The routed requests are real load on rank 2 (dpcore counts them; upstream does not).
    assert sorted(d.rank for d in h.deliveries(3)) == [0, 1, 3]


@pytest.mark.parametrize("bad_rank", [7, -1, 4])
def test_out_of_range_routed_rank_fails_only_that_request(controller, bad_rank):
    h = controller(sglang_method="total_requests", adapter=TOTAL_REQUESTS)
    send_around(h, make_request("bad", routed_dp_rank=bad_rank, http_worker_ipc="ipc:///tmp/http-worker-3"))
    got = h.deliveries(6)
    assert h.deliveries(1, timeout=0.2) == []
    assert sorted(d.rid for d in got) == sorted([f"before{i}" for i in range(3)] + [f"after{i}" for i in range(3)])
    (answer,) = h.answers(1)
    assert isinstance(answer, AbortReq)
    assert answer.rid == "bad"
    assert answer.http_worker_ipc == "ipc:///tmp/http-worker-3"  # multi-tokenizer return route
    assert answer.finished_reason == {
        "type": "abort",
        "status_code": 400,
        "message": f"routed_dp_rank={bad_rank} out of range [0, 4)",
    }


def test_upstream_dies_on_an_out_of_range_routed_rank(controller):
    # The same traffic through SGLang's own dispatch: the case the adapter fixes.
    h = controller(sglang_method="total_requests", adapter=None, expect_crash=True)
    send_around(h, make_request("bad", routed_dp_rank=7))
    got = h.deliveries(7, timeout=2)
    assert sorted(d.rid for d in got) == [f"before{i}" for i in range(3)]
    assert h.quit_signals == 1  # SGLang's launcher kills the whole server on this signal
    assert h.answers(1, timeout=0.5) == []


def test_missing_bootstrap_room_fails_only_that_request(controller):
    h = controller(sglang_method="follow_bootstrap_room", adapter=AdapterConfig(method="follow_bootstrap_room"))
    for i in range(3):
        h.send(make_request(f"room{i}", bootstrap_room=i))
    h.send(make_request("no-room"))
    h.send(make_request("room9", bootstrap_room=9))
    assert {d.rid: d.rank for d in h.deliveries(4)} == {"room0": 0, "room1": 1, "room2": 2, "room9": 1}
    (answer,) = h.answers(1)
    assert answer.rid == "no-room"
    assert answer.finished_reason["status_code"] == 400
    assert "bootstrap_room" in answer.finished_reason["message"]


def test_routed_to_an_inactive_rank_fails_with_503(controller):
    h = controller(sglang_method="total_requests", adapter=TOTAL_REQUESTS)
    h.set_status([True, False, True, True])
    send_around(h, make_request("to-dead", routed_dp_rank=1))
    assert len(h.deliveries(6)) == 6
    (answer,) = h.answers(1)
    assert answer.rid == "to-dead"
    assert answer.finished_reason["status_code"] == 503
    assert "inactive" in answer.finished_reason["message"]


def test_inactive_ranks_get_nothing_from_load_policies(controller):
    # Upstream's total_requests sends half of this burst to the two inactive ranks.
    h = controller(sglang_method="total_requests", adapter=TOTAL_REQUESTS)
    h.set_status([True, False, True, False])
    for i in range(8):
        h.send(make_request(f"r{i}"))
    assert Counter(d.rank for d in h.deliveries(8)) == {0: 4, 2: 4}


@pytest.mark.parametrize("method", ["round_robin", "total_tokens", "cache_aware"])
def test_all_ranks_inactive_fails_requests_then_recovers(controller, method):
    h = controller(sglang_method="round_robin", adapter=AdapterConfig(method=method))
    h.set_status([False] * 4)
    for i in range(3):
        h.send(make_request(f"nowhere{i}"))
    answers = h.answers(3)
    assert [a.rid for a in answers] == [f"nowhere{i}" for i in range(3)]
    assert {a.finished_reason["status_code"] for a in answers} == {503}
    assert h.deliveries(1, timeout=0.3) == []
    h.set_status([True] * 4)
    for i in range(4):  # distinct prompts, so cache_aware has no prefix to follow
        h.send(make_request(f"back{i}", first_token=1000 * i))
    assert sorted(d.rank for d in h.deliveries(4)) == [0, 1, 2, 3]


def test_health_check_with_no_active_rank_is_answered(controller):
    h = controller(sglang_method="round_robin", adapter=AdapterConfig(method="round_robin"))
    h.send(make_request(f"{HEALTH_CHECK_RID_PREFIX}_1", num_tokens=1))
    assert [d.rid for d in h.deliveries(1)] == [f"{HEALTH_CHECK_RID_PREFIX}_1"]
    h.set_status([False] * 4)
    h.send(make_request(f"{HEALTH_CHECK_RID_PREFIX}_2", num_tokens=1))
    (answer,) = h.answers(1)
    assert answer.rid == f"{HEALTH_CHECK_RID_PREFIX}_2"


def test_batch_and_embeddings_only_requests(controller):
    h = controller(sglang_method="total_tokens", adapter=AdapterConfig(method="total_tokens"))
    batch = BatchTokenizedGenerateReqInput(batch=[make_request(f"b{i}") for i in range(4)])
    h.send(batch)
    assert sorted(d.rank for d in h.deliveries(4)) == [0, 1, 2, 3]
    embeds = make_request("embeds")
    embeds.input_ids = None
    embeds.input_embeds = [[0.0] * 8] * 5  # upstream total_tokens: len(None) kills the server
    h.send(embeds)
    assert [d.rid for d in h.deliveries(1)] == ["embeds"]


def test_undecodable_frames_are_dropped(controller):
    h = controller(sglang_method="round_robin", adapter=AdapterConfig(method="round_robin"))
    for frame in (b"\x00garbage", b"", b"\x80\x05\x95"):  # junk, empty, truncated pickle
        h.send_raw(frame)
    h.send(make_request("fine"))
    assert [d.rid for d in h.deliveries(1)] == ["fine"]


def test_idle_controller_blocks_instead_of_spinning(controller):
    idle = {}
    for name, adapter in (("upstream", None), ("dpcore", TOTAL_REQUESTS)):
        h = controller(sglang_method="total_requests", adapter=adapter)
        h.send(make_request("warm"))
        assert len(h.deliveries(1)) == 1
        c0, t0 = h.cpu_seconds(), time.monotonic()
        time.sleep(1.5)
        idle[name] = (h.cpu_seconds() - c0) / (time.monotonic() - t0)
        h.send(make_request("wake"))  # a blocked controller still wakes for the next request
        assert [d.rid for d in h.deliveries(1)] == ["wake"]
        h.stop()
    # Upstream spins (about one core when the machine is free); the adapter sleeps in poll.
    assert idle["dpcore"] * 10 < idle["upstream"], idle


@pytest.mark.parametrize("adapter", [None, TOTAL_REQUESTS], ids=["upstream", "dpcore"])
def test_a_dead_rank_does_not_stall_the_others(controller, adapter):
    h = controller(sglang_method="total_requests", adapter=adapter)
    for i in range(4):  # every rank serves for a while
        h.send(make_request(f"warm{i}"))
    assert sorted(d.rank for d in h.deliveries(4)) == [0, 1, 2, 3]
    dead = h.scheduler_pids[2]
    os.kill(dead, signal.SIGKILL)  # it stays a zombie: SGLang's controller does not reap it
    time.sleep(0.5)  # for ZMQ to drop the connection
    for i in range(12):
        h.send(make_request(f"r{i}"))
    got = h.deliveries(12, timeout=3)
    if adapter is None:
        # Upstream blocks in its send to rank 2 (nobody connected), and every rank starves.
        assert len(got) < 12
    else:
        assert sorted(d.rank for d in got) == [0, 0, 0, 0, 1, 1, 1, 1, 3, 3, 3, 3]
        assert h.alive()
