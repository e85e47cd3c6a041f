"""Every first-party policy, and one installed by pip, placing real requests in SGLang's loop."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest

from dpcore.discovery import available
from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.testing import make_request

pytestmark = pytest.mark.sglang


def dpcore(method: str, **options: dict) -> AdapterConfig:
    return AdapterConfig(method=method, options=options)


def test_round_robin_cycles_in_order(controller):
    h = controller(sglang_method="round_robin", adapter=dpcore("round_robin"))
    for i in range(8):
        h.send(make_request(f"r{i}"))
    # Receivers report independently, so compare placements, not arrival order.
    assert {d.rid: d.rank for d in h.deliveries(8)} == {f"r{i}": i % 4 for i in range(8)}


def test_follow_bootstrap_room_uses_room_modulo_ranks(controller):
    h = controller(sglang_method="follow_bootstrap_room", adapter=dpcore("follow_bootstrap_room"))
    rooms = [0, 1, 4, 5, 102, 7, 1_000_003]
    for room in rooms:
        h.send(make_request(f"room{room}", bootstrap_room=room))
    got = {d.rid: d.rank for d in h.deliveries(len(rooms))}
    assert got == {f"room{room}": room % 4 for room in rooms}


def test_total_requests_spreads_a_burst_evenly(controller):
    h = controller(sglang_method="total_requests", adapter=dpcore("total_requests"))
    for i in range(12):
        h.send(make_request(f"r{i}"))
    assert Counter(d.rank for d in h.deliveries(12)) == {0: 3, 1: 3, 2: 3, 3: 3}


def test_total_tokens_steers_away_from_the_rank_holding_a_long_prompt(controller):
    h = controller(sglang_method="total_tokens", adapter=dpcore("total_tokens"))
    h.send(make_request("long", num_tokens=4000))
    (first,) = h.deliveries(1)
    for i in range(9):
        h.send(make_request(f"short{i}", num_tokens=1000))
    short = Counter(d.rank for d in h.deliveries(9))
    # 3 × 1000 tokens on each other rank still weigh less than the 4000 held by `first`.
    assert sum(short.values()) == 9
    assert short[first.rank] == 0


def test_cache_aware_keeps_each_prefix_on_one_rank(controller):
    h = controller(sglang_method="round_robin", adapter=dpcore("cache_aware"))
    prefixes = [0, 100_000, 200_000, 300_000]
    for p in prefixes:
        h.send(make_request(f"first{p}", num_tokens=1024, first_token=p))
    home = {int(d.rid.removeprefix("first")): d.rank for d in h.deliveries(4)}
    assert sorted(home.values()) == [0, 1, 2, 3]  # no prefix is cached anywhere yet
    for rep in range(3):
        for p in prefixes:
            h.send(make_request(f"again{p}-{rep}", num_tokens=1024, first_token=p))
    placed = defaultdict(set)
    for d in h.deliveries(12):
        placed[int(d.rid.removeprefix("again").split("-")[0])].add(d.rank)
    # Only possible if the adapter hashed input_ids into block_hashes the policy can match.
    assert placed == {p: {home[p]} for p in prefixes}


def test_auto_resolves_the_dpcore_way(controller):
    h = controller(sglang_method="round_robin", adapter=dpcore("auto"))
    for i in range(4):
        h.send(make_request(f"r{i}"))
    assert {d.rid: d.rank for d in h.deliveries(4)} == {f"r{i}": i for i in range(4)}


@pytest.mark.parametrize(("mode", "expected"), [("prefill", [3, 2, 1, 0]), ("decode", [0, 1, 2, 3])])
def test_auto_follows_sglangs_disaggregation_mode(controller, mode, expected):
    told = "follow_bootstrap_room" if mode == "prefill" else "round_robin"  # what the launcher tells SGLang
    h = controller(sglang_method=told, adapter=dpcore("auto"), server_args={"disaggregation_mode": mode})
    for i, room in enumerate((3, 6, 9, 12)):
        h.send(make_request(f"r{i}", bootstrap_room=room))
    assert {d.rid: d.rank for d in h.deliveries(4)} == {f"r{i}": r for i, r in enumerate(expected)}


def test_third_party_policy_installed_by_pip(controller):
    info = available()["power_of_two"]
    assert info.dist == "dp-power-of-two"  # the example plugin, pip-installed next to dpcore
    h = controller(sglang_method="total_requests", adapter=dpcore("power_of_two", power_of_two={"seed": 7}))
    h.send(make_request("big", num_tokens=8000))
    (big,) = h.deliveries(1)
    for i in range(40):
        h.send(make_request(f"r{i}", num_tokens=100))
    got = Counter(d.rank for d in h.deliveries(40))
    assert sum(got.values()) == 40
    # The less loaded of two random ranks: the rank holding 8000 tokens loses every draw
    # until 8000 tokens' worth of small requests land elsewhere, i.e. for all 40 here.
    assert got[big.rank] == 0
    assert len(got) == 3


def test_load_snapshots_written_by_sglang_change_decisions(controller):
    h = controller(sglang_method="total_requests", adapter=dpcore("total_requests"))
    # What a busy rank 0's scheduler publishes through SGLang's shared-memory writer.
    h.write_snapshot(0, num_running_reqs=30, num_waiting_reqs=20, num_total_tokens=50_000)
    for r in (1, 2, 3):
        h.write_snapshot(r)
    for i in range(9):
        h.send(make_request(f"r{i}"))
    assert Counter(d.rank for d in h.deliveries(9)) == {1: 3, 2: 3, 3: 3}
    # Rank 0 drains and the others fill up; the next snapshots make rank 0 the least loaded.
    h.write_snapshot(0, num_running_reqs=0, num_waiting_reqs=0)
    for r in (1, 2, 3):
        h.write_snapshot(r, num_running_reqs=60, num_waiting_reqs=0)
    time.sleep(0.05)  # past SGLang's 20 ms refresh throttle
    for i in range(4):
        h.send(make_request(f"s{i}"))
    assert Counter(d.rank for d in h.deliveries(4)) == {0: 4}


def test_total_tokens_reads_snapshot_tokens(controller):
    # queue_weight 0: compare the tokens ranks hold (snapshot + dispatched) and nothing else.
    h = controller(sglang_method="total_tokens", adapter=dpcore("total_tokens", total_tokens={"queue_weight": 0}))
    h.write_snapshot(0, num_total_tokens=0)
    h.write_snapshot(1, num_total_tokens=90_000, num_used_tokens=90_000)
    h.write_snapshot(2, num_total_tokens=90_000, num_used_tokens=90_000)
    h.write_snapshot(3, num_total_tokens=2_500, num_used_tokens=2_500)
    for i in range(6):
        h.send(make_request(f"r{i}", num_tokens=1000))
    placed = [d.rank for d in sorted(h.deliveries(6), key=lambda d: int(d.rid[1:]))]
    # The two ranks holding 90,000 tokens get nothing; the empty rank 0 gets the first one.
    assert set(placed) <= {0, 3}
    assert placed[0] == 0
