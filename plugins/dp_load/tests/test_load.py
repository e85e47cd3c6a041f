from __future__ import annotations

import pytest

from dpcore.errors import NoActiveRankError
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
