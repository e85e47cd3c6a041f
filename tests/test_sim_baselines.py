"""Each peer baseline's choice on small hand-made states follows its documented rule."""

from __future__ import annotations

from dpcore.model import LoadReport, Request
from dpcore.sim.baselines import (
    BASELINES,
    DynamoKV,
    SGLangBudget,
    SGLangRoundRobin,
    SMGCacheAware,
    VllmDPLB,
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def req(rid: str, num_tokens: int = 1024, hashes: tuple[int, ...] = ()) -> Request:
    return Request(rid=rid, num_tokens=num_tokens, block_hashes=hashes)


def route(policy, request: Request) -> int:
    rank = policy.select(request)
    policy.dispatched(request, rank)
    return rank


def test_registry_names() -> None:
    assert set(BASELINES) == {
        "peer:sglang_round_robin",
        "peer:sglang_total_requests",
        "peer:sglang_total_tokens",
        "peer:smg_cache_aware",
        "peer:vllm",
        "peer:dynamo",
        "ref:clairvoyant",
    }
    for name, make in BASELINES.items():
        if name.startswith("ref:"):
            continue
        assert make(2, clock=Clock()).name == name


def test_clairvoyant_picks_the_least_true_time_to_first_token() -> None:
    queued = {0: 2.0, 1: 0.5}
    cached = {0: 30, 1: 0}  # blocks of the prompt's prefix each rank holds
    make = BASELINES["ref:clairvoyant"]
    router = make(
        2,
        clock=Clock(),
        block_size=100,
        prefill_tokens_per_s=1000.0,
        cached_blocks=lambda rank, hashes: cached[rank],
        queued_prefill=queued.__getitem__,
    )
    hashes = tuple(range(40))
    # rank 0: 2.0 + 1000/1000 = 3.0 s; rank 1: 0.5 + 4000/1000 = 4.5 s
    assert router.select(Request("a", 4000, hashes)) == 0
    assert router.last_decision.scores == {"expected_ttft_s": 3.0}
    queued[0] = 4.0  # now 5.0 s against 4.5 s
    assert router.select(Request("b", 4000, hashes)) == 1
    assert router.dispatched(Request("b", 4000, hashes), 1) == 0


def test_clairvoyant_breaks_a_tie_by_the_lighter_rank() -> None:
    running = {0: 5, 1: 2, 2: 7}
    router = BASELINES["ref:clairvoyant"](
        3,
        clock=Clock(),
        block_size=100,
        prefill_tokens_per_s=1000.0,
        cached_blocks=lambda rank, hashes: 0,
        queued_prefill=lambda rank: 0.0,
        running=running.__getitem__,
    )
    assert router.select(Request("a", 500, ())) == 1
    running[1] = 9
    assert router.select(Request("b", 500, ())) == 0


def test_sglang_round_robin_cycles() -> None:
    p = SGLangRoundRobin(3, clock=Clock())
    assert [route(p, req(str(i))) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_sglang_total_requests_overwrite_lowest_index_and_plus_one() -> None:
    clock = Clock()
    p = SGLangBudget(4, method="total_requests", clock=clock)
    for rank, (running, waiting) in enumerate([(3, 0), (1, 0), (0, 1), (2, 0)]):
        p.report(LoadReport(rank=rank, seq=1, num_running=running, num_waiting=waiting))
    assert route(p, req("a")) == 1  # ties 1 and 2 -> lowest index
    assert route(p, req("b")) == 2  # rank 1 got +1
    assert p.total_requests == [3, 2, 2, 2]
    # A report taken before those dispatches overwrites them: no reconciliation...
    p.report(LoadReport(rank=1, seq=2, acked_seq=-1, num_running=1))
    # ...but only once the 20 ms refresh throttle allows a read.
    clock.t = 0.010
    assert route(p, req("c")) == 1  # still sees 2 on rank 1 -> ties 1,2,3 -> 1
    assert p.total_requests == [3, 3, 2, 2]
    clock.t = 0.030
    assert route(p, req("d")) == 1  # the stale report set rank 1 back to 1
    assert p.total_requests == [3, 2, 2, 2]


def test_sglang_total_tokens_key_and_prompt_increment() -> None:
    p = SGLangBudget(3, method="total_tokens", clock=Clock())
    p.report(LoadReport(rank=0, seq=1, num_tokens=500, num_running=1))
    p.report(LoadReport(rank=1, seq=1, num_tokens=500, num_running=0))
    p.report(LoadReport(rank=2, seq=1, num_tokens=900, num_running=0))
    assert route(p, req("a", num_tokens=300)) == 1  # (500, 0) beats (500, 1)
    assert p.total_tokens == [500, 800, 900]
    assert route(p, req("b", num_tokens=300)) == 0


def test_vllm_score_is_four_waiting_plus_running_lowest_index() -> None:
    p = VllmDPLB(3, clock=Clock())
    p.report(LoadReport(rank=0, seq=1, num_running=5, num_waiting=0))  # 5
    p.report(LoadReport(rank=1, seq=1, num_running=1, num_waiting=1))  # 5
    p.report(LoadReport(rank=2, seq=1, num_running=0, num_waiting=2))  # 8
    assert route(p, req("a")) == 0  # tie 0/1 -> first in scan order
    assert route(p, req("b")) == 1  # rank 0 got +1 waiting -> 9
    assert p.waiting == [1, 2, 2]
    p.report(LoadReport(rank=0, seq=2, num_running=0, num_waiting=0))  # overwrite
    assert route(p, req("c")) == 0


def test_smg_light_load_sends_a_shared_prefix_to_one_worker() -> None:
    p = SMGCacheAware(4, clock=Clock())
    prefix = tuple(range(100, 110))
    ranks = [route(p, req(f"r{i}", hashes=prefix + (1000 + i,))) for i in range(30)]
    # first one is a miss (min-load: worker 0), then every request matches 10/11 > 0.3
    assert set(ranks) == {0}
    assert p.last_decision.reason == "cache_hit"
    # a miss (below the threshold) goes to the min-load worker: (load, processed, index)
    assert p.select(req("x", hashes=(5, 6, 7))) == 1
    assert p.last_decision.reason == "cache_miss"


def test_smg_spreads_once_both_imbalance_thresholds_are_crossed() -> None:
    p = SMGCacheAware(2, clock=Clock())
    prefix = tuple(range(100, 110))
    ranks = [route(p, req(f"r{i}", hashes=prefix + (1000 + i,))) for i in range(66)]
    # loads [65, 0] after 65 dispatches: 65 - 0 > 64 and 65 > 1.5 * 0 -> the 66th spreads
    assert ranks[:65] == [0] * 65 and ranks[65] == 1
    assert p.last_decision.reason == "imbalanced"
    # completions shrink the gap below the absolute threshold: affinity again, to the
    # prefix's last inserter (worker 1: the spread request was inserted there too)
    for i in range(10):
        p.finished(req(f"r{i}"), 0)
    assert p.select(req("y", hashes=prefix + (9999,))) == 1
    assert p.last_decision.reason == "cache_hit"
    # both thresholds must be crossed (strictly)
    q = SMGCacheAware(2, clock=Clock())
    for loads, reason in (
        ([100, 70], "cache_miss"),  # difference 30 <= 64
        ([300, 210], "cache_miss"),  # difference 90 > 64 but 300 <= 1.5 x 210
        ([200, 136], "cache_miss"),  # difference exactly 64 is not > 64
        ([200, 120], "imbalanced"),  # 80 > 64 and 200 > 180
    ):
        q.load = loads
        assert q.select(req("z", hashes=(1, 2))) == 1 and q.last_decision.reason == reason


def test_smg_hit_goes_to_the_last_inserter_not_the_least_loaded() -> None:
    p = SMGCacheAware(3, clock=Clock())
    shared = (1, 2, 3, 4)
    route(p, req("a", hashes=shared))  # -> 0 (min-load)
    p.dispatched(req("b", hashes=shared), 2)  # a router-assigned copy on worker 2
    p.load = [0, 0, 5]
    assert p.select(req("c", hashes=shared + (9,))) == 2


def test_dynamo_cost_prefers_cached_prefix_until_load_outweighs_it() -> None:
    cached = {0: 0, 1: 8, 2: 0}  # worker 1 holds 8 of the prompt's blocks
    p = DynamoKV(3, clock=Clock(), block_size=16, cached_blocks=lambda r, h: min(cached[r], len(h)))
    hashes = tuple(range(10))
    # cost = (active prefill + 160 - 16*overlap)/16 + active blocks + 10 - shared active
    assert route(p, req("a", num_tokens=160, hashes=hashes)) == 1  # 2 + 10 vs 10 + 10
    assert p.prefill_tokens == [0, 32, 0] and p.active_blocks == [0, 10, 0]
    # a second different prompt: worker 1 now costs 32/16 + 10 + 10 = 22 > 20
    other = tuple(range(100, 110))
    assert p.select(req("b", num_tokens=160, hashes=other)) in (0, 2)
    # first token clears prefill tokens; finish clears active blocks
    p.first_token(req("a"), 1)
    p.finished(req("a", num_tokens=160, hashes=hashes), 1)
    assert p.prefill_tokens == [0, 0, 0] and p.active_blocks == [0, 0, 0]


def test_dynamo_ties_are_random_but_seeded() -> None:
    def picks(seed: int) -> list[int]:
        p = DynamoKV(4, clock=Clock(), seed=seed)
        return [p.select(req(str(i), num_tokens=512)) for i in range(40)]

    assert picks(1) == picks(1)
    assert len(set(picks(1))) == 4  # idle workers tie: every one gets picked
    assert picks(1) != picks(2)
