"""The per-rank exact cache index: events in, matches out, unknown whenever in doubt."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpcore.cacheindex import CLEARED, REMOVED, STORED, CacheIndex, KvEventBatch, prefix_depths
from dpcore.testing import PolicyHarness


def batch(rank, seq, *events, epoch=1, capacity=0):
    return KvEventBatch(rank, epoch, seq, tuple(events), capacity)


def test_unknown_until_a_life_starts_at_sequence_zero():
    idx = CacheIndex(2)
    assert idx.match(0, [1]) is None and idx.state(0) == "unknown"
    assert idx.apply(batch(0, 0))
    assert idx.match(0, [1]) == 0 and idx.state(0) == "exact"  # empty and trusted
    assert idx.match(1, [1]) is None


def test_stored_chain_removed_and_cleared():
    idx = CacheIndex(2)
    idx.apply(batch(0, 0, (STORED, None, [10, 11, 12])))
    assert idx.match(0, [10, 11, 12, 13]) == 3
    idx.apply(batch(0, 1, (REMOVED, [12])))
    assert idx.match(0, [10, 11, 12]) == 2 and idx.blocks(0) == 2
    idx.apply(batch(0, 2, (STORED, 11, [20]), (CLEARED,), (STORED, None, [30])))
    assert idx.match(0, [10]) == 0 and idx.match(0, [30]) == 1 and idx.blocks(0) == 1


def test_a_gap_makes_the_rank_unknown_and_a_resync_makes_it_exact():
    idx = CacheIndex(1)
    idx.apply(batch(0, 0, (STORED, None, [1, 2])))
    assert not idx.apply(batch(0, 2, (STORED, 2, [3])))  # batch 1 was lost
    assert idx.match(0, [1]) is None and idx.gaps == 1 and len(idx) == 0
    assert not idx.apply(batch(0, 3, (STORED, None, [5])))  # still unknown
    assert idx.apply(batch(0, 4, (CLEARED,), (STORED, None, [1, 2, 3])))
    assert idx.match(0, [1, 2, 3]) == 3


def test_a_resync_on_an_exact_rank_replaces_what_it_held():
    idx = CacheIndex(2)
    idx.apply(batch(0, 0, (STORED, None, [1, 2])))
    idx.apply(batch(1, 0, (STORED, None, [1])))
    assert idx.apply(batch(0, 1, (CLEARED,), (STORED, None, [7, 8])))
    assert idx.known(0) and idx.match(0, [1]) == 0 and idx.match(0, [7, 8]) == 2
    assert idx.match(1, [1, 2]) == 1 and len(idx) == 3  # rank 1's copy of block 1 stays


def test_stale_and_duplicate_batches_are_ignored():
    idx = CacheIndex(1)
    idx.apply(batch(0, 0, (STORED, None, [1])))
    idx.apply(batch(0, 1, (REMOVED, [1])))
    assert not idx.apply(batch(0, 1, (STORED, None, [1])))
    assert idx.stale == 1 and idx.match(0, [1]) == 0


def test_a_restart_resets_and_a_mid_stream_join_is_unknown():
    idx = CacheIndex(1)
    idx.apply(batch(0, 0, (STORED, None, [1])))
    idx.apply(batch(0, 0, (STORED, None, [2]), epoch=2))  # new life from its first batch
    assert idx.match(0, [1]) == 0 and idx.match(0, [2]) == 1
    idx.apply(batch(0, 7, (STORED, None, [3]), epoch=3))  # new life, its first batches missed
    assert idx.match(0, [3]) is None


def test_more_blocks_than_the_capacity_is_unknown_not_trimmed():
    idx = CacheIndex(1)
    idx.apply(batch(0, 0, (STORED, None, [1, 2, 3]), capacity=4))
    assert idx.match(0, [1, 2, 3]) == 3
    assert not idx.apply(batch(0, 1, (STORED, 3, [4, 5])))
    assert idx.match(0, [1]) is None and idx.overflows == 1 and len(idx) == 0
    small = CacheIndex(1, max_blocks_per_rank=2)
    assert not small.apply(batch(0, 0, (STORED, None, [1, 2, 3])))


def test_orphans_and_unknown_removals_are_counted():
    idx = CacheIndex(1)
    idx.apply(batch(0, 0, (STORED, 99, [1]), (REMOVED, [42])))
    assert idx.orphans == 1 and idx.unknown_removals == 1
    assert idx.match(0, [1]) == 1


def test_bad_rank_is_a_clear_error():
    with pytest.raises(ValueError, match="ranks are 0..1"):
        CacheIndex(2).apply(batch(2, 0))
    with pytest.raises(ValueError, match="dp_size"):
        CacheIndex(0)



def test_depths_when_one_rank_holds_the_first_block():
    idx = CacheIndex(3)
    for r in range(3):
        idx.apply(batch(r, 0))
    idx.apply(batch(0, 1, (STORED, None, [1, 2, 3, 4])))
    idx.apply(batch(1, 1, (STORED, None, [9, 3, 4])))  # later blocks elsewhere too
    assert idx.depths([1, 2, 3, 4]) == {0: 4}  # the whole prompt
    assert idx.depths([1, 2, 3]) == {0: 3}
    assert idx.depths([1, 2, 5, 4]) == {0: 2}  # it leaves the rank's blocks: walked
    assert idx.depths([1, 2, 3, 4], 0b110) == {}
    idx.apply(batch(0, 2, (REMOVED, [3])))
    assert idx.depths([1, 2, 3, 4]) == {0: 2}

@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 12), max_size=6)), max_size=20),
    st.lists(st.integers(0, 12), max_size=8),
    st.integers(0, 15),
)
def test_depths_agree_with_match_per_rank(stores, prompt, mask):
    idx = CacheIndex(4)
    seqs = [0] * 4
    for r in range(3):  # rank 3 never publishes: unknown
        idx.apply(batch(r, 0))
        seqs[r] = 1
    for r, keys in stores:
        if r < 3:
            idx.apply(batch(r, seqs[r], (STORED, None, keys)))
            seqs[r] += 1
    d = idx.depths(prompt, mask)
    for r in range(4):
        m = idx.match(r, prompt)
        if not mask >> r & 1 or m is None:
            assert r not in d
        else:
            assert d.get(r, 0) == m


def test_policies_see_a_read_only_view_reset_by_the_lifecycle():
    h = PolicyHarness("round_robin", dp_size=2)
    idx = h.manager.cache
    idx.apply(batch(0, 0, (STORED, None, [1, 2])))
    view = h.ctx.cache
    assert view.match(0, [1, 2]) == 2 and view.known(0) and view.known_mask == 1
    assert not hasattr(view, "apply") and not hasattr(view, "reset")
    h.kill(0)
    assert view.match(0, [1]) is None
    # A restart whose first KV batch beat its first load report keeps that batch.
    idx.apply(batch(1, 0, (STORED, None, [5]), epoch=9))
    h.report(1, epoch=1)
    h.report(1, epoch=9)  # the ledger sees the new life after the index did
    assert view.match(1, [5]) == 1


def _walk(holders, keys, mask):
    """prefix_depths by the plain definition: each rank's depth, walking block by block."""
    depth = {}
    i = 0
    for k in keys:
        m = mask & holders.get(k, 0)
        dropped = mask & ~m
        if dropped and i:
            for r in range(dropped.bit_length()):
                if dropped >> r & 1:
                    depth[r] = i
        mask = m
        if not mask:
            return depth
        i += 1
    for r in range(mask.bit_length()):
        if mask >> r & 1:
            depth[r] = i
    return depth


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.integers(0, 20), st.integers(0, (1 << 6) - 1), max_size=20),
    st.lists(st.integers(0, 20), max_size=12),
    st.integers(0, (1 << 6) - 1),
)
def test_prefix_depths_is_the_block_by_block_walk(holders, keys, mask):
    # Same depths, same ranks left out, same order (shallowest first).
    assert list(prefix_depths(holders, keys, mask).items()) == list(_walk(holders, keys, mask).items())


def test_prefix_depths_of_a_long_prompt_with_ranks_dropping_out():
    keys = list(range(64))
    holders = {k: 0b1111 if k < 10 else 0b0110 if k < 40 else 0b0100 for k in keys}
    assert prefix_depths(holders, keys, 0b1111) == {0: 10, 3: 10, 1: 40, 2: 64}
    assert prefix_depths(holders, keys, 0b1001) == {0: 10, 3: 10}
    assert prefix_depths(holders, keys, 0b10000) == {}
    assert prefix_depths(holders, [], 0b101) == {0: 0, 2: 0}
