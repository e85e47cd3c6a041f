from __future__ import annotations

import tracemalloc

from dpcore.testing import PolicyHarness


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def prefix(tag: int, n: int = 8) -> tuple[int, ...]:
    return tuple(tag * 1000 + i for i in range(n))


def test_shared_prefix_sticks_under_light_imbalance():
    h = PolicyHarness("cache_aware", dp_size=4)
    first = h.select(num_tokens=512, block_hashes=prefix(1))
    # Ten more requests with the same prefix (and different tails) follow it while loads
    # stay within the thresholds.
    for i in range(10):
        assert h.select(num_tokens=600, block_hashes=prefix(1) + (99_000 + i,)) == first
    assert h.manager.last_decision.reason == "prefix_hit"


def test_spreads_once_thresholds_are_crossed():
    h = PolicyHarness("cache_aware", dp_size=2, options={"cache_aware": {"balance_abs": 4, "balance_rel": 1.5}})
    first = h.select(block_hashes=prefix(1))
    ranks = [h.select(block_hashes=prefix(1)) for _ in range(12)]
    # Rank `first` keeps the prefix until it has more than 4 requests above the other...
    assert ranks[:4] == [first] * 4
    # ...then imbalance sends work to the other rank.
    assert 1 - first in ranks
    assert h.manager.last_decision.reason in ("imbalanced", "prefix_hit")
    counts = [h.dispatched[r] for r in range(2)]
    assert max(counts) - min(counts) <= 6


def test_unrelated_prompts_go_to_least_loaded():
    h = PolicyHarness("cache_aware", dp_size=4)
    ranks = [h.select(block_hashes=prefix(i)) for i in range(4)]
    assert sorted(ranks) == [0, 1, 2, 3]
    assert h.manager.last_decision.reason == "cache_miss"


def test_low_match_below_threshold_is_a_miss():
    h = PolicyHarness("cache_aware", dp_size=2)
    a = h.select(block_hashes=prefix(1, 2))
    # 2 of 10 blocks match: 0.2 <= 0.3, so load decides (the other, idle rank).
    b = h.select(block_hashes=prefix(1, 2) + tuple(range(50, 58)))
    assert b != a


def test_inactive_holder_is_not_used():
    h = PolicyHarness("cache_aware", dp_size=2)
    a = h.select(block_hashes=prefix(3))
    h.kill(a)
    assert h.select(block_hashes=prefix(3)) == 1 - a


def test_index_is_bounded_on_100k_distinct_prefixes():
    h = PolicyHarness("cache_aware", dp_size=8, options={"cache_aware": {"max_blocks": 20_000}})
    tracemalloc.start()
    base = None
    for i in range(100_000):
        h.select(num_tokens=256, block_hashes=(i * 7 + 1, i * 7 + 2, i * 7 + 3, i * 7 + 4))
        if i % 8 == 7:
            for r in range(8):
                h.report(r, num_running=0)
        if i == 10_000:
            base = tracemalloc.get_traced_memory()[0]
    end = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(h.policy) <= 20_000
    # Memory stops growing once the bound is reached (allow some slack for allocator noise).
    assert end < base * 1.5


def test_entries_age_out():
    clock = Clock()
    h = PolicyHarness("cache_aware", dp_size=2, options={"cache_aware": {"eviction_interval": 10}}, clock=clock)
    h.select(block_hashes=prefix(1))
    assert len(h.policy) == 8
    clock.t = 30.0
    h.select(block_hashes=prefix(2))
    assert len(h.policy) == 8  # prefix(1) aged out, prefix(2) indexed
