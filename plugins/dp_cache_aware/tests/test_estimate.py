"""The run-based prefix estimate answers exactly as a per-block LRU map does."""

from __future__ import annotations

from collections import OrderedDict

from dp_cache_aware.estimate import PrefixEstimate
from hypothesis import given, settings
from hypothesis import strategies as st

from dpcore import prefix_depths

DP = 3


class BlockLRU:
    """The definition: per rank, block -> [stamp, time] in LRU order, touched deepest first."""

    def __init__(self) -> None:
        self.cache = [OrderedDict() for _ in range(DP)]
        self.touched = [0.0] * DP
        self.holders: dict[int, int] = {}

    def _drop(self, rank: int, h: int) -> None:
        m = self.holders.get(h, 0) & ~(1 << rank)
        if m:
            self.holders[h] = m
        else:
            self.holders.pop(h, None)

    def touch(self, rank, hashes, bt, now):
        cache = self.cache[rank]
        clock = self.touched[rank]
        for h in reversed(hashes):
            clock += bt
            e = cache.get(h)
            if e is None:
                cache[h] = [clock, now]
                self.holders[h] = self.holders.get(h, 0) | 1 << rank
            else:
                e[0], e[1] = clock, now
                cache.move_to_end(h)
        self.touched[rank] = clock

    def trim(self, rank, oldest):
        cache = self.cache[rank]
        while cache:
            h, e = next(iter(cache.items()))
            if e[0] >= oldest:
                break
            del cache[h]
            self._drop(rank, h)

    def age(self, horizon, max_blocks):
        total = sum(map(len, self.cache))
        for rank, cache in enumerate(self.cache):
            while cache:
                h, e = next(iter(cache.items()))
                if e[1] >= horizon and total <= max_blocks:
                    break
                del cache[h]
                self._drop(rank, h)
                total -= 1

    def forget(self, rank):
        for h in self.cache[rank]:
            self._drop(rank, h)
        self.cache[rank].clear()

    def cached(self, rank, hashes, depth, bt, cap, horizon):
        clock = self.touched[rank]
        total = uncertain = 0.0
        for i in range(depth):
            age = clock - self.cache[rank][hashes[i]][0]
            if age <= cap:
                total += bt
            elif age < horizon:
                uncertain += bt * (horizon - age) / (horizon - cap)
        return total, uncertain

    def entries(self, rank):
        return [(h, e[0], e[1]) for h, e in self.cache[rank].items()]


def chain(path: list[int]) -> tuple[int, ...]:
    """Chained keys: block i's key names the whole prefix up to it (as dpcore.hashing's do)."""
    return tuple(hash(tuple(path[: i + 1])) & (1 << 62) - 1 for i in range(len(path)))


paths = st.lists(st.integers(0, 2), min_size=1, max_size=9)  # a small tree of prompts
loose = st.lists(st.integers(0, 6), min_size=1, max_size=6).map(tuple)  # keys anywhere, repeats
prompts = st.one_of(paths.map(chain), paths.map(chain), loose)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("touch"), st.integers(0, DP - 1), prompts,
                  st.sampled_from([64.0, 100 / 3, 1.5, 0.0, -2.0]), st.integers(-1, 3)),  # fmt: skip
        st.tuples(st.just("trim"), st.integers(0, DP - 1), st.sampled_from([0.0, 40.0, 100.0, 300.0])),
        st.tuples(st.just("age"), st.integers(0, 40), st.integers(0, 30)),
        st.tuples(st.just("forget"), st.integers(0, DP - 1)),
        st.tuples(st.just("ask"), st.integers(0, DP - 1), prompts, st.sampled_from([10.0, 60.0, 1e9])),
    ),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_runs_answer_as_the_per_block_lru(script):
    ref, est = BlockLRU(), PrefixEstimate(DP)
    now = 0.0
    steady = True
    for op in script:
        if op[0] == "touch":
            _, rank, hashes, bt, dt = op
            now += dt  # (now and then the clock goes back)
            steady = steady and dt >= 0
            ref.touch(rank, hashes, bt, now)
            est.touch(rank, hashes, bt, now)
        elif op[0] == "trim":
            _, rank, keep = op
            ref.trim(rank, ref.touched[rank] - keep)
            est.trim(rank, est.touched[rank] - keep)
        elif op[0] == "age":
            _, back, max_blocks = op
            ref.age(now - back, max_blocks)
            est.age(now - back, max_blocks)
        elif op[0] == "forget":
            ref.forget(op[1])
            est.forget(op[1])
        else:
            _, rank, hashes, cap = op
            depth = prefix_depths(ref.holders, hashes, 1 << rank).get(rank, 0)
            for mask in (1 << rank, (1 << DP) - 1, (1 << DP) - 1 & ~(1 << rank)):
                assert est.depths(hashes, mask) == prefix_depths(ref.holders, hashes, mask)
            want = ref.cached(rank, hashes, depth, 64.0, cap, cap * 3)
            assert est.cached(rank, hashes, depth, 64.0, cap, cap * 3) == want
        assert est.touched == ref.touched
        assert est.holders == ref.holders
        assert len(est) == sum(map(len, ref.cache))
        for rank in range(DP):
            assert est.entries(rank) == ref.entries(rank)
        if steady:  # then each rank's least recently used block is its oldest
            oldest = min((e[1] for c in ref.cache for e in c.values()), default=float("inf"))
            assert est.oldest_use() == oldest


def test_a_prompt_that_extends_an_earlier_one_moves_runs_not_blocks():
    est = PrefixEstimate(1)
    first = chain([0] * 40)
    est.touch(0, first, 64.0, 1.0)
    longer = chain([0] * 40 + [1] * 24)
    est.touch(0, longer, 64.0, 2.0)
    est.touch(0, longer, 64.0, 3.0)
    assert len(est._runs[0]) == 2  # the first prompt's blocks and the new ones
    assert [e[0] for e in est.entries(0)] == list(reversed(longer))
