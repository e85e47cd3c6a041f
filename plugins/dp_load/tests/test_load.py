from __future__ import annotations

import pytest

from dpcore.errors import NoActiveRankError, PolicyOptionError
from dpcore.testing import PolicyHarness, make_request


def test_total_requests_picks_min_and_increments():
    h = PolicyHarness("total_requests", dp_size=3)
    for rank, n in enumerate((4, 2, 7)):
        h.report(rank, num_running=n)
    assert h.select() == 1
    assert h.ledger.requests == [4, 3, 7]


def test_total_requests_from_zero_rotates_ties():
    h = PolicyHarness("total_requests", dp_size=3)
    assert [h.select() for _ in range(4)] == [0, 1, 2, 0]
    assert h.ledger.requests == [2, 1, 1]


def test_ties_rotate_instead_of_lowest_index():
    h = PolicyHarness("total_requests", dp_size=4)
    for r in range(4):
        h.report(r, num_running=5)
    first = [h.pick() for _ in range(4)]  # pick: no dispatch, loads stay tied
    assert sorted(first) == [0, 1, 2, 3]


def test_total_tokens_picks_min_tokens_and_adds_prompt():
    h = PolicyHarness("total_tokens", dp_size=3)
    for rank, t in enumerate((100, 50, 200)):
        h.report(rank, num_tokens=t)
    assert h.select(num_tokens=30) == 1
    assert h.ledger.tokens[1] == 80 and h.ledger.requests[1] == 1


def test_total_tokens_tie_broken_by_requests():
    h = PolicyHarness("total_tokens", dp_size=3)
    for rank, n in enumerate((4, 2, 7)):
        h.report(rank, num_running=n, num_tokens=100)
    assert h.select(num_tokens=1) == 1


def test_report_force_sets_only_its_rank():
    h = PolicyHarness("total_requests", dp_size=2)
    h.report(0, num_running=5, num_waiting=1)
    h.report(1, num_running=3)
    h.report(1, num_running=0)
    assert h.ledger.requests == [6, 0]


@pytest.mark.parametrize("dp", [2, 4, 8])
def test_burst_between_reports_spreads_within_one(dp):
    h = PolicyHarness("total_requests", dp_size=dp)
    for r in range(dp):
        h.report(r, num_running=0)
    for _ in range(1000):
        h.select(num_tokens=100)
    counts = [h.dispatched[r] for r in range(dp)]
    assert max(counts) - min(counts) <= 1


def test_burst_spreads_by_size_under_total_tokens():
    h = PolicyHarness("total_tokens", dp_size=2)
    h.select(num_tokens=1000)  # one big request to a rank...
    for _ in range(10):
        h.select(num_tokens=100)  # ...then ten small ones go to the other
    assert sorted(h.tokens.values()) == [1000, 1000]


def test_stale_report_does_not_erase_unacknowledged_dispatches():
    h = PolicyHarness("total_requests", dp_size=2)
    for r in range(2):
        h.report(r, num_running=0)
    for _ in range(20):
        h.select()
    # Rank 0 reports "idle", but the report predates everything we sent it.
    h.report(0, num_running=0, acked_seq=-1)
    assert h.ledger.requests[0] == 10
    # So the next request is not herded onto rank 0.
    assert [h.select() for _ in range(2)].count(0) == 1


def test_router_assigned_requests_count_as_load():
    h = PolicyHarness("total_requests", dp_size=2)
    for _ in range(5):
        h.select(routed_dp_rank=0)
    assert h.select() == 1


def test_inactive_ranks_are_skipped():
    h = PolicyHarness("total_tokens", dp_size=3)
    h.report(0, num_tokens=1000)
    h.report(1, num_tokens=0)
    h.report(2, num_tokens=1000)
    h.kill(1)
    assert h.select(make_request(num_tokens=5)) in (0, 2)
    h.kill(0)
    h.kill(2)
    with pytest.raises(NoActiveRankError):
        h.select()


# --------------------------------------------------------------------- queued work


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def learn_drain_rate(h: PolicyHarness, clock: Clock, rank: int, rate: int) -> None:
    """Two reports one second apart with work waiting at both ends: *rate* tokens/s started."""
    h.report(rank, num_waiting=1, num_tokens=rate + 500)
    clock.t += 1.0
    h.report(rank, num_waiting=1, num_tokens=500)


@pytest.mark.parametrize("policy", ["total_tokens", "total_requests"])
def test_a_queue_outweighs_held_load(policy):
    h = PolicyHarness(policy, dp_size=2)
    h.dispatch(make_request(num_tokens=1_000), 0)
    h.dispatch(make_request(num_tokens=1_000), 1)
    # Rank 0 holds more (KV, running requests) but nothing waits there; rank 1 holds less
    # and has three prompts waiting, which every new request would queue behind.
    h.report(0, num_running=20, num_tokens=100_000, kv_used=100_000)
    h.report(1, num_running=10, num_waiting=3, num_tokens=53_000, kv_used=50_000)
    assert h.pick() == 0
    assert h.ctx.decision.scores["load"][1] > h.ctx.decision.scores["load"][0]


@pytest.mark.parametrize("policy", ["total_tokens", "total_requests"])
def test_queue_weight_zero_compares_held_load_only(policy):
    h = PolicyHarness(policy, dp_size=2, options={policy: {"queue_weight": 0}})
    h.dispatch(make_request(num_tokens=1_000), 0)
    h.report(0, num_running=20, num_tokens=100_000, kv_used=100_000)
    h.report(1, num_running=10, num_waiting=3, num_tokens=53_000, kv_used=50_000)
    assert h.pick() == 1


@pytest.mark.parametrize("policy", ["total_tokens", "total_requests"])
def test_a_burst_rank_comes_back_once_its_queue_has_drained(policy):
    clock = Clock()
    h = PolicyHarness(policy, dp_size=3, clock=clock)
    learn_drain_rate(h, clock, 2, 10_000)
    h.kill(2)
    h.report(0, num_running=10, num_tokens=10_000, kv_used=10_000)
    h.report(1, num_running=12, num_tokens=20_000, kv_used=20_000)
    assert h.select(num_tokens=5_000) == 0
    # Rank 0 has not acknowledged it: the request waits there, rank 1 is the better choice...
    assert h.pick(num_tokens=5_000) == 1
    # ...until the queue has drained (0.5 s at 10,000 tokens/s), report or no report.
    clock.t += 0.6
    assert h.pick(num_tokens=5_000) == 0


@pytest.mark.parametrize("policy", ["total_tokens", "total_requests"])
def test_bad_queue_weight_is_an_option_error(policy):
    for bad in (-1, "many", float("nan")):
        with pytest.raises(PolicyOptionError, match="queue_weight"):
            PolicyHarness(policy, dp_size=2, options={policy: {"queue_weight": bad}})


@pytest.mark.parametrize("policy", ["total_tokens", "total_requests"])
def test_late_reports_do_not_herd_a_steady_stream(policy):
    # Each request runs 10 s. Every rank reports once a second, staggered, and each report
    # is 5 s old when it arrives. Right after its report a rank looks lighter by the
    # requests that finished in its last second; a policy that trusts that herds the next
    # requests onto it. The queue estimate keeps every second's dispatches even.
    clock = Clock()
    dp, per_s, run_s, delay_s = 4, 20, 10.0, 5.0
    h = PolicyHarness(policy, dp_size=dp, clock=clock)
    for r in range(dp):
        learn_drain_rate(h, clock, r, 4_000)
    start = clock.t
    sent: list[list[tuple[float, int]]] = [[] for _ in range(dp)]  # (time, seq)
    windows = []
    for second in range(30):
        window = [0] * dp
        for k in range(per_s):
            clock.t = start + second + k / per_s
            for r in range(dp):  # rank r's report arrives at r/dp into each second
                if k == r * per_s // dp:
                    taken = clock.t - delay_s
                    seen = [(t, q) for t, q in sent[r] if t <= taken]
                    running = sum(1 for t, _ in seen if t > taken - run_s)
                    acked = seen[-1][1] if seen else -1
                    h.report(r, acked_seq=acked, num_running=running, num_tokens=1_000 * running, kv_used=1_000 * running)
            rank = h.select(num_tokens=1_000)
            sent[rank].append((clock.t, h.ledger.next_dispatch_seq(rank) - 1))
            window[rank] += 1
        windows.append(window)
    steady = windows[15:]
    assert max(max(w) - min(w) for w in steady) <= 1, steady
