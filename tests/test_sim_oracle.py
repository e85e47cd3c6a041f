"""Prefix-hit ceiling and equal-capacity oracle against independent counts."""

from __future__ import annotations

import random

import pytest

from dpcore.sim.oracle import ceiling_hit_ratio, lru_hit_ratio, oracle_hit_ratio
from dpcore.sim.traces import Trace, TraceRequest


def make_trace(rows: list[tuple[int, tuple[int, ...]]], block_size: int = 10) -> Trace:
    return Trace(
        path="synthetic",
        format="mooncake",
        block_size=block_size,
        requests=tuple(
            TraceRequest(index=i, arrival=float(i), input_length=n, output_length=1, hash_ids=h)
            for i, (n, h) in enumerate(rows)
        ),
    )


HAND = make_trace([(30, (1, 2, 3)), (25, (1, 2, 4)), (30, (1, 2, 3)), (10, (5,)), (25, (1, 2, 4))])


def test_ceiling_by_hand() -> None:
    # hits: 0, 20 (blocks 1-2), 30, 0, 25 (the partial last block counts its 5 tokens)
    assert ceiling_hit_ratio(HAND) == pytest.approx(75 / 120)


def test_equal_capacity_oracle_by_hand() -> None:
    # 40 tokens of LRU: request 4 evicts block 4, request 5 then misses it (and evicts 3).
    assert lru_hit_ratio(HAND, 40) == pytest.approx(70 / 120)
    assert oracle_hit_ratio(HAND, 2, 20) == pytest.approx(70 / 120)
    assert oracle_hit_ratio(HAND, 1, 10_000) == pytest.approx(ceiling_hit_ratio(HAND))


def conversations(seed: int, n: int = 400) -> Trace:
    """Multi-turn sessions: each turn extends its session's previous prompt by new blocks."""
    rng = random.Random(seed)
    next_id = 1
    sessions: list[list[int]] = []
    rows = []
    for _ in range(n):
        if sessions and rng.random() < 0.6:
            s = rng.choice(sessions)
        else:
            s = [0] if rng.random() < 0.5 else []  # some share a system-prompt block
            sessions.append(s)
        for _ in range(rng.randint(1, 4)):
            s.append(next_id)
            next_id += 1
        tail = rng.randint(1, 10)
        rows.append((10 * (len(s) - 1) + tail, tuple(s)))
    return make_trace(rows)


def naive_counts(trace: Trace, capacity: int | None) -> float:
    """Prefixes as tuples, recency as explicit timestamps, eviction by scanning: slow, obvious."""
    cache: dict[tuple[int, ...], list[float]] = {}  # prefix -> [last use, tokens]
    clock = 0
    hit = total = 0
    for r in trace.requests:
        h = r.hash_ids
        total += r.input_length
        m = 0
        while m < len(h) and tuple(h[: m + 1]) in cache:
            m += 1
        hit += min(10 * m, r.input_length)
        for k in reversed(range(len(h))):  # the root is touched last: the most recent
            clock += 1
            prefix = tuple(h[: k + 1])
            tokens = min(10, r.input_length - 10 * k)
            cache[prefix] = [clock, cache.get(prefix, [0, tokens])[1]]
        if capacity is not None:
            while sum(t for _, t in cache.values()) > capacity:
                oldest = min(cache, key=lambda p: cache[p][0])
                del cache[oldest]
    return hit / total


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_against_independent_counts_on_synthetic_conversations(seed: int) -> None:
    trace = conversations(seed)
    assert ceiling_hit_ratio(trace) == pytest.approx(naive_counts(trace, None))
    for capacity in (200, 1000, 5000):
        assert lru_hit_ratio(trace, capacity) == pytest.approx(naive_counts(trace, capacity))
    # less memory never helps
    assert lru_hit_ratio(trace, 200) < lru_hit_ratio(trace, 5000) <= ceiling_hit_ratio(trace)


def test_no_prefixes_no_hits() -> None:
    azure_like = Trace(
        path="a",
        format="azure",
        block_size=0,
        requests=(TraceRequest(index=0, arrival=0.0, input_length=100, output_length=5),),
    )
    assert ceiling_hit_ratio(azure_like) == 0.0 == oracle_hit_ratio(azure_like, 8, 500_000)
